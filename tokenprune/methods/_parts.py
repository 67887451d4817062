"""Small helpers shared by the registered method factories of :mod:`tokenprune.methods`.

Factories build their stages from criteria and selectors looked up by registered name, the same
public path a plugin uses, so a component replaced in the registry is picked up by every method.
"""

from __future__ import annotations

from .. import registry
from ..criteria.base import Criterion
from ..selectors.base import Selector
from .compose import PruningMethod, Stage

__all__ = ["crit", "sel", "one_stage"]


def crit(name: str, **params) -> Criterion:
    """The criterion registered as ``name``, built with ``params``.

    Raises
    ------
    UnknownNameError
        No criterion of that name.
    TypeError, ValueError
        Parameters the criterion does not take or rejects.
    """
    return registry.criteria.create(name, **params)


def sel(name: str, **params) -> Selector:
    """The selector registered as ``name``, built with ``params``.

    Raises
    ------
    UnknownNameError
        No selector of that name.
    TypeError, ValueError
        Parameters the selector does not take or rejects.
    """
    return registry.selectors.create(name, **params)


def one_stage(objective, selector, budget, *, relevance=None, layer=None, reference_depth=None,
              raters="last_token", positions="preserve", compute_dtype="float32") -> PruningMethod:
    """A single-stage :class:`PruningMethod` (its nominal budget is the stage's budget).

    Parameters are those of :class:`~tokenprune.methods.compose.Stage`.

    Raises
    ------
    BudgetError, StageError, IncompatibleComponentsError
        As :class:`~tokenprune.methods.compose.Stage`.
    """
    return PruningMethod(stages=(Stage(objective=objective, selector=selector, budget=budget, layer=layer,
                                       reference_depth=reference_depth, relevance=relevance, raters=raters,
                                       positions=positions, compute_dtype=compute_dtype),))
