"""Baselines without a learned or attention signal: random subsets and spatial average pooling.

The method ``random`` is the function :func:`tokenprune.methods.baselines.random` (this module is
not named ``random``, to keep the standard library's name free).
"""

from __future__ import annotations

from .. import registry
from ._parts import one_stage, sel
from .compose import PruningMethod

__all__ = ["random", "pooling"]


@registry.methods.register("random")
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
    for per-sample reproducibility). No official code: checked against this rule (the ``k`` largest
    of ``N`` uniform keys drawn with the seed) at N = 576 (``tests/test_fidelity.py``).

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
    return one_stage(None, sel("random", seed=seed), budget)


@registry.methods.register("pooling")
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
    helps. How the pooled grid is shaped for a given count is the selector's choice. No official
    code: checked against the documented rule (:class:`~tokenprune.selectors.Pooling`) at N = 576,
    indices and mean features (``tests/test_fidelity.py``); at 64 of 576 tokens (8 x 8 windows of
    3 x 3) it equals ``torch.nn.functional.avg_pool2d``; at 128 and 192 (8 x 16 and 12 x 16 windows)
    the windows partition the grid, 1 or 2 columns wide, where ``adaptive_avg_pool2d`` would average
    overlapping ones.

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.create_method("pooling").stages[0].objective is None
    True
    """
    return one_stage(None, sel("pooling"), budget)
