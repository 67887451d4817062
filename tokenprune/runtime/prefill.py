"""The prefill, before the LLM: find the visual tokens, run the before-LLM stage, rewrite the call.

:class:`PrefillRewriter` runs in the top-level forward pre-hook when a call has no cache yet. It
locates the visual tokens (``input_ids == image_token_id``), takes the image features ``generate``
already computed (``mm_encoder_outputs``) or computes them with ``get_image_features``, and starts the
prompt's :class:`~tokenprune.runtime.state.PromptState`. With a stage before the LLM it selects
rows and rewrites the call: fewer placeholder tokens in ``input_ids``, ``attention_mask``, ``labels``
and the adapter's per-token tensors, gathered (or compacted) position ids, and the kept (or merged)
features in ``mm_encoder_outputs``, in the model's own pooler container. The model code then runs
unchanged on the shorter prompt.

A stage before the projector (``Stage(site="vision")``, VisionZip) selects on the vision tower's
feature-layer states instead (:mod:`~tokenprune.runtime.vision_stage`); the rewrite is the same, with
the projected kept tokens as the new features of the first placeholders of each image and consecutive
positions.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from ..adapters.base import TokenLayout
from ..errors import ShapeError, StageError
from .stage_select import StagePart
from .state import (PromptState, VisualTokens, as_list, gather, max_rows, positions_from_mask, take_rows,
                    true_positions)
from .vision_stage import VisionSiteSelection


class PrefillRewriter(StagePart):
    """Rewrites the prefill call of a pruned prompt (constructed as :class:`StagePart`)."""

    def __init__(self, plan, adapter, signals, select, report):
        super().__init__(plan, adapter, signals, select, report)
        self._last_ids = None  # input_ids of the last prefill, to recognise generate's cache-less steps
        self._vision = VisionSiteSelection(plan, adapter, signals, select, report)

    def __call__(self, kw: dict):
        """The rewritten keyword arguments and the prompt's state, or ``None`` to leave the call alone.

        Raises
        ------
        StageError
            ``inputs_embeds`` instead of ``input_ids``, image tokens without pixels or features, [CLS]
            relevance with precomputed features, a before-LLM stage the adapter refuses, or ``labels``
            (a training loss) with in-LLM stages.
        ShapeError
            ``input_ids`` not 2-D, or as many feature rows as image tokens missing.
        """
        if self.plan.llm_stages and kw.get("labels") is not None:
            raise StageError("labels (a training loss) are not supported with in-LLM pruning stages: the hidden "
                             "states are shortened inside the LLM, so the loss positions are not defined; call the "
                             "model without labels, or use a method whose stages all run before the LLM")
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
        counts = img.sum(1)
        n_visual = as_list(counts)
        if not any(n_visual):
            self.report.note("a prompt had no image tokens: nothing was pruned")
            return None
        self._check_cache(kw, ids)
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
        rec = self.signals.record_of(out)
        pooler = out.pooler_output
        flat = ad.flatten_features(pooler).to(dev)
        if flat.shape[0] != sum(n_visual):
            raise ShapeError(f"{sum(n_visual)} image tokens in input_ids but {flat.shape[0]} image feature rows")
        layout = self._layout(pooler, rec, counts)
        if self.plan.need_cls and layout.cls is None:
            raise StageError("relevance='cls_attention' needs the vision tower to run inside the prune() context "
                             "(pass pixel_values, not precomputed mm_encoder_outputs)")

        new = dict(kw)
        new.pop("pixel_values", None)  # the features travel in mm_encoder_outputs (the other image kwargs stay)
        new_mm = dict(mm) if isinstance(mm, dict) else {}
        new_mm["image"] = out
        new["mm_encoder_outputs"] = new_mm

        state = PromptState(batch_size=B, orig_len=L, llm_len=L, llm_mask=kw.get("attention_mask"),
                            cache_in=ad.kv_cache(kw))
        state.visual, flat_idx = self._initial_visual(img, layout, counts, n_visual)
        self.report.visual_tokens = n_visual
        state.grid = self._single_grid(layout, n_visual)
        state.counts_after_pre = list(n_visual)
        if self.plan.pre_stage is not None and self.plan.vision_site:
            new = self._apply_vision_stage(state, kw, new, ids, img, flat, flat_idx, out, rec, layout)
        elif self.plan.pre_stage is not None:
            new = self._apply_pre_stage(state, kw, new, ids, img, flat, flat_idx, out, rec)
        pos = new.get("position_ids")
        if state.next_pos is None:
            p = max_rows(pos if pos is not None else ad.full_position_ids(kw, rec))
            m = state.llm_mask
            state.next_pos = (p.masked_fill(m == 0, -1) if m is not None else p).amax(1) + 1
        state.cur_len = state.llm_len
        state.cur_valid = (state.llm_mask.bool() if state.llm_mask is not None
                           else torch.ones(B, state.llm_len, dtype=torch.bool, device=dev))
        if self.plan.llm_stages:
            ad.check_in_llm_prefill(state.llm_len)
        self.report.pruned_calls += 1
        if self.plan.fallback_note:
            self.report.note(self.plan.fallback_note)
        if self.plan.site_note:
            self.report.note(self.plan.site_note)
        return new, state

    def _check_cache(self, kw: dict, ids) -> None:
        """Refuse the cache set-ups pruning cannot follow, naming the option and what to use instead.

        * A static (pre-allocated) KV cache, ``cache_implementation="static"`` or a ``StaticCache``:
          its slots and ``cache_position`` follow the unpruned prompt, while pruning shortens the
          prompt (before the LLM) or what later layers cache (inside it).
        * ``generate(use_cache=False)`` with a method whose selection reads the text (in-LLM stages,
          text similarity): every step reruns the whole prompt, growing by one token, so each step
          would select again and keep other tokens. Methods that read only the image select the same
          tokens at every step and run.
        """
        cache = self.adapter.kv_cache(kw)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise StageError(f"a static KV cache ({type(cache).__name__}, e.g. generate(cache_implementation="
                             "'static')) is not supported with pruning: its slots follow the unpruned prompt's "
                             "length; use generate's default dynamic cache")
        last, self._last_ids = self._last_ids, ids
        if (kw.get("use_cache") is False and self.plan.reads_the_text and last is not None
                and last.shape[0] == ids.shape[0] and last.shape[1] < ids.shape[1]
                and torch.equal(ids[:, : last.shape[1]], last.to(ids.device))):
            raise StageError("generate(use_cache=False) reruns the whole prompt at every step, and this method's "
                             "selection reads the text (an in-LLM stage or text similarity), so each step would "
                             "keep other tokens; generate with the KV cache (use_cache=True, the default)")

    def _layout(self, pooler, rec, counts) -> TokenLayout:
        """The adapter's token layout, for prompts that ``generate`` repeated for beams.

        With ``num_beams=r`` (or ``num_return_sequences``), ``generate`` repeats each prompt ``r``
        times (consecutive rows) and each prompt's image features with it, after
        ``get_image_features`` ran on the original batch; the record describes that batch. The
        layout is then computed on the original features and repeated the same way, so each prompt's
        beams see the same tokens and share their kept set.

        Raises
        ------
        ShapeError
            The features were repeated in a way that does not match the rows of ``input_ids``.
        """
        ad = self.adapter
        original = None if rec is None else rec.pooler_output
        if original is None or original is pooler:
            return ad.token_layout(pooler, rec)
        n_orig = int(ad.flatten_features(original).shape[0])
        total = int(counts.sum())
        if n_orig == total:
            return ad.token_layout(pooler, rec)
        B = counts.numel()
        r = total // n_orig if n_orig else 0
        blocks = counts.view(-1, r) if r and total % n_orig == 0 and B % r == 0 else None
        if blocks is None or bool((blocks != blocks[:, :1]).any()):
            raise ShapeError(f"the image features were repeated to {total} rows from {n_orig}, which does not match "
                             f"the {B} prompts' image tokens ({as_list(counts)}); expected each prompt repeated "
                             "in consecutive rows, as generate does for beams")
        base = ad.token_layout(original, rec)
        per_prompt = blocks[:, 0].tolist()
        starts = [0] + list(itertools.accumulate(per_prompt))[:-1]
        idx = torch.cat([torch.arange(s, s + c).repeat(r) for s, c in zip(starts, per_prompt)])
        return TokenLayout(coords=base.coords[idx], newline=base.newline[idx],
                           cls=None if base.cls is None else base.cls[idx], grids=base.grids)

    def _initial_visual(self, img, layout, counts, n_visual: list) -> tuple[VisualTokens, torch.Tensor]:
        """The visual tokens of the prompt as given, with coordinates, newline policy and [CLS] scores;
        and each one's row in the flattened image features (long ``[B, V]``, ``-1`` at padding).
        ``n_visual`` are the visual tokens per sample (``counts`` as a list)."""
        B = img.shape[0]
        dev = img.device
        pos = true_positions(img)
        V = pos.shape[1]
        ar = torch.arange(V, device=dev)
        # each visual token's row in the layout (every sample's tokens are consecutive rows)
        flat_idx = (counts.cumsum(0) - counts)[:, None] + ar
        padded = any(n != V for n in n_visual)  # else no padding entries: nothing to mask
        if padded:
            invalid = pos < 0
            flat_idx.masked_fill_(invalid, -1)
            rows = flat_idx.clamp_min(0).cpu()
            coords = layout.coords[rows].to(dev).masked_fill_(invalid[..., None], -1)  # [B, V, 4]
            valid, orig = ~invalid, ar.expand(B, -1).masked_fill(invalid, -1)
            pos = pos.clamp_min(0)
        else:
            rows = flat_idx.cpu()
            coords = layout.coords[rows].to(dev)
            valid, orig = torch.ones(B, V, dtype=torch.bool, device=dev), ar.expand(B, -1)
        # image index relative to the sample (padding and newline tokens have -1)
        img_col = coords[..., 0]
        known = img_col >= 0
        first = img_col.masked_fill(~known, 1 << 30).amin(1, keepdim=True)
        img_col.sub_(torch.where(known, first, 0))
        marked = bool(layout.newline.any())
        if marked:
            newline = layout.newline[rows].to(dev) & valid
            protected = newline if self.plan.newlines == "keep" else torch.zeros_like(newline)
            dropped = newline if self.plan.newlines == "drop" else torch.zeros_like(newline)
        else:
            protected = torch.zeros(B, V, dtype=torch.bool, device=dev)
            dropped = torch.zeros_like(protected)
        cls = None if layout.cls is None else layout.cls[rows].to(dev).masked_fill_(~valid, 0.0)
        return VisualTokens(pos=pos, valid=valid, orig=orig, protected=protected, dropped=dropped,
                            coords=coords, cls=cls, marked=marked, known_counts=list(n_visual)), flat_idx

    @staticmethod
    def _single_grid(layout, counts: list):
        """``(rows, cols)`` when every sample's visual tokens are one whole image grid, the same for all
        (one image of one crop per sample, no other tokens), else ``None`` (selectors then read the
        ``coords`` signal)."""
        grids = layout.grids
        if not grids or len(grids) != len(counts) or any(len(g) != 1 or g[0] != grids[0][0] for g in grids):
            return None
        rows, cols = grids[0][0]
        return (rows, cols) if all(n == rows * cols for n in counts) else None

    def _apply_pre_stage(self, state: PromptState, kw, new, ids, img, flat, flat_idx, out, rec):
        """Select before the LLM and shorten the call: ids, masks, per-token tensors, positions, features."""
        index, stage = self.plan.pre_stage
        feats = take_rows(flat.unsqueeze(0), flat_idx)  # [B, V, D]; 0 at padding
        # per-crop scores over the vision tower's tokens -> the visual tokens, as the [CLS] attention (text_encoder)
        to_tokens = lambda s: self._layout(out.pooler_output, replace(rec, cls_attention=s), img.sum(1)).cls  # noqa: E731
        relevance, text_emb, text_mask = self.signals.before_llm(index, stage, state, ids, img, feats, kw,
                                                                 vision=(out, rec, to_tokens))
        keep_vis, repl = self.select(state, index, stage, feats, relevance, text_emb, text_mask, None)
        return self._rewrite(state, kw, new, ids, img, feats, out, rec, keep_vis, repl, stage.positions)

    def _apply_vision_stage(self, state: PromptState, kw, new, ids, img, flat, flat_idx, out, rec, layout):
        """A stage before the projector (``site="vision"``): select, merge and project per crop, then
        keep as many image placeholders per image as tokens it gave, at consecutive positions."""
        feats = gather(flat.unsqueeze(0), flat_idx, 1, 0.0)  # [B, V, D]
        keep_vis, repl, coords, orig = self._vision(state, layout, flat_idx, rec)
        if repl is not None:
            repl = (repl[0].to(feats.device), repl[1].to(feats.device))
        new = self._rewrite(state, kw, new, ids, img, feats, out, rec, keep_vis, repl, "compact")
        # the tokens now at the kept placeholders: their own coordinates, no [CLS] scores downstream
        idx = true_positions(keep_vis)
        state.visual.coords = gather(coords, idx, 1, -1)
        state.visual.orig = gather(orig, idx, 1, -1)
        state.visual.cls = None
        return new

    def _rewrite(self, state: PromptState, kw, new, ids, img, feats, out, rec, keep_vis, repl, positions):
        """Shorten the call to the kept visual tokens ``keep_vis`` (bool ``[B, V]``; ``repl`` their new
        features): ids, masks, per-token tensors, positions (``"preserve"`` or ``"compact"``), features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        ad = self.adapter
        vis = state.visual
        B, L = ids.shape
        dev = ids.device

        counts = as_list(keep_vis.sum(1))
        ad.check_pre_llm(counts)
        if repl is None and counts == vis.counts():  # (kept visual tokens are real ones)
            state.pre_changed = False  # every visual token kept: the call and the visual tokens stay as they are
            return new
        kept_img = torch.zeros(B, L + 1, dtype=torch.bool, device=dev)
        kept_img.scatter_(1, vis.pos.masked_fill(~keep_vis, L), True)  # dropped and padding: extra column
        keep_tok = ~img | kept_img[:, :L]
        new_lens = keep_tok.sum(1)
        am = kw.get("attention_mask")
        right = am is not None and bool((am[:, -1] == 0).any()) and not bool((am[:, 0] == 0).any())
        idx = true_positions(keep_tok)  # [B, Lp] kept positions, right-padded with -1
        Lp = idx.shape[1]
        if not right:  # the batch was padded on the left: so is the new one
            src = torch.arange(Lp, device=dev)[None] - (Lp - new_lens)[:, None]
            idx = torch.where(src >= 0, idx.gather(1, src.clamp_min(0)), -1)
        state.pre_changed = True  # a visual token dropped (a shorter or holed row) or features replaced
        kept_flat = self._kept_features(feats, keep_vis, repl)
        # the visual tokens in the new sequence: old position -> new position
        newpos_of_old = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        newpos_of_old.scatter_(1, idx.masked_fill(idx < 0, L), torch.arange(Lp, device=dev)[None].expand(B, -1))
        newpos_of_old = newpos_of_old[:, :L]
        state.visual = vis.take(keep_vis, torch.gather(newpos_of_old, 1, vis.pos), counts)
        state.counts_after_pre = counts

        new["input_ids"] = gather(ids, idx, 1, ad.pad_token_id)
        if am is not None or bool((idx < 0).any()):
            base_mask = am if am is not None else torch.ones_like(ids)
            new_mask = gather(base_mask, idx, 1, 0)
        else:
            new_mask = None
        for key in ("labels",) + tuple(ad.token_keys):
            t = kw.get(key)
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == L:
                new[key] = gather(t, idx, 1, -100 if key == "labels" else 0)
        # positions
        valid_new = (new_mask.bool() if new_mask is not None else torch.ones(B, Lp, dtype=torch.bool, device=dev))
        full = ad.full_position_ids(kw, rec)
        full_max = max_rows(full)
        orig_next = full_max.masked_fill(am == 0, -1).amax(1) + 1 if am is not None else full_max.amax(1) + 1
        if ad.mrope or positions == "preserve":
            pos = torch.stack([gather(p, idx, 1, 0) for p in full]) if full.dim() == 3 else gather(full, idx, 1, 0)
            gaps = True
        else:
            pos = positions_from_mask(valid_new)
            gaps = False
        new["position_ids"] = pos
        pmax = max_rows(pos)
        state.next_pos = pmax.masked_fill(~valid_new, -1).amax(1) + 1
        state.shift = orig_next - state.next_pos
        if new_mask is None and gaps and ad.kv_cache(kw) is None:
            new_mask = torch.ones(B, Lp, dtype=torch.long, device=dev)  # see HF_HOOKS: packed-sequence detection
        if new_mask is not None or am is not None:
            new["attention_mask"] = new_mask
        state.llm_len = Lp
        state.llm_mask = new_mask
        mm = dict(new["mm_encoder_outputs"])
        mm["image"] = BaseModelOutputWithPooling(pooler_output=ad.make_pooler(kept_flat, out.pooler_output))
        new["mm_encoder_outputs"] = mm
        if self.plan.compact_note and positions == "compact":
            self.report.note(self.plan.compact_note)
        return new

    @staticmethod
    def _kept_features(feats, keep_vis, repl) -> torch.Tensor:
        """``[K_total, D]``: the kept (or merged) features of every sample, in prompt order."""
        if repl is not None:
            r, has = repl
            feats = torch.where(has[..., None], r.to(feats.dtype), feats)
        return feats[keep_vis]  # row-major: sample by sample, in prompt order
