"""LLaVA-1.5 (``model_type="llava"``): CLIP tower with [CLS], one square patch grid per image, Llama."""

from __future__ import annotations

from .. import registry
from .base import ModelAdapter


@registry.adapters.register("llava")
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``).

    Visual tokens: one ``side x side`` grid per image (``side = image_size // patch_size``, 24 for
    336 px / 14 px), raster order; ``coords`` are ``(image, 0, row, col)``. With
    ``vision_feature_select_strategy="full"`` the [CLS] token is a visual token too (coords
    ``(image, -1, -1, -1)``). [CLS] attention is available for CLIP towers. Position ids are 1-D.
    The projector acts token by token, so stages can act on the tower's states before it
    (``site="vision"``, VisionZip): an image's tokens are then the stage's own sequence.
    """

    model_types = ("llava",)
    layout_notes = "one square patch grid per image, raster order"
    supports_vision_site = True
