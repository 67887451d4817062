"""Built-in selectors: selection invariants, agreement with reference algorithms, seeds, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.criteria import Coverage, Diversity, LogDet, Relevance, TOPSObjective
from tokenprune.errors import BudgetError, IncompatibleComponentsError, MissingSignalError
from tokenprune.selectors import (DPPMap, FacilityLocationGreedy, Greedy, MaxMin, Pooling, Random, TopK,
                                  WindowTopK, selector_from_config)
from tokenprune.selectors.spatial import pooled_shape

SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (slow on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (label, selector, objective factory): every built-in selector with a natural objective
CASES = [
    ("greedy-coverage", Greedy(), Coverage),
    ("greedy-lazy-coverage", Greedy(lazy=True), Coverage),
    ("greedy-stochastic", Greedy(stochastic=0.2), Coverage),
    ("greedy-tops", Greedy(), TOPSObjective),
    ("greedy-lazy-diversity", Greedy(lazy=True), Diversity),
    ("greedy-logdet", Greedy(), lambda: LogDet(quality="given")),
    ("facility_location_greedy", FacilityLocationGreedy(), Coverage),
    ("facility_location_greedy-dense", FacilityLocationGreedy(lazy=False), Coverage),
    ("dpp_map", DPPMap(), lambda: LogDet(quality="given")),
    ("max_min", MaxMin(), lambda: None),
    ("topk", TopK(), Relevance),
    ("topk-reverse", TopK(largest=False), Relevance),
    ("random", Random(), lambda: None),
    ("pooling", Pooling(), lambda: None),
    ("window_topk", WindowTopK(windows=2), Relevance),
]
DETERMINISTIC = [c for c in CASES if c[0] not in ("random", "greedy-stochastic")]


@st.composite
def contexts(draw, max_side: int = 6, max_b: int = 3):
    """Random contexts on a grid (so spatial selectors run), with padding and relevance."""
    B = draw(st.integers(1, max_b))
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    N = rows * cols
    D = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.randn(B, N, D, generator=g) + draw(st.sampled_from([0.0, 1.0]))
    n_valid = [draw(st.integers(1, N)) for _ in range(B)]
    mask = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    return tp.make_context(x, mask=mask, relevance=torch.rand(B, N, generator=g), grid=(rows, cols),
                           seed=draw(st.integers(0, 100)))


def check_selection(sel, ctx, budget, exact=True):
    B, N = ctx.mask.shape
    want = tp.Budget(budget).resolve_batch(ctx.n_valid)
    counts = sel.valid.sum(1)
    if exact:
        assert torch.equal(counts, want), (counts, want)
    else:
        assert bool((counts >= 1).all()) and bool((counts <= want).all())
    for b in range(B):
        c = int(counts[b])
        assert bool(sel.valid[b, :c].all()) and not bool(sel.valid[b, c:].any())  # valid is a prefix
        row = sel.indices[b, :c]
        assert bool((row >= 0).all()) and bool((row < N).all())
        assert bool((row[1:] > row[:-1]).all())  # sorted, unique
        assert bool(ctx.mask[b, row].all())  # never padding
        assert sorted(sel.order[b, :c].tolist()) == row.tolist()
        assert bool((sel.indices[b, c:] == -1).all())


def row_context(ctx, b):
    return tp.make_context(ctx.features[b:b + 1], mask=ctx.mask[b:b + 1], relevance=ctx.relevance[b:b + 1],
                           grid=ctx.grid, seed=ctx.seed)


# ------------------------------------------------------------------------------------------------
# invariants for every selector
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,selector,objective", CASES, ids=[c[0] for c in CASES])
@SETTINGS
@given(ctx=contexts(), budget=st.one_of(st.integers(1, 40), st.floats(0.05, 1.0)))
def test_selection_invariants(label, selector, objective, ctx, budget):
    sel = selector.select(objective(), ctx, budget)
    check_selection(sel, ctx, budget, exact=selector.exact_budget)
    assert sel.gains.dtype == torch.float32 and torch.isfinite(sel.gains[sel.valid]).all()


@pytest.mark.parametrize("label,selector,objective", DETERMINISTIC, ids=[c[0] for c in DETERMINISTIC])
@SETTINGS
@given(ctx=contexts(), budget=st.integers(1, 40))
def test_batched_equals_per_sample(label, selector, objective, ctx, budget):
    """Rows are independent; for B = 1 on the CPU this also compares the NumPy loops with the batched
    torch code (facility location, DPP, max-min)."""
    full = selector.select(objective(), ctx, budget)
    for b in range(ctx.batch_size):
        one = selector.select(objective(), row_context(ctx, b), budget)
        c = int(one.valid.sum())
        assert int(full.valid[b].sum()) == c
        if label in ("dpp_map", "greedy-logdet"):  # float Cholesky: allow near-ties to flip, and compare
            c = min(c, ctx.features.shape[-1] - 1)  # only within the feature rank (beyond it: eps-level noise)
            assert_same_picks_up_to_ties(one.order[0, :c], full.order[b, :c], LogDet(quality="given"),
                                         row_context(ctx, b))
            continue
        assert torch.equal(full.order[b, :c], one.order[0, :c]), (full.order[b], one.order[0])
        assert torch.allclose(full.gains[b, :c], one.gains[0, :c], rtol=1e-5, atol=1e-5)
        if one.features is not None:
            assert torch.allclose(full.features[b, :c], one.features[0, :c], atol=1e-6)


@pytest.mark.parametrize("label,selector,objective",
                         [c for c in DETERMINISTIC if c[0] not in ("pooling", "window_topk", "greedy-tops")],
                         ids=lambda x: x if isinstance(x, str) else "")
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(2, 30), k=st.integers(1, 30))
def test_permutation_equivariance(label, selector, objective, seed, n, k):
    """Permuting the tokens permutes the picks, up to ties: ties go to the lowest index, so at the first
    difference both picks must have the same gain (coverage has exact structural ties, e.g. tokens
    that cover only themselves), and the GEMM may round permuted rows differently in the last bit."""
    g = torch.Generator().manual_seed(seed)
    x, r = torch.randn(1, n, 8, generator=g), torch.rand(1, n, generator=g)
    perm = torch.randperm(n, generator=g)
    a = selector.select(objective(), tp.make_context(x, relevance=r), k)
    b = selector.select(objective(), tp.make_context(x[:, perm], relevance=r[:, perm]), k)
    if label in ("dpp_map", "greedy-logdet") and k > 8:  # beyond the feature rank the DPP picks noise
        return
    pa, pb = a.order[0].tolist(), perm[b.order[0]].tolist()
    for t in range(len(pa)):
        if pa[t] != pb[t]:
            ga, gb = float(a.gains[0, t]), float(b.gains[0, t])
            assert abs(ga - gb) <= 1e-4 * (1 + abs(ga)), (t, pa, pb, ga, gb)
            break
    else:
        assert torch.allclose(a.gains, b.gains, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("selector", [Greedy(), FacilityLocationGreedy(), DPPMap(), MaxMin(), TopK()],
                         ids=lambda s: type(s).__name__)
def test_prefix_property(selector):
    g = torch.Generator().manual_seed(0)
    ctx = tp.make_context(torch.randn(2, 40, 16, generator=g), relevance=torch.rand(2, 40, generator=g))
    obj = {DPPMap: LogDet(), MaxMin: None, TopK: Relevance()}.get(type(selector), Coverage())
    big = selector.select(obj, ctx, 12)
    for k in (1, 5, 11):
        assert torch.equal(selector.select(obj, ctx, k).order, big.order[:, :k])


@pytest.mark.parametrize("label,selector,objective", CASES, ids=[c[0] for c in CASES])
def test_keep_everything(label, selector, objective):
    ctx = tp.make_context(torch.randn(2, 16, 4), relevance=torch.rand(2, 16),
                          mask=torch.arange(16)[None] < torch.tensor([[16], [9]]))
    sel = selector.select(objective(), ctx, 16)
    if selector.exact_budget:
        assert torch.equal(sel.indices[0], torch.arange(16))
        assert torch.equal(sel.indices[1, :9], torch.arange(9))
    else:
        check_selection(sel, ctx, 16, exact=False)


@pytest.mark.parametrize("label,selector,objective", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features(label, selector, objective, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 8, generator=g)
    ctx = tp.make_context(x.to(dtype), relevance=torch.rand(2, 36, generator=g), grid=(6, 6))
    sel = selector.select(objective(), ctx, 7)
    check_selection(sel, ctx, 7, exact=selector.exact_budget)
    if sel.features is not None:
        assert sel.features.dtype == dtype


# ------------------------------------------------------------------------------------------------
# agreement with reference algorithms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [Coverage(), 0.5 * Relevance() + Coverage(), Diversity(), LogDet(quality="given"),
                                       Relevance()], ids=lambda c: type(c).__name__)
@SETTINGS
@given(ctx=contexts(), budget=st.integers(1, 40))
def test_lazy_greedy_equals_plain_greedy(objective, ctx, budget):
    """Exact, ties included: same picks and gains (stale gains are upper bounds)."""
    a = Greedy().select(objective, ctx, budget)
    b = Greedy(lazy=True).select(objective, ctx, budget)
    assert torch.equal(a.order, b.order) and torch.equal(a.gains, b.gains)


@SETTINGS
@given(ctx=contexts(), budget=st.integers(1, 40), dup=st.booleans())
def test_facility_location_greedy_equals_greedy(ctx, budget, dup):
    """Exact, ties included, for the NumPy (B = 1), batched-lazy and dense paths."""
    if dup:  # duplicated tokens: exact ties everywhere
        x = ctx.features.clone()
        x[:, 1::2] = x[:, ::2][:, : x[:, 1::2].shape[1]]
        ctx = tp.make_context(x, mask=ctx.mask)
    ref = Greedy().select(Coverage(), ctx, budget)
    for sel in (FacilityLocationGreedy(), FacilityLocationGreedy(lazy=False)):
        out = sel.select(Coverage(), ctx, budget)
        assert torch.equal(out.order, ref.order) and torch.equal(out.gains, ref.gains)
    for b in range(ctx.batch_size):
        one = FacilityLocationGreedy().select(Coverage(), row_context(ctx, b) if not dup else
                                              tp.make_context(ctx.features[b:b + 1], mask=ctx.mask[b:b + 1]), budget)
        c = int(one.valid.sum())
        assert torch.equal(one.order[0, :c], ref.order[b, :c])


def test_facility_location_greedy_larger():
    """Enough tokens for several lazy rounds per step, in both the NumPy and the batched path."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 32, generator=g)
    x = base[torch.randint(0, 12, (2, 400), generator=g)] + 0.6 * torch.randn(2, 400, 32, generator=g) + 0.5
    ctx = tp.make_context(x, mask=torch.arange(400)[None] < torch.tensor([[400], [333]]))
    ref = Greedy().select(Coverage(), ctx, 90)
    assert torch.equal(FacilityLocationGreedy().select(Coverage(), ctx, 90).order, ref.order)
    for b in range(2):
        one = FacilityLocationGreedy().select(Coverage(), tp.make_context(x[b:b + 1], mask=ctx.mask[b:b + 1]), 90)
        assert torch.equal(one.order[0], ref.order[b]) and torch.equal(one.gains[0], ref.gains[b])


