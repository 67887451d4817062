"""Selectors that use the 2-D patch grid: average pooling and windowed top-k."""

from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MissingSignalError, ParameterError, ShapeError
from ..registry import selectors
from ..selection import from_order
from .base import Selector

_BIG = torch.iinfo(torch.long).max


def resolve_grid(ctx, who: str) -> tuple[int, int]:
    """``ctx.grid``, or ``(r, r)`` when ``N = r²``; else :class:`MissingSignalError`.

    A grid with a dimension that is not positive raises :class:`ShapeError`.
    """
    if ctx.grid is not None:
        if any(int(g) <= 0 for g in ctx.grid):
            raise ShapeError(f"{who} needs a (rows, cols) grid of positive ints, got {tuple(ctx.grid)!r}")
        return tuple(ctx.grid)
    n = ctx.num_tokens
    r = math.isqrt(n)
    if r * r == n:
        return (r, r)
    raise MissingSignalError(f"{who} needs ctx.grid, the (rows, cols) patch grid, or the 'coords' signal; "
                             f"neither was given and N = {n} tokens is not a square, so it cannot be inferred")


@dataclass(frozen=True)
class GridSegment:
    """One patch grid among a sample's tokens: an image, or one crop or tile of it.

    Attributes
    ----------
    index : torch.Tensor
        long ``[n]``: the positions of its tokens among the sample's ``N`` tokens.
    rows, cols : int
        Its grid: the bounding box of its tokens' ``(row, col)`` coordinates.
    cell : torch.Tensor
        long ``[n]``: each token's raster index ``y * cols + x`` inside that grid.
    """

    index: torch.Tensor
    rows: int
    cols: int
    cell: torch.Tensor


def grid_segments(ctx, who: str) -> list[list[GridSegment]]:
    """The patch grids of each sample, per row of the context.

    With ``ctx.grid`` (or a square ``N``, when the context has no ``coords`` signal) every row is one
    ``rows x cols`` grid holding all ``N`` tokens, padding included (selectors skip it by the mask).
    Otherwise the ``coords`` signal (``[B, N, 4]``: image, crop, row, col; ``-1`` where not a patch,
    as the adapters pass it) splits each row's valid tokens into one grid per ``(image, crop)``, in
    ``(image, crop)`` order, each the bounding box of its tokens (LLaVA-NeXT's anyres crops,
    Idefics3 tiles, several images in one sample, or what an earlier stage left of them).

    Raises
    ------
    MissingSignalError
        Neither a grid nor coordinates, and ``N`` is not a square; or a valid token without
        coordinates (e.g. LLaVA-NeXT newline tokens selected as candidates).
    """
    B, N = ctx.mask.shape
    coords = ctx.extra.get("coords")
    if ctx.grid is not None or coords is None:
        rows, cols = resolve_grid(ctx, who)
        whole = GridSegment(torch.arange(N, device=ctx.device), rows, cols, torch.arange(N, device=ctx.device))
        return [[whole] for _ in range(B)]
    c = coords.round().long()
    out = []
    for b in range(B):
        idx = ctx.mask[b].nonzero().flatten()
        cb = c[b, idx]
        if bool((cb[:, 2:] < 0).any()):
            missing = int((cb[:, 2:] < 0).any(1).sum())
            raise MissingSignalError(f"{who} needs patch coordinates for every candidate token, and {missing} "
                                     f"of sample {b} have none (are newline tokens candidates?)")
        segs = []
        out.append(segs)
        if not len(idx):
            continue
        key = cb[:, 0] * (int(cb[:, 1].max()) + 1) + cb[:, 1]
        for k in torch.unique(key).tolist():
            sel = key == k
            y, x = cb[sel, 2], cb[sel, 3]
            y0, x0 = int(y.min()), int(x.min())
            rows, cols = int(y.max()) - y0 + 1, int(x.max()) - x0 + 1
            segs.append(GridSegment(idx[sel], rows, cols, (y - y0) * cols + (x - x0)))
    return out


