"""Selection arithmetic in the features' own dtype (``compute_dtype="model"``) against a plain fp16
reference of DivPrune's rule, as its released scripts compute it (vbdi/divprune, commit
799e2d950aa01ba7860907f5a6d86061f885dca6, ``LLaVA/llava/model/llava_arch.py``), and float32 (the
default) everywhere else."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import shared_tiny_vlm


def divprune_reference(x: torch.Tensor, k: int) -> list:
    """DivPrune's selection written out in the dtype of ``x`` ``[N, D]``: distances ``1 - cos`` from
    the normalised features, the first pick maximising the second-smallest entry of its column, then
    the minimum over the kept rows, argmax (first index among ties); nothing upcast."""
    unit = x / x.norm(dim=1, keepdim=True)
    D = 1.0 - torch.mm(unit, unit.t())
    picks = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(D, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(D[torch.tensor(picks)], dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


def clustered(seed: int, n: int = 576, d: int = 128, dtype=torch.float16) -> torch.Tensor:
    """Patch-like features: a few clusters, so near-duplicates whose fp16 distances tie."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(24, d, generator=g)
    x = centres[torch.randint(0, 24, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    return x.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_dtype_matches_the_fp16_reference_bit_for_bit(seed):
    x = clustered(seed)
    for k in (16, 64):
        want = divprune_reference(x, k)
        assert tp.select("divprune", x[None], budget=k, compute_dtype="model").indices[0].tolist() == want
        m = tp.create_method("divprune", budget=k, compute_dtype="model")
        assert m.select(x[None]).indices[0].tolist() == want


def test_float32_default_keeps_other_tokens_on_fp16_features_and_matches_the_float32_reference():
    jaccard = []
    for seed in range(3):
        x = clustered(seed)
        got = set(tp.select("divprune", x[None], budget=64).indices[0].tolist())
        fp16 = set(divprune_reference(x, 64))
        jaccard.append(len(got & fp16) / len(got | fp16))
        # the default upcasts first: the reference run on the float32 copy keeps the same tokens
        assert sorted(got) == divprune_reference(x.float(), 64)
    assert min(jaccard) < 1.0  # fp16 rounding does change the picks: the option is not a no-op


def test_model_dtype_similarity_is_computed_in_that_dtype():
    x = clustered(5, n=40, d=32)
    ctx = tp.make_context(x[None], compute_dtype="model")
    unit = x / x.norm(dim=1, keepdim=True)
    assert ctx.features_dtype == torch.float16
    assert ctx.similarity.dtype == torch.float32  # stored as float32 for every criterion ...
    assert torch.equal(ctx.similarity[0], torch.mm(unit, unit.t()).float())  # ... holding the fp16 values
    default = tp.make_context(x[None])
    assert default.features_dtype == torch.float32 and not torch.equal(default.similarity, ctx.similarity)


def test_padding_is_never_picked_in_model_dtype():
    x = clustered(6, n=30, d=16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    sel = tp.select("divprune", torch.stack([x, x]), budget=8, mask=mask, compute_dtype="model")
    assert sel.indices[0].tolist() == divprune_reference(x, 8)
    assert sel.indices[1].tolist() == divprune_reference(x[:20], 8)


def test_compute_dtype_reaches_stages_configs_and_other_methods():
    m = tp.create_method("divprune", compute_dtype="model")
    assert m.stages[0].compute_dtype == "model"
    assert tp.from_config(m.to_config()) == m
    assert tp.create_method("divprune").stages[0].compute_dtype == "float32"
    c = tp.compose(tp.criteria.Coverage(), selector="greedy", budget=4, compute_dtype="model")
    assert c.stages[0].compute_dtype == "model"
    assert all(s.compute_dtype == "model" for s in tp.create_method("tops", compute_dtype="model").stages)
    assert tp.create_method("cdpruner", compute_dtype="model").stages[0].compute_dtype == "model"
    # other selectors read the model-dtype similarity through the context
    x = clustered(7, n=48, d=16)
    sel = c.select(x[None])
    assert sel.counts.tolist() == [4]
    with pytest.raises(tp.StageError, match="compute_dtype"):
        tp.compose(tp.criteria.Coverage(), selector="greedy", budget=4, compute_dtype="float16")
    with pytest.raises(tp.ParameterError, match="compute_dtype"):
        tp.make_context(x[None], compute_dtype="half")


def test_prune_selects_in_the_models_dtype():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2, dtype=torch.bfloat16)
    model = tiny.model
    inputs = tiny.inputs("What is shown in this image?")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), tp.prune(model, "divprune", budget=16, compute_dtype="model") as report:
        model(**inputs)
        pooler = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    feats = torch.cat(list(pooler)) if isinstance(pooler, (list, tuple)) else pooler.reshape(-1, pooler.shape[-1])
    assert feats.dtype == torch.bfloat16
    assert report.stages[0].kept[0].tolist() == divprune_reference(feats, 16)
