"""DART against its official selection rule (ZichenWen1/DART, ``get_retained_image_token``).

``official_dart`` below is our own literal re-implementation of the rule, written from the official
code's behaviour with plain loops and Python sets, as that code does: one unpadded sequence, image
tokens at ``start .. start + n - 1``, the "query" tokens after them; pivots by the L1 norm of the keys
(all heads concatenated); the pivots visited in the order of a Python set of their positions; each
pivot takes the ``budget // pivots`` tokens least cosine-similar to it among the image tokens that are
neither image pivots nor taken; kept: the image pivots and every pick. It is compared with the
registered method at ``count="official"`` on realistic shapes, and through ``prune()`` on a tiny
LLaVA with the model's own keys and final-norm hidden states.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm


def official_dart(states, keys, start, n_image, budget, image_pivots=4, text_pivots=4):
    """Kept image-token positions (a set) of the official rule.

    states: [L, D] hidden states after the final norm; keys: [H, L, Dh] the keys at the layer before.
    """
    L = states.shape[0]
    l1 = [sum(abs(v) for v in keys[:, i, :].reshape(-1).tolist()) for i in range(L)]
    image = list(range(start, start + n_image))
    query = list(range(start + n_image, L))
    img_piv = sorted(image, key=lambda i: -l1[i])[:image_pivots]
    txt_piv = sorted(query, key=lambda i: -l1[i])[:text_pivots]
    share = budget // (image_pivots + text_pivots)
    chosen = set(img_piv + txt_piv)
    remaining = set(image) - set(img_piv)

    rows = [states[i].tolist() for i in range(L)]
    norm = [math.sqrt(sum(v * v for v in r)) for r in rows]

    def cos(a, b):
        return sum(p * q for p, q in zip(rows[a], rows[b])) / (norm[a] * norm[b])

    for pivot in list(chosen.copy()):
        ranked = sorted(remaining, key=lambda j: (cos(pivot, j), j))  # least similar first
        picks = ranked[:share]
        chosen.update(picks)
        remaining.difference_update(picks)
    return chosen - set(txt_piv)


def _clip_like(n, d, gen, clusters=24):
    """Clustered features with a few outlier channels, like vision tokens inside an LLM."""
    centers = torch.randn(clusters, d, generator=gen, dtype=torch.float64) * 3
    assign = torch.randint(0, clusters, (n,), generator=gen)
    x = centers[assign] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_selection_core_keeps_the_official_set(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    start, n, n_text, d, heads, dh = 35, 576, 40, 1024, 16, 64
    L = start + n + n_text
    states = _clip_like(L, d, gen).float()
    keys = (torch.randn(heads, L, dh, generator=gen) * (1 + torch.rand(1, L, 1, generator=gen))).float()
    want = official_dart(states.double(), keys.double(), start, n, budget)
    assert len(want) == 4 + 8 * (budget // 8)

    norms = keys.permute(1, 0, 2).reshape(L, -1).abs().sum(-1)
    sel = tp.select(tp.create_method("dart", count="official"), states[None, start:start + n], budget=budget,
                    relevance=norms[None, start:start + n], text_embeddings=states[None, start + n:],
                    text_relevance=norms[None, start + n:], positions=torch.arange(start, start + n)[None])
    got = {start + i for i in sel.indices[0].tolist() if i >= 0}
    assert got == want

    exact = tp.select(tp.create_method("dart"), states[None, start:start + n], budget=budget,
                      relevance=norms[None, start:start + n], text_embeddings=states[None, start + n:],
                      text_relevance=norms[None, start + n:], positions=torch.arange(start, start + n)[None])
    assert exact.counts.item() == budget  # count="budget": exactly the budget


def test_budget_count_splits_the_picks_evenly_in_visiting_order():
    gen = torch.Generator().manual_seed(5)
    x, rel = torch.randn(1, 50, 8, generator=gen), torch.rand(1, 50, generator=gen)
    te, tr = torch.randn(1, 5, 8, generator=gen), torch.rand(1, 5, generator=gen)
    for budget in (4, 5, 22, 37):
        sel = tp.select("dart", x, budget=budget, relevance=rel, text_embeddings=te, text_relevance=tr)
        assert sel.counts.item() == budget
        assert set(sel.order[0, :min(4, budget)].tolist()) <= set(rel[0].topk(4).indices.tolist())
    # the official count: 22 // 8 = 2 per pivot, 4 + 16 = 20 kept
    off = tp.select(tp.create_method("dart", count="official"), x, budget=22, relevance=rel, text_embeddings=te,
                    text_relevance=tr)
    assert off.counts.item() == 20


def test_text_embeddings_without_their_key_norms_is_an_error():
    x = torch.randn(1, 10, 4)
    with pytest.raises(tp.errors.MissingSignalError, match="text_relevance"):
        tp.select("dart", x, budget=5, relevance=torch.rand(1, 10), text_embeddings=torch.randn(1, 3, 4))
    with pytest.raises(tp.errors.ParameterError, match="count"):
        tp.create_method("dart", count="all")


def _official_through_the_model(t, inputs, layer, budget):
    """Run the unpruned model once, capture layer ``layer - 1``'s post-RoPE keys and the hidden states
    entering ``layer``, and apply the official rule to each sample (left padding removed)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = t.model
    lm = m.model.language_model
    attn = lm.layers[layer - 1].self_attn
    got = {}

    def grab(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        B, L, _ = h.shape
        k = module.k_proj(h).view(B, L, -1, module.head_dim).transpose(1, 2)
        q = module.q_proj(h).view(B, L, -1, module.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(q, k, cos, sin)
        got["keys"] = k.detach()

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = m(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    hs = out.hidden_states[layer]  # entering decoder layer `layer`
    states = lm.norm(hs).detach()
    image_id = m.config.image_token_id
    result = []
    for b in range(hs.shape[0]):
        valid = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][valid]
        img = (ids == image_id).nonzero().flatten()
        start, n = int(img[0]), len(img)
        kept = official_dart(states[b][valid].double(), got["keys"][b][:, valid].double(), start, n, budget)
        result.append(sorted(i - start for i in kept))
    return result


def test_prune_keeps_the_official_set_on_a_tiny_llava():
    t = build_tiny_vlm("llava", small=True, num_layers=4)
    inputs = t.inputs(["What is shown in this image?", "Describe the colours of the picture in detail."])
    want = _official_through_the_model(t, inputs, layer=2, budget=16)
    with tp.prune(t.model, "dart", budget=16, count="official") as report:
        with torch.no_grad():
            t.model(**inputs)
    st = report.stages[0]
    assert [len(k) for k in want] == [4 + 8 * 2] * 2
    assert [k.tolist() for k in st.kept] == want
    # count="budget" keeps exactly the budget, the same pivots first
    with tp.prune(t.model, "dart", budget=16) as report:
        with torch.no_grad():
            t.model(**inputs)
    assert report.stages[0].tokens_after == [16, 16]