def apportion(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` over parts in proportion to ``sizes`` (largest remainder; ties to the earlier part)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    quota = [k * n // total for n in sizes]
    rem = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % total), i))
    for i in rem[: k - sum(quota)]:
        quota[i] += 1
    return quota


def window_assignment(segments: list[list[GridSegment]], windows_for, N: int, device):
    """Window id and centre key of every token, for per-segment window shapes.

    ``windows_for(b, j, segment)`` gives the ``(r, c)`` windows of segment ``j`` of row ``b`` (``None``
    or ``(0, 0)`` for none). Returns long ``wid [B, N]`` (windows numbered in raster order inside each
    segment, segments in order; ``W`` for tokens in no window), long ``centre [B, N]`` (a key that orders
    a window's tokens by distance to its centre, then raster order in the segment's grid) and ``W``,
    the most windows of a row.
    """
    B = len(segments)
    wid = torch.zeros(B, N, dtype=torch.long, device=device)
    centre = torch.zeros(B, N, dtype=torch.long, device=device)
    assigned = torch.zeros(B, N, dtype=torch.bool, device=device)
    counts = []
    for b, segs in enumerate(segments):
        offset = 0
        for j, seg in enumerate(segs):
            shape = windows_for(b, j, seg)
            if not shape or shape[0] * shape[1] == 0:
                continue
            r, c = shape
            w, d = _window_ids(seg.rows, seg.cols, r, c, device)
            wid[b, seg.index] = w[seg.cell] + offset
            centre[b, seg.index] = d[seg.cell] * (seg.rows * seg.cols) + seg.cell
            assigned[b, seg.index] = True
            offset += r * c
        counts.append(offset)
    W = max(counts, default=0)
    return wid.masked_fill_(~assigned, W), centre, W


@functools.lru_cache(maxsize=256)
def pooled_shape(k: int, rows: int, cols: int) -> tuple[int, int]:
    """The pooled grid ``(r, c)`` for a budget of ``k`` tokens on a ``rows x cols`` grid.

    Rule: ``r <= rows``, ``c <= cols``, ``r·c <= k``; maximise ``r·c``, then prefer the aspect ratio
    closest to the grid's (smallest ``max(a, b) / min(a, b)`` for ``a = r·cols``, ``b = c·rows``),
    then fewer rows. E.g. 24x24 grid: k=64 -> 8x8, k=144 -> 12x12, k=192 -> 12x16, k=100 -> 10x10.
    """
    best = None
    for r in range(1, min(rows, k) + 1):
        c = min(cols, k // r)
        if c < 1:
            break
        a, b = r * cols, c * rows  # aspect mismatch max(a, b) / min(a, b), compared exactly
        key = (-r * c, Fraction(max(a, b), min(a, b)), r)
        if best is None or key < best[0]:
            best = (key, (r, c))
    return best[1]


def _window_ids(rows: int, cols: int, r: int, c: int, device):
    """long ``[N]`` window id (raster order over the ``r x c`` windows) of each token, and twice each
    token's squared distance to its window's centre (an exact integer key). Cached per layout."""
    return _window_ids_cached(rows, cols, r, c, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _window_ids_cached(rows: int, cols: int, r: int, c: int, device: str):
    """Window id and squared distance to its window's centre of every cell of a grid.

    The ``rows x cols`` grid is cut into ``r x c`` windows; distances are in doubled coordinates.
    """
    y = torch.arange(rows, device=device)
    x = torch.arange(cols, device=device)
    wy, wx = (y * r) // rows, (x * c) // cols  # partition: window i holds y with i <= y r / rows < i + 1
    ylo = -((-torch.arange(r + 1, device=device) * rows) // r)  # ceil(i rows / r)
    xlo = -((-torch.arange(c + 1, device=device) * cols) // c)
    cy = ylo[wy] + ylo[wy + 1] - 1  # twice the centre coordinate
    cx = xlo[wx] + xlo[wx + 1] - 1
    wid = (wy[:, None] * c + wx[None, :]).reshape(-1)
    dist = ((2 * y - cy)[:, None] ** 2 + (2 * x - cx)[None, :] ** 2).reshape(-1)
    return wid, dist


@selectors.register("pooling")
@dataclass(frozen=True, kw_only=True)
class Pooling(Selector):
    """2-D average pooling of the patch grid to at most the budget (a merging baseline).

    The ``rows x cols`` grid is partitioned into ``r x c`` windows of near-equal size (window ``(a, b)``
    holds the tokens with ``floor(y r / rows) = a`` and ``floor(x c / cols) = b``), with ``(r, c)``
    from :func:`pooled_shape`: the largest count ``r·c <= k``, aspect ratio closest to the grid's.
    Each window keeps one token, the valid token nearest its centre (ties: lowest index), and its
    features are replaced by the mean of the window's valid tokens (``Selection.features``).

    Parameters
    ----------
    None.

    Raises
    ------
    MissingSignalError
        No ``ctx.grid``, no ``coords`` signal and ``N`` is not a square; or a valid token without
        coordinates.

    Notes
    -----
    Several grids per sample (LLaVA-NeXT/OneVision anyres crops, Idefics3/SmolVLM tiles, several
    images), as the adapters describe them with the ``coords`` signal (:func:`grid_segments`): each
    ``(image, crop)`` is pooled as its own grid, with a share of the budget proportional to its
    tokens (largest remainder, ties to the earlier grid); kept tokens come grid by grid.

    Keeps ``r·c <= k`` tokens, which can be fewer than the budget (``exact_budget = False``), and
    fewer still when whole windows are padding. Needs no objective (an objective, if given, is
    ignored). ``O(N D)``, in one pass for the batch whatever the rows' budgets. ``gains`` hold the
    number of tokens averaged into each kept token. Mean features are computed in float32 and
    returned in the input dtype. A strong baseline (arXiv:2502.11501).

    References
    ----------
    "Token pruning in multimodal LLMs: are we solving the right problem?", arXiv:2502.11501.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 576, 8))  # a 24 x 24 grid, inferred
    >>> sel = Pooling().select(None, ctx, 64)  # 8 x 8 windows of 3 x 3 tokens
    >>> sel.indices.shape, sel.features.shape, sel.indices[0, :3].tolist()
    (torch.Size([1, 64]), torch.Size([1, 64, 8]), [25, 28, 31])
    """

    needs_objective: ClassVar[bool] = False
    exact_budget: ClassVar[bool] = False

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            segments = grid_segments(ctx, "Pooling")
            B, N = ctx.mask.shape
            shares = [apportion(int(kb), [int(ctx.mask[b, seg.index].sum()) for seg in segments[b]])
                      for b, kb in enumerate(k.tolist())]

            def windows_for(b, j, seg):
                return pooled_shape(shares[b][j], seg.rows, seg.cols) if shares[b][j] else None

            wid, centre, W = window_assignment(segments, windows_for, N, ctx.device)
            order, counts, valid, means = self._pool(ctx.features, ctx.mask, wid, centre, W)
            return from_order(order, counts, valid, features=means)

    @staticmethod
    def _pool(feats, mask, wid, centre, W):
        """Pool each row's windows: ``wid`` long ``[B, N]`` (``W`` for tokens in no window)."""
        B, N, D = feats.shape
        device = feats.device
        m = mask & (wid < W)
        mf = m.to(torch.float32)
        flat = (wid + (W + 1) * torch.arange(B, device=device)[:, None]).reshape(-1)
        xf = feats if feats.dtype == torch.float32 else feats.float()
        xf = xf if bool(m.all()) else xf * mf.unsqueeze(-1)
        sums = torch.zeros(B * (W + 1), D, dtype=torch.float32, device=device)
        sums.index_add_(0, flat, xf.reshape(B * N, D))
        counts = torch.zeros(B * (W + 1), dtype=torch.float32, device=device).index_add_(0, flat, mf.reshape(-1))
        sums, counts = sums.view(B, W + 1, D)[:, :W], counts.view(B, W + 1)[:, :W]
        means = (sums / counts.clamp_min(1.0).unsqueeze(-1)).to(feats.dtype)
        key = (centre * N + torch.arange(N, device=device)).masked_fill(~m, _BIG)
        rep = torch.full((B, W + 1), _BIG, dtype=torch.long, device=device)
        rep = rep.scatter_reduce_(1, wid, key, reduce="amin")[:, :W]
        ok = rep != _BIG
        order = torch.where(ok, rep % N, 0)
        # drop empty (all-padding) windows, keeping the rest in window order: valid must be a prefix
        perm = torch.where(ok, torch.arange(W, device=device), W + torch.arange(W, device=device)).argsort(1)
        order, counts, ok = order.gather(1, perm), counts.gather(1, perm), ok.gather(1, perm)
        means = means.gather(1, perm.unsqueeze(-1).expand(B, W, D))
        return order, counts, ok, means


@selectors.register("window_topk")
@dataclass(frozen=True, kw_only=True)
class WindowTopK(Selector):
    """Top-k by the objective's scores inside local windows of the patch grid (WindowFastV reading).

    The grid is partitioned into ``windows`` near-equal windows (as in :class:`Pooling`); the budget
    ``k`` is spread over them in proportion to their valid tokens (equal shares for equal windows;
    largest-remainder rounding, equal remainders going to the windows whose next token scores
    highest, then to the lower window, so a budget below the number of windows goes to the windows
    with the best tokens wherever they are), and each window keeps its top tokens by the objective's
    gains on the empty set (e.g. FastV's attention). Ties go to the lower index.

    Parameters
    ----------
    windows : int or (int, int)
        Windows per side ``(rows, cols)`` (an int means square); clipped to the grid size. Default 4
        (4x4 windows: 6x6 tokens each on LLaVA-1.5's 24x24 grid).

    Raises
    ------
    ParameterError
        ``windows`` not a positive int or pair.
    MissingSignalError
        No ``ctx.grid``, no ``coords`` signal and ``N`` is not a square; a valid token without
        coordinates; or the objective's signal is absent.

    Notes
    -----
    With several grids per sample (the ``coords`` signal, see :class:`Pooling`), every grid gets its
    own ``windows``, and the budget is spread over all windows of the sample the same way.

    The seed paper (arXiv:2502.11501) names WindowFastV without a retrievable definition; this is the
    usual reading (top-k inside local spatial windows, budget spread evenly), stated as such. Keeps
    exactly ``min(k, valid)`` tokens. ``O(N log N)`` per sample. ``order`` lists the kept tokens by
    decreasing score.

    References
    ----------
    FastV, arXiv:2403.06764. "Token pruning in multimodal LLMs: are we solving the right problem?",
    arXiv:2502.11501.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import Relevance
    >>> ctx = tp.make_context(torch.randn(1, 16, 4), relevance=torch.arange(16.0)[None], grid=(4, 4))
    >>> WindowTopK(windows=2).select(Relevance(), ctx, 4).indices.tolist()  # the best token of each 2 x 2 window
    [[5, 7, 13, 15]]
    """

    windows: int | tuple = 4

    def __post_init__(self):
        w = self.windows
        parts = [w] if isinstance(w, numbers.Integral) else (list(w) if isinstance(w, (tuple, list)) else None)
        if (not parts or len(parts) > 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in parts)):
            raise ParameterError(f"windows must be a positive int or a pair of positive ints, got {w!r}")
        object.__setattr__(self, "windows", int(w) if len(parts) == 1 and not isinstance(w, (tuple, list))
                           else tuple(int(v) for v in (parts * 2)[:2]))

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            w = self.windows
            wr, wc = (w, w) if isinstance(w, int) else w
            mask = ctx.mask
            B, N = mask.shape
            device = ctx.device
            segments = grid_segments(ctx, "WindowTopK")
            wid, _, W = window_assignment(segments, lambda b, j, seg: (min(wr, seg.rows), min(wc, seg.cols)),
                                          N, device)
            state = objective.prepare(ctx)
            score = objective.gains(ctx, state, mask).float()
            kk = k.to(device)
            n = mask.sum(1)
            nw = torch.zeros(B, W + 1, dtype=torch.long, device=device).scatter_add_(1, wid, mask.long())[:, :W]
            # tokens grouped by window, best first (stable sorts: ties to the lower index)
            key = score.masked_fill(~mask, float("-inf"))
            by_score = key.argsort(dim=1, descending=True, stable=True)
            wsorted = torch.where(mask, wid, W).gather(1, by_score)
            by_win = wsorted.argsort(dim=1, stable=True)
            perm = by_score.gather(1, by_win)
            wp = wsorted.gather(1, by_win)
            start = torch.cumsum(nw, 1) - nw
            # largest-remainder apportionment of k over windows, proportional to their valid tokens; equal
            # remainders go to the window whose next token (the one the extra seat would add) scores higher
            prod = kk[:, None] * nw
            quota, rem = prod // n[:, None], prod % n[:, None]
            left = kk - quota.sum(1)
            nxt = (start + quota).clamp_max(N - 1)
            nxt_score = key.gather(1, perm.gather(1, nxt)).masked_fill(quota >= nw, float("-inf"))
            by_next = (-nxt_score).argsort(dim=1, stable=True)
            seats = by_next.gather(1, (-rem).gather(1, by_next).argsort(dim=1, stable=True))
            rank = torch.empty_like(rem)
            rank.scatter_(1, seats, torch.arange(W, device=device).expand(B, W))
            quota = quota + (rank < left[:, None]).long()
            pos = torch.arange(N, device=device).expand(B, N)
            wclip = wp.clamp_max(W - 1)
            keep_sorted = (wp < W) & (pos - start.gather(1, wclip) < quota.gather(1, wclip))
            keep = torch.zeros_like(mask).scatter_(1, perm, keep_sorted)
            K = int(k.max())
            # kept tokens first, each group by decreasing score (stable sorts: ties to the lower index)
            first = (~keep.gather(1, by_score)).to(torch.uint8).argsort(dim=1, stable=True)
            order = by_score.gather(1, first)[:, :K]
            valid = torch.arange(K, device=device)[None] < kk[:, None]
            return from_order(order, score.gather(1, order), valid)
