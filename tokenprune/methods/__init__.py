"""Methods: registered compositions of criteria, selectors, budgets and stages."""

from .compose import PruningMethod, Stage, compose

__all__ = ["PruningMethod", "Stage", "compose"]
