"""tokenprune.prune on tiny random-weight Hugging Face VLMs of every supported family (offline, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tokenprune as tp  # noqa: E402
from tokenprune.runtime import attention as tp_attention  # noqa: E402
from tokenprune.adapters import get_model_adapter
from tokenprune.runtime import prune  # noqa: E402
from tokenprune.criteria import Coverage, Relevance  # noqa: E402
from tokenprune.methods.compose import PruningMethod, Stage  # noqa: E402
from tokenprune.testing.tiny_models import MODEL_FAMILIES as FAMILIES, shared_tiny_vlm  # noqa: E402

NEW = 4  # generated tokens


def tiny(family):
    t = shared_tiny_vlm(family, small=True, num_layers=4)
    if family == "smolvlm":
        ad = get_model_adapter(t.model)
        block = ad.merger_block()
        if block and ad.tokens_per_tile() % block:
            pytest.skip(f"this transformers' SmolVLM merges image features in blocks of {block} tokens per sample; "
                        f"the tiny model has {ad.tokens_per_tile()} per tile, so it cannot run even unpruned")
    return t


def first_relevance(family):
    """A before-LLM relevance source the family supports."""
    ad = get_model_adapter(tiny(family).model)
    return "cls_attention" if ad.has_cls else "text_similarity"


def method(family, pre=None, mid=None, layer=2, raters="last_token", positions="preserve"):
    stages = []
    if pre is not None:
        stages.append(Stage(objective=Relevance(), selector="topk", budget=pre, relevance=first_relevance(family),
                            positions=positions))
    if mid is not None:
        stages.append(Stage(objective=Relevance(), selector="topk", budget=mid, layer=layer,
                            relevance="text_attention", raters=raters, positions=positions))
    return PruningMethod(stages=tuple(stages))


def generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def cache_lengths(out):
    return [layer.keys.shape[-2] for layer in out.past_key_values.layers]


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_bit_identical(family):
    t = tiny(family)
    m, inputs = t.model, t.inputs()
    with torch.no_grad():
        ref = m(**inputs).logits
    g0 = generate(m, inputs)
    keep_all = method(family, pre=1.0, mid=1.0)
    with prune(m, keep_all) as report:
        with torch.no_grad():
            out = m(**inputs).logits
        g1 = generate(m, inputs)
    assert torch.equal(out, ref)
    assert torch.equal(g0.sequences, g1.sequences)
    assert all(torch.equal(a, b) for a, b in zip(g0.logits, g1.logits))
    n = int((inputs["input_ids"] == get_model_adapter(m).image_token_id).sum())
    assert report.visual_tokens == [n]
    assert report.tokens_per_layer == [n] * 4
    assert report.equivalent_tokens == n


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_cache_lengths_and_report(family):
    t = tiny(family)
    m, inputs = t.model, t.inputs()
    L = inputs["input_ids"].shape[1]
    with prune(m, method(family, pre=24, mid=8, layer=2)) as report:
        out = generate(m, inputs)
    n = report.visual_tokens[0]
    protected = report.stages[0].protected[0]  # LLaVA-NeXT/OneVision newline tokens (kept)
    L_pre = L - (n - 24 - protected)
    L_mid = L_pre - 16
    assert cache_lengths(out) == [L_pre + NEW - 1] * 2 + [L_mid + NEW - 1] * 2
    assert [s.tokens_after[0] for s in report.stages] == [24 + protected, 8 + protected]
    assert report.tokens_per_layer == [24 + protected] * 2 + [8 + protected] * 2
    assert report.equivalent_tokens == pytest.approx((2 * (24 + protected) + 2 * (8 + protected)) / 4)
    s0, s1 = report.stages
    assert s0.layer is None and s1.layer == 2
    assert len(s0.kept[0]) == 24 and len(s1.kept[0]) == 8
    assert set(s1.kept[0].tolist()) <= set(s0.kept[0].tolist())  # each stage acts on what the earlier kept
    assert torch.all(s0.kept[0][1:] > s0.kept[0][:-1])
    assert s0.coords[0].shape == (24, 4) and (s0.coords[0][:, 2:] >= 0).all()
    assert torch.isfinite(s1.scores[0][s0.kept[0]]).all()  # text attention seen for every candidate
    assert report.pruned_calls == 1 and "before LLM" in report.summary()


@pytest.mark.parametrize("family,positions", [(f, "preserve") for f in FAMILIES] + [("llava", "compact")])
def test_batch_equals_single_samples(family, positions):
    t = tiny(family)
    m = t.model
    questions = ["What is shown in this image?", "Describe."]
    batch = t.inputs(questions)
    assert (batch["attention_mask"] == 0).any()  # left padding
    meth = method(family, pre=20, mid=10, layer=2, raters="all_text_mean", positions=positions)
    with prune(m, meth) as report:
        gb = generate(m, batch)
        kept_b = [s.kept for s in report.stages]
        singles = []
        for i, q in enumerate(questions):
            from tokenprune.testing.tiny_models import sample_images

            s = t.inputs(q, images=sample_images()[i])
            gs = generate(m, s)
            singles.append(gs)
            assert [st.kept[0].tolist() for st in report.stages] == [k[i].tolist() for k in kept_b]
    for i, gs in enumerate(singles):
        assert torch.equal(gb.sequences[i, -NEW:], gs.sequences[0, -NEW:])
        for step in range(NEW):
            torch.testing.assert_close(gb.logits[step][i], gs.logits[step][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_model_restored_after_context(family):
    t = tiny(family)
    m, inputs = t.model, t.inputs()
    ad = get_model_adapter(m)

    def snapshot():
        return dict(
            state={k: v.clone() for k, v in m.state_dict().items()},
            attrs={n: sorted(mod.__dict__) for n, mod in m.named_modules()},
            hooks={n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()},
            attn=[(type(c).__name__, c._attn_implementation) for c in (m.config, ad.text_config, ad.vision_config)],
            config=m.config.to_json_string(),
        )

    with torch.no_grad():
        ref = m(**inputs).logits
    before = snapshot()
    meth = PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=16, relevance="text_similarity"),
        Stage(objective=Relevance(), selector="topk", budget=8, layer=2, relevance="text_attention"),
    ))
    with prune(m, meth):
        generate(m, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with prune(m, meth):
            generate(m, inputs)
            raise RuntimeError("boom")
    bad = PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=0.1, relevance="text_similarity"),
        Stage(objective=Relevance(), selector="topk", budget=30, layer=2, relevance="text_attention"),
    ))
    with pytest.raises(tp.StageError, match="left only"):
        with prune(m, bad):
            generate(m, inputs)  # fails inside the forward
    after = snapshot()
    assert before["attrs"] == after["attrs"] and before["hooks"] == after["hooks"]
    assert before["attn"] == after["attn"] and before["config"] == after["config"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert "get_image_features" not in ad.base.__dict__ and not tp_attention._TARGETS
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, ref)


def test_coverage_greedy_and_compact_positions():
    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    meth = PruningMethod(stages=(
        Stage(objective=Coverage(), selector="greedy", budget=16, positions="compact"),
        Stage(objective=0.5 * Relevance() + 0.5 * Coverage(), selector="greedy", budget=8, layer=2,
              relevance="text_attention", raters="dynamic", positions="compact"),
    ))
    with prune(m, meth) as report:
        out = generate(m, inputs)
    L = inputs["input_ids"].shape[1]
    assert cache_lengths(out) == [L - 48 + NEW - 1] * 2 + [L - 56 + NEW - 1] * 2
    assert report.stages[0].tokens_after == [16] and report.stages[1].tokens_after == [8]


def test_merged_features_replace_kept_rows():
    """A merging selector's Selection.features replace the kept rows before the LLM."""
    from dataclasses import dataclass

    from tokenprune.selection import from_order
    from tokenprune.selectors.base import Selector

    @dataclass(frozen=True, kw_only=True)
    class FirstKMean(Selector):
        needs_objective = False

        def _select(self, objective, ctx, k):
            K = int(k.max())
            order = torch.arange(K)[None].expand(ctx.batch_size, -1)
            feats = ctx.features.mean(1, keepdim=True).expand(-1, K, -1)
            return from_order(order, torch.zeros(ctx.batch_size, K), torch.ones_like(order, dtype=torch.bool), feats)

    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    with prune(m, tp.compose(None, selector=FirstKMean(), budget=4)), torch.no_grad():
        merged = m(**inputs).logits
    keep = PruningMethod(stages=(Stage(objective=Relevance(), selector="topk", budget=4, relevance="cls_attention"),))
    with prune(m, keep), torch.no_grad():
        other = m(**inputs).logits
    # same length, different features
    assert merged.shape == other.shape and not torch.allclose(merged, other)
    # the merged features are what the model saw: compare with a direct mm_encoder_outputs call
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ad = get_model_adapter(m)
    with torch.no_grad():
        feats = ad.flatten_features(m.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        img = inputs["input_ids"] == ad.image_token_id
        first = img.nonzero()[:4, 1]
        keep_tok = ~img
        keep_tok[0, first] = True
        ids = inputs["input_ids"][keep_tok][None]
        pos = torch.arange(inputs["input_ids"].shape[1])[keep_tok[0]][None]
        mm = {"image": BaseModelOutputWithPooling(pooler_output=[feats.mean(0, keepdim=True).expand(4, -1)])}
        direct = m(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, mm_encoder_outputs=mm).logits
    torch.testing.assert_close(merged, direct, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# signals equal eager attention
@pytest.mark.parametrize("raters", ["last_token", "all_text_mean"])
def test_text_attention_rows_equal_eager(raters):
    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    ad = get_model_adapter(m)
    meth = method("llava", mid=1.0, layer=2, raters=raters)
    with prune(m, meth) as report, torch.no_grad():
        m(**inputs)
    assert m.config.get_text_config()._attn_implementation == "sdpa"
    scores = report.stages[0].scores[0]
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = m(**inputs, output_attentions=True).attentions[1][0].mean(0)  # [L, L], layer k - 1 = 1
    finally:
        m.set_attn_implementation("sdpa")
    img = (inputs["input_ids"][0] == ad.image_token_id).nonzero().flatten()
    if raters == "last_token":
        ref = att[-1, img]
    else:
        rows = torch.arange(img[0] + 1, inputs["input_ids"].shape[1])
        rows = rows[inputs["input_ids"][0, rows] != ad.image_token_id]
        ref = att[rows][:, img].mean(0)
    torch.testing.assert_close(scores, ref.float(), atol=1e-6, rtol=1e-5)


def test_text_attention_of_a_left_padded_batch_equals_eager():
    """Two prompts of different lengths, left-padded (the raters' rows read per sample, not as one
    shared position): each sample's last-token row equals eager attention at layer k - 1."""
    t = tiny("llava")
    m = t.model
    inputs = t.inputs(["What is shown in this image?", "Describe it."])
    assert bool((inputs["attention_mask"] == 0).any())
    image_token_id = get_model_adapter(m).image_token_id
    with prune(m, method("llava", mid=1.0, layer=2)) as report, torch.no_grad():
        m(**inputs)
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = m(**inputs, output_attentions=True).attentions[1].mean(1)  # [B, L, L]
    finally:
        m.set_attn_implementation("sdpa")
    for b in range(2):
        img = (inputs["input_ids"][b] == image_token_id).nonzero().flatten()
        torch.testing.assert_close(report.stages[0].scores[b], att[b, -1, img].float(), atol=1e-6, rtol=1e-5)


def test_cls_attention_equals_eager():
    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    with prune(m, method("llava", pre=1.0)) as report, torch.no_grad():
        m(**inputs)
    scores = report.stages[0].scores[0]
    vt = m.model.vision_tower
    m.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            att = vt(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        m.set_attn_implementation({"vision_config": "sdpa"})
    layer = len(vt.encoder.layers) + m.config.vision_feature_layer  # hidden_states[-2] comes from layer n - 2
    ref = att[layer][0].mean(0)[0, 1:]
    torch.testing.assert_close(scores, ref.float(), atol=1e-6, rtol=1e-5)


def test_key_norm_and_text_similarity_signals():
    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    meth = PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=16, relevance="text_similarity"),
        Stage(objective=Relevance(), selector="topk", budget=8, layer=2, relevance="key_norm"),
    ))
    with prune(m, meth) as report, torch.no_grad():
        m(**inputs)
    s0, s1 = report.stages
    # top-k by the reported scores is what was kept
    assert s0.kept[0].tolist() == sorted(s0.scores[0].topk(16).indices.tolist())
    finite = torch.isfinite(s1.scores[0])
    assert finite.sum() == 16
    top = s1.scores[0].nan_to_num(float("-inf")).topk(8).indices
    assert s1.kept[0].tolist() == sorted(top.tolist())


