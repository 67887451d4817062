"""Idefics3 and SmolVLM: image splitting into tiles plus a global image; ``text_model``."""

from __future__ import annotations

import torch

from ..errors import StageError
from .. import registry
from .base import ModelAdapter, TokenLayout, crop_coords, square_side


@registry.adapters.register("idefics3")
class Idefics3Adapter(ModelAdapter):
    """Idefics3 (``Idefics3ForConditionalGeneration``; SigLIP-style tower, pixel shuffle, Llama).

    The decoder stack is ``model.model.text_model``. Features come as one tensor per *sample* holding
    every tile of its images (transformers 5.23; earlier versions give one ``[tiles, tokens, D]``
    tensor over the batch, regrouped by sample, see :meth:`image_sizes_per_item`) (row-major tiles,
    then the downscaled global image), each tile a
    ``side x side`` grid after the pixel shuffle (7 x 7 for 224 px tiles, 16 px patches, scale 2).
    ``coords`` are ``(0, tile, row, col)`` with ``tile`` counted over the sample (the image index is
    not recoverable from the features alone). The tile and row/col marker tokens of the prompt
    (``<row_1_col_1>``, ``<global-img>``, ``<fake_token_around_image>``) are text and always kept. No
    [CLS] token; with ``cls_fallback="mean_attention"`` the patch scores are grouped by the connector's
    pixel shuffle and averaged.
    """

    model_types = ("idefics3",)
    text_model_attr = "text_model"
    supports_mean_attention = True
    vision_cls = False
    layout_notes = ("per sample, row-major tiles then the global image, a square grid each after the "
                    "pixel shuffle; decoder at ``text_model``")
    vision_site_reason = "its connector's pixel shuffle projects groups of patches into one token"

    def tokens_per_tile(self) -> int:
        """Visual tokens per tile: the tower's patch grid divided by the pixel shuffle's ``scale_factor²``."""
        scale = int(getattr(self.config, "scale_factor", 1))
        return self.patch_grid_side() ** 2 // (scale * scale)

    def image_sizes_per_item(self, pooler_output, record=None) -> list:
        """Tokens per *sample*. transformers 5.23 returns one tensor per sample; earlier versions one
        ``[tiles, tokens, D]`` tensor over the batch, regrouped here by the sample's real (not all-zero)
        images in ``pixel_values``, the rule the model itself uses to drop padding images."""
        sizes = super().image_sizes_per_item(pooler_output)
        pv = None if record is None else record.kwargs.get("pixel_values")
        if not isinstance(pooler_output, torch.Tensor) or pooler_output.dim() != 3 or pv is None or pv.dim() != 5:
            return sizes
        tiles = (pv != 0).flatten(2).any(-1).sum(1).tolist()
        if sum(tiles) != len(sizes):
            return [sum(sizes)]
        return [n * pooler_output.shape[1] for n in tiles]

    def token_layout(self, pooler_output, record) -> TokenLayout:
        sizes = self.image_sizes_per_item(pooler_output, record)
        per = self.tokens_per_tile()
        side = square_side(per)
        crops = [[(side, side)] * (n // per) if side is not None and n % per == 0 else None for n in sizes]
        coords, grids = crop_coords(sizes, crops, image=0)  # the image index is not known per tile
        return self.single_grid_layout(coords, grids, record, sizes)

    def cls_to_tokens(self, record, sizes) -> torch.Tensor:
        """The ``"mean_attention"`` fallback per patch, grouped by the connector's own pixel shuffle and averaged."""
        att = record.cls_attention.float()  # [n_tiles, patches]
        scale = int(getattr(self.config, "scale_factor", 1))
        shuffled = self.base.connector.pixel_shuffle(att[..., None], scale)  # [n_tiles, tokens, scale²]
        return shuffled.mean(-1).reshape(-1)[: sum(sizes)].cpu()


@registry.adapters.register("smolvlm")
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM (``SmolVLMForConditionalGeneration``); as :class:`Idefics3Adapter`.

    transformers 5.20.1 and 5.20.2 merge image features in blocks of the vision tower's
    ``patch_size`` (16) tokens, so each sample's image tokens must be a multiple of it (the released
    models' 64 tokens per tile are); there a before-LLM stage that keeps another count raises
    :class:`~tokenprune.StageError`. 5.20.0 and 5.21 or later take any count.
    """

    model_types = ("smolvlm",)

    def merger_block(self) -> int | None:
        """The block size the installed transformers' SmolVLM merger needs, or ``None`` if any count works."""
        from packaging.version import Version

        v = Version(_transformers_version())
        return int(self.vision_config.patch_size) if Version("5.20.1") <= v < Version("5.21") else None

    def check_pre_llm(self, kept: list) -> None:
        """Raise :class:`~tokenprune.StageError` where the installed merger cannot take the kept counts."""
        block = self.merger_block()
        if block is None:
            return
        bad = [n for n in kept if n % block]
        if bad:
            raise StageError(f"transformers {_transformers_version()} merges SmolVLM image features in blocks of "
                             f"{block} tokens per sample, and a before-LLM stage kept {bad[0]}; use a budget that "
                             f"is a multiple of {block}, or transformers 5.20.0 or >= 5.21")


def _transformers_version() -> str:
    """The installed transformers version (imported here, not when the module is)."""
    import transformers

    return transformers.__version__
