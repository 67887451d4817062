"""Fast greedy MAP inference for determinantal point processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..criteria.diversity import TINY, LogDet, log_gain
from ..errors import ParameterError
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
    per_crop : bool
        ``False`` (default): one selection over each sample's tokens. ``True``: one selection per
        ``(image, crop)`` of the ``coords`` signal (LLaVA-NeXT's anyres crops and base image, tiles),
        the budget split evenly over them (the remainder to the first ones; a crop with fewer tokens
        than its share keeps them all and the rest goes to the others), as CDPruner's code selects
        ``visual_token_num`` tokens in every crop. The quality ``q`` is still normalised over the
        sample's tokens, all crops together, as in that code. Without ``coords`` (plain tensors) or
        with one crop it is the same as ``False``.

    Raises
    ------
    IncompatibleComponentsError
        The objective is not a :class:`~tokenprune.criteria.LogDet`.
    ParameterError
        A ``per_crop`` that is not a bool.

    Notes
    -----
    ``O(K² N)`` after the similarity GEMM, ``O(K N)`` memory; the kernel matrix is never built (its
    rows are the similarity rows scaled by the quality). Picks the same tokens as ``Greedy()`` on the
    same ``LogDet`` (up to float ties); unlike the usual implementations it always returns exactly
    ``k`` tokens (the ``εI`` regulariser keeps the Schur complements positive once the kernel's rank
    is exhausted) and it is batched over samples with padding masks. ``gains`` are the log-det gains
    ``log d_j²``; their running sum is ``log det(L_S)``. With ``per_crop`` each crop runs the same
    recursion on its own rows and columns of the kernel (on the host, in NumPy), ``O(Σ_c K_c² N_c)``;
    the picks are listed crop by crop in ``order``.

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
    per_crop: bool = False

    def __post_init__(self):
        if not isinstance(self.per_crop, bool):
            raise ParameterError(f"per_crop must be a bool, got {self.per_crop!r}")

    def _select(self, objective: LogDet, ctx, k):
        if self.per_crop:
            groups = _crop_groups(ctx)
            if groups is not None:
                return _select_per_group(objective, ctx, k, groups)
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


def _crop_groups(ctx):
    """Per sample, the valid tokens of each ``(image, crop)`` of the ``coords`` signal (long index
    tensors, in ``(image, crop)`` order, unknown coordinates last); ``None`` when there is no ``coords``
    signal or every sample has a single crop."""
    coords = ctx.get_signal("coords")
    if coords is None:
        return None
    key = coords[..., :2].round().long().cpu()
    mask = ctx.mask.cpu()
    out, several = [], False
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero().flatten()
        kb = key[b, idx]
        unknown = (kb < 0).any(1)
        crops = torch.unique(kb[~unknown], dim=0) if bool((~unknown).any()) else kb[:0]
        groups = [idx[~unknown & (kb == c).all(1)] for c in crops]
        if bool(unknown.any()):
            groups.append(idx[unknown])
        several |= len(groups) > 1
        out.append(groups)
    return out if several else None


def equal_shares(sizes: list, k: int) -> list:
    """``k`` tokens over groups of ``sizes`` tokens: equal shares (the remainder to the first groups),
    capped at each group's size, what a full group cannot take shared again among the others.

    >>> equal_shares([576, 576, 576], 64), equal_shares([576, 10, 576], 64)
    ([22, 21, 21], [28, 10, 26])
    """
    alloc, left = [0] * len(sizes), int(k)
    while left > 0:
        room = [g for g in range(len(sizes)) if alloc[g] < sizes[g]]
        if not room:
            break
        share, extra = divmod(left, len(room))
        for rank, g in enumerate(room):
            add = min(share + (1 if rank < extra else 0), sizes[g] - alloc[g])
            alloc[g] += add
            left -= add
    return alloc


def _select_per_group(objective: LogDet, ctx, k: torch.Tensor, groups: list):
    """Fast greedy MAP in each group of each sample (NumPy, on the host), with the quality normalised
    over the whole sample; the picks crop by crop."""
    with torch.no_grad():
        q = objective.quality_scores(ctx)
        diag = objective.kernel_diagonal(ctx, q).cpu().numpy()
        F = ctx.similarity.cpu()
        qn = None if q is None else q.cpu().numpy()
        shifted = objective.kernel == "shifted"
        B = ctx.mask.shape[0]
        K = int(k.max())
        order = torch.zeros(B, K, dtype=torch.long)
        best = torch.ones(B, K, dtype=torch.float32)
        for b in range(B):
            alloc = equal_shares([len(g) for g in groups[b]], int(k[b]))
            t = 0
            for g, kg in zip(groups[b], alloc):
                if kg == 0:
                    continue
                sub = F[b][g][:, g].numpy()
                o, d2 = dpp_greedy(sub, None if qn is None else qn[b, g.numpy()], diag[b, g.numpy()],
                                   np.ones(len(g), dtype=bool), kg, shifted)
                order[b, t:t + kg] = g[torch.from_numpy(o)]
                best[b, t:t + kg] = torch.from_numpy(d2)
                t += kg
        valid = torch.arange(K)[None] < k.cpu()[:, None]
        return from_order(order, log_gain(best), valid).to(ctx.device)
