"""Methods: compositions of an objective, a selector and a budget, placed in one or more stages."""

from __future__ import annotations

import dataclasses
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from ..budget import Budget, as_budget
from ..context import COMPUTE_DTYPES, make_context
from ..criteria.base import Criterion, Tags, as_criterion
from ..errors import (ConfigError, IncompatibleComponentsError, ParameterError, ShapeError, StageError,
                      StageIndexError)
from ..registry import methods as _method_registry
from ..selection import Selection
from ..selectors.base import Selector, as_selector

POSITIONS = ("preserve", "compact")
RATERS = ("last_token", "all_text_mean", "dynamic")
#: Where a stage's relevance scores come from when a method is applied to a model.
RELEVANCE_SOURCES = (None, "cls_attention", "text_attention", "text_similarity", "key_norm", "own_layer_attention")
#: What an in-LLM stage's features are: the hidden states entering its layer, or those passed through
#: the LLM's final norm (DART compares tokens after the model's last RMSNorm, with its learned weight).
FEATURE_NORMS = (None, "final_norm")
#: Which prompt tokens an in-LLM stage's text signals cover: every text token, or only those after the
#: last visual token (DART's "query" tokens).
TEXT_TOKENS = ("all", "after_image")
#: Where a stage before the LLM acts: on the projected features (the LLM's visual tokens), or on the
#: vision tower's feature-layer states before the projector (VisionZip), the projector then running on
#: the kept and merged tokens.
SITES = ("projected", "vision")


