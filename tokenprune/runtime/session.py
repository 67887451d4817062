"""``tokenprune.prune``: scoped visual-token pruning on a Hugging Face VLM, with torch hooks only.

How one prompt flows (``model(...)`` or ``model.generate(...)``):

1. A forward pre-hook on the top-level model sees the prefill (empty or no cache). It finds the
   visual tokens (``input_ids == image_token_id``), takes the image features ``generate`` already
   computed (``mm_encoder_outputs``) or computes them with ``get_image_features``, and, if the method
   has a stage before the LLM, selects rows and rewrites the call: fewer placeholder tokens in
   ``input_ids``, ``attention_mask``, ``labels`` and the per-token tensors, gathered (or compacted)
   position ids, and the kept (or merged) features in ``mm_encoder_outputs``. The model code then
   runs unchanged on the shorter prompt.
2. Forward pre-hooks on the decoder layers at and after each in-LLM stage gather, during the
   prefill, the hidden states (at the stage's layer), the rotary ``(cos, sin)``, ``position_ids`` and
   the 4-D mask, so later layers write only the kept keys and values into the cache. Relevance for
   a stage at layer ``k`` comes from an attention wrapper on layer ``k - 1``
   (:mod:`tokenprune.runtime.attention`), which keeps SDPA running.
3. During decoding, the top-level pre-hook maps ``generate``'s full-length 2-D mask and positions onto
   the pruned prefix, and the layer pre-hooks gather the prefix columns of a materialised 4-D mask.
4. Leaving the context removes every hook, the attention-name switch and the ``get_image_features``
   wrapper, also when the block raised.

``get_image_features`` is wrapped on the base-model *instance* (an attribute that shadows the class
method and is deleted on exit; no class is modified) because ``generate`` calls it before the first
forward and then drops the image kwargs (``image_sizes``, ``image_grid_thw``, ...) the adapters need
to map tokens to patches, and because the vision tower's [CLS] attention is captured during that call.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..context import make_context
from ..errors import ShapeError, StageError, TokenPruneError, UnsupportedModelError
from ..adapters import get_model_adapter
from ..adapters.base import VisionRecord
from . import attention as attn
from .report import PruneReport, StageReport, _as_list

NEWLINE_POLICIES = ("keep", "drop", "select")
CLS_FALLBACKS = (None, "text_similarity", "mean_attention")
_ACTIVE: "weakref.WeakSet" = weakref.WeakSet()
_PREFILL, _DECODE = "prefill", "decode"


# ----------------------------------------------------------------------------------------------------
# small tensor helpers
# ----------------------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, idx: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
    """Gather ``t`` along ``dim`` with per-sample indices ``idx`` ``[B, L']`` (``-1`` -> ``fill``)."""
    B = idx.shape[0]
    if t.shape[0] != B:
        t = t.expand(B, *t.shape[1:])
    safe = idx.clamp_min(0)
    shape = [1] * t.dim()
    shape[0], shape[dim] = B, idx.shape[1]
    size = list(t.shape)
    size[dim] = idx.shape[1]
    out = torch.gather(t, dim, safe.view(shape).expand(size))
    if (idx < 0).any():
        holes = (idx < 0).view(shape).expand(size)
        out = out.masked_fill(holes, fill)
    return out


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _pad_rows(rows: list, fill, device, dtype=torch.long) -> torch.Tensor:
    n = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), n), fill, dtype=dtype, device=device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, : len(r)] = r
    return out


@dataclass
class _Visual:
    """The visual tokens of a batch at one point of the forward, padded per sample."""

    pos: torch.Tensor        # long [B, V]: positions in the current sequence (ascending in each row)
    valid: torch.Tensor      # bool [B, V]
    orig: torch.Tensor       # long [B, V]: index among the sample's original visual tokens
    protected: torch.Tensor  # bool [B, V]
    dropped: torch.Tensor    # bool [B, V]: removed by the first stage without being candidates
    coords: torch.Tensor     # long [B, V, 4]
    cls: torch.Tensor | None  # float32 [B, V]

    def take(self, keep: torch.Tensor, new_pos: torch.Tensor) -> "_Visual":
        """Keep entries ``keep`` (bool [B, V]); ``new_pos`` long [B, V] are their new positions."""
        rows = [keep[b].nonzero().flatten() for b in range(keep.shape[0])]
        idx = _pad_rows(rows, -1, keep.device)
        valid = idx >= 0
        g = lambda t, fill=0: _gather(t, idx, 1, fill)  # noqa: E731
        coords = _gather(self.coords, idx, 1, -1) if idx.numel() else self.coords[:, :0]
        return _Visual(pos=g(new_pos), valid=valid, orig=g(self.orig, -1), protected=g(self.protected, False) & valid,
                       dropped=torch.zeros_like(valid), coords=coords,
                       cls=None if self.cls is None else g(self.cls, 0.0))

    def counts(self) -> list:
        return _as_list(self.valid.sum(1))


@dataclass
class _Run:
    """State of one pruned prompt: from its prefill through its decoding steps."""

    B: int
    orig_len: int                          # prompt length as given
    llm_len: int = 0                       # prompt length entering the LLM
    llm_mask: torch.Tensor | None = None   # [B, llm_len] 2-D mask passed to the model (None: none passed)
    pre_changed: bool = False              # the before-LLM stage changed the prompt
    next_pos: torch.Tensor | None = None   # long [B]: next position after the prompt (decode without positions)
    shift: torch.Tensor | None = None      # long [B]: original minus passed positions (compact before the LLM)
    visual: _Visual | None = None
    cur_len: int = 0                       # sequence length at the current layer (prefill)
    cur_valid: torch.Tensor | None = None  # bool [B, cur_len]
    group: torch.Tensor | None = None      # long [B, cur_len]: indices into the LLM-entry sequence
    group_pos: torch.Tensor | None = None  # long [B, cur_len]: compacted positions (None: gathered)
    group_shift: torch.Tensor | None = None
    llm_pos: torch.Tensor | None = None    # long [B, llm_len]: 1-D positions entering the LLM
    layer_group: dict = field(default_factory=dict)  # layer -> (group, group_shift or None)
    captures: dict = field(default_factory=dict)     # layer -> {signal: float32 [B, cur_len]}
    stages: list = field(default_factory=list)
    counts_after_pre: list | None = None
    done_layers: set = field(default_factory=set)
    select_ms: float = 0.0
    decode_kv: int = 0
    cache_in: object = None                # the (empty) cache the prefill was given, if any


