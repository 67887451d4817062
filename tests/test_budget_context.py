"""Budgets and contexts: validation of every input, and clear errors that name the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.errors import (BudgetError, InvalidFeaturesError, MissingSignalError, ShapeError,
                               TokenPruneError)
from tokenprune.testing import strategies as tps


# -- budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, n, want", [(64, 576, 64), (576, 576, 576), (1000, 576, 576), (1, 1, 1),
                                            (0.25, 576, 144), (1.0, 576, 576), (0.5, 3, 2), (0.5, 5, 3),
                                            (0.1, 4, 1), (1e-9, 10, 1), (np.int64(7), 10, 7)])
def test_budget_resolves(value, n, want):
    assert tp.Budget(value).resolve(n) == want


def test_budget_resolves_per_sample_and_for_empty():
    b = tp.Budget(0.5)
    assert b.resolve_batch(torch.tensor([10, 3, 1])).tolist() == [5, 2, 1]
    assert tp.Budget(4).resolve_batch(torch.tensor([10, 3])).tolist() == [4, 3]
    assert tp.Budget(4).resolve(0) == 0
    assert tp.Budget(tp.Budget(3)).value == 3 and tp.Budget(0.5).is_fraction and not tp.Budget(2).is_fraction


@pytest.mark.parametrize("bad, match", [
    (0, ">= 1"), (-3, ">= 1"), (True, "bool"), (False, "bool"), (1.5, "pass an int"), (64.0, "pass an int"),
    (0.0, r"\(0, 1\]"), (-0.2, r"\(0, 1\]"), (math.nan, r"\(0, 1\]"), (math.inf, r"\(0, 1\]"),
    ("64", "str"), (None, "NoneType"), (torch.tensor(3), "Tensor"), ([3], "list"),
])
def test_bad_budgets_raise_budget_error(bad, match):
    with pytest.raises(BudgetError, match=match) as exc:
        tp.Budget(bad)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, TokenPruneError)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, math.nan, math.inf, "4"])
def test_bad_budgets_raise_through_select_and_stages(bad):
    x = torch.randn(1, 8, 4)
    with pytest.raises(BudgetError):
        tp.select("random", x, budget=bad)
    with pytest.raises(BudgetError):
        tp.create_method("fastv", budget=bad)


def test_budget_none_means_the_stage_budget_in_select_but_is_invalid_in_a_stage():
    x = torch.randn(1, 80, 4)
    assert tp.select("random", x, budget=None).counts.tolist() == [64]
    with pytest.raises(BudgetError, match="required"):
        tp.create_method("fastv", budget=None)


@given(f=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(1, 5000))
def test_fraction_budgets_are_the_rounded_fraction(f, n):
    k = tp.Budget(f).resolve(n)
    assert 1 <= k <= n
    assert abs(k - f * n) <= 0.5 or k == 1


@given(f=st.floats(min_value=1e-6, max_value=1.0), g=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(1, 999))
def test_fraction_budgets_are_monotone(f, g, n):
    lo, hi = sorted((f, g))
    assert tp.Budget(lo).resolve(n) <= tp.Budget(hi).resolve(n)


@given(k=st.integers(1, 10_000), n=st.integers(0, 10_000))
def test_int_budgets_cap_at_the_count(k, n):
    assert tp.Budget(k).resolve(n) == min(k, n)


@given(bad=tps.bad_budgets())
def test_drawn_bad_budgets_are_rejected(bad):
    with pytest.raises(BudgetError):
        tp.Budget(bad)


# -- contexts --------------------------------------------------------------------------------------------


def test_context_defaults_and_promotion():
    ctx = tp.make_context(torch.randn(5, 3), relevance=torch.rand(5), text_embeddings=torch.randn(2, 3))
    assert ctx.features.shape == (1, 5, 3) and ctx.mask.all() and ctx.relevance.shape == (1, 5)
    assert ctx.text_embeddings.shape == (1, 2, 3) and ctx.text_mask.all()
    assert ctx.n_valid.tolist() == [5] and ctx.seed == 0


def test_context_zeroes_padding_signals_and_caches_similarity():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])
    ctx = tp.make_context(x, mask=mask, relevance=torch.ones(2, 4))
    assert ctx.mask.dtype == torch.bool and ctx.relevance[0, 2] == 0 and ctx.relevance[1, 1:].abs().sum() == 0
    assert ctx.similarity is ctx.similarity and ctx.similarity[0, 2].abs().sum() == 0
    torch.testing.assert_close(torch.diagonal(ctx.similarity[0])[[0, 1, 3]], torch.ones(3))


def test_nan_or_inf_at_padding_is_allowed():
    x = torch.randn(1, 4, 3)
    x[0, 3] = float("nan")
    ctx = tp.make_context(x, mask=torch.tensor([[True, True, True, False]]))
    assert tp.select("facility_location", x, budget=2, mask=ctx.mask).counts.tolist() == [2]


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_nan_or_inf_features_raise(kind):
    x = torch.randn(2, 4, 3)
    x[1, 2, 0] = float(kind)
    with pytest.raises(InvalidFeaturesError, match="NaN or inf"):
        tp.make_context(x)
    with pytest.raises(InvalidFeaturesError):
        tp.select("fastervlm", x, relevance=torch.rand(2, 4), budget=2)


def test_nan_relevance_and_text_raise():
    x = torch.randn(1, 4, 3)
    with pytest.raises(InvalidFeaturesError, match="relevance"):
        tp.make_context(x, relevance=torch.tensor([[0.1, math.nan, 0.2, 0.3]]))
    with pytest.raises(InvalidFeaturesError, match="text_embeddings"):
        tp.make_context(x, text_embeddings=torch.full((1, 2, 3), math.inf))


@pytest.mark.parametrize("features, match", [
    (torch.randn(4), r"\[B, N, D\]"),
    (torch.randn(1, 2, 3, 4), r"\[B, N, D\]"),
    (torch.randn(1, 0, 3), "at least one token"),
    (torch.randn(1, 3, 0), "at least one token"),
])
def test_bad_feature_shapes(features, match):
    with pytest.raises(ShapeError, match=match):
        tp.make_context(features)


@pytest.mark.parametrize("features", [torch.ones(1, 3, 2, dtype=torch.long), torch.ones(1, 3, 2, dtype=torch.bool),
                                      np.ones((1, 3, 2)), [[1.0, 2.0]]])
def test_non_float_features(features):
    with pytest.raises(InvalidFeaturesError, match="features"):
        tp.make_context(features)


@pytest.mark.parametrize("kw, err, match", [
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ShapeError, "mask"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ShapeError, "mask"),
    (dict(mask=[[True] * 4] * 2), ShapeError, "mask"),
    (dict(mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), InvalidFeaturesError, "all-padding"),
    (dict(relevance=torch.rand(2, 5)), ShapeError, "relevance"),
    (dict(relevance=torch.rand(1, 4)), ShapeError, "relevance"),
    (dict(relevance=torch.ones(2, 4, dtype=torch.long)), InvalidFeaturesError, "relevance"),
    (dict(text_embeddings=torch.randn(2, 3, 5)), ShapeError, "text_embeddings"),
    (dict(text_embeddings=torch.randn(1, 3, 3)), ShapeError, "text_embeddings"),
    (dict(text_embeddings=torch.randn(2, 3)), ShapeError, "text_embeddings"),
    (dict(text_embeddings=torch.randn(2, 3, 3), text_mask=torch.ones(2, 4, dtype=torch.bool)), ShapeError,
     "text_mask"),
    (dict(text_mask=torch.ones(2, 3, dtype=torch.bool)), ShapeError, "text_mask"),
    (dict(grid=(3, 3)), ShapeError, "grid"),
    (dict(grid=(2,)), ShapeError, "grid"),
    (dict(grid="2x2"), ShapeError, "grid"),
    (dict(keys=torch.randn(2, 5, 3)), ShapeError, "keys"),
    (dict(keys=[1, 2]), ShapeError, "keys"),
])
def test_mismatched_signals_raise_and_name_the_signal(kw, err, match):
    with pytest.raises(err, match=match):
        tp.make_context(torch.randn(2, 4, 3), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_features_are_accepted(dtype):
    x = torch.randn(2, 9, 4).to(dtype)
    sel = tp.select("tops", x, relevance=torch.rand(2, 9), budget=3)
    assert sel.counts.tolist() == [3, 3]
    merged = tp.select("pooling", x, budget=4, grid=(3, 3))
    assert merged.features.dtype == dtype


# -- missing signals name the signal ----------------------------------------------------------------------


@pytest.mark.parametrize("name, params, kw, signal", [
    ("fastervlm", {}, {}, "relevance"),
    ("fastv", {}, {}, "relevance"),
    ("tops", {}, {}, "relevance"),
    ("scope", {}, {}, "relevance"),
    ("dart", {}, {}, "relevance"),
    ("visionzip", {}, {}, "relevance"),
    ("cdpruner", {}, {}, "relevance"),
    ("cdpruner", {"quality": "text_similarity"}, {"relevance": torch.rand(1, 10)}, "text_embeddings"),
    ("visionzip", {"merge_by": "keys"}, {"relevance": torch.rand(1, 10)}, "keys"),
    ("pooling", {}, {}, "grid"),
    ("window_fastv", {}, {"relevance": torch.rand(1, 10)}, "grid"),
])
def test_missing_signals_name_the_signal(name, params, kw, signal):
    x = torch.randn(1, 10, 4)  # 10 tokens: not a square, so no grid can be guessed
    with pytest.raises(MissingSignalError, match=signal):
        tp.create_method(name, **params).select(x, budget=3, **kw)


def test_signal_free_methods_need_no_signal():
    x = torch.randn(2, 10, 4)
    for name in ("random", "divprune", "facility_location"):
        assert tp.select(name, x, budget=3).counts.tolist() == [3, 3]


def test_errors_are_catchable_by_builtin_types():
    assert issubclass(BudgetError, ValueError) and issubclass(ShapeError, ValueError)
    assert issubclass(InvalidFeaturesError, ValueError) and issubclass(MissingSignalError, ValueError)
    assert issubclass(tp.UnknownNameError, KeyError) and issubclass(tp.IncompatibleComponentsError, TypeError)


@given(ctx=tps.contexts(dtype=tps.dtypes()))
def test_drawn_contexts_round_trip_through_make_context(ctx):
    again = tp.make_context(ctx.features, mask=ctx.mask, relevance=ctx.relevance,
                            text_embeddings=ctx.text_embeddings, text_mask=ctx.text_mask, grid=ctx.grid)
    assert torch.equal(again.features, ctx.features) and torch.equal(again.mask, ctx.mask)
    assert torch.equal(again.relevance, ctx.relevance)
    assert bool((ctx.relevance[~ctx.mask] == 0).all())


# -- masks hold 0/1 or bool values (#13) ----------------------------------------------------------------


@pytest.mark.parametrize("mask, shown", [
    (torch.tensor([[1.0, 0.5, 1.0, 1.0]]), "0.5"),
    (torch.tensor([[1, 2, 0, 1]]), "2"),
    (torch.tensor([[1.0, -1.0, 1.0, 0.0]]), "-1.0"),
    (torch.tensor([[1.0, math.nan, 1.0, 1.0]]), "nan"),
])
def test_masks_with_values_other_than_0_and_1_raise(mask, shown):
    x = torch.randn(1, 4, 3)
    with pytest.raises(ShapeError, match=f"mask must hold only True/False or 0/1 values.*got {shown}"):
        tp.make_context(x, mask=mask)
    with pytest.raises(ShapeError, match="mask"):
        tp.select("random", x, budget=2, mask=mask)


def test_zero_one_masks_of_any_dtype_are_accepted():
    x = torch.randn(1, 4, 3)
    for mask in (torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[1, 0, 1, 1]], dtype=torch.uint8),
                 torch.tensor([[True, False, True, True]])):
        assert tp.make_context(x, mask=mask).mask.tolist() == [[True, False, True, True]]