# ---------------------------------------------------------------------------------------------------
# errors
def test_unknown_model_type_lists_supported():
    class Dummy(torch.nn.Module):
        class config:
            model_type = "not_a_vlm"

    with pytest.raises(tp.UnsupportedModelError, match="llava.*qwen2_vl"):
        prune(Dummy(), method("llava", pre=4))


def test_adapter_override_and_registry():
    assert set(FAMILIES) <= set(tp.list_adapters())
    t = tiny("smolvlm")
    from tokenprune.adapters import Idefics3Adapter

    s = prune(t.model, method("smolvlm", pre=8), adapter=Idefics3Adapter)
    assert s.adapter.name == "Idefics3Adapter"


def test_stage_layer_beyond_depth():
    m = tiny("llava").model
    meth = tp.compose(Relevance(), selector="topk", budget=8, layer=4, relevance="text_attention")
    with pytest.raises(tp.StageError, match="4 decoder layers"):
        prune(m, meth)
    scaled = tp.compose(Relevance(), selector="topk", budget=8, layer=24, reference_depth=32,
                        relevance="text_attention")
    s = prune(m, scaled)  # 24 of 32 -> 3 of 4
    assert list(s.llm_stages) == [3]


def test_budget_above_previous_stage():
    m = tiny("llava").model
    meth = PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=8, relevance="cls_attention"),
        Stage(objective=Relevance(), selector="topk", budget=16, layer=2, relevance="text_attention"),
    ))
    with pytest.raises(tp.StageError, match="previous stage leaves only 8"):
        prune(m, meth)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "gemma3", "idefics3"])
