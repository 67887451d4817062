"""Decoding after a pruned prefill: map ``generate``'s full-length inputs onto the pruned cache.

``generate`` keeps building its 2-D attention mask and positions for the prompt as the user gave it.
After a before-LLM stage the cache holds fewer prompt tokens, so :class:`DecodeMapper`, called from
the top-level pre-hook at every decoding step, replaces the prompt part of the mask with the mask the
LLM saw, and continues the positions from where the pruned prompt ended (or shifts given positions
by what ``positions="compact"`` removed).
"""

from __future__ import annotations

import torch

from ..errors import StageError
from .state import PromptState


class DecodeMapper:
    """Rewrites the top-level call of each decoding step of a pruned prompt.

    Parameters
    ----------
    adapter : ModelAdapter
        Supplies the image token id and whether positions are M-RoPE.
    """

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, state: PromptState, kw: dict, past: int) -> dict:
        """The decoding step's keyword arguments, mapped onto the pruned cache.

        Parameters
        ----------
        state : PromptState
            The prompt whose cache is continued.
        kw : dict
            The step's keyword arguments as ``generate`` passes them.
        past : int
            Tokens already in the (unpruned layers') cache.

        Raises
        ------
        StageError
            New image tokens after a pruned prompt, or a mask that is not 2-D.
        """
        new = dict(kw)
        ids = kw.get("input_ids")
        q = ids.shape[1] if ids is not None else kw["inputs_embeds"].shape[1]
        if ids is not None and q > 1 and bool((ids == self.adapter.image_token_id).any()):
            raise StageError("new image tokens after a pruned prompt (chunked prefill or a multi-turn cache) are not "
                             "supported; start a new cache")
        after = past - state.llm_len  # tokens already decoded
        state.decode_kv = past + q
        am = kw.get("attention_mask")
        if state.pre_changed:
            if am is not None:
                if am.dim() != 2:
                    raise StageError("decoding after a pruned prompt needs a 2-D attention_mask")
                tail = am[:, am.shape[1] - (after + q):]
                new["attention_mask"] = torch.cat([state.llm_mask_like(am), tail], dim=1)
            elif state.llm_mask is not None and bool((state.llm_mask == 0).any()):
                tail = torch.ones(state.batch_size, after + q, dtype=state.llm_mask.dtype,
                                  device=state.llm_mask.device)
                new["attention_mask"] = torch.cat([state.llm_mask, tail], dim=1)
        pid = kw.get("position_ids")
        if pid is None:
            pos = state.next_pos[:, None] + after + torch.arange(q, device=state.next_pos.device)[None]
            if self.adapter.mrope:
                pos = pos[None].expand(3, -1, -1)
            new["position_ids"] = pos
        elif state.shift is not None and not self.adapter.mrope and bool((state.shift != 0).any()):
            new["position_ids"] = pid - state.shift.view(-1, *([1] * (pid.dim() - 1)))
        return new
