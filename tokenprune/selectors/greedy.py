"""Greedy maximisation: plain, lazy and stochastic."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import selectors
from .base import Selector, greedy_loop


@selectors.register("greedy")
@dataclass(frozen=True, kw_only=True)
class Greedy(Selector):
    """Greedy maximisation of any criterion: repeatedly add the candidate with the largest marginal gain.

    Parameters
    ----------
    lazy : bool
        Lazy evaluation (Minoux 1978): for criteria tagged submodular, keep stale gains as upper bounds
        and re-evaluate only the best candidates. Same picks as plain greedy (up to ties).
    stochastic : float or None
        Stochastic greedy (Mirzasoleiman et al., AAAI 2015) with this ε in (0, 1): each step looks at
        a random sample of ``(N / K) log(1 / ε)`` candidates. Seeded by the context's seed.

    Notes
    -----
    ``O(K)`` gain evaluations; for monotone submodular criteria a ``(1 - 1/e)`` approximation.
    Greedy has the prefix property: the first ``k`` picks of a run at budget ``K`` are the run at ``k``.
    """

    lazy: bool = False
    stochastic: float | None = None

    def _select(self, objective, ctx, k):
        return greedy_loop(objective, ctx, k)
