"""Greedy loops over abstract keys, shared by the criteria's fast paths and by the selectors.

A loop here knows nothing about criteria: it receives the keys (gains) of the empty set and
callables that evaluate and commit picks. :class:`~tokenprune.selectors.Greedy` runs them on any
criterion through the criterion protocol; :class:`~tokenprune.criteria.Coverage` runs them on its
fixed-point state in its :meth:`~tokenprune.criteria.Criterion.greedy_fast_path`.

Why they live in the criteria layer: selectors sit above criteria and import them, never the
reverse. A criterion's fast path needs the loops, so the loops sit at or below the criteria layer;
putting them in ``tokenprune.selectors`` would make ``criteria`` import ``selectors`` (the cycle
``selectors.greedy`` <-> ``selectors.facility`` this module replaced).

Every loop breaks ties towards the lowest index and never picks padding, as plain greedy does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

_NEG = float("-inf")
#: Candidates re-evaluated in the first round of a lazy-greedy step (4x more per further round).
LAZY_BLOCK = 16


def rank_keys(gains: torch.Tensor) -> torch.Tensor:
    """Gains as selection keys: NaN and ``-inf`` become the lowest finite value of the dtype.

    The loops mark picked tokens and padding with ``-inf``; a candidate whose gain is ``-inf`` (a
    relevance over an empty text, a plugin's gain) or NaN must still rank above them, or a step would
    pick an already picked token again. Finite gains (and ``+inf``) are unchanged, so selections on
    finite gains are exactly those of the plain argmax; among such candidates ties go to the lowest
    index. ``O(B N)``.
    """
    low = torch.finfo(gains.dtype).min
    return torch.nan_to_num(gains, nan=low, neginf=low, posinf=float("inf"))


def reported_gains(keys: torch.Tensor) -> torch.Tensor:
    """Keys back as gains: the lowest finite value (a NaN or ``-inf`` gain, see :func:`rank_keys`) is ``-inf``."""
    return keys.masked_fill(keys == torch.finfo(keys.dtype).min, _NEG)


def use_host(ctx) -> bool:
    """Whether the single-sample NumPy paths apply: one sample, on the CPU.

    Parameters
    ----------
    ctx : TokenContext
        The tokens.

    Returns
    -------
    bool
    """
    return ctx.mask.shape[0] == 1 and ctx.device.type == "cpu"


def lazy_greedy_loop(first: torch.Tensor, evaluate: Callable, commit: Callable, mask: torch.Tensor,
                     k: torch.Tensor, block: int = LAZY_BLOCK):
    """Batched lazy greedy over stale upper bounds; exact (same picks as plain greedy, ties included).

    Parameters
    ----------
    first : torch.Tensor
        float ``[B, N]`` exact keys (gains) on the empty set.
    evaluate : callable
        ``evaluate(index long [B, M]) -> float [B, M]``: the current keys of those tokens. Keys must
        never increase as picks are committed.
    commit : callable
        ``commit(picked long [B], active bool [B])``: add the picks to ``S`` in the active rows.
    mask : torch.Tensor
        bool ``[B, N]`` valid tokens.
    k : torch.Tensor
        long ``[B]`` picks per row.
    block : int
        Tokens re-evaluated in the first round of a step (:data:`LAZY_BLOCK`).

    Returns
    -------
    order long ``[B, K]``, keys float ``[B, K]`` at each pick, valid bool ``[B, K]``.

    Notes
    -----
    ``u`` holds every token's last computed key, an upper bound of its current key. A round
    re-evaluates, in every row, the ``M`` largest bounds not yet fresh in this step (``M`` = 16, then
    4x more per extra round). A row is done when its maximum of ``u`` (first maximum: lowest index)
    is fresh: no other token can beat it or tie it with a lower index, so it is plain greedy's pick.
    One host sync per round; usually one or two rounds per step.
    """
    B, N = mask.shape
    device = mask.device
    K = int(k.max())
    u = rank_keys(first).masked_fill(~mask, _NEG)  # bounds; -inf for padding and picked tokens
    valid = torch.arange(K, device=device)[None] < k[:, None].to(device)
    all_active_upto = int(k.min())  # steps at which every row is still active
    orders, keys = [], []
    for t in range(K):
        active = valid[:, t]
        if t:
            stale = u.clone()  # -inf marks tokens fresh in this step (or picked, or padding)
            m = block
            while True:
                vals, cand = stale.topk(min(m, N), dim=1, sorted=False)
                g = rank_keys(evaluate(cand))
                g = torch.where(vals == _NEG, u.gather(1, cand), g)  # keep picked/padding at -inf
                u.scatter_(1, cand, g)
                stale.scatter_(1, cand, _NEG)
                best, pick = u.max(1)
                done = stale.gather(1, pick[:, None]).squeeze(1) == _NEG
                if t >= all_active_upto:
                    done = done | ~active
                if m >= N or bool(done.all()):
                    break
                m *= 4
        else:
            best, pick = u.max(1)
        u.scatter_(1, pick[:, None], _NEG)
        orders.append(pick)
        keys.append(reported_gains(best))
        commit(pick, active)
    return torch.stack(orders, 1), torch.stack(keys, 1), valid


def dense_greedy_loop(first: torch.Tensor, keys_fn: Callable, commit: Callable, mask: torch.Tensor,
                      k: torch.Tensor):
    """Batched plain greedy that recomputes every key at each step.

    Parameters
    ----------
    first : torch.Tensor
        float ``[B, N]`` keys on the empty set.
    keys_fn : callable
        ``keys_fn() -> float [B, N]``: every token's key for the current ``S``.
    commit : callable
        ``commit(picked long [B], active bool [B])``: add the picks to ``S`` in the active rows.
    mask : torch.Tensor
        bool ``[B, N]`` valid tokens.
    k : torch.Tensor
        long ``[B]`` picks per row.

    Returns
    -------
    order long ``[B, K]``, keys float ``[B, K]`` at each pick, valid bool ``[B, K]``.
    """
    B, N = mask.shape
    K = int(k.max())
    valid = torch.arange(K, device=mask.device)[None] < k[:, None].to(mask.device)
    taken = ~mask
    orders, keys = [], []
    for t in range(K):
        g = rank_keys(first if t == 0 else keys_fn())
        best, pick = g.masked_fill(taken, _NEG).max(1)
        taken = taken.scatter(1, pick[:, None], True)
        orders.append(pick)
        keys.append(reported_gains(best))
        commit(pick, valid[:, t])
    return torch.stack(orders, 1), torch.stack(keys, 1), valid


def lazy_facility_location(fq: np.ndarray, first: np.ndarray, valid: np.ndarray, k: int, block: int = 32):
    """Exact lazy greedy for fixed-point facility location on one sample, evaluating blocks of tokens.

    For one sample on the CPU a greedy step touches only ``O(N)`` numbers, so its cost is the
    per-call overhead of the array library (about 3 µs per torch op against 0.5-1 µs per NumPy
    call); this loop runs the arithmetic of the batched torch path on zero-copy NumPy views and
    gives the same picks and keys.

    Parameters
    ----------
    fq : numpy.ndarray
        int16 ``[N, N]`` fixed-point similarity (row ``i`` covers column ``j`` with ``fq[i, j]``).
    first : numpy.ndarray
        float32 ``[N]`` keys on the empty set (``float32`` of the integer gains).
    valid : numpy.ndarray
        bool ``[N]`` valid tokens.
    k : int
        Picks.
    block : int
        Tokens evaluated in the first round of a step (then 4x more per extra round).

    Returns
    -------
    order int64 ``[k]``, keys float32 ``[k]`` (float32 of the exact integer gain at each pick).

    Notes
    -----
    ``u`` holds each token's last computed key (an upper bound of its current key: facility location
    is submodular and float32 rounding is monotone). A round evaluates the ``M`` largest bounds not
    yet fresh in this step, ``O(M N)`` in three vectorised passes (gather, ``max(F, m)``, row sums;
    ``Σ_j max(0, F_ij - m_j) = Σ_j max(F_ij, m_j) - Σ_j m_j``). The step ends when the maximum of
    ``u`` (lowest index among ties) is fresh: no other token can beat or tie it with a lower index,
    so this is exactly plain greedy's pick.
    """
    n = fq.shape[0]
    m = np.zeros(n, dtype=fq.dtype)
    msum = np.int32(0)
    u = np.where(valid, first, -np.inf).astype(np.float32)
    order = np.empty(k, dtype=np.int64)
    keys = np.empty(k, dtype=np.float32)
    neg = np.float32(-np.inf)
    remaining = int(valid.sum())
    for t in range(k):
        if t:
            stale = u.copy()
            mb = block
            while True:
                if mb < remaining:
                    cand = np.argpartition(stale, n - mb)[n - mb:]
                    cand = cand[stale[cand] > neg]  # drop picked, padding and already fresh tokens
                else:
                    cand = np.flatnonzero(stale > neg)
                rows = fq[cand]
                np.maximum(rows, m, out=rows)
                u[cand] = rows.sum(1, dtype=np.int32) - msum  # int32 -> float32: the same rounding as torch
                stale[cand] = neg
                i = int(u.argmax())
                if stale[i] == neg:  # fresh
                    break
                mb *= 4
        else:
            i = int(u.argmax())
        order[t] = i
        keys[t] = u[i]
        u[i] = neg
        remaining -= 1
        np.maximum(m, fq[i], out=m)
        msum = m.sum(dtype=np.int32)
    return order, keys