def test_cls_attention_needs_cls_token(family):
    meth = tp.compose(Relevance(), selector="topk", budget=8, relevance="cls_attention")
    with pytest.raises(tp.UnsupportedModelError, match="no \\[CLS\\] token"):
        prune(tiny(family).model, meth, cls_fallback="error")


def test_text_attention_before_llm_is_an_error():
    meth = tp.compose(Relevance(), selector="topk", budget=8, relevance="text_attention")
    with pytest.raises(tp.StageError, match="inside the LLM"):
        prune(tiny("llava").model, meth)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prompt_without_image_is_not_pruned(family):
    t = tiny(family)
    m = t.model
    inputs = t.inputs("Describe the weather.", with_image=False)
    g0 = generate(m, inputs)
    with prune(m, method(family, pre=8, mid=4)) as report:
        g1 = generate(m, inputs)
    assert torch.equal(g0.sequences, g1.sequences)
    assert report.pruned_calls == 0 and report.calls == 1
    assert any("no image tokens" in n for n in report.notes)


def test_gemma3_in_llm_beyond_sliding_window():
    from tokenprune.testing.tiny_models import build_tiny_vlm

    t = build_tiny_vlm("gemma3", small=True, text_kw={"sliding_window": 64})
    inputs = t.inputs()
    assert inputs["input_ids"].shape[1] >= 64
    meth = tp.compose(Relevance(), selector="topk", budget=8, layer=2, relevance="text_attention")
    with pytest.raises(tp.StageError, match="sliding window"):
        with prune(t.model, meth):
            generate(t.model, inputs)
    # before the LLM is fine
    with prune(t.model, tp.compose(Relevance(), selector="topk", budget=8, relevance="text_similarity")) as r:
        generate(t.model, inputs)
    assert r.stages[0].tokens_after == [8]


