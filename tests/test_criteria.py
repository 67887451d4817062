"""Built-in criteria: exact gains, tags, fixed-point exactness, TOPS incremental == direct, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.criteria import (Coverage, Diversity, LogDet, Relevance, TOPSObjective, WeightedSum,
                                 criterion_from_config)
from tokenprune.criteria._kernels import fixed_point_scale, fixed_point_similarity
from tokenprune.errors import ConfigError, MissingSignalError
from tokenprune.selectors import Greedy

SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (slow on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@st.composite
def contexts(draw, max_n: int = 12, max_b: int = 3, dups: bool = True):
    """Small random contexts: padding, relevance, text embeddings, optional duplicated tokens."""
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(1, max_n))
    D = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) + draw(st.sampled_from([0.0, 0.5]))
    if dups and N > 2 and draw(st.booleans()):
        x[:, N - 1] = x[:, 0]  # an exact duplicate: ties in every criterion
    n_valid = [draw(st.integers(1, N)) for _ in range(B)]
    mask = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    rel = torch.rand(B, N, generator=g)
    text = torch.randn(B, 3, D, generator=g)
    return tp.make_context(x, mask=mask, relevance=rel, text_embeddings=text)


def chain(crit, ctx, picks: int, seed: int):
    """Random valid picks (same count in every row where possible); the states along the way."""
    g = torch.Generator().manual_seed(seed)
    B, N = ctx.mask.shape
    state = crit.prepare(ctx)
    chosen = torch.zeros(B, N, dtype=torch.bool)
    out = [(state, chosen.clone())]
    for _ in range(picks):
        cand = ctx.mask & ~chosen
        active = cand.any(1)
        keys = torch.rand(B, N, generator=g).masked_fill(~cand, -1.0)
        pick = keys.argmax(1)
        state = crit.update(ctx, state, pick, active)
        chosen[torch.arange(B)[active], pick[active]] = True
        out.append((state, chosen.clone()))
    return out


def exact_criteria():
    return [Relevance(), Relevance(source="text_similarity", reduce="mean"), Coverage(), LogDet(eps=1e-2),
            LogDet(quality="given", eps=1e-2), LogDet(quality="text_similarity", kernel="shifted", eps=1e-2),
            LogDet(quality="given", theta=0.5, eps=1e-2), 0.5 * Relevance() + 2.0 * Coverage()]


# ------------------------------------------------------------------------------------------------
# gains vs evaluate, tags
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crit", exact_criteria(), ids=lambda c: type(c).__name__)
@SETTINGS
@given(ctx=contexts(), picks=st.integers(0, 5), seed=st.integers(0, 100))
def test_gains_equal_evaluate_differences(crit, ctx, picks, seed):
    for state, chosen in chain(crit, ctx, picks, seed):
        cand = ctx.mask & ~chosen
        g = crit.gains(ctx, state, cand).double()
        base = crit.evaluate(ctx, chosen).double()
        for i in range(ctx.num_tokens):
            rows = cand[:, i]
            if not rows.any():
                continue
            plus = chosen.clone()
            plus[:, i] = True
            want = crit.evaluate(ctx, plus).double() - base
            scale = 1.0 + base.abs().max() + want.abs().max()
            tol = (2e-3 if isinstance(crit, LogDet) else 1e-5) * float(scale)
            assert torch.allclose(g[rows, i], want[rows], atol=tol, rtol=0), (i, g[rows, i], want[rows])


def test_coverage_gains_exact_in_fixed_point():
    """Gains are exact integers on the fixed-point grid: equal to evaluate differences bit for bit."""
    ctx = tp.make_context(torch.randn(2, 40, 6) + 0.3)
    crit = Coverage()
    fq, scale = fixed_point_similarity(ctx)
    for state, chosen in chain(crit, ctx, 7, 0):
        g = crit.gains(ctx, state, ctx.mask)
        for i in range(40):
            plus = chosen.clone()
            plus[:, i] = True
            best0 = fq.masked_fill(~chosen.unsqueeze(-1), 0).amax(1).long().sum(1)
            best1 = fq.masked_fill(~plus.unsqueeze(-1), 0).amax(1).long().sum(1)
            assert torch.equal(g[:, i].double() * scale, (best1 - best0).double())


def test_coverage_fixed_point_close_to_float():
    ctx = tp.make_context(torch.randn(1, 64, 16))
    F = ctx.similarity
    g = Coverage().gains(ctx, Coverage().prepare(ctx), ctx.mask)
    ref = F.clamp_min(0).sum(-1)
    assert float((g - ref).abs().max()) <= 64 * 0.5 / fixed_point_scale(64) + 1e-4
    assert fixed_point_scale(576) == 2.0 ** 15 and fixed_point_scale(100_000) < 2 ** 15


@pytest.mark.parametrize("crit", [Coverage(), LogDet(eps=1e-2), LogDet(quality="given", eps=1e-2), Diversity(),
                                  0.3 * Relevance() + Coverage()], ids=lambda c: type(c).__name__)
@SETTINGS
@given(ctx=contexts(), picks=st.integers(1, 6), seed=st.integers(0, 100))
def test_nonincreasing_gains(crit, ctx, picks, seed):
    """Submodular criteria (and the max-min diversity gain): gains never increase along a chain."""
    assert crit.tags.nonincreasing_gains
    states = chain(crit, ctx, picks, seed)
    g0 = crit.gains(ctx, states[0][0], ctx.mask).double()
    for state, chosen in states[1:]:
        g = crit.gains(ctx, state, ctx.mask).double()
        cand = ctx.mask & ~chosen
        tol = 1e-4 * (1 + float(g0.abs().max()))
        assert bool((g[cand] <= g0[cand] + tol).all())
        if crit.tags.monotone:
            assert bool((g[cand] >= -tol).all())
        g0 = g


def test_tags():
    assert Coverage().tags.monotone and Coverage().tags.submodular and Coverage().tags.exact_gains
    t = Diversity().tags
    assert not t.exact_gains and t.nonincreasing_gains and not t.submodular
    t = LogDet().tags
    assert t.submodular and not t.monotone and t.exact_gains and t.requires == frozenset()
    assert LogDet(quality="given").tags.requires == {"relevance"}
    assert LogDet(quality="text_similarity").tags.requires == {"text_embeddings"}
    assert Relevance(source="text_similarity").tags.requires == {"text_embeddings"}
    t = TOPSObjective().tags
    assert not t.exact_gains and not t.nonincreasing_gains and t.requires == {"relevance"}
    assert TOPSObjective(source="text_similarity").tags.requires == {"text_embeddings"}


@pytest.mark.parametrize("crit", exact_criteria() + [Diversity(), TOPSObjective(), TOPSObjective(normalize="none")],
                         ids=lambda c: type(c).__name__)
def test_gains_at_is_gather_of_gains(crit):
    """``gains_at`` equals the gathered full gains bit for bit (what lazy greedy relies on)."""
    g = torch.Generator().manual_seed(1)
    ctx = tp.make_context(torch.randn(3, 20, 5, generator=g), relevance=torch.rand(3, 20, generator=g),
                          text_embeddings=torch.randn(3, 2, 5, generator=g),
                          mask=torch.arange(20)[None] < torch.tensor([[20], [13], [7]]))
    for state, chosen in chain(crit, ctx, 4, 2):
        cand = ctx.mask & ~chosen
        idx = torch.randint(0, 20, (3, 6), generator=g)
        assert torch.equal(crit.gains_at(ctx, state, idx, cand), crit.gains(ctx, state, cand).float().gather(1, idx))


# ------------------------------------------------------------------------------------------------
# Diversity, LogDet specifics
# ------------------------------------------------------------------------------------------------


def test_diversity_gain_and_score():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    ctx = tp.make_context(x)
    d = Diversity()
    st0 = d.prepare(ctx)
    assert torch.equal(d.gains(ctx, st0, ctx.mask), torch.ones(1, 4))
    st1 = d.update(ctx, st0, torch.tensor([0]), torch.tensor([True]))
    g = d.gains(ctx, st1, ctx.mask)[0]
    assert torch.allclose(g, torch.tensor([0.0, 1.0, 1 - 2 ** -0.5, 1.0]), atol=1e-6)  # negative cos clipped to 0
    s = torch.tensor([[True, True, False, True]])
    # each member's distance to its nearest other member: 1 - max(0, cos) = 1, 1, 1
    assert torch.allclose(d.evaluate(ctx, s), torch.tensor([3.0]))
    assert torch.allclose(d.evaluate(ctx, torch.tensor([[True, False, False, False]])), torch.tensor([1.0]))
    assert torch.allclose(d.evaluate(ctx, torch.zeros(1, 4, dtype=torch.bool)), torch.tensor([0.0]))


def test_logdet_kernel_and_quality():
    g = torch.Generator().manual_seed(0)
    ctx = tp.make_context(torch.randn(2, 9, 4, generator=g), relevance=torch.rand(2, 9, generator=g))
    for crit in (LogDet(), LogDet(quality="given"), LogDet(kernel="shifted", quality="given", theta=0.3)):
        L = crit.kernel_matrix(ctx)
        assert torch.allclose(L, L.transpose(1, 2))
        assert float(torch.linalg.eigvalsh(L).min()) > 0  # positive definite thanks to eps I
        assert torch.equal(crit.evaluate(ctx, torch.zeros(2, 9, dtype=torch.bool)), torch.zeros(2))
        s = torch.zeros(2, 9, dtype=torch.bool)
        s[:, [1, 4, 6]] = True
        sub = L[:, [1, 4, 6]][:, :, [1, 4, 6]]
        assert torch.allclose(crit.evaluate(ctx, s).double(), torch.logdet(sub), atol=1e-5)
    q = LogDet(quality="given").quality_scores(ctx)
    r = ctx.relevance
    lo, hi = r.amin(1, keepdim=True), r.amax(1, keepdim=True)
    assert torch.allclose(q, (r - lo + 1e-6) / (hi - lo))  # CDPruner's min-max, 1e-6 added to the numerator
    q = LogDet(quality="given", normalize_quality=False).quality_scores(ctx)
    assert torch.equal(q, ctx.relevance)
    q = LogDet(quality="given", theta=0.5).quality_scores(ctx)
    assert torch.allclose(q.amax(1), torch.full((2,), math.exp(0.5)))


# ------------------------------------------------------------------------------------------------
# TOPS
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(ctx=contexts(max_n=24), k=st.integers(1, 24), norm=st.sampled_from(["minmax", "mean", "none"]),
       lam=st.sampled_from([0.0, 0.5, 1.0]), alpha=st.sampled_from([0.0, 0.5]))
def test_tops_incremental_equals_direct(ctx, k, norm, lam, alpha):
    """Exact: the incremental coverage gives bit-identical scores and selections (fixed-point sums)."""
    kw = dict(normalize=norm, coverage_weight=lam, diversity_weight=alpha)
    a = Greedy().select(TOPSObjective(**kw), ctx, k)
    b = Greedy().select(TOPSObjective(incremental=False, **kw), ctx, k)
    assert torch.equal(a.order, b.order) and torch.equal(a.gains, b.gains)


def test_tops_incremental_equals_direct_larger():
    """Enough tokens and picks for the sparse (changed-rows) update path to run many times."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 16, generator=g) + torch.randn(1, 1, 16, generator=g)
    x[:, 150:] = x[:, :150] + 0.05 * torch.randn(2, 150, 16, generator=g)  # near-duplicates
    ctx = tp.make_context(x, relevance=torch.rand(2, 300, generator=g),
                          mask=torch.arange(300)[None] < torch.tensor([[300], [211]]))
    for norm in ("minmax", "mean"):
        a = Greedy().select(TOPSObjective(normalize=norm), ctx, 120)
        b = Greedy().select(TOPSObjective(normalize=norm, incremental=False), ctx, 120)
        assert torch.equal(a.order, b.order) and torch.equal(a.gains, b.gains)