# ----------------------------------------------------------------------------------------------------
# the session
# ----------------------------------------------------------------------------------------------------
class PruneSession:
    """The context manager returned by :func:`prune`; entering it attaches, leaving it restores."""

    def __init__(self, model, method, *, adapter=None, newlines: str = "keep", dynamic_threshold: float = 0.5,
                 cls_fallback: str | None = None, seed: int = 0, **method_params):
        from ..api import resolve_method

        if newlines not in NEWLINE_POLICIES:
            raise StageError(f"newlines must be one of {NEWLINE_POLICIES}, got {newlines!r}")
        if cls_fallback not in CLS_FALLBACKS:
            raise StageError(f"cls_fallback must be one of {CLS_FALLBACKS}, got {cls_fallback!r}")
        if not 0.0 <= float(dynamic_threshold) <= 1.0:
            raise StageError(f"dynamic_threshold is a fraction of the largest rater's image attention, in [0, 1]; "
                             f"got {dynamic_threshold!r}")
        self.model = model
        self.adapter = get_model_adapter(model, adapter)
        if isinstance(method, str):
            method_params = {**self._schedule_defaults(method), **method_params}
        elif method_params:
            raise StageError(f"method parameters {sorted(method_params)} are only accepted with a method name")
        self.method = resolve_method(method, **method_params)
        self.newlines = newlines
        self.cls_fallback = cls_fallback
        self.dynamic_threshold = float(dynamic_threshold)
        self.seed = int(seed)
        self._handles: list = []
        self._saved_attn: list = []
        self._wrapped_gif = False
        self._entered = False
        self._phase = None
        self._run: _Run | None = None
        self._runs: dict = {}
        self._records: dict = {}
        self._cls_buffer: list | None = None
        self._plan()
        self.report = PruneReport(
            model_type=str(getattr(model.config, "model_type", "")), adapter=self.adapter.name,
            method=_method_config(self.method), depth=self.adapter.depth,
            nominal_budget=self.method.params.get("budget", self.method.budget.value))

    # -- planning (static checks) ----------------------------------------------------------------
    def _schedule_defaults(self, name: str) -> dict:
        from ..api import _get_method_factory

        defaults = dict(self.adapter.default_schedule.get(name, {}))
        if not defaults:
            return {}
        try:
            params = inspect.signature(_get_method_factory(name)).parameters
        except Exception:
            return {}
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return defaults
        return {k: v for k, v in defaults.items() if k in params}

    def _plan(self) -> None:
        ad, depth = self.adapter, self.adapter.depth
        self._relevance = {i: st.relevance for i, st in enumerate(self.method.stages)}
        self._mean_attention = False
        self.pre_stage = None
        self.llm_stages: dict = {}  # layer -> (index, stage)
        prev_int = None
        last_layer = 0
        for i, st in enumerate(self.method.stages):
            layer = st.layer_for_depth(depth)
            if layer is None:
                self.pre_stage = (i, st)
                if st.relevance in ("text_attention", "key_norm"):
                    raise StageError(f"stage {i} is before the LLM but asks for relevance={st.relevance!r}, which "
                                     "comes from the LLM's attention; put the stage inside the LLM (layer >= 1)")
            else:
                if layer >= depth:
                    raise StageError(f"stage {i} acts at decoder layer {layer}"
                                     + (f" (layer {st.layer} of {st.reference_depth} scaled)" if st.reference_depth
                                        else "")
                                     + f", beyond the model's depth: {type(self.model).__name__} has {depth} decoder "
                                     f"layers, so in-LLM stages can act at layers 1..{depth - 1}")
                if layer <= last_layer:
                    raise StageError(f"stage {i} scales to layer {layer}, not after the previous stage's layer "
                                     f"{last_layer}; the model ({depth} layers) is too shallow for this schedule")
                last_layer = layer
                self.llm_stages[layer] = (i, st)
            if st.relevance == "cls_attention":
                if not ad.has_cls and self.cls_fallback == "text_similarity":
                    self._relevance[i] = "text_similarity"
                else:  # raises UnsupportedModelError for towers without [CLS] (and without the fallback)
                    ad.cls_attention_module(self.cls_fallback)
                    if not ad.has_cls:
                        self._mean_attention = True
            b = st.budget
            if not b.is_fraction:
                if prev_int is not None and b.value > prev_int:
                    raise StageError(f"stage {i} keeps {b.value} tokens but the previous stage leaves only {prev_int}")
                prev_int = b.value
        if ad.mrope and any(st.positions == "compact" for st in self.method.stages):
            self._compact_note = (f"{self.adapter.config.model_type} uses 3-D M-RoPE positions: kept tokens keep "
                                  "their (t, h, w) positions, so positions='compact' was applied as 'preserve'")
            warnings.warn(self._compact_note, UserWarning, stacklevel=3)
        else:
            self._compact_note = None
        self.capture_layers = {k - 1: st for k, (_, st) in self.llm_stages.items()
                               if st.relevance in ("text_attention", "key_norm")}
        self.need_cls = any(r == "cls_attention" for r in self._relevance.values())
        if any(r != st.relevance for r, st in zip(self._relevance.values(), self.method.stages)):
            self._fallback_note = (f"{ad.config.model_type} has no vision [CLS] token: relevance='cls_attention' "
                                   "was replaced by 'text_similarity' (cls_fallback)")
        elif self._mean_attention:
            self._fallback_note = (f"{ad.config.model_type} has no vision [CLS] token: 'cls_attention' is the mean "
                                   "attention each patch receives at the feature layer (cls_fallback='mean_attention')")
        else:
            self._fallback_note = None

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
        ad = self.adapter
        # 1. the get_image_features instance wrapper
        base = ad.base
        orig = base.get_image_features
        session = self

        @functools.wraps(orig)
        def get_image_features(*args, **kwargs):
            return session._on_image_features(orig, args, kwargs)

        base.get_image_features = get_image_features
        self._wrapped_gif = True
        # 2. attention wrappers
        if self.capture_layers:
            self._switch_attn(ad.text_config)
            for li, st in self.capture_layers.items():
                mod = ad.attention_module(li)
                attn._TARGETS[id(mod)] = functools.partial(self._capture_text, li, st)
                self._targets = getattr(self, "_targets", []) + [id(mod)]
        if self.need_cls:
            mod = ad.cls_attention_module(self.cls_fallback)
            self._switch_attn(mod.config)
            attn._TARGETS[id(mod)] = self._capture_mean if self._mean_attention else self._capture_cls
            self._targets = getattr(self, "_targets", []) + [id(mod)]
        # 3. hooks
        self._handles.append(self.model.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._outer_post, with_kwargs=True))
        if self.llm_stages:
            first = min(self.llm_stages)
            for li in range(first, ad.depth):
                self._handles.append(ad.layers[li].register_forward_pre_hook(
                    functools.partial(self._layer_pre, li), with_kwargs=True))

    def _switch_attn(self, cfg) -> None:
        if any(c is cfg for c, _ in self._saved_attn):
            return
        cur = cfg._attn_implementation_internal if hasattr(cfg, "_attn_implementation_internal") else None
        name = attn.wrapper_name(cfg._attn_implementation)
        self._saved_attn.append((cfg, cur))
        cfg._attn_implementation_internal = name

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for t in getattr(self, "_targets", []):
            attn._TARGETS.pop(t, None)
        self._targets = []
        for cfg, cur in reversed(self._saved_attn):
            cfg._attn_implementation_internal = cur
        self._saved_attn = []
        if self._wrapped_gif:
            self.adapter.base.__dict__.pop("get_image_features", None)
            self._wrapped_gif = False
        self._records.clear()
        self._runs.clear()
        self._run = None
        self._phase = None
        self._cls_buffer = None
        _ACTIVE.discard(self.model)
        self._entered = False

    # -- vision side ------------------------------------------------------------------------------
    def _on_image_features(self, orig, args, kwargs):
        self._cls_buffer = [] if self.need_cls else None
        try:
            out = orig(*args, **kwargs)
            try:
                bound = inspect.signature(orig).bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = dict(kwargs)
            extra = bound.pop("kwargs", None)
            if isinstance(extra, dict):
                bound.update(extra)
            cls = torch.cat(self._cls_buffer, 0) if self._cls_buffer else None
            while len(self._records) >= 2:  # only the latest calls can feed a prefill
                self._records.pop(next(iter(self._records)))
            try:
                ref = weakref.ref(out)
            except TypeError:  # e.g. return_dict=False gives a tuple, which no forward takes anyway
                return out
            # the record holds no strong reference to the output (vision hidden states can be large)
            self._records[id(out)] = (ref, VisionRecord(kwargs=bound, output=None, cls_attention=cls))
            return out
        finally:
            self._cls_buffer = None

    def _capture_cls(self, module, query, key, attention_mask, kwargs) -> None:
        if self._cls_buffer is None:
            return
        rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
        probs = attn.attention_rows(query, key, attention_mask, kwargs.get("scaling"), rows,
                                    causal=bool(getattr(module, "is_causal", False)))
        self._cls_buffer.append(probs[:, 0].detach())

    def _capture_mean(self, module, query, key, attention_mask, kwargs) -> None:
        if self._cls_buffer is None:
            return
        n, _, Lq, _ = query.shape
        causal = bool(getattr(module, "is_causal", False))
        total = torch.zeros(n, key.shape[2], dtype=torch.float32, device=query.device)
        chunk = max(1, 4096 // max(1, n))
        for start in range(0, Lq, chunk):
            rows = torch.arange(start, min(Lq, start + chunk), device=query.device)[None].expand(n, -1)
            total += attn.attention_rows(query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), rows,
                                         causal=causal).sum(1)
        self._cls_buffer.append(total / Lq)

    # -- text side: attention capture at layer k - 1 -----------------------------------------------
    def _capture_text(self, layer_idx, stage, module, query, key, attention_mask, kwargs) -> None:
        run = self._run
        if self._phase != _PREFILL or run is None or query.shape[2] != run.cur_len or key.shape[2] != run.cur_len:
            return
        with torch.no_grad():
            vis = run.visual
            out = {}
            if stage.relevance == "key_norm":
                out["key_norm"] = attn.key_l1_norm(key.detach())
            else:
                rows, row_valid = self._rater_rows(run, stage.raters)
                probs = attn.attention_rows(query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), rows,
                                            softcap=kwargs.get("softcap"),
                                            causal=bool(getattr(module, "is_causal", True)))  # [B, R, L]
                img = torch.gather(probs, 2, vis.pos[:, None, :].expand(-1, probs.shape[1], -1))  # [B, R, V]
                img = img * vis.valid[:, None, :]
                w = row_valid.float()
                if stage.raters == "dynamic":
                    mass = (img * vis.valid[:, None, :]).sum(-1)  # [B, R]: each rater's attention to the image
                    top = mass.masked_fill(~row_valid, float("-inf")).amax(1, keepdim=True)
                    w = (row_valid & (mass >= self.dynamic_threshold * top)).float()
                rel = (img * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
                out["text_attention"] = rel  # [B, V]
            run.captures[layer_idx] = out

    def _rater_rows(self, run: _Run, raters: str):
        """Query positions of the text raters in the current sequence: long [B, R], valid bool [B, R]."""
        B, L = run.cur_valid.shape
        dev = run.cur_valid.device
        if raters == "last_token":
            valid_pos = torch.arange(L, device=dev)[None].expand(B, -1).masked_fill(~run.cur_valid, -1)
            last = valid_pos.amax(1, keepdim=True)
            return last.clamp_min(0), last >= 0
        vis = run.visual
        is_vis = torch.zeros(B, L + 1, dtype=torch.bool, device=dev)
        is_vis.scatter_(1, vis.pos.masked_fill(~vis.valid, L), True)
        is_vis = is_vis[:, :L]
        first_vis = vis.pos.masked_fill(~vis.valid, L).amin(1, keepdim=True)
        ar = torch.arange(L, device=dev)[None]
        text = run.cur_valid & ~is_vis & (ar > first_vis)  # text tokens that can see some visual token
        rows = [text[b].nonzero().flatten() for b in range(B)]
        idx = _pad_rows(rows, -1, dev)
        if idx.shape[1] == 0:  # no text after the image: fall back to the last token
            return self._rater_rows(run, "last_token")
        return idx.clamp_min(0), idx >= 0

    # -- the top-level pre-hook ---------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        if not args:
            return dict(kwargs)
        params = [p.name for p in inspect.signature(self.model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        out = dict(zip(params, args))
        out.update(kwargs)
        return out

    def _outer_pre(self, module, args, kwargs):
        self._phase, self._run = None, None
        kw = self._bind(args, kwargs)
        pkv = kw.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        if past > 0:
            run = self._find_run(pkv)
            if run is None:
                return None
            return (), self._decode_inputs(run, kw, past)
        new = self._prefill_inputs(kw)
        if new is None:
            return None
        return (), new

    def _outer_post(self, module, args, kwargs, output):
        run, phase = self._run, self._phase
        self._phase, self._run = None, None
        if run is None or phase != _PREFILL:
            return None
        missing = set(self.llm_stages) - run.done_layers
        if missing:
            raise StageError(f"in-LLM stages at layers {sorted(missing)} did not run (the text model did not call "
                             "those layers during the prefill); chunked prefill is not supported")
        pkv = getattr(output, "past_key_values", None) if not isinstance(output, tuple) else None
        if pkv is None and isinstance(output, tuple):
            pkv = next((o for o in output if hasattr(o, "get_seq_length")), None)
        if pkv is None:
            pkv = run.cache_in
        run.cache_in = None
        if pkv is not None:
            for key in [k for k, (ref, _) in self._runs.items() if ref() is None]:
                del self._runs[key]
            try:
                self._runs[id(pkv)] = (weakref.ref(pkv), run)
            except TypeError:
                pass
        self._finish_report(run)
        return None

    def _find_run(self, pkv):
        entry = self._runs.get(id(pkv))
        if entry is None or entry[0]() is not pkv:
            return None
        return entry[1]

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill_inputs(self, kw: dict):
        ad = self.adapter
        self.report.calls += 1
        ids = kw.get("input_ids")
        if ids is None:
            if kw.get("inputs_embeds") is not None:
                raise StageError("tokenprune finds the visual tokens from input_ids; call the model with input_ids "
                                 "(and pixel_values or mm_encoder_outputs), not inputs_embeds")
            return None
        if ids.dim() != 2:
            raise ShapeError(f"input_ids must be [B, L], got {tuple(ids.shape)}")
        img = ids == ad.image_token_id
        if not bool(img.any()):
            self.report.note("a prompt had no image tokens: nothing was pruned")
            return None
        B, L = ids.shape
        dev = ids.device
        mm = kw.get("mm_encoder_outputs")
        out = mm.get("image") if isinstance(mm, dict) else None
        if out is None:
            ikw = ad.image_kwargs(kw)
            if "pixel_values" not in ikw:
                raise StageError("the prompt has image tokens but neither pixel_values nor mm_encoder_outputs")
            ikw["return_dict"] = True
            out = ad.base.get_image_features(**ikw)
        entry = self._records.pop(id(out), None)
        rec = entry[1] if entry is not None and entry[0]() is out else None
        pooler = out.pooler_output
        flat = ad.flatten_features(pooler).to(dev)
        counts = img.sum(1)
        if flat.shape[0] != int(counts.sum()):
            raise ShapeError(f"{int(counts.sum())} image tokens in input_ids but {flat.shape[0]} image feature rows")
        layout = ad.token_layout(pooler, rec)
        if self.need_cls and layout.cls is None:
            raise StageError("relevance='cls_attention' needs the vision tower to run inside the prune() context "
                             "(pass pixel_values, not precomputed mm_encoder_outputs)")

        new = dict(kw)
        new.pop("pixel_values", None)  # the features travel in mm_encoder_outputs (the other image kwargs stay)
        new_mm = dict(mm) if isinstance(mm, dict) else {}
        new_mm["image"] = out
        new["mm_encoder_outputs"] = new_mm

        run = _Run(B=B, orig_len=L, llm_len=L, llm_mask=kw.get("attention_mask"), cache_in=kw.get("past_key_values"))
        run.visual = self._initial_visual(img, layout, counts)
        self.report.visual_tokens = _as_list(counts)
        run.counts_after_pre = run.visual.counts()
        if self.pre_stage is not None:
            new = self._apply_pre_stage(run, kw, new, ids, img, flat, out, rec)
        pos = new.get("position_ids")
        if run.next_pos is None:
            p = _max_rows(pos if pos is not None else ad.full_position_ids(kw, rec))
            m = run.llm_mask
            run.next_pos = (p.masked_fill(m == 0, -1) if m is not None else p).amax(1) + 1
        run.cur_len = run.llm_len
        run.cur_valid = (run.llm_mask.bool() if run.llm_mask is not None
                         else torch.ones(B, run.llm_len, dtype=torch.bool, device=dev))
        if self.llm_stages:
            ad.check_in_llm_prefill(run.llm_len)
        self._run, self._phase = run, _PREFILL
        self.report.pruned_calls += 1
        if self._fallback_note:
            self.report.note(self._fallback_note)
        return new

    def _initial_visual(self, img, layout, counts) -> _Visual:
        B = img.shape[0]
        dev = img.device
        rows = [img[b].nonzero().flatten() for b in range(B)]
        pos = _pad_rows(rows, -1, dev)
        valid = pos >= 0
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        flat_idx = torch.where(valid, offsets[:, None] + torch.arange(pos.shape[1], device=dev)[None], -1)
        flat_idx_c = flat_idx.clamp_min(0).cpu()
        coords = layout.coords[flat_idx_c].to(dev)  # [B, V, 4]
        coords = coords.masked_fill(~valid[..., None], -1)
        # image index relative to the sample
        img_col = coords[..., 0]
        first = img_col.masked_fill((img_col < 0) | ~valid, 1 << 30).amin(1, keepdim=True)
        coords[..., 0] = torch.where((img_col >= 0) & valid, img_col - first, img_col)
        newline = layout.newline[flat_idx_c].to(dev) & valid
        protected = newline & (self.newlines == "keep")
        dropped = newline & (self.newlines == "drop")
        cls = None if layout.cls is None else layout.cls[flat_idx_c].to(dev).masked_fill(~valid, 0.0)
        orig = torch.where(valid, torch.arange(pos.shape[1], device=dev)[None].expand(B, -1), -1)
        return _Visual(pos=pos.clamp_min(0), valid=valid, orig=orig, protected=protected, dropped=dropped,
                       coords=coords, cls=cls)

    # -- selection (shared by both kinds of stages) --------------------------------------------------
    def _select(self, run: _Run, index: int, stage, feats: torch.Tensor, relevance, text_emb, text_mask, layer):
        """Select among the candidate visual tokens; returns (keep bool [B, V], replacement [B, V, D] or None)."""
        vis = run.visual
        cand = vis.valid & ~vis.protected & ~vis.dropped
        n = cand.sum(1)
        first = not run.stages
        t0 = time.perf_counter()
        keep = vis.valid & vis.protected
        repl = None
        rows_with = (n > 0).nonzero().flatten()
        budget = stage.budget
        for b in rows_with.tolist():
            if not budget.is_fraction and budget.value > int(n[b]) and not first:
                raise StageError(f"stage {index} keeps {budget.value} tokens but the earlier stage left only "
                                 f"{int(n[b])} candidate visual tokens (sample {b})")
        if len(rows_with):
            # compact the candidates of each row to the front
            order = [cand[b].nonzero().flatten() for b in range(cand.shape[0])]
            cidx = _pad_rows([order[b] for b in rows_with.tolist()], -1, feats.device)
            sub = rows_with
            cmask = cidx >= 0
            f = _gather(feats[sub].detach(), cidx, 1, 0.0)
            rel = None if relevance is None else _gather(relevance[sub].float(), cidx, 1, 0.0)
            extra = {"coords": _gather(vis.coords[sub], cidx, 1, -1).float()}
            te = None if text_emb is None else text_emb[sub].detach()
            tm = None if text_mask is None else text_mask[sub]
            if te is not None and te.shape[1] == 0:
                te, tm = None, None
            grid = self._grid_for(run, cidx) if first else None
            with torch.no_grad():
                ctx = make_context(f, mask=cmask, relevance=rel, text_embeddings=te, text_mask=tm, grid=grid,
                                   seed=self.seed + index, **extra)
                sel = stage.selector.select(stage.objective, ctx, budget)
            picked = torch.where(sel.valid, torch.gather(cidx, 1, sel.indices.clamp_min(0)), -1)
            for j, b in enumerate(sub.tolist()):
                p = picked[j][picked[j] >= 0]
                keep[b, p] = True
            if sel.features is not None:
                repl = torch.zeros(vis.pos.shape[0], vis.pos.shape[1], sel.features.shape[-1],
                                   dtype=sel.features.dtype, device=sel.features.device)
                has = torch.zeros(vis.pos.shape, dtype=torch.bool, device=vis.pos.device)
                for j, b in enumerate(sub.tolist()):
                    ok = sel.valid[j]
                    p = picked[j][ok]
                    repl[b, p] = sel.features[j][ok]
                    has[b, p] = True
                repl = (repl, has)
        ms = (time.perf_counter() - t0) * 1e3
        run.select_ms += ms
        if first and len(rows_with) and not budget.is_fraction and budget.value >= int(n[rows_with].max()):
            self.report.note(f"stage {index} keeps {budget.value} tokens, at least as many as there are "
                             f"({int(n[rows_with].max())}): it kept them all")
        before = vis.counts()
        kept_vis = keep & vis.valid
        rep = StageReport(index=index, layer=layer, budget=budget.value, relevance=self._relevance[index],
                          tokens_before=before, tokens_after=_as_list(kept_vis.sum(1)),
                          protected=_as_list((vis.protected & kept_vis).sum(1)), select_ms=ms)
        n_orig = self.report.visual_tokens
        for b in range(vis.pos.shape[0]):
            sc = torch.full((n_orig[b] if b < len(n_orig) else 0,), float("nan"))
            if relevance is not None:
                cb = cand[b]
                sc[vis.orig[b][cb].cpu()] = relevance[b][cb].detach().float().cpu()
            rep.scores.append(sc)
            sel_b = kept_vis[b] & ~vis.protected[b]
            o = vis.orig[b][sel_b]
            srt = o.argsort()
            rep.kept.append(o[srt].cpu())
            rep.coords.append(vis.coords[b][sel_b][srt].cpu())
        run.stages.append(rep)
        return kept_vis, repl

    def _grid_for(self, run: _Run, cidx: torch.Tensor):
        """The (rows, cols) grid when every sample's candidates are one full image grid, else None."""
        vis = run.visual
        if vis.protected.any() or cidx.shape[1] == 0 or (cidx < 0).any():
            return None
        c = vis.coords
        if (c[..., 1] != 0).any() or (c[..., 0] != 0).any() or (c[..., 2] < 0).any():
            return None
        rows = int(c[..., 2].max()) + 1
        cols = int(c[..., 3].max()) + 1
        return (rows, cols) if rows * cols == cidx.shape[1] else None

    # -- the stage before the LLM ------------------------------------------------------------------
    def _apply_pre_stage(self, run, kw, new, ids, img, flat, out, rec):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        ad = self.adapter
        index, stage = self.pre_stage
        vis = run.visual
        B, L = ids.shape
        dev = ids.device
        V = vis.pos.shape[1]
        counts = vis.valid.sum(1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        flat_idx = torch.where(vis.valid, offsets[:, None] + torch.arange(V, device=dev)[None], -1)
        feats = _gather(flat.unsqueeze(0).expand(B, -1, -1), flat_idx, 1, 0.0)  # [B, V, D]
        relevance, text_emb, text_mask = self._pre_signals(stage, run, ids, img, feats, kw)
        keep_vis, repl = self._select(run, index, stage, feats, relevance, text_emb, text_mask, None)

        ad.check_pre_llm(_as_list(keep_vis.sum(1)))
        keep_tok = ~img
        keep_tok = keep_tok.clone()
        for b in range(B):
            keep_tok[b, vis.pos[b][keep_vis[b]]] = True
        new_lens = keep_tok.sum(1)
        Lp = int(new_lens.max())
        am = kw.get("attention_mask")
        right = am is not None and bool((am[:, -1] == 0).any()) and not bool((am[:, 0] == 0).any())
        rows = []
        for b in range(B):
            r = keep_tok[b].nonzero().flatten()
            fill = torch.full((Lp - r.numel(),), -1, dtype=torch.long, device=dev)
            rows.append(torch.cat([r, fill]) if right else torch.cat([fill, r]))
        idx = torch.stack(rows)  # [B, Lp], -1 = new padding
        changed = Lp != L or bool((idx < 0).any()) or repl is not None
        run.pre_changed = changed
        # features of the kept tokens, in prompt order
        kept_flat = []
        for b in range(B):
            sel = keep_vis[b]
            fb = feats[b][sel]
            if repl is not None:
                r, has = repl
                hb = has[b][sel]
                fb = torch.where(hb[:, None], r[b][sel].to(fb.dtype), fb)
            kept_flat.append(fb)
        kept_flat = torch.cat(kept_flat, 0)
        # the visual tokens in the new sequence
        newpos_of_old = torch.full((B, L), -1, dtype=torch.long, device=dev)
        for b in range(B):
            newpos_of_old[b, idx[b][idx[b] >= 0]] = torch.arange(int(new_lens[b]), device=dev) + (
                0 if right else Lp - int(new_lens[b]))
        run.visual = vis.take(keep_vis, torch.gather(newpos_of_old, 1, vis.pos))
        run.counts_after_pre = run.visual.counts()
        if not changed:
            return new

        new["input_ids"] = _gather(ids, idx, 1, ad.pad_token_id)
        if am is not None or bool((idx < 0).any()):
            base_mask = am if am is not None else torch.ones_like(ids)
            new_mask = _gather(base_mask, idx, 1, 0)
        else:
            new_mask = None
        for key in ("labels",) + tuple(ad.token_keys):
            t = kw.get(key)
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == L:
                new[key] = _gather(t, idx, 1, -100 if key == "labels" else 0)
        # positions
        valid_new = (new_mask.bool() if new_mask is not None else torch.ones(B, Lp, dtype=torch.bool, device=dev))
        full = ad.full_position_ids(kw, rec)
        full_max = _max_rows(full)
        orig_next = full_max.masked_fill(am == 0, -1).amax(1) + 1 if am is not None else full_max.amax(1) + 1
        if ad.mrope or stage.positions == "preserve":
            pos = torch.stack([_gather(p, idx, 1, 0) for p in full]) if full.dim() == 3 else _gather(full, idx, 1, 0)
            gaps = True
        else:
            pos = _positions_from_mask(valid_new)
            gaps = False
        new["position_ids"] = pos
        pmax = _max_rows(pos)
        run.next_pos = pmax.masked_fill(~valid_new, -1).amax(1) + 1
        run.shift = orig_next - run.next_pos
        if new_mask is None and gaps and kw.get("past_key_values") is None:
            new_mask = torch.ones(B, Lp, dtype=torch.long, device=dev)  # see HF_HOOKS: packed-sequence detection
        if new_mask is not None or am is not None:
            new["attention_mask"] = new_mask
        run.llm_len = Lp
        run.llm_mask = new_mask
        mm = dict(new["mm_encoder_outputs"])
        mm["image"] = BaseModelOutputWithPooling(pooler_output=ad.make_pooler(kept_flat, out.pooler_output))
        new["mm_encoder_outputs"] = mm
        if self._compact_note and stage.positions == "compact":
            self.report.note(self._compact_note)
        return new

    def _pre_signals(self, stage, run, ids, img, feats, kw):
        vis = run.visual
        relevance = None
        text_emb = text_mask = None
        am = kw.get("attention_mask")
        valid = am.bool() if am is not None else torch.ones_like(img)
        text = valid & ~img
        source = self._relevance[self.pre_stage[0]]
        if source == "cls_attention":
            relevance = vis.cls
        need_text = source == "text_similarity" or _needs(stage.objective, "text_embeddings")
        if need_text:
            with torch.no_grad():
                emb = self.adapter.input_embeddings(ids)
            rows = [text[b].nonzero().flatten() for b in range(ids.shape[0])]
            tidx = _pad_rows(rows, -1, ids.device)
            text_emb = _gather(emb, tidx, 1, 0.0).to(feats.dtype)
            text_mask = tidx >= 0
            if source == "text_similarity":
                relevance = _text_similarity(feats, vis.valid, text_emb, text_mask)
        return relevance, text_emb, text_mask

    # -- decoder-layer pre-hooks -----------------------------------------------------------------
    def _layer_pre(self, layer_idx, module, args, kwargs):
        run = self._run
        if run is None or self._phase is None:
            return None
        if self._phase == _DECODE:
            return self._layer_decode(layer_idx, run, args, kwargs)
        hs = args[0] if args else kwargs["hidden_states"]
        if run.cur_valid.device != hs.device:  # layers spread over devices
            _move_run(run, hs.device)
        if hs.shape[1] != run.cur_len:
            raise StageError(f"decoder layer {layer_idx} got {hs.shape[1]} tokens during the prefill, expected "
                             f"{run.cur_len}; chunked prefill is not supported with in-LLM pruning")
        kwargs = dict(kwargs)
        if run.llm_pos is None:
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == run.llm_len:
                run.llm_pos = pid.expand(run.B, -1)
            else:
                run.llm_pos = _positions_from_mask(run.cur_valid) if run.llm_mask is not None else \
                    torch.arange(run.llm_len, device=hs.device)[None].expand(run.B, -1)
            run.group = torch.arange(run.llm_len, device=hs.device)[None].expand(run.B, -1)
        if layer_idx in self.llm_stages:
            hs = self._apply_llm_stage(layer_idx, run, hs)
        run.done_layers.add(layer_idx)
        run.layer_group[layer_idx] = (run.group, run.group_shift if run.group_pos is not None else None)
        g = run.group
        if run.group_pos is not None:
            cos_sin = self.adapter.rotary(layer_idx, hs, run.group_pos)
            kwargs["position_embeddings"] = cos_sin
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = run.group_pos
        else:
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, (tuple, list)):
                kwargs["position_embeddings"] = tuple(_gather(t, g, 1) for t in pe)
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == run.llm_len:
                kwargs["position_ids"] = _gather(pid, g, 1) if pid.dim() == 2 else \
                    torch.stack([_gather(p, g, 1) for p in pid])
        m = kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor):
            if m.dim() != 4:
                raise StageError(f"unexpected {m.dim()}-D attention mask at decoder layer {layer_idx}")
            kwargs["attention_mask"] = _gather(_gather(m, g, 2), g, 3)
        elif m is not None:
            raise UnsupportedModelError(f"attention mask of type {type(m).__name__} (e.g. flex attention's "
                                        "BlockMask) is not supported with in-LLM pruning; use sdpa or eager")
        if args:
            return (hs,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hs
        return args, kwargs

    def _apply_llm_stage(self, layer_idx, run: _Run, hs):
        index, stage = self.llm_stages[layer_idx]
        vis = run.visual
        feats = _gather(hs, vis.pos, 1, 0.0)  # [B, V, D]
        relevance = text_emb = text_mask = None
        cap = run.captures.get(layer_idx - 1, {})
        if stage.relevance == "text_attention":
            relevance = cap.get("text_attention")
        elif stage.relevance == "key_norm":
            kn = cap.get("key_norm")
            relevance = None if kn is None else _gather(kn, vis.pos, 1, 0.0)
        source = self._relevance[index]
        if source == "cls_attention":
            relevance = vis.cls
        if stage.relevance in ("text_attention", "key_norm") and relevance is None:
            raise StageError(f"no attention was captured at layer {layer_idx - 1} for stage {index}")
        need_text = source == "text_similarity" or _needs(stage.objective, "text_embeddings")
        if need_text:
            is_vis = torch.zeros(run.B, run.cur_len + 1, dtype=torch.bool, device=hs.device)
            is_vis.scatter_(1, vis.pos.masked_fill(~vis.valid, run.cur_len), True)
            text = run.cur_valid & ~is_vis[:, : run.cur_len]
            tidx = _pad_rows([text[b].nonzero().flatten() for b in range(run.B)], -1, hs.device)
            text_emb = _gather(hs, tidx, 1, 0.0)
            text_mask = tidx >= 0
            if source == "text_similarity":
                relevance = _text_similarity(feats, vis.valid, text_emb, text_mask)
        keep_vis, repl = self._select(run, index, stage, feats, relevance, text_emb, text_mask, layer_idx)
        # kept positions in the current sequence
        B, L = run.B, run.cur_len
        keep_tok = torch.ones(B, L + 1, dtype=torch.bool, device=hs.device)
        drop = vis.valid & ~keep_vis
        keep_tok.scatter_(1, vis.pos.masked_fill(~drop, L), False)
        keep_tok = keep_tok[:, :L]
        lens = keep_tok.sum(1)
        if bool((lens != lens[0]).any()):
            raise StageError(f"stage {index} at layer {layer_idx} would leave different sequence lengths per sample "
                             f"({_as_list(lens)}): in-LLM stages need every sample to keep the same number of "
                             "visual tokens (same visual-token counts, or an earlier stage with an int budget)")
        Lp = int(lens[0])
        rel = keep_tok.nonzero()[:, 1].view(B, Lp)
        if repl is not None:
            r, has = repl
            rows = _gather(r.to(hs.dtype), torch.arange(vis.pos.shape[1], device=hs.device)[None].expand(B, -1), 1)
            hs = hs.clone()
            for b in range(B):
                hs[b, vis.pos[b][has[b]]] = rows[b][has[b]]
        hs = _gather(hs, rel, 1)
        newpos_of_old = torch.full((B, L), -1, dtype=torch.long, device=hs.device)
        newpos_of_old.scatter_(1, rel, torch.arange(Lp, device=hs.device)[None].expand(B, -1).contiguous())
        run.visual = vis.take(keep_vis, torch.gather(newpos_of_old, 1, vis.pos))
        run.group = torch.gather(run.group, 1, rel)
        run.cur_valid = torch.gather(run.cur_valid, 1, rel)
        run.cur_len = Lp
        compact = stage.positions == "compact" and not self.adapter.mrope
        if compact:
            new_pos = _positions_from_mask(run.cur_valid)
            llm_last = run.llm_pos.masked_fill(~_llm_valid(run), -1).amax(1)
            run.group_pos = new_pos
            run.group_shift = llm_last - new_pos.masked_fill(~run.cur_valid, -1).amax(1)
        elif run.group_pos is not None:
            run.group_pos = torch.gather(run.group_pos, 1, rel)
        if self._compact_note and stage.positions == "compact":
            self.report.note(self._compact_note)
        return hs

    def _layer_decode(self, layer_idx, run: _Run, args, kwargs):
        grp = run.layer_group.get(layer_idx)
        if grp is None:
            return None
        g, shift = grp
        kwargs = dict(kwargs)
        ref = args[0] if args else kwargs["hidden_states"]
        g = g.to(ref.device)
        shift = None if shift is None else shift.to(ref.device)
        changed = False
        m = kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor):
            self.adapter.check_in_llm_decode(layer_idx, m, run.decode_kv)
            if m.shape[-1] == run.decode_kv:
                # sized from an unpruned layer's cache: keep the kept prefix columns and the new ones
                pre = _gather(m[..., : run.llm_len], g, 3)
                kwargs["attention_mask"] = torch.cat([pre, m[..., run.llm_len:]], dim=-1)
                changed = True
            elif m.shape[-1] != g.shape[1] + run.decode_kv - run.llm_len:
                raise StageError(f"decode mask at layer {layer_idx} has {m.shape[-1]} columns, matching neither the "
                                 f"unpruned ({run.decode_kv}) nor this layer's pruned cache "
                                 f"({g.shape[1] + run.decode_kv - run.llm_len}); this mask layout is not supported")
            # else: built from a cache pruned like this layer's (e.g. Gemma3's first full-attention layer);
            # its padding columns are the left-padding prefix, which pruning keeps in place
        elif m is not None:
            raise UnsupportedModelError(f"attention mask of type {type(m).__name__} is not supported with in-LLM "
                                        "pruning")
        else:
            self.adapter.check_in_llm_decode(layer_idx, None, run.decode_kv)
        if shift is not None:
            pid = kwargs.get("position_ids")
            if not isinstance(pid, torch.Tensor) or pid.dim() != 2:
                raise StageError("positions='compact' inside the LLM needs 2-D position_ids at the decoder layers")
            hs = args[0] if args else kwargs["hidden_states"]
            pos = pid - shift[:, None]
            kwargs["position_embeddings"] = self.adapter.rotary(layer_idx, hs, pos)
            kwargs["position_ids"] = pos
            changed = True
        if not changed:
            return None
        return args, kwargs

    # -- decoding ---------------------------------------------------------------------------------
    def _decode_inputs(self, run: _Run, kw: dict, past: int) -> dict:
        new = dict(kw)
        ids = kw.get("input_ids")
        q = ids.shape[1] if ids is not None else kw["inputs_embeds"].shape[1]
        if ids is not None and q > 1 and bool((ids == self.adapter.image_token_id).any()):
            raise StageError("new image tokens after a pruned prompt (chunked prefill or a multi-turn cache) are not "
                             "supported; start a new cache")
        after = past - run.llm_len  # tokens already decoded
        run.decode_kv = past + q
        am = kw.get("attention_mask")
        if run.pre_changed:
            if am is not None:
                if am.dim() != 2:
                    raise StageError("decoding after a pruned prompt needs a 2-D attention_mask")
                tail = am[:, am.shape[1] - (after + q):]
                new["attention_mask"] = torch.cat([_mask_like(run, am), tail], dim=1)
            elif run.llm_mask is not None and bool((run.llm_mask == 0).any()):
                tail = torch.ones(run.B, after + q, dtype=run.llm_mask.dtype, device=run.llm_mask.device)
                new["attention_mask"] = torch.cat([run.llm_mask, tail], dim=1)
        pid = kw.get("position_ids")
        if pid is None:
            pos = run.next_pos[:, None] + after + torch.arange(q, device=run.next_pos.device)[None]
            if self.adapter.mrope:
                pos = pos[None].expand(3, -1, -1)
            new["position_ids"] = pos
        elif run.shift is not None and not self.adapter.mrope and bool((run.shift != 0).any()):
            new["position_ids"] = pid - run.shift.view(-1, *([1] * (pid.dim() - 1)))
        self._run, self._phase = run, _DECODE
        return new

    # -- report -----------------------------------------------------------------------------------
    def _finish_report(self, run: _Run) -> None:
        rep = self.report
        rep.stages = run.stages
        depth = self.adapter.depth
        counts = run.counts_after_pre
        by_layer = {s.layer: s.tokens_after for s in run.stages if s.layer is not None}
        per_layer = []
        cur = counts
        for li in range(depth):
            if li in by_layer:
                cur = by_layer[li]
            per_layer.append(max(cur) if cur else 0)
            if cur and min(cur) != max(cur):
                rep.note("samples kept different numbers of visual tokens; tokens_per_layer gives the maximum")
        rep.tokens_per_layer = per_layer
        rep.equivalent_tokens = sum(per_layer) / depth if depth else 0.0
        rep.select_ms = run.select_ms


def _max_rows(pos: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions to take maxima over: 1-D ids as they are; M-RoPE ids: the largest of the
    ``(t, h, w)`` rows (``generate``'s 4-row ids start with a plain text row, which is skipped)."""
    if pos.dim() == 3:
        return (pos[1:] if pos.shape[0] == 4 else pos).amax(0)
    return pos


def _move_run(run: _Run, device) -> None:
    """Move a run's per-token state to ``device`` (decoder layers on several devices)."""
    for name in ("llm_mask", "cur_valid", "group", "group_pos", "group_shift", "llm_pos", "next_pos", "shift"):
        t = getattr(run, name)
        if isinstance(t, torch.Tensor):
            setattr(run, name, t.to(device))
    v = run.visual
    run.visual = _Visual(pos=v.pos.to(device), valid=v.valid.to(device), orig=v.orig.to(device),
                         protected=v.protected.to(device), dropped=v.dropped.to(device), coords=v.coords.to(device),
                         cls=None if v.cls is None else v.cls.to(device))
    run.captures = {k: {n: t.to(device) for n, t in d.items()} for k, d in run.captures.items()}


def _method_config(method) -> dict:
    try:
        return method.to_config()
    except TokenPruneError:  # unregistered components (ad-hoc selectors in a script or test)
        return {"name": method.name, "repr": repr(method)}


def _llm_valid(run: _Run) -> torch.Tensor:
    if run.llm_mask is not None:
        return run.llm_mask.bool()
    return torch.ones(run.B, run.llm_len, dtype=torch.bool, device=run.llm_pos.device)


def _mask_like(run: _Run, am: torch.Tensor) -> torch.Tensor:
    if run.llm_mask is not None:
        return run.llm_mask.to(am.dtype)
    return torch.ones(run.B, run.llm_len, dtype=am.dtype, device=am.device)


def _needs(objective, signal: str) -> bool:
    """Whether ``objective`` (or a term of a weighted sum) reads ``signal`` from the context."""
    if objective is None:
        return False
    tags = getattr(objective, "tags", None)
    if signal in (getattr(tags, "requires", ()) or ()):
        return True
    if signal == "text_embeddings" and getattr(objective, "source", None) == "text_similarity":
        return True
    terms = getattr(objective, "terms", ()) or ()
    return any(_needs(t[1] if isinstance(t, tuple) else t, signal) for t in terms)


def _text_similarity(feats, valid, text_emb, text_mask) -> torch.Tensor:
    """float32 [B, V]: mean cosine similarity of each visual token to the valid text tokens."""
    v = torch.nn.functional.normalize(feats.float(), dim=-1)
    t = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    sim = torch.bmm(v, t.transpose(1, 2))  # [B, V, T]
    tm = text_mask[:, None, :].float()
    rel = (sim * tm).sum(-1) / tm.sum(-1).clamp_min(1.0)
    return rel.masked_fill(~valid, 0.0)


def prune(model, method, *, adapter=None, newlines: str = "keep", dynamic_threshold: float = 0.5,
          cls_fallback: str | None = None, seed: int = 0, **method_params) -> PruneSession:
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
    cls_fallback : {None, "text_similarity", "mean_attention"}
        What ``relevance="cls_attention"`` means on a vision tower without a [CLS] token (SigLIP,
        Qwen-ViT). ``None`` (default) raises :class:`~tokenprune.UnsupportedModelError`.
        ``"text_similarity"`` uses the text-similarity relevance instead (every family).
        ``"mean_attention"`` uses the attention each patch receives at the feature layer, averaged over
        all queries and heads (VisionZip's choice for towers without [CLS]); LLaVA-OneVision, Gemma3,
        Idefics3 and SmolVLM. The report notes the substitution.
    seed : int
        Seed of the selection contexts (stage ``i`` uses ``seed + i``).
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
        without [CLS], or an attention implementation that cannot be wrapped.
    StageError
        A stage layer beyond the model's depth, layers that collide after scaling, an int budget above
        what the previous stage keeps, a text-attention stage before the LLM; at run time, a budget
        above the tokens an earlier stage left, unequal sequence lengths in an in-LLM stage, or (Gemma3)
        in-LLM pruning beyond the sliding window.

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
    not stated, we use what attention uses). ``relevance="text_similarity"`` is the mean cosine
    similarity of each visual token to the prompt's text tokens: input embeddings before the LLM
    (CDPruner's instruction relevance), hidden states at layer ``k`` inside it; the text embeddings are
    also put in the context for criteria that read them. ``relevance="cls_attention"`` is the vision
    tower's [CLS] row at the feature layer, head-averaged (FasterVLM, VisionZip); inside the LLM the
    same scores follow the kept tokens.

    Every context also carries ``coords`` (float ``[B, N, 4]``: image, crop, row, col; ``-1`` unknown)
    as an extra signal, and ``grid`` when the candidates are one full image grid.

    Batches: samples are selected together (one context per stage); every sample keeps the same
    budget. Before the LLM, samples that end with different lengths are re-padded (on the side the
    batch was padded). Inside the LLM the lengths must stay equal, so every sample needs the same
    number of visual tokens there.

    Not supported: chunked prefill, static/compiled caches with in-LLM stages, flex attention masks,
    assisted decoding (untested), continuing a cache with new images. Video tokens are not pruned.

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
                        cls_fallback=cls_fallback, seed=seed, **method_params)
