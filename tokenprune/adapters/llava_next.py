"""LLaVA-NeXT and LLaVA-OneVision: anyres crops, unpadding and ``image_newline`` tokens."""

from __future__ import annotations

import sys

import torch

from .. import registry
from .base import ModelAdapter, TokenLayout, raster_coords, unknown_coords


@registry.adapters.register("llava_next")
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``; CLIP tower with [CLS], Llama/Mistral/Vicuna).

    Visual tokens of one image, in prompt order (``pack_image_features``): the base image's
    ``side x side`` grid (``crop`` 0), then the high-resolution crops arranged as one grid, unpadded
    to the image's aspect ratio, row by row, each row followed by one ``image_newline`` token.
    ``coords`` give the crop a token comes from (1, 2, ... in row-major order of the crop
    arrangement) and its ``(row, col)`` inside that crop's ``side x side`` grid; newline tokens have
    ``(-1, -1, -1)``.

    The mapping is computed by running the model's own ``pack_image_features`` on a tensor of
    coordinates (and [CLS] scores) instead of features, so it follows the model's unpadding exactly.
    It needs ``image_sizes``, which the pruning context sees through its ``get_image_features`` wrapper.
    Without them (features precomputed outside the context) newline tokens are still found (they equal
    ``image_newline``) but high-resolution coordinates are ``-1``.

    Newline tokens follow :func:`tokenprune.prune`'s ``newlines`` policy (default ``"keep"``: protected,
    not counted against the budget). [CLS] attention is per crop, mapped through the same packing.
    """

    model_types = ("llava_next",)
    layout_notes = ("base image grid, then the anyres crops as one unpadded grid with an "
                    "``image_newline`` token after each row")

    def _num_patches(self, record) -> list:
        """Crops per image (base image included), as the model's ``image_size_to_num_patches`` counts them."""
        mod = sys.modules[type(self.base).__module__]
        sizes = record.kwargs["image_sizes"]
        return [int(mod.image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                                  patch_size=self.vision_config.image_size)) if split else 1
                for s, split in zip(sizes, self._split_images(record))]

    def _split_images(self, record) -> list:
        """Per image, whether it was split into high-resolution crops (LLaVA-NeXT: every image)."""
        return [True] * len(record.kwargs["image_sizes"])

    def _pack(self, metas, record, newline):
        """The model's own ``pack_image_features`` run on ``metas`` (coordinates and scores per patch)."""
        return self.base.pack_image_features(metas, record.kwargs["image_sizes"],
                                             vision_feature_select_strategy=self.feature_select_strategy(record),
                                             image_newline=newline)[0]

    def token_layout(self, pooler_output, record) -> TokenLayout:
        sizes = self.image_sizes_per_item(pooler_output)
        side = self.patch_grid_side()
        if record is not None and record.kwargs.get("image_sizes") is not None:
            try:
                return self._packed_layout(sizes, side, record)
            except Exception:  # fall back to what the features themselves show
                pass
        flat = self.flatten_features(pooler_output)
        nl = self.base.image_newline.to(flat.dtype)
        newline = (flat == nl).all(-1).cpu()
        coords, grids, start = [], [], 0
        for i, n in enumerate(sizes):
            c = unknown_coords(n, i)
            nli = newline[start:start + n]
            if n >= side * side and not nli[: side * side].any():
                c[: side * side] = raster_coords(i, 0, side, side)
                c[side * side:, 1] = torch.where(nli[side * side:], -1, 1)
            c[nli, 1:] = -1
            coords.append(c)
            grids.append([(side, side)])
            start += n
        return TokenLayout(coords=torch.cat(coords), newline=newline, cls=None, grids=grids)

    def _packed_layout(self, sizes, side, record) -> TokenLayout:
        """The layout from the model's own packing of a coordinate (and score) tensor per crop."""
        n_patches = self._num_patches(record)
        P = side * side
        cls = None
        if record.cls_attention is not None:
            att = record.cls_attention.float()
            cls = att[:, 1:] if self.feature_select_strategy(record) == "default" else att
            if cls.shape[1] != P:
                cls = None
        r = torch.arange(side).repeat_interleave(side).float()
        c = torch.arange(side).repeat(side).float()
        metas, off = [], 0
        for n in n_patches:
            m = torch.zeros(n, P, 5)
            m[..., 0] = torch.arange(n).float()[:, None]
            m[..., 1] = r
            m[..., 2] = c
            if cls is not None:
                m[..., 3] = cls[off:off + n].cpu()
            metas.append(m)
            off += n
        newline = torch.tensor([-1.0, -1.0, -1.0, 0.0, 1.0])
        packed = self._pack(metas, record, newline)
        coords, nls, scores, grids = [], [], [], []
        for i, (p, n) in enumerate(zip(packed, sizes)):
            if p.shape[0] != n:
                raise ValueError("packed layout does not match the features")
            is_nl = p[:, 4] > 0.5
            ci = torch.round(p[:, :3]).long()
            ci[is_nl] = -1
            coords.append(torch.cat([torch.full((n, 1), i, dtype=torch.long), ci], 1))
            nls.append(is_nl)
            scores.append(p[:, 3])
            grids.append([(side, side)] * n_patches[i])
        return TokenLayout(coords=torch.cat(coords), newline=torch.cat(nls),
                           cls=None if cls is None else torch.cat(scores), grids=grids)


@registry.adapters.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; SigLIP tower, Qwen2).

    Same layout as :class:`LlavaNextAdapter`, with OneVision's packing: crops only for single-image
    samples (``batch_num_images``), and a bilinear down-scaling of the high-resolution grid when it
    exceeds ``anyres_max_9``; then a token's ``(crop, row, col)`` is that of the nearest source
    patch (the interpolated coordinates rounded). SigLIP has no [CLS] token, so
    ``relevance="cls_attention"`` raises :class:`~tokenprune.UnsupportedModelError` unless
    :func:`tokenprune.prune` gets a ``cls_fallback``; ``"mean_attention"`` scores go through the same
    packing.
    """

    model_types = ("llava_onevision",)
    supports_mean_attention = True
    vision_cls = False
    layout_notes = ("as LLaVA-NeXT, crops only for single-image samples, large grids scaled down "
                    "(``anyres_max_9``)")

    def _split_images(self, record) -> list:
        """Per image, whether it was split into crops: only the images of single-image samples
        (``batch_num_images``)."""
        bni = record.kwargs.get("batch_num_images")
        if bni is None:
            return super()._split_images(record)
        return [int(n) == 1 for n in bni for _ in range(int(n))]

    def _pack(self, metas, record, newline):
        """The model's own ``pack_image_features`` with OneVision's ``vision_aspect_ratio``."""
        ratio = record.kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        return self.base.pack_image_features(metas, record.kwargs["image_sizes"], image_newline=newline,
                                             vision_aspect_ratio=ratio)[0]
