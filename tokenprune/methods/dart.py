"""DART: pivot tokens plus the tokens that duplicate them least, inside the LLM.

The criterion is :class:`~tokenprune.criteria.PivotDissimilarity` (``"pivot_dissimilarity"``).
"""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["dart"]


@registry.methods.register("dart")
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
        Reduction of the similarities to the pivots (see :class:`~tokenprune.criteria.PivotDissimilarity`).
    positions : {"preserve", "compact"}
        Position ids of the kept tokens.

    Returns
    -------
    PruningMethod
        One in-LLM stage: top-k of :class:`~tokenprune.criteria.PivotDissimilarity` (``"pivot_dissimilarity"``).

    Raises
    ------
    BudgetError, StageError, ValueError
        Invalid budget, layer or pivot count.

    Notes
    -----
    Signal: ``key_norm`` (the L1 norm of the keys at layer ``K - 1``) as relevance. What the paper
    leaves open and what we chose: see :class:`~tokenprune.criteria.PivotDissimilarity` (image pivots only, one ranking
    by the nearest pivot instead of an even split of the budget across pivots).

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.create_method("dart").stages[0].relevance
    'key_norm'
    """
    return one_stage(crit("pivot_dissimilarity", num_pivots=num_pivots, reduce=reduce), sel("topk"), budget,
                      relevance="key_norm", layer=layer, positions=positions)
