"""VisionZip at its defaults keeps what the official code keeps (dvlab-research/VisionZip, commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02, ``visionzip/clip_encoder.py`` and ``visionzip/llava_arch.py``).

``official_visionzip`` below is our own literal, slow re-implementation of the official rule, written
from reading that code (plain loops, float64): nothing of it is shared with the package. It is compared
with the registered selector on seeded inputs at realistic shapes, and with what the LLM of a tiny LLaVA
(and LLaVA-NeXT) receives through ``tokenprune.prune``, computed by hand from the model's own modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import shared_tiny_vlm

OFFICIAL = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # the paper's dominant (with [CLS]) + contextual


# ------------------------------------------------------------------------------------------------
# The official rule, written out
# ------------------------------------------------------------------------------------------------


def official_visionzip(hidden, cls_attention, keys, dominant, contextual, llmc=False):
    """One image (one crop) through the official VisionZip rule.

    hidden: [T, D] feature-layer states, token 0 the [CLS] token; cls_attention: [T] the [CLS] row summed
    over heads; keys: [T, Dk] the layer's keys averaged over heads; dominant: the official ``dominant``
    argument ([CLS] included: 54 keeps [CLS] + 53 patches); contextual: contextual tokens.
    ``llmc``: the llmc port, whose ``dominant`` counts patches only and whose Hugging Face feature
    selection then drops the [CLS] token.

    Returns (tokens, features, merged): the token indices in the order the LLM sees them, their features
    (float64, [k, D]), and which tokens are contextual (merged).
    """
    hidden = np.asarray(hidden, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    T = hidden.shape[0]
    n_patches = dominant if llmc else dominant - 1
    # dominant: [CLS] plus the top patches by [CLS] attention (ties: the lower index, our choice)
    patches = sorted(range(1, T), key=lambda i: (-float(cls_attention[i]), i))[:n_patches]
    kept = [0] + sorted(patches)  # masked_select keeps the tokens in index order
    kept_set = set(kept)
    rest = [i for i in range(T) if i not in kept_set]
    # contextual: uniformly strided targets among the remaining tokens
    step = max(1, len(rest) // contextual)
    target_pos = list(range(0, len(rest), step))[:contextual]
    targets = [rest[p] for p in target_pos]
    others = [rest[p] for p in range(len(rest)) if p not in set(target_pos)]

    def unit(v):
        return v / math.sqrt(sum(float(x) * float(x) for x in v))

    members = {t: [] for t in targets}
    unit_t = [unit(keys[t]) for t in targets]
    for o in others:
        u = unit(keys[o])
        sims = [float(np.dot(u, w)) for w in unit_t]
        best = max(range(len(targets)), key=lambda j: (sims[j], -j))  # argmax: the first maximum
        members[targets[best]].append(o)
    contextual_feats = []
    for t in targets:
        mean = np.mean([hidden[j] for j in members[t]], axis=0) if members[t] else np.zeros(hidden.shape[1])
        contextual_feats.append(hidden[t] + mean)
    tokens = kept + targets
    feats = [hidden[i] for i in kept] + contextual_feats
    merged = [False] * len(kept) + [True] * len(targets)
    if llmc:  # Hugging Face LLaVA's "default" feature selection drops the first token: [CLS]
        tokens, feats, merged = tokens[1:], feats[1:], merged[1:]
    return tokens, np.stack(feats), merged


def _inputs(seed, T=577, D=1024, heads=16, head_dim=64):
    """Feature-layer states, the [CLS] attention summed over heads, and head-averaged keys of one crop."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    logits = torch.randn(heads, T, generator=g) * 3.0
    attn = torch.softmax(logits, dim=-1)  # the [CLS] row of each head
    keys = torch.randn(heads, T, head_dim, generator=g) + torch.randn(1, T, head_dim, generator=g)
    return hidden, attn.sum(0), attn.mean(0), keys.mean(0)


# ------------------------------------------------------------------------------------------------
# (a) the selector at its defaults
# ------------------------------------------------------------------------------------------------


def _ours(hidden, relevance, keys, k, **params):
    """Our selector at its defaults (plus ``params``) on a batch; per row: tokens in LLM order,
    features in that order, merged flags."""
    B, T = relevance.shape
    cls = torch.zeros(B, T, dtype=torch.bool)
    cls[:, 0] = True
    ctx = tp.make_context(hidden, relevance=relevance, keys=keys, cls_token=cls)
    vz = tp.get_selector("visionzip")(**params)
    sel = vz.select(tp.criteria.Relevance(), ctx, k)
    seq, merged = vz.llm_sequence(sel, ctx)
    out = []
    for b in range(B):
        n = int(sel.valid[b].sum())
        idx = sel.indices[b, :n].tolist()
        toks = seq[b, :n].tolist()
        feats = torch.stack([sel.features[b, idx.index(t)] for t in toks])
        out.append((toks, feats.double().numpy(), merged[b, :n].tolist(), sorted(idx)))
    return out


