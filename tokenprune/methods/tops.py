"""TOPS: greedy relevance + coverage + diversity, at a schedule of pruning points (Token Optimal
Preservation Sets).

The objective is :class:`~tokenprune.criteria.TOPSObjective` (``"tops_objective"``); this module
holds the method factory and its named schedules.
"""

from __future__ import annotations

from .. import registry
from ..budget import Budget, as_budget, round_count
from ..errors import ConfigError, StageError
from ._parts import crit, sel
from .compose import PruningMethod, Stage

__all__ = ["tops", "TOPS_SCHEDULES"]

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
        return [round_count(budget.value * c) for c in multiples]
    out, prev = [], 1.0
    for c in multiples:
        a = min(1.0, budget.value * c)
        out.append(min(1.0, a / prev))
        prev = a
    return out


@registry.methods.register("tops")
def tops(budget=None, coverage_weight=0.5, diversity_weight=0.5, normalize="minmax", stage1_weights=(0.5, 0.5),
         raters="last_token", positions="compact", schedule="llava", reference_depth=None, clamp_m=False,
         compute_dtype="float32") -> PruningMethod:
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
    clamp_m : bool
        ``False`` (default, the paper's ``m_j(S) = max_{k∈S} sim(h_j, h_k)``) or ``True``
        (``max(0, ·)``, facility location's baseline; see :class:`~tokenprune.criteria.TOPSObjective`).
        They differ only where a token's similarities to the kept set are all negative, which happens
        on hidden states inside the LLM.
    compute_dtype : {"float32", "model"}
        Arithmetic of the similarities (see :class:`~tokenprune.methods.compose.Stage`; default
        ``"float32"``).

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
    >>> m = tp.create_method("tops", budget=64)
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
        objective = crit("tops_objective", coverage_weight=cw, diversity_weight=dw, normalize=normalize,
                         clamp_m=clamp_m)
        stages.append(Stage(objective=objective, selector=sel("greedy"), budget=b, layer=layer,
                            reference_depth=None if layer is None else depth,
                            relevance="cls_attention" if layer is None else "text_attention",
                            raters=raters, positions=positions, compute_dtype=compute_dtype))
    return PruningMethod(stages=tuple(stages), nominal_budget=nominal if isinstance(schedule, str) else None)
