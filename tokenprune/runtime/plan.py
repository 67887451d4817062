"""The plan of a pruning context: a method checked against one model, before anything runs.

:class:`Plan` is pure: it reads the method's stages and the adapter's static facts (depth, [CLS] or
not, M-RoPE) and decides where each stage acts, which relevance source it really uses, which signals
must be captured, and what the report must note. Every error a method can raise without running the
model is raised here, at ``prune(...)`` time.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

from ..errors import ParameterError, StageError
from ..methods.build import accepted_parameters, resolve_method
from ..methods.compose import PruningMethod, Stage

#: What ``newlines=`` may say about LLaVA-NeXT / OneVision ``image_newline`` tokens.
NEWLINE_POLICIES = ("keep", "drop", "select")
#: What ``relevance="cls_attention"`` may become on a vision tower without a [CLS] token
#: (``None`` is ``"auto"``).
CLS_FALLBACKS = (None, "auto", "mean_attention", "text_similarity", "error")
#: Relevance sources read from the vision tower's attention ([CLS] row, or mean attention per patch).
VISION_ATTENTION_SOURCES = ("cls_attention", "mean_attention")
_WARNED: set = set()  # (model type, fallback) pairs already warned about in this process
#: Relevance sources that come from the LLM's attention at the layer before a stage.
LLM_ATTENTION_SOURCES = ("text_attention", "key_norm")


def method_for_model(method, adapter, method_params: dict) -> PruningMethod:
    """Build the method a context applies: by name with the adapter's schedule defaults, or as given.

    Parameters
    ----------
    method : PruningMethod, str or dict
        A method, a registered name, or a config.
    adapter : ModelAdapter
        Supplies ``default_schedule[name]``: per-family defaults (e.g. TOPS's Qwen2.5-VL schedule)
        that fill in what ``method_params`` does not give, for the parameters the method takes.
    method_params : dict
        Parameters of a method given by name.

    Raises
    ------
    StageError
        Parameters given with a method that is not a name.
    UnknownNameError, ConfigError
        From building the method.
    """
    if isinstance(method, str):
        defaults = dict(adapter.default_schedule.get(method, {}))
        if defaults:
            accepted = accepted_parameters(method)
            if accepted is not None:
                defaults = {k: v for k, v in defaults.items() if k in accepted}
        method_params = {**defaults, **method_params}
    elif method_params:
        raise StageError(f"method parameters {sorted(method_params)} are only accepted with a method name")
    return resolve_method(method, **method_params)


@dataclass
class Plan:
    """Where each stage of a method acts on one model, and which signals it needs.

    Build it with :meth:`build`. Attributes are read by the runtime's parts.

    Attributes
    ----------
    method : PruningMethod
    newlines : str
    cls_fallback : str or None
    dynamic_threshold : float
    seed : int
    pre_stage : (int, Stage) or None
        The stage before the LLM and its index.
    llm_stages : dict
        decoder layer -> ``(index, Stage)`` for the in-LLM stages, layers scaled to the model's depth.
    relevance : dict
        stage index -> the relevance source the stage really uses: on a tower without [CLS],
        ``cls_attention`` becomes ``mean_attention`` or ``text_similarity`` (see ``cls_fallback``);
        the stage reports say which.
    mean_attention : bool
        Some stage reads the mean attention each patch receives (tower without [CLS]).
    capture_layers : dict
        decoder layer -> the stage whose LLM-attention signal is captured there (layer ``k - 1``).
    need_cls : bool
        Some stage reads the vision tower's attention ([CLS] row or mean per patch).
    compact_note, fallback_note : str or None
        What the report notes when positions or relevance differ from the request.
    """

    method: PruningMethod
    newlines: str = "keep"
    cls_fallback: str | None = None
    dynamic_threshold: float = 0.5
    seed: int = 0
    pre_stage: tuple | None = None
    llm_stages: dict = field(default_factory=dict)
    relevance: dict = field(default_factory=dict)
    mean_attention: bool = False
    capture_layers: dict = field(default_factory=dict)
    need_cls: bool = False
    compact_note: str | None = None
    fallback_note: str | None = None

    @classmethod
    def build(cls, method: PruningMethod, adapter, *, newlines: str = "keep", cls_fallback: str | None = None,
              dynamic_threshold: float = 0.5, seed: int = 0, model_name: str = "the model") -> "Plan":
        """Check ``method`` against ``adapter``'s model and plan its stages.

        Raises
        ------
        ParameterError
            A ``seed`` that is not an int.
        StageError
            An unknown ``newlines`` policy or ``cls_fallback``, a ``dynamic_threshold`` that is not a
            number in ``[0, 1]``, a stage layer at or beyond the model's depth, layers that collide after
            scaling, an int budget above what the previous stage keeps, an LLM-attention relevance
            before the LLM.
        UnsupportedModelError
            A [CLS]-attention stage on a tower without [CLS] and without a usable ``cls_fallback``.
        """
        if newlines not in NEWLINE_POLICIES:
            raise StageError(f"newlines must be one of {NEWLINE_POLICIES}, got {newlines!r}")
        if cls_fallback not in CLS_FALLBACKS:
            raise StageError(f"cls_fallback must be one of {CLS_FALLBACKS}, got {cls_fallback!r}")
        try:
            threshold = float(dynamic_threshold)
        except (TypeError, ValueError):
            threshold = float("nan")
        if isinstance(dynamic_threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise StageError(f"dynamic_threshold is a fraction of the largest rater's image attention, in [0, 1]; "
                             f"got {dynamic_threshold!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ParameterError(f"seed must be an int, got {seed!r}")
        plan = cls(method=method, newlines=newlines, cls_fallback=cls_fallback,
                   dynamic_threshold=float(dynamic_threshold), seed=int(seed))
        plan._place_stages(adapter, model_name)
        plan._choose_signals(adapter)
        return plan

    def _place_stages(self, adapter, model_name: str) -> None:
        """Scale stage layers to the model's depth and check the schedule."""
        depth = adapter.depth
        prev_count = None
        last_layer = 0
        for i, st in enumerate(self.method.stages):
            layer = st.layer_for_depth(depth)
            if layer is None:
                self.pre_stage = (i, st)
                if st.relevance in LLM_ATTENTION_SOURCES:
                    raise StageError(f"stage {i} is before the LLM but asks for relevance={st.relevance!r}, which "
                                     "comes from the LLM's attention; put the stage inside the LLM (layer >= 1)")
            else:
                if layer >= depth:
                    raise StageError(f"stage {i} acts at decoder layer {layer}"
                                     + (f" (layer {st.layer} of {st.reference_depth} scaled)" if st.reference_depth
                                        else "")
                                     + f", beyond the model's depth: {model_name} has {depth} decoder "
                                     f"layers, so in-LLM stages can act at layers 1..{depth - 1}")
                if layer <= last_layer:
                    raise StageError(f"stage {i} scales to layer {layer}, not after the previous stage's layer "
                                     f"{last_layer}; the model ({depth} layers) is too shallow for this schedule")
                last_layer = layer
                self.llm_stages[layer] = (i, st)
            b = st.budget
            if not b.is_fraction:
                if prev_count is not None and b.value > prev_count:
                    raise StageError(f"stage {i} keeps {b.value} tokens but the previous stage leaves only "
                                     f"{prev_count}")
                prev_count = b.value

    def _fallback(self, adapter) -> str:
        """What ``cls_attention`` becomes on this tower without [CLS]: the requested fallback, or for
        ``"auto"`` the mean attention per patch where the adapter can map it (towers attending
        globally at the feature layer), else text similarity."""
        if self.cls_fallback in (None, "auto"):
            return "mean_attention" if adapter.supports_mean_attention else "text_similarity"
        return self.cls_fallback

    def _choose_signals(self, adapter) -> None:
        """Resolve each stage's relevance source on this tower and decide what to capture."""
        self.relevance = {i: st.relevance for i, st in enumerate(self.method.stages)}
        model_type = adapter.config.model_type
        for i, st in enumerate(self.method.stages):
            if st.relevance != "cls_attention" or adapter.has_cls:
                continue
            fallback = self._fallback(adapter)
            if fallback == "text_similarity":
                self.relevance[i] = "text_similarity"
                continue
            # raises UnsupportedModelError for "error", or "mean_attention" where the family cannot map it
            adapter.cls_attention_module(None if fallback == "error" else fallback)
            self.relevance[i] = "mean_attention"
            self.mean_attention = True
        substituted = sorted({r for r, st in zip(self.relevance.values(), self.method.stages) if r != st.relevance})
        if substituted:
            fb = substituted[0]
            what = ("the mean attention each patch receives at the feature layer" if fb == "mean_attention"
                    else "the cosine similarity of the visual tokens to the prompt's text (text_similarity)")
            chosen = "chosen automatically: cls_fallback='auto'" if self.cls_fallback in (None, "auto") else \
                f"cls_fallback={self.cls_fallback!r}"
            self.fallback_note = (f"{model_type} has no vision [CLS] token: relevance='cls_attention' uses {what} "
                                  f"({chosen})")
            if self.cls_fallback in (None, "auto") and (model_type, fb) not in _WARNED:
                _WARNED.add((model_type, fb))
                warnings.warn(f"tokenprune: {self.fallback_note}; pass cls_fallback='mean_attention', "
                              "'text_similarity' or 'error' to choose", UserWarning, stacklevel=4)
        if adapter.mrope and any(st.positions == "compact" for st in self.method.stages):
            self.compact_note = (f"{model_type} uses 3-D M-RoPE positions: kept tokens keep their (t, h, w) "
                                 "positions, so positions='compact' was applied as 'preserve'")
            warnings.warn(self.compact_note, UserWarning, stacklevel=4)
        self.capture_layers = {k - 1: st for k, (_, st) in self.llm_stages.items()
                               if st.relevance in LLM_ATTENTION_SOURCES}
        self.need_cls = any(r in VISION_ATTENTION_SOURCES for r in self.relevance.values())

    @property
    def first_llm_layer(self) -> int | None:
        """The first decoder layer an in-LLM stage acts at (``None``: no in-LLM stage)."""
        return min(self.llm_stages) if self.llm_stages else None

    @property
    def reads_the_text(self) -> bool:
        """Whether a selection can change when the prompt's text grows: an in-LLM stage (hidden
        states and attention of the whole sequence), or text similarity or text embeddings."""
        return bool(self.llm_stages) or any(self.needs_text_embeddings(i, st)
                                            for i, st in enumerate(self.method.stages))

    def needs_text_embeddings(self, index: int, stage: Stage) -> bool:
        """Whether stage ``index`` needs the prompt's text embeddings (relevance or its objective)."""
        if self.relevance[index] == "text_similarity":
            return True
        return stage.objective is not None and "text_embeddings" in stage.objective.tags.requires
