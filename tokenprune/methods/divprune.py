"""DivPrune: a max-min diverse subset of the projected features, before the LLM."""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["divprune"]


@registry.methods.register("divprune")
def divprune(budget=64, compute_dtype="float32") -> PruningMethod:
    """DivPrune: before the LLM, keep a max-min diverse subset of the projected features.

    .. math:: i^\\ast = \\arg\\max_{i \\notin S} \\min_{s \\in S} \\big(1 - \\cos(h_i, h_s)\\big)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    compute_dtype : {"float32", "model"}
        ``"float32"`` (default): similarities and distances in float32. ``"model"``: DivPrune's
        arithmetic in the features' own dtype, op for op, so that on fp16 features the kept set is
        the released fp16 scripts' bit for bit (see :class:`~tokenprune.selectors.MaxMin`). float32
        is the default because fp16 rounding turns near-duplicate patches into ties whose order
        depends on the device and kernels.

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"max_min"`` selector.

    Raises
    ------
    BudgetError
        Invalid budget.
    StageError
        An unknown ``compute_dtype``.

    Notes
    -----
    No signal: the features alone (no text, no attention). Greedy max-min dispersion, ``O(K N)``
    after the similarity matrix. What the paper leaves open and what we chose: the first pick (the
    token farthest from its nearest neighbour, as the reference code) and ties (lowest index); the
    features are the projected ones, as in the paper.

    Official code: vbdi/divprune, commit ``799e2d950aa01ba7860907f5a6d86061f885dca6``
    (``LLaVA/llava/model/llava_arch.py``): the same kept sets in float32, and with
    ``compute_dtype="model"`` the same as its fp16 scripts on fp16 features. The budget is a count
    here; the scripts give a ratio (``SUBSET_RATIO=0.098``: ``round(0.098 * 576) = 56`` tokens on
    LLaVA-1.5), which ``budget=0.098`` reproduces except at exact halves (the scripts' Python ``round`` rounds
    halves to even, our fractions round them up; pass the count for an exact match).

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
    return one_stage(objective, selector, budget, compute_dtype=compute_dtype)