def test_tops_first_pick_is_most_relevant_then_covers():
    g = torch.Generator().manual_seed(0)
    ctx = tp.make_context(torch.randn(2, 30, 8, generator=g), relevance=torch.rand(2, 30, generator=g))
    crit = TOPSObjective()
    assert torch.equal(crit.gains(ctx, crit.prepare(ctx), ctx.mask), ctx.relevance)
    sel = Greedy().select(crit, ctx, 5)
    assert torch.equal(sel.order[:, 0], ctx.relevance.argmax(1))
    # with the normalised score, every later gain lies in [0, 1 + lambda + alpha]
    assert bool((sel.gains[:, 1:] >= 0).all()) and bool((sel.gains[:, 1:] <= 2.0 + 1e-6).all())


def test_tops_matches_formula_step_by_step():
    """The second pick maximises r~ + lam c~ + alpha d~ computed from scratch in float64."""
    g = torch.Generator().manual_seed(5)
    ctx = tp.make_context(torch.randn(1, 25, 6, generator=g), relevance=torch.rand(1, 25, generator=g))
    lam, alpha = 0.7, 0.4
    sel = Greedy().select(TOPSObjective(coverage_weight=lam, diversity_weight=alpha), ctx, 2)
    first = int(sel.order[0, 0])
    F = ctx.similarity[0].double()
    m = F[:, first]  # the paper's m_j(S) = max_{k in S} F_jk, not floored at 0
    U = torch.ones(25, dtype=torch.bool)
    U[first] = False
    c = ((F - m[:, None]).clamp_min(0) * U[:, None]).sum(0)  # c_i = sum_{j in U} max(0, F_ji - m_j)
    d = 1 - m

    def mm(v):
        v = v[U]
        return (v - v.min()) / (v.max() - v.min())

    score = mm(ctx.relevance[0].double()) + lam * mm(c) + alpha * mm(d)
    want = torch.arange(25)[U][score.argmax()]
    assert int(sel.order[0, 1]) == int(want)


