"""The selector contract: optimise an objective over visual tokens under a budget."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..budget import as_budget
from ..context import TokenContext
from ..criteria._loops import rank_keys
from ..criteria.base import Criterion
from ..errors import ConfigError, IncompatibleComponentsError
from ..selection import Selection, from_order


class Selector(ABC):
    """Base class of every selector.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` holding only parameters, and implement
    :meth:`_select`. :meth:`select` validates the budget and the objective first.

    Attributes
    ----------
    needs_objective : bool
        False for selectors that ignore the objective (random, pooling).
    objective_types : tuple of type
        Criterion types the selector accepts (empty: any criterion).
    exact_budget : bool
        True when the selector keeps exactly ``min(budget, valid)`` tokens per sample; False for
        selectors that may keep fewer (pooling to a grid that fits the budget).
    signals : frozenset of str
        Context signals the selector reads itself, beyond its objective's (e.g. DART's
        ``text_embeddings``, ``text_relevance`` and ``positions``); the runtime supplies them.
    """

    needs_objective: ClassVar[bool] = True
    objective_types: ClassVar[tuple] = ()
    exact_budget: ClassVar[bool] = True
    signals: ClassVar[frozenset] = frozenset()

    def select(self, objective: Criterion | None, ctx: TokenContext, budget) -> Selection:
        """Keep ``min(budget, valid)`` tokens per sample.

        Parameters
        ----------
        objective : Criterion or None
            What to maximise (``None`` only for selectors with ``needs_objective = False``).
        ctx : TokenContext
            The tokens and signals.
        budget : int, float or Budget
            Tokens kept (int) or fraction kept (float in (0, 1]).

        Returns
        -------
        Selection
            ``indices`` long ``[B, K]`` with ``K = max_b min(budget, valid_b)``, ascending.

        Raises
        ------
        BudgetError
            Invalid budget.
        IncompatibleComponentsError
            Objective missing, or of a type this selector cannot optimise.
        MissingSignalError
            The objective needs a signal the context lacks.
        """
        budget = as_budget(budget)
        self.check_objective(objective)
        if objective is not None:
            objective.check(ctx)
        k = budget.resolve_batch(ctx.n_valid)
        return self._select(objective, ctx, k)

    def check_objective(self, objective) -> None:
        """Raise :class:`~tokenprune.errors.IncompatibleComponentsError` unless this selector can optimise
        ``objective``."""
        if objective is None and self.needs_objective:
            raise IncompatibleComponentsError(f"{type(self).__name__} needs an objective (a Criterion)")
        if objective is not None and self.objective_types and not isinstance(objective, self.objective_types):
            names = ", ".join(t.__name__ for t in self.objective_types)
            raise IncompatibleComponentsError(f"{type(self).__name__} optimises only {names} objectives, "
                                              f"got {type(objective).__name__}")

    @abstractmethod
    def _select(self, objective: Criterion | None, ctx: TokenContext, k: torch.Tensor) -> Selection:
        """Select ``k[b]`` (long ``[B]``, ``1 <= k[b] <= valid_b``) tokens in each row."""

    def to_config(self) -> dict:
        """Plain JSON-able dict ``{"name": ..., "params": {...}}``; round-trips through :func:`selector_from_config`."""
        from ..registry import selectors

        name = selectors.name_of(self)
        if name is None:
            raise ConfigError(f"{type(self).__name__} is not registered; register it with "
                              "tokenprune.register_selector")
        return {"name": name, "params": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


def selector_from_config(cfg) -> Selector:
    """A selector from a registered name or :meth:`Selector.to_config` output.

    Parameters
    ----------
    cfg : str or dict
        A registered name (built with its defaults) or ``{"name": ..., "params": {...}}``.

    Returns
    -------
    Selector

    Raises
    ------
    ConfigError
        Not a name or a dict with a ``name``, or parameters the selector does not take.
    UnknownNameError
        No selector of that name.
    """
    from ..registry import selectors

    if isinstance(cfg, str):
        return selectors.get(cfg)()
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError(f"a selector config is a dict with a 'name', got {cfg!r}")
    try:
        return selectors.get(cfg["name"])(**cfg.get("params", {}))
    except TypeError as exc:
        raise ConfigError(f"bad parameters for selector {cfg['name']!r}: {exc}") from None


def as_selector(obj) -> Selector:
    """A selector from a selector, a registered name or a config dict.

    Parameters
    ----------
    obj : Selector, str or dict
        Returned as is, or built by :func:`selector_from_config`.

    Returns
    -------
    Selector

    Raises
    ------
    IncompatibleComponentsError
        ``obj`` is of another type.
    """
    if isinstance(obj, Selector):
        return obj
    if isinstance(obj, (str, dict)):
        return selector_from_config(obj)
    raise IncompatibleComponentsError(f"expected a Selector, a registered selector name or a config dict, "
                                      f"got {type(obj).__name__}")


def greedy_loop(objective: Criterion, ctx: TokenContext, k: torch.Tensor, pick=None) -> Selection:
    """Plain batched greedy: ``K = max(k)`` steps, each adding the candidate with the largest gain.

    The generic loop of :class:`~tokenprune.selectors.Greedy`, exported as a building block for
    selectors (the one plain-greedy loop of the package).

    Parameters
    ----------
    objective : Criterion
        What to maximise.
    ctx : TokenContext
        The tokens.
    k : torch.Tensor
        long ``[B]`` picks per row (``1 <= k[b] <= valid_b``); rows stop once they hold ``k[b]``.
    pick : callable, optional
        ``pick(gains float [B, N], candidates bool [B, N], step) -> long [B]`` chooses among the
        candidates (default: argmax; ties go to the lowest index).

    Returns
    -------
    Selection
        Gains are those of each pick when it was added.

    Notes
    -----
    ``O(K)`` calls of ``objective.gains``; a step drops its pick from the candidates with one
    ``scatter_`` (no advanced indexing).
    """
    B, N = ctx.mask.shape
    device = ctx.device
    K = int(k.max())
    valid = torch.arange(K, device=device)[None] < k[:, None].to(device)
    all_active_upto = int(k.min())  # steps at which every row is still active
    cand = ctx.mask.clone()
    state = objective.prepare(ctx)
    orders, gains = [], []
    for t in range(K):
        active = valid[:, t]
        g = objective.gains(ctx, state, cand).float()
        if pick is None:
            idx = torch.where(cand, rank_keys(g), float("-inf")).argmax(1)
            best = torch.where(cand.gather(1, idx[:, None]), g.gather(1, idx[:, None]), float("-inf")).squeeze(1)
        else:
            idx = pick(g, cand, t)
            best = g.gather(1, idx[:, None]).squeeze(1)
        at = idx[:, None]
        cand.scatter_(1, at, False if t < all_active_upto else ~active[:, None] & cand.gather(1, at))
        orders.append(idx)
        gains.append(best)
        state = objective.update(ctx, state, idx, active)
    return from_order(torch.stack(orders, 1), torch.stack(gains, 1), valid)
