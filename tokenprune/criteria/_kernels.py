"""Private numerical helpers shared by the built-in criteria and selectors.

Fixed-point similarity
----------------------
Facility-location sums ``Σ_j max(0, F_ij - m_j)`` are computed on the cosine similarity rounded to a
fixed-point grid, ``Fq = round(F · s)`` in int32 with ``s = 2^(31 - ceil(log2(N + 1)))``
(``s = 2^21`` for N = 576, ``2^19`` for N = 2880: a resolution of 5e-7 and 2e-6, below the rounding
error of the float32 GEMM that produced ``F``). Every sum of at most ``N`` terms of magnitude at most
``s`` fits in int32, so all coverage gains are *exact* integers: computing them from scratch, from a
few gathered rows (lazy greedy), or incrementally (TOPS) gives bit-identical values. That is what
makes the lazy, incremental and plain greedy selections provably identical, ties included, instead of
"identical up to float rounding". int32 arithmetic runs at float32 speed on CPU and GPU.
"""

from __future__ import annotations

import math

import torch

_FIXED_KEY = "_tokenprune_fixed_similarity"


def fixed_point_scale(n: int) -> float:
    """The fixed-point scale ``s = 2^(31 - ceil(log2(n + 1)))`` for sums of ``n`` terms in [-s, s]."""
    bits = 31 - math.ceil(math.log2(n + 1))
    return float(2 ** max(bits, 1))


def fixed_point_similarity(ctx) -> tuple[torch.Tensor, float]:
    """int32 ``[B, N, N]`` cosine similarity on the fixed-point grid, and its scale ``s``.

    ``Fq[b, i, j] = round(s · clamp(F[b, i, j], -1, 1))``; padding rows and columns are 0. Computed
    once per context and cached on it (like ``ctx.similarity``). ``O(B N²)`` after the GEMM.
    """
    cached = ctx.__dict__.get(_FIXED_KEY)
    if cached is not None:
        return cached
    scale = fixed_point_scale(ctx.num_tokens)
    q = ctx.similarity.clamp(-1.0, 1.0).mul_(scale).round_().to(torch.int32)
    ctx.__dict__[_FIXED_KEY] = (q, scale)  # frozen dataclass: cache like functools.cached_property does
    return q, scale


def gather_rows(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mat[b, index[b, k], :]``: rows of ``mat`` (``[B, N, M]``) at ``index`` (long ``[B, K]``) -> ``[B, K, M]``.

    One ``index_select`` on the flattened matrix (contiguous row copies), not a ``gather`` over an
    expanded index.
    """
    B, N, M = mat.shape
    if B == 1:
        return mat[0].index_select(0, index[0]).unsqueeze(0)
    offs = torch.arange(B, device=index.device).mul_(N).unsqueeze(1)
    return mat.reshape(B * N, M).index_select(0, (index + offs).reshape(-1)).view(B, index.shape[1], M)


def gather_row(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mat[b, index[b], :]`` for long ``[B]`` ``index`` -> ``[B, M]``."""
    return gather_rows(mat, index.unsqueeze(1)).squeeze(1)


def coverage_sums(fq: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, R]``: ``Σ_j max(0, fq[b, r, j] - m[b, j])`` for int32 rows ``fq`` ``[B, R, N]``."""
    return (fq - m.unsqueeze(1)).clamp_min_(0).sum(-1, dtype=torch.int32)


def as_float_gains(c: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 gains from fixed-point integers (a monotone map: order and ties are kept or merged, never swapped)."""
    return c.to(torch.float32).div_(scale)


def row_offsets(B: int, N: int, device) -> torch.Tensor | None:
    """long ``[B]`` offsets ``b · N`` for indexing flattened ``[B·N, ...]`` tensors (``None`` when ``B == 1``)."""
    return None if B == 1 else torch.arange(B, device=device) * N