def assert_same_picks_up_to_ties(a, b, objective, ctx, rel_tol=1e-4):
    """``a`` and ``b`` (long [k]) agree, except that from the first difference on, both picks must have
    had (nearly) the same exact gain, computed from scratch in float64 with ``evaluate``."""
    a, b = a.tolist(), b.tolist()
    for t, (x, y) in enumerate(zip(a, b)):
        if x == y:
            continue
        chosen = torch.zeros(1, ctx.num_tokens, dtype=torch.bool)
        chosen[0, a[:t]] = True
        base = float(objective.evaluate(ctx, chosen))

        def gain(i):
            s = chosen.clone()
            s[0, i] = True
            return float(objective.evaluate(ctx, s)) - base

        gx, gy = gain(x), gain(y)
        assert abs(gx - gy) <= rel_tol * (1 + abs(gx)), (t, x, y, gx, gy)
        return


def naive_logdet_greedy(objective, ctx, k):
    """Greedy on ``log det(L_S)`` computed from scratch (float64 slogdet) at every step."""
    L = objective.kernel_matrix(ctx)[0]
    chosen = []
    for _ in range(k):
        best, arg = -float("inf"), None
        for i in range(ctx.num_tokens):
            if i in chosen or not bool(ctx.mask[0, i]):
                continue
            idx = chosen + [i]
            v = float(torch.linalg.slogdet(L[idx][:, idx])[1])
            if v > best:
                best, arg = v, i
        chosen.append(arg)
    return torch.tensor(chosen)


