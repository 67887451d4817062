"""The criterion contract: set functions over visual tokens with incremental marginal gains.

A criterion ``f`` maps a kept set ``S`` to a score. Selectors never call ``f`` itself; they ask for
the marginal gains ``f(S ∪ {i}) - f(S)`` of every candidate ``i`` and update the criterion's state
after each pick:

.. code-block:: python

    state = crit.prepare(ctx)                      # S = {}
    g = crit.gains(ctx, state, candidates)         # [B, N] float32
    state = crit.update(ctx, state, picked, active)

``evaluate(ctx, subset)`` computes ``f(S)`` from scratch; it is slow and exists so that tests (and
:mod:`tokenprune.testing`) can check the gains. Criteria are frozen dataclasses: constructors only
store parameters, and all per-call data lives in the state.

Criteria combine with non-negative weights: ``0.6 * Relevance() + 0.4 * Coverage()`` is a
:class:`WeightedSum`, whose tags are those that still hold for the sum.
"""

from __future__ import annotations

import dataclasses
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import TokenContext
from ..errors import ConfigError, IncompatibleComponentsError, ParameterError
from ..selection import Selection

NORMALIZATIONS = ("none", "minmax", "mean")


@dataclass(frozen=True)
class Tags:
    """What holds for a criterion, so selectors and tests can rely on it.

    Attributes
    ----------
    modular : bool
        ``f(S) = Σ_{i∈S} w_i``: gains never change; top-k is exact.
    monotone : bool
        Gains are never negative.
    submodular : bool
        Gains never increase as ``S`` grows (diminishing returns); lazy greedy is exact.
    exact_gains : bool
        ``gains`` equal ``evaluate(S ∪ {i}) - evaluate(S)``. False for heuristic gains (TOPS's
        diversity term, normalised sums).
    nonincreasing_gains : bool
        Gains of each token never increase as ``S`` grows (implied by ``submodular``; also true of
        the max-min diversity gain, which is not a set function's gain).
    requires : frozenset of str
        Signals the criterion reads from the context (``"relevance"``, ``"text_embeddings"``, ``"grid"``).
    """

    modular: bool = False
    monotone: bool = False
    submodular: bool = False
    exact_gains: bool = True
    nonincreasing_gains: bool = False
    requires: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "requires", frozenset(self.requires))
        if self.submodular and self.exact_gains:
            object.__setattr__(self, "nonincreasing_gains", True)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["requires"] = sorted(self.requires)
        return d


