"""The model adapter contract: only what differs between VLM families.

The pruning mechanism itself (:mod:`tokenprune.runtime`) is generic: it finds the visual
tokens from ``input_ids``, calls ``get_image_features`` (or takes what ``generate`` precomputed),
feeds the selected rows back through ``mm_encoder_outputs`` and gathers hidden states, rotary
embeddings and masks in decoder-layer pre-hooks. An adapter tells it, for one family, where the
text model is, in which container the image features travel, how position ids are built, which
extra per-token tensors ride along, how the visual tokens map to patches, and where the vision
tower's [CLS] attention is.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._signature import signature
from ..errors import UnsupportedModelError


@dataclass
class VisionRecord:
    """One call of ``get_image_features`` seen inside a pruning context.

    Attributes
    ----------
    kwargs : dict
        The call's arguments by name (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...);
        ``generate`` drops them from its own kwargs before the first forward, so this is where the
        adapter finds them.
    output : Any
        What ``get_image_features`` returned, when the holder keeps it (the pruning context does not:
        it matches records to outputs by identity through a weak reference).
    cls_attention : torch.Tensor or None
        float32 ``[n_crops, n_vision_tokens]``: head-averaged attention of the vision tower's [CLS]
        query to every token, at the layer that produces the selected features.
    pooler_output : Any
        The call's ``pooler_output`` container as it was returned. ``generate`` with ``num_beams``
        or ``num_return_sequences`` later replaces the output's container with one that repeats each
        prompt's features; the record keeps the original, which matches ``kwargs``.
    keys : torch.Tensor or None
        float32 ``[n_crops, n_vision_tokens, head_dim]``: the attention keys of the same layer as
        ``cls_attention``, averaged over heads (captured for stages at ``site="vision"``).
    vision_states : torch.Tensor or None
        ``[n_crops, n_vision_tokens, D_vision]`` (model dtype): the tower's hidden states at
        ``vision_feature_layer`` ([CLS] included, before the feature selection and the projector;
        several layers concatenated along the last dimension), for stages at ``site="vision"``.
    """

    kwargs: dict
    output: Any = None
    cls_attention: torch.Tensor | None = None
    pooler_output: Any = None
    keys: torch.Tensor | None = None
    vision_states: torch.Tensor | None = None


@dataclass
class VisionCropTokens:
    """What a stage at ``site="vision"`` kept of one crop (tile) of an image, in the order it chose.

    Attributes
    ----------
    crop : int
        The crop's index within its image (LLaVA-NeXT: 0 is the base image, then the high-resolution
        crops in row-major order), as in :class:`TokenLayout` coordinates.
    tokens : torch.Tensor
        long ``[k]``: indices into the crop's vision-tower tokens ([CLS] first on CLIP towers).
    features : torch.Tensor
        ``[k, D]``: the projected features of those tokens (merged ones included).
    merged : torch.Tensor
        bool ``[k]``: tokens formed by merging others into them (VisionZip's contextual tokens).
    cls : torch.Tensor
        bool ``[k]``: [CLS] tokens.
    coords : torch.Tensor
        long ``[k, 4]``: ``(image, crop, row, col)`` of each token's patch in the crop's grid
        (``row = col = -1`` for [CLS]).
    """

    crop: int
    tokens: torch.Tensor
    features: torch.Tensor
    merged: torch.Tensor
    cls: torch.Tensor
    coords: torch.Tensor


@dataclass
class TokenLayout:
    """Where each visual token comes from, aligned with the flattened image features.

    Attributes
    ----------
    coords : torch.Tensor
        long ``[N, 4]``: ``(image, crop, row, col)``; ``image`` counts images over the whole batch in
        prompt order, ``crop`` is family-specific (see the adapter), ``-1`` where unknown or not a patch.
    newline : torch.Tensor
        bool ``[N]``: LLaVA-NeXT/OneVision ``image_newline`` tokens.
    cls : torch.Tensor or None
        float32 ``[N]``: [CLS] attention mapped to the visual tokens (``None`` if not captured).
    grids : list
        Per image, a list of ``(rows, cols)`` per crop, in the order of ``crop``.
    """

    coords: torch.Tensor
    newline: torch.Tensor
    cls: torch.Tensor | None = None
    grids: list | None = None


@functools.lru_cache(maxsize=512)
def raster_coords(image: int, crop: int, rows: int, cols: int) -> torch.Tensor:
    """long ``[rows * cols, 4]``: ``(image, crop, row, col)`` in raster order.

    Computed once per argument tuple (every prefill asks for the same grids): the tensor returned is
    shared, callers copy it (``torch.cat``, slice assignment) and never write into it.
    """
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.stack([torch.full_like(r, image), torch.full_like(r, crop), r, c], dim=1)


def unknown_coords(n: int, image: int = -1) -> torch.Tensor:
    """long ``[n, 4]``: ``(image, -1, -1, -1)``, tokens whose crop and patch are not known."""
    out = torch.full((n, 4), -1, dtype=torch.long)
    out[:, 0] = image
    return out


def crop_coords(sizes: list, crops: list, image: int | None = None) -> tuple[list, list]:
    """Per item, the coordinates of its visual tokens when they are whole crops in raster order.

    Item ``i`` has ``sizes[i]`` tokens made of the crops ``crops[i]``, a list of ``(rows, cols)``
    (crop ``k`` is the ``k``-th), each in raster order, one after the other. Where ``crops[i]`` is
    ``None`` or empty, or does not account for exactly ``sizes[i]`` tokens, the item's coordinates are
    unknown and it has no grids. ``image`` is the image index written into the coordinates (default:
    the item's index ``i``). Returns ``(coords, grids)``: per item, long ``[sizes[i], 4]`` and the
    list of its crops' grids, as :meth:`ModelAdapter.single_grid_layout` takes them. The coordinates
    of a one-crop item are :func:`raster_coords`' shared tensor: copy before writing into them.
    """
    coords, grids = [], []
    for i, (n, item) in enumerate(zip(sizes, crops)):
        img = i if image is None else image
        if item and sum(r * c for r, c in item) == n:
            parts = [raster_coords(img, k, r, c) for k, (r, c) in enumerate(item)]
            coords.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            grids.append(list(item))
        else:
            coords.append(unknown_coords(n, img))
            grids.append([])
    return coords, grids


class ModelAdapter:
    """Per-family hooks for :func:`tokenprune.prune` on a Hugging Face transformers 5.x VLM.

    Subclass it for a new family and register the subclass under the ``config.model_type`` it
    handles (``tokenprune.register_adapter("my_type", MyAdapter)`` or the ``tokenprune.adapters``
    entry-point group). Override only what differs from the defaults, which fit LLaVA-1.5.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``...ForConditionalGeneration`` model whose base model (``model.model``) has
        ``get_image_features`` and accepts ``mm_encoder_outputs``.

    Attributes
    ----------
    model_types : tuple of str
        ``config.model_type`` values the adapter is meant for (informational).
    text_model_attr : str
        Attribute of the base model holding the decoder stack (``language_model``; Idefics3/SmolVLM:
        ``text_model``).
    mrope : bool
        Position ids are 3-D M-RoPE ids (Qwen2-VL, Qwen2.5-VL): kept tokens always keep their
        ``(t, h, w)`` positions; ``positions="compact"`` is not defined for them.
    token_keys : tuple of str
        Per-token ``[B, L]`` kwargs gathered together with ``input_ids`` (``labels`` always is).
    default_schedule : dict
        Per registered method name, parameters that suit this family (e.g. TOPS's layers for
        Qwen2.5-VL). :func:`tokenprune.prune` passes those the method factory accepts when the method
        is given by name; explicit parameters win.
    vision_cls : bool
        Whether the family's vision tower has a [CLS] token (informational, for the documentation's
        family table; :attr:`has_cls` looks at the loaded tower).
    layout_notes : str
        One line on how the family lays out its visual tokens, for the documentation's family table
        (empty: the first paragraph of the class docstring is shown).
    """

    model_types: ClassVar[tuple] = ()
    text_model_attr: ClassVar[str] = "language_model"
    mrope: ClassVar[bool] = False
    token_keys: ClassVar[tuple] = ("token_type_ids", "mm_token_type_ids")
    default_schedule: ClassVar[dict] = {}
    vision_cls: ClassVar[bool] = True
    layout_notes: ClassVar[str] = ""

    def __init__(self, model):
        self.model = model
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "get_image_features"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no base model with get_image_features (expected a "
                "...ForConditionalGeneration from transformers 5.x)")
        self.base = base
        text = getattr(base, self.text_model_attr, None)
        if text is None or not hasattr(text, "layers"):
            raise UnsupportedModelError(f"{type(base).__name__} has no decoder stack at .{self.text_model_attr}.layers")
        self.text_model = text

    # -- structure ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The adapter's class name (shown in the report)."""
        return type(self).__name__

    @property
    def config(self):
        """The model's top-level config."""
        return self.model.config

    @property
    def text_config(self):
        """The decoder stack's config."""
        return self.text_model.config

    @property
    def vision_config(self):
        """The vision tower's config (``config.vision_config``), or ``None``."""
        return getattr(self.config, "vision_config", None)

    @property
    def layers(self):
        """The decoder layers, in order."""
        return list(self.text_model.layers)[: self.depth]

    def attention_module(self, layer_idx: int):
        """The self-attention module of decoder layer ``layer_idx`` (where text signals are captured)."""
        return self.layers[layer_idx].self_attn

    @property
    def depth(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @functools.cached_property
    def image_token_id(self) -> int:
        """The id of the image placeholder token in ``input_ids`` (``image_token_id`` or ``image_token_index``;
        read once per adapter: every prefill asks for it)."""
        cfg = self.config
        for key in ("image_token_id", "image_token_index"):
            v = getattr(cfg, key, None)
            if v is not None:
                return int(v)
        raise UnsupportedModelError(f"{type(cfg).__name__} has no image_token_id")

    @property
    def pad_token_id(self) -> int:
        """The id written into ``input_ids`` where a shortened prompt is re-padded (0 if the configs have none)."""
        for cfg in (self.text_config, self.config):
            v = getattr(cfg, "pad_token_id", None)
            if v is not None:
                return int(v)
        return 0

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` input embeddings of ``input_ids`` (image ids included; callers mask them)."""
        ids = input_ids
        vocab = getattr(self.text_config, "vocab_size", None)
        if vocab is not None:
            ids = ids.clamp(0, int(vocab) - 1)
        return self.base.get_input_embeddings()(ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]``: ``hidden`` through the decoder stack's final norm (``.norm``, learned weight
        included), as the LLM applies it before the LM head (DART compares tokens in this space).

        Raises
        ------
        UnsupportedModelError
            The decoder stack has no ``norm`` module.
        """
        norm = getattr(self.text_model, "norm", None)
        if norm is None:
            raise UnsupportedModelError(f"{type(self.text_model).__name__} has no final norm (.norm)")
        return norm(hidden)

    # -- image features -------------------------------------------------------------------------
    def image_kwargs(self, kwargs: dict) -> dict:
        """The kwargs of ``get_image_features`` found in a forward's kwargs (as ``generate`` picks them)."""
        params = signature(self.base.get_image_features).parameters
        return {k: kwargs[k] for k in params if k != "kwargs" and kwargs.get(k) is not None}

    def flatten_features(self, pooler_output) -> torch.Tensor:
        """``[N_total, D]``: every image's features in prompt order (the order ``masked_scatter`` uses)."""
        if isinstance(pooler_output, torch.Tensor):
            return pooler_output.reshape(-1, pooler_output.shape[-1])
        if len(pooler_output) == 1:  # one image: a view, no copy
            return pooler_output[0].reshape(-1, pooler_output[0].shape[-1])
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in pooler_output], dim=0)

    def make_pooler(self, flat: torch.Tensor, like):
        """``flat`` ``[K, D]`` in the container the model's forward expects in
        ``mm_encoder_outputs["image"].pooler_output``: the kind of ``like``, the model's own
        ``get_image_features(...).pooler_output``. A list (LLaVA and most families) gets ``[flat]``;
        a tensor (Gemma3; Idefics3 and SmolVLM before transformers 5.23) gets ``[K, 1, D]``, one
        token per block, which both mergers accept: by element count (``masked_scatter``) and by
        blocks of the tensor's second dimension (SmolVLM, whatever each sample kept)."""
        return flat[:, None] if isinstance(like, torch.Tensor) else [flat]

    def image_sizes_per_item(self, pooler_output) -> list:
        """Tokens per item of the pooler container (image, or sample for Idefics3)."""
        if isinstance(pooler_output, torch.Tensor):
            if pooler_output.dim() == 3:
                return [pooler_output.shape[1]] * pooler_output.shape[0]
            return [pooler_output.shape[0]]
        return [f.numel() // f.shape[-1] for f in pooler_output]

    # -- token layout ---------------------------------------------------------------------------
    def patch_grid_side(self) -> int:
        """Patches per side of the vision tower's square input (one crop or tile): ``image_size // patch_size``."""
        vc = self.vision_config
        return vc.image_size // vc.patch_size

    def token_layout(self, pooler_output, record: VisionRecord | None) -> TokenLayout:
        """Where each visual token comes from (default: one square grid per image, LLaVA-1.5).

        Parameters
        ----------
        pooler_output : list, tuple or torch.Tensor
            The image features as ``get_image_features`` returned them.
        record : VisionRecord or None
            The ``get_image_features`` call that produced them, when it ran inside the context.
        """
        sizes = self.image_sizes_per_item(pooler_output)
        side = self.patch_grid_side()
        patches = side * side
        with_cls = [n == patches + 1 for n in sizes]  # "full" strategy on a tower with [CLS]: CLS comes first
        coords, grids = crop_coords([n - c for n, c in zip(sizes, with_cls)], [[(side, side)]] * len(sizes))
        for i, c in enumerate(with_cls):
            if c:
                coords[i] = torch.cat([unknown_coords(1, i), coords[i]])
        return self.single_grid_layout(coords, grids, record, sizes)

    def single_grid_layout(self, coords, grids, record, sizes) -> TokenLayout:
        """The layout of images without newline tokens, from per-image coordinates and grids (as
        :func:`crop_coords` gives them), with the [CLS] scores of ``record`` when it has them."""
        coords = torch.cat(coords)
        cls = None
        if record is not None and record.cls_attention is not None:
            cls = self.cls_to_tokens(record, sizes)
        return TokenLayout(coords=coords, newline=torch.zeros(len(coords), dtype=torch.bool), cls=cls, grids=grids)

    # -- [CLS] attention --------------------------------------------------------------------------
    @property
    def has_cls(self) -> bool:
        """Whether the vision tower has a [CLS] token (CLIP: yes; SigLIP, Qwen-ViT: no)."""
        tower = self.vision_tower
        emb = getattr(tower, "embeddings", None)
        return emb is not None and hasattr(emb, "class_embedding")

    @property
    def vision_tower(self):
        """The base model's vision encoder (``vision_tower``, ``visual`` or ``vision_model``)."""
        for name in ("vision_tower", "visual", "vision_model"):
            t = getattr(self.base, name, None)
            if t is not None:
                return t
        raise UnsupportedModelError(f"{type(self.base).__name__} has no vision tower")

    def feature_select_strategy(self, record: VisionRecord | None) -> str:
        """``vision_feature_select_strategy`` of the ``get_image_features`` call, else of the config
        (``"default"``: the [CLS] token is dropped from the features; ``"full"``: kept)."""
        return (record.kwargs.get("vision_feature_select_strategy") if record is not None else None) or \
            getattr(self.config, "vision_feature_select_strategy", "default")

    def vision_feature_layer(self) -> int:
        """The hidden state of the tower that the features come from (the last one when a list is configured)."""
        v = getattr(self.config, "vision_feature_layer", -1)
        if isinstance(v, (list, tuple)):
            v = v[-1]
        return int(v)

    #: Whether :meth:`cls_to_tokens` can map the ``"mean_attention"`` fallback (attention each patch
    #: receives, averaged over all queries and heads) of a tower without [CLS] onto the visual tokens.
    supports_mean_attention: ClassVar[bool] = False

    def cls_attention_module(self, fallback: str | None = None):
        """The vision attention module whose [CLS] row (or, with ``fallback="mean_attention"``, whose
        mean attention per key) scores the selected features.

        Hidden state ``h`` of the tower is the output of encoder layer ``h - 1``, so for
        ``vision_feature_layer = f`` the attention is that of layer ``f - 1`` (``f >= 0``) or
        ``n + f`` (``f < 0``). For a list of feature layers the last one is used.

        Raises
        ------
        UnsupportedModelError
            The tower has no [CLS] token (and the fallback is not available for this family).
        """
        if not self.has_cls and not (fallback == "mean_attention" and self.supports_mean_attention):
            extra = (" or cls_fallback='mean_attention' (attention each patch receives)"
                     if self.supports_mean_attention else "")
            raise UnsupportedModelError(
                f"{self.config.model_type}: its vision tower ({type(self.vision_tower).__name__}) has no [CLS] token, "
                "so relevance='cls_attention' is not available; use 'text_attention' (in the LLM), "
                "'text_similarity', an objective that needs no relevance, or pass prune(..., "
                f"cls_fallback='text_similarity'){extra}")
        return self.feature_attention_module()

    def feature_attention_module(self):
        """The attention module of the vision encoder layer that produces the selected features."""
        tower = self.vision_tower
        enc = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        layers = list(enc.layers)
        f = self.vision_feature_layer()
        idx = f - 1 if f >= 0 else len(layers) + f
        if not 0 <= idx < len(layers):
            raise UnsupportedModelError(f"vision_feature_layer {f} does not name an encoder layer "
                                        f"of a {len(layers)}-layer tower")
        return layers[idx].self_attn

    def cls_to_tokens(self, record: VisionRecord, sizes: list) -> torch.Tensor:
        """float32 ``[N_total]``: [CLS] attention for every visual token (default: LLaVA-1.5)."""
        att = record.cls_attention  # [n_img, 1 + P]
        tok = att[:, 1:] if self.feature_select_strategy(record) == "default" else att
        return tok.reshape(-1)[: sum(sizes)].float()

    # -- the vision tower before the projector (stages at site="vision") -------------------------
    #: Whether a stage can act on the vision tower's feature-layer states before the projector
    #: (``Stage(site="vision")``): the projector maps each vision token to one LLM token, so any kept or
    #: merged set of tokens can be projected. Families without it run such a stage on the projected
    #: features, for the reason :attr:`vision_site_reason` gives.
    supports_vision_site: ClassVar[bool] = False
    #: Why a family does not support ``site="vision"`` (shown in the report's note).
    vision_site_reason: ClassVar[str] = "its projector does not map each vision token to one LLM token"

    def vision_site_unsupported(self) -> str | None:
        """``None`` when a stage can act before this model's projector, else why not (one phrase).

        LLaVA-style families need a token-wise ``multi_modal_projector`` on the base model.
        """
        if not self.supports_vision_site:
            return self.vision_site_reason
        if not callable(getattr(self.base, "multi_modal_projector", None)):
            return f"{type(self.base).__name__} has no multi_modal_projector"
        return None

    def feature_layers(self, kwargs: dict | None = None):
        """``vision_feature_layer`` of a ``get_image_features`` call (``kwargs``), else of the config:
        an int, or a list of ints whose hidden states are concatenated."""
        v = None if kwargs is None else kwargs.get("vision_feature_layer")
        if v is None:
            v = getattr(self.config, "vision_feature_layer", -1)
        return list(v) if isinstance(v, (list, tuple)) else int(v)

    def vision_states(self, output, kwargs: dict | None = None) -> torch.Tensor | None:
        """``[n_crops, T, D_vision]``: the tower's hidden states at the feature layer, every token
        ([CLS] included), as ``get_image_features`` selected them before its feature selection and
        projector; ``None`` when ``output`` does not carry them.

        Parameters
        ----------
        output : transformers.modeling_outputs.BaseModelOutputWithPooling
            What ``get_image_features`` returned (its ``hidden_states`` hold the selected layers).
        kwargs : dict, optional
            The call's arguments (for ``vision_feature_layer``).
        """
        hs = getattr(output, "hidden_states", None)
        if hs is None:
            return None
        layers = self.feature_layers(kwargs)
        try:
            picked = [hs[i] for i in (layers if isinstance(layers, list) else [layers])]
        except IndexError:
            return None
        if any(h is None for h in picked):
            return None
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

    def vision_crops(self, record: VisionRecord) -> list:
        """Per image of the ``get_image_features`` call, how many consecutive rows (crops) of the
        vision tower's batch it has (default: one per image)."""
        states = record.vision_states
        return [1] * (0 if states is None else int(states.shape[0]))

    def project_vision_states(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., k, D]``: the model's projector applied to vision-tower states ``[..., k, D_vision]``
        (default ``multi_modal_projector``, token by token)."""
        return self.base.multi_modal_projector(states)

    def tower_coords(self, image: int, crop: int, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """long ``[k, 4]``: ``(image, crop, row, col)`` of vision-tower tokens ``tokens`` of a crop of
        ``num_tokens`` tokens; tokens before the ``side x side`` patches ([CLS]) get ``row = col = -1``."""
        side = self.patch_grid_side()
        p = tokens.long().cpu() - (num_tokens - side * side)
        out = torch.full((tokens.numel(), 4), -1, dtype=torch.long)
        out[:, 0], out[:, 1] = image, crop
        ok = p >= 0
        out[ok, 2], out[ok, 3] = p[ok] // side, p[ok] % side
        return out

    def arrange_vision_tokens(self, image: int, crops: list, record: VisionRecord):
        """One image's visual tokens, in the order the LLM sees them, from what a ``site="vision"``
        stage kept of each of its crops.

        Parameters
        ----------
        image : int
            The image's index in the ``get_image_features`` call.
        crops : list of VisionCropTokens
            Per crop of the image, in crop order (crops that kept nothing may be missing).
        record : VisionRecord
            The call.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``[k, D]`` features and long ``[k, 4]`` coordinates. Default: the crops one after the
            other, each in the stage's order (LLaVA-1.5: [CLS], the dominant patches, the merged
            tokens, as the official VisionZip code).
        """
        if not crops:
            return None, torch.zeros(0, 4, dtype=torch.long)
        return torch.cat([c.features for c in crops]), torch.cat([c.coords for c in crops])

    # -- positions ------------------------------------------------------------------------------
    def full_position_ids(self, kwargs: dict, record: VisionRecord | None) -> torch.Tensor:
        """Position ids of the unpruned prompt: long ``[B, L]`` (1-D RoPE) as the model would build them.

        Uses ``kwargs["position_ids"]`` when given (``generate`` always gives them), else
        ``cumsum(attention_mask) - 1`` (padding at 0), else ``0 .. L-1``.
        """
        pid = kwargs.get("position_ids")
        if pid is not None:
            return pid
        ids = kwargs["input_ids"]
        am = kwargs.get("attention_mask")
        if am is None:
            return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        pos = am.long().cumsum(-1) - 1
        return pos.masked_fill(am == 0, 0)

    def rotary(self, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` for ``position_ids`` as decoder layer ``layer_idx`` expects them."""
        rot = self.text_model.rotary_emb
        if "layer_type" in signature(rot.forward).parameters:
            types = getattr(self.text_config, "layer_types", None)
            return rot(hidden, position_ids, types[layer_idx] if types else None)
        return rot(hidden, position_ids)

    # -- KV cache -------------------------------------------------------------------------------
    #: Names under which a forward's kwargs and outputs carry the KV cache, newest first:
    #: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is still accepted,
    #: deprecated, and user code may pass either); 5.20-5.23 use ``past_key_values``.
    cache_keys: ClassVar[tuple] = ("cache", "past_key_values")

    def kv_cache(self, mapping) -> Any:
        """The KV cache in a forward's kwargs or in its output (a dict, a ``ModelOutput`` or an object
        with the attribute), under whichever of :attr:`cache_keys` holds one, else ``None``."""
        for key in self.cache_keys:
            v = mapping.get(key) if hasattr(mapping, "get") else getattr(mapping, key, None)
            if v is not None:
                return v
        return None

    # -- checks ---------------------------------------------------------------------------------
    def check_pre_llm(self, kept: list) -> None:
        """Raise if the model cannot take the image tokens a before-LLM stage kept, ``kept[b]`` per
        sample (default: always works)."""

    def check_in_llm_prefill(self, seq_len: int) -> None:
        """Raise if in-LLM pruning cannot work for a prompt of ``seq_len`` tokens (default: always works)."""

    def check_in_llm_decode(self, layer_idx: int, mask, expected_kv: int) -> None:
        """Raise if in-LLM pruning cannot continue at this decode step (default: always works)."""

    def layer_is_sliding(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` uses sliding-window attention (``config.layer_types``)."""
        types = getattr(self.text_config, "layer_types", None)
        return bool(types) and types[layer_idx] == "sliding_attention"


def square_side(n: int) -> int | None:
    """The side of a square grid of ``n`` tokens, or ``None`` if ``n`` is not a square."""
    s = int(math.isqrt(n))
    return s if s * s == n else None