@pytest.mark.parametrize("k", [64, 128, 192])
@pytest.mark.parametrize("seed", [0, 1])
def test_selector_at_defaults_matches_the_official_rule(seed, k):
    rows = [_inputs(seed * 10 + b) for b in range(2)]
    hidden = torch.stack([r[0] for r in rows])
    relevance = torch.stack([r[2] for r in rows])  # head mean, as the runtime captures it
    keys = torch.stack([r[3] for r in rows])
    d, c = OFFICIAL[k]
    for b, (toks, feats, merged, indices) in enumerate(_ours(hidden, relevance, keys, k)):
        want_toks, want_feats, want_merged = official_visionzip(rows[b][0], rows[b][1], rows[b][3], d, c)
        assert toks == want_toks and merged == want_merged
        assert indices == sorted(want_toks) and len(toks) == k
        np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 128])
def test_llmc_option_matches_the_llmc_port(k):
    hidden, attn_sum, attn_mean, keys = _inputs(7)
    d, c = OFFICIAL[k]
    (toks, feats, merged, _), = _ours(hidden[None], attn_mean[None], keys[None], k, cls="drop")
    want_toks, want_feats, want_merged = official_visionzip(hidden, attn_sum, keys, d, c, llmc=True)
    assert toks == want_toks and merged == want_merged and len(toks) == k and 0 not in toks
    np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-5)


def test_other_budgets_keep_the_ratio():
    hidden, attn_sum, attn_mean, keys = _inputs(3)
    for k in (16, 100):
        d, c = tp.selectors.split_budget(k, 10 / 64)
        (toks, feats, merged, _), = _ours(hidden[None], attn_mean[None], keys[None], k)
        want_toks, want_feats, _ = official_visionzip(hidden, attn_sum, keys, d, c)
        assert toks == want_toks and sum(merged) == c
        np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (b) through tokenprune.prune on a tiny LLaVA: what the LLM receives
# ------------------------------------------------------------------------------------------------


def _tower_by_hand(model, pixel_values):
    """The feature-layer states, the [CLS] row summed over heads and the head-mean keys of each crop,
    from the model's own modules (the layer whose output is ``vision_feature_layer``)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    f = model.config.vision_feature_layer
    layers = tower.encoder.layers
    li = f - 1 if f >= 0 else len(layers) + f
    layer = layers[li]
    attn = layer.self_attn
    x = layer.layer_norm1(out.hidden_states[li])  # the input of that layer
    n, T, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(n, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(n, T, H, hd).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [n, H, T, T]
    return out.hidden_states[f], probs[:, :, 0].sum(1), k.mean(1)


class _LLMInputs:
    """Records what the language model receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def close(self):
        self.handle.remove()


def _expected_embeds(model, ids, image_feats):
    """The prompt's input embeddings with its image placeholders replaced by ``image_feats``."""
    emb = model.model.get_input_embeddings()(ids[0])
    img = (ids[0] == model.config.image_token_id).nonzero().flatten()
    first, last = int(img[0]), int(img[-1])
    return torch.cat([emb[:first], image_feats.to(emb.dtype), emb[last + 1:]])


def _run_pruned(t, inputs, **params):
    rec = _LLMInputs(t.model)
    try:
        with torch.no_grad(), tp.prune(t.model, "visionzip", **params) as report:
            t.model(**inputs)
    finally:
        rec.close()
    return rec.calls[0], report


@pytest.mark.parametrize("cls, budget", [("keep", 64), ("keep", 128), ("drop", 64)])
def test_llava_llm_receives_cls_dominant_contextual_merged_before_the_projector(cls, budget):
    t = shared_tiny_vlm("llava", num_layers=2)
    inputs = t.inputs()
    got, report = _run_pruned(t, inputs, budget=budget, cls=cls)
    with torch.no_grad():
        states, attn_sum, keys = _tower_by_hand(t.model, inputs["pixel_values"])
        d, c = OFFICIAL[budget]
        toks, feats, merged = official_visionzip(states[0], attn_sum[0], keys[0], d, c, llmc=cls == "drop")
        proj = t.model.model.multi_modal_projector(torch.as_tensor(feats, dtype=states.dtype))
        want = _expected_embeds(t.model, inputs["input_ids"], proj)
    emb = got["inputs_embeds"][0]
    assert emb.shape == want.shape  # text + budget visual tokens
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-5)
    L = emb.shape[0]
    assert got["position_ids"].flatten().tolist() == list(range(L))  # consecutive, as the official sequence
    st = report.stages[0]
    assert st.tokens_after == [budget] and st.relevance == "cls_attention" and report.visual_tokens == [576]
    # the report's kept tokens are the patches (dominant and contextual targets), as placeholder indices
    assert st.kept[0].tolist() == sorted(i - 1 for i in toks if i > 0)


