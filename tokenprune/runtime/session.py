"""``tokenprune.prune``: scoped visual-token pruning on a Hugging Face VLM, with torch hooks only.

How one prompt flows (``model(...)`` or ``model.generate(...)``):

1. A forward pre-hook on the top-level model sees the prefill (empty or no cache) and hands it to
   :mod:`~tokenprune.runtime.prefill`. It finds the visual tokens (``input_ids == image_token_id``),
   takes the image features ``generate`` already computed (``mm_encoder_outputs``) or computes them
   with ``get_image_features``, and, if the method has a stage before the LLM, selects rows and
   rewrites the call: fewer placeholder tokens in ``input_ids``, ``attention_mask``, ``labels`` and
   the per-token tensors, gathered (or compacted) position ids, and the kept (or merged) features in
   ``mm_encoder_outputs``. The model code then runs unchanged on the shorter prompt.
2. Forward pre-hooks on the decoder layers at and after each in-LLM stage
   (:mod:`~tokenprune.runtime.layers`) gather, during the prefill, the hidden states (at the stage's
   layer), the rotary ``(cos, sin)``, ``position_ids`` and the 4-D mask, so later layers write only
   the kept keys and values into the cache. Relevance for a stage at layer ``k`` comes from an
   attention wrapper on layer ``k - 1`` (:mod:`~tokenprune.runtime.attention`,
   :mod:`~tokenprune.runtime.signals`), which keeps SDPA running.
3. During decoding, the top-level pre-hook maps ``generate``'s full-length 2-D mask and positions onto
   the pruned prefix (:mod:`~tokenprune.runtime.decode`), and the layer pre-hooks gather the prefix
   columns of a materialised 4-D mask.
4. Leaving the context removes every hook, the attention-name switch and the ``get_image_features``
   wrapper (:mod:`~tokenprune.runtime.hookset`), also when the block raised.

``get_image_features`` is wrapped on the base-model *instance* (an attribute that shadows the class
method and is deleted on exit; no class is modified) because ``generate`` calls it before the first
forward and then drops the image kwargs (``image_sizes``, ``image_grid_thw``, ...) the adapters need
to map tokens to patches, and because the vision tower's [CLS] attention is captured during that call.
"""

from __future__ import annotations

import warnings
import weakref

from .._signature import signature
from ..adapters import get_model_adapter
from ..errors import ConfigError, StageError, TokenPruneError
from .decode import DecodeMapper
from .hookset import HookSet
from .layers import LayerSurgery
from .plan import CLS_FALLBACKS, NEWLINE_POLICIES, Plan, method_for_model
from .prefill import PrefillRewriter
from .report import PruneReport, finish_report, start_report
from .signals import SignalCapture
from .text_encoder import TextEncoder
from .stage_select import StageSelection
from .state import DECODE, PREFILL, PromptState
from .prefix_cache import PrefixCache
from .vision_cache import VisionCache

__all__ = ["PruneSession", "prune", "NEWLINE_POLICIES", "CLS_FALLBACKS"]

#: Models with an active context (one context per model at a time).
_ACTIVE: "weakref.WeakSet" = weakref.WeakSet()


