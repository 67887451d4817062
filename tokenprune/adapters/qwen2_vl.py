"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution grids and 3-D M-RoPE positions."""

from __future__ import annotations

import torch

from ..errors import StageError
from .. import registry
from .base import ModelAdapter, TokenLayout, crop_coords


@registry.adapters.register("qwen2_vl")
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``).

    Visual tokens of one image: its ``t x (h / m) x (w / m)`` merged patch grid in raster order
    (``m = spatial_merge_size``), from ``image_grid_thw``; ``coords`` are ``(image, t, row, col)``.

    Positions are 3-D M-RoPE ids: :meth:`full_position_ids` computes them on the *unpruned* prompt with
    ``get_rope_index`` (or takes ``generate``'s 4-row ids), and the pruned prompt gets the gathered ids
    of the kept tokens, so every kept token keeps its ``(t, h, w)`` position and the text keeps its
    own. ``positions="compact"`` is applied as ``"preserve"`` (with a warning and a report note).
    Inside the LLM the gathered ``(cos, sin)`` carry the same 3-D positions. The vision tower (windowed
    attention over packed patches) has no [CLS] token and no ``"mean_attention"`` fallback; use
    ``cls_fallback="text_similarity"``. Video tokens are not pruned.
    """

    model_types = ("qwen2_vl",)
    mrope = True
    vision_cls = False
    layout_notes = "per image, ``t`` frames of a merged patch grid from ``image_grid_thw``, raster order"
    vision_site_reason = "its patch merger projects each 2 x 2 group of patches into one token"

    def full_position_ids(self, kwargs, record) -> torch.Tensor:
        pid = kwargs.get("position_ids")
        if pid is not None:
            return pid
        grid = kwargs.get("image_grid_thw")
        if grid is None and record is not None:
            grid = record.kwargs.get("image_grid_thw")
        tt = kwargs.get("mm_token_type_ids")
        if grid is None or tt is None:
            raise StageError(f"{self.config.model_type}: pruning needs image_grid_thw and mm_token_type_ids (as the "
                             "processor returns them) to compute the M-RoPE positions of the unpruned prompt")
        pos, _ = self.base.get_rope_index(kwargs["input_ids"], mm_token_type_ids=tt, image_grid_thw=grid,
                                          video_grid_thw=kwargs.get("video_grid_thw"),
                                          attention_mask=kwargs.get("attention_mask"))
        return pos

    def token_layout(self, pooler_output, record) -> TokenLayout:
        sizes = self.image_sizes_per_item(pooler_output)
        grid = None if record is None else record.kwargs.get("image_grid_thw")
        m = int(self.vision_config.spatial_merge_size)
        crops = []
        for i in range(len(sizes)):
            if grid is not None and i < len(grid):
                t, h, w = (int(x) for x in grid[i])
                crops.append([(h // m, w // m)] * t)  # one crop per frame
            else:
                crops.append(None)
        coords, grids = crop_coords(sizes, crops)
        # no [CLS] scores: the tower has no [CLS] token and no "mean_attention" fallback
        return self.single_grid_layout(coords, grids, None, sizes)


@registry.adapters.register("qwen2_5_vl")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``); as :class:`Qwen2VLAdapter`.

    ``default_schedule["tops"]`` selects TOPS's Qwen2.5-VL schedule (layers 12 and 16 of 28), used when
    :func:`tokenprune.prune` gets ``"tops"`` by name.
    """

    model_types = ("qwen2_5_vl",)
    default_schedule = {"tops": {"schedule": "qwen2_5_vl"}}