def test_nested_context_refused():
    m = tiny("llava").model
    with prune(m, method("llava", pre=8)):
        with pytest.raises(tp.TokenPruneError, match="already active"):
            with prune(m, method("llava", pre=8)):
                pass
    assert "get_image_features" not in m.model.__dict__


# ---------------------------------------------------------------------------------------------------
# towers without [CLS], registered methods
def test_mean_attention_fallback_equals_eager():
    t = tiny("gemma3")
    m, inputs = t.model, t.inputs()
    meth = tp.compose(Relevance(), selector="topk", budget=8, relevance="cls_attention")
    with prune(m, meth, cls_fallback="mean_attention") as report, torch.no_grad():
        m(**inputs)
    assert any("mean attention" in n for n in report.notes)
    vt = m.model.vision_tower
    m.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            att = vt(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    finally:
        m.set_attn_implementation({"vision_config": "sdpa"})
    per_patch = att.mean(1).mean(1)  # [1, P]: attention each patch receives, over heads and queries
    side = int(per_patch.shape[1] ** 0.5)
    ref = torch.nn.functional.avg_pool2d(per_patch.view(1, 1, side, side), 2).flatten()
    torch.testing.assert_close(report.stages[0].scores[0], ref.float(), atol=1e-7, rtol=1e-5)


def test_text_similarity_fallback_on_qwen():
    t = tiny("qwen2_vl")
    meth = tp.compose(Relevance(), selector="topk", budget=8, relevance="cls_attention")
    with pytest.raises(tp.UnsupportedModelError, match="cls_fallback"):
        prune(t.model, meth, cls_fallback="mean_attention")
    with prune(t.model, meth, cls_fallback="text_similarity") as report, torch.no_grad():
        t.model(**t.inputs())
    assert report.stages[0].relevance == "text_similarity" and report.stages[0].tokens_after == [8]


def test_tops_by_name_uses_the_family_schedule():
    from tokenprune.testing.tiny_models import build_tiny_vlm

    t = build_tiny_vlm("qwen2_5_vl", num_layers=8)
    with pytest.warns(UserWarning, match="M-RoPE"):
        s = prune(t.model, "tops", budget=16, cls_fallback="text_similarity")
    # the Qwen2.5-VL schedule: layers 12 and 16 of 28 -> 3 and 5 of 8; 2T, 1.1T, 0.3T tokens
    assert sorted(s.llm_stages) == [3, 5]
    assert [st.budget.value for st in s.method.stages] == [32, 18, 5]
    with s as report, torch.no_grad():
        t.model.generate(**t.inputs(), max_new_tokens=2, do_sample=False)
    assert report.tokens_per_layer == [32] * 3 + [18] * 2 + [5] * 3


@pytest.mark.parametrize("name", tp.list_methods())
def test_registered_methods_run(name):
    t = tiny("llava")
    m, inputs = t.model, t.inputs(["What is shown in this image?", "Describe."])
    with prune(m, name, budget=16) as report:
        out = generate(m, inputs)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + NEW)
    assert report.pruned_calls == 1
    assert min(report.tokens_per_layer) <= 16 and report.tokens_per_layer == sorted(report.tokens_per_layer,
                                                                                     reverse=True)


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_grid_methods_on_several_crops_pool_each_crop(family):
    """Pooling and windowed methods on anyres crops / image tiles: each (image, crop) is its own grid
    (from the adapters' coordinates), the budget split over crops in proportion to their tokens."""
    from tokenprune.selectors.spatial import apportion

    t = tiny(family)
    m, inputs = t.model, t.inputs()
    with prune(m, method(family, pre=1.0)) as full, torch.no_grad():
        m(**inputs)
    coords = full.stages[0].coords[0]
    crops, sizes = torch.unique(coords[:, :2], dim=0, return_counts=True)
    assert len(crops) > 2
    budget = 3 * len(crops) + 1
    with prune(m, "pooling", budget=budget) as report:
        out = generate(m, inputs)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW
    kept = report.stages[0].coords[0]
    got = [int(((kept[:, :2] == c).all(1)).sum()) for c in crops]
    assert got == apportion(budget, sizes.tolist())  # one token per pooling window, windows per crop
    with prune(m, "window_fastv", budget=budget) as report:
        generate(m, inputs)
    s = report.stages[0]
    assert s.tokens_after[0] - s.protected[0] == budget  # newline tokens are protected, not budgeted