@pytest.mark.parametrize("objective", [LogDet(), LogDet(quality="given"), LogDet(kernel="shifted"),
                                       LogDet(quality="given", theta=0.6)],
                         ids=["plain", "quality", "shifted", "theta"])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 14), extra=st.integers(0, 8), B=st.integers(1, 2))
def test_dpp_map_equals_naive_logdet_greedy(objective, seed, n, extra, B):
    """Small, well-conditioned cases (feature dim > budget): DPPMap == Greedy(LogDet) == naive greedy."""
    g = torch.Generator().manual_seed(seed)
    D = n + extra + 1
    ctx = tp.make_context(torch.randn(B, n, D, generator=g), relevance=torch.rand(B, n, generator=g))
    k = max(1, min(n, D - 1))
    fast = DPPMap().select(objective, ctx, k)
    greedy = Greedy().select(objective, ctx, k)
    for b in range(B):
        one = tp.make_context(ctx.features[b:b + 1], relevance=ctx.relevance[b:b + 1])
        ref = naive_logdet_greedy(objective, one, k)
        assert_same_picks_up_to_ties(fast.order[b], ref, objective, one)
        assert_same_picks_up_to_ties(greedy.order[b], ref, objective, one)
        # the running sum of gains is log det of the kept set
        s = torch.zeros(1, n, dtype=torch.bool)
        s[0, fast.order[b]] = True
        assert abs(float(fast.gains[b].sum()) - float(objective.evaluate(one, s))) < 1e-3 * (1 + k)


