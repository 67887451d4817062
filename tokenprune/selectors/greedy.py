"""Greedy maximisation: plain, lazy and stochastic."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..criteria._loops import lazy_greedy_loop, rank_keys
from ..errors import IncompatibleComponentsError, ParameterError
from ..registry import selectors
from ..selection import Selection, from_order
from .base import Selector, greedy_loop

_NEG = float("-inf")


@selectors.register("greedy")
@dataclass(frozen=True, kw_only=True)
class Greedy(Selector):
    """Greedy maximisation of any criterion: repeatedly add the candidate with the largest marginal gain.

    Parameters
    ----------
    lazy : bool
        Lazy evaluation (Minoux 1978) for criteria whose gains never increase as ``S`` grows
        (``tags.nonincreasing_gains``: submodular criteria, :class:`~tokenprune.criteria.Diversity`).
        Each token's last computed gain is an upper bound of its current gain; each step re-evaluates
        only the ``16`` candidates with the largest bounds (through ``Criterion.gains_at``, ``O(M N)``
        for facility location) and stops as soon as the best fresh gain beats every remaining bound.
        It picks exactly what plain greedy picks, ties included (lowest index).
    stochastic : float or None
        Stochastic greedy (Mirzasoleiman et al. 2015) with this ``ε`` in (0, 1): each step evaluates a
        uniform sample of ``ceil((n / k) log(1 / ε))`` of the remaining candidates (``n`` valid
        tokens, ``k`` budget, per sample) and adds the best. Expected ``(1 - 1/e - ε)`` approximation
        for monotone submodular criteria; works with any criterion. Seeded by ``ctx.seed``.

    Raises
    ------
    ParameterError
        ``stochastic`` outside (0, 1), or both ``lazy`` and ``stochastic``.
    IncompatibleComponentsError
        ``lazy=True`` with a criterion whose gains may increase (e.g. TOPS's normalised score).

    Notes
    -----
    Plain greedy makes ``K`` calls of ``objective.gains`` (``O(K N²)`` for facility location, ``O(K N)``
    for TOPS with its incremental coverage, after the GEMM). For monotone submodular criteria greedy
    is a ``(1 - 1/e)`` approximation (Nemhauser et al. 1978). Greedy has the prefix property: the
    first ``k`` picks of a run at budget ``K`` are the run at ``k``. Ties go to the lowest index.
    Rows of a batch are independent; padding is never picked.

    Specialised loops with the same picks and gains are used where a criterion offers one through
    :meth:`Criterion.greedy_fast_path <tokenprune.criteria.Criterion.greedy_fast_path>`: lazy greedy
    on :class:`~tokenprune.criteria.Coverage` runs the loop of :class:`FacilityLocationGreedy`, and
    plain greedy on :class:`~tokenprune.criteria.TOPSObjective` for one sample on the CPU runs its
    NumPy loop. Otherwise plain greedy runs :func:`~tokenprune.selectors.greedy_loop`.

    References
    ----------
    Minoux, "Accelerated greedy algorithms for maximizing submodular set functions", 1978.
    Mirzasoleiman et al., "Lazier than lazy greedy", AAAI 2015, arXiv:1409.7938.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import Coverage
    >>> ctx = tp.make_context(torch.randn(2, 32, 8))
    >>> a = Greedy().select(Coverage(), ctx, 5)
    >>> b = Greedy(lazy=True).select(Coverage(), ctx, 5)
    >>> bool((a.order == b.order).all())
    True
    """

    lazy: bool = False
    stochastic: float | None = None

    def __post_init__(self):
        if not isinstance(self.lazy, bool):
            raise ParameterError(f"lazy must be a bool, got {self.lazy!r}")
        if self.stochastic is not None:
            eps = self.stochastic
            if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < float(eps) < 1.0:
                raise ParameterError(f"stochastic must be None or an epsilon in (0, 1), got {eps!r}")
            if self.lazy:
                raise ParameterError("choose lazy=True or stochastic=eps, not both")

    def check_objective(self, objective) -> None:
        super().check_objective(objective)
        if self.lazy and not objective.tags.nonincreasing_gains:
            raise IncompatibleComponentsError(
                f"Greedy(lazy=True) needs gains that never increase as the kept set grows (a submodular "
                f"criterion); {type(objective).__name__} does not declare tags.nonincreasing_gains")

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            if self.stochastic is not None:
                return _stochastic_greedy(objective, ctx, k, float(self.stochastic))
            fast = objective.greedy_fast_path(ctx, k, lazy=self.lazy)  # same picks, faster
            if fast is not None:
                return fast
            if self.lazy:
                return _lazy_greedy(objective, ctx, k)
            return greedy_loop(objective, ctx, k)


def _lazy_greedy(objective, ctx, k) -> Selection:
    """Lazy greedy on any criterion with non-increasing gains, through the criterion protocol."""
    state = [objective.prepare(ctx)]
    first = objective.gains(ctx, state[0], ctx.mask).float()

    def evaluate(index):
        """Current gains of the tokens at ``index``."""
        return objective.gains_at(ctx, state[0], index).float()

    def commit(picked, active):
        """Add the picks to the kept set in the active rows."""
        state[0] = objective.update(ctx, state[0], picked, active)

    order, gains, valid = lazy_greedy_loop(first, evaluate, commit, ctx.mask, k)
    return from_order(order, gains, valid)


def _stochastic_greedy(objective, ctx, k, eps: float) -> Selection:
    """Stochastic greedy: each step takes the best of a seeded uniform sample of the candidates."""
    B, N = ctx.mask.shape
    device = ctx.device
    K = int(k.max())
    n = ctx.n_valid.to(device)
    size = torch.ceil(n.double() / k.to(device).clamp_min(1).double() * math.log(1.0 / eps)).long()
    size = torch.minimum(size.clamp_min(1), n)  # per-row sample size
    s_max = int(size.max())
    slots = torch.arange(s_max, device=device)[None] < size[:, None]
    gen = ctx.generator(offset=7919)
    cand = ctx.mask.clone()
    valid = torch.arange(K, device=device)[None] < k[:, None].to(device)
    state = objective.prepare(ctx)
    orders, gains = [], []
    for t in range(K):
        active = valid[:, t]
        noise = torch.rand(B, N, generator=gen).to(device)
        vals, sample = noise.masked_fill(~cand, -1.0).topk(s_max, dim=1)
        sample, pos = sample.sort(1)
        ok = slots.gather(1, pos) & (vals.gather(1, pos) >= 0)
        raw = objective.gains_at(ctx, state, sample, cand).float()
        arg = rank_keys(raw).masked_fill(~ok, _NEG).argmax(1)
        best = torch.where(ok.gather(1, arg[:, None]), raw.gather(1, arg[:, None]), _NEG).squeeze(1)
        pick = sample.gather(1, arg[:, None]).squeeze(1)
        cand.scatter_(1, pick[:, None], ~active[:, None] & cand.gather(1, pick[:, None]))
        orders.append(pick)
        gains.append(best)
        state = objective.update(ctx, state, pick, active)
    return from_order(torch.stack(orders, 1), torch.stack(gains, 1), valid)