def _is_int(x) -> bool:
    """Whether ``x`` is an int (or an int-like index, e.g. a NumPy integer)."""
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


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
        ``"text_similarity"`` (the instruction relevance: with :func:`tokenprune.prune`'s
        ``text_encoder``, the vision-language encoder's similarity of each patch to the instruction,
        as CDPruner; without it, cosine of the features and the prompt's text embeddings), ``"key_norm"``
        (L1 norm of keys at layer ``k - 1``, DART), ``"own_layer_attention"`` (in-LLM stages: the
        raters' attention to the image tokens as layer ``k`` itself computes it from the hidden states
        entering it, with its own input norm, query/key projections and rotary embedding,
        PyramidDrop), or ``None``.
    raters : {"last_token", "all_text_mean", "dynamic"}
        Which text tokens rate the image tokens for ``relevance="text_attention"``.
    positions : {"preserve", "compact"}
        Kept tokens keep their original position ids (``"preserve"``) or are re-indexed (``"compact"``).
    feature_norm : {None, "final_norm"}
        In-LLM stages only: ``"final_norm"`` passes the hidden states (visual and text) through the LLM's
        final norm, learned weight included, before the selection sees them (DART). Default ``None``.
    text_tokens : {"all", "after_image"}
        In-LLM stages only: which prompt tokens the text signals (``text_embeddings``,
        ``text_relevance``) cover: every text token (default) or those after the last visual token.
    site : {"projected", "vision"}
        Stages before the LLM only: ``"projected"`` (default) selects among the projected features,
        the visual tokens as the LLM would see them; ``"vision"`` selects among the vision tower's
        feature-layer hidden states of each crop ([CLS] included) before the projector, which then runs
        on the kept (or merged) states, in the selector's ``llm_sequence`` order, with consecutive
        positions (VisionZip). Families whose projector does not act token by token run a
        ``"vision"`` stage as ``"projected"`` (the report notes it).
    compute_dtype : {"float32", "model"}
        Arithmetic of the feature similarities the selection reads (see
        :class:`~tokenprune.TokenContext`): ``"float32"`` (default) upcasts the features first;
        ``"model"`` normalises and multiplies them in their own dtype (fp16, bf16), as reference code
        running in the model's dtype does (DivPrune's released scripts run in fp16). float32 is the
        default because fp16 rounds cosine similarities to about 5e-4 near 1, so near-duplicate
        patches tie and the picks then depend on the tie order of the kernels, i.e. on the device and
        the library version; float32 picks are reproducible across them.

    Raises
    ------
    BudgetError, StageError
        Invalid budget, layer, relevance source, raters, positions, feature_norm, text_tokens, site or
        compute_dtype (or feature_norm and text_tokens on a stage before the LLM, a site other than
        "projected" inside it, ``own_layer_attention`` before the LLM).
    """

    objective: Criterion | None = None
    selector: Selector
    budget: Any
    layer: int | None = None
    reference_depth: int | None = None
    relevance: str | None = None
    raters: str = "last_token"
    positions: str = "preserve"
    feature_norm: str | None = None
    text_tokens: str = "all"
    site: str = "projected"
    compute_dtype: str = "float32"

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
        if self.feature_norm not in FEATURE_NORMS:
            raise StageError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.text_tokens not in TEXT_TOKENS:
            raise StageError(f"text_tokens must be one of {TEXT_TOKENS}, got {self.text_tokens!r}")
        if self.layer is None and (self.feature_norm is not None or self.text_tokens != "all"):
            raise StageError("feature_norm and text_tokens apply to stages inside the LLM (layer >= 1)")
        if self.site not in SITES:
            raise StageError(f"site must be one of {SITES}, got {self.site!r}")
        if self.site != "projected" and self.layer is not None:
            raise StageError(f"site={self.site!r} applies to a stage before the LLM (layer=None), got layer "
                             f"{self.layer}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise StageError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.relevance == "own_layer_attention" and self.layer is None:
            raise StageError("relevance='own_layer_attention' is the attention of the stage's own decoder layer; "
                             "put the stage inside the LLM (layer >= 1)")

    @property
    def before_llm(self) -> bool:
        """Whether the stage acts before the LLM (``layer is None``)."""
        return self.layer is None

    def layer_for_depth(self, depth: int) -> int | None:
        """The decoder layer this stage acts at in a model with ``depth`` layers (``None``: before the LLM)."""
        if self.layer is None:
            return None
        if self.reference_depth is None:
            return self.layer
        return max(1, round(self.layer * depth / self.reference_depth))

    def to_config(self) -> dict:
        """A plain JSON-able dict of the stage (components as their registered configs)."""
        return {
            "objective": None if self.objective is None else self.objective.to_config(),
            "selector": self.selector.to_config(),
            "budget": self.budget.to_config(),
            "layer": self.layer,
            "reference_depth": self.reference_depth,
            "relevance": self.relevance,
            "raters": self.raters,
            "positions": self.positions,
            "feature_norm": self.feature_norm,
            "text_tokens": self.text_tokens,
            "site": self.site,
            "compute_dtype": self.compute_dtype,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Stage":
        """Rebuild a stage from :meth:`to_config` output.

        Raises
        ------
        ConfigError
            Not a dict, unknown keys, or components that cannot be rebuilt.
        BudgetError, StageError
            Invalid values, as the constructor.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"a stage config is a dict, got {cfg!r}")
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown stage config keys {sorted(unknown)}")
        return cls(**cfg)