def naive_divprune(F, mask, k):
    """DivPrune's loop in similarity space: recompute max similarity to S over the kept rows each step."""
    valid = torch.nonzero(mask).squeeze(1).tolist()
    G = F.clone()
    G.fill_diagonal_(-float("inf"))
    nn = G[valid][:, valid].amax(1) if len(valid) > 1 else torch.full((1,), -float("inf"))
    order = [valid[int(nn.clamp_min(-1).argmin())]]
    for _ in range(1, k):
        rest = [i for i in valid if i not in order]
        ms = F[rest][:, order].amax(1)
        order.append(rest[int(ms.argmin())])
    return order


@SETTINGS
@given(ctx=contexts(), budget=st.integers(1, 40))
def test_max_min_equals_divprune(ctx, budget):
    sel = MaxMin().select(None, ctx, budget)
    for b in range(ctx.batch_size):
        c = int(sel.valid[b].sum())
        assert sel.order[b, :c].tolist() == naive_divprune(ctx.similarity[b], ctx.mask[b], c)
        # gains: cosine distance of each pick to the set before it
        F = ctx.similarity[b]
        o = sel.order[b, :c]
        for t in range(1, c):
            assert abs(float(sel.gains[b, t]) - float(1 - F[o[t], o[:t]].max())) < 1e-6


def test_stochastic_greedy():
    g = torch.Generator().manual_seed(0)
    ctx = tp.make_context(torch.randn(2, 50, 8, generator=g), seed=3)
    a = Greedy(stochastic=0.1).select(Coverage(), ctx, 10)
    assert torch.equal(a.order, Greedy(stochastic=0.1).select(Coverage(), ctx, 10).order)  # seeded
    other = tp.make_context(ctx.features, seed=4)
    assert not torch.equal(a.order, Greedy(stochastic=0.1).select(Coverage(), other, 10).order)
    # a tiny epsilon samples every candidate: plain greedy
    assert torch.equal(Greedy(stochastic=1e-30).select(Coverage(), ctx, 10).order,
                       Greedy().select(Coverage(), ctx, 10).order)
    # approximation: within (1 - 1/e - eps) of greedy on this monotone submodular objective
    s = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, a.order, True)
    s0 = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, Greedy().select(Coverage(), ctx, 10).order, True)
    assert bool((Coverage().evaluate(ctx, s) >= 0.5 * Coverage().evaluate(ctx, s0)).all())


