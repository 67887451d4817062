"""Private numerical helpers shared by the built-in criteria and selectors.

Fixed-point similarity
----------------------
Facility-location sums ``Σ_j max(0, F_ij - m_j)`` are computed on the cosine similarity rounded to a
fixed-point grid: ``Fq = round(F · s)`` stored in int16 with ``s = 2^15`` (clipped to ±32767), i.e. a
resolution of ``2^-15 ≈ 3e-5``. That is well below the error of similarities computed from bf16 or
fp16 features (about ``4e-3``), and sums of up to ``N < 65536`` terms fit in int32. Every coverage
gain is then an *exact* integer: computing it from scratch, from a few gathered rows (lazy greedy)
or incrementally (TOPS) gives bit-identical values, which is what makes the lazy, incremental and
plain greedy selections provably identical, ties included, instead of "identical up to float
rounding". int16 storage halves the memory traffic of the row scans that dominate facility-location
greedy (and the memory of the matrix), and int16/int32 arithmetic runs at float speed on CPU and GPU.
For ``N >= 65536`` the scale drops to ``2^floor(log2((2^31 - 1) / N))``.

Large elementwise passes are done in row blocks of about a million entries, so no ``N x N``
temporary is ever allocated (allocations above 32 MiB come straight from the OS, page by page).
"""

from __future__ import annotations

import math

import torch

_FIXED_KEY = "_tokenprune_fixed_similarity"
_INT16_MAX = 32767
#: Entries per block in blocked ``[B, N, N]`` passes.
BLOCK_ELEMS = 1 << 20


def fixed_point_scale(n: int) -> float:
    """The fixed-point scale: ``2^15``, or less when ``n · 2^15`` would not fit in int32."""
    return float(min(2 ** 15, 2 ** math.floor(math.log2((2 ** 31 - 1) / max(n, 1)))))


def row_blocks(n_rows: int, n_cols: int, batch: int = 1):
    """``(start, stop)`` row ranges covering ``n_rows`` with about :data:`BLOCK_ELEMS` entries each."""
    step = max(1, BLOCK_ELEMS // max(1, n_cols * batch))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def fixed_point_similarity(ctx) -> tuple[torch.Tensor, float]:
    """int16 ``[B, N, N]`` cosine similarity on the fixed-point grid, and its scale ``s``.

    ``Fq[b, i, j] = clip(round(s · F[b, i, j]), -32767, 32767)``; padding rows and columns are 0.
    Computed once per context and cached on it (like ``ctx.similarity``). ``O(B N²)`` after the GEMM.
    """
    cached = ctx.__dict__.get(_FIXED_KEY)
    if cached is not None:
        return cached
    F = ctx.similarity
    B, N, _ = F.shape
    scale = fixed_point_scale(N)
    q = torch.empty(B, N, N, dtype=torch.int16, device=F.device)
    for a, b in row_blocks(N, N, B):
        q[:, a:b].copy_(F[:, a:b].mul(scale).round_().clamp_(-_INT16_MAX, _INT16_MAX))
    ctx.__dict__[_FIXED_KEY] = (q, scale)  # frozen dataclass: cache like functools.cached_property does
    return q, scale


def gather_rows(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mat[b, index[b, k], :]``: rows of ``mat`` (``[B, N, M]``) at ``index`` (long ``[B, K]``) -> ``[B, K, M]``.

    One ``index_select`` on the flattened matrix (contiguous row copies), not a ``gather`` over an
    expanded index.
    """
    B, N, M = mat.shape
    dtype = mat.dtype
    if dtype == torch.int16 and M % 2 == 0 and mat.is_contiguous():
        mat = mat.view(torch.int32)  # same bytes; CPU index_select copies int32 rows 3x faster than int16
    if B == 1:
        out = mat[0].index_select(0, index[0]).unsqueeze(0)
    else:
        offs = torch.arange(B, device=index.device).mul_(N).unsqueeze(1)
        out = mat.reshape(B * N, -1).index_select(0, (index + offs).reshape(-1)).view(B, index.shape[1], -1)
    return out.view(dtype)


def gather_row(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mat[b, index[b], :]`` for long ``[B]`` ``index`` -> ``[B, M]``."""
    return gather_rows(mat, index.unsqueeze(1)).squeeze(1)


def coverage_sums(fq: torch.Tensor, m: torch.Tensor, owned: bool = False) -> torch.Tensor:
    """int32 ``[B, R]``: ``Σ_j max(0, fq[b, r, j] - m[b, j])`` for int16 rows ``fq`` ``[B, R, N]``.

    ``m`` (``[B, N]``) is int16 (then ``max(fq, m) - m`` is summed: two passes, no widening) or int32
    (values above the int16 range, e.g. TOPS's sentinel for kept tokens). Blocked over rows.
    ``owned=True`` lets it overwrite ``fq`` (a gathered copy) instead of allocating.
    """
    B, R, N = fq.shape
    out = torch.empty(B, R, dtype=torch.int32, device=fq.device)
    if m.dtype == torch.int16:
        msum = m.sum(-1, dtype=torch.int32).unsqueeze(1)
        mm = m.unsqueeze(1)
        for a, b in row_blocks(R, N, B):
            blk = fq[:, a:b]
            mx = torch.maximum(blk, mm, out=blk) if owned else torch.maximum(blk, mm)
            torch.sub(mx.sum(-1, dtype=torch.int32), msum, out=out[:, a:b])
    else:
        mm = m.unsqueeze(1)
        for a, b in row_blocks(R, N, B):
            out[:, a:b] = (fq[:, a:b] - mm).clamp_min_(0).sum(-1, dtype=torch.int32)
    return out


def coverage_sums_at(fq: torch.Tensor, index: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, M]``: :func:`coverage_sums` of the rows of ``fq`` at ``index`` (long ``[B, M]``).

    Rows are gathered in blocks of about :data:`BLOCK_ELEMS` entries (no large temporary).
    """
    B, N, _ = fq.shape
    M = index.shape[1]
    blocks = row_blocks(M, N, B)
    if len(blocks) == 1:
        return coverage_sums(gather_rows(fq, index), m, owned=True)
    return torch.cat([coverage_sums(gather_rows(fq, index[:, a:b]), m, owned=True) for a, b in blocks], 1)


def as_float_gains(c: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 gains from fixed-point integers (a monotone map: order and ties are kept or merged, never swapped)."""
    return c.to(torch.float32).div_(scale)


def row_offsets(B: int, N: int, device) -> torch.Tensor | None:
    """long ``[B]`` offsets ``b · N`` for indexing flattened ``[B·N, ...]`` tensors (``None`` when ``B == 1``)."""
    return None if B == 1 else torch.arange(B, device=device) * N
