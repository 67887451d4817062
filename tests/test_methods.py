"""Named methods: their stage structure, their documentation, and golden selections.

Golden tests compare each method's selection on small fixed tensors with an independent, naive
float64 implementation of the rule the method documents (written here from the papers' definitions,
one token at a time, no shared code with the package), not with indices copied from an earlier run.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.errors import BudgetError, ConfigError, StageError
from tokenprune.selectors.visionzip import split_budget

BUILTIN_METHODS = [n for n in tp.list_methods() if tp.registry.methods.entry(n).source == "tokenprune"]
EXPECTED = {"tops", "fastv", "reverse_fastv", "window_fastv", "pyramiddrop", "dart", "fastervlm", "visionzip",
            "divprune", "cdpruner", "facility_location", "scope", "random", "pooling"}


# ------------------------------------------------------------------------------------------------
# Inputs and naive references
# ------------------------------------------------------------------------------------------------


def _inputs(n=16, d=6, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g)
    r = torch.rand(batch, n, generator=g) + 0.01
    return x, r


def _cos(x):
    x = np.asarray(x, dtype=np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return u @ u.T


def _argmax(values, allowed):
    """Index of the largest value among ``allowed`` (ties: lowest index)."""
    best, arg = -math.inf, None
    for i in allowed:
        if values[i] > best:
            best, arg = values[i], i
    return arg


def _topk(scores, k, largest=True):
    idx = sorted(range(len(scores)), key=lambda i: (-scores[i] if largest else scores[i], i))
    return sorted(idx[:k])


def _facility_value(F, S):
    n = F.shape[0]
    return sum(max(0.0, max((F[j, s] for s in S), default=0.0)) for j in range(n))


def naive_facility_location(x, k):
    F = _cos(x)
    S = []
    for _ in range(k):
        base = _facility_value(F, S)
        gains = {i: _facility_value(F, S + [i]) - base for i in range(F.shape[0]) if i not in S}
        S.append(_argmax(gains, sorted(gains)))
    return sorted(S)


def naive_max_min(x, k):
    D = 1.0 - _cos(x)
    n = D.shape[0]
    nn = [min(D[i, j] for j in range(n) if j != i) for i in range(n)]
    S = [_argmax(nn, range(n))]
    while len(S) < k:
        far = {i: min(D[i, s] for s in S) for i in range(n) if i not in S}
        S.append(_argmax(far, sorted(far)))
    return sorted(S)


def naive_dpp(x, r, k, eps=1e-6):
    F = _cos(x)
    r = np.asarray(r, dtype=np.float64)
    q = (r - r.min()) / (r.max() - r.min())
    L = q[:, None] * F * q[None, :] + eps * np.eye(len(q))
    S = []
    for _ in range(k):
        vals = {}
        for i in range(len(q)):
            if i in S:
                continue
            idx = S + [i]
            vals[i] = np.linalg.slogdet(L[np.ix_(idx, idx)])[1]
        S.append(_argmax(vals, sorted(vals)))
    return sorted(S)


def _minmax(vals):
    lo, hi = min(vals.values()), max(vals.values())
    return {i: ((v - lo) / (hi - lo) if hi > lo else 0.0) for i, v in vals.items()}


def naive_tops(x, r, k, lam, alpha, clamp=False):
    """TOPS as ALGORITHMS.md states it: S1 = argmax r, then argmax of min-max normalised
    r + lam * c(U) + alpha * d(S), with m_j = max_{s in S} F_sj (clamp: max(0, max_{s in S} F_sj))."""
    F = _cos(x)
    n = F.shape[0]
    S = [_argmax(list(r), range(n))]
    while len(S) < k:
        U = [j for j in range(n) if j not in S]
        m = [max([F[s, j] for s in S] + ([0.0] if clamp else [])) for j in range(n)]
        rel = _minmax({i: float(r[i]) for i in U})
        cov = _minmax({i: sum(max(0.0, F[i, j] - m[j]) for j in U) for i in U})
        div = _minmax({i: 1.0 - m[i] for i in U})
        score = {i: rel[i] + lam * cov[i] + alpha * div[i] for i in U}
        S.append(_argmax(score, U))
    return sorted(S)


def naive_scope(x, r, k, alpha=1.0):
    F = _cos(x)
    n = F.shape[0]
    S, m = [], [0.0] * n
    for _ in range(k):
        score = {i: sum(max(0.0, F[i, j] - m[j]) for j in range(n)) * float(r[i]) ** alpha
                 for i in range(n) if i not in S}
        pick = _argmax(score, sorted(score))
        S.append(pick)
        m = [max(m[j], F[pick, j]) for j in range(n)]
    return sorted(S)


def naive_dart(x, key_norm, k, num_pivots):
    F = _cos(x)
    n = F.shape[0]
    pivots = _topk(list(key_norm), num_pivots)
    pivots = sorted(pivots, key=lambda i: (-key_norm[i], i))
    if k <= len(pivots):
        return sorted(pivots[:k])
    rest = [i for i in range(n) if i not in pivots]
    dis = {i: 1.0 - max(F[i, p] for p in pivots) for i in rest}
    others = sorted(rest, key=lambda i: (-dis[i], i))[:k - len(pivots)]
    return sorted(pivots + others)


def naive_visionzip(x, r, k, ratio=10 / 64):
    """Dominant top-(k - c) by relevance; c contextual targets strided over the rest in spatial
    order; every other remaining token averaged into its most similar target."""
    n = len(r)
    c = min(int(math.floor(k * ratio + 0.5)), k - 1)
    d = k - c
    dominant = _topk(list(r), d)
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // c) if c else 1
    targets = [rest[i] for i in range(0, len(rest), step)][:c]
    others = [i for i in rest if i not in targets] if targets else []  # no targets: the rest is dropped
    F = _cos(x)
    groups = {t: [t] for t in targets}
    for o in others:
        groups[_argmax({t: F[o, t] for t in targets}, targets)].append(o)
    feats = {i: np.asarray(x[i], dtype=np.float64) for i in dominant}
    for t, members in groups.items():
        feats[t] = np.mean([np.asarray(x[j], dtype=np.float64) for j in members], axis=0)
    keep = sorted(dominant + targets)
    return keep, np.stack([feats[i] for i in keep])


# ------------------------------------------------------------------------------------------------
# Golden selections
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_fastervlm_and_fastv_are_attention_top_k(seed, k):
    x, r = _inputs(seed=seed)
    want = _topk(r[0].tolist(), k)
    assert tp.select("fastervlm", x, relevance=r, budget=k).indices[0].tolist() == want
    assert tp.select("fastv", x, relevance=r, budget=k).indices[0].tolist() == want
    low = _topk(r[0].tolist(), k, largest=False)
    assert tp.select("reverse_fastv", x, relevance=r, budget=k).indices[0].tolist() == low


def test_top_k_ties_go_to_the_lower_index():
    x = torch.randn(1, 6, 4)
    r = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    assert tp.select("fastervlm", x, relevance=r, budget=3).indices[0].tolist() == [0, 1, 3]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_facility_location_matches_naive_greedy(seed, k):
    x, _ = _inputs(seed=seed)
    assert tp.select("facility_location", x, budget=k).indices[0].tolist() == naive_facility_location(x[0], k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_divprune_matches_naive_max_min(seed, k):
    x, _ = _inputs(seed=seed)
    assert tp.select("divprune", x, budget=k).indices[0].tolist() == naive_max_min(x[0], k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_cdpruner_matches_naive_log_det_greedy(seed, k):
    x, r = _inputs(n=12, d=8, seed=seed)
    assert tp.select("cdpruner", x, relevance=r, budget=k).indices[0].tolist() == naive_dpp(x[0], r[0], k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_tops_stage_one_matches_naive_tops(seed, k):
    x, r = _inputs(n=14, seed=seed)
    m = tp.create_method("tops", stage1_weights=(0.3, 0.7), coverage_weight=1.0, diversity_weight=0.5)
    assert m.select(x, relevance=r, budget=k).indices[0].tolist() == naive_tops(x[0], r[0], k, 0.3, 0.7)
    # the in-LLM stages use the other weights
    assert m.select(x, relevance=r, budget=k, stage=1).indices[0].tolist() == naive_tops(x[0], r[0], k, 1.0, 0.5)
    # m_j floored at 0 (clamp_m=True) is the other reading
    m = tp.create_method("tops", stage1_weights=(0.3, 0.7), clamp_m=True)
    assert m.select(x, relevance=r, budget=k).indices[0].tolist() == naive_tops(x[0], r[0], k, 0.3, 0.7, clamp=True)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_scope_matches_naive_saliency_weighted_coverage(seed, k):
    x, r = _inputs(seed=seed)
    assert tp.select("scope", x, relevance=r, budget=k).indices[0].tolist() == naive_scope(x[0], r[0], k)
    m = tp.create_method("scope", alpha=2.0)
    assert m.select(x, relevance=r, budget=k).indices[0].tolist() == naive_scope(x[0], r[0], k, alpha=2.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k, pivots", [(2, 4), (4, 4), (7, 4), (7, 1), (9, 3)])
def test_pivot_dissimilarity_matches_naive_pivot_rule(seed, k, pivots):
    # the modular approximation of DART (the method itself follows the official rule: test_fidelity_dart.py)
    x, key_norm = _inputs(seed=seed)
    ctx = tp.make_context(x, relevance=key_norm)
    got = tp.get_selector("topk")().select(tp.criteria.PivotDissimilarity(num_pivots=pivots), ctx, k)
    got = got.indices[0].tolist()
    assert got == naive_dart(x[0], key_norm[0].tolist(), k, pivots)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, k", [(16, 8), (24, 13), (30, 20), (16, 1)])
def test_visionzip_matches_naive_dominant_plus_contextual(seed, n, k):
    x, r = _inputs(n=n, seed=seed)
    # the feature-mean variant (the official rule, [CLS] and keys: tests/test_visionzip_official.py)
    sel = tp.create_method("visionzip", merge="mean", merge_by="features").select(x, relevance=r, budget=k)
    keep, feats = naive_visionzip(x[0], r[0].tolist(), k)
    assert sel.indices[0].tolist() == keep
    np.testing.assert_allclose(sel.features[0].double().numpy(), feats, rtol=1e-5, atol=1e-6)


def test_visionzip_paper_splits_and_keep_all():
    assert [split_budget(k, 10 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    x, r = _inputs(n=576, d=4, seed=3)
    sel = tp.select("visionzip", x, relevance=r, budget=64)
    top54 = set(_topk(r[0].tolist(), 54))
    assert top54 <= set(sel.indices[0].tolist()) and sel.counts.item() == 64
    everything = tp.select("visionzip", x[:, :20], relevance=r[:, :20], budget=20)
    assert torch.equal(everything.features, x[:, :20])


def test_visionzip_target_plus_mean_and_keys():
    x, r = _inputs(n=12, seed=4)
    keys = torch.randn(1, 12, 3, generator=torch.Generator().manual_seed(9))
    vz = tp.get_selector("visionzip")
    ctx = tp.make_context(x, relevance=r, keys=keys)
    a = vz(merge_by="features", contextual_ratio=0.5).select(tp.criteria.Relevance(), ctx, 6)
    d, c = split_budget(6, 0.5)
    dominant = _topk(r[0].tolist(), d)
    rest = [i for i in range(12) if i not in dominant]
    targets = [rest[i] for i in range(0, len(rest), max(1, len(rest) // c))][:c]
    for t in targets:  # a contextual token is its target plus the mean of what joined it
        j = a.indices[0].tolist().index(t)
        members = [o for o in rest if o not in targets
                   and _argmax({u: _cos(x[0])[o, u] for u in targets}, targets) == t]
        want = x[0, t].double() + (x[0, members].double().mean(0) if members else 0.0)
        np.testing.assert_allclose(a.features[0, j].double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    b = vz(contextual_ratio=0.5).select(tp.criteria.Relevance(), ctx, 6)  # merge_by="auto": the keys given
    assert b.indices[0].tolist() == a.indices[0].tolist()  # same targets; only the assignment metric changes
    with pytest.raises(tp.MissingSignalError, match="keys"):
        vz(merge_by="keys").select(tp.criteria.Relevance(), tp.make_context(x, relevance=r), 6)


def test_pooling_averages_grid_blocks():
    x, _ = _inputs(n=16, seed=5)
    sel = tp.select("pooling", x, budget=4, grid=(4, 4))
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # one token per 2 x 2 block (all four equidistant from the centre: the lowest index), block means
    assert sel.indices[0].tolist() == [b[0] for b in blocks]
    want = torch.stack([x[0, b].mean(0) for b in blocks])
    torch.testing.assert_close(sel.features[0], want)


def test_window_fastv_takes_the_top_of_each_window():
    x, r = _inputs(n=16, seed=6)
    m = tp.create_method("window_fastv", windows=2)
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    want = sorted(b[_topk([r[0, i].item() for i in b], 1)[0]] for b in blocks)
    assert m.select(x, relevance=r, budget=4, grid=(4, 4)).indices[0].tolist() == want


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_pyramiddrop_stages_keep_half_by_attention(stage):
    x, r = _inputs(n=15, seed=7)
    sel = tp.create_method("pyramiddrop").select(x, relevance=r, stage=stage)
    assert sel.indices[0].tolist() == _topk(r[0].tolist(), 8)  # round(15 / 2), halves up


def test_random_is_seeded_sorted_and_uniform_enough():
    x, _ = _inputs(n=40)
    a = tp.select("random", x, budget=10)
    assert torch.equal(a.indices, tp.select("random", x, budget=10).indices)
    b = tp.create_method("random", seed=1).select(x, budget=10)
    assert not torch.equal(a.indices, b.indices)
    assert torch.equal(tp.select("random", x, budget=10, seed=1).indices, b.indices)  # the context's seed
    counts = torch.zeros(40)
    for s in range(200):
        counts[tp.create_method("random", seed=s).select(x, budget=10).indices[0]] += 1
    assert counts.min() > 0 and counts.max() < 100  # each token kept about 50 times in 200 draws


def test_batched_padded_golden_rows():
    """Golden rules hold row by row in a padded batch."""
    x, r = _inputs(n=16, seed=8, batch=2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    sel = tp.select("facility_location", x, budget=4, mask=mask)
    assert sel.indices[0].tolist() == naive_facility_location(x[0], 4)
    assert sel.indices[1].tolist() == naive_facility_location(x[1, :10], 4)
    sel = tp.select("fastervlm", x, relevance=r, budget=12, mask=mask)
    assert sel.indices[1, :10].tolist() == list(range(10)) and sel.indices[1, 10:].tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------------
# Stage structure
# ------------------------------------------------------------------------------------------------


def _shape(m):
    return [(s.layer, s.budget.value) for s in m.stages]


def test_catalog_is_complete():
    assert EXPECTED <= set(tp.list_methods())


@pytest.mark.parametrize("T, want", [(64, [128, 64, 16]), (128, [256, 128, 32]), (32, [64, 32, 8]),
                                     (320, [640, 320, 80])])
def test_tops_llava_schedule(T, want):
    m = tp.create_method("tops", budget=T)
    assert _shape(m) == list(zip([None, 12, 24], want))
    assert [s.relevance for s in m.stages] == ["cls_attention", "text_attention", "text_attention"]
    assert all(s.positions == "compact" for s in m.stages)
    assert [s.layer_for_depth(40) for s in m.stages] == [None, 15, 30]  # LLaVA-1.5-13B
    assert [s.layer_for_depth(32) for s in m.stages] == [None, 12, 24]
    assert m.stages[0].objective.coverage_weight == 0.5 and m.stages[0].objective.diversity_weight == 0.5
    assert all(s.selector == tp.get_selector("greedy")() for s in m.stages)


@pytest.mark.parametrize("T, want", [(256, [512, 281, 77]), (128, [256, 139, 39]), (100, [200, 110, 30])])
def test_tops_qwen_schedule(T, want):
    m = tp.create_method("tops", budget=T, schedule="qwen2_5_vl")
    assert _shape(m) == list(zip([None, 12, 16], want))
    assert [s.layer_for_depth(28) for s in m.stages] == [None, 12, 16]


def test_tops_options_reach_the_stages():
    m = tp.create_method("tops", budget=64, coverage_weight=1.0, diversity_weight=0.25, normalize="mean",
                      stage1_weights=(0.4, 0.6), raters="all_text_mean", positions="preserve")
    o = [s.objective for s in m.stages]
    assert (o[0].coverage_weight, o[0].diversity_weight) == (0.4, 0.6)
    assert all((x.coverage_weight, x.diversity_weight, x.normalize) == (1.0, 0.25, "mean") for x in o[1:])
    assert all(s.raters == "all_text_mean" and s.positions == "preserve" for s in m.stages)


def test_tops_single_and_explicit_schedules():
    assert _shape(tp.create_method("tops", budget=50, schedule="single")) == [(None, 50)]
    m = tp.create_method("tops", schedule=[(None, 300), (2, 150), (20, 0.5)], reference_depth=32)
    assert _shape(m) == [(None, 300), (2, 150), (20, 0.5)]
    assert m.stages[1].reference_depth == 32 and m.stages[1].layer_for_depth(64) == 4
    assert tp.create_method("tops", schedule=[[5, 10]]).stages[0].reference_depth is None  # JSON-style lists


@pytest.mark.parametrize("T, want", [(0.25, [0.5, 0.5, 0.25]), (0.75, [1.0, 0.75, 0.25]), (1.0, [1.0, 1.0, 0.25])])
def test_tops_fraction_budgets_scale_and_cap(T, want):
    m = tp.create_method("tops", budget=T)
    assert [s.budget.value for s in m.stages] == pytest.approx(want)
    # absolute counts on 576 tokens: 2T, T, T/4 of the visual tokens (capped at all of them)
    n, counts = 576, []
    for s in m.stages:
        n = s.budget.resolve(n)
        counts.append(n)
    assert counts == [min(576, round(2 * T * 576)), round(T * 576), round(T * 576 / 4)]


@pytest.mark.parametrize("kw, err", [
    (dict(schedule="gemma"), StageError),
    (dict(schedule=[(None, 10), (4, 20)]), StageError),
    (dict(schedule=[(None, 10)], budget=5), StageError),
    (dict(schedule=[]), StageError),
    (dict(schedule=[(None, 10, 3)]), StageError),
    (dict(schedule=[(4, 10), (2, 5)]), StageError),
    (dict(schedule="llava", reference_depth=40), StageError),
    (dict(budget=0), BudgetError),
    (dict(budget=1.5), BudgetError),
    (dict(normalize="softmax"), ConfigError),
    (dict(stage1_weights=(0.5,)), ConfigError),
    (dict(raters="first_token"), StageError),
    (dict(positions="shuffle"), StageError),
])
def test_tops_rejects_bad_parameters(kw, err):
    with pytest.raises(err):
        tp.create_method("tops", **kw)


def test_tops_with_budget_rebuilds_the_schedule():
    m = tp.create_method("tops", budget=64, coverage_weight=1.0).with_budget(128)
    assert _shape(m) == [(None, 256), (12, 128), (24, 32)]
    assert m.stages[1].objective.coverage_weight == 1.0


def test_in_llm_methods_layers():
    assert _shape(tp.create_method("fastv")) == [(2, 64)]
    for name in ("fastv", "reverse_fastv", "window_fastv", "dart"):
        st = tp.create_method(name).stages[0]
        assert st.layer_for_depth(80) == 2 and st.reference_depth is None  # K = 2 absolute
    assert tp.create_method("dart").stages[0].relevance == "key_norm"
    pd = tp.create_method("pyramiddrop")
    assert _shape(pd) == [(8, 0.5), (16, 0.5), (24, 0.5)]
    assert [s.layer_for_depth(40) for s in pd.stages] == [10, 20, 30]
    assert all(s.relevance == "own_layer_attention" and s.raters == "last_token" and s.positions == "compact"
               for s in pd.stages)  # the official ranking: the stage layer's own attention, positions re-indexed
    prev = tp.create_method("pyramiddrop", rank_attention="previous_layer", positions="preserve")
    assert all(s.relevance == "text_attention" and s.positions == "preserve" for s in prev.stages)
    assert _shape(tp.create_method("pyramiddrop", budget=64, ratio=0.25)) == [(8, 64), (16, 0.25), (24, 0.25)]
    with pytest.raises(ConfigError):
        tp.create_method("pyramiddrop", ratio=2)
    with pytest.raises(StageError):
        tp.create_method("pyramiddrop", layers=(16, 8))


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "divprune", "cdpruner", "facility_location", "scope",
                                  "random", "pooling"])
def test_pre_llm_methods(name):
    m = tp.create_method(name, budget=10)
    assert _shape(m) == [(None, 10)]


def test_signal_sources():
    src = {n: tp.create_method(n).stages[0].relevance for n in EXPECTED}
    assert src["fastervlm"] == src["visionzip"] == src["scope"] == src["tops"] == "cls_attention"
    assert src["fastv"] == src["reverse_fastv"] == src["window_fastv"] == "text_attention"
    assert src["pyramiddrop"] == "own_layer_attention"
    assert src["cdpruner"] == "text_similarity"
    assert src["divprune"] is src["facility_location"] is src["random"] is src["pooling"] is None
    assert tp.create_method("cdpruner", quality=None).stages[0].relevance is None


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_method_docstrings_cite_the_paper(name):
    doc = tp.registry.methods.get(name).__doc__ or ""
    for section in ("Parameters", "Returns", "Raises", "Notes", "References", "Examples"):
        assert section in doc, f"{name}: docstring lacks {section}"
    assert "arXiv:" in doc or "Nemhauser" in doc, f"{name}: no paper reference"
    assert "ignal" in doc, f"{name}: does not say which signals it needs"


@pytest.mark.parametrize("name", BUILTIN_METHODS)
def test_budgets_and_fractions_work_for_every_method(name):
    x, r = _inputs(n=36, d=6, seed=11, batch=2)
    for budget in (5, 0.25):
        m = tp.create_method(name)
        sel = m.select(x, relevance=r, budget=budget, grid=(6, 6), text_embeddings=torch.randn(2, 3, 6),
                       text_relevance=torch.rand(2, 3))
        want = tp.Budget(budget).resolve(36)
        if getattr(m.stages[0].selector, "exact_budget", True):
            assert sel.counts.tolist() == [want, want]
        else:
            assert all(1 <= c <= want for c in sel.counts.tolist())


def test_criteria_of_the_catalog():
    ctx = tp.make_context(torch.randn(2, 10, 4), relevance=torch.rand(2, 10))
    pd = tp.get_criterion("pivot_dissimilarity")(num_pivots=3)
    s = pd.scores(ctx)
    assert bool((s >= 0).all()) and bool((s <= 4).all())
    assert int((s > 3).sum()) == 6  # three pivots per row score above any dissimilarity
    with pytest.raises(ValueError):
        tp.get_criterion("pivot_dissimilarity")(num_pivots=0)
    with pytest.raises(ValueError):
        tp.get_criterion("saliency_coverage")(alpha=-1)
    with pytest.raises(ValueError):
        tp.get_criterion("saliency_coverage")(combine="max")
    sc = tp.get_criterion("saliency_coverage")
    assert sc().tags.nonincreasing_gains and not sc().tags.exact_gains
    assert sc(combine="add").tags.submodular and sc(combine="add").tags.exact_gains


def test_scope_lazy_greedy_equals_plain_greedy():
    x, r = _inputs(n=40, d=8, seed=12, batch=2)
    ctx = tp.make_context(x, relevance=r)
    crit = tp.get_criterion("saliency_coverage")()
    lazy = tp.get_selector("greedy")(lazy=True).select(crit, ctx, 12)
    plain = tp.get_selector("greedy")().select(crit, ctx, 12)
    assert torch.equal(lazy.order, plain.order)


def test_naive_references_are_sane():
    """The references themselves: greedy's first pick is the best single token, the DPP's is the
    most relevant one, and the full budget keeps everything."""
    x, r = _inputs(n=6, seed=13)
    F = _cos(x[0])
    best = max(range(6), key=lambda i: (_facility_value(F, [i]), -i))
    assert naive_facility_location(x[0], 1) == [best]
    assert naive_dpp(x[0], r[0], 1) == [int(r[0].argmax())]
    assert naive_tops(x[0], r[0], 1, 0.5, 0.5) == [int(r[0].argmax())]
    for fn in (naive_facility_location, naive_max_min):
        assert fn(x[0], 6) == list(range(6))
    assert sorted(itertools.chain(naive_dart(x[0], r[0].tolist(), 6, 2))) == list(range(6))
