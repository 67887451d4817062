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

    Stages before the projector (``site="vision"``, VisionZip) select in each crop (the vision tower
    runs on the crops of all images as one batch); :meth:`arrange_vision_tokens` lays an image's kept
    tokens out as the official VisionZip code does for ``spatial_unpad``: no unpadding and no
    ``image_newline`` tokens.
    """

    model_types = ("llava_next",)
    layout_notes = ("base image grid, then the anyres crops as one unpadded grid with an "
                    "``image_newline`` token after each row")
    supports_vision_site = True

    def vision_crops(self, record) -> list:
        """Crops per image (base image included), consecutive rows of the vision tower's batch."""
        return self._num_patches(record)

    def arrange_vision_tokens(self, image, crops, record):
        """An image's tokens after a ``site="vision"`` stage, in the official VisionZip layout.

        As ``restore_image_features_sorted`` and ``prepare_inputs_labels_for_multimodal_visionzip`` in
        dvlab-research/VisionZip (commit ``3151f6df4fca36a4cd1c985e5956e725b1f9ad02``,
        ``visionzip/llava_arch.py``): the base image's tokens in the stage's order ([CLS], dominant,
        contextual); then the high-resolution crops' kept patches that were not merged, in the raster
        order of the whole crop arrangement (rows run across crops); then those crops' [CLS] tokens in
        crop order; then their merged (contextual) tokens, crop by crop. An image that was not split
        keeps the default layout.
        """
        n_crops = self._num_patches(record)[image] if record.kwargs.get("image_sizes") is not None else 1
        if n_crops <= 1 or not any(c.crop > 0 for c in crops):
            return super().arrange_vision_tokens(image, crops, record)
        mod = sys.modules[type(self.base).__module__]
        _, cols = mod.get_anyres_image_grid_shape(record.kwargs["image_sizes"][image], self.config.image_grid_pinpoints,
                                                  self.vision_config.image_size)
        side = self.patch_grid_side()
        high = [c for c in crops if c.crop > 0]
        parts = [(c.features, c.coords) for c in crops if c.crop == 0]
        feats, coords, keys = [], [], []
        for c in high:
            patch = ~c.merged.cpu() & ~c.cls.cpu() & (c.coords[:, 2] >= 0)
            crow, ccol = divmod(c.crop - 1, int(cols))
            r = crow * side + c.coords[patch, 2]
            q = ccol * side + c.coords[patch, 3]
            keys.append(r * (int(cols) * side) + q)
            feats.append(c.features[patch.to(c.features.device)])
            coords.append(c.coords[patch])
        order = torch.argsort(torch.cat(keys), stable=True)
        parts.append((torch.cat(feats)[order.to(feats[0].device)], torch.cat(coords)[order]))
        for flag in ("cls", "merged"):  # the [CLS] tokens, then the contextual tokens, crop by crop
            for c in high:
                which = getattr(c, flag).cpu()
                parts.append((c.features[which.to(c.features.device)], c.coords[which]))
        return torch.cat([f for f, _ in parts]), torch.cat([k for _, k in parts])

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
    supports_vision_site = False
    vision_site_reason = ("its SigLIP tower has no [CLS] token and its anyres packing (unpadding, down-scaling, "
                          "newlines) has no official VisionZip layout")
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