def test_idefics3_per_tile_features_are_regrouped_by_sample():
    """transformers < 5.23 returns Idefics3 features as one [tiles, tokens, D] tensor over the batch;
    the layout regroups them by each sample's real (not all-zero) images, as the model drops padding
    images, and pruned features go back as a tensor too."""
    from tokenprune.adapters.base import VisionRecord

    ad = get_model_adapter(tiny("idefics3").model)
    per = ad.tokens_per_tile()
    pv = torch.rand(2, 3, 3, 8, 8) + 0.1
    pv[0, 2] = 0.0  # sample 0 has two images and one padding image
    pooler = torch.randn(5, per, 4)
    record = VisionRecord(kwargs={"pixel_values": pv})
    assert ad.image_sizes_per_item(pooler, record) == [2 * per, 3 * per]
    layout = ad.token_layout(pooler, record)
    tiles = layout.coords[:, 1]
    assert tiles[: 2 * per].unique().tolist() == [0, 1] and tiles[2 * per:].unique().tolist() == [0, 1, 2]
    assert ad.image_sizes_per_item([torch.randn(2 * per, 4), torch.randn(3 * per, 4)]) == [2 * per, 3 * per]
    flat = torch.randn(7, 4)
    assert ad.make_pooler(flat, pooler).shape == (7, 1, 4) and isinstance(ad.make_pooler(flat, [pooler]), list)


