"""Single-sample CPU loops in NumPy for the step-heavy selectors.

For one sample on the CPU, a greedy step touches only ``O(N)`` numbers, so the cost of a step is
the per-call overhead of the array library (about 3 µs per torch op against 0.5-1 µs per NumPy
call). These loops run the same arithmetic as the batched torch paths on zero-copy NumPy views, and
give the same picks and gains (tests compare them). They are used when ``B == 1`` on the CPU; larger
batches and GPUs use the batched torch code (no Python loop over samples anywhere).
"""

from __future__ import annotations

import numpy as np

TINY = np.float32(1e-30)


def use_host(ctx) -> bool:
    """Whether the NumPy single-sample path applies (one sample, on the CPU)."""
    return ctx.mask.shape[0] == 1 and ctx.device.type == "cpu"


def lazy_facility_location(fq: np.ndarray, first: np.ndarray, valid: np.ndarray, k: int, block: int = 32):
    """Exact lazy greedy for fixed-point facility location on one sample, evaluating blocks of tokens.

    Parameters
    ----------
    fq : int16 ``[N, N]`` fixed-point similarity (row ``i`` covers column ``j`` with ``fq[i, j]``).
    first : float32 ``[N]`` keys on the empty set (``float32`` of the integer gains).
    valid : bool ``[N]``.
    k : picks.
    block : tokens evaluated in the first round of a step (then 4x more per extra round).

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


def dpp_greedy(F: np.ndarray, q: np.ndarray | None, diag: np.ndarray, valid: np.ndarray, k: int,
               shifted: bool):
    """Fast greedy DPP MAP (Chen et al. 2018) on one sample; see :class:`~tokenprune.selectors.DPPMap`.

    ``F`` float32 ``[N, N]`` similarity, ``q`` float32 ``[N]`` quality or ``None``, ``diag`` float32
    ``[N]`` kernel diagonal (with ``ε``). Returns order int64 ``[k]`` and Schur complements
    ``d_j²`` float32 ``[k]`` at each pick.
    """
    n = F.shape[0]
    d2 = np.where(valid, diag, -np.inf).astype(np.float32)
    C = np.zeros((k, n), dtype=np.float32)
    vf = valid.astype(np.float32)
    order = np.empty(k, dtype=np.int64)
    best = np.empty(k, dtype=np.float32)
    e2 = np.empty(n, dtype=np.float32)
    for t in range(k):
        j = int(d2.argmax())
        dj = d2[j]
        order[t] = j
        best[t] = dj
        if t == k - 1:
            break
        e = C[t]
        if shifted:
            np.add(F[j], 1.0, out=e)
            e *= 0.5
            e *= vf
        else:
            e[:] = F[j]
        if q is not None:
            e *= q[j] * q
        if t:
            e -= C[:t, j] @ C[:t]
        e /= np.sqrt(max(dj, TINY))
        np.multiply(e, e, out=e2)
        d2 -= e2
        d2[j] = -np.inf
    return order, best


def max_min(F: np.ndarray, nn: np.ndarray, valid: np.ndarray, k: int):
    """DivPrune's max-min greedy on one sample with a running maximum similarity.

    ``nn`` float32 ``[N]``: each token's largest similarity to another valid token (already clipped
    and set to +inf at padding). Returns order int64 ``[k]`` and the similarity of each pick to the
    set before it (``nn`` for the first) float32 ``[k]``.
    """
    order = np.empty(k, dtype=np.int64)
    sims = np.empty(k, dtype=np.float32)
    j = int(nn.argmin())
    order[0], sims[0] = j, nn[j]
    ms = np.where(valid, F[j], np.inf).astype(np.float32)
    ms[j] = np.inf
    for t in range(1, k):
        j = int(ms.argmin())
        order[t], sims[t] = j, ms[j]
        np.maximum(ms, F[j], out=ms)
        ms[j] = np.inf
    return order, sims