class Criterion(ABC):
    """Base class of every criterion (a set function with incremental marginal gains).

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` and set the class attribute ``tags``.
    """

    tags: ClassVar[Tags] = Tags()

    # -- contract ----------------------------------------------------------------------------------
    def check(self, ctx: TokenContext) -> None:
        """Raise :class:`~tokenprune.errors.MissingSignalError` if a required signal is absent."""
        ctx.require(*sorted(self.tags.requires), by=f"criterion {type(self).__name__}")

    @abstractmethod
    def prepare(self, ctx: TokenContext) -> Any:
        """The state for the empty set ``S = {}``."""

    @abstractmethod
    def gains(self, ctx: TokenContext, state: Any, candidates: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, N]`` marginal gains of adding each token to the current ``S``.

        ``candidates`` (bool ``[B, N]``) marks tokens still selectable (valid, not in ``S``); values
        elsewhere are ignored by selectors. Criteria whose gains are normalised over the candidates
        (TOPS) read it; others may ignore it.
        """

    @abstractmethod
    def update(self, ctx: TokenContext, state: Any, picked: torch.Tensor, active: torch.Tensor) -> Any:
        """The state after adding ``picked`` (long ``[B]``) to ``S`` in the rows where ``active`` (bool ``[B]``)."""

    @abstractmethod
    def evaluate(self, ctx: TokenContext, subset: torch.Tensor) -> torch.Tensor:
        """float32 ``[B]``: ``f(S)`` for ``subset`` (bool ``[B, N]``) computed from scratch (slow; for tests)."""

    def gains_at(self, ctx: TokenContext, state: Any, index: torch.Tensor,
                 candidates: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[B, M]`` gains of the tokens at ``index`` (long ``[B, M]``) for the current ``S``.

        Lazy and stochastic greedy call this to evaluate a few candidates. It must equal
        ``gains(ctx, state, candidates).gather(1, index)`` bit for bit. The default does exactly that
        (``candidates`` defaults to ``ctx.mask``); criteria whose gains for a few tokens are much
        cheaper than for all (facility location: ``O(M N)`` instead of ``O(N²)``) override it.
        """
        cand = ctx.mask if candidates is None else candidates
        return self.gains(ctx, state, cand).float().gather(1, index)

    # -- optional fast path ------------------------------------------------------------------------
    def greedy_fast_path(self, ctx: TokenContext, k: torch.Tensor, *, lazy: bool) -> Selection | None:
        """A specialised greedy run for this criterion, or ``None`` to use the generic loop.

        :class:`~tokenprune.selectors.Greedy` (deterministic: plain or lazy) calls this hook first,
        after validating the budget and the objective, under ``torch.no_grad``; when it returns
        ``None`` (the default) Greedy runs its generic loop over :meth:`prepare`, :meth:`gains`,
        :meth:`gains_at` and :meth:`update`. A criterion overrides it when it can run greedy much
        faster on its own state: :class:`~tokenprune.criteria.Coverage` (lazy greedy on its
        fixed-point state, updated in place), :class:`~tokenprune.criteria.TOPSObjective` (plain
        greedy in NumPy for one sample on the CPU).

        Parameters
        ----------
        ctx : TokenContext
            The tokens; :meth:`check` has already passed.
        k : torch.Tensor
            long ``[B]`` picks per row (``1 <= k[b] <= valid_b``).
        lazy : bool
            Whether Greedy was asked for lazy greedy (``Greedy(lazy=True)``, only for criteria with
            ``tags.nonincreasing_gains``) or plain greedy.

        Returns
        -------
        Selection or None
            Exactly what the generic loop would return (same indices, order and gains, bit for bit,
            ties to the lowest index, padding never picked), or ``None`` where the fast path does not
            apply (a batch, a GPU, the other greedy variant). Subclasses of a criterion with a fast
            path inherit it: one that changes the gains must override this to return ``None``.

        Notes
        -----
        Layering: criteria sit below selectors and never import them. The loop kernels a fast path
        shares with the selectors (lazy greedy over stale bounds, the single-sample NumPy loops) live
        in :mod:`tokenprune.criteria._loops`, at the criteria layer, and the result is built with
        :func:`tokenprune.selection.from_order`.
        """
        return None

    # -- algebra -----------------------------------------------------------------------------------
    def __mul__(self, weight) -> "WeightedSum":
        return WeightedSum.of([(weight, self)])

    __rmul__ = __mul__

    def __add__(self, other) -> "WeightedSum":
        if not isinstance(other, Criterion):
            return NotImplemented
        return WeightedSum.of(_terms(self) + _terms(other))

    def __radd__(self, other):
        if other == 0:  # sum([...])
            return WeightedSum.of(_terms(self))
        return NotImplemented

    # -- config --------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """Plain JSON-able dict ``{"name": ..., "params": {...}}``.

        It round-trips through :func:`criterion_from_config`.
        """
        from ..registry import criteria

        name = criteria.name_of(self)
        if name is None:
            raise ConfigError(f"{type(self).__name__} is not registered, so it has no config name; "
                              "register it with tokenprune.register_criterion")
        return {"name": name, "params": _params(self)}


def _params(obj) -> dict:
    """A dataclass's fields as a JSON-able dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _terms(c: Criterion) -> list:
    """The ``(weight, criterion)`` terms of ``c``: an unnormalised sum's own terms, else ``c`` itself."""
    return list(c.terms) if isinstance(c, WeightedSum) and c.normalize == "none" else [(1.0, c)]


def criterion_from_config(cfg) -> Criterion:
    """Rebuild a criterion from :meth:`Criterion.to_config` output (raises :class:`ConfigError`)."""
    from ..registry import criteria

    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError(f"a criterion config is a dict with a 'name', got {cfg!r}")
    if cfg["name"] == "weighted_sum":
        return WeightedSum.from_config(cfg)
    cls = criteria.get(cfg["name"])
    try:
        return cls(**cfg.get("params", {}))
    except TypeError as exc:
        raise ConfigError(f"bad parameters for criterion {cfg['name']!r}: {exc}") from None


class ModularCriterion(Criterion):
    """A criterion ``f(S) = Σ_{i∈S} s_i`` from per-token scores: implement :meth:`scores` only.

    Padding positions are handled by the base class. Modular functions are submodular; they are
    monotone when the scores are non-negative, which subclasses declare in their tags.
    """

    tags: ClassVar[Tags] = Tags(modular=True, submodular=True)

    @abstractmethod
    def scores(self, ctx: TokenContext) -> torch.Tensor:
        """float ``[B, N]`` per-token scores."""

    def prepare(self, ctx):
        self.check(ctx)
        return self.scores(ctx).float().masked_fill(~ctx.mask, 0.0)

    def gains(self, ctx, state, candidates):
        return state

    def gains_at(self, ctx, state, index, candidates=None):
        return state.gather(1, index)

    def update(self, ctx, state, picked, active):
        return state

    def evaluate(self, ctx, subset):
        self.check(ctx)
        s = self.scores(ctx).float()
        return (s * (subset & ctx.mask)).sum(1)


