"""Single-sample CPU loops in NumPy for the step-heavy selectors.

For one sample on the CPU, a greedy step touches only ``O(N)`` numbers, so the cost of a step is
the per-call overhead of the array library (about 3 µs per torch op against 0.5-1 µs per NumPy
call). These loops run the same arithmetic as the batched torch paths on zero-copy NumPy views, and
give the same picks and gains (tests compare them). They are used when ``B == 1`` on the CPU
(:func:`use_host`); larger batches and GPUs use the batched torch code (no Python loop over samples
anywhere). Facility location's loop, which :class:`~tokenprune.criteria.Coverage`'s greedy fast path
runs, lives with the other shared greedy loops in :mod:`tokenprune.criteria._loops`.
"""

from __future__ import annotations

import numpy as np

from ..criteria._loops import use_host

__all__ = ["use_host", "dpp_greedy", "max_min"]

TINY = np.float32(1e-30)


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