def test_tops_needs_relevance():
    ctx = tp.make_context(torch.randn(1, 9, 4))
    with pytest.raises(MissingSignalError, match="relevance"):
        Greedy().select(TOPSObjective(), ctx, 3)
    ctx = tp.make_context(torch.randn(1, 9, 4), text_embeddings=torch.randn(1, 2, 4))
    assert Greedy().select(TOPSObjective(source="text_similarity"), ctx, 3).k == 3


# ------------------------------------------------------------------------------------------------
# dtypes, config, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("crit", [Coverage(), Diversity(), LogDet(quality="given"), TOPSObjective()],
                         ids=lambda c: type(c).__name__)
def test_low_precision_features(crit, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    r = torch.rand(2, 16, generator=g)
    a = tp.make_context(x, relevance=r)
    b = tp.make_context(x.to(dtype), relevance=r)
    ga = crit.gains(a, crit.prepare(a), a.mask)
    gb = crit.gains(b, crit.prepare(b), b.mask)
    assert gb.dtype == torch.float32 and torch.isfinite(gb).all()
    assert torch.allclose(ga, gb, atol=0.05 * (1 + float(ga.abs().max())), rtol=0)


@pytest.mark.parametrize("crit", exact_criteria() + [Diversity(), TOPSObjective(normalize="mean", incremental=False)],
                         ids=lambda c: type(c).__name__)
def test_config_round_trip(crit):
    again = criterion_from_config(crit.to_config())
    assert again == crit


@pytest.mark.parametrize("make", [
    lambda: LogDet(quality="bad"), lambda: LogDet(kernel="rbf"), lambda: LogDet(eps=0.0), lambda: LogDet(eps=-1),
    lambda: LogDet(theta=1.0), lambda: LogDet(reduce="sum"), lambda: TOPSObjective(coverage_weight=-0.1),
    lambda: TOPSObjective(diversity_weight=float("inf")), lambda: TOPSObjective(normalize="zscore"),
    lambda: TOPSObjective(source="attention"), lambda: Relevance(source="x")])
def test_bad_parameters(make):
    with pytest.raises(ValueError):
        make()


def test_missing_signals():
    ctx = tp.make_context(torch.randn(1, 9, 4))
    for crit in (LogDet(quality="given"), LogDet(quality="text_similarity"), Relevance(),
                 Relevance(source="text_similarity")):
        with pytest.raises(MissingSignalError):
            crit.prepare(ctx) if isinstance(crit, LogDet) else crit.check(ctx)
    with pytest.raises(ConfigError):
        criterion_from_config({"name": "log_det", "params": {"nope": 1}})


def test_registered_names():
    for name, cls in [("coverage", Coverage), ("facility_location", Coverage), ("diversity", Diversity),
                      ("log_det", LogDet), ("tops_objective", TOPSObjective), ("relevance", Relevance)]:
        assert tp.get_criterion(name) is cls
    assert isinstance(0.5 * Coverage() + Diversity(), WeightedSum)