# ------------------------------------------------------------------------------------------------
# random, pooling, windowed top-k
# ------------------------------------------------------------------------------------------------


def test_random_seeding():
    ctx = tp.make_context(torch.randn(3, 50, 4), seed=11)
    a = Random().select(None, ctx, 10)
    assert torch.equal(a.indices, Random().select(None, ctx, 10).indices)
    assert torch.equal(a.indices, Random(seed=11).select(None, tp.make_context(ctx.features), 10).indices)
    assert not torch.equal(a.indices, Random(seed=12).select(None, ctx, 10).indices)
    counts = torch.zeros(50)
    for s in range(200):
        counts += Random(seed=s).select(None, ctx, 10).keep_mask(50)[0]
    assert float(counts.min()) > 15 and float(counts.max()) < 65  # ~40 each: uniform


def test_pooling_rule_and_window_means():
    assert [pooled_shape(k, 24, 24) for k in (64, 144, 192, 100, 1, 576)] == \
        [(8, 8), (12, 12), (12, 16), (10, 10), (1, 1), (24, 24)]
    assert pooled_shape(60, 48, 60) == (6, 10) and pooled_shape(7, 6, 6) == (2, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7 * 5, 3, generator=g)
    ctx = tp.make_context(x, grid=(7, 5))
    sel = Pooling().select(None, ctx, 6)  # 3 x 2 windows: rows [0,3) [3,5) [5,7), cols [0,3) [3,5)
    assert sel.k == 6
    rows, cols = [(0, 3), (3, 5), (5, 7)], [(0, 3), (3, 5)]
    want_idx, want_feat = [], []
    for r0, r1 in rows:
        for c0, c1 in cols:
            cy, cx = (r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2
            want_idx.append(cy * 5 + cx)
            want_feat.append(x.view(2, 7, 5, 3)[:, r0:r1, c0:c1].mean((1, 2)))
    assert sel.indices[0].tolist() == want_idx
    assert torch.allclose(sel.features, torch.stack(want_feat, 1), atol=1e-6)
    assert sel.gains[0].tolist() == [9.0, 6.0, 6.0, 4.0, 6.0, 4.0]  # tokens averaged per window


def test_pooling_with_padding_and_square_inference():
    x = torch.randn(2, 16, 3)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 8:] = False  # bottom half of a 4 x 4 grid is padding
    ctx = tp.make_context(x, mask=mask)  # grid inferred as 4 x 4
    sel = Pooling().select(None, ctx, 4)
    assert sel.indices[0].tolist() == [0, 2, 8, 10]
    # row 1: budget round(4) but only the two top windows hold valid tokens
    assert sel.indices[1, :2].tolist() == [0, 2] and not bool(sel.valid[1, 2:].any())
    assert torch.allclose(sel.features[1, 0], x[1, [0, 1, 4, 5]].mean(0), atol=1e-6)


def test_window_topk_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(1, 36, generator=g)
    ctx = tp.make_context(torch.randn(1, 36, 4, generator=g), relevance=r, grid=(6, 6))
    sel = WindowTopK(windows=(2, 3)).select(Relevance(), ctx, 12)  # 6 windows of 3 x 2 tokens, 2 each
    want = []
    for wr in range(2):
        for wc in range(3):
            idx = [(wr * 3 + y) * 6 + wc * 2 + x for y in range(3) for x in range(2)]
            top = sorted(idx, key=lambda i: (-float(r[0, i]), i))[:2]
            want += top
    assert sel.indices[0].tolist() == sorted(want)
    assert sel.gains[0].tolist() == sorted(sel.gains[0].tolist(), reverse=True)  # order: best first
    # 7 tokens over 6 equal windows: the extra token goes to the window with the best second token
    sel = WindowTopK(windows=(2, 3)).select(Relevance(), ctx, 7)
    assert sel.indices[0].tolist() == _window_brute_force(r[0], _windows_of(6, 6, 2, 3), 7)
    # 4 tokens over 6 windows: the four windows with the best tokens, wherever they are
    sel = WindowTopK(windows=(2, 3)).select(Relevance(), ctx, 4)
    best = sorted(_windows_of(6, 6, 2, 3), key=lambda w: -max(float(r[0, i]) for i in w))[:4]
    assert sel.indices[0].tolist() == sorted(max(w, key=lambda i: float(r[0, i])) for w in best)


