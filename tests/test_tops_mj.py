"""TOPS's max-similarity vector ``m_j``: the paper's ``max_{k in S} sim(h_j, h_k)`` (default) and the
variant floored at 0 (``clamp_m=True``), each against a literal float64 re-implementation."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.criteria import TOPSObjective
from tokenprune.errors import ParameterError
from tokenprune.selectors import Greedy


def _clustered(seed: int, n: int = 64, d: int = 16, batch: int = 1):
    """Clustered features whose cosine similarities go well below 0, and relevance in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g)
    x = centres[torch.randint(0, 8, (batch, n), generator=g)] + 0.8 * torch.randn(batch, n, d, generator=g)
    return x, torch.rand(batch, n, generator=g)


def _literal_tops(x, r, k, lam=0.5, alpha=0.5, clamp=False):
    """S1 = argmax r; then argmax over U of minmax(r) + lam minmax(c) + alpha minmax(d), with
    c_i = sum_{j in U} max(0, F_ji - m_j), d_i = 1 - m_i and m_j = max_{s in S} F_js (or max(0, .))."""
    F = tp.make_context(x[None]).similarity[0].double()
    r = r.double()
    n = F.shape[0]
    S = [int(torch.argmax(r))]
    while len(S) < k:
        U = torch.ones(n, dtype=torch.bool)
        U[S] = False
        m = F[:, S].amax(1)
        if clamp:
            m = m.clamp_min(0.0)
        c = ((F - m[:, None]).clamp_min(0.0) * U[:, None]).sum(0)
        d = 1.0 - m

        def mm(v):
            v = v[U]
            span = v.max() - v.min()
            return (v - v.min()) / span if span > 0 else torch.zeros_like(v)

        score = mm(r) + lam * mm(c) + alpha * mm(d)
        S.append(int(torch.arange(n)[U][torch.argmax(score)]))
    return sorted(S)


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_reading_matches_its_literal_definition(clamp, seed):
    x, r = _clustered(seed)
    assert float(tp.make_context(x).similarity.min()) < -0.3  # negative similarities: the readings can differ
    ctx = tp.make_context(x, relevance=r)
    for k in (2, 6, 12):
        got = Greedy().select(TOPSObjective(clamp_m=clamp), ctx, k).indices[0].tolist()
        assert got == _literal_tops(x[0], r[0], k, clamp=clamp)


def test_the_readings_differ_on_negative_similarities_and_agree_on_positive_ones():
    differ = 0
    for seed in range(6):
        x, r = _clustered(seed)
        ctx = tp.make_context(x, relevance=r)
        paper = Greedy().select(TOPSObjective(), ctx, 16).indices
        floored = Greedy().select(TOPSObjective(clamp_m=True), ctx, 16).indices
        differ += int(not torch.equal(paper, floored))
        pos = tp.make_context(x.abs() + 0.5, relevance=r)  # every cosine similarity positive
        assert torch.equal(Greedy().select(TOPSObjective(), pos, 16).indices,
                           Greedy().select(TOPSObjective(clamp_m=True), pos, 16).indices)
    assert differ >= 1


@pytest.mark.parametrize("clamp", [False, True])
def test_batched_incremental_and_direct_paths_agree(clamp):
    # B = 2 runs the batched torch loop, B = 1 on the CPU the NumPy fast path; incremental=False the
    # direct coverage; every path gives the same picks and gains
    x, r = _clustered(7, n=80, batch=2)
    ctx = tp.make_context(x, relevance=r)
    both = Greedy().select(TOPSObjective(clamp_m=clamp), ctx, 20)
    direct = Greedy().select(TOPSObjective(clamp_m=clamp, incremental=False), ctx, 20)
    assert torch.equal(both.order, direct.order) and torch.equal(both.gains, direct.gains)
    for b in range(2):
        one = Greedy().select(TOPSObjective(clamp_m=clamp), tp.make_context(x[b:b + 1], relevance=r[b:b + 1]), 20)
        assert torch.equal(one.order[0], both.order[b])
        assert torch.allclose(one.gains[0], both.gains[b], atol=1e-6)


def test_tops_method_passes_the_choice_to_every_stage():
    m = tp.create_method("tops", budget=16)
    assert all(s.objective.clamp_m is False for s in m.stages)
    m = tp.create_method("tops", budget=16, clamp_m=True)
    assert all(s.objective.clamp_m is True for s in m.stages)
    assert tp.from_config(m.to_config()) == m
    x, r = _clustered(3)
    want = _literal_tops(x[0], r[0], 16, clamp=True)
    assert m.select(x, relevance=r, budget=16, stage=1).indices[0].tolist() == want


def test_evaluate_uses_the_unfloored_similarities():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0]])[None]
    r = torch.tensor([[0.5, 0.2, 0.1]])
    ctx = tp.make_context(x, relevance=r)
    F = ctx.similarity[0]
    crit = TOPSObjective(coverage_weight=1.0, diversity_weight=1.0)
    s = torch.tensor([[True, True, False]])
    # coverage: sum_j max(F_j0, F_j1); diversity: (1 - F_01) + (1 - F_10)
    cov = sum(max(float(F[j, 0]), float(F[j, 1])) for j in range(3))
    div = 2.0 - float(F[0, 1]) - float(F[1, 0])
    assert float(crit.evaluate(ctx, s)[0]) == pytest.approx(0.7 + cov + div, abs=1e-3)
    floored = TOPSObjective(coverage_weight=1.0, diversity_weight=1.0, clamp_m=True)
    assert float(floored.evaluate(ctx, s)[0]) < float(crit.evaluate(ctx, s)[0])  # F_01 < 0 is floored


def test_clamp_m_must_be_a_bool():
    with pytest.raises(ParameterError, match="clamp_m"):
        TOPSObjective(clamp_m=1)
