"""SCOPE: coverage gain weighted by [CLS] saliency, greedily, before the LLM.

The criterion is :class:`~tokenprune.criteria.SaliencyCoverage` (``"saliency_coverage"``).
"""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["scope"]


@registry.methods.register("scope")
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
        One stage before the LLM: lazy greedy on :class:`~tokenprune.criteria.SaliencyCoverage`
        (``"saliency_coverage"``).

    Raises
    ------
    BudgetError, ValueError
        Invalid budget or parameters.

    Notes
    -----
    Signal: ``cls_attention``. ``O(K N²)``, with lazy greedy (exact, since the score never grows).
    What the paper leaves open and what we chose: see :class:`~tokenprune.criteria.SaliencyCoverage` (saliency at the
    projected features instead of the encoder's penultimate layer; ``alpha = 1`` as the reference
    code's default).

    Checked against kinredon/SCOPE@6bf73069 (``SCOPE`` in ``scope/clip_encoder.py``, the LLaVA-1.5
    path): on the same features and [CLS] attention (summed over heads), the kept sets are identical
    at N = 576, D = 1024 (``tests/test_fidelity.py``). Remaining differences: the coverage sums run on
    similarities rounded to a ``2^-15`` grid (:class:`~tokenprune.criteria.Coverage`), so two
    near-tied tokens (scores within about ``N 2^-15`` times their saliency) can be picked in the other
    order, which changes the kept set when the swap straddles the budget (rare: none in 69 seeded
    cases of the test's distribution, 3 in 108 on other feature distributions); through
    :func:`tokenprune.prune` the similarities are those of the projected features, where the official
    code uses the vision tower's penultimate hidden states (before the projector) and, on LLaVA-NeXT,
    an equal share of the budget per crop. See ``docs/fidelity.rst``.

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
    return one_stage(crit("saliency_coverage", alpha=alpha, combine=combine), sel("greedy", lazy=True), budget,
                      relevance="cls_attention")
