"""Specialised greedy for facility-location coverage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..criteria._kernels import coverage_sums, coverage_sums_at, fixed_point_similarity, gather_row
from ..criteria.coverage import Coverage
from ..registry import selectors
from ..selection import from_order
from ._host import lazy_facility_location, use_host
from .base import Selector
from .greedy import lazy_greedy_loop


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
    IncompatibleComponentsError
        The objective is not a :class:`~tokenprune.criteria.Coverage`.

    Notes
    -----
    ``O(N²)`` for the fixed-point conversion and the first gains, then ``O(M N)`` per round, after
    the ``O(N² D)`` similarity GEMM: about 3 ms at N = 576, K = 64 and 40-60 ms at N = 2880, K = 192
    on one CPU thread, i.e. 5-6% of the fp32 GEMM at D = 4096 (``benchmarks/results_selectors.txt``).
    One sample on the CPU runs a NumPy loop (:mod:`tokenprune.selectors._host`); batches and GPUs
    run the batched torch loop. Padding is never picked.

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

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            fq, scale = fixed_point_similarity(ctx)
            B, N = ctx.mask.shape
            m = torch.zeros(B, N, dtype=torch.int16, device=ctx.device)
            first = coverage_sums(fq, m).to(torch.float32)

            def evaluate(index):
                return coverage_sums_at(fq, index, m).to(torch.float32)

            def commit(picked, active):
                r = gather_row(fq, picked)
                if B > 1:
                    r = torch.where(active[:, None], r, m)
                torch.maximum(m, r, out=m)

            if self.lazy and use_host(ctx):
                K = int(k[0])
                o, kk = lazy_facility_location(fq[0].numpy(), first[0].numpy(), ctx.mask[0].cpu().numpy(), K)
                order, keys = torch.from_numpy(o)[None], torch.from_numpy(kk)[None]
                valid = torch.ones(1, K, dtype=torch.bool)
            elif self.lazy:
                order, keys, valid = lazy_greedy_loop(first, evaluate, commit, ctx.mask, k)
            else:
                order, keys, valid = _dense_loop(first, lambda: coverage_sums(fq, m).to(torch.float32),
                                                 commit, ctx.mask, k)
            return from_order(order, keys / scale, valid)


def _dense_loop(first, gains_fn, commit, mask, k):
    B, N = mask.shape
    K = int(k.max())
    valid = torch.arange(K, device=mask.device)[None] < k[:, None].to(mask.device)
    taken = ~mask
    orders, keys = [], []
    for t in range(K):
        g = first if t == 0 else gains_fn()
        best, pick = g.masked_fill(taken, float("-inf")).max(1)
        taken = taken.scatter(1, pick[:, None], True)
        orders.append(pick)
        keys.append(best)
        commit(pick, valid[:, t])
    return torch.stack(orders, 1), torch.stack(keys, 1), valid