def test_smolvlm_block_merger_versions_refuse_uneven_counts(monkeypatch):
    """transformers 5.20.1-5.20.2 merge SmolVLM features in blocks of patch_size tokens per sample: a
    before-LLM stage keeping another count is refused with a StageError naming the version."""
    from tokenprune.adapters.idefics3 import SmolVLMAdapter

    ad = get_model_adapter(shared_tiny_vlm("smolvlm", small=True, num_layers=4).model)
    assert isinstance(ad, SmolVLMAdapter)
    monkeypatch.setattr(SmolVLMAdapter, "merger_block", lambda self: 16)
    ad.check_pre_llm([32, 64])
    with pytest.raises(tp.StageError, match="blocks of 16 tokens.*kept 20"):
        ad.check_pre_llm([32, 20])
    monkeypatch.setattr(SmolVLMAdapter, "merger_block", lambda self: None)
    ad.check_pre_llm([7, 20])


# ---------------------------------------------------------------------------------------------------
# batches with different image sizes, labels, newline tokens
def _two_sizes():
    from tokenprune.testing.tiny_models import sample_images

    a, b = sample_images()
    return [a, b.crop((0, 0, 300, 427))]  # different anyres grids: 234 and 272 visual tokens


def test_batch_with_different_visual_counts_is_repadded():
    t = tiny("llava_next")
    m = t.model
    questions = ["What is shown in this image?", "Describe the picture."]
    images = _two_sizes()
    batch = t.inputs(questions, images=images)
    ad = get_model_adapter(m)
    counts = (batch["input_ids"] == ad.image_token_id).sum(1)
    assert counts[0] != counts[1]
    meth = PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=16, relevance="cls_attention"),
        Stage(objective=Relevance(), selector="topk", budget=6, layer=2, relevance="text_attention"),
    ))
    with prune(m, meth, newlines="drop") as report:
        gb = generate(m, batch)
        assert report.stages[0].tokens_after == [16, 16] and report.stages[1].tokens_after == [6, 6]
        singles = [generate(m, t.inputs(q, images=im)) for q, im in zip(questions, images)]
    for i, gs in enumerate(singles):
        assert torch.equal(gb.sequences[i, -NEW:], gs.sequences[0, -NEW:])
        for step in range(NEW):
            torch.testing.assert_close(gb.logits[step][i], gs.logits[step][0], atol=1e-4, rtol=1e-4)
    # inside the LLM the lengths must stay equal
    in_llm = tp.compose(Relevance(), selector="topk", budget=6, layer=2, relevance="text_attention")
    with pytest.raises(tp.StageError, match="different sequence lengths"):
        with prune(m, in_llm, newlines="drop"):
            generate(m, batch)


@pytest.mark.parametrize("policy", ["keep", "drop", "select"])
def test_newline_policies(policy):
    t = tiny("llava_next")
    m, inputs = t.model, t.inputs()
    ad = get_model_adapter(m)
    with torch.no_grad():
        feats = ad.flatten_features(m.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output)
    newline = (feats == m.model.image_newline).all(-1)
    n_nl = int(newline.sum())
    assert n_nl > 0
    with prune(m, method("llava_next", pre=12), newlines=policy) as report, torch.no_grad():
        m(**inputs)
    s = report.stages[0]
    kept = s.kept[0]
    if policy == "keep":
        assert s.protected == [n_nl] and s.tokens_after == [12 + n_nl] and not newline[kept].any()
        assert (s.coords[0][:, 1:] >= 0).all()
    elif policy == "drop":
        assert s.protected == [0] and s.tokens_after == [12] and not newline[kept].any()
    else:
        assert s.protected == [0] and s.tokens_after == [12]


