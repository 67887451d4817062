"""Facility location: greedy coverage of the visual tokens, before the LLM (a query-free baseline)."""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["facility_location"]


@registry.methods.register("facility_location")
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
    selector is lazy greedy (the same picks as plain greedy). No official code: checked against
    plain greedy on this ``f`` with similarities on :class:`~tokenprune.criteria.Coverage`'s
    ``2^-15`` fixed-point grid, exact integer sums (``tests/test_fidelity.py``). Late greedy gains
    are nearly tied, so exact float32 (or float64) arithmetic picks other tokens in most cases at
    N = 576 (15 of 60 kept sets identical to a float32 greedy; float32 and float64 greedies agree
    in 16 of 60); the grid makes the picks exact and the same on every path and device.

    References
    ----------
    Nemhauser, Wolsey and Fisher (1978); TOPS, arXiv:2606.27161 (coverage term).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("facility_location", torch.randn(1, 10, 4), budget=3).counts
    tensor([3])
    """
    return one_stage(crit("coverage"), sel("facility_location_greedy"), budget)