def _windows_of(rows, cols, wr, wc):
    """Token indices of each window of an evenly divisible ``rows x cols`` grid, in raster order."""
    h, w = rows // wr, cols // wc
    return [[(a * h + y) * cols + b * w + x for y in range(h) for x in range(w)] for a in range(wr) for b in range(wc)]


def _window_brute_force(score, windows, k):
    """Windowed top-k by its definition: largest-remainder seats, equal remainders to the window whose
    next token scores highest, then the lower window; each window keeps its best tokens."""
    n = sum(len(w) for w in windows)
    ranked = [sorted(w, key=lambda i: (-float(score[i]), i)) for w in windows]
    quota = [k * len(w) // n for w in windows]
    def nxt(j):
        return float(score[ranked[j][quota[j]]]) if quota[j] < len(ranked[j]) else float("-inf")
    seats = sorted(range(len(windows)), key=lambda j: (-(k * len(windows[j]) % n), -nxt(j), j))
    for j in seats[: k - sum(quota)]:
        quota[j] += 1
    return sorted(i for j in range(len(windows)) for i in ranked[j][: quota[j]])


def _two_grids(perm_seed=0):
    """Tokens of a 4 x 4 grid (image 0) and a 3 x 5 grid (image 0, crop 1; rows 2..4, cols 1..5 of its
    crop, as after unpadding), shuffled, plus two padding tokens; returns features, mask, coords and
    each grid's token positions in raster order."""
    g = torch.Generator().manual_seed(perm_seed)
    a = [(0, 0, y, x) for y in range(4) for x in range(4)]
    b = [(0, 1, y + 2, x + 1) for y in range(3) for x in range(5)]
    rows = a + b + [(-1, -1, -1, -1)] * 2
    perm = torch.randperm(len(rows), generator=g)
    coords = torch.tensor([rows[i] for i in perm.tolist()], dtype=torch.float32)[None]
    mask = (coords[..., 2] >= 0)
    x = torch.randn(1, len(rows), 5, generator=g)
    where = {tuple(int(v) for v in coords[0, i]): i for i in range(len(rows))}
    return x, mask, coords, [where[t] for t in a], [where[t] for t in b]


@pytest.mark.parametrize("k", [4, 9, 12, 31])
def test_pooling_over_several_grids_pools_each_grid_with_its_share(k):
    """With the adapters' 'coords' signal, each (image, crop) is pooled as its own grid, the budget split
    over grids in proportion to their tokens; exactly the per-grid pooling of each grid alone."""
    x, mask, coords, ia, ib = _two_grids()
    ctx = tp.make_context(x, mask=mask, coords=coords)
    sel = Pooling().select(None, ctx, k)
    ka, kb = k * 16 // 31, k * 15 // 31  # largest remainder, ties to the first grid
    if ka + kb < k:
        ka, kb = (ka + 1, kb) if (k * 16) % 31 >= (k * 15) % 31 else (ka, kb + 1)
    want_idx, want_feat = [], {}
    for idx, (r, c), kk in ((ia, (4, 4), ka), (ib, (3, 5), kb)):
        if kk == 0:
            continue
        part = Pooling().select(None, tp.make_context(x[:, idx], grid=(r, c)), kk)
        want_idx += [idx[i] for i in part.order[0][part.valid[0]].tolist()]
        want_feat.update({idx[i]: f for i, f in zip(part.indices[0][part.valid[0]].tolist(),
                                                     part.features[0][part.valid[0]])})
    assert sel.order[0][sel.valid[0]].tolist() == want_idx  # window order: grid by grid, raster inside each
    for i, f in zip(sel.indices[0][sel.valid[0]].tolist(), sel.features[0][sel.valid[0]]):
        torch.testing.assert_close(f, want_feat[i], atol=1e-6, rtol=1e-6)  # window means (summation order)
    assert not bool(mask[0, sel.indices[0][sel.valid[0]]].logical_not().any())


def test_window_topk_over_several_grids_matches_per_window_brute_force():
    x, mask, coords, ia, ib = _two_grids(3)
    r = torch.rand(1, x.shape[1], generator=torch.Generator().manual_seed(4))
    ctx = tp.make_context(x, mask=mask, coords=coords, relevance=r)
    sel = WindowTopK(windows=2).select(Relevance(), ctx, 14)
    # windows: 2 x 2 over the 4 x 4 grid (4 tokens each), 2 x 2 over the 3 x 5 grid (rows {0,1},{2};
    # cols {0,1,2},{3,4}: 6, 4, 3 and 2 tokens); 14 of 31 tokens apportioned by size
    def window(idx, rows, cols, y0, y1, x0, x1):
        return [idx[y * cols + xx] for y in range(y0, y1) for xx in range(x0, x1)]
    wins = [window(ia, 4, 4, y0, y0 + 2, x0, x0 + 2) for y0 in (0, 2) for x0 in (0, 2)]
    wins += [window(ib, 3, 5, y0, y1, x0, x1) for y0, y1 in ((0, 2), (2, 3)) for x0, x1 in ((0, 3), (3, 5))]
    assert sel.indices[0].tolist() == _window_brute_force(r[0], wins, 14)


def test_spatial_selectors_need_coordinates_for_every_candidate():
    x, mask, coords, _, _ = _two_grids()
    coords[0, int(mask[0].nonzero()[0]), 2:] = -1  # a valid token without a position (a newline token)
    ctx = tp.make_context(x, mask=mask, coords=coords, relevance=torch.rand(1, x.shape[1]))
    for selector, objective in ((Pooling(), None), (WindowTopK(), Relevance())):
        with pytest.raises(MissingSignalError, match="coordinates"):
            selector.select(objective, ctx, 4)


# ------------------------------------------------------------------------------------------------
# errors and configs
# ------------------------------------------------------------------------------------------------


def test_incompatible_objectives():
    ctx = tp.make_context(torch.randn(1, 9, 4), relevance=torch.rand(1, 9))
    cases = [(DPPMap(), Coverage()), (DPPMap(), None), (FacilityLocationGreedy(), LogDet()),
             (FacilityLocationGreedy(), 0.5 * Coverage()), (MaxMin(), Coverage()), (Greedy(), None),
             (Greedy(lazy=True), TOPSObjective()),
             (Greedy(lazy=True), tp.criteria.WeightedSum.of([(1.0, Coverage())], normalize="minmax"))]
    for selector, objective in cases:
        with pytest.raises(IncompatibleComponentsError):
            selector.select(objective, ctx, 3)
    with pytest.raises(IncompatibleComponentsError):
        tp.compose(TOPSObjective(), selector=Greedy(lazy=True), budget=3)  # caught when composing
    assert MaxMin().select(Diversity(), ctx, 3).k == 3  # Diversity is accepted (and not read)


def test_missing_grid_and_bad_parameters():
    ctx = tp.make_context(torch.randn(1, 10, 4), relevance=torch.rand(1, 10))
    for selector, objective in ((Pooling(), None), (WindowTopK(), Relevance())):
        with pytest.raises(MissingSignalError, match="grid"):
            selector.select(objective, ctx, 3)
    for make in (lambda: Greedy(stochastic=0.0), lambda: Greedy(stochastic=1.0), lambda: Greedy(stochastic="x"),
                 lambda: Greedy(lazy=True, stochastic=0.1), lambda: Greedy(lazy=1), lambda: Random(seed=1.5),
                 lambda: WindowTopK(windows=0), lambda: WindowTopK(windows=(2, 0)), lambda: WindowTopK(windows="a")):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(BudgetError):
        Greedy().select(Coverage(), ctx, 0)


@pytest.mark.parametrize("selector", [c[1] for c in CASES] + [WindowTopK(windows=(3, 2))],
                         ids=[c[0] for c in CASES] + ["window_topk-pair"])
def test_selector_config_round_trip(selector):
    assert selector_from_config(selector.to_config()) == selector


def test_registered_names():
    for name, cls in [("greedy", Greedy), ("dpp_map", DPPMap), ("facility_location_greedy", FacilityLocationGreedy),
                      ("max_min", MaxMin), ("topk", TopK), ("random", Random), ("pooling", Pooling),
                      ("window_topk", WindowTopK)]:
        assert tp.get_selector(name) is cls