def test_llava_projected_site_is_the_previous_behaviour():
    """``site="projected"``: selection among the projected features, contextual tokens at their targets'
    places (no [CLS] token on LLaVA's default feature selection)."""
    t = shared_tiny_vlm("llava", num_layers=2)
    inputs = t.inputs()
    got, report = _run_pruned(t, inputs, budget=64, site="projected")
    with torch.no_grad():
        feats = t.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        _, attn_sum, _ = _tower_by_hand(t.model, inputs["pixel_values"])
    sel = tp.create_method("visionzip", site="projected").select(feats[None], relevance=attn_sum[:, 1:] / 4.0,
                                                                  budget=64)
    want = _expected_embeds(t.model, inputs["input_ids"], sel.features[0])
    torch.testing.assert_close(got["inputs_embeds"][0], want, rtol=1e-5, atol=1e-5)
    assert report.stages[0].kept[0].tolist() == sel.indices[0].tolist()


# ------------------------------------------------------------------------------------------------
# LLaVA-NeXT: per crop, and the official layout of the image's tokens
# ------------------------------------------------------------------------------------------------


def _official_next_layout(per_crop, cols, side):
    """The official ``spatial_unpad`` layout of one image from per-crop (tokens, features, merged):
    the base crop as it is; the high-resolution crops' dominant patches in the raster order of the whole
    crop arrangement; their [CLS] tokens; their contextual tokens."""
    base_t, base_f, _ = per_crop[0]
    feats = list(base_f)
    grid, cls_feats, ctx_feats = [], [], []
    for j, (toks, fs, merged) in enumerate(per_crop[1:]):
        crow, ccol = divmod(j, cols)
        for t, f, m in zip(toks, fs, merged):
            if m:
                ctx_feats.append(f)
            elif t == 0:
                cls_feats.append(f)
            else:
                r, c = divmod(t - 1, side)
                grid.append(((crow * side + r) * cols * side + ccol * side + c, f))
    feats += [f for _, f in sorted(grid, key=lambda x: x[0])] + cls_feats + ctx_feats
    return np.stack(feats)