def normalize_gains(gains: torch.Tensor, candidates: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise float ``[B, N]`` gains over the current candidates of each row.

    ``"minmax"`` maps the candidates' range to [0, 1] (all equal: 0); ``"mean"`` divides by the
    candidates' mean (the TOPS appendix's variant; a mean of 0 leaves the gains as they are);
    ``"none"`` returns them unchanged. Non-candidates are left as they are (selectors ignore them).
    """
    if mode == "none":
        return gains
    inf = torch.tensor(float("inf"), device=gains.device)
    if mode == "minmax":
        lo = torch.where(candidates, gains, inf).amin(1, keepdim=True)
        hi = torch.where(candidates, gains, -inf).amax(1, keepdim=True)
        span = hi - lo
        ok = torch.isfinite(span) & (span > 0)
        return torch.where(ok, (gains - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(gains))
    if mode == "mean":
        n = candidates.sum(1, keepdim=True).clamp_min(1)
        mean = (gains * candidates).sum(1, keepdim=True) / n
        ok = mean.abs() > 1e-12
        return torch.where(ok, gains / torch.where(ok, mean.abs(), torch.ones_like(mean)), gains)
    raise ParameterError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")


@dataclass(frozen=True, kw_only=True)
class WeightedSum(Criterion):
    """A non-negative weighted sum of criteria, ``f(S) = Σ_t w_t f_t(S)``.

    With ``normalize="none"`` the gains are the weighted sums of the terms' gains, and the sum keeps
    every tag its terms share (a non-negative sum of submodular functions is submodular, of monotone
    functions monotone). With ``"minmax"`` or ``"mean"``, each term's gains are normalised over the
    current candidates before weighting, as TOPS does; the gains are then a heuristic and only
    ``requires`` is kept.

    Parameters
    ----------
    terms : tuple of (float, Criterion)
        Weights (``>= 0``, finite) and criteria.
    normalize : {"none", "minmax", "mean"}
        Per-step normalisation of each term's gains.

    Raises
    ------
    ParameterError
        A negative or non-finite weight, an empty sum, or an unknown ``normalize``.
    """

    terms: tuple
    normalize: str = "none"

    def __post_init__(self):
        if not self.terms:
            raise ParameterError("a weighted sum needs at least one term")
        clean = []
        for t in self.terms:
            w, c = t
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not float(w) >= 0 or w == float("inf"):
                raise ParameterError(f"criterion weights must be finite and >= 0, got {w!r}")
            if not isinstance(c, Criterion):
                raise IncompatibleComponentsError(f"only criteria can be weighted and summed, got {type(c).__name__}")
            clean.append((float(w), c))
        object.__setattr__(self, "terms", tuple(clean))
        if self.normalize not in NORMALIZATIONS:
            raise ParameterError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    @classmethod
    def of(cls, terms, normalize: str = "none") -> "WeightedSum":
        return cls(terms=tuple(terms), normalize=normalize)

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        ts = [c.tags for _, c in self.terms]
        req = frozenset().union(*(t.requires for t in ts))
        if self.normalize != "none":
            return Tags(exact_gains=False, requires=req)
        return Tags(modular=all(t.modular for t in ts), monotone=all(t.monotone for t in ts),
                    submodular=all(t.submodular for t in ts), exact_gains=all(t.exact_gains for t in ts),
                    nonincreasing_gains=all(t.nonincreasing_gains for t in ts), requires=req)

    def check(self, ctx):
        for _, c in self.terms:
            c.check(ctx)

    def prepare(self, ctx):
        return [c.prepare(ctx) for _, c in self.terms]

    def term_gains(self, ctx, state, candidates) -> list:
        """Each term's (normalised) gains, unweighted: a list of float32 ``[B, N]``."""
        return [normalize_gains(c.gains(ctx, s, candidates).float(), candidates, self.normalize)
                for (_, c), s in zip(self.terms, state)]

    def gains(self, ctx, state, candidates):
        out = None
        for (w, _), g in zip(self.terms, self.term_gains(ctx, state, candidates)):
            out = w * g if out is None else out + w * g
        return out

    def gains_at(self, ctx, state, index, candidates=None):
        if self.normalize != "none":  # normalisation needs every candidate's gain
            return super().gains_at(ctx, state, index, candidates)
        out = None
        for (w, c), s in zip(self.terms, state):
            g = c.gains_at(ctx, s, index, candidates).float()
            out = w * g if out is None else out + w * g
        return out

    def update(self, ctx, state, picked, active):
        return [c.update(ctx, s, picked, active) for (_, c), s in zip(self.terms, state)]

    def evaluate(self, ctx, subset):
        return sum(w * c.evaluate(ctx, subset) for w, c in self.terms)

    def to_config(self) -> dict:
        return {"name": "weighted_sum", "normalize": self.normalize,
                "terms": [[w, c.to_config()] for w, c in self.terms]}

    @classmethod
    def from_config(cls, cfg) -> "WeightedSum":
        try:
            return cls(terms=tuple((float(w), criterion_from_config(c)) for w, c in cfg["terms"]),
                       normalize=cfg.get("normalize", "none"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad weighted_sum config: {exc}") from None


def as_criterion(obj) -> Criterion | None:
    """A criterion from a criterion, a registered name, a config dict, or ``None``."""
    if obj is None or isinstance(obj, Criterion):
        return obj
    if isinstance(obj, str):
        from ..registry import criteria

        return criteria.get(obj)()
    if isinstance(obj, dict):
        return criterion_from_config(obj)
    raise IncompatibleComponentsError(f"expected a Criterion, a registered criterion name or a config dict, "
                                      f"got {type(obj).__name__}")


