"""Gemma3: SigLIP tower pooled to a fixed grid, hybrid sliding-window / full attention text model."""

from __future__ import annotations

import torch

from ..errors import StageError
from .. import registry
from .base import ModelAdapter, TokenLayout, crop_coords, square_side


@registry.adapters.register("gemma3")
class Gemma3Adapter(ModelAdapter):
    """Gemma3 (``Gemma3ForConditionalGeneration``).

    Visual tokens: ``mm_tokens_per_image`` (256 in the released models) per image, a square grid of
    average-pooled SigLIP patches, raster order; ``coords`` are ``(image, 0, row, col)``. The image
    features travel as one tensor, and ``token_type_ids`` (which make the image block attend
    bidirectionally) are gathered with the prompt. With ``cls_fallback="mean_attention"`` the patch
    scores are average-pooled to the token grid as the projector pools the patches.

    Before the LLM: fully supported; sliding windows then count kept tokens (the pruned prompt is
    what the model sees). Inside the LLM: supported only while the whole sequence (prompt entering
    the LLM plus generated tokens) fits in ``sliding_window``; the sliding layers' caches keep only
    the last ``sliding_window - 1`` entries, and a window over a pruned cache would not match a window
    over the original positions anyway. Beyond that a :class:`~tokenprune.StageError` is raised (at the
    prefill, or at the decoding step that crosses the window). SigLIP has no [CLS] token.
    """

    model_types = ("gemma3",)
    supports_mean_attention = True
    vision_cls = False
    layout_notes = ("one square grid of pooled patches per image; in-LLM stages only while the sequence "
                    "fits the sliding window")
    vision_site_reason = "its projector average-pools groups of patches into one token"

    def token_layout(self, pooler_output, record) -> TokenLayout:
        sizes = self.image_sizes_per_item(pooler_output)
        sides = [square_side(n) for n in sizes]
        crops = [None if s is None else [(s, s)] for s in sides]
        coords, grids = crop_coords(sizes, crops)
        return self.single_grid_layout(coords, grids, record, sizes)

    def cls_to_tokens(self, record, sizes) -> torch.Tensor:
        """The ``"mean_attention"`` fallback per patch, average-pooled like the projector pools the patches."""
        att = record.cls_attention.float()  # [n_images, patches]
        side = square_side(att.shape[1])
        out_side = square_side(sizes[0]) if sizes else None
        if side is None or out_side is None or side % out_side:
            return torch.zeros(sum(sizes))
        k = side // out_side
        pooled = torch.nn.functional.avg_pool2d(att.view(-1, 1, side, side), kernel_size=k, stride=k)
        return pooled.flatten(1).reshape(-1)[: sum(sizes)].cpu()

    def _window(self):
        """The text model's sliding window, or ``None`` when no layer slides."""
        types = getattr(self.text_config, "layer_types", None) or []
        if "sliding_attention" not in types:
            return None
        return int(self.text_config.sliding_window)

    def check_in_llm_prefill(self, seq_len: int) -> None:
        w = self._window()
        if w is not None and seq_len >= w:
            raise StageError(f"gemma3: in-LLM pruning needs the prompt to fit in the sliding window, but {seq_len} "
                             f"tokens enter the LLM and sliding_window is {w}; use a stage before the LLM "
                             "(layer=None) for long prompts")

    def check_in_llm_decode(self, layer_idx: int, mask, expected_kv: int) -> None:
        w = self._window()
        if w is not None and expected_kv >= w:
            raise StageError(f"gemma3: in-LLM pruning stopped at {expected_kv} tokens, the sliding window "
                             f"({w}) is full; generate fewer tokens or prune before the LLM (layer=None)")
