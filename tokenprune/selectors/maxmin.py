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
