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

from ..errors import ConfigError, ParameterError, StageError, UnsupportedModelError
from ..methods.build import accepted_parameters, resolve_method
from ..methods.compose import PruningMethod

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
        with a ``text_encoder``, a before-LLM ``text_similarity`` stage reads ``text_encoder``; the
        stage reports say which.
    mean_attention : bool
        Some stage reads the mean attention each patch receives (tower without [CLS]).
    own_attention_layers : dict
        decoder layer -> the stage at that layer whose relevance is ``own_layer_attention``: the layer's
        pre-hook computes the attention the layer would compute, before the stage prunes.
    capture_layers : dict
        decoder layer -> the stage whose LLM-attention signal is captured there (layer ``k - 1``).
    need_cls : bool
        Some stage reads the vision tower's attention ([CLS] row or mean per patch).
    compact_note, fallback_note : str or None
        What the report notes when positions or relevance differ from the request.
    vision_site : bool
        The before-LLM stage acts on the vision tower's feature-layer states before the projector
        (``Stage(site="vision")`` on a family that supports it); the tower's keys are captured too.
    site_note : str or None
        Why a ``site="vision"`` stage runs on the projected features instead (the report notes it).
    text_encoder : TextEncoder or None
        The vision-language encoder that gives before-LLM ``text_similarity`` stages their relevance
        (their ``relevance`` entry is then ``"text_encoder"``).
    relevance_notes : list of str
        Per stage that reads the instruction relevance, which source it uses (the report notes them).
    text_embedding_stages : frozenset of int
        The stages that read the prompt's text embeddings (relevance ``text_similarity``, or a
        selector or objective that requires them).
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
    own_attention_layers: dict = field(default_factory=dict)
    need_cls: bool = False
    compact_note: str | None = None
    fallback_note: str | None = None
    vision_site: bool = False
    site_note: str | None = None
    text_encoder: object = None
    relevance_notes: list = field(default_factory=list)
    text_embedding_stages: frozenset = frozenset()

    @classmethod
    def build(cls, method: PruningMethod, adapter, *, newlines: str = "keep", cls_fallback: str | None = None,
              dynamic_threshold: float = 0.5, seed: int = 0, model_name: str = "the model",
              text_encoder=None) -> "Plan":
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
            A [CLS]-attention stage on a tower without [CLS] and without a usable ``cls_fallback``, or a
            ``text_encoder`` on a family whose features are not one vision-tower layer's states.
        ConfigError
            A ``text_encoder`` that no stage before the LLM reads.
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
                   dynamic_threshold=float(dynamic_threshold), seed=int(seed), text_encoder=text_encoder)
        plan._place_stages(adapter, model_name)
        plan._choose_signals(adapter)
        plan._choose_text_relevance(adapter)
        plan._place_vision_site(adapter)
        plan._choose_text_embedding_stages()
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
        self.own_attention_layers = {k: st for k, (_, st) in self.llm_stages.items()
                                     if st.relevance == "own_layer_attention"}
        self.need_cls = any(r in VISION_ATTENTION_SOURCES for r in self.relevance.values())

    def _place_vision_site(self, adapter) -> None:
        """Whether the before-LLM stage with ``site="vision"`` acts before this model's projector.

        It does where the adapter supports it and the stage's relevance is read on the vision tower
        (or there is none); otherwise it runs on the projected features, with a report note and a
        :class:`UserWarning` once per model type.

        Raises
        ------
        StageError
            In-LLM stages after a stage that acts before the projector (not supported yet).
        """
        if self.pre_stage is None or getattr(self.pre_stage[1], "site", "projected") != "vision":
            return
        index = self.pre_stage[0]
        why = adapter.vision_site_unsupported()
        if why is None and self.relevance[index] not in VISION_ATTENTION_SOURCES + (None,):
            why = f"its relevance here is {self.relevance[index]!r}, which the vision tower does not give"
        if why is None:
            if self.llm_stages:
                raise StageError(f"stage {index} acts before the projector (site='vision'); in-LLM stages after "
                                 "it are not supported yet")
            self.vision_site = True
            return
        model_type = adapter.config.model_type
        self.site_note = (f"{model_type}: stage {index} (site='vision') ran on the projected features, as "
                          f"site='projected': {why}")
        if (model_type, "site") not in _WARNED:
            _WARNED.add((model_type, "site"))
            warnings.warn(f"tokenprune: {self.site_note}", UserWarning, stacklevel=4)

    def _choose_text_relevance(self, adapter) -> None:
        """Where the before-LLM stages reading ``text_similarity`` get it: the text encoder, or the fallback.

        With a text encoder their ``relevance`` entry becomes ``"text_encoder"`` (the paper's instruction
        relevance, CDPruner); without one they keep the fallback (the cosine similarity of the projected
        features to the LLM's input embeddings of the prompt text) and the report notes which.
        """
        uses = [i for i, st in enumerate(self.method.stages)  # requested, not a [CLS] fallback
                if st.before_llm and st.relevance == "text_similarity" and self.relevance[i] == "text_similarity"]
        enc = self.text_encoder
        if enc is None:
            for i in uses:
                self.relevance_notes.append(
                    f"stage {i}: relevance 'text_similarity' is the fallback: the cosine similarity of the projected "
                    "features to the LLM's input embeddings of the prompt's text (CDPruner's paper uses the vision "
                    "encoder's text tower: pass text_encoder=tokenprune.TextEncoder(...))")
            return
        if not uses:
            raise ConfigError("a text_encoder was given but no stage before the LLM reads the instruction relevance "
                              "(relevance='text_similarity', e.g. 'cdpruner'); drop text_encoder or use such a method")
        layer = getattr(adapter.config, "vision_feature_layer", None)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise UnsupportedModelError(f"text_encoder needs the vision tower's states at one feature layer "
                                        f"(vision_feature_layer, LLaVA-style families); {adapter.config.model_type} "
                                        f"has {layer!r}")
        for i in uses:
            self.relevance[i] = "text_encoder"
            self.relevance_notes.append(f"stage {i}: relevance 'text_encoder': {enc.description}")

    @property
    def shares_llm_prefix(self) -> bool:
        """Whether decoder layers ``0 .. first_llm_layer - 1`` see the model's own prompt, unchanged by
        any stage (no stage before the LLM or the projector): a :class:`~tokenprune.PrefixCache` can
        then share them across contexts."""
        return bool(self.llm_stages) and self.pre_stage is None and not self.vision_site

    @property
    def first_llm_layer(self) -> int | None:
        """The first decoder layer an in-LLM stage acts at (``None``: no in-LLM stage)."""
        return min(self.llm_stages) if self.llm_stages else None

    @property
    def reads_the_text(self) -> bool:
        """Whether a selection can change when the prompt's text grows: an in-LLM stage (hidden
        states and attention of the whole sequence), or text similarity or text embeddings."""
        return bool(self.llm_stages or self.text_embedding_stages) or "text_encoder" in self.relevance.values()

    def needs_text_embeddings(self, index: int) -> bool:
        """Whether stage ``index`` needs the prompt's text embeddings (see ``text_embedding_stages``)."""
        return index in self.text_embedding_stages

    def _choose_text_embedding_stages(self) -> None:
        """The stages that read the prompt's text embeddings: by their relevance as resolved for this
        model, their selector's own signals, or their objective's requirements (decided once: an
        objective's tags walk its composition)."""
        self.text_embedding_stages = frozenset(
            i for i, st in enumerate(self.method.stages)
            if self.relevance[i] == "text_similarity" or "text_embeddings" in st.selector.signals
            or (st.objective is not None and "text_embeddings" in st.objective.tags.requires))
