"""Fidelity at realistic shapes: each method's selection at its defaults against its official rule.

For FastV (pkunlp-icler/FastV), FasterVLM (Theia-4869/FasterVLM), DivPrune (vbdi/divprune) and SCOPE
(kinredon/SCOPE), the ``official_*`` functions below are our own literal re-implementations of the
selection rule the official code runs (the commits read are in ``docs/fidelity.rst``): one image at
a time, plain loops, ties resolved as the official ``torch.topk`` / ``torch.argmax`` resolve them on
distinct values (the first maximum). Greedy references recompute every score from scratch at every
step, as the official loops do (the sum over all tokens of a step is one tensor expression of the
formula; no incremental, lazy or fixed-point bookkeeping). For the methods that are ours or have no
released selection code (ReverseFastV, WindowFastV, random, pooling, facility location) they
re-implement the rule the method documents (the design notes' ALGORITHMS.md and the docstrings).
Nothing is shared with the package.

Inputs: N = 576 tokens (LLaVA-1.5's 24 x 24 grid), D = 1024 (CLIP ViT-L), K in {64, 128, 192},
seeded, float32. Features are CLIP-like: a shared direction, clusters, noise and a few high-norm
artefact tokens, so cosine similarities are mostly positive and spread. Each method gets the signal
its official code uses: a [CLS] attention row (FasterVLM: mean over heads; SCOPE: sum over heads) or
the last token's attention row at the layer before pruning, averaged over heads and cut to the image
span (FastV). Greedy references run once at the largest K: the official loops do not depend on the
total count, so their first K picks are the selection at K.

Other owners' methods (DART, VisionZip, CDPruner, PyramidDrop, TOPS) have their own fidelity files.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import tokenprune as tp

N, D, GRID = 576, 1024, (24, 24)
KS = (64, 128, 192)
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------------------------
# Seeded inputs
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def clip_like(seed: int) -> torch.Tensor:
    """float32 ``[N, D]`` CLIP-like patch features (cached: tests must not modify them)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    centers = torch.randn(16, D, generator=g)
    assign = torch.randint(0, 16, (N,), generator=g)
    x = 0.5 * common + 0.9 * centers[assign] + torch.randn(N, D, generator=g)
    artefacts = torch.randperm(N, generator=g)[:4]
    x[artefacts] *= 6.0
    return x


@functools.lru_cache(maxsize=None)
def cls_attention(seed: int, heads: int = 16) -> torch.Tensor:
    """float32 ``[heads, N]``: the [CLS] row of a ViT attention (softmax over [CLS] + N keys), patches only."""
    g = torch.Generator().manual_seed(1000 + seed)
    logits = torch.randn(heads, N + 1, generator=g) * 2.5
    return torch.softmax(logits, dim=-1)[:, 1:]


SYS, TEXT = 35, 24  # LLaVA-1.5: 35 system-prompt tokens before the image, then the instruction


@functools.lru_cache(maxsize=None)
def last_token_attention(seed: int, heads: int = 32) -> torch.Tensor:
    """float32 ``[heads, L]``: the last token's attention row at one decoder layer (causal: all L keys).

    A strong sink at position 0, text tokens attended more than image tokens, as in LLaVA's layer 1.
    """
    g = torch.Generator().manual_seed(2000 + seed)
    L = SYS + N + TEXT
    logits = torch.randn(heads, L, generator=g) * 1.5
    logits[:, 0] += 8.0
    logits[:, SYS + N:] += 2.0
    return torch.softmax(logits, dim=-1)


def fastv_signal(seed: int) -> torch.Tensor:
    """float32 ``[N]``: what FastV ranks, the head mean of the last token's row over the image span."""
    return last_token_attention(seed).mean(dim=0)[SYS:SYS + N]


# ------------------------------------------------------------------------------------------------
# Helpers shared by the references (plain Python)
# ------------------------------------------------------------------------------------------------


def first_argmax(values, skip=frozenset()):
    """Index of the first largest value not in ``skip`` (``torch.argmax``'s choice on a vector)."""
    best, arg = -math.inf, None
    for i, v in enumerate(values):
        if i not in skip and v > best:
            best, arg = v, i
    return arg


def top_k(values, k, largest=True):
    """Sorted positions of the ``k`` largest (or smallest) values; ties to the lower position."""
    ranked = sorted(range(len(values)), key=lambda i: (-values[i] if largest else values[i], i))
    return sorted(ranked[:k])


