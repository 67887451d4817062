"""Selectors that use the 2-D patch grid: average pooling and windowed top-k."""

from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MissingSignalError
from ..registry import selectors
from ..selection import from_order
from .base import Selector

_BIG = torch.iinfo(torch.long).max


def resolve_grid(ctx, who: str) -> tuple[int, int]:
    """``ctx.grid``, or ``(r, r)`` when ``N = r²``; else :class:`MissingSignalError`."""
    if ctx.grid is not None:
        return tuple(ctx.grid)
    n = ctx.num_tokens
    r = math.isqrt(n)
    if r * r == n:
        return (r, r)
    raise MissingSignalError(f"{who} needs ctx.grid, the (rows, cols) patch grid; it was not given and "
                             f"N = {n} tokens is not a square, so it cannot be inferred")


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
        No ``ctx.grid`` and ``N`` is not a square.

    Notes
    -----
    Keeps ``r·c <= k`` tokens, which can be fewer than the budget (``exact_budget = False``), and
    fewer still when whole windows are padding. Needs no objective (an objective, if given, is
    ignored). ``O(N D)``. ``gains`` hold the number of tokens averaged into each kept token. Rows
    with different budgets are pooled group by group (one pass per distinct budget). Mean features
    are computed in float32 and returned in the input dtype. A strong baseline (arXiv:2502.11501).

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
            rows, cols = resolve_grid(ctx, "Pooling")
            B, N = ctx.mask.shape
            D = ctx.features.shape[-1]
            device = ctx.device
            feats = ctx.features
            ks = sorted(set(k.tolist()))
            if len(ks) == 1:  # one budget for all rows (the usual case): no regrouping
                o, g, v, f = self._pool(feats, ctx.mask, ks[0], rows, cols)
                return from_order(o, g, v, features=f)
            parts = {}
            for kv in ks:
                sel = (k == kv).nonzero().squeeze(1).to(device)
                parts[kv] = (sel, self._pool(feats.index_select(0, sel), ctx.mask.index_select(0, sel),
                                             kv, rows, cols))
            Kout = max(p[1][0].shape[1] for p in parts.values())
            order = torch.full((B, Kout), -1, dtype=torch.long, device=device)
            gains = torch.zeros(B, Kout, dtype=torch.float32, device=device)
            valid = torch.zeros(B, Kout, dtype=torch.bool, device=device)
            out = torch.zeros(B, Kout, D, dtype=feats.dtype, device=device)
            for sel, (o, g, v, f) in parts.values():
                w = o.shape[1]
                order[sel, :w], gains[sel, :w], valid[sel, :w], out[sel, :w] = o, g, v, f
            return from_order(order, gains, valid, features=out)

    @staticmethod
    def _pool(feats, mask, kv, rows, cols):
        B, N, D = feats.shape
        device = feats.device
        r, c = pooled_shape(kv, rows, cols)
        W = r * c
        wid, dist = _window_ids(rows, cols, r, c, device)
        m = mask.to(torch.float32)
        sums = torch.zeros(B, W, D, dtype=torch.float32, device=device)
        xf = feats if feats.dtype == torch.float32 else feats.float()
        sums.index_add_(1, wid, xf if bool(mask.all()) else xf * m.unsqueeze(-1))
        counts = torch.zeros(B, W, dtype=torch.float32, device=device).index_add_(1, wid, m)
        means = (sums / counts.clamp_min(1.0).unsqueeze(-1)).to(feats.dtype)
        key = (dist * N + torch.arange(N, device=device)).expand(B, N).masked_fill(~mask, _BIG)
        rep = torch.full((B, W), _BIG, dtype=torch.long, device=device)
        rep.scatter_reduce_(1, wid.expand(B, N), key, reduce="amin")
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
    largest-remainder rounding, ties to the lower window), and each window keeps its top tokens by
    the objective's gains on the empty set (e.g. FastV's attention). Ties go to the lower index.

    Parameters
    ----------
    windows : int or (int, int)
        Windows per side ``(rows, cols)`` (an int means square); clipped to the grid size. Default 4
        (4x4 windows: 6x6 tokens each on LLaVA-1.5's 24x24 grid).

    Raises
    ------
    ValueError
        ``windows`` not a positive int or pair.
    MissingSignalError
        No ``ctx.grid`` and ``N`` is not a square, or the objective's signal is absent.

    Notes
    -----
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
            raise ValueError(f"windows must be a positive int or a pair of positive ints, got {w!r}")
        object.__setattr__(self, "windows", int(w) if len(parts) == 1 and not isinstance(w, (tuple, list))
                           else tuple(int(v) for v in (parts * 2)[:2]))

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            rows, cols = resolve_grid(ctx, "WindowTopK")
            w = self.windows
            wr, wc = (w, w) if isinstance(w, int) else w
            r, c = min(wr, rows), min(wc, cols)
            W = r * c
            mask = ctx.mask
            B, N = mask.shape
            device = ctx.device
            state = objective.prepare(ctx)
            score = objective.gains(ctx, state, mask).float()
            wid, _ = _window_ids(rows, cols, r, c, device)
            kk = k.to(device)
            n = mask.sum(1)
            nw = torch.zeros(B, W, dtype=torch.long, device=device).index_add_(1, wid, mask.long())
            # largest-remainder apportionment of k over windows, proportional to their valid tokens
            prod = kk[:, None] * nw
            quota, rem = prod // n[:, None], prod % n[:, None]
            left = kk - quota.sum(1)
            rank = torch.empty_like(rem)
            rank.scatter_(1, (-rem).argsort(dim=1, stable=True), torch.arange(W, device=device).expand(B, W))
            quota = quota + (rank < left[:, None]).long()
            # rank of each token inside its window by decreasing score (stable: lower index first)
            key = score.masked_fill(~mask, float("-inf"))
            by_score = key.argsort(dim=1, descending=True, stable=True)
            wsorted = torch.where(mask, wid, W).gather(1, by_score)
            by_win = wsorted.argsort(dim=1, stable=True)
            perm = by_score.gather(1, by_win)  # tokens grouped by window, best first
            wp = wsorted.gather(1, by_win)
            start = torch.cumsum(nw, 1) - nw
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