class PruneSession:
    """The context manager returned by :func:`prune`; entering it attaches, leaving it restores.

    It plans the method against the model (:class:`~tokenprune.runtime.plan.Plan`), installs the hooks
    (:class:`~tokenprune.runtime.hookset.HookSet`) and routes each hook call, with the state of the
    prompt it belongs to, to the part that handles it: the prefill rewrite, the layer surgery, the
    decode mapping or the signal capture. Parameters: see :func:`prune`.
    """

    def __init__(self, model, method, *, adapter=None, newlines: str = "keep", dynamic_threshold: float = 0.5,
                 cls_fallback: str | None = None, seed: int = 0, vision_cache: VisionCache | None = None,
                 prefix_cache: PrefixCache | None = None,
                 text_encoder: TextEncoder | None = None, **method_params):
        if vision_cache is not None and not isinstance(vision_cache, VisionCache):
            raise ConfigError(f"vision_cache must be a tokenprune.VisionCache or None, "
                              f"got {type(vision_cache).__name__}")
        if prefix_cache is not None and not isinstance(prefix_cache, PrefixCache):
            raise ConfigError(f"prefix_cache must be a tokenprune.PrefixCache or None, "
                              f"got {type(prefix_cache).__name__}")
        self.prefix_cache = prefix_cache
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise ConfigError(f"text_encoder must be a tokenprune.TextEncoder (a CLIP or SigLIP model, its tokenizer "
                              f"and how to read the instruction), got {type(text_encoder).__name__}; e.g. "
                              "TextEncoder(CLIPModel.from_pretrained(d), CLIPTokenizer.from_pretrained(d), "
                              "prompt_tokenizer=processor.tokenizer)")
        self.model = model
        self.adapter = get_model_adapter(model, adapter)
        self.method = method_for_model(method, self.adapter, method_params)
        self.plan = Plan.build(self.method, self.adapter, newlines=newlines, cls_fallback=cls_fallback,
                               dynamic_threshold=dynamic_threshold, seed=seed, model_name=type(model).__name__,
                               text_encoder=text_encoder)
        self.report = start_report(model, self.adapter, self.method)
        for note in self.plan.relevance_notes:  # which relevance source each stage reads
            self.report.note(note)
        self.signals = SignalCapture(self.plan, self.adapter, vision_cache)
        select = StageSelection(self.plan, self.report)
        self.prefill = PrefillRewriter(self.plan, self.adapter, self.signals, select, self.report)
        self.layers = LayerSurgery(self.plan, self.adapter, self.signals, select, self.report)
        self.decode = DecodeMapper(self.adapter)
        self._hooks = HookSet()
        self._entered = False
        self._phase: str | None = None           # PREFILL or DECODE while a top-level forward runs
        self._state: PromptState | None = None   # the prompt that forward belongs to
        self._states: dict = {}                  # id(cache) -> (weakref to the cache, PromptState)
        self._outer_active = False                # a top-level forward is running
        self._warned_direct = False

    @property
    def llm_stages(self) -> dict:
        """decoder layer -> ``(index, Stage)``: where the in-LLM stages act on this model (see :class:`Plan`)."""
        return self.plan.llm_stages

    # -- enter / exit -----------------------------------------------------------------------------
    def __enter__(self) -> PruneReport:
        if self._entered:
            raise TokenPruneError("this prune() context is already active")
        if self.model in _ACTIVE:
            raise TokenPruneError("a tokenprune.prune() context is already active on this model; nest none")
        self._entered = True
        _ACTIVE.add(self.model)
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self.report

    def __exit__(self, exc_type, exc, tb):
        self._detach()
        return False

    def _attach(self) -> None:
        ad, plan, hooks = self.adapter, self.plan, self._hooks
        hooks.wrap_method(ad.base, "get_image_features", self.signals.on_image_features)
        if plan.capture_layers:
            hooks.switch_attention(ad.text_config)
            for li, st in plan.capture_layers.items():
                hooks.capture_attention(ad.attention_module(li), self._text_attention_callback(li, st))
        if plan.need_cls or plan.vision_site:  # the feature layer's attention: [CLS] row / mean, keys
            mod = (ad.cls_attention_module("mean_attention" if plan.mean_attention else None) if plan.need_cls
                   else ad.feature_attention_module())
            hooks.switch_attention(mod.config)
            hooks.capture_attention(mod, self.signals.vision_callback())
        hooks.forward_pre_hook(self.model, self._outer_pre)
        hooks.forward_hook(self.model, self._outer_post)
        hooks.forward_pre_hook(ad.layers[0], self._direct_call_check)
        for li, st in plan.own_attention_layers.items():  # before the layer's surgery hook, which prunes
            hooks.forward_pre_hook(ad.layers[li], self._own_attention_hook(li, st))
        if plan.llm_stages:
            for li in range(plan.first_llm_layer, ad.depth):
                hooks.forward_pre_hook(ad.layers[li], self._layer_pre_hook(li))
        if self.prefix_cache is not None and plan.shares_llm_prefix:  # after the captures it replays
            self.prefix_cache.share(hooks, ad, plan.first_llm_layer,
                                    lambda: self._phase == PREFILL and self._state is not None)

    def _detach(self) -> None:
        self._hooks.close()
        self.signals.clear()
        self._states.clear()
        self._state, self._phase = None, None
        self._outer_active = False
        _ACTIVE.discard(self.model)
        self._entered = False

    # -- dispatch ---------------------------------------------------------------------------------
    def _text_attention_callback(self, layer_idx: int, stage):
        """The attention-wrapper callback of decoder layer ``layer_idx``: captures during prefills only."""
        def callback(module, query, key, attention_mask, kwargs):
            if self._phase == PREFILL and self._state is not None:
                self.signals.capture_text(self._state, layer_idx, stage, module, query, key, attention_mask,
                                          kwargs)
        return callback

    def _own_attention_hook(self, layer_idx: int, stage):
        """A forward pre-hook of decoder layer ``layer_idx`` (registered before its surgery hook): the
        attention the layer would compute, for a stage with ``relevance="own_layer_attention"``."""
        def hook(module, args, kwargs):
            if self._phase == PREFILL and self._state is not None:
                hs = args[0] if args else kwargs["hidden_states"]
                self.signals.capture_own_attention(self._state, layer_idx, stage, module, hs, kwargs)
            return None
        return hook

    def _layer_pre_hook(self, layer_idx: int):
        """The forward pre-hook of decoder layer ``layer_idx``."""
        def hook(module, args, kwargs):
            state = self._state
            if state is None or self._phase is None:
                return None
            if self._phase == DECODE:
                return self.layers.decode(layer_idx, state, args, kwargs)
            return self.layers.prefill(layer_idx, state, args, kwargs)
        return hook

    def _direct_call_check(self, module, args, kwargs):
        """Decoder layer 0 outside a top-level forward: the base or language model was called directly,
        which nothing prunes; say so once."""
        if not self._outer_active and not self._warned_direct:
            self._warned_direct = True
            warnings.warn(f"tokenprune: the language model of {type(self.model).__name__} ran outside a call of the "
                          "model itself (e.g. model.model(...) or model.language_model(...)); only model(...) and "
                          "model.generate(...) are pruned inside prune()", UserWarning, stacklevel=2)
        return None

    def _bind(self, args, kwargs) -> dict:
        """The top-level call's arguments as keywords."""
        if not args:
            return dict(kwargs)
        params = [p.name for p in signature(self.model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        out = dict(zip(params, args))
        out.update(kwargs)
        return out

    def _outer_pre(self, module, args, kwargs):
        """Top-level pre-hook: a prefill (no cache yet) is rewritten, a decoding step is mapped."""
        self._phase, self._state = None, None
        self._outer_active = True
        kw = self._bind(args, kwargs)
        pkv = self.adapter.kv_cache(kw)
        past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        if past > 0:
            state = self._find_state(pkv)
            if state is None:
                return None
            new = self.decode(state, kw, past)
            self._state, self._phase = state, DECODE
            return (), new
        rewritten = self.prefill(kw)
        if rewritten is None:
            return None
        new, self._state = rewritten
        self._phase = PREFILL
        return (), new

    def _outer_post(self, module, args, kwargs, output):
        """Top-level forward hook: after a prefill, remember its state under its cache and report."""
        state, phase = self._state, self._phase
        self._phase, self._state = None, None
        self._outer_active = False
        if state is None or phase != PREFILL:
            return None
        missing = set(self.plan.llm_stages) - state.done_layers
        if missing:
            raise StageError(f"in-LLM stages at layers {sorted(missing)} did not run (the text model did not call "
                             "those layers during the prefill); chunked prefill is not supported")
        pkv = self.adapter.kv_cache(output) if not isinstance(output, tuple) else None
        if pkv is None and isinstance(output, tuple):
            pkv = next((o for o in output if hasattr(o, "get_seq_length")), None)
        if pkv is None:
            pkv = state.cache_in
        state.cache_in = None
        state.attention_inputs.clear()  # layer k - 1's query and keys: not kept for decoding
        if pkv is not None:
            for key in [k for k, (ref, _) in self._states.items() if ref() is None]:
                del self._states[key]
            try:
                self._states[id(pkv)] = (weakref.ref(pkv), state)
            except TypeError:
                pass
        finish_report(self.report, state)
        return None

    def _find_state(self, pkv) -> PromptState | None:
        """The state of the prompt whose prefill produced the cache ``pkv`` (``None``: not ours)."""
        entry = self._states.get(id(pkv))
        if entry is None or entry[0]() is not pkv:
            return None
        return entry[1]


def prune(model, method, *, adapter=None, newlines: str = "keep", dynamic_threshold: float = 0.5,
          cls_fallback: str | None = None, seed: int = 0, vision_cache: VisionCache | None = None,
          prefix_cache: PrefixCache | None = None, text_encoder: TextEncoder | None = None,
          **method_params) -> PruneSession:
    """Prune visual tokens of a Hugging Face VLM inside a ``with`` block.

    ``model(...)`` and ``model.generate(...)`` run with the method's stages applied: a stage before the
    LLM shortens the prompt (input ids, masks, positions, labels and the image features travel
    together), a stage at decoder layer ``k`` drops visual tokens from the hidden states entering
    layer ``k``, so layers ``>= k`` compute and cache only the kept tokens. Each stage acts on what the
    earlier ones kept. Leaving the block (also through an exception) restores the model exactly.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A transformers 5.x ``...ForConditionalGeneration`` VLM of a supported family (see
        :func:`tokenprune.list_adapters`), in any dtype and on any device.
    method : PruningMethod, str or dict
        A method (``tokenprune.compose(...)`` or a :class:`~tokenprune.PruningMethod` with several
        stages), a registered method name, or a method config.
    adapter : ModelAdapter, type or str, optional
        Override the adapter picked from ``model.config.model_type``.
    newlines : {"keep", "drop", "select"}
        LLaVA-NeXT / OneVision ``image_newline`` tokens: ``"keep"`` protects them (always kept, not
        counted against the budget, but counted in the reported tokens), ``"drop"`` removes them at the
        first stage, ``"select"`` makes them ordinary candidates.
    dynamic_threshold : float
        For ``raters="dynamic"``: a text token rates the image when its total attention to the
        visual tokens is at least this fraction of the largest such total among the text tokens.
    cls_fallback : {None, "auto", "mean_attention", "text_similarity", "error"}
        What ``relevance="cls_attention"`` means on a vision tower without a [CLS] token (SigLIP,
        Qwen-ViT), so that every method runs with its defaults on every family. ``None`` / ``"auto"``
        (default): ``"mean_attention"`` where the family supports it (LLaVA-OneVision, Gemma3,
        Idefics3, SmolVLM: towers that attend globally at the feature layer), else
        ``"text_similarity"`` (Qwen2-VL, Qwen2.5-VL), with a :class:`UserWarning` once per model type
        and fallback. ``"mean_attention"``: the attention each patch receives at the feature layer,
        averaged over all queries and heads (VisionZip's choice for towers without [CLS]).
        ``"text_similarity"``: the text-similarity relevance (every family). ``"error"``: raise
        :class:`~tokenprune.UnsupportedModelError`. The stage reports' ``relevance`` says which
        signal was used (``"mean_attention"``, ``"text_similarity"``) and a note says why.
    seed : int
        Seed of the selection contexts (stage ``i`` uses ``seed + i``).
    vision_cache : VisionCache, optional
        Share the vision side with other contexts and unpruned calls: ``get_image_features``
        outputs and the captured [CLS] (or mean) attention are taken from the cache when the same
        images were seen before, and stored otherwise (see :class:`~tokenprune.VisionCache`).
    prefix_cache : PrefixCache, optional
        Share the unpruned first decoder layers with other contexts: a method with no stage before the
        LLM whose first stage acts at layer ``k`` replays layers ``0 .. k-1`` (their outputs, KV-cache
        entries and attention captures) recorded by an earlier context on the identical prompt batch,
        instead of computing them (see :class:`~tokenprune.PrefixCache`).
    text_encoder : TextEncoder, optional
        The vision-language encoder (CLIP, SigLIP) whose text tower gives the stages before the LLM
        that read ``relevance="text_similarity"`` (CDPruner) the paper's instruction relevance: the
        similarity of each patch's projected feature-layer state to the instruction's text embedding,
        per crop (see :class:`~tokenprune.TextEncoder`). Their reports' ``relevance`` is then
        ``"text_encoder"``. Without it they use the fallback (the cosine similarity of the projected
        features to the LLM's input embeddings of the prompt's text), and a report note says so.
    **method_params
        With a method *name*: its parameters (``budget=64``, ...). The adapter's
        ``default_schedule`` for that name fills in what is not given.

    Returns
    -------
    PruneSession
        A context manager; ``with prune(model, method) as report:`` binds the :class:`PruneReport`,
        filled at every pruned prefill.

    Raises
    ------
    UnsupportedModelError
        Unknown model type (the message lists the supported ones), a [CLS]-attention stage on a tower
        without [CLS] with ``cls_fallback="error"`` (or ``"mean_attention"`` where the family cannot
        map it), or an attention implementation that cannot be wrapped.
    StageError
        A stage layer beyond the model's depth, layers that collide after scaling, an int budget above
        what the previous stage keeps, a text-attention stage before the LLM; at run time, a budget
        above the tokens an earlier stage left, unequal sequence lengths in an in-LLM stage, or (Gemma3)
        in-LLM pruning beyond the sliding window.
    ConfigError
        ``vision_cache`` is not a :class:`~tokenprune.VisionCache`, ``text_encoder`` is not a
        :class:`~tokenprune.TextEncoder`, or no stage before the LLM reads it.

    Notes
    -----
    Text raters (``Stage.raters`` for ``relevance="text_attention"``), computed at layer ``k - 1`` from
    the post-RoPE queries and keys, head-averaged softmax rows:

    * ``"last_token"``: the row of the last prompt token (FastV);
    * ``"all_text_mean"``: the mean row of every non-visual prompt token that comes after the first
      visual token (earlier tokens cannot attend to the image under the causal mask);
    * ``"dynamic"``: TOPS leaves its relevance threshold unspecified. We keep the text tokens whose
      total attention to the visual tokens is at least ``dynamic_threshold`` times the largest such
      total, and average their rows.

    ``relevance="key_norm"`` is the L1 norm of each visual token's post-RoPE key at layer ``k - 1``,
    averaged over key/value heads (DART's pivot score; whether DART takes keys before or after RoPE is
    not stated, we use what attention uses). ``relevance="own_layer_attention"`` is the raters'
    attention as layer ``k`` itself computes it from the hidden states entering it (its input norm,
    query/key projections and rotary embedding at the current positions), computed in a pre-hook of
    layer ``k`` before the stage prunes (PyramidDrop). ``relevance="text_similarity"`` before the LLM
    is CDPruner's instruction relevance: with ``text_encoder``, the encoder's similarity of each patch
    to the instruction (reported as ``"text_encoder"``); without it, the fallback: the mean cosine
    similarity of each visual token to the prompt's text tokens' input embeddings. Inside the LLM it
    is the mean cosine similarity to the text tokens' hidden states at layer ``k``; the text
    embeddings are also put in the context for criteria that read them. ``relevance="cls_attention"`` is the vision
    tower's [CLS] row at the feature layer, head-averaged (FasterVLM, VisionZip); inside the LLM the
    same scores follow the kept tokens.

    Every context also carries ``coords`` (float ``[B, N, 4]``: image, crop, row, col; ``-1`` unknown)
    as an extra signal, and ``grid`` when the candidates are one full image grid.

    A stage with ``site="vision"`` (VisionZip) selects per crop on the vision tower's hidden states at
    the feature layer ([CLS] included), with that layer's head-averaged keys (``keys``) and the [CLS]
    mark (``cls_token``) as signals; the projector then runs on its tokens, which enter the LLM at
    consecutive positions (see :mod:`tokenprune.runtime.vision_stage`). Families whose projector does
    not map one vision token to one LLM token run it on the projected features, with a note.

    Batches: samples are selected together (one context per stage); every sample keeps the same
    budget. Before the LLM, samples that end with different lengths are re-padded (on the side the
    batch was padded). Inside the LLM the lengths must stay equal, so every sample needs the same
    number of visual tokens there.

    Beam search and ``num_return_sequences`` work: the beams of a prompt share its kept set.
    ``generate(use_cache=False)`` works for methods that read only the image (each step selects the
    same tokens again) and raises :class:`~tokenprune.StageError` for methods whose selection reads
    the text (in-LLM stages, text similarity), which would keep other tokens at every step.

    Not supported (each raises an error that names it): static KV caches
    (``cache_implementation="static"``, ``StaticCache``: use the default dynamic cache), chunked
    prefill, flex attention masks, continuing a cache with new images. Assisted decoding is untested.
    Video tokens are not pruned.

    References
    ----------
    FastV, arXiv:2403.06764; PyramidDrop, arXiv:2410.17247; DART, arXiv:2502.11494; FasterVLM,
    arXiv:2412.01818; VisionZip, arXiv:2412.04467; CDPruner, arXiv:2506.10967; TOPS, arXiv:2606.27161.

    Examples
    --------
    >>> import tokenprune as tp                                             # doctest: +SKIP
    >>> method = tp.compose(tp.criteria.Relevance(), selector="topk", budget=64, layer=2,
    ...                     relevance="text_attention")                     # doctest: +SKIP
    >>> with tp.prune(model, method) as report:                             # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=20)
    >>> print(report.summary())                                             # doctest: +SKIP
    """
    return PruneSession(model, method, adapter=adapter, newlines=newlines, dynamic_threshold=dynamic_threshold,
                        text_encoder=text_encoder,
                        cls_fallback=cls_fallback, seed=seed, vision_cache=vision_cache, prefix_cache=prefix_cache,
                        **method_params)
