"""VisionZip, the method: dominant tokens by [CLS] attention plus merged contextual tokens.

The selector doing the work is :class:`~tokenprune.selectors.VisionZip` (``"visionzip"``), in
:mod:`tokenprune.selectors.visionzip`.
"""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["visionzip"]


@registry.methods.register("visionzip")
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
        How a contextual token is formed (see :class:`~tokenprune.selectors.VisionZip`).
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
    selector = sel("visionzip", contextual_ratio=contextual_ratio, merge=merge, merge_by=merge_by)
    return one_stage(crit("relevance"), selector, budget, relevance="cls_attention")
