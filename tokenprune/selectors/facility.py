"""Specialised greedy for facility-location coverage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..criteria.coverage import Coverage, facility_location_greedy
from ..errors import ParameterError
from ..registry import selectors
from .base import Selector


@selectors.register("facility_location_greedy")
@dataclass(frozen=True, kw_only=True)
class FacilityLocationGreedy(Selector):
    """Fast exact greedy for :class:`~tokenprune.criteria.Coverage` (facility location).

    Same picks, order and gains as ``Greedy()`` on ``Coverage()`` (ties included), without the
    criterion-protocol overhead: the kept-set state is one int16 vector ``m`` updated in place, and
    candidate gains are read from the fixed-point similarity rows.

    Parameters
    ----------
    lazy : bool
        ``True`` (default): lazy greedy that re-evaluates the most promising candidates in blocks
        (``M`` = 16 per round in the batched path, 32 in the single-sample NumPy path, 4x more per
        further round; ``O(M N)`` per round, one or two rounds for most steps), exact because facility
        location is submodular. ``False``: recompute all gains each step (``O(N²)`` per step; may be
        faster on GPUs, where a few dense passes cost less than a host sync per round).

    Raises
    ------
    ParameterError
        ``lazy`` is not a bool.
    IncompatibleComponentsError
        The objective is not a :class:`~tokenprune.criteria.Coverage`.

    Notes
    -----
    ``O(N²)`` for the fixed-point conversion and the first gains, then ``O(M N)`` per round, after
    the ``O(N² D)`` similarity GEMM: about 3 ms at N = 576, K = 64 and 40-60 ms at N = 2880, K = 192
    on one CPU thread, i.e. 5-6% of the fp32 GEMM at D = 4096 (``benchmarks/results_selectors.txt``).
    One sample on the CPU runs a NumPy loop; batches and GPUs run the batched torch loop (both in
    :mod:`tokenprune.criteria._loops`, run by :func:`tokenprune.criteria.coverage.facility_location_greedy`,
    which ``Greedy(lazy=True)`` on ``Coverage()`` also runs). Padding is never picked.

    References
    ----------
    Minoux 1978 (lazy greedy); Nemhauser, Wolsey & Fisher 1978 (facility location is monotone
    submodular); TOPS, arXiv:2606.27161 (information coverage).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import Coverage
    >>> from tokenprune.selectors import Greedy
    >>> ctx = tp.make_context(torch.randn(1, 64, 8))
    >>> a = FacilityLocationGreedy().select(Coverage(), ctx, 8)
    >>> torch.equal(a.order, Greedy().select(Coverage(), ctx, 8).order)
    True
    """

    objective_types: ClassVar[tuple] = (Coverage,)
    lazy: bool = True

    def __post_init__(self):
        if not isinstance(self.lazy, bool):
            raise ParameterError(f"lazy must be a bool, got {self.lazy!r}")

    def _select(self, objective, ctx, k):
        return facility_location_greedy(ctx, k, lazy=self.lazy)
