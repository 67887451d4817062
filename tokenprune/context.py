"""The selection context: the visual tokens of a batch and the signals a criterion may use."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import torch

from .errors import InvalidFeaturesError, MissingSignalError, ParameterError, ShapeError

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Arithmetic of the features' similarities (:attr:`TokenContext.compute_dtype`).
COMPUTE_DTYPES = ("float32", "model")

#: Signals a context can carry, with their shapes. Plugins may pass others through ``extra``.
SIGNALS = {
    "relevance": "[B, N] float: per-token relevance (e.g. [CLS] or text-rater attention)",
    "text_embeddings": "[B, T, D] float: text (instruction) token embeddings in the feature space",
    "text_mask": "[B, T] bool: valid text tokens",
    "text_relevance": "[B, T] float: per-text-token score (e.g. DART's key L1 norms of the instruction tokens)",
    "grid": "(rows, cols): the 2-D patch grid, rows * cols == N",
    "coords": "[B, N, 4] float: (image, crop, row, col) of each token, -1 where not a patch (the adapters "
              "pass it; spatial selectors read it when there is no single grid)",
}


@dataclass(frozen=True, eq=False)
class TokenContext:
    """Visual tokens of a batch plus optional signals, validated once.

    Build it with :func:`make_context`, which checks shapes and values; criteria and selectors read it
    and never change it. Derived quantities (unit-normalised features, the cosine similarity matrix)
    are computed once and cached on the context.

    Attributes
    ----------
    features : torch.Tensor
        ``[B, N, D]`` visual-token features, any float dtype (criteria compute in ``float32``).
    mask : torch.Tensor
        ``[B, N]`` bool, ``True`` for real tokens, ``False`` for padding.
    relevance : torch.Tensor or None
        ``[B, N]`` float32 relevance scores (padding positions hold 0).
    text_embeddings : torch.Tensor or None
        ``[B, T, D]`` text embeddings, with ``text_mask`` ``[B, T]`` bool.
    text_relevance : torch.Tensor or None
        ``[B, T]`` float32 scores of the text tokens (DART's text pivots: their keys' L1 norms); 0 at
        padding.
    grid : tuple of int or None
        ``(rows, cols)`` of the patch grid in raster order.
    extra : Mapping[str, torch.Tensor]
        Further named signals (plugins), each with leading dims ``[B, N]``.
    seed : int
        Seed for stochastic components; the same seed gives the same selection.
    compute_dtype : {"float32", "model"}
        Arithmetic of :attr:`unit_features` and :attr:`similarity`. ``"float32"`` (default): the
        features are upcast to float32 before they are normalised and multiplied. ``"model"``: they
        are normalised (``x / ||x||``) and multiplied (one ``torch.mm`` per sample) in their own dtype,
        as a model running in fp16 or bf16 would; the results are then stored as float32 (an exact
        copy of the rounded values), so every criterion reads them as before. Selectors that
        reproduce a reference written in the model's dtype read :attr:`features_dtype` and keep
        their own arithmetic in it (:class:`~tokenprune.selectors.MaxMin`, DivPrune's fp16 scripts).
    """

    features: torch.Tensor
    mask: torch.Tensor
    relevance: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_relevance: torch.Tensor | None = None
    grid: tuple | None = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    compute_dtype: str = "float32"

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    @cached_property
    def n_valid(self) -> torch.Tensor:
        """long ``[B]``: number of real tokens per sample."""
        return self.mask.sum(1)

    @property
    def features_dtype(self) -> torch.dtype:
        """The dtype the similarities are computed in: float32, or the features' own for
        ``compute_dtype="model"``."""
        return self.features.dtype if self.compute_dtype == "model" else torch.float32

    @cached_property
    def _model_unit_features(self) -> torch.Tensor:
        """``[B, N, D]`` in the features' dtype: ``x / ||x||`` computed in that dtype (padding rows 0)."""
        x = self.features
        unit = x / x.norm(dim=-1, keepdim=True)
        return torch.where(self.mask.unsqueeze(-1), unit, torch.zeros((), dtype=unit.dtype, device=unit.device))

    @cached_property
    def unit_features(self) -> torch.Tensor:
        """float32 ``[B, N, D]``: L2-normalised features (padding rows are zero), normalised in
        float32 or, for ``compute_dtype="model"``, in the features' dtype."""
        if self.compute_dtype == "model":
            return self._model_unit_features.float()
        x = torch.nn.functional.normalize(self.features.float(), dim=-1, eps=1e-12)
        return x * self.mask.unsqueeze(-1)

    @cached_property
    def similarity(self) -> torch.Tensor:
        """float32 ``[B, N, N]``: cosine similarity ``F = Ĥ Ĥᵀ``; rows and columns of padding are 0.

        One batched GEMM in float32, ``O(B N² D)`` time and ``O(B N²)`` memory. With
        ``compute_dtype="model"``, one ``torch.mm`` per sample in the features' dtype (the values
        rounded to it), stored as float32.
        """
        if self.compute_dtype == "model":
            x = self._model_unit_features
            return torch.stack([torch.mm(xb, xb.t()) for xb in x]).float()
        x = self.unit_features
        return torch.bmm(x, x.transpose(1, 2))

    def require(self, *names: str, by: str = "this criterion") -> None:
        """Raise :class:`MissingSignalError` unless every named signal is present."""
        missing = [n for n in names if self.get_signal(n) is None]
        if missing:
            raise MissingSignalError(
                f"{by} needs the signal(s) {', '.join(missing)} "
                f"({'; '.join(SIGNALS.get(n, 'plugin signal') for n in missing)}), which were not given")

    def get_signal(self, name: str):
        if name in ("relevance", "text_embeddings", "text_mask", "text_relevance", "grid"):
            return getattr(self, name)
        return self.extra.get(name)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed + offset``."""
        return torch.Generator().manual_seed(int(self.seed) + offset)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidFeaturesError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise InvalidFeaturesError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _rows_finite(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether every valid row of ``x`` ``[B, N, D]`` is finite, in one pass without copying ``x``.

    A row holding NaN or inf sums to NaN or inf; the float32 sum of finite values overflows only for
    magnitudes near 1e34, which are reported as non-finite too.
    """
    sums = x.sum(-1, dtype=torch.float32)
    return bool(torch.isfinite(sums).logical_or_(~mask).all())


def _scores(name: str, t: torch.Tensor, dims: str, mask: torch.Tensor, where: str) -> torch.Tensor:
    """A per-token score tensor checked against ``mask`` (``[B, N]`` or ``[B, T]``): float32 on the mask's
    device, 0 where the mask is False.

    Raises
    ------
    InvalidFeaturesError
        Not a float tensor, or NaN / inf where the mask is True.
    ShapeError
        A shape other than the mask's.
    """
    _check_float(name, t)
    if tuple(t.shape) != tuple(mask.shape):
        raise ShapeError(f"{name} must be {dims} = {tuple(mask.shape)}, got {tuple(t.shape)}")
    t = t.to(mask.device).float().masked_fill(~mask, 0.0)
    if not torch.isfinite(t).all():
        raise InvalidFeaturesError(f"{name} contains NaN or inf at {where}")
    return t


def make_context(features: torch.Tensor, *, mask: torch.Tensor | None = None,
                 relevance: torch.Tensor | None = None, text_embeddings: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None, text_relevance: torch.Tensor | None = None, grid=None,
                 seed: int = 0, compute_dtype: str = "float32", **extra) -> TokenContext:
    """Validate inputs and build a :class:`TokenContext`.

    Parameters
    ----------
    features : torch.Tensor
        ``[B, N, D]`` (or ``[N, D]`` for one sample) float features, fp32, fp16 or bf16.
    mask : torch.Tensor, optional
        ``[B, N]`` validity mask (bool, or any dtype holding only 0 and 1); padding positions are never
        selected.
    relevance : torch.Tensor, optional
        ``[B, N]`` relevance scores.
    text_embeddings : torch.Tensor, optional
        ``[B, T, D]`` text embeddings in the feature space; ``text_mask`` ``[B, T]`` marks valid ones.
    text_relevance : torch.Tensor, optional
        ``[B, T]`` scores of the text tokens (needs ``text_embeddings``).
    grid : tuple of int, optional
        ``(rows, cols)`` with ``rows * cols == N``.
    seed : int
        Seed for stochastic selectors.
    compute_dtype : {"float32", "model"}
        Arithmetic of the similarities (see :class:`TokenContext`); default ``"float32"``.
    **extra : torch.Tensor
        Plugin signals with leading dims ``[B, N]``.

    Raises
    ------
    ShapeError
        Wrong ranks, shapes that disagree between features, mask and signals, or a mask holding values
        other than 0/1 (e.g. 0.5 or 2).
    InvalidFeaturesError
        Non-float features or signals, NaN or inf in valid positions, or an all-padding sample.
    ParameterError
        An unknown ``compute_dtype``.

    Notes
    -----
    ``O(B N D)`` for the finiteness checks (one reduction over the features, no copy).
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ParameterError(f"compute_dtype must be one of {COMPUTE_DTYPES} (float32 arithmetic, or the features' "
                             f"own dtype), got {compute_dtype!r}")
    _check_float("features", features)
    if features.dim() == 2:
        features = features.unsqueeze(0)
        mask = mask.reshape(1, -1) if isinstance(mask, torch.Tensor) else mask
        relevance = None if relevance is None else relevance.reshape(1, -1)
        if text_embeddings is not None and text_embeddings.dim() == 2:
            text_embeddings = text_embeddings.unsqueeze(0)
            text_mask = None if text_mask is None else text_mask.reshape(1, -1)
            text_relevance = None if text_relevance is None else text_relevance.reshape(1, -1)
    if features.dim() != 3:
        raise ShapeError(f"features must be [B, N, D] (or [N, D]), got shape {tuple(features.shape)}")
    B, N, D = features.shape
    if N == 0 or D == 0:
        raise ShapeError(f"features must have at least one token and one channel, got {tuple(features.shape)}")
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N):
            raise ShapeError(f"mask must be [B, N] = {(B, N)} like the features, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool:
            bad = mask[(mask != 0) & (mask != 1)]  # NaN compares unequal to both
            if bad.numel():
                raise ShapeError(f"mask must hold only True/False or 0/1 values (True or 1: a real token), got "
                                 f"{bad.flatten()[0].item()!r} in a {mask.dtype} mask")
        mask = mask.to(device=features.device, dtype=torch.bool)
    if (mask.sum(1) == 0).any():
        raise InvalidFeaturesError("every sample needs at least one valid token; mask has an all-padding row")
    if not _rows_finite(features, mask):
        raise InvalidFeaturesError("features contain NaN or inf at valid positions")
    if relevance is not None:
        relevance = _scores("relevance", relevance, "[B, N]", mask, "valid positions")
    if text_embeddings is not None:
        _check_float("text_embeddings", text_embeddings)
        if text_embeddings.dim() != 3 or text_embeddings.shape[0] != B or text_embeddings.shape[2] != D:
            raise ShapeError(f"text_embeddings must be [B, T, D] with B={B}, D={D}, "
                             f"got {tuple(text_embeddings.shape)}")
        T = text_embeddings.shape[1]
        if text_mask is None:
            text_mask = torch.ones(B, T, dtype=torch.bool, device=features.device)
        elif tuple(text_mask.shape) != (B, T):
            raise ShapeError(f"text_mask must be [B, T] = {(B, T)}, got {tuple(text_mask.shape)}")
        text_mask = text_mask.to(device=features.device, dtype=torch.bool)
        if not _rows_finite(text_embeddings, text_mask):
            raise InvalidFeaturesError("text_embeddings contain NaN or inf")
        text_embeddings = text_embeddings.to(features.device)
        if text_relevance is not None:
            text_relevance = _scores("text_relevance", text_relevance, "[B, T]", text_mask, "valid text positions")
    elif text_mask is not None or text_relevance is not None:
        raise ShapeError("text_mask or text_relevance was given without text_embeddings")
    if grid is not None:
        try:
            rows, cols = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise ShapeError(f"grid must be a (rows, cols) pair, got {grid!r}") from None
        if rows * cols != N:
            raise ShapeError(f"grid {rows} x {cols} = {rows * cols} does not match N = {N} tokens")
        grid = (rows, cols)
    for name, t in extra.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:2]) != (B, N):
            raise ShapeError(f"signal {name!r} must have leading dims [B, N] = {(B, N)}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    extra = {k: v.to(features.device) for k, v in extra.items() if v is not None}
    return TokenContext(features=features, mask=mask, relevance=relevance, text_embeddings=text_embeddings,
                        text_mask=text_mask, text_relevance=text_relevance, grid=grid, extra=extra,
                        seed=int(seed), compute_dtype=compute_dtype)
