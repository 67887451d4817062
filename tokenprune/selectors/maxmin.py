"""Max-min diversity selection (DivPrune)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..criteria._kernels import gather_row
from ..criteria.diversity import Diversity
from ..registry import selectors
from ..selection import from_order
from ._host import max_min, use_host
from .base import Selector

_INF = float("inf")


@selectors.register("max_min")
@dataclass(frozen=True, kw_only=True)
class MaxMin(Selector):
    """DivPrune's max-min diversity greedy over cosine distances ``D = 1 - F``.

    First the token farthest from its nearest neighbour, ``argmax_i min_{j≠i} D_ij``; then repeatedly
    the token whose distance to the kept set, ``min_{s∈S} D_is``, is largest. Ties go to the lowest
    index.

    Parameters
    ----------
    None. The objective is optional: ``None`` or a :class:`~tokenprune.criteria.Diversity` (whose
    greedy this is, up to the first pick and the clipping of negative similarities); it is not read.

    Raises
    ------
    IncompatibleComponentsError
        An objective that is not a :class:`~tokenprune.criteria.Diversity`.

    Notes
    -----
    DivPrune's reference recomputes ``min_{s∈S} D_is`` from the ``|S|`` kept rows at every step
    (``O(K² N)``); this keeps a running minimum (the running maximum similarity), ``O(K N)`` after the
    ``O(N² D)`` GEMM plus one ``O(N²)`` pass for the first pick. ``gains`` hold the distance of each
    pick to the set before it (its nearest-neighbour distance for the first pick; 2 for a sample
    with a single token).

    Numerics. With the context's default ``compute_dtype="float32"`` the similarities and the
    comparisons are float32 (see :class:`~tokenprune.methods.compose.Stage` for why). With
    ``compute_dtype="model"`` the selection runs DivPrune's arithmetic in the features' own dtype
    (fp16 in its released scripts), op for op: ``x / x.norm()``, one ``torch.mm`` per sample,
    ``D = 1 - F``, the first pick by the second-smallest entry of each column of ``D`` (``topk``,
    diagonal included, as the reference does), then the running column minimum over the kept rows and
    ``argmax`` (first index among ties). The rounding to fp16 merges near values into ties, and ties go
    to the lowest index as in the reference, so on the same device the picks are those of the released
    scripts bit for bit. One intentional difference remains: a kept token is never picked again (the
    reference does not exclude kept tokens, so a sample made only of exact duplicates could repeat an
    index there).

    Checked against vbdi/divprune at commit ``799e2d950aa01ba7860907f5a6d86061f885dca6``
    (``LLaVA/llava/model/llava_arch.py``, ``DivPrune``): identical kept sets in float32 and, with
    ``compute_dtype="model"``, on fp16 features.

    References
    ----------
    DivPrune: diversity-based visual token pruning, CVPR 2025, arXiv:2503.02175. Max-min diversity:
    Ravi, Rosenkrantz & Tayi 1994 (farthest-point greedy).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    >>> MaxMin().select(None, tp.make_context(x), 2).order.tolist()  # 3: farthest from its neighbour; 0: from 3
    [[3, 0]]
    """

    needs_objective: ClassVar[bool] = False
    objective_types: ClassVar[tuple] = (Diversity,)

    def _select(self, objective, ctx, k):
        if ctx.compute_dtype == "model":
            return _max_min_model_dtype(ctx, k)
        with torch.no_grad():
            F = ctx.similarity
            mask = ctx.mask
            B, N = mask.shape
            K = int(k.max())
            valid = torch.arange(K, device=ctx.device)[None] < k[:, None].to(ctx.device)
            nn = _nearest_similarity(F, mask)  # [B, N]: max_{j valid, j != i} F_ij
            nn = nn.clamp_min(-1.0).masked_fill(~mask, _INF)
            if use_host(ctx):
                o, sims = max_min(F[0].detach().numpy(), nn[0].detach().numpy(), mask[0].numpy(), K)
                return from_order(torch.from_numpy(o)[None], 1.0 - torch.from_numpy(sims)[None], valid)
            val, j = nn.min(1)
            orders, sims = [j], [val]
            ms = gather_row(F, j).masked_fill(~mask, _INF)  # running max similarity to S
            ms.scatter_(1, j[:, None], _INF)
            for _ in range(1, K):
                val, j = ms.min(1)
                orders.append(j)
                sims.append(val)
                torch.maximum(ms, gather_row(F, j), out=ms)
                ms.scatter_(1, j[:, None], _INF)
            gains = 1.0 - torch.stack(sims, 1)
            return from_order(torch.stack(orders, 1), gains, valid)


def _max_min_model_dtype(ctx, k: torch.Tensor):
    """DivPrune's reference arithmetic in the features' dtype, one sample at a time (see :class:`MaxMin`).

    ``D = 1 - F`` with ``F`` the similarity computed in that dtype (``ctx.similarity`` holds its exact
    values as float32); the first pick maximises the second-smallest entry of its column of ``D``,
    the next ones the running minimum of their column over the kept rows. ``O(N²)`` for the first
    pick, ``O(N)`` per later one. Returns a :class:`~tokenprune.selection.Selection` whose gains are
    the distances (as float32).
    """
    with torch.no_grad():
        dtype = ctx.features.dtype
        B, N = ctx.mask.shape
        K = int(k.max())
        valid = torch.arange(K, device=ctx.device)[None] < k[:, None].to(ctx.device)
        orders = torch.zeros(B, K, dtype=torch.long, device=ctx.device)
        gains = torch.zeros(B, K, dtype=torch.float32, device=ctx.device)
        for b in range(B):
            idx = ctx.mask[b].nonzero().flatten()
            n, kb = idx.numel(), int(k[b])
            D = 1.0 - ctx.similarity[b].to(dtype)[idx][:, idx]  # [n, n] in the features' dtype
            if n == 1:
                orders[b, 0], gains[b, 0] = idx[0], 2.0
                continue
            scores = torch.topk(D, 2, dim=0, largest=False).values[1, :]  # second smallest of each column
            picked = torch.zeros(n, dtype=torch.bool, device=ctx.device)
            running, j = None, -1
            for t in range(kb):
                if t:  # the running column minimum over the kept rows (exact in any dtype)
                    running = D[j] if running is None else torch.minimum(running, D[j])
                    scores = running.masked_fill(picked, float("-inf"))
                j = int(torch.argmax(scores))
                orders[b, t], gains[b, t] = idx[j], scores[j].float()
                picked[j] = True
        return from_order(orders, gains, valid)


def _nearest_similarity(F: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, N]``: each token's largest similarity to another valid token (``-inf`` if none)."""
    if bool(mask.all()):
        # mask the diagonal in place (then restore it bit for bit) instead of copying N² entries
        diag = F.diagonal(dim1=1, dim2=2)
        saved = diag.clone()
        try:
            diag.fill_(-_INF)
            return F.amax(-1)
        finally:
            diag.copy_(saved)
    eye = torch.eye(F.shape[1], dtype=torch.bool, device=F.device)
    return F.masked_fill(eye | ~mask[:, None, :], -_INF).amax(-1)