@dataclass(frozen=True)
class PruningMethod:
    """A pruning method: one or more :class:`Stage` objects, each acting on what earlier ones kept.

    Build one with :func:`tokenprune.compose`, or a registered one with
    :func:`tokenprune.create_method`. It round-trips through :meth:`to_config` / :meth:`from_config`.

    Parameters
    ----------
    stages : tuple of Stage
        In application order: before-LLM stages first, then in-LLM stages by increasing layer.
    name : str or None
        The registered name it was built from, if any (informational).
    params : dict
        The parameters it was built with (informational; not compared).
    nominal_budget : int, float, Budget or None
        The budget the method is quoted at (TOPS's ``T``, the ``budget`` a factory was called with),
        which need not be any stage's budget. ``None`` (default): the last stage's budget, i.e. the
        stage budget of a single-stage method. Stored as a :class:`~tokenprune.budget.Budget`; not
        compared (two methods with the same stages select the same tokens).

    Raises
    ------
    StageError
        No stage, more than one before-LLM stage or not first, in-LLM layers not strictly
        increasing, or in-LLM stages with different ``reference_depth``.
    BudgetError
        An invalid ``nominal_budget``.

    Examples
    --------
    >>> import tokenprune as tp
    >>> m = tp.create_method("tops", budget=64)
    >>> m.nominal_budget.value, [s.budget.value for s in m.stages]
    (64, [128, 64, 16])
    """

    stages: tuple
    name: str | None = None
    params: dict = field(default_factory=dict, compare=False)
    nominal_budget: Any = field(default=None, compare=False)

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
        nominal = stages[-1].budget if self.nominal_budget is None else as_budget(self.nominal_budget)
        object.__setattr__(self, "nominal_budget", nominal)

    # -- selection core ----------------------------------------------------------------------------
    def select(self, features, *, budget=None, relevance=None, mask=None, stage: int = 0, **signals) -> Selection:
        """Run one stage's selection on plain tensors (see :func:`tokenprune.select`).

        ``budget=None`` (default here) uses the stage's own budget; any other value replaces it for
        this call. ``compute_dtype`` among the signals replaces the stage's for this call.

        Raises
        ------
        StageIndexError
            ``stage`` is not the index of one of the method's stages (also an ``IndexError``).
        ParameterError
            A ``seed`` that is not an int.
        ShapeError
            A ``grid`` that is not a pair of positive ints.
        """
        n = len(self.stages)
        if not _is_int(stage) or not -n <= stage < n:
            raise StageIndexError(f"stage must be the index of one of the method's {n} stage(s), 0..{n - 1}; "
                                  f"got {stage!r}")
        if "seed" in signals and not _is_int(signals["seed"]):
            raise ParameterError(f"seed must be an int, got {signals['seed']!r}")
        grid = signals.get("grid")
        if grid is not None:
            try:
                dims = [int(g) for g in grid]
            except (TypeError, ValueError):
                dims = []  # not a pair of numbers: make_context says so
            if any(d <= 0 for d in dims):
                raise ShapeError(f"grid must be a (rows, cols) pair of positive ints, got {grid!r}")
        st = self.stages[stage]
        signals.setdefault("compute_dtype", st.compute_dtype)
        ctx = make_context(features, mask=mask, relevance=relevance, **signals)
        return st.selector.select(st.objective, ctx, st.budget if budget is None else budget)

    @property
    def budget(self) -> Budget:
        """Deprecated: the last stage's budget (not the nominal budget of multi-stage methods).

        Use :attr:`nominal_budget` for the budget a method is quoted at, or ``stages[-1].budget``
        for the last stage's. Emits :class:`DeprecationWarning`.
        """
        warnings.warn("PruningMethod.budget is deprecated: it is the last stage's budget; use "
                      "PruningMethod.nominal_budget (the budget the method is quoted at) or "
                      "stages[-1].budget", DeprecationWarning, stacklevel=2)
        return self.stages[-1].budget

    @property
    def stage_tags(self) -> tuple:
        """Per-stage :class:`~tokenprune.criteria.Tags` (``None`` for an objective-free stage)."""
        return tuple(None if s.objective is None else s.objective.tags for s in self.stages)

    @property
    def tags(self):
        """What holds for the whole method: :class:`~tokenprune.criteria.Tags`, or ``None``.

        A single-stage method gives its objective's tags (``None`` without an objective). For
        several stages a guarantee (``modular``, ``monotone``, ``submodular``, ``exact_gains``,
        ``nonincreasing_gains``) holds only if it holds at every stage (an objective-free stage has
        none), and ``requires`` is the union of the stages' signals; ``None`` if no stage has an
        objective. See :attr:`stage_tags` for the stages one by one.
        """
        per = self.stage_tags
        if len(per) == 1:
            return per[0]
        known = [t for t in per if t is not None]
        if not known:
            return None
        if len(known) < len(per):
            return Tags(exact_gains=False, requires=frozenset().union(*(t.requires for t in known)))
        return Tags(modular=all(t.modular for t in per), monotone=all(t.monotone for t in per),
                    submodular=all(t.submodular for t in per), exact_gains=all(t.exact_gains for t in per),
                    nonincreasing_gains=all(t.nonincreasing_gains for t in per),
                    requires=frozenset().union(*(t.requires for t in per)))

    def with_budget(self, budget) -> "PruningMethod":
        """A copy that keeps ``budget`` tokens (its nominal budget).

        A single-stage method gets ``budget`` as its stage budget. A multi-stage method is rebuilt by
        its registered factory with its other parameters unchanged.

        Raises
        ------
        StageError
            A multi-stage method without a registered name.
        BudgetError
            An invalid budget.
        """
        if len(self.stages) != 1:
            if self.name is None:
                raise StageError("with_budget on a multi-stage method needs the registered method name")
            params = {**self.params, "budget": budget}
            return built_as(_method_registry.get(self.name)(**params), self.name, params)
        return replace(self, stages=(replace(self.stages[0], budget=budget),), nominal_budget=budget)

    # -- config --------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """A plain JSON-able dict: ``name``, ``params``, ``nominal_budget`` and ``stages``."""
        return {"name": self.name, "params": _jsonable(self.params),
                "nominal_budget": self.nominal_budget.to_config(),
                "stages": [s.to_config() for s in self.stages]}

    @classmethod
    def from_config(cls, cfg: dict) -> "PruningMethod":
        """Rebuild a method from :meth:`to_config` output (configs without ``nominal_budget`` too).

        A config written before ``nominal_budget`` existed takes it from ``params["budget"]``, or
        else from the last stage.

        Raises
        ------
        ConfigError
            Not a dict with ``stages``, or an invalid stage.
        """
        if not isinstance(cfg, dict) or "stages" not in cfg:
            raise ConfigError(f"a method config is a dict with 'stages', got {cfg!r}")
        params = dict(cfg.get("params") or {})
        nominal = cfg["nominal_budget"] if "nominal_budget" in cfg else params.get("budget")
        return cls(stages=tuple(Stage.from_config(s) for s in cfg["stages"]), name=cfg.get("name"),
                   params=params, nominal_budget=nominal)


