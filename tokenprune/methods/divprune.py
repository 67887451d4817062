"""DivPrune: a max-min diverse subset of the projected features, before the LLM."""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["divprune"]


@registry.methods.register("divprune")
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
    selector = sel("max_min")
    objective = None
    if getattr(selector, "needs_objective", True):
        objective = crit("diversity")
    return one_stage(objective, selector, budget)
