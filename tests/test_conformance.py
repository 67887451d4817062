"""The public conformance suite, run on every registered criterion, selector and method.

Everything here is parametrised over the registries, so a new built-in (or an installed plugin) is
tested with no edit to this file. The second half checks that the suite itself catches broken
components.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.criteria import Criterion, ModularCriterion, Tags
from tokenprune.selection import from_order
from tokenprune.selectors import Selector
from tokenprune.testing import (ConformanceError, check_criterion, check_method, check_selection, check_selector,
                                criterion_checks, example_context, method_checks, parametrize_with_checks,
                                selector_checks)
from tokenprune.testing import checks as C
from tokenprune.testing import strategies as tps

from conftest import build_criterion, default_objective_for

CRITERIA = tp.list_criteria()
SELECTORS = tp.list_selectors()
METHODS = tp.list_methods()

#: Non-default settings worth covering too (skipped while a name is not registered).
CRITERION_VARIANTS = [
    ("relevance", dict(source="text_similarity")),
    ("relevance", dict(source="text_similarity", reduce="mean")),
    ("tops_objective", dict(normalize="mean")),
    ("tops_objective", dict(normalize="none", coverage_weight=1.0)),
    ("log_det", dict(quality="given")),
    ("log_det", dict(quality="text_similarity", kernel="shifted")),
    ("saliency_coverage", dict(combine="add", alpha=0.5)),
    ("pivot_dissimilarity", dict(num_pivots=1, reduce="mean")),
]

#: Selectors with the prefix property, and reference selectors they must agree with.
PREFIX = {"greedy", "topk", "facility_location_greedy", "max_min", "dpp_map"}
REFERENCES = {  # selector (name, params) -> (reference selector, objective)
    ("greedy", (("lazy", True),)): ("greedy", "coverage"),
    ("facility_location_greedy", ()): ("greedy", "coverage"),
    ("dpp_map", ()): ("greedy", "log_det"),
}


def _variant(name, params):
    if name not in tp.list_criteria():
        pytest.skip(f"criterion {name!r} is not registered")
    return tp.get_criterion(name)(**params)


# ------------------------------------------------------------------------------------------------
# Registered components pass the suite
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [n for n, _ in criterion_checks(tp.criteria.Coverage())])
@pytest.mark.parametrize("name", CRITERIA)
def test_registered_criterion(name, check):
    crit = build_criterion(name)
    dict(criterion_checks(crit))[check]()


def _variant_id(v):
    name, params = v.values if hasattr(v, "values") else v
    return f"{name}-" + "-".join(f"{k}={x}" for k, x in params.items())


@pytest.mark.parametrize("name, params", CRITERION_VARIANTS, ids=[_variant_id(v) for v in CRITERION_VARIANTS])
def test_criterion_variants(name, params):
    check_criterion(_variant(name, params))


def test_weighted_sums_conform():
    rel, cov = tp.criteria.Relevance(), tp.criteria.Coverage()
    check_criterion(0.3 * rel + 0.7 * cov)
    check_criterion(tp.WeightedSum.of([(1.0, rel), (0.5, cov)], normalize="minmax"))


def _selector_case(name):
    sel = tp.get_selector(name)()
    return sel, default_objective_for(sel)


#: Selectors whose rows depend on the rest of the batch, and why (checked unless they say so).
ROWS_DEPENDENT = {"random": "draws one [B, N] tensor of keys from one generator for the whole batch"}


@pytest.mark.parametrize("name", SELECTORS)
def test_registered_selector(name):
    sel, obj = _selector_case(name)
    check_selector(sel, obj, prefix=name in PREFIX or None, rows_independent=False if name in ROWS_DEPENDENT else None)


@pytest.mark.parametrize("name", SELECTORS)
def test_registered_selector_on_modular_objective(name):
    sel = tp.get_selector(name)()
    if not getattr(sel, "needs_objective", True) or getattr(sel, "objective_types", ()):
        pytest.skip("objective-free or objective-specific selector")
    check_selector(sel, tp.criteria.Relevance(), prefix=name in PREFIX or None,
                   rows_independent=False if name in ROWS_DEPENDENT else None)


@pytest.mark.parametrize("key", list(REFERENCES), ids=[k[0] + str(dict(k[1])) for k in REFERENCES])
def test_selectors_match_their_reference(key):
    (name, params), (ref, obj) = key, REFERENCES[key]
    if name not in tp.list_selectors() or obj not in tp.list_criteria():
        pytest.skip(f"{name!r} or {obj!r} not registered yet")
    sel = tp.get_selector(name)(**dict(params))
    check_selector(sel, tp.get_criterion(obj)(), prefix=True, reference=tp.get_selector(ref)())


@pytest.mark.parametrize("check", ["config", "stages", "layers"])
@pytest.mark.parametrize("name", METHODS)
def test_registered_method(name, check):
    dict(method_checks(tp.create_method(name)))[check]()


# -- hypothesis: the same properties on drawn contexts ---------------------------------------------------


@pytest.mark.parametrize("name", CRITERIA)
@given(ctx=tps.contexts(batch=st.integers(1, 3), grid=tps.grids(max_side=4, max_tokens=12), dim=st.integers(8, 10)))
def test_criterion_properties_on_drawn_contexts(name, ctx):
    crit = build_criterion(name)
    C.check_criterion_shapes(crit, ctx)
    C.check_criterion_gains_match_evaluate(crit, ctx)
    C.check_criterion_tags_hold(crit, ctx)
    C.check_criterion_rows_independent(crit, ctx)


@pytest.mark.parametrize("name", SELECTORS)
@given(ctx=tps.contexts(ties=True), budget=tps.budgets(40), data=st.data())
def test_selector_output_on_drawn_contexts(name, ctx, budget, data):
    sel, obj = _selector_case(name)
    check_selection(sel.select(obj, ctx, budget), ctx, budget, who=sel, exact=getattr(sel, "exact_budget", True))


@pytest.mark.parametrize("name", METHODS)
@given(ctx=tps.contexts(ties=True), budget=tps.budgets(40))
def test_method_output_on_drawn_contexts(name, ctx, budget):
    m = tp.create_method(name)
    sel = m.select(ctx.features, budget=budget, mask=ctx.mask, relevance=ctx.relevance,
                   text_embeddings=ctx.text_embeddings, text_mask=ctx.text_mask,
                   text_relevance=ctx.text_relevance, grid=ctx.grid, seed=ctx.seed)
    check_selection(sel, ctx, budget, who=name, exact=getattr(m.stages[0].selector, "exact_budget", True))


@given(ctx=tps.contexts(dtype=tps.dtypes()), budget=tps.budgets(40))
def test_strategies_make_valid_inputs(ctx, budget):
    assert ctx.features.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert bool(ctx.mask.any(1).all())
    assert tp.Budget(budget).resolve(int(ctx.n_valid.min())) >= 1
    assert ctx.grid[0] * ctx.grid[1] == ctx.num_tokens


@given(bad=tps.bad_budgets())
def test_bad_budget_strategy_is_rejected(bad):
    with pytest.raises(tp.BudgetError):
        tp.Budget(bad)


@given(data=st.data())
def test_subsets_strategy_stays_in_the_mask(data):
    ctx = data.draw(tps.contexts())
    s = data.draw(tps.subsets(ctx, max_size=3))
    assert not bool((s & ~ctx.mask).any()) and int(s.sum(1).max()) <= 3


# ------------------------------------------------------------------------------------------------
# The suite catches broken components
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Offset(Criterion):
    """Coverage whose gains are off by a constant: gains disagree with evaluate."""

    tags: ClassVar[Tags] = Tags(monotone=True, submodular=True)

    def prepare(self, ctx):
        return tp.criteria.Coverage().prepare(ctx)

    def gains(self, ctx, state, candidates):
        return tp.criteria.Coverage().gains(ctx, state, candidates) + 0.25

    def update(self, ctx, state, picked, active):
        return tp.criteria.Coverage().update(ctx, state, picked, active)

    def evaluate(self, ctx, subset):
        return tp.criteria.Coverage().evaluate(ctx, subset)


@dataclass(frozen=True, kw_only=True)
class _Supermodular(Criterion):
    """f(S) = |S|², tagged submodular: gains grow."""

    tags: ClassVar[Tags] = Tags(monotone=True, submodular=True)

    def prepare(self, ctx):
        return torch.zeros(ctx.batch_size, device=ctx.device)

    def gains(self, ctx, state, candidates):
        return (2 * state + 1)[:, None].expand(ctx.mask.shape).float().contiguous()

    def update(self, ctx, state, picked, active):
        return state + active.float()

    def evaluate(self, ctx, subset):
        return (subset & ctx.mask).sum(1).float() ** 2


@dataclass(frozen=True, kw_only=True)
class _Undeclared(ModularCriterion):
    """Reads relevance without declaring it."""

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True)

    def scores(self, ctx):
        if ctx.relevance is None:
            raise tp.MissingSignalError("needs relevance")
        return ctx.relevance


@dataclass(frozen=True, kw_only=True)
class _Overdeclared(ModularCriterion):
    """Declares text embeddings, but its own check() only looks for relevance (tags and check disagree)."""

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True, requires=frozenset({"text_embeddings"}))

    def check(self, ctx):
        ctx.require("relevance")

    def scores(self, ctx):
        return ctx.relevance


@dataclass(frozen=True, kw_only=True)
class _BatchCoupled(ModularCriterion):
    """Normalises by the batch maximum: rows depend on each other."""

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True)

    def scores(self, ctx):
        n = ctx.features.float().norm(dim=-1) * ctx.mask
        return n / n.max()


@dataclass(frozen=True, kw_only=True)
class _PositionBiased(ModularCriterion):
    """Scores by position without declaring the grid: not permutation-equivariant."""

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True)

    def scores(self, ctx):
        return torch.arange(ctx.num_tokens, dtype=torch.float32)[None].expand(ctx.mask.shape) + ctx.features[..., 0]


@dataclass(frozen=True, kw_only=True)
class _Float64(ModularCriterion):
    """Returns float64 gains."""

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True)

    def scores(self, ctx):
        return ctx.features.double().norm(dim=-1)

    def gains(self, ctx, state, candidates):
        return self.scores(ctx)


class _NotADataclass(ModularCriterion):
    def scores(self, ctx):
        return ctx.features.float().norm(dim=-1)


@pytest.mark.parametrize("crit, check, tag", [
    (_Offset(), "gains_match_evaluate", "gains_match_evaluate"),
    (_Supermodular(), "tags_hold", "submodular"),
    (_Undeclared(), "signals", "signals"),
    (_Overdeclared(), "signals", "signals"),
    (_BatchCoupled(), "rows_independent", "rows_independent"),
    (_PositionBiased(), "permutation", "permutation"),
    (_Float64(), "shapes", "shapes"),
    (_NotADataclass(), "is_dataclass", "dataclass"),
], ids=lambda x: type(x).__name__ if isinstance(x, Criterion) else x)
def test_suite_catches_broken_criteria(crit, check, tag):
    with pytest.raises(ConformanceError, match=rf"\[{tag}\]"):
        dict(criterion_checks(crit))[check]()
    with pytest.raises(ConformanceError):
        check_criterion(crit)


@dataclass(frozen=True, kw_only=True)
class _BrokenSelector(Selector):
    """A top-k gone wrong in one of several ways."""

    needs_objective: ClassVar[bool] = False
    fault: str = "unsorted"

    def _select(self, objective, ctx, k):
        B, N = ctx.mask.shape
        K = int(k.max())
        valid = torch.arange(K)[None] < k[:, None]
        if self.fault == "padding":  # the first K positions, padding or not
            order = torch.arange(K)[None].expand(B, K)
        elif self.fault == "global_rng":
            order = torch.stack([torch.nonzero(ctx.mask[b]).squeeze(1)[torch.randperm(int(ctx.n_valid[b]))][:K]
                                 if int(ctx.n_valid[b]) >= K else
                                 torch.cat([torch.nonzero(ctx.mask[b]).squeeze(1),
                                            torch.zeros(K - int(ctx.n_valid[b]), dtype=torch.long)])
                                 for b in range(B)])
        elif self.fault == "count":  # one token short
            valid = torch.arange(K)[None] < (k[:, None] - 1).clamp_min(1)
            order = torch.stack([torch.nonzero(ctx.mask[b]).squeeze(1)[:K] if int(ctx.n_valid[b]) >= K else
                                 torch.cat([torch.nonzero(ctx.mask[b]).squeeze(1),
                                            torch.zeros(K - int(ctx.n_valid[b]), dtype=torch.long)])
                                 for b in range(B)])
        else:
            order = torch.stack([torch.nonzero(ctx.mask[b]).squeeze(1)[:K] if int(ctx.n_valid[b]) >= K else
                                 torch.cat([torch.nonzero(ctx.mask[b]).squeeze(1),
                                            torch.zeros(K - int(ctx.n_valid[b]), dtype=torch.long)])
                                 for b in range(B)])
        sel = from_order(order, torch.zeros(B, K), valid)
        if self.fault == "unsorted":  # full rows reversed
            return replace(sel, indices=torch.where(sel.valid.all(1, keepdim=True), sel.indices.flip(1), sel.indices))
        return sel


@pytest.mark.parametrize("fault, check", [("padding", "selection"), ("unsorted", "selection"),
                                          ("count", "selection"), ("global_rng", "deterministic")])
def test_suite_catches_broken_selectors(fault, check):
    torch.manual_seed(123)
    with pytest.raises(ConformanceError, match=rf"\[{check}\]"):
        check_selector(_BrokenSelector(fault=fault), None)


def test_suite_catches_a_false_prefix_claim():
    # VisionZip's contextual tokens depend on the budget: no prefix property
    with pytest.raises(ConformanceError, match=r"\[prefix\]"):
        check_selector(tp.get_selector("visionzip")(), tp.criteria.Relevance(), prefix=True)


def test_suite_catches_a_mismatch_with_the_reference():
    with pytest.raises(ConformanceError, match=r"\[matches_reference\]"):
        check_selector(tp.selectors.TopK(), tp.criteria.Coverage(), reference=tp.selectors.Greedy())


def test_check_method_rejects_non_methods():
    with pytest.raises(ConformanceError):
        check_method("tops")


def test_example_context_layout():
    ctx = example_context(batch=3, rows=3, cols=4, ties=True)
    assert ctx.mask[0].all() and not ctx.mask[1, -1] and not ctx.mask[2, 1]
    assert torch.equal(ctx.features[:, 1], ctx.features[:, 0])
    assert ctx.grid == (3, 4) and ctx.text_embeddings.shape[:2] == (3, 3)


def test_selector_checks_are_listed_by_name():
    names = [n for n, _ in selector_checks(tp.selectors.Greedy(), tp.criteria.Coverage(), prefix=True,
                                           reference=tp.selectors.Greedy())]
    assert names == ["is_dataclass", "budgets", "bad_budgets", "dtypes", "rows_independent", "prefix",
                     "matches_reference"]


@parametrize_with_checks([tp.criteria.Coverage(), (tp.selectors.TopK(), tp.criteria.Relevance()),
                          tp.create_method("fastervlm")], prefix=True)
def test_parametrize_with_checks(component, check):
    check()
