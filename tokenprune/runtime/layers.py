"""In-LLM surgery: decoder-layer pre-hooks that drop visual tokens from the hidden states.

During the prefill, the pre-hook of a stage's layer ``k`` selects visual tokens (with the signal
captured at layer ``k - 1``) and gathers the hidden states; the pre-hooks of every layer from the
first stage on gather what the model computed once for the full sequence, so that later layers
compute, and write into the KV cache, only the kept tokens: the rotary ``(cos, sin)``, the
``position_ids`` and the 4-D attention mask (or recompute the rotary for compacted positions).
During decoding, the same pre-hooks map the masks that were sized for the unpruned cache onto the
pruned one and shift compacted positions.
"""

from __future__ import annotations

import torch

from ..errors import StageError, UnsupportedModelError
from .stage_select import StagePart
from .state import PromptState, as_list, gather, positions_from_mask


class LayerSurgery(StagePart):
    """The decoder-layer side of a pruning context (constructed as :class:`StagePart`)."""

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, layer_idx: int, state: PromptState, args, kwargs):
        """Pre-hook body during the prefill: the rewritten ``(args, kwargs)`` of decoder layer ``layer_idx``,
        or ``None`` when the layer's call stays as it is (no token dropped so far, positions not compacted).

        Raises
        ------
        StageError
            A sequence length other than the prefill's (chunked prefill), or a non-4-D mask.
        UnsupportedModelError
            A mask object that is not a tensor (flex attention's BlockMask).
        """
        hs = args[0] if args else kwargs["hidden_states"]
        if state.cur_valid.device != hs.device:  # layers spread over devices
            state.move_to(hs.device)
        if hs.shape[1] != state.cur_len:
            raise StageError(f"decoder layer {layer_idx} got {hs.shape[1]} tokens during the prefill, expected "
                             f"{state.cur_len}; chunked prefill is not supported with in-LLM pruning")
        entering = hs
        if layer_idx in self.plan.llm_stages:
            hs = self._apply_stage(layer_idx, state, hs, kwargs.get("position_ids"))
        state.done_layers.add(layer_idx)
        # while no stage has dropped a token the sequence is the LLM's own (keep-all): nothing to gather
        g = state.group if state.dropped_tokens else None
        state.layer_group[layer_idx] = (g, state.group_shift if state.group_pos is not None else None)
        if g is None and state.group_pos is None and hs is entering:
            return None
        kwargs = dict(kwargs)
        if state.group_pos is not None:
            kwargs["position_embeddings"] = self.adapter.rotary(layer_idx, hs, state.group_pos)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = state.group_pos
        elif g is not None:
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, (tuple, list)):
                kwargs["position_embeddings"] = tuple(gather(t, g, 1) for t in pe)
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == state.llm_len:
                kwargs["position_ids"] = gather(pid, g, 1) if pid.dim() == 2 else \
                    torch.stack([gather(p, g, 1) for p in pid])
        m = kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor):
            if m.dim() != 4:
                raise StageError(f"unexpected {m.dim()}-D attention mask at decoder layer {layer_idx}")
            if g is not None:
                kwargs["attention_mask"] = gather(gather(m, g, 2), g, 3)
        elif m is not None:
            raise UnsupportedModelError(f"attention mask of type {type(m).__name__} (e.g. flex attention's "
                                        "BlockMask) is not supported with in-LLM pruning; use sdpa or eager")
        if args:
            return (hs,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hs
        return args, kwargs

    def _apply_stage(self, layer_idx: int, state: PromptState, hs: torch.Tensor, position_ids) -> torch.Tensor:
        """Run the stage at ``layer_idx`` and return the hidden states of the kept tokens; ``position_ids``:
        the layer call's (the model's, for the sequence that entered the LLM) or ``None``."""
        index, stage = self.plan.llm_stages[layer_idx]
        vis = state.visual
        space = hs
        if stage.feature_norm == "final_norm":
            with torch.no_grad():
                space = self.adapter.final_norm(hs)
        feats = vis.rows(space)  # [B, V, D] (padding entries: any row, masked)
        relevance, text_emb, text_mask, text_rel = self.signals.in_llm(index, stage, state, layer_idx, space, feats)
        positions = None
        if "positions" in stage.selector.signals:  # positions in the unpadded (current) sequence
            positions = gather(positions_from_mask(state.cur_valid), vis.pos, 1, 0)
        keep_vis, repl = self.select(state, index, stage, feats, relevance, text_emb, text_mask, layer_idx,
                                     text_relevance=text_rel, positions=positions)
        B, L = state.batch_size, state.cur_len
        report = state.stages[-1]
        # as many visual tokens kept as there were (the kept ones are real ones): the sequence stays as it is
        if repl is None and report.tokens_after == report.tokens_before:
            self._positions_after(stage, state, None, position_ids)
            return hs
        drop = vis.valid & ~keep_vis
        # kept positions in the current sequence
        keep_tok = torch.ones(B, L + 1, dtype=torch.bool, device=hs.device)
        keep_tok.scatter_(1, vis.pos.masked_fill(~drop, L), False)
        keep_tok = keep_tok[:, :L]
        lens = keep_tok.sum(1)
        if bool((lens != lens[0]).any()):
            raise StageError(f"stage {index} at layer {layer_idx} would leave different sequence lengths per sample "
                             f"({as_list(lens)}): in-LLM stages need every sample to keep the same number of "
                             "visual tokens (same visual-token counts, or an earlier stage with an int budget)")
        Lp = int(lens[0])
        rel = keep_tok.nonzero()[:, 1].view(B, Lp)
        if repl is not None:
            r, has = repl
            rows = gather(r.to(hs.dtype), torch.arange(vis.pos.shape[1], device=hs.device)[None].expand(B, -1), 1)
            hs = hs.clone()
            bi, vi = has.nonzero(as_tuple=True)
            hs[bi, vis.pos[bi, vi]] = rows[bi, vi]
        newpos_of_old = torch.full((B, L), -1, dtype=torch.long, device=hs.device)
        newpos_of_old.scatter_(1, rel, torch.arange(Lp, device=hs.device)[None].expand(B, -1).contiguous())
        state.visual = vis.take(keep_vis, torch.gather(newpos_of_old, 1, vis.pos), report.tokens_after)
        if Lp != L:  # else every token was kept: the gathers below would be copies
            hs = gather(hs, rel, 1)
            state.group = rel if state.group is None else torch.gather(state.group, 1, rel)
            state.cur_valid = torch.gather(state.cur_valid, 1, rel)
            state.dropped_tokens = True
        state.cur_len = Lp
        self._positions_after(stage, state, rel, position_ids)
        return hs

    def _positions_after(self, stage, state: PromptState, rel, position_ids) -> None:
        """The positions the layers after a stage use: compacted (``positions="compact"``), or the
        compacted ones of an earlier stage for the kept tokens ``rel`` (long ``[B, cur_len]`` indices
        into the sequence before the stage; ``None``: it kept everything)."""
        if stage.positions == "compact" and not self.adapter.mrope:
            if state.llm_pos is None:
                state.llm_pos = self._entry_positions(state, position_ids)
            new_pos = positions_from_mask(state.cur_valid)
            llm_last = state.llm_pos.masked_fill(~state.llm_valid(), -1).amax(1)
            state.group_pos = new_pos
            state.group_shift = llm_last - new_pos.masked_fill(~state.cur_valid, -1).amax(1)
        elif state.group_pos is not None and rel is not None:
            state.group_pos = torch.gather(state.group_pos, 1, rel)
        if self.plan.compact_note and stage.positions == "compact":
            self.report.note(self.plan.compact_note)

    @staticmethod
    def _entry_positions(state: PromptState, position_ids) -> torch.Tensor:
        """long ``[B, llm_len]``: the 1-D positions of the sequence that entered the LLM (the layer call's
        ``position_ids``, else counted from the mask)."""
        pid = position_ids
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == state.llm_len:
            return pid.expand(state.batch_size, -1)
        if state.llm_mask is not None:
            return positions_from_mask(state.llm_mask.to(state.cur_valid.device))
        return torch.arange(state.llm_len, device=state.cur_valid.device)[None].expand(state.batch_size, -1)

    # -- decoding ---------------------------------------------------------------------------------
    def decode(self, layer_idx: int, state: PromptState, args, kwargs):
        """Pre-hook body during decoding: ``None`` (unchanged) or the rewritten ``(args, kwargs)``.

        Raises
        ------
        StageError
            A mask whose width matches neither cache, or compacted positions without 2-D ids.
        UnsupportedModelError
            A mask object that is not a tensor.
        """
        grp = state.layer_group.get(layer_idx)
        if grp is None:
            return None
        g, shift = grp
        if g is None and shift is None:  # a layer that saw the whole sequence: its cache is unpruned
            return None
        kwargs = dict(kwargs)
        ref = args[0] if args else kwargs["hidden_states"]
        g = None if g is None else g.to(ref.device)
        shift = None if shift is None else shift.to(ref.device)
        changed = False
        m = kwargs.get("attention_mask")
        if g is None:  # unpruned cache at this layer: only the positions change
            pass
        elif isinstance(m, torch.Tensor):
            self.adapter.check_in_llm_decode(layer_idx, m, state.decode_kv)
            if m.shape[-1] == state.decode_kv:
                # sized from an unpruned layer's cache: keep the kept prefix columns and the new ones
                pre = gather(m[..., : state.llm_len], g, 3)
                kwargs["attention_mask"] = torch.cat([pre, m[..., state.llm_len:]], dim=-1)
                changed = True
            elif m.shape[-1] != g.shape[1] + state.decode_kv - state.llm_len:
                raise StageError(f"decode mask at layer {layer_idx} has {m.shape[-1]} columns, matching neither the "
                                 f"unpruned ({state.decode_kv}) nor this layer's pruned cache "
                                 f"({g.shape[1] + state.decode_kv - state.llm_len}); this mask layout is not "
                                 "supported")
            # else: built from a cache pruned like this layer's (e.g. Gemma3's first full-attention layer);
            # its padding columns are the left-padding prefix, which pruning keeps in place
        elif m is not None:
            raise UnsupportedModelError(f"attention mask of type {type(m).__name__} is not supported with in-LLM "
                                        "pruning")
        else:
            self.adapter.check_in_llm_decode(layer_idx, None, state.decode_kv)
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
