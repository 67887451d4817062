"""Methods: compositions of an objective, a selector and a budget, placed in one or more stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from ..budget import Budget, as_budget
from ..context import make_context
from ..criteria.base import Criterion, as_criterion
from ..errors import ConfigError, StageError
from ..selection import Selection
from ..selectors.base import Selector, as_selector

POSITIONS = ("preserve", "compact")
RATERS = ("last_token", "all_text_mean", "dynamic")
#: Where a stage's relevance scores come from when a method is applied to a model.
RELEVANCE_SOURCES = (None, "cls_attention", "text_attention", "text_similarity", "key_norm")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One pruning point: what to keep, how, how many, and where.

    Parameters
    ----------
    objective : Criterion or None
        What the selector maximises (``None`` for objective-free selectors such as random).
    selector : Selector
        How it is maximised.
    budget : int, float or Budget
        Tokens kept (int) or fraction kept (float in (0, 1]) of the tokens the earlier stages left.
    layer : int or None
        ``None``: before the LLM (after the multimodal projector). ``k >= 1``: inside the LLM, on the
        hidden states entering decoder layer ``k`` (0-based), i.e. after ``k`` layers ran; attention
        signals then come from layer ``k - 1``.
    reference_depth : int or None
        If given, ``layer`` is written for a model with this many decoder layers and is scaled to the
        actual depth ``L`` as ``max(1, round(layer * L / reference_depth))``.
    relevance : str or None
        Source of the relevance signal when applied to a model: ``"cls_attention"`` (vision [CLS] to
        patch), ``"text_attention"`` (text raters to image tokens at layer ``k - 1``),
        ``"text_similarity"`` (cosine of image features and instruction embeddings), ``"key_norm"``
        (L1 norm of keys, DART), or ``None``.
    raters : {"last_token", "all_text_mean", "dynamic"}
        Which text tokens rate the image tokens for ``relevance="text_attention"``.
    positions : {"preserve", "compact"}
        Kept tokens keep their original position ids (``"preserve"``) or are re-indexed (``"compact"``).

    Raises
    ------
    BudgetError, StageError
        Invalid budget, layer, relevance source, raters or positions.
    """

    objective: Criterion | None = None
    selector: Selector
    budget: Any
    layer: int | None = None
    reference_depth: int | None = None
    relevance: str | None = None
    raters: str = "last_token"
    positions: str = "preserve"

    def __post_init__(self):
        object.__setattr__(self, "budget", as_budget(self.budget))
        object.__setattr__(self, "objective", as_criterion(self.objective))
        object.__setattr__(self, "selector", as_selector(self.selector))
        self.selector.check_objective(self.objective)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise StageError(f"layer must be None (before the LLM) or an int >= 1, got {self.layer!r}")
        if self.reference_depth is not None and (not isinstance(self.reference_depth, int)
                                                 or self.reference_depth < 1):
            raise StageError(f"reference_depth must be a positive int, got {self.reference_depth!r}")
        if self.relevance not in RELEVANCE_SOURCES:
            raise StageError(f"relevance must be one of {RELEVANCE_SOURCES}, got {self.relevance!r}")
        if self.raters not in RATERS:
            raise StageError(f"raters must be one of {RATERS}, got {self.raters!r}")
        if self.positions not in POSITIONS:
            raise StageError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @property
    def before_llm(self) -> bool:
        return self.layer is None

    def layer_for_depth(self, depth: int) -> int | None:
        """The decoder layer this stage acts at in a model with ``depth`` layers (``None``: before the LLM)."""
        if self.layer is None:
            return None
        if self.reference_depth is None:
            return self.layer
        return max(1, round(self.layer * depth / self.reference_depth))

    def to_config(self) -> dict:
        return {
            "objective": None if self.objective is None else self.objective.to_config(),
            "selector": self.selector.to_config(),
            "budget": self.budget.to_config(),
            "layer": self.layer,
            "reference_depth": self.reference_depth,
            "relevance": self.relevance,
            "raters": self.raters,
            "positions": self.positions,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Stage":
        if not isinstance(cfg, dict):
            raise ConfigError(f"a stage config is a dict, got {cfg!r}")
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown stage config keys {sorted(unknown)}")
        return cls(**cfg)


@dataclass(frozen=True)
class PruningMethod:
    """A pruning method: one or more :class:`Stage` objects, each acting on what earlier ones kept.

    Build one with :func:`tokenprune.compose`, or get a registered one with
    :func:`tokenprune.get_method`. It round-trips through :meth:`to_config` / :meth:`from_config`.

    Attributes
    ----------
    stages : tuple of Stage
        In application order: before-LLM stages first, then in-LLM stages by increasing layer.
    name : str or None
        The registered name it was built from, if any (informational).
    params : dict
        The parameters it was built with (informational).
    """

    stages: tuple
    name: str | None = None
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        stages = tuple(self.stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise StageError("a method needs at least one Stage")
        pre = [s for s in stages if s.before_llm]
        if len(pre) > 1:
            raise StageError("a method can have at most one stage before the LLM")
        if pre and stages[0] is not pre[0]:
            raise StageError("the before-LLM stage must come first")
        layers = [(s.layer, s.reference_depth) for s in stages if not s.before_llm]
        if len({r for _, r in layers}) > 1:
            raise StageError("in-LLM stages must share one reference_depth")
        order = [layer for layer, _ in layers]
        if order != sorted(set(order)):
            raise StageError(f"in-LLM stages must have strictly increasing layers, got {order}")
        object.__setattr__(self, "stages", stages)

    # -- selection core ----------------------------------------------------------------------------
    def select(self, features, *, budget=None, relevance=None, mask=None, stage: int = 0, **signals) -> Selection:
        """Run one stage's selection on plain tensors (see :func:`tokenprune.select`)."""
        st = self.stages[stage]
        ctx = make_context(features, mask=mask, relevance=relevance, **signals)
        return st.selector.select(st.objective, ctx, st.budget if budget is None else budget)

    @property
    def budget(self) -> Budget:
        """The budget of the last stage (the nominal budget of multi-stage methods)."""
        return self.stages[-1].budget

    @property
    def tags(self):
        obj = self.stages[0].objective
        return None if obj is None else obj.tags

    def with_budget(self, budget) -> "PruningMethod":
        """A copy whose single stage keeps ``budget`` tokens (multi-stage methods: rebuild via the registry)."""
        if len(self.stages) != 1:
            if self.name is None:
                raise StageError("with_budget on a multi-stage method needs the registered method name")
            from ..api import get_method

            return get_method(self.name, **{**self.params, "budget": budget})
        return replace(self, stages=(replace(self.stages[0], budget=budget),))

    # -- config --------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """A plain JSON-able dict."""
        return {"name": self.name, "params": _jsonable(self.params),
                "stages": [s.to_config() for s in self.stages]}

    @classmethod
    def from_config(cls, cfg: dict) -> "PruningMethod":
        """Rebuild a method from :meth:`to_config` output. Raises :class:`ConfigError`."""
        if not isinstance(cfg, dict) or "stages" not in cfg:
            raise ConfigError(f"a method config is a dict with 'stages', got {cfg!r}")
        return cls(stages=tuple(Stage.from_config(s) for s in cfg["stages"]), name=cfg.get("name"),
                   params=dict(cfg.get("params") or {}))


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Budget):
        return v.value
    if hasattr(v, "to_config"):
        return v.to_config()
    return v


def compose(objective=None, *, selector, budget, layer: int | None = None, reference_depth: int | None = None,
            relevance: str | None = None, raters: str = "last_token", positions: str = "preserve",
            name: str | None = None) -> PruningMethod:
    """Compose a single-stage pruning method.

    Parameters
    ----------
    objective : Criterion, str or None
        What to maximise, e.g. ``0.6 * Relevance() + 0.4 * Coverage()``.
    selector : Selector or str
        How, e.g. ``Greedy(lazy=True)`` or ``"greedy"``.
    budget : int or float
        Tokens kept, or fraction kept in (0, 1].
    layer, reference_depth, relevance, raters, positions
        Where the stage acts and where its relevance comes from; see :class:`Stage`.

    Returns
    -------
    PruningMethod

    Raises
    ------
    BudgetError, StageError, IncompatibleComponentsError
        On invalid parts, or a selector that cannot optimise the objective.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> m = tp.compose(tp.criteria.Coverage(), selector="greedy", budget=4)
    >>> m.select(torch.randn(1, 16, 8)).indices.shape
    torch.Size([1, 4])
    """
    stage = Stage(objective=objective, selector=selector, budget=budget, layer=layer,
                  reference_depth=reference_depth, relevance=relevance, raters=raters, positions=positions)
    return PruningMethod(stages=(stage,), name=name)
