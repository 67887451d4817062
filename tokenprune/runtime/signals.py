"""Signal capture: the relevance scores and text embeddings each stage reads.

* Vision side, during ``get_image_features``: the vision tower's [CLS] attention row (or, on towers
  without [CLS], the mean attention each patch receives) at the feature layer, and a
  :class:`~tokenprune.adapters.VisionRecord` of the call's image kwargs, matched to the features later
  by the identity of the output object.
* Text side, during the prefill, from decoder layer ``k - 1`` of a stage at layer ``k``: the text
  raters' head-averaged attention to the visual tokens (``text_attention``) or the keys' L1 norms
  (``key_norm``), from the post-RoPE queries and keys the attention wrapper hands over there,
  computed when the stage at ``k`` reads them.
* On demand, when a stage runs: the prompt's text embeddings (input embeddings before the LLM,
  hidden states inside it) and the text-similarity relevance computed from them.
"""

from __future__ import annotations

import sys
import weakref

import torch

from ..adapters.base import VisionRecord
from ..criteria.relevance import cosine_to_text
from ..errors import StageError, UnsupportedModelError
from . import attention as attn
from .plan import VISION_ATTENTION_SOURCES
from .state import PromptState, bind_arguments, gather, true_positions


def text_similarity(feats: torch.Tensor, valid: torch.Tensor, text_emb: torch.Tensor,
                    text_mask: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, V]``: mean cosine similarity of each visual token to the valid text tokens (0 at padding)."""
    unit = torch.nn.functional.normalize(feats.float(), dim=-1) * valid.unsqueeze(-1)
    return cosine_to_text(unit, text_emb, text_mask, valid, "mean")


class SignalCapture:
    """Captures and computes the signals of one pruning context.

    Parameters
    ----------
    plan : Plan
        Which signals are needed (``need_cls``, ``mean_attention``, ``dynamic_threshold``).
    adapter : ModelAdapter
        Supplies input embeddings.
    vision_cache : VisionCache, optional
        Where ``get_image_features`` outputs and vision signals are shared across contexts.
    """

    #: Only the latest ``get_image_features`` calls can feed a prefill.
    MAX_RECORDS = 2

    def __init__(self, plan, adapter, vision_cache=None):
        self.plan = plan
        self.adapter = adapter
        self.vision_cache = vision_cache
        self._records: dict = {}
        self._cls_buffer: list | None = None
        self._keys_buffer: list | None = None

    def clear(self) -> None:
        """Forget every vision record (on leaving the context)."""
        self._records.clear()
        self._cls_buffer = None
        self._keys_buffer = None

    # -- vision side ------------------------------------------------------------------------------
    def on_image_features(self, orig, args, kwargs):
        """Run the model's own ``get_image_features`` (or take it from the vision cache) and record
        what the prefill will need: the call's arguments and the captured vision signals (the [CLS]
        row or mean attention; for a stage at ``site="vision"`` also the feature layer's keys and
        hidden states)."""
        bound = bind_arguments(orig, args, kwargs)
        kind = ("mean" if self.plan.mean_attention else "cls") if self.plan.need_cls else None
        vision_site = self.plan.vision_site
        if vision_site:  # a signal kind of its own in the vision cache: (attention or None, keys)
            kind = "keys" if kind is None else f"{kind}+keys"
        with_keys = vision_site or self._keys_ride_along

        def compute():
            self._cls_buffer = [] if self.plan.need_cls else None
            self._keys_buffer = [] if with_keys else None
            try:
                out = orig(*args, **kwargs)
                cls = torch.cat(self._cls_buffer, 0) if self._cls_buffer else None
                keys = torch.cat(self._keys_buffer, 0) if self._keys_buffer else None
                if vision_site:
                    return out, (cls, keys)
                if with_keys and keys is not None:  # stored for later pre-projector contexts too
                    return out, cls, {f"{kind}+keys": (cls, keys)}
                return out, cls
            finally:
                self._cls_buffer = self._keys_buffer = None

        if self.vision_cache is None:
            out, cls = compute()
        else:
            out, cls = self.vision_cache.fetch(self.adapter.model, bind_arguments(orig, args, kwargs, defaults=True),
                                                compute, kind)
        keys = states = None
        if vision_site:
            cls, keys = cls if cls is not None else (None, None)
            states = self.adapter.vision_states(out, bound)
        while len(self._records) >= self.MAX_RECORDS:
            self._records.pop(next(iter(self._records)))
        try:
            ref = weakref.ref(out)
        except TypeError:  # e.g. return_dict=False gives a tuple, which no forward takes anyway
            return out
        # the record holds no strong reference to the output (vision hidden states can be large)
        self._records[id(out)] = (ref, VisionRecord(kwargs=bound, output=None, cls_attention=cls,
                                                    pooler_output=getattr(out, "pooler_output", None),
                                                    keys=keys, vision_states=states))
        return out

    def record_of(self, output) -> VisionRecord | None:
        """The record of the ``get_image_features`` call that returned ``output`` (``None``: not seen).

        Records stay until newer calls push them out (:attr:`MAX_RECORDS`): ``generate`` without a
        cache passes the same features to every step's forward.
        """
        entry = self._records.get(id(output))
        return entry[1] if entry is not None and entry[0]() is output else None

    def capture_cls(self, module, query, key, attention_mask, kwargs) -> None:
        """Attention-wrapper callback: the head-averaged [CLS] row of the vision feature layer."""
        if self._cls_buffer is None:
            return
        rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
        probs = attn.attention_rows(query, key, attention_mask, kwargs.get("scaling"), rows,
                                    causal=bool(getattr(module, "is_causal", False)))
        self._cls_buffer.append(probs[:, 0].detach())

    def capture_mean(self, module, query, key, attention_mask, kwargs) -> None:
        """Attention-wrapper callback: the attention each patch receives, averaged over queries and heads."""
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

    def capture_keys(self, module, query, key, attention_mask, kwargs) -> None:
        """Attention-wrapper callback: the feature layer's keys averaged over heads, float32
        ``[n, T, head_dim]`` (VisionZip's merge metric; the vision tower has no RoPE)."""
        if self._keys_buffer is not None:
            self._keys_buffer.append(key.detach().float().mean(1))

    @property
    def _keys_ride_along(self) -> bool:
        """Whether a tower pass that captures the [CLS] row for the vision cache captures the keys too,
        so that a later context with a stage before the projector finds both in the cache."""
        return (self.vision_cache is not None and self.plan.need_cls and not self.plan.mean_attention
                and not self.plan.vision_site and self.adapter.vision_site_unsupported() is None)

    def vision_callback(self):
        """The attention-wrapper callback for the vision tower: [CLS] row or mean attention, and the
        keys for a stage at ``site="vision"`` (or riding along, see :attr:`_keys_ride_along`)."""
        attention = self.capture_mean if self.plan.mean_attention else self.capture_cls
        if not self.plan.vision_site and not self._keys_ride_along:
            return attention

        def both(module, query, key, attention_mask, kwargs):
            if self.plan.need_cls:
                attention(module, query, key, attention_mask, kwargs)
            self.capture_keys(module, query, key, attention_mask, kwargs)
        return both

    # -- text side: attention at layer k - 1 --------------------------------------------------------
    def capture_text(self, state: PromptState, layer_idx: int, stage, module, query, key, attention_mask,
                     kwargs) -> None:
        """Attention-wrapper callback of decoder layer ``layer_idx`` (``k - 1`` for the stage at ``k``):
        keep the post-RoPE ``query`` and ``key``, the mask and the call's scaling, from which
        :meth:`layer_signal` computes the stage's signal when the stage runs.

        Deferring the computation to the stage's pre-hook makes it one runtime entry between the
        model's layers instead of two (on a CPU the first small operations after the model's matrix
        products cost tens of microseconds each, see ``benchmarks/bench_cold_op.py``); the price is
        that layer ``k - 1``'s query (``[B, H, L, d]``, the size of the hidden states) lives until
        layer ``k`` starts (a ``key_norm`` stage keeps only the keys, which the KV cache holds anyway).
        Calls whose length is not the current prefill's (another forward) are ignored.
        """
        if query.shape[2] != state.cur_len or key.shape[2] != state.cur_len:
            return
        if stage.relevance == "key_norm":  # reads the keys only: the query is not kept
            query = attention_mask = None
        state.attention_inputs[layer_idx] = (stage, query, key, attention_mask, kwargs.get("scaling"),
                                             kwargs.get("softcap"), bool(getattr(module, "is_causal", True)))

    def layer_signal(self, state: PromptState, layer_idx: int) -> dict:
        """The LLM-attention signal captured at decoder layer ``layer_idx`` (``{}``: none), computed on
        first read from what :meth:`capture_text` kept, on the state's device.

        ``text_attention``: float32 ``[B, V]``, the raters' head-averaged attention to each visual
        token. ``key_norm``: float32 ``[B, L]``, the keys' L1 norms averaged over key/value heads.
        """
        pending = state.attention_inputs.pop(layer_idx, None)
        if pending is not None:
            stage, query, key, mask, scaling, softcap, causal = pending
            dev = state.cur_valid.device
            if key.device != dev:  # decoder layers spread over devices
                query, key, mask = (None if t is None else t.to(dev) for t in (query, key, mask))
            with torch.no_grad():
                state.captures[layer_idx] = self.text_signal(state, stage, query, key, mask, scaling, softcap, causal)
        return state.captures.get(layer_idx, {})

    def text_signal(self, state: PromptState, stage, query, key, attention_mask, scaling, softcap,
                    causal: bool) -> dict:
        """The signal ``stage`` reads from one attention call over the current sequence: ``{"key_norm":
        float32 [B, L]}`` or ``{"text_attention": float32 [B, V]}`` (see :meth:`layer_signal`).

        Notes
        -----
        ``O(B · H · R · L · d)`` for ``R`` rater rows (:func:`~tokenprune.runtime.attention.attention_rows`).
        """
        if stage.relevance == "key_norm":
            return {"key_norm": attn.key_l1_norm(key)}
        vis = state.visual
        rows, row_valid = self.rater_rows(state, stage.raters)
        probs = attn.attention_rows(query, key, attention_mask, scaling, rows, softcap=softcap,
                                    causal=causal)  # [B, R, L]
        if row_valid is None:  # one real rater in every sample
            return {"text_attention": vis.rows(probs[:, 0]) * vis.valid}
        img = torch.gather(probs, 2, vis.pos[:, None, :].expand(-1, probs.shape[1], -1))  # [B, R, V]
        img = img * vis.valid[:, None, :]
        w = row_valid.float()
        if stage.raters == "dynamic":
            mass = img.sum(-1)  # [B, R]: each rater's attention to the image
            top = mass.masked_fill(~row_valid, float("-inf")).amax(1, keepdim=True)
            w = (row_valid & (mass >= self.plan.dynamic_threshold * top)).float()
        return {"text_attention": (img * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)}

    def rater_rows(self, state: PromptState, raters: str):
        """Query positions of the text raters in the current sequence: long ``[B, R]`` and valid bool
        ``[B, R]``; or, for the last token of prompts without padding, its position (an int) and ``None``."""
        B, L = state.cur_valid.shape
        dev = state.cur_valid.device
        if raters == "last_token" and not state.padded():
            return L - 1, None
        if raters == "last_token":
            valid_pos = torch.arange(L, device=dev)[None].expand(B, -1).masked_fill(~state.cur_valid, -1)
            last = valid_pos.amax(1, keepdim=True)
            return last.clamp_min(0), last >= 0
        vis = state.visual
        first_vis = vis.pos.masked_fill(~vis.valid, L).amin(1, keepdim=True)
        ar = torch.arange(L, device=dev)[None]
        text = state.text_tokens() & (ar > first_vis)  # text tokens that can see some visual token
        idx = true_positions(text)
        if idx.shape[1] == 0:  # no text after the image: fall back to the last token
            return self.rater_rows(state, "last_token")
        return idx.clamp_min(0), idx >= 0

    # -- text side: the attention a stage's own layer would compute (PyramidDrop) ---------------------
    def capture_own_attention(self, state: PromptState, layer_idx: int, stage, layer, hs, kwargs) -> None:
        """Store in ``state.captures[layer_idx]["own_layer_attention"]`` (float32 ``[B, V]``) the raters'
        head-averaged attention to the visual tokens as decoder layer ``layer_idx`` computes it from the
        hidden states entering it, before the stage at that layer prunes them.

        The layer's own input norm, query/key projections (and query/key norms where the family has
        them) and rotary embedding at the current positions give the post-RoPE queries and keys; the
        attention rows are then computed as for ``text_attention`` (:meth:`text_signal`: the same
        raters, softmax in float32 over the keys the layer's mask allows, heads averaged). This is
        PyramidDrop's ranking (``pdrop_rank_drop`` in Cooperx521/PyramidDrop): the last instruction
        token's attention computed with the rank layer's ``input_layernorm``, ``q_proj``, ``k_proj`` and
        ``rotary_emb``, where FastV reads the attention layer ``k - 1`` computed.

        Parameters
        ----------
        layer : torch.nn.Module
            Decoder layer ``layer_idx`` (``input_layernorm``, ``self_attn``).
        hs : torch.Tensor
            ``[B, cur_len, D]`` hidden states entering the layer.
        kwargs : dict
            The layer call's keyword arguments: ``position_embeddings`` (the model's ``(cos, sin)`` for
            the sequence that entered the LLM) and ``attention_mask`` (4-D or ``None``).

        Raises
        ------
        UnsupportedModelError
            A decoder layer without ``input_layernorm`` / ``self_attn.q_proj`` / ``k_proj``, without
            ``position_embeddings`` in its call, or whose mask is not a tensor.

        Notes
        -----
        ``O(B L D²)`` for the projections (the layer computes them again when it runs) and
        ``O(B H R L d)`` for ``R`` rater rows; nothing of size ``L²`` beyond the 4-D mask the layer gets.
        """
        if hs.shape[1] != state.cur_len:
            return
        if state.cur_valid.device != hs.device:
            state.move_to(hs.device)
        attn_mod = getattr(layer, "self_attn", None)
        norm = getattr(layer, "input_layernorm", None)
        if norm is None or attn_mod is None or not hasattr(attn_mod, "q_proj") or not hasattr(attn_mod, "k_proj"):
            raise UnsupportedModelError(f"relevance='own_layer_attention' needs decoder layers with input_layernorm "
                                        f"and self_attn.q_proj/k_proj; {type(layer).__name__} has not")
        pe = kwargs.get("position_embeddings")
        grouped = state.group is not None and state.dropped_tokens
        if state.group_pos is not None:  # positions compacted by an earlier in-LLM stage
            pe = self.adapter.rotary(layer_idx, hs, state.group_pos)
        elif isinstance(pe, (tuple, list)) and grouped:
            pe = tuple(gather(t, state.group, 1) for t in pe)
        if not isinstance(pe, (tuple, list)) or len(pe) != 2:
            raise UnsupportedModelError(f"relevance='own_layer_attention': decoder layer {layer_idx} of "
                                        f"{type(layer).__name__} is not called with position_embeddings=(cos, sin)")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if grouped:
                mask = gather(gather(mask, state.group, 2), state.group, 3)
        elif mask is not None:
            raise UnsupportedModelError(f"attention mask of type {type(mask).__name__} is not supported with "
                                        "relevance='own_layer_attention'; use sdpa or eager attention")
        rope = getattr(sys.modules.get(type(attn_mod).__module__), "apply_rotary_pos_emb", None)
        if rope is None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope
        with torch.no_grad():
            x = norm(hs)
            shape = (*x.shape[:-1], -1, attn_mod.head_dim)
            q = attn_mod.q_proj(x).view(shape).transpose(1, 2)
            k = attn_mod.k_proj(x).view(shape).transpose(1, 2)
            if hasattr(attn_mod, "q_norm"):
                q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
            q, k = rope(q, k, pe[0], pe[1])
            rel = self.text_signal(state, stage, q, k, mask, getattr(attn_mod, "scaling", None),
                                   getattr(attn_mod, "attn_logit_softcapping", None),
                                   bool(getattr(attn_mod, "is_causal", True)))["text_attention"]
        state.captures[layer_idx] = {**state.captures.get(layer_idx, {}), "own_layer_attention": rel}

    # -- what a stage reads -----------------------------------------------------------------------
    def before_llm(self, index: int, stage, state: PromptState, ids, img, feats, kw, vision=None):
        """Relevance and text embeddings for the stage before the LLM.

        Parameters
        ----------
        vision : (output, VisionRecord or None, callable) or None
            For ``relevance="text_encoder"``: what ``get_image_features`` returned, its record, and
            ``to_tokens(scores)`` mapping per-crop scores ``[n_crops, T]`` (over the vision tower's
            tokens) onto the batch's visual tokens, flat ``[N_total]`` in prompt order (as the
            adapter maps the [CLS] attention).

        Returns
        -------
        (relevance, text_emb, text_mask)
            float32 ``[B, V]`` or None; ``[B, T, D]`` in the features' dtype or None; bool ``[B, T]`` or None.

        Raises
        ------
        StageError
            ``relevance="text_encoder"`` without the vision tower's states (features computed outside
            the context) or with visual tokens the adapter cannot map to patches.
        """
        vis = state.visual
        relevance = text_emb = text_mask = None
        source = self.plan.relevance[index]
        if source in VISION_ATTENTION_SOURCES:
            relevance = vis.cls
        elif source == "text_encoder":
            relevance = self.encoder_relevance(state, ids, img, kw, vision)
        if self.plan.needs_text_embeddings(index):
            am = kw.get("attention_mask")
            valid = am.bool() if am is not None else torch.ones_like(img)
            text = valid & ~img
            with torch.no_grad():
                emb = self.adapter.input_embeddings(ids)
            tidx = true_positions(text)
            text_emb = gather(emb, tidx, 1, 0.0).to(feats.dtype)
            text_mask = tidx >= 0
            if source == "text_similarity":
                relevance = text_similarity(feats, vis.valid, text_emb, text_mask)
        return relevance, text_emb, text_mask

    def encoder_relevance(self, state: PromptState, ids, img, kw, vision) -> torch.Tensor:
        """float32 ``[B, V]``: the text encoder's relevance of every visual token to its prompt's instruction
        (:class:`~tokenprune.runtime.text_encoder.TextEncoder`), per crop of every image, mapped onto the
        visual tokens as the [CLS] attention is (LLaVA-NeXT: through the model's own packing); 0 at
        ``image_newline`` tokens.

        Raises
        ------
        StageError
            No vision output or record (features computed outside the context), no feature-layer states
            on the output, or tokens the adapter cannot map.
        """
        enc = self.plan.text_encoder
        out, rec, to_tokens = vision if vision is not None else (None, None, None)
        states = None
        if rec is not None and out is not None:
            layer = rec.kwargs.get("vision_feature_layer")
            layer = getattr(self.adapter.config, "vision_feature_layer", -1) if layer is None else layer
            hs = getattr(out, "hidden_states", None)
            if hs is not None and isinstance(layer, int) and -len(hs) <= layer < len(hs):
                states = hs[layer]
        if states is None:
            raise StageError("relevance='text_encoder' needs the vision tower's feature-layer states: run the vision "
                             "tower inside the prune() context (pass pixel_values, not precomputed mm_encoder_outputs)")
        with torch.no_grad():
            texts = enc.instructions(ids, img, kw.get("attention_mask"))
            text_emb = enc.encode_text(texts)
            patches = enc.embed_patches(states, self.adapter.vision_tower)  # [n_crops, T, C]
        vis = state.visual
        B, V = vis.valid.shape
        counts = vis.valid.sum(1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        flat_idx = torch.where(vis.valid, offsets[:, None] + torch.arange(V, device=counts.device)[None], -1)
        rel = torch.zeros(B, V, dtype=torch.float32, device=vis.valid.device)
        for b in range(B):  # each prompt's instruction against every crop, then that prompt's tokens
            flat = to_tokens(enc.scores(patches, text_emb[b], enc.negate).cpu())
            if flat is None or flat.shape[0] < int(counts.sum()):
                raise StageError("relevance='text_encoder': the adapter could not map the vision tower's patches to "
                                 "the visual tokens")
            rel[b] = gather(flat.to(rel.device)[None], flat_idx[b:b + 1], 1, 0.0)[0]
        return rel

    def in_llm(self, index: int, stage, state: PromptState, layer_idx: int, hs, feats):
        """Signals for the stage at decoder layer ``layer_idx``.

        Parameters
        ----------
        hs : torch.Tensor
            ``[B, L, D]`` the hidden states the stage compares (after the final norm for
            ``stage.feature_norm="final_norm"``); the text embeddings are read from them.
        feats : torch.Tensor
            ``[B, V, D]`` the visual tokens' rows of ``hs``.

        Returns
        -------
        (relevance, text_emb, text_mask, text_relevance)
            As :meth:`before_llm`, plus float32 ``[B, T]`` key norms of the text tokens (or None) for a
            ``key_norm`` stage that reads text. The text tokens are every valid non-visual token, or for
            ``stage.text_tokens="after_image"`` those after each sample's last visual token.

        Raises
        ------
        StageError
            The stage's LLM-attention signal was not captured at layer ``layer_idx - 1``.
        """
        vis = state.visual
        relevance = text_emb = text_mask = text_rel = None
        cap = self.layer_signal(state, layer_idx - 1)
        kn = cap.get("key_norm")
        if stage.relevance == "text_attention":
            relevance = cap.get("text_attention")
        elif stage.relevance == "key_norm":
            relevance = None if kn is None else gather(kn, vis.pos, 1, 0.0)
        elif stage.relevance == "own_layer_attention":  # captured by this layer's pre-hook
            relevance = state.captures.get(layer_idx, {}).get("own_layer_attention")
            if relevance is None:
                raise StageError(f"no attention was computed at layer {layer_idx} for stage {index}")
        source = self.plan.relevance[index]
        if source in VISION_ATTENTION_SOURCES:
            relevance = vis.cls
        if stage.relevance in ("text_attention", "key_norm") and relevance is None:
            raise StageError(f"no attention was captured at layer {layer_idx - 1} for stage {index}")
        if self.plan.needs_text_embeddings(index):
            L = state.cur_len
            text = state.text_tokens()
            if stage.text_tokens == "after_image":
                last_vis = vis.pos.masked_fill(~vis.valid, -1).amax(1, keepdim=True)
                text &= torch.arange(L, device=hs.device)[None] > last_vis
            tidx = true_positions(text)
            text_emb = gather(hs, tidx, 1, 0.0)
            text_mask = tidx >= 0
            if stage.relevance == "key_norm" and kn is not None:
                text_rel = gather(kn, tidx, 1, 0.0)
            if source == "text_similarity":
                relevance = text_similarity(feats, vis.valid, text_emb, text_mask)
        return relevance, text_emb, text_mask, text_rel
