"""PyramidDrop's ranking signal, ``relevance="own_layer_attention"``: the last instruction token's
attention as the stage's own decoder layer computes it from the hidden states entering it (its input
norm, query/key projections and rotary embedding), checked against a manual computation on a tiny
Llama-based LLaVA, stage after stage (positions re-indexed after each drop, as the official code)."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import sample_images, shared_tiny_vlm


def _tiny():
    return shared_tiny_vlm("llava", small=True, num_layers=4)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def manual_own_attention(model, layer_idx, hs, positions):
    """float32 ``[B, L]``: the last token's attention (heads averaged) that decoder layer ``layer_idx``
    computes from ``hs`` ``[B, L, D]`` at ``positions`` ``[B, L]``, written out for Llama: RMSNorm,
    q/k projections, RoPE, grouped-query repeat, scaled logits, causal softmax in float32."""
    lm = model.model.language_model
    layer = lm.layers[layer_idx]
    a = layer.self_attn
    x = layer.input_layernorm(hs)
    B, L, _ = x.shape
    q = a.q_proj(x).view(B, L, -1, a.head_dim).transpose(1, 2)
    k = a.k_proj(x).view(B, L, -1, a.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2)) * a.head_dim ** -0.5  # the last token sees all
    return torch.softmax(logits, dim=-1).mean(1)[:, 0]


def _inputs_of_layers(model, layers):
    """Forward pre-hooks (registered before the pruning context's) that record each layer's input."""
    seen, handles = {}, []
    for li in layers:
        def hook(module, args, kwargs, li=li):
            seen[li] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handles.append(model.model.language_model.layers[li].register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_every_stage_ranks_by_its_own_layers_attention():
    tiny = _tiny()
    model = tiny.model
    inputs = tiny.inputs("What is shown in this image?")
    image_id = model.config.image_token_id
    seen, handles = _inputs_of_layers(model, (1, 2, 3))
    try:
        with torch.no_grad(), tp.prune(model, "pyramiddrop", layers=(1, 2, 3), reference_depth=None) as report:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert [s.relevance for s in report.stages] == ["own_layer_attention"] * 3
    assert [s.tokens_after[0] for s in report.stages] == [32, 16, 8]
    is_img = inputs["input_ids"][0] == image_id
    vis_pos = is_img.nonzero().flatten()  # the image tokens' positions entering layer 1
    orig = torch.arange(int(is_img.sum()))  # their original visual-token indices
    for s, li in zip(report.stages, (1, 2, 3)):
        hs = seen[li]
        L = hs.shape[1]
        # layer 1 sees the prompt as given; later layers the pruned sequence at re-indexed positions
        want = manual_own_attention(model, li, hs, torch.arange(L)[None])[0, vis_pos]
        got = s.scores[0][orig]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        keep = sorted(orig[torch.topk(want, s.tokens_after[0]).indices].tolist())
        assert s.kept[0].tolist() == keep
        # the image tokens entering the next stage's layer: the kept ones, packed, in prompt order
        first = int(vis_pos[0])
        vis_pos = first + torch.arange(len(keep))
        orig = torch.tensor(keep)


def test_it_is_not_the_previous_layers_attention():
    tiny = _tiny()
    inputs = tiny.inputs("What is shown in this image?")
    with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(2,), reference_depth=None) as own:
        tiny.model(**inputs)
    with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(2,), reference_depth=None,
                                   rank_attention="previous_layer") as prev:
        tiny.model(**inputs)
    assert prev.stages[0].relevance == "text_attention"
    assert not torch.allclose(own.stages[0].scores[0], prev.stages[0].scores[0])


def test_padded_batch_ranks_each_prompt_as_alone():
    tiny = _tiny()
    questions = ["What is shown in this image?", "Describe the image in detail please."]
    batch = tiny.inputs(questions)
    assert bool((batch["attention_mask"] == 0).any())  # left padding
    with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(1, 2), reference_depth=None) as rep:
        tiny.model.generate(**batch, max_new_tokens=1, do_sample=False)  # positions from the mask
    for b, q in enumerate(questions):
        one = tiny.inputs(q, images=sample_images()[b % 2])  # the image the batch gave it
        with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(1, 2), reference_depth=None) as alone:
            tiny.model.generate(**one, max_new_tokens=1, do_sample=False)
        for s_batch, s_one in zip(rep.stages, alone.stages):
            assert s_batch.kept[b].tolist() == s_one.kept[0].tolist()
            torch.testing.assert_close(s_batch.scores[b], s_one.scores[0], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_generate_runs_with_the_official_defaults():
    tiny = _tiny()
    inputs = tiny.inputs("What is shown in this image?")
    with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(1, 2, 3), reference_depth=None) as rep:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert rep.tokens_per_layer == [64, 32, 16, 8]


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llava_onevision"])
def test_other_families_run(family):
    # query/key norms (Gemma3), M-RoPE (Qwen2-VL), Qwen2 (OneVision): the layer's own projections apply
    tiny = shared_tiny_vlm(family, small=True, num_layers=4)
    inputs = tiny.inputs("What is shown in this image?")
    with torch.no_grad(), tp.prune(tiny.model, "pyramiddrop", layers=(1, 2), reference_depth=None) as rep:
        tiny.model(**inputs)
    assert [s.relevance for s in rep.stages] == ["own_layer_attention"] * 2
    assert all(torch.isfinite(s.scores[0][~torch.isnan(s.scores[0])]).all() for s in rep.stages)


def test_own_layer_attention_is_an_in_llm_source():
    with pytest.raises(tp.StageError, match="own_layer_attention"):
        tp.compose(tp.criteria.Relevance(), selector="topk", budget=4, relevance="own_layer_attention")