def test_llava_next_crops_and_official_layout():
    import sys

    t = shared_tiny_vlm("llava_next", small=True, num_layers=2)
    inputs = t.inputs()
    budget = 64
    got, report = _run_pruned(t, inputs, budget=budget)
    model = t.model
    mod = sys.modules[type(model.model).__module__]
    size = inputs["image_sizes"][0]
    n_crops = mod.image_size_to_num_patches(image_size=size, grid_pinpoints=model.config.image_grid_pinpoints,
                                            patch_size=model.config.vision_config.image_size)
    _, cols = mod.get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints,
                                              model.config.vision_config.image_size)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with torch.no_grad():
        pv = inputs["pixel_values"][0, :n_crops]
        states, attn_sum, keys = _tower_by_hand(model, pv)
        share = [budget // n_crops + (1 if j < budget % n_crops else 0) for j in range(n_crops)]
        per_crop = []
        for j in range(n_crops):
            d, c = tp.selectors.split_budget(share[j], 10 / 64)
            per_crop.append(official_visionzip(states[j], attn_sum[j], keys[j], d, c))
        feats = _official_next_layout(per_crop, int(cols), side)
        proj = model.model.multi_modal_projector(torch.as_tensor(feats, dtype=states.dtype))
        want = _expected_embeds(model, inputs["input_ids"], proj)
    torch.testing.assert_close(got["inputs_embeds"][0], want, rtol=1e-5, atol=1e-5)
    assert report.stages[0].tokens_after == [budget]
    assert any("image_newline" in n for n in report.notes)


# ------------------------------------------------------------------------------------------------
# (c) generate, restoration, batches, the vision cache
# ------------------------------------------------------------------------------------------------


def test_generate_works_and_the_model_is_restored():
    t = shared_tiny_vlm("llava", num_layers=2)
    model = t.model
    inputs = t.inputs(["What is shown?", "Describe the colours in this image, please."])
    with torch.no_grad():
        before = model(**inputs).logits
        params = {k: v.clone() for k, v in model.state_dict().items()}
        impl = model.config.vision_config._attn_implementation
        with tp.prune(model, "visionzip", budget=64) as report:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert "get_image_features" in vars(model.model)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
        assert report.stages[0].tokens_after == [64, 64] and report.pruned_calls == 1
        assert "get_image_features" not in vars(model.model)
        assert model.config.vision_config._attn_implementation == impl
        assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_batched_prompts_select_as_one_by_one():
    t = shared_tiny_vlm("llava", num_layers=2)
    qs = ["What is shown?", "Describe the colours in this image, please."]
    from tokenprune.testing.tiny_models import sample_images

    photos = sample_images()
    both, _ = _run_pruned(t, t.inputs(qs), budget=64)
    for i, q in enumerate(qs):
        one, _ = _run_pruned(t, t.inputs(q, images=photos[i % len(photos)]), budget=64)
        n = one["inputs_embeds"].shape[1]
        torch.testing.assert_close(both["inputs_embeds"][i, -n:], one["inputs_embeds"][0], rtol=1e-5, atol=1e-5)


def test_vision_cache_serves_the_pre_projector_states_and_stays_correct():
    t = shared_tiny_vlm("llava", num_layers=2)
    model = t.model
    inputs = t.inputs()
    cache = tp.VisionCache()
    with torch.no_grad():
        with cache.attach(model):
            unpruned = model(**inputs).logits            # fills the cache without the keys signal
        plain, _ = _run_pruned(t, inputs, budget=64)    # no cache
        rec = _LLMInputs(model)
        try:
            for _ in range(2):                           # adds the keys signal, then hits
                with tp.prune(model, "visionzip", budget=64, vision_cache=cache):
                    model(**inputs)
        finally:
            rec.close()
        for call in rec.calls:
            torch.testing.assert_close(call["inputs_embeds"], plain["inputs_embeds"], rtol=0, atol=0)
        assert cache.stats()["hits"] >= 1
        with cache.attach(model):                       # unpruned calls still get the unpruned features
            torch.testing.assert_close(model(**inputs).logits, unpruned, rtol=0, atol=0)
        with tp.prune(model, "fastervlm", budget=64, vision_cache=cache) as report:
            model(**inputs)
        assert report.stages[0].tokens_after == [64]


# ------------------------------------------------------------------------------------------------
# other families, errors, parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "idefics3", "gemma3"])
def test_families_without_a_token_wise_projector_run_after_it_with_a_note(family, recwarn):
    # (the UserWarning comes once per model type and process; the report's note every time)
    t = shared_tiny_vlm(family, small=True, num_layers=4)
    inputs = t.inputs()
    with torch.no_grad(), tp.prune(t.model, "visionzip", budget=16) as report:
        t.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert any("site='vision'" in n and "projected" in n for n in report.notes)
    st = report.stages[0]
    assert st.tokens_after[0] - st.protected[0] == 16  # (LLaVA-OneVision's newline tokens are kept on top)


def test_precomputed_features_are_refused_with_the_reason():
    t = shared_tiny_vlm("llava", num_layers=2)
    inputs = dict(t.inputs())
    with torch.no_grad():
        feats = t.model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
        with pytest.raises(tp.StageError, match="vision tower"), tp.prune(t.model, "visionzip"):
            t.model(**inputs, mm_encoder_outputs={"image": feats})


def test_parameters_are_checked_and_round_trip():
    with pytest.raises(tp.errors.ParameterError, match="cls"):
        tp.create_method("visionzip", cls="maybe")
    with pytest.raises(tp.errors.ParameterError, match="site"):
        tp.create_method("visionzip", site="llm")
    with pytest.raises(tp.StageError, match="site"):
        tp.Stage(selector="topk", objective=tp.criteria.Relevance(), budget=4, layer=2, site="vision")
    m = tp.create_method("visionzip", cls="drop", merge="mean")
    assert tp.from_config(m.to_config()) == m and m.stages[0].site == "vision"


def test_any_selector_can_act_before_the_projector():
    """``site="vision"`` is a stage attribute, not a VisionZip special case: top-k by [CLS] attention on
    the tower's tokens ([CLS] a candidate like any other), projected in index order."""
    t = shared_tiny_vlm("llava", num_layers=2)
    inputs = t.inputs()
    m = tp.compose(tp.criteria.Relevance(), selector="topk", budget=32, relevance="cls_attention", site="vision")
    rec = _LLMInputs(t.model)
    try:
        with torch.no_grad(), tp.prune(t.model, m) as report:
            t.model(**inputs)
    finally:
        rec.close()
    with torch.no_grad():
        states, attn_sum, _ = _tower_by_hand(t.model, inputs["pixel_values"])
        top = sorted(sorted(range(states.shape[1]), key=lambda i: (-float(attn_sum[0, i]), i))[:32])
        want = _expected_embeds(t.model, inputs["input_ids"], t.model.model.multi_modal_projector(states[0, top]))
    torch.testing.assert_close(rec.calls[0]["inputs_embeds"][0], want, rtol=1e-5, atol=1e-5)
    assert report.stages[0].tokens_after == [32]
