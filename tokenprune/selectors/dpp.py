"""Fast greedy MAP inference for determinantal point processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..criteria.diversity import TINY, LogDet, log_gain
from ..registry import selectors
from ..selection import from_order
from ._host import dpp_greedy, use_host
from .base import Selector

_NEG = float("-inf")


@selectors.register("dpp_map")
@dataclass(frozen=True, kw_only=True)
class DPPMap(Selector):
    """Greedy MAP inference for a DPP with incremental Cholesky updates (Chen, Zhang & Zhou 2018).

    Greedily maximises ``log det(L_S)`` for the kernel of a :class:`~tokenprune.criteria.LogDet`
    objective. With ``d_i²`` the Schur complement of token ``i`` given ``S`` (its gain is
    ``log d_i²``) and ``c_i`` its Cholesky column, each step picks ``j = argmax d_i²`` and updates

    .. math:: e_i = \\frac{L_{ji} - \\langle c_j, c_i \\rangle}{d_j}, \\qquad c_i \\leftarrow [c_i, e_i], \\qquad
              d_i^2 \\leftarrow d_i^2 - e_i^2 .

    Parameters
    ----------
    None.

    Raises
    ------
    IncompatibleComponentsError
        The objective is not a :class:`~tokenprune.criteria.LogDet`.

    Notes
    -----
    ``O(K² N)`` after the similarity GEMM, ``O(K N)`` memory; the kernel matrix is never built (its
    rows are the similarity rows scaled by the quality). Picks the same tokens as ``Greedy()`` on the
    same ``LogDet`` (up to float ties); unlike the usual implementations it always returns exactly
    ``k`` tokens (the ``εI`` regulariser keeps the Schur complements positive once the kernel's rank
    is exhausted) and it is batched over samples with padding masks. ``gains`` are the log-det gains
    ``log d_j²``; their running sum is ``log det(L_S)``.

    References
    ----------
    Chen, Zhang & Zhou, "Fast greedy MAP inference for determinantal point process to improve
    recommendation diversity", NeurIPS 2018, arXiv:1709.05135. CDPruner, arXiv:2506.10967.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import LogDet
    >>> ctx = tp.make_context(torch.randn(2, 16, 8))
    >>> sel = DPPMap().select(LogDet(), ctx, 3)
    >>> sel.indices.shape, bool((sel.gains <= 1e-5).all())  # log-det gains of unit-diagonal kernels are <= 0
    (torch.Size([2, 3]), True)
    """

    objective_types: ClassVar[tuple] = (LogDet,)

    def _select(self, objective: LogDet, ctx, k):
        with torch.no_grad():
            B, N = ctx.mask.shape
            device = ctx.device
            K = int(k.max())
            q = objective.quality_scores(ctx)
            diag = objective.kernel_diagonal(ctx, q)
            if use_host(ctx):
                K = int(k[0])
                o, b = dpp_greedy(ctx.similarity[0].detach().numpy(), None if q is None else q[0].detach().numpy(),
                                  diag[0].detach().numpy(), ctx.mask[0].numpy(), K, objective.kernel == "shifted")
                return from_order(torch.from_numpy(o)[None], log_gain(torch.from_numpy(b)[None]),
                                  torch.ones(1, K, dtype=torch.bool))
            d2 = diag.masked_fill(~ctx.mask, _NEG)
            C = torch.zeros(B, K, N, dtype=torch.float32, device=device)
            valid = torch.arange(K, device=device)[None] < k[:, None].to(device)
            orders, best = [], []
            for t in range(K):
                dj, j = d2.max(1)  # first maximum: lowest index among ties
                orders.append(j)
                best.append(dj)
                if t == K - 1:
                    break
                lrow = objective.kernel_rows(ctx, q, j)
                if t:
                    Ct = C[:, :t]
                    cj = Ct.gather(2, j.view(B, 1, 1).expand(B, t, 1))
                    lrow = torch.baddbmm(lrow.unsqueeze(1), cj.transpose(1, 2), Ct, alpha=-1.0).squeeze(1)
                e = lrow.div_(dj.clamp_min(TINY).sqrt_().unsqueeze(1))
                C[:, t] = e
                d2.addcmul_(e, e, value=-1.0)
                d2.scatter_(1, j.unsqueeze(1), _NEG)
            gains = log_gain(torch.stack(best, 1))
            return from_order(torch.stack(orders, 1), gains, valid)