def cosine_official(x: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosine similarity as DivPrune's and SCOPE's code compute it: rows over their norms, one matmul."""
    u = x / x.norm(dim=-1, keepdim=True)
    return u @ u.T


def kept(method, features, budget, **signals):
    """Sorted kept positions of a registered method (by name, at its defaults) on one sample."""
    return tp.select(method, features[None], budget=budget, **signals).indices[0].tolist()


# ------------------------------------------------------------------------------------------------
# FastV and its two variants (in-LLM, last-token attention)
# ------------------------------------------------------------------------------------------------


def official_fastv(attn_heads, k):
    """FastV (``fastv_forward``, FastV@d165972 ``modeling_llama.py``): at layer K, the attention of layer
    K - 1, averaged over heads; the last row; the image span; ``topk`` of it; positions kept."""
    H, L = len(attn_heads), len(attn_heads[0])
    mean = [sum(attn_heads[h][j] for h in range(H)) / H for j in range(L)]
    image = mean[SYS:SYS + N]
    return top_k(image, k)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fastv_keeps_the_official_top_k(seed, k):
    attn = last_token_attention(seed)
    want = official_fastv(attn.tolist(), k)
    assert kept("fastv", clip_like(seed), k, relevance=fastv_signal(seed)[None]) == want


def test_fastv_stage_is_the_official_one():
    """Layer 2 (the input of decoder layer 2, ranked by layer 1's attention), the last token, original positions."""
    st = tp.create_method("fastv").stages[0]
    assert (st.layer, st.relevance, st.raters, st.positions) == (2, "text_attention", "last_token", "preserve")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("seed", SEEDS)
def test_reverse_fastv_keeps_the_lowest_attention(seed, k):
    want = top_k(fastv_signal(seed).tolist(), k, largest=False)
    assert kept("reverse_fastv", clip_like(seed), k, relevance=fastv_signal(seed)[None]) == want


def reference_window_fastv(scores, k, rows=24, cols=24, windows=4):
    """WindowFastV as documented: ``windows x windows`` windows (token ``(y, x)`` in window
    ``(y·w // rows, x·w // cols)``); the budget apportioned to windows by their token counts, largest
    remainder, equal remainders to the window whose next-best token scores higher, then the lower
    window; each window keeps its top tokens (ties: lower position)."""
    members = {}
    for y in range(rows):
        for x in range(cols):
            members.setdefault((y * windows // rows, x * windows // cols), []).append(y * cols + x)
    order = sorted(members)
    n = rows * cols
    ranked = {w: sorted(members[w], key=lambda i: (-scores[i], i)) for w in order}
    quota = {w: k * len(members[w]) // n for w in order}
    rem = {w: k * len(members[w]) % n for w in order}
    left = k - sum(quota.values())

    def next_score(w):
        return scores[ranked[w][quota[w]]] if quota[w] < len(ranked[w]) else -math.inf

    seats = sorted(order, key=lambda w: (-rem[w], -next_score(w), order.index(w)))
    for w in seats[:left]:
        quota[w] += 1
    return sorted(i for w in order for i in ranked[w][:quota[w]])


@pytest.mark.parametrize("k", KS + (100,))
@pytest.mark.parametrize("seed", SEEDS)
def test_window_fastv_keeps_the_top_of_each_window(seed, k):
    scores = fastv_signal(seed)
    want = reference_window_fastv(scores.tolist(), k)
    assert kept("window_fastv", clip_like(seed), k, relevance=scores[None], grid=GRID) == want


# ------------------------------------------------------------------------------------------------
# FasterVLM ([CLS] attention, before the LLM)
# ------------------------------------------------------------------------------------------------


def official_fastervlm(cls_heads, k):
    """FasterVLM (``encode_images``, FasterVLM@f5d5f12 ``llava_arch.py``): the [CLS] row to the patches
    at the feature layer, mean over heads, ``topk``."""
    H = len(cls_heads)
    mean = [sum(cls_heads[h][i] for h in range(H)) / H for i in range(N)]
    return top_k(mean, k)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fastervlm_keeps_the_official_top_k(seed, k):
    heads = cls_attention(seed)
    want = official_fastervlm(heads.tolist(), k)
    assert kept("fastervlm", clip_like(seed), k, relevance=heads.mean(0)[None]) == want


def test_fastervlm_stage_is_before_the_llm_on_cls_attention():
    st = tp.create_method("fastervlm").stages[0]
    assert (st.layer, st.relevance) == (None, "cls_attention")


# ------------------------------------------------------------------------------------------------
# DivPrune (max-min diversity on the projected features, before the LLM)
# ------------------------------------------------------------------------------------------------


def official_divprune(x, k):
    """DivPrune (``DivPrune``, divprune@799e2d9 ``llava_arch.py``), in greedy order.

    ``Dist = 1 - cos``; first the token whose second-smallest distance (the smallest is its own) is
    largest; then, each step, the token whose smallest distance to the picks is largest, ``argmax``
    over all tokens (a pick's own distance is 0, so it is never taken again). Each step recomputes
    the minimum over the picks' rows, as the official loop does.
    """
    dist = 1.0 - cosine_official(x)
    picks = [first_argmax([sorted(col)[1] for col in dist.T.tolist()])]
    while len(picks) < k:
        scores = dist[picks].min(dim=0).values.tolist()  # min over the picks, for every token
        picks.append(first_argmax(scores))
    return picks


@functools.lru_cache(maxsize=None)
def official_divprune_order(seed):
    return tuple(official_divprune(clip_like(seed), max(KS)))


@pytest.mark.parametrize("seed", SEEDS)
def test_divprune_keeps_the_official_set(seed):
    order = official_divprune_order(seed)
    for k in KS:
        assert kept("divprune", clip_like(seed), k) == sorted(order[:k]), k


def test_divprune_batched_rows_keep_the_official_sets():
    """The batched (torch) path, not only the single-sample one."""
    x = torch.stack([clip_like(s) for s in SEEDS[:2]])
    sel = tp.select("divprune", x, budget=128)
    for row, s in enumerate(SEEDS[:2]):
        assert sel.indices[row].tolist() == sorted(official_divprune_order(s)[:128])


# ------------------------------------------------------------------------------------------------
# SCOPE (saliency-weighted coverage greedy, before the LLM)
# ------------------------------------------------------------------------------------------------


def official_scope_scores(F, m, saliency, picked):
    """SCOPE's score of every token given the running ``m`` ``[N]`` (``-inf`` for picks), as a list:
    ``a_c · Σ_j max(0, F_jc - m_j)``, recomputed from scratch for every column ``c``."""
    scores = (F - m[:, None]).clamp_min(0).sum(dim=0).mul(saliency).tolist()
    return [-math.inf if c in picked else v for c, v in enumerate(scores)]


def official_scope(x, saliency, k):
    """SCOPE (``SCOPE``, SCOPE@6bf7306 ``scope/clip_encoder.py``, LLaVA-1.5 path), in greedy order.

    ``m`` starts at 0 (so similarities below 0 never count); each step takes the first ``argmax`` of
    ``a^alpha · Σ_j max(0, F_jc - m_j)`` over unpicked ``c`` (alpha = 1, combine "multi"), then
    ``m = max(m, F[pick])``. The saliency ``a`` is the [CLS] attention summed over heads.
    """
    F = cosine_official(x)
    m = torch.zeros(N)
    picks = []
    for _ in range(k):
        pick = first_argmax(official_scope_scores(F, m, saliency, set(picks)))
        picks.append(pick)
        m = torch.maximum(m, F[pick])
    return picks


@functools.lru_cache(maxsize=None)
def official_scope_order(seed):
    return tuple(official_scope(clip_like(seed), cls_attention(seed).sum(0), max(KS)))


@pytest.mark.parametrize("seed", SEEDS)
def test_scope_keeps_the_official_set(seed):
    sal = cls_attention(seed).sum(0)[None]
    order = official_scope_order(seed)
    for k in KS:
        assert kept("scope", clip_like(seed), k, relevance=sal) == sorted(order[:k]), k


@pytest.mark.parametrize("seed", SEEDS)
def test_scope_each_pick_is_the_official_argmax_up_to_the_fixed_point_grid(seed):
    """Replaying our greedy order through the official score: every pick is the official best, or
    within the bound of the fixed-point coverage (similarities on a 2^-15 grid, so each coverage term
    is off by at most 2^-15): ``score(best) - score(ours) <= N 2^-15 (a_best + a_ours)``.

    This is what remains of the difference: the greedy *order* can swap two near-tied tokens (about
    one step in a few hundred), which changes the kept set only when the swap straddles the budget.
    """
    x, sal = clip_like(seed), cls_attention(seed).sum(0)
    ours = tp.select("scope", x[None], relevance=sal[None], budget=max(KS)).order[0].tolist()
    F, a = cosine_official(x), sal.tolist()
    m, picked = torch.zeros(N), set()
    for pick in ours:
        scores = official_scope_scores(F, m, sal, picked)
        best = first_argmax(scores)
        assert scores[best] - scores[pick] <= N * 2.0 ** -15 * (a[best] + a[pick]) + 1e-6 * scores[best]
        picked.add(pick)
        m = torch.maximum(m, F[pick])


def test_scope_batched_rows_keep_the_official_sets():
    """The batched (torch) lazy-greedy path, not only the single-sample one."""
    x = torch.stack([clip_like(s) for s in SEEDS[:2]])
    sal = torch.stack([cls_attention(s).sum(0) for s in SEEDS[:2]])
    sel = tp.select("scope", x, relevance=sal, budget=128)
    for row, s in enumerate(SEEDS[:2]):
        assert sel.indices[row].tolist() == sorted(official_scope_order(s)[:128])


def test_scope_stage_is_before_the_llm_on_cls_attention():
    st = tp.create_method("scope").stages[0]
    assert (st.layer, st.relevance, st.objective.alpha, st.objective.combine) == (None, "cls_attention", 1.0,
                                                                                    "multiply")


# ------------------------------------------------------------------------------------------------
# Methods without official selection code: the rules they document
# ------------------------------------------------------------------------------------------------


def reference_facility_location(x, k):
    """Greedy ``f(S) = Σ_j max(0, max_{s∈S} F_sj)`` on the documented fixed-point grid
    (``round(2^15 F)``, exact int64 sums), first largest gain, gains recomputed from scratch each
    step; in greedy order."""
    u = torch.nn.functional.normalize(x, dim=-1)
    Fq = (u @ u.T).mul(2 ** 15).round().clamp(-32767, 32767).to(torch.int64)
    m, picks = torch.zeros(N, dtype=torch.int64), []
    for _ in range(k):
        gains = (Fq - m[:, None]).clamp_min(0).sum(dim=0).tolist()  # column c: Σ_j max(0, Fq_jc - m_j)
        pick = first_argmax(gains, set(picks))
        picks.append(pick)
        m = torch.maximum(m, Fq[pick])
    return picks


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_facility_location_is_greedy_coverage(seed):
    x = clip_like(seed)
    order = reference_facility_location(x, max(KS))
    for k in KS:
        assert kept("facility_location", x, k) == sorted(order[:k]), k


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_is_the_top_k_of_seeded_uniform_keys(seed, k):
    """A uniform ``k``-subset: the ``k`` largest of ``N`` i.i.d. uniform keys drawn with the seed."""
    keys = torch.rand(1, N, generator=torch.Generator().manual_seed(seed))[0].tolist()
    want = top_k(keys, k)
    x = clip_like(seed)
    assert kept("random", x, k, seed=seed) == want
    assert tp.create_method("random", seed=seed).select(x[None], budget=k).indices[0].tolist() == want


def reference_pooling(x, k, rows=24, cols=24):
    """Pooling as documented: the largest ``r x c <= k`` grid (aspect closest to the grid's, then fewer
    rows); window ``(a, b)`` holds the tokens with ``y·r // rows = a`` and ``x·c // cols = b``; it keeps
    the token nearest its centre (ties: lower position) carrying the window's mean features."""
    best = None
    for r in range(1, rows + 1):
        c = min(cols, k // r)
        if c < 1:
            break
        a, b = r * cols, c * rows
        key = (-r * c, max(a, b) / min(a, b), r)
        if best is None or key < best[0]:
            best = (key, (r, c))
    r, c = best[1]
    out = {}
    for wa in range(r):
        for wb in range(c):
            ys = [y for y in range(rows) if y * r // rows == wa]
            xs = [v for v in range(cols) if v * c // cols == wb]
            cy, cx = (ys[0] + ys[-1]) / 2, (xs[0] + xs[-1]) / 2
            cells = sorted((y * cols + v for y in ys for v in xs),
                           key=lambda i: ((i // cols - cy) ** 2 + (i % cols - cx) ** 2, i))
            members = [x[i].double() for i in cells]
            out[cells[0]] = sum(members) / len(members)
    keep = sorted(out)
    return keep, torch.stack([out[i] for i in keep]), (r, c)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("seed", SEEDS)
def test_pooling_averages_its_windows(seed, k):
    x = clip_like(seed)
    want, feats, _ = reference_pooling(x, k)
    sel = tp.select("pooling", x[None], budget=k, grid=GRID)
    assert sel.indices[0].tolist() == want
    torch.testing.assert_close(sel.features[0].double(), feats, rtol=0, atol=1e-5)


def test_pooling_is_avg_pool2d_where_the_windows_tile_the_grid():
    """At 64 (8 x 8 windows of 3 x 3) it is ``avg_pool2d``; at 128 (8 x 16) and 192 (12 x 16) windows
    have 1 or 2 columns (a partition), where ``adaptive_avg_pool2d`` would average overlapping 2-column
    windows."""
    x = clip_like(0)
    sel = tp.select("pooling", x[None], budget=64, grid=GRID)
    grid = x.T.reshape(1, D, 24, 24)
    want = torch.nn.functional.avg_pool2d(grid, 3).reshape(D, 64).T
    torch.testing.assert_close(sel.features[0], want, rtol=0, atol=1e-5)
    assert [reference_pooling(x, k)[2] for k in KS] == [(8, 8), (8, 16), (12, 16)]