def test_labels_are_pruned_with_the_prompt():
    t = tiny("llava")
    m, inputs = t.model, t.inputs()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == get_model_adapter(m).image_token_id, -100)
    with torch.no_grad():
        ref = m(**inputs, labels=labels).loss
        with prune(m, method("llava", pre=1.0)):
            same = m(**inputs, labels=labels).loss
        with prune(m, method("llava", pre=8)) as report:
            out = m(**inputs, labels=labels)
    assert torch.equal(ref, same)
    L = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == L - 56 and torch.isfinite(out.loss)
    # the loss is over the text tokens only, shifted: compare with the pruned logits and labels
    keep = torch.ones(L, dtype=torch.bool)
    img = (inputs["input_ids"][0] == get_model_adapter(m).image_token_id).nonzero().flatten()
    keep[img] = False
    keep[img[report.stages[0].kept[0]]] = True
    lab = labels[0, keep]
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), lab[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)


def test_right_padded_forward():
    t = tiny("llava")
    m = t.model
    questions = ["What is shown in this image?", "Describe."]
    t.processor.tokenizer.padding_side = "right"
    try:
        from tokenprune.testing.tiny_models import sample_images

        photos = sample_images()
        batch = t.processor(images=list(photos), text=[t.prompt(q) for q in questions], return_tensors="pt",
                            padding=True)
    finally:
        t.processor.tokenizer.padding_side = "left"
    assert (batch["attention_mask"][:, -1] == 0).any()
    meth = method("llava", pre=8)
    with prune(m, meth), torch.no_grad():
        out = m(**batch).logits
        ends = (batch["attention_mask"].sum(1) - 56).tolist()
        for i, q in enumerate(questions):
            single = m(**t.inputs(q, images=photos[i])).logits
            torch.testing.assert_close(out[i, ends[i] - 1], single[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,four_rows", [("llava", False), ("qwen2_vl", False), ("qwen2_vl", True)])
def test_manual_decoding_loop_matches_generate(family, four_rows):
    """Calling the model step by step with its cache (no position ids) decodes like generate."""
    t = tiny(family)
    m, inputs = t.model, t.inputs()
    meth = method(family, pre=20, mid=10, layer=2)
    if four_rows:  # the prefill gets generate-style ids: a text row, then the three M-RoPE rows
        p3, _ = m.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                       image_grid_thw=inputs["image_grid_thw"])
        text = torch.arange(p3.shape[-1])[None, None]
        inputs = dict(inputs, position_ids=torch.cat([text, p3], 0))
    with prune(m, meth):
        ref = generate(m, inputs)
        with torch.no_grad():
            out = m(**inputs, use_cache=True)
            mask = inputs["attention_mask"]
            logits = [out.logits[:, -1]]
            for _ in range(NEW - 1):
                nxt = logits[-1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                out = m(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
    for a, b in zip(logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eager_attention_keep_all_and_pruned():
    """With eager attention the wrapper calls the model's own eager function: keep-all is exact."""
    from tokenprune.testing.tiny_models import build_tiny_vlm

    t = build_tiny_vlm("llava", small=True, attn="eager")
    m, inputs = t.model, t.inputs(["What is shown in this image?", "Describe."])
    g0 = generate(m, inputs)
    with prune(m, method("llava", pre=1.0, mid=1.0)):
        g1 = generate(m, inputs)
        assert m.config.get_text_config()._attn_implementation == "tokenprune_eager"
    assert torch.equal(g0.sequences, g1.sequences)
    assert all(torch.equal(a, b) for a, b in zip(g0.logits, g1.logits))
    assert m.config.get_text_config()._attn_implementation == "eager"
    with prune(m, method("llava", pre=24, mid=8)) as report:
        out = generate(m, inputs)
    assert report.tokens_per_layer == [24, 24, 8, 8]
    L = inputs["input_ids"].shape[1]
    assert cache_lengths(out) == [L - 40 + NEW - 1] * 2 + [L - 56 + NEW - 1] * 2
