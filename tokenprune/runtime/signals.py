"""Signal capture: the relevance scores and text embeddings each stage reads.

* Vision side, during ``get_image_features``: the vision tower's [CLS] attention row (or, on towers
  without [CLS], the mean attention each patch receives) at the feature layer, and a
  :class:`~tokenprune.adapters.VisionRecord` of the call's image kwargs, matched to the features later
  by the identity of the output object.
* Text side, during the prefill, at decoder layer ``k - 1`` of a stage at layer ``k``: the text
  raters' head-averaged attention to the visual tokens (``text_attention``) or the keys' L1 norms
  (``key_norm``), from the post-RoPE queries and keys the attention wrapper hands over.
* On demand, when a stage runs: the prompt's text embeddings (input embeddings before the LLM,
  hidden states inside it) and the text-similarity relevance computed from them.
"""

from __future__ import annotations

import weakref

import torch

from ..adapters.base import VisionRecord
from ..criteria.relevance import cosine_to_text
from ..errors import StageError
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

    def clear(self) -> None:
        """Forget every vision record (on leaving the context)."""
        self._records.clear()
        self._cls_buffer = None

    # -- vision side ------------------------------------------------------------------------------
    def on_image_features(self, orig, args, kwargs):
        """Run the model's own ``get_image_features`` (or take it from the vision cache) and record
        what the prefill will need: the call's arguments and the captured vision signal."""
        bound = bind_arguments(orig, args, kwargs)
        kind = ("mean" if self.plan.mean_attention else "cls") if self.plan.need_cls else None

        def compute():
            self._cls_buffer = [] if self.plan.need_cls else None
            try:
                out = orig(*args, **kwargs)
                return out, (torch.cat(self._cls_buffer, 0) if self._cls_buffer else None)
            finally:
                self._cls_buffer = None

        if self.vision_cache is None:
            out, cls = compute()
        else:
            out, cls = self.vision_cache.fetch(self.adapter.model, bind_arguments(orig, args, kwargs, defaults=True),
                                                compute, kind)
        while len(self._records) >= self.MAX_RECORDS:
            self._records.pop(next(iter(self._records)))
        try:
            ref = weakref.ref(out)
        except TypeError:  # e.g. return_dict=False gives a tuple, which no forward takes anyway
            return out
        # the record holds no strong reference to the output (vision hidden states can be large)
        self._records[id(out)] = (ref, VisionRecord(kwargs=bound, output=None, cls_attention=cls,
                                                    pooler_output=getattr(out, "pooler_output", None)))
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

    def vision_callback(self):
        """The attention-wrapper callback for the vision tower: [CLS] row or mean attention."""
        return self.capture_mean if self.plan.mean_attention else self.capture_cls

    # -- text side: attention capture at layer k - 1 -----------------------------------------------
    def capture_text(self, state: PromptState, layer_idx: int, stage, module, query, key, attention_mask,
                     kwargs) -> None:
        """Store the LLM-attention signal of ``stage`` from decoder layer ``layer_idx`` in ``state.captures``.

        ``text_attention``: float32 ``[B, V]``, the raters' head-averaged attention to each visual
        token. ``key_norm``: float32 ``[B, L]``, the keys' L1 norms averaged over key/value heads.
        Calls whose length is not the current prefill's (another forward) are ignored.
        """
        if query.shape[2] != state.cur_len or key.shape[2] != state.cur_len:
            return
        with torch.no_grad():
            vis = state.visual
            out = {}
            if stage.relevance == "key_norm":
                out["key_norm"] = attn.key_l1_norm(key.detach())
            else:
                rows, row_valid = self.rater_rows(state, stage.raters)
                probs = attn.attention_rows(query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), rows,
                                            softcap=kwargs.get("softcap"),
                                            causal=bool(getattr(module, "is_causal", True)))  # [B, R, L]
                img = torch.gather(probs, 2, vis.pos[:, None, :].expand(-1, probs.shape[1], -1))  # [B, R, V]
                img = img * vis.valid[:, None, :]
                w = row_valid.float()
                if stage.raters == "dynamic":
                    mass = (img * vis.valid[:, None, :]).sum(-1)  # [B, R]: each rater's attention to the image
                    top = mass.masked_fill(~row_valid, float("-inf")).amax(1, keepdim=True)
                    w = (row_valid & (mass >= self.plan.dynamic_threshold * top)).float()
                rel = (img * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
                out["text_attention"] = rel  # [B, V]
            state.captures[layer_idx] = out

    def rater_rows(self, state: PromptState, raters: str):
        """Query positions of the text raters in the current sequence: long ``[B, R]``, valid bool ``[B, R]``."""
        B, L = state.cur_valid.shape
        dev = state.cur_valid.device
        if raters == "last_token":
            valid_pos = torch.arange(L, device=dev)[None].expand(B, -1).masked_fill(~state.cur_valid, -1)
            last = valid_pos.amax(1, keepdim=True)
            return last.clamp_min(0), last >= 0
        vis = state.visual
        is_vis = torch.zeros(B, L + 1, dtype=torch.bool, device=dev)
        is_vis.scatter_(1, vis.pos.masked_fill(~vis.valid, L), True)
        is_vis = is_vis[:, :L]
        first_vis = vis.pos.masked_fill(~vis.valid, L).amin(1, keepdim=True)
        ar = torch.arange(L, device=dev)[None]
        text = state.cur_valid & ~is_vis & (ar > first_vis)  # text tokens that can see some visual token
        idx = true_positions(text)
        if idx.shape[1] == 0:  # no text after the image: fall back to the last token
            return self.rater_rows(state, "last_token")
        return idx.clamp_min(0), idx >= 0

    # -- what a stage reads -----------------------------------------------------------------------
    def before_llm(self, index: int, stage, state: PromptState, ids, img, feats, kw):
        """Relevance and text embeddings for the stage before the LLM.

        Returns
        -------
        (relevance, text_emb, text_mask)
            float32 ``[B, V]`` or None; ``[B, T, D]`` in the features' dtype or None; bool ``[B, T]`` or None.
        """
        vis = state.visual
        relevance = text_emb = text_mask = None
        source = self.plan.relevance[index]
        if source in VISION_ATTENTION_SOURCES:
            relevance = vis.cls
        if self.plan.needs_text_embeddings(index, stage):
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

    def in_llm(self, index: int, stage, state: PromptState, layer_idx: int, hs, feats):
        """Relevance and text embeddings for the stage at decoder layer ``layer_idx`` (same returns).

        Raises
        ------
        StageError
            The stage's LLM-attention signal was not captured at layer ``layer_idx - 1``.
        """
        vis = state.visual
        relevance = text_emb = text_mask = None
        cap = state.captures.get(layer_idx - 1, {})
        if stage.relevance == "text_attention":
            relevance = cap.get("text_attention")
        elif stage.relevance == "key_norm":
            kn = cap.get("key_norm")
            relevance = None if kn is None else gather(kn, vis.pos, 1, 0.0)
        source = self.plan.relevance[index]
        if source in VISION_ATTENTION_SOURCES:
            relevance = vis.cls
        if stage.relevance in ("text_attention", "key_norm") and relevance is None:
            raise StageError(f"no attention was captured at layer {layer_idx - 1} for stage {index}")
        if self.plan.needs_text_embeddings(index, stage):
            is_vis = torch.zeros(state.batch_size, state.cur_len + 1, dtype=torch.bool, device=hs.device)
            is_vis.scatter_(1, vis.pos.masked_fill(~vis.valid, state.cur_len), True)
            text = state.cur_valid & ~is_vis[:, : state.cur_len]
            tidx = true_positions(text)
            text_emb = gather(hs, tidx, 1, 0.0)
            text_mask = tidx >= 0
            if source == "text_similarity":
                relevance = text_similarity(feats, vis.valid, text_emb, text_mask)
        return relevance, text_emb, text_mask
