"""The testbed model's position embedding and multi-layer projector helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression

from tokenprune.testbed import scenes as S
from tokenprune.testbed.model import (add_patch_positions, build_model, projected_features, reset_language_model,
                                      sincos_position_2d, widen_projector)

TINY = dict(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


def _pixels(n=2, seed=0):
    rng = np.random.default_rng(seed)
    scenes = [S.make_scene(rng, S.make_backgrounds(4, seed=seed)) for _ in range(n)]
    return torch.from_numpy(S.pixel_values(np.stack([s.image for s in scenes])))


def _image_features(model, pv):
    return torch.stack(list(model.model.get_image_features(pv).pooler_output))


def test_sincos_halves_encode_column_and_row_with_fixed_norm():
    grid, dim = 14, 32
    emb = sincos_position_2d(grid, dim)
    assert emb.shape == (grid * grid, dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.full((grid * grid,), (dim / 2) ** 0.5))
    by_cell = emb.reshape(grid, grid, dim)  # [row, column, dim]
    col_half, row_half = by_cell[..., : dim // 2], by_cell[..., dim // 2:]
    assert torch.equal(col_half, col_half[:1].expand_as(col_half))  # the same for every row
    assert torch.equal(row_half, row_half[:, :1].expand_as(row_half))  # the same for every column
    assert len(torch.unique(emb, dim=0)) == grid * grid


def test_sincos_refuses_a_width_it_cannot_split():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_2d(14, 30)


def test_fresh_model_position_embeddings_tell_columns_apart():
    model = build_model(**TINY, seed=1)
    pos = model.model.vision_tower.embeddings.position_embedding.weight.detach().numpy()[1:]
    col = np.arange(S.NUM_PATCHES) % S.GRID
    fit = LinearRegression().fit(pos, col)
    assert fit.score(pos, col) > 0.99


def test_add_patch_positions_leaves_cls_alone():
    model = build_model(**TINY, seed=2)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    before = weight.detach().clone()
    add_patch_positions(model, 0.5)
    assert torch.equal(weight[0], before[0])
    torch.testing.assert_close(weight[1:] - before[1:], 0.5 * sincos_position_2d(S.GRID, weight.shape[1]))


def test_widened_projector_computes_the_same_visual_tokens():
    model = build_model(**TINY, seed=3).eval()
    pv = _pixels()
    with torch.no_grad():
        before = _image_features(model, pv)
        widen_projector(model, (0, -1))
        after = _image_features(model, pv)
    assert model.config.vision_feature_layer == [0, -1]
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * TINY["vision_hidden"]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers, message", [((0, 1), "do not include the model's current layer -1")])
def test_widen_projector_refuses_layers_without_the_current_one(layers, message):
    with pytest.raises(ValueError, match=message):
        widen_projector(build_model(**TINY), layers)


def test_widen_projector_refuses_a_multi_layer_model():
    with pytest.raises(ValueError, match="already reads layers"):
        widen_projector(build_model(**TINY, feature_layers=(0, -1)), (0, 1, -1))


@pytest.mark.parametrize("layers", [(-1,), (0, -1), (1, -1)])
def test_training_features_are_the_stock_image_features(layers):
    model = build_model(**TINY, feature_layers=layers, seed=5).eval()
    pv = _pixels(seed=1)
    with torch.no_grad():
        ours = projected_features(model, model.model.vision_tower(pv, output_hidden_states=True))
        stock = _image_features(model, pv)
    assert torch.equal(ours, stock)


def test_reset_language_model_keeps_the_vision_side_and_leaves_the_original_alone():
    model = build_model(**TINY, feature_layers=(0, -1), seed=1)
    with torch.no_grad():  # make the language model distinguishable from any fresh one
        for p in model.model.language_model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = reset_language_model(model, seed=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    after = fresh.state_dict()
    assert after.keys() == before.keys()
    vision = [k for k in before if k.startswith(("model.vision_tower", "model.multi_modal_projector"))]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision)
    language = [k for k in before if k.startswith(("model.language_model", "lm_head"))
                and not k.endswith("norm.weight")]
    assert language and not any(torch.equal(after[k], before[k]) for k in language)
    pv = _pixels()
    assert torch.equal(_image_features(fresh, pv), _image_features(model, pv))
