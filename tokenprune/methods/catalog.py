"""Registered named methods: TOPS and the methods it is compared with.

Every method here is a factory ``name(budget=..., **params) -> PruningMethod`` registered in the
method registry (``tokenprune.list_methods()``), built from :class:`~tokenprune.methods.compose.Stage`
objects whose criteria and selectors are looked up by their registered names: the catalog uses the
same public path as a plugin, and a component replaced in the registry is picked up here.

Stage semantics (see :class:`~tokenprune.methods.compose.Stage`): ``layer=None`` acts before the LLM
(after the multimodal projector); ``layer=k`` acts on the hidden states entering decoder layer ``k``,
with attention signals from layer ``k - 1``; ``reference_depth`` makes the layer scale with the
model's depth. ``relevance`` names the signal the model adapter computes for the stage
(``"cls_attention"``, ``"text_attention"``, ``"text_similarity"``, ``"key_norm"``). On plain tensors
(:func:`tokenprune.select`) the caller passes that signal as ``relevance=``.

This module also holds two small criteria only the catalog needs: DART's ``pivot_dissimilarity``
and SCOPE's ``saliency_coverage``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import Budget, as_budget
from ..criteria.base import Criterion, ModularCriterion, Tags
from ..errors import ConfigError, StageError
from ..registry import criteria as _criteria
from ..registry import methods as _methods
from ..registry import selectors as _selectors
from .compose import PruningMethod, Stage

__all__ = ["PivotDissimilarity", "SaliencyCoverage", "tops", "fastv", "reverse_fastv", "window_fastv",
           "pyramiddrop", "dart", "fastervlm", "visionzip", "divprune", "cdpruner", "facility_location", "scope",
           "random", "pooling", "TOPS_SCHEDULES"]


def _crit(name: str, **params) -> Criterion:
    return _criteria.get(name)(**params)


def _sel(name: str, **params):
    return _selectors.get(name)(**params)


def _count(x: float) -> int:
    """Round half up, never below 1."""
    return max(1, int(math.floor(x + 0.5)))


def _one_stage(objective, selector, budget, *, relevance=None, layer=None, reference_depth=None,
               raters="last_token", positions="preserve") -> PruningMethod:
    return PruningMethod(stages=(Stage(objective=objective, selector=selector, budget=budget, layer=layer,
                                       reference_depth=reference_depth, relevance=relevance, raters=raters,
                                       positions=positions),))


# ------------------------------------------------------------------------------------------------
# Criteria used only by the catalog
# ------------------------------------------------------------------------------------------------


@_criteria.register("pivot_dissimilarity")
@dataclass(frozen=True, kw_only=True)
class PivotDissimilarity(ModularCriterion):
    """DART's duplication score: keep the pivots, then the tokens least similar to them.

    Pivots ``P`` are the ``num_pivots`` valid tokens with the largest relevance (DART: the L1 norm of
    the tokens' keys at layer ``K - 1``, ``relevance="key_norm"``). Every other token scores its
    dissimilarity to the pivots,

    .. math:: s_i = 1 - \\max_{p \\in P} \\cos(h_i, h_p) \\in [0, 2]
              \\quad(\\text{or } 1 - \\operatorname{mean}_{p \\in P} \\cos(h_i, h_p)),

    and pivots score ``4 - rank / num_pivots`` (in ``(3, 4]``, by decreasing relevance), so they are kept
    first. The criterion is modular; :class:`~tokenprune.selectors.TopK` is its exact optimiser.

    Parameters
    ----------
    num_pivots : int
        Number of pivot tokens per sample (``>= 1``; capped by the valid count). Default 4.
    reduce : {"max", "mean"}
        How the similarities to the pivots are reduced. Default ``"max"`` (a token duplicating any
        pivot is dropped).

    Raises
    ------
    ValueError
        ``num_pivots`` not a positive int, or an unknown ``reduce``.
    MissingSignalError
        ``ctx.relevance`` (the pivot scores) is absent.

    Notes
    -----
    Tags: modular, monotone (scores are non-negative), submodular; requires ``relevance``.
    ``O(B N |P| D)``.

    What the paper leaves open and what we chose: DART's reference code takes 4 image pivots and 4
    text pivots, splits the budget evenly across them, and lets each pivot take its ``K / |P|``
    least-similar tokens in turn (a union). The selection core sees only the visual tokens, so we use
    image pivots only and one ranking by the dissimilarity to the nearest pivot; this keeps the
    defining rule (drop tokens that duplicate a pivot) and makes the criterion modular.

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 8, 4), relevance=torch.arange(8.0)[None])
    >>> PivotDissimilarity(num_pivots=2).scores(ctx).shape
    torch.Size([1, 8])
    """

    tags: ClassVar[Tags] = Tags(modular=True, monotone=True, submodular=True, requires=frozenset({"relevance"}))
    num_pivots: int = 4
    reduce: str = "max"

    def __post_init__(self):
        if isinstance(self.num_pivots, bool) or not isinstance(self.num_pivots, numbers.Integral) \
                or self.num_pivots < 1:
            raise ValueError(f"num_pivots must be a positive int, got {self.num_pivots!r}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def scores(self, ctx) -> torch.Tensor:
        B, N = ctx.mask.shape
        p = min(int(self.num_pivots), N)
        rel = ctx.relevance.float().masked_fill(~ctx.mask, float("-inf"))
        # stable sort: ties go to the lower index
        piv = torch.sort(rel, dim=1, descending=True, stable=True).indices[:, :p]  # [B, p]
        n_piv = torch.minimum(ctx.n_valid, torch.tensor(p, device=ctx.device))  # [B]
        piv_ok = torch.arange(p, device=ctx.device)[None] < n_piv[:, None]  # [B, p]
        sim = torch.gather(ctx.similarity, 2, piv.unsqueeze(1).expand(B, N, p))  # [B, N, p]
        if self.reduce == "max":
            red = sim.masked_fill(~piv_ok[:, None, :], float("-inf")).amax(-1)
        else:
            red = (sim * piv_ok[:, None, :]).sum(-1) / n_piv.clamp_min(1)[:, None]
        out = (1.0 - red).clamp(0.0, 2.0)
        rank_score = 4.0 - torch.arange(p, device=ctx.device, dtype=torch.float32)[None].expand(B, p) / self.num_pivots
        # pivots rank first; a pivot slot beyond the valid count points at padding and is left as is
        out = out.scatter(1, piv, torch.where(piv_ok, rank_score, torch.gather(out, 1, piv)))
        return out.masked_fill(~ctx.mask, 0.0)


@_criteria.register("saliency_coverage")
@dataclass(frozen=True, kw_only=True)
class SaliencyCoverage(Criterion):
    """SCOPE's score: facility-location coverage gain combined with per-token saliency.

    With ``F`` the cosine similarity, ``m_j = max(0, max_{s∈S} F_js)`` and saliency ``a_i``
    (``ctx.relevance``, the vision encoder's [CLS] attention, clamped at 0):

    .. math:: g_i(S) = \\Delta_{\\mathrm{cov}}(i \\mid S) \\cdot a_i^{\\alpha}
              \\quad(\\text{combine="multiply"}), \\qquad
              g_i(S) = \\Delta_{\\mathrm{cov}}(i \\mid S) + a_i^{\\alpha} \\quad(\\text{combine="add"}),

    with :math:`\\Delta_{\\mathrm{cov}}(i \\mid S) = \\sum_{j} \\max(0, F_{ij} - m_j)`. Greedy
    selection repeatedly keeps the token with the largest score (the paper's "SCOPE score").

    Parameters
    ----------
    alpha : float
        Exponent of the saliency (``>= 0``, finite). Default 1.0, the reference code's default.
    combine : {"multiply", "add"}
        How saliency enters the score. Default ``"multiply"`` (the paper's main setting).

    Raises
    ------
    ValueError
        Negative or non-finite ``alpha``, or an unknown ``combine``.
    MissingSignalError
        ``ctx.relevance`` (the saliency) is absent.

    Notes
    -----
    ``"add"`` is the exact marginal gain of ``f(S) = cov(S) + Σ_{i∈S} a_i^α``: monotone and
    submodular. ``"multiply"`` is not the gain of a set function (``exact_gains=False``); its gains
    are non-negative and never increase as ``S`` grows (fixed non-negative weights times
    non-increasing coverage gains), so lazy greedy stays exact. For ``"multiply"``,
    :meth:`evaluate` returns the coverage ``cov(S) = Σ_j m_j`` that SCOPE's set-coverage measures.
    ``O(N²)`` per step, as :class:`~tokenprune.criteria.Coverage`.

    What the paper leaves open and what we chose: SCOPE computes saliency at the vision encoder's
    penultimate layer, summed over heads, and runs on the encoder's hidden states; in tokenprune the
    stage runs on the projected features with ``relevance="cls_attention"`` from the adapter.

    References
    ----------
    Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs",
    arXiv:2510.24214.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 6, 4), relevance=torch.rand(1, 6))
    >>> c = SaliencyCoverage()
    >>> c.gains(ctx, c.prepare(ctx), ctx.mask).shape
    torch.Size([1, 6])
    """

    alpha: float = 1.0
    combine: str = "multiply"

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.combine not in ("multiply", "add"):
            raise ValueError(f"combine must be 'multiply' or 'add', got {self.combine!r}")

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        req = frozenset({"relevance"})
        if self.combine == "add":
            return Tags(monotone=True, submodular=True, requires=req)
        return Tags(monotone=True, exact_gains=False, nonincreasing_gains=True, requires=req)

    def _saliency(self, ctx) -> torch.Tensor:
        return (ctx.relevance.float().clamp_min(0.0) ** float(self.alpha)).masked_fill(~ctx.mask, 0.0)

    def prepare(self, ctx):
        self.check(ctx)
        return {"cov": _criteria.get("coverage")().prepare(ctx), "sal": self._saliency(ctx)}

    def gains(self, ctx, state, candidates):
        cov = _criteria.get("coverage")().gains(ctx, state["cov"], candidates).float()
        return cov * state["sal"] if self.combine == "multiply" else cov + state["sal"]

    def gains_at(self, ctx, state, index, candidates=None):
        cov = _criteria.get("coverage")().gains_at(ctx, state["cov"], index, candidates).float()
        sal = state["sal"].gather(1, index)
        return cov * sal if self.combine == "multiply" else cov + sal

    def update(self, ctx, state, picked, active):
        return {"cov": _criteria.get("coverage")().update(ctx, state["cov"], picked, active), "sal": state["sal"]}

    def evaluate(self, ctx, subset):
        self.check(ctx)
        cov = _criteria.get("coverage")().evaluate(ctx, subset).float()
        if self.combine == "multiply":
            return cov
        return cov + (self._saliency(ctx) * (subset & ctx.mask)).sum(1)


# ------------------------------------------------------------------------------------------------
# TOPS
# ------------------------------------------------------------------------------------------------

#: Named TOPS schedules: ``(reference_depth, ((layer or None, multiple of the nominal budget), ...))``.
TOPS_SCHEDULES = {
    "llava": (32, ((None, 2.0), (12, 1.0), (24, 0.25))),
    "qwen2_5_vl": (28, ((None, 2.0), (12, 1.1), (16, 0.3))),
    "single": (None, ((None, 1.0),)),
}

#: Token counts the TOPS paper publishes for its nominal budgets, where they differ from the ratio rule.
_TOPS_PUBLISHED = {
    ("qwen2_5_vl", 256): (512, 281, 77),
    ("qwen2_5_vl", 128): (256, 139, 39),
}


def _scaled_budgets(budget: Budget, multiples) -> list:
    """Per-stage budgets for a nominal budget and per-stage multiples of it.

    Ints give absolute counts ``max(1, round(T * c))``. Fractions give the absolute fractions
    ``a_i = min(1, f * c_i)``, turned into fractions of what the previous stage left
    (``a_1``, then ``min(1, a_i / a_{i-1})``), since each stage's fraction applies to the tokens left.
    """
    if not budget.is_fraction:
        return [_count(budget.value * c) for c in multiples]
    out, prev = [], 1.0
    for c in multiples:
        a = min(1.0, budget.value * c)
        out.append(min(1.0, a / prev))
        prev = a
    return out


@_methods.register("tops")
def tops(budget=None, coverage_weight=0.5, diversity_weight=0.5, normalize="minmax", stage1_weights=(0.5, 0.5),
         raters="last_token", positions="compact", schedule="llava", reference_depth=None) -> PruningMethod:
    """TOPS: keep the visual tokens that preserve the most information about the image and the query.

    Each pruning point greedily maximises relevance plus coverage plus diversity
    (:class:`~tokenprune.criteria.TOPSObjective`, registered ``"tops_objective"``):

    .. math:: S_1 = \\{\\arg\\max_i r_i\\}, \\qquad
              i^\\ast = \\arg\\max_{i \\notin S} \\tilde r_i + \\lambda\\, \\tilde c_i(U) + \\alpha\\, \\tilde d_i(S)

    with relevance ``r`` ([CLS] attention before the LLM, text-rater attention inside it), coverage
    ``c_i(U) = Σ_{j∈U} max(0, F_ij - m_j)``, diversity ``d_i = 1 - m_i`` and ``~`` a per-step
    normalisation over the candidates.

    Parameters
    ----------
    budget : int or float, optional
        The nominal budget ``T`` (default 64): tokens kept by the stage at layer 12 in the paper's
        schedules. A float in (0, 1] is a fraction of the visual tokens; the stages' fractions are
        scaled the same way and capped at 1. Must be omitted with an explicit ``schedule`` list.
    coverage_weight : float
        ``λ`` for the in-LLM stages (default 0.5; the paper uses 0.4-1.0 by model and ratio).
    diversity_weight : float
        ``α`` for the in-LLM stages (default 0.5).
    normalize : {"minmax", "mean", "none"}
        Per-step normalisation of each term's gains (default ``"minmax"``, the paper's main text; the
        appendix divides by the mean).
    stage1_weights : (float, float)
        ``(λ, α)`` for the stage before the LLM (default ``(0.5, 0.5)``, as in the paper).
    raters : {"last_token", "all_text_mean", "dynamic"}
        Text raters for the in-LLM relevance. The paper's default is ``"dynamic"`` (a relevance
        threshold it does not give); its ablation puts the other two within about 0.5%, and
        ``"last_token"`` is the cheapest, so it is our default.
    positions : {"compact", "preserve"}
        Position ids after in-LLM stages: ``"compact"`` re-indexes (the paper), ``"preserve"`` keeps
        the original ones.
    schedule : {"llava", "qwen2_5_vl", "single"} or list of (int or None, int or float)
        ``"llava"`` (reference depth 32): before the LLM keep ``2T``, at layer 12 keep ``T``, at
        layer 24 keep ``T/4``. ``"qwen2_5_vl"`` (reference depth 28): ``2T``, layer 12 ``1.1T``, layer
        16 ``0.3T``; for ``T = 256`` and ``128`` the paper's published counts (512/281/77 and
        256/139/39) are used. ``"single"``: one stage before the LLM keeping ``T``. Or an explicit
        list of ``(layer, budget)`` pairs (``None`` for before the LLM).
    reference_depth : int, optional
        Only with an explicit schedule: the depth its layers are written for (default: absolute layers).

    Returns
    -------
    PruningMethod
        One stage per schedule entry, each a greedy selection of ``TOPSObjective``.

    Raises
    ------
    StageError
        Unknown schedule name, malformed schedule list, or ``budget`` given with an explicit list.
    BudgetError
        Invalid budget.

    Notes
    -----
    Signals: ``cls_attention`` before the LLM, ``text_attention`` (with ``raters``) inside it. The
    nominal budget hides extra tokens: the default LLaVA schedule at ``T = 64`` averages about 76
    tokens over 32 layers (report the equivalent token count too). ``O(K N²)`` per stage with the
    coverage term. Stage I uses ``λ = α = 0.5`` as in the paper; LLaVA-1.5-13B's layers 15 and 30
    follow from the reference depth.

    References
    ----------
    "TOPS: Token Optimal Preservation Sets", arXiv:2606.27161.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> m = tp.get_method("tops", budget=64)
    >>> [(s.layer, s.budget.value) for s in m.stages]
    [(None, 128), (12, 64), (24, 16)]
    >>> tp.select("tops", torch.randn(1, 48, 8), relevance=torch.rand(1, 48), budget=8).counts
    tensor([8])
    """
    if normalize not in ("minmax", "mean", "none"):
        raise ConfigError(f"normalize must be 'minmax', 'mean' or 'none', got {normalize!r}")
    try:
        w1 = tuple(float(w) for w in stage1_weights)
    except (TypeError, ValueError):
        w1 = ()
    if len(w1) != 2:
        raise ConfigError(f"stage1_weights must be a (coverage_weight, diversity_weight) pair, got {stage1_weights!r}")

    if isinstance(schedule, str):
        if schedule not in TOPS_SCHEDULES:
            raise StageError(f"unknown TOPS schedule {schedule!r}; use one of {sorted(TOPS_SCHEDULES)} "
                             "or a list of (layer or None, budget) pairs")
        if reference_depth is not None:
            raise StageError("reference_depth is set by the named schedule; pass it only with an explicit list")
        depth, entries = TOPS_SCHEDULES[schedule]
        nominal = as_budget(64 if budget is None else budget)
        layers = [lay for lay, _ in entries]
        published = _TOPS_PUBLISHED.get((schedule, nominal.value)) if not nominal.is_fraction else None
        budgets = list(published) if published else _scaled_budgets(nominal, [c for _, c in entries])
    else:
        if budget is not None:
            raise StageError("with an explicit TOPS schedule the budgets come from the schedule; do not pass budget")
        try:
            pairs = [tuple(p) for p in schedule]
        except TypeError:
            raise StageError(f"schedule must be a name or a list of (layer or None, budget) pairs, "
                             f"got {schedule!r}") from None
        if not pairs or any(len(p) != 2 for p in pairs):
            raise StageError(f"schedule must be a non-empty list of (layer or None, budget) pairs, got {schedule!r}")
        layers = [p[0] for p in pairs]
        budgets = [as_budget(p[1]).value for p in pairs]
        ints = [b for b in budgets if not isinstance(b, float)]
        if ints != sorted(ints, reverse=True):
            raise StageError(f"token counts in a schedule must not increase from stage to stage, got {budgets}")
        depth = reference_depth

    stages = []
    for layer, b in zip(layers, budgets):
        cw, dw = w1 if layer is None else (coverage_weight, diversity_weight)
        objective = _crit("tops_objective", coverage_weight=cw, diversity_weight=dw, normalize=normalize)
        stages.append(Stage(objective=objective, selector=_sel("greedy"), budget=b, layer=layer,
                            reference_depth=None if layer is None else depth,
                            relevance="cls_attention" if layer is None else "text_attention",
                            raters=raters, positions=positions))
    return PruningMethod(stages=tuple(stages))


# ------------------------------------------------------------------------------------------------
# Attention top-k in the LLM: FastV and its variants, PyramidDrop
# ------------------------------------------------------------------------------------------------


@_methods.register("fastv")
def fastv(budget=64, layer=2, raters="last_token", positions="preserve") -> PruningMethod:
    """FastV: after layer ``K``, keep the visual tokens the last token attends to most.

    .. math:: S = \\operatorname{top-}k_i \\; \\tfrac{1}{H} \\sum_h \\mathrm{Attn}_h(t_{\\mathrm{last}} \\to i)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64, for comparisons at equal counts; the paper's default is to drop
        50%, ``budget=0.5``).
    layer : int
        ``K``: the stage acts on the hidden states entering decoder layer ``K`` with the attention of
        layer ``K - 1`` (default 2, absolute: the paper fixes ``K = 2`` whatever the depth).
    raters : {"last_token", "all_text_mean", "dynamic"}
        Which text tokens' attention is used (default the last token, as in the paper).
    positions : {"preserve", "compact"}
        Position ids of the kept tokens (default: the original ones, as FastV's code keeps them).

    Returns
    -------
    PruningMethod
        One in-LLM stage: top-k of :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.

    Notes
    -----
    Signal: ``text_attention`` at layer ``K - 1``. ``O(N log N)``. The public code forces eager
    attention for the whole model; tokenprune's adapters compute only the needed attention rows.
    What the paper leaves open and what we chose: it states "after layer K" with attention "of
    layer K"; the reference code prunes the input of layer ``K`` with the attention weights of
    layer ``K - 1`` (the last computed), which is what ``layer=K`` means here. Heads are averaged.

    References
    ----------
    Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (FastV, ECCV 2024), arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.get_method("fastv").stages[0].layer
    2
    """
    return _one_stage(_crit("relevance"), _sel("topk"), budget, relevance="text_attention", layer=layer,
                      raters=raters, positions=positions)


@_methods.register("reverse_fastv")
def reverse_fastv(budget=64, layer=2, raters="last_token", positions="preserve") -> PruningMethod:
    """ReverseFastV: FastV that keeps the visual tokens with the *lowest* last-token attention.

    A control from the seed paper: if it does about as well as FastV, attention does not identify the
    tokens that matter.

    Parameters
    ----------
    budget, layer, raters, positions
        As for :func:`fastv`.

    Returns
    -------
    PruningMethod
        One in-LLM stage: bottom-k of :class:`~tokenprune.criteria.Relevance`
        (``TopK(largest=False)``).

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.

    Notes
    -----
    Signal: ``text_attention`` at layer ``K - 1``. What the paper leaves open: the seed paper's exact
    definitions were not retrievable; we use the usual reading (the FastV rule with the order
    reversed).

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501. FastV: arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.get_method("reverse_fastv").stages[0].selector.largest
    False
    """
    return _one_stage(_crit("relevance"), _sel("topk", largest=False), budget, relevance="text_attention",
                      layer=layer, raters=raters, positions=positions)


@_methods.register("window_fastv")
def window_fastv(budget=64, layer=2, windows=4, raters="last_token", positions="preserve") -> PruningMethod:
    """WindowFastV: FastV's attention ranking applied inside local spatial windows.

    The patch grid is split into windows and each window keeps its share of the budget by
    last-token attention, so the kept tokens stay spread over the image.

    Parameters
    ----------
    budget, layer, raters, positions
        As for :func:`fastv`.
    windows : int or (int, int)
        Windows per side of the patch grid (default 4: 4 x 4 windows of 6 x 6 tokens on LLaVA-1.5's
        24 x 24 grid); the budget is spread over the windows in proportion to their valid tokens.

    Returns
    -------
    PruningMethod
        One in-LLM stage: ``window_topk`` on :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.
    ValueError
        ``windows`` not a positive int or pair.

    Notes
    -----
    Signals: ``text_attention`` at layer ``K - 1`` and the patch ``grid`` (or, with several crops or
    tiles per sample, the adapters' token coordinates: windows per crop). What the paper leaves
    open: the seed paper's definitions were not retrievable; we use the usual reading (top-k inside
    local spatial windows, the budget spread evenly over them) and choose 4 x 4 windows.

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501. FastV: arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.get_method("window_fastv").stages[0].relevance
    'text_attention'
    """
    return _one_stage(_crit("relevance"), _sel("window_topk", windows=windows), budget, relevance="text_attention",
                      layer=layer, raters=raters, positions=positions)


@_methods.register("pyramiddrop")
def pyramiddrop(budget=0.5, ratio=0.5, layers=(8, 16, 24), reference_depth=32, raters="last_token",
                positions="preserve") -> PruningMethod:
    """PyramidDrop: drop visual tokens in stages, by the last instruction token's attention.

    At the end of each of the first three of four equal parts of the LLM (layers 8, 16 and 24 of 32),
    keep the visual tokens the last instruction token attends to most; each stage keeps a fraction
    ``λ`` of the tokens left.

    Parameters
    ----------
    budget : int or float
        Tokens kept by the first stage (int) or the fraction of the visual tokens it keeps (float).
        Default 0.5, the paper's ``λ``.
    ratio : float
        ``λ`` for the later stages: the fraction of the tokens left that each keeps (default 0.5).
    layers : tuple of int
        Pruning layers, written for ``reference_depth`` layers (default ``(8, 16, 24)``).
    reference_depth : int
        Depth the layers are written for (default 32, LLaVA-1.5-7B).
    raters, positions
        As for :func:`fastv`.

    Returns
    -------
    PruningMethod
        One in-LLM top-k stage of :class:`~tokenprune.criteria.Relevance` per layer.

    Raises
    ------
    BudgetError
        Invalid budget or ratio.
    StageError
        Layers not strictly increasing.

    Notes
    -----
    Signal: ``text_attention`` (``raters="last_token"``: the last instruction token) at each layer
    ``k - 1``. With the defaults on 576 tokens and 32 layers the counts are 576 → 288 → 144 → 72, about
    270 equivalent tokens. What the paper leaves open and what we chose: it has no single nominal
    budget; ``budget`` is what the first stage keeps and the later stages keep ``ratio`` of the rest.

    References
    ----------
    Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", arXiv:2410.17247.

    Examples
    --------
    >>> import tokenprune as tp
    >>> [(s.layer, s.budget.value) for s in tp.get_method("pyramiddrop").stages]
    [(8, 0.5), (16, 0.5), (24, 0.5)]
    """
    r = as_budget(ratio)
    if not r.is_fraction:
        raise ConfigError(f"ratio must be a float in (0, 1] (fraction of the tokens left), got {ratio!r}")
    layers = list(layers)
    if not layers:
        raise StageError("pyramiddrop needs at least one layer")
    stages = [Stage(objective=_crit("relevance"), selector=_sel("topk"), budget=budget if i == 0 else r.value,
                    layer=lay, reference_depth=reference_depth, relevance="text_attention", raters=raters,
                    positions=positions) for i, lay in enumerate(layers)]
    return PruningMethod(stages=tuple(stages))


@_methods.register("dart")
def dart(budget=64, layer=2, num_pivots=4, reduce="max", positions="preserve") -> PruningMethod:
    """DART: keep a few pivot tokens and the tokens that duplicate them least.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    layer : int
        ``K``: acts on the hidden states entering decoder layer ``K`` (default 2, absolute, as the paper).
    num_pivots : int
        Pivot tokens, chosen by the largest key L1 norm at layer ``K - 1`` (default 4).
    reduce : {"max", "mean"}
        Reduction of the similarities to the pivots (see :class:`PivotDissimilarity`).
    positions : {"preserve", "compact"}
        Position ids of the kept tokens.

    Returns
    -------
    PruningMethod
        One in-LLM stage: top-k of :class:`PivotDissimilarity` (``"pivot_dissimilarity"``).

    Raises
    ------
    BudgetError, StageError, ValueError
        Invalid budget, layer or pivot count.

    Notes
    -----
    Signal: ``key_norm`` (the L1 norm of the keys at layer ``K - 1``) as relevance. What the paper
    leaves open and what we chose: see :class:`PivotDissimilarity` (image pivots only, one ranking
    by the nearest pivot instead of an even split of the budget across pivots).

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.get_method("dart").stages[0].relevance
    'key_norm'
    """
    return _one_stage(_crit("pivot_dissimilarity", num_pivots=num_pivots, reduce=reduce), _sel("topk"), budget,
                      relevance="key_norm", layer=layer, positions=positions)


# ------------------------------------------------------------------------------------------------
# Before the LLM
# ------------------------------------------------------------------------------------------------


@_methods.register("fastervlm")
def fastervlm(budget=64) -> PruningMethod:
    """FasterVLM: before the LLM, keep the visual tokens the vision encoder's [CLS] attends to most.

    .. math:: S = \\operatorname{top-}k_i \\; \\tfrac{1}{H} \\sum_h \\mathrm{Attn}_h([\\mathrm{CLS}] \\to i)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).

    Returns
    -------
    PruningMethod
        One stage before the LLM: top-k of :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    Signal: ``cls_attention`` (mean over heads, at the encoder layer whose features are used).
    ``O(N log N)``. Models without a [CLS] token (SigLIP towers) cannot supply it. What the paper
    leaves open and what we chose: the encoder layer of the attention (we take the layer whose
    features the projector reads, LLaVA's penultimate one) and the head reduction (mean; a sum
    ranks the same).

    References
    ----------
    Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
    Inference Faster" (FasterVLM), arXiv:2412.01818.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("fastervlm", torch.randn(1, 6, 4), relevance=torch.arange(6.0)[None], budget=2).indices
    tensor([[4, 5]])
    """
    return _one_stage(_crit("relevance"), _sel("topk"), budget, relevance="cls_attention")


@_methods.register("visionzip")
def visionzip(budget=64, contextual_ratio=10 / 64, merge="mean", merge_by="features") -> PruningMethod:
    """VisionZip: [CLS]-dominant tokens plus a few contextual tokens merged from the rest.

    Parameters
    ----------
    budget : int or float
        Tokens kept in all (default 64; the paper's 54 + 10 split).
    contextual_ratio : float
        Share of the budget given to contextual tokens (default ``10 / 64``: 54+10, 108+20 and 162+30
        for 64, 128 and 192, the paper's splits, and the same ratio for other budgets).
    merge : {"mean", "target_plus_mean"}
        How a contextual token is formed (see :class:`~tokenprune.methods.visionzip.VisionZip`).
    merge_by : {"features", "keys"}
        Similarity used to assign tokens to contextual targets.

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"visionzip"`` selector on
        :class:`~tokenprune.criteria.Relevance`. Its selections carry merged ``features``.

    Raises
    ------
    BudgetError, ValueError
        Invalid budget or parameters.

    Notes
    -----
    Signals: ``cls_attention`` (VisionZip sums the heads; the ranking is the same as the mean), and
    ``keys`` (an extra ``[B, N, Dk]`` signal) when ``merge_by="keys"``.

    References
    ----------
    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    arXiv:2412.04467.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> sel = tp.select("visionzip", torch.randn(1, 16, 4), relevance=torch.rand(1, 16), budget=8)
    >>> sel.indices.shape, sel.features.shape
    (torch.Size([1, 8]), torch.Size([1, 8, 4]))
    """
    return _one_stage(_crit("relevance"), _sel("visionzip", contextual_ratio=contextual_ratio, merge=merge,
                                               merge_by=merge_by), budget, relevance="cls_attention")


@_methods.register("divprune")
def divprune(budget=64) -> PruningMethod:
    """DivPrune: before the LLM, keep a max-min diverse subset of the projected features.

    .. math:: i^\\ast = \\arg\\max_{i \\notin S} \\min_{s \\in S} \\big(1 - \\cos(h_i, h_s)\\big)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"max_min"`` selector.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    No signal: the features alone (no text, no attention). Greedy max-min dispersion, ``O(K N)``
    after the similarity matrix. What the paper leaves open and what we chose: the first pick (the
    token farthest from its nearest neighbour, as the reference code) and ties (lowest index); the
    features are the projected ones, as in the paper.

    References
    ----------
    Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
    (CVPR 2025), arXiv:2503.02175.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("divprune", torch.randn(2, 10, 4), budget=3).counts
    tensor([3, 3])
    """
    selector = _sel("max_min")
    objective = None
    if getattr(selector, "needs_objective", True):
        objective = _crit("diversity")
    return _one_stage(objective, selector, budget)


@_methods.register("cdpruner")
def cdpruner(budget=64, quality="given", theta=None) -> PruningMethod:
    """CDPruner: before the LLM, the MAP subset of a DPP conditioned on the instruction.

    .. math:: L = \\operatorname{diag}(q)\\, F\\, \\operatorname{diag}(q), \\qquad
              S = \\arg\\max_{|S| = k} \\log\\det L_S

    with ``F`` the cosine similarity of the projected features and ``q`` the instruction relevance
    (min-max normalised text-image similarity), maximised by fast greedy MAP inference.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    quality : {"given", "text_similarity", None}
        Where ``q`` comes from: ``"given"`` (default) reads ``relevance``, which the adapter fills with
        the instruction relevance (``Stage.relevance="text_similarity"``); ``"text_similarity"``
        computes it from ``text_embeddings`` in the feature space; ``None`` drops the condition
        (``q = 1``, a plain DPP).
    theta : float, optional
        Relevance-diversity trade-off of :class:`~tokenprune.criteria.LogDet` (``None``: ``q`` as is).

    Returns
    -------
    PruningMethod
        One stage before the LLM: ``dpp_map`` on :class:`~tokenprune.criteria.LogDet`.

    Raises
    ------
    BudgetError, ValueError
        Invalid budget or parameters.

    Notes
    -----
    Signal: ``text_similarity`` (the adapter computes the instruction relevance and passes it as
    ``relevance``; min-max normalised by the criterion, as the paper). Greedy MAP with an
    incremental Cholesky factor (Chen et al. 2018), ``O(K² N)``. On LLaVA-NeXT the paper runs it per
    crop. What the paper leaves open: CDPruner computes the relevance with the vision encoder's
    text tower (before the projector); adapters supply the closest signal they have.

    References
    ----------
    Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs" (CDPruner, NeurIPS 2025), arXiv:2506.10967.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("cdpruner", torch.randn(1, 10, 4), relevance=torch.rand(1, 10), budget=3).counts
    tensor([3])
    """
    return _one_stage(_crit("log_det", quality=quality, theta=theta), _sel("dpp_map"), budget,
                      relevance="text_similarity" if quality == "given" else None)


@_methods.register("facility_location")
def facility_location(budget=64) -> PruningMethod:
    """Facility location: before the LLM, greedily maximise coverage of the visual tokens.

    .. math:: f(S) = \\sum_{j \\in V} \\max\\big(0, \\max_{s \\in S} \\cos(h_j, h_s)\\big)

    TOPS's coverage term alone: an ablation and a query-free baseline.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).

    Returns
    -------
    PruningMethod
        One stage before the LLM: ``facility_location_greedy`` on
        :class:`~tokenprune.criteria.Coverage`.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    No signal. Monotone submodular, so greedy is a ``(1 - 1/e)`` approximation; ``O(K N²)``. Not
    a paper's method: negative similarities count as 0 (the clamp keeps ``f`` monotone), and the
    selector is lazy greedy (the same picks as plain greedy).

    References
    ----------
    Nemhauser, Wolsey and Fisher (1978); TOPS, arXiv:2606.27161 (coverage term).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("facility_location", torch.randn(1, 10, 4), budget=3).counts
    tensor([3])
    """
    return _one_stage(_crit("coverage"), _sel("facility_location_greedy"), budget)


@_methods.register("scope")
def scope(budget=64, alpha=1.0, combine="multiply") -> PruningMethod:
    """SCOPE: before the LLM, greedily keep tokens by coverage gain weighted by [CLS] saliency.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    alpha : float
        Saliency exponent (default 1.0).
    combine : {"multiply", "add"}
        How saliency and coverage gain combine (default ``"multiply"``).

    Returns
    -------
    PruningMethod
        One stage before the LLM: lazy greedy on :class:`SaliencyCoverage` (``"saliency_coverage"``).

    Raises
    ------
    BudgetError, ValueError
        Invalid budget or parameters.

    Notes
    -----
    Signal: ``cls_attention``. ``O(K N²)``, with lazy greedy (exact, since the score never grows).
    What the paper leaves open and what we chose: see :class:`SaliencyCoverage` (saliency at the
    projected features instead of the encoder's penultimate layer; ``alpha = 1`` as the reference
    code's default).

    References
    ----------
    Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs",
    arXiv:2510.24214.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("scope", torch.randn(1, 10, 4), relevance=torch.rand(1, 10), budget=3).counts
    tensor([3])
    """
    return _one_stage(_crit("saliency_coverage", alpha=alpha, combine=combine), _sel("greedy", lazy=True), budget,
                      relevance="cls_attention")


@_methods.register("random")
def random(budget=64, seed=None) -> PruningMethod:
    """Random: before the LLM, keep a uniform random subset of the visual tokens (sorted).

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    seed : int, optional
        Seed of the ``"random"`` selector; the same seed gives the same subset. ``None`` (default)
        uses the context's seed (``tokenprune.select(..., seed=...)``, 0 unless given).

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"random"`` selector and no objective.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    No signal. A strong baseline (arXiv:2502.11501): spatially spread tokens keep position
    information. Kept indices are sorted: unsorted subsets scramble positions. What the paper leaves
    open: the sampling; we draw uniformly without replacement, seeded, with one generator for the
    whole batch (a sample's subset depends on its position in the batch; fix ``seed`` per sample
    for per-sample reproducibility).

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("random", torch.randn(1, 10, 4), budget=3).counts
    tensor([3])
    """
    return _one_stage(None, _sel("random", seed=seed), budget)


@_methods.register("pooling")
def pooling(budget=64) -> PruningMethod:
    """Pooling: before the LLM, 2-D average pooling of the patch grid down to the budget.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"pooling"`` selector, whose selections carry the pooled
        ``features``.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    Signal: the patch ``grid`` (rows, cols), or the adapters' token coordinates when a sample has
    several grids (anyres crops, tiles): each crop is then pooled on its own, with a share of the
    budget proportional to its tokens. A strong baseline (arXiv:2502.11501): spatial uniformity
    helps. How the pooled grid is shaped for a given count is the selector's choice.

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.get_method("pooling").stages[0].objective is None
    True
    """
    return _one_stage(None, _sel("pooling"), budget)
