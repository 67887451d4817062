"""Tests of the sample plugin: registration through the entry point, exact values, and the public
conformance suite of tokenprune."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.errors import ConfigError, MissingSignalError
from tokenprune_spatial import SpatialCoverage, coverage_matrix


def ctx_for(rows, cols, batch=1, mask=None, relevance=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, rows * cols, 8, generator=g)
    return tp.make_context(feats, grid=(rows, cols), mask=mask, relevance=relevance)


# -- registration -------------------------------------------------------------------------------------

def test_registered_through_entry_point():
    assert "spatial_coverage" in tp.list_criteria()
    assert tp.get_criterion("spatial_coverage") is SpatialCoverage
    entry = tp.registry.criteria.entry("spatial_coverage")
    assert entry.source == "tokenprune-spatial"
    assert entry.version is not None


def test_config_round_trip():
    method = tp.compose(SpatialCoverage(radius=2, connectivity=8), selector="greedy", budget=5)
    cfg = method.to_config()
    assert cfg["stages"][0]["objective"] == {"name": "spatial_coverage",
                                             "params": {"radius": 2, "connectivity": 8, "weight": "uniform"}}
    assert tp.from_config(cfg) == method


# -- the cover matrix ----------------------------------------------------------------------------------

@pytest.mark.parametrize("connectivity, dist", [(4, lambda dr, dc: dr + dc), (8, max)])
@pytest.mark.parametrize("rows, cols, radius", [(1, 1, 0), (3, 4, 1), (5, 5, 2), (2, 7, 3)])
def test_cover_matrix_is_the_grid_metric_ball(rows, cols, radius, connectivity, dist):
    cover = coverage_matrix(rows, cols, radius, connectivity)
    assert cover.dtype == torch.bool and cover.shape == (rows * cols, rows * cols)
    for i, j in itertools.product(range(rows * cols), repeat=2):
        d = dist(abs(i // cols - j // cols), abs(i % cols - j % cols))
        assert bool(cover[i, j]) == (d <= radius)


# -- exact values ------------------------------------------------------------------------------------------

def test_centre_of_3x3_covers_plus_or_square():
    ctx = ctx_for(3, 3)
    centre = torch.zeros(1, 9, dtype=torch.bool)
    centre[0, 4] = True
    assert SpatialCoverage(radius=1).evaluate(ctx, centre).tolist() == [5.0]
    assert SpatialCoverage(radius=1, connectivity=8).evaluate(ctx, centre).tolist() == [9.0]
    assert SpatialCoverage(radius=0).evaluate(ctx, centre).tolist() == [1.0]


def test_greedy_spreads_tokens_over_the_grid():
    # 6 x 6 grid, radius 1 (8-neighbourhood): four tokens whose 3x3 squares tile the grid exist,
    # and greedy finds a selection covering all 36 cells.
    crit = SpatialCoverage(radius=1, connectivity=8)
    ctx = ctx_for(6, 6)
    sel = tp.selectors.Greedy().select(crit, ctx, 4)
    assert crit.evaluate(ctx, sel.keep_mask(36)).item() == 36.0
    assert sel.gains[0].tolist() == [9.0, 9.0, 9.0, 9.0]


def test_relevance_weights_and_padding():
    rel = torch.tensor([[0.0, 2.0, -1.0, 0.5]])
    mask = torch.tensor([[True, True, True, False]])
    ctx = ctx_for(2, 2, mask=mask, relevance=rel)
    crit = SpatialCoverage(radius=1, weight="relevance")
    everything = torch.ones(1, 4, dtype=torch.bool)
    # negative relevance counts as 0; the padding cell (0.5) is never a target
    assert crit.evaluate(ctx, everything).tolist() == [2.0]
    g = crit.gains(ctx, crit.prepare(ctx), mask)
    assert g.tolist() == [[2.0, 2.0, 0.0, 2.0]]


def test_gains_consistent_with_evaluate_along_a_greedy_run():
    crit = SpatialCoverage(radius=1)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    ctx = ctx_for(4, 5, batch=2, mask=mask)
    state = crit.prepare(ctx)
    subset = torch.zeros(2, 20, dtype=torch.bool)
    for _ in range(6):
        cand = mask & ~subset
        g = crit.gains(ctx, state, cand)
        base = crit.evaluate(ctx, subset)
        for i in range(20):
            plus = subset.clone()
            plus[:, i] = True
            expect = crit.evaluate(ctx, plus) - base
            assert torch.equal(torch.where(mask[:, i], g[:, i], expect), expect)
        picked = torch.where(cand, g, -1.0).argmax(1)
        state = crit.update(ctx, state, picked, torch.ones(2, dtype=torch.bool))
        subset[torch.arange(2), picked] = True


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), radius=st.integers(0, 3), conn=st.sampled_from([4, 8]),
       data=st.data())
def test_monotone_submodular(rows, cols, radius, conn, data):
    n = rows * cols
    crit = SpatialCoverage(radius=radius, connectivity=conn)
    ctx = ctx_for(rows, cols)
    small = torch.tensor([data.draw(st.lists(st.booleans(), min_size=n, max_size=n))])
    extra = torch.tensor([data.draw(st.lists(st.booleans(), min_size=n, max_size=n))])
    big = small | extra
    e = data.draw(st.integers(0, n - 1))

    def gain(s):
        plus = s.clone()
        plus[0, e] = True
        return (crit.evaluate(ctx, plus) - crit.evaluate(ctx, s)).item()

    assert gain(small) >= 0.0
    if not big[0, e]:
        assert gain(small) >= gain(big)


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"radius": -1}, {"radius": 1.5}, {"radius": True}, {"connectivity": 6},
                                {"weight": "area"}])
def test_bad_parameters_raise(kw):
    with pytest.raises(ConfigError):
        SpatialCoverage(**kw)


def test_missing_grid_or_relevance_raises():
    method = tp.compose(SpatialCoverage(), selector="greedy", budget=2)
    with pytest.raises(MissingSignalError, match="grid"):
        method.select(torch.randn(1, 9, 4))
    method = tp.compose(SpatialCoverage(weight="relevance"), selector="greedy", budget=2)
    with pytest.raises(MissingSignalError, match="relevance"):
        method.select(torch.randn(1, 9, 4), grid=(3, 3))


# -- the public conformance suite -------------------------------------------------------------------------

@pytest.mark.parametrize("crit", [SpatialCoverage(), SpatialCoverage(radius=0), SpatialCoverage(radius=2,
                                  connectivity=8), SpatialCoverage(weight="relevance")], ids=repr)
def test_conformance(crit):
    from tokenprune.testing import check_criterion

    check_criterion(crit)