def built_as(method, name: str, params: dict) -> PruningMethod:
    """Stamp what a registered factory returned with the name and parameters it was built from.

    Parameters
    ----------
    method : object
        The factory's return value.
    name : str
        The registered method name.
    params : dict
        The keyword arguments the factory was called with (copied).

    Returns
    -------
    PruningMethod
        ``method`` with ``name`` and ``params`` replaced (stages and nominal budget kept).

    Raises
    ------
    IncompatibleComponentsError
        ``method`` is not a :class:`PruningMethod`.
    """
    if not isinstance(method, PruningMethod):
        raise IncompatibleComponentsError(f"method factory {name!r} returned {type(method).__name__}, "
                                          "not a PruningMethod")
    return replace(method, name=name, params=dict(params))


def _jsonable(v):
    """``v`` with dicts, sequences, budgets and components turned into JSON-able values (recursive)."""
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
            name: str | None = None, compute_dtype: str = "float32", site: str = "projected") -> PruningMethod:
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
    compute_dtype : {"float32", "model"}
        Arithmetic of the similarities (see :class:`Stage`).
    site : {"projected", "vision"}
        A stage before the LLM acts on the projected features or on the vision tower's states before
        the projector (see :class:`Stage`).

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
                  reference_depth=reference_depth, relevance=relevance, raters=raters, positions=positions,
                  compute_dtype=compute_dtype, site=site)
    return PruningMethod(stages=(stage,), name=name)
