"""Information coverage: the facility-location function over cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import criteria
from ..selection import Selection, from_order
from ._kernels import as_float_gains, coverage_sums, coverage_sums_at, fixed_point_similarity, gather_row
from ._loops import dense_greedy_loop, lazy_facility_location, lazy_greedy_loop, use_host
from .base import Criterion, Tags


@criteria.register("coverage", aliases=("facility_location",))
@dataclass(frozen=True, kw_only=True)
class Coverage(Criterion):
    """Facility-location coverage of the visual tokens by the kept set.

    .. math:: f(S) = \\sum_{j \\in V} m_j(S), \\quad m_j(S) = \\max\\big(0, \\max_{s \\in S} F_{sj}\\big),
              \\qquad \\Delta(i \\mid S) = \\sum_{j \\in V} \\max\\big(0, F_{ij} - m_j(S)\\big)

    with ``F`` the cosine similarity of the visual tokens (``m = 0`` for ``S = {}``; padding tokens
    are neither covered nor covering).

    This is also TOPS's coverage term ``c_i(U) = Σ_{j∈U} max(0, F_ij − m_j)``: for ``j ∈ S``,
    ``m_j ≥ F_jj = 1 ≥ F_ij``, so summing over ``U = V \\ S`` or over ``V`` gives the same gain.

    Parameters
    ----------
    None. (Registered as ``"coverage"`` and ``"facility_location"``.)

    Notes
    -----
    Monotone submodular (Nemhauser et al. 1978): greedy is a ``(1 - 1/e)`` approximation and lazy
    greedy is exact. All gains cost ``O(N²)`` per sample and step (``O(K N²)`` per plain greedy
    selection), after the ``O(N² D)`` similarity GEMM; :meth:`gains_at` evaluates ``M`` tokens in
    ``O(M N)``, which lazy greedy uses. Lazy greedy on this criterion runs
    :func:`facility_location_greedy` (through :meth:`greedy_fast_path`), as does
    :class:`~tokenprune.selectors.FacilityLocationGreedy`. Subclasses inherit that fast path; one
    that changes the gains must override :meth:`greedy_fast_path` to return ``None``.

    Sums are computed in fixed point (similarities rounded to multiples of ``2^-15 ≈ 3e-5``, below
    the error of bf16 features; see :mod:`tokenprune.criteria._kernels`), so gains are exact:
    ``gains == evaluate(S ∪ {i}) - evaluate(S)`` up to the final float32 rounding, and plain, lazy
    and specialised greedy pick the same tokens, ties included. Gains are returned as float32 (a
    monotone rounding of the integers).

    References
    ----------
    TOPS, arXiv:2606.27161 (information coverage). Nemhauser, Wolsey & Fisher, "An analysis of
    approximations for maximizing submodular set functions", Math. Programming 1978. Minoux,
    "Accelerated greedy algorithms", 1978 (lazy greedy).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 16, 8))
    >>> c = tp.criteria.Coverage()
    >>> c.gains(ctx, c.prepare(ctx), ctx.mask).shape
    torch.Size([1, 16])
    """

    tags: ClassVar[Tags] = Tags(monotone=True, submodular=True)

    def prepare(self, ctx):
        fq, scale = fixed_point_similarity(ctx)
        return {"fq": fq, "scale": scale, "m": torch.zeros(ctx.mask.shape, dtype=torch.int16, device=ctx.device)}

    def gains(self, ctx, state, candidates):
        return as_float_gains(coverage_sums(state["fq"], state["m"]), state["scale"])

    def gains_at(self, ctx, state, index, candidates=None):
        return as_float_gains(coverage_sums_at(state["fq"], index, state["m"]), state["scale"])

    def update(self, ctx, state, picked, active):
        new = torch.maximum(state["m"], gather_row(state["fq"], picked))
        return {**state, "m": torch.where(active[:, None], new, state["m"])}

    def greedy_fast_path(self, ctx, k, *, lazy):
        """Lazy greedy runs :func:`facility_location_greedy`; plain greedy the generic loop (``None``).

        See :meth:`Criterion.greedy_fast_path`. Same picks, order and gains as lazy greedy through
        :meth:`gains_at` and :meth:`update`, without the protocol's overhead.
        """
        return facility_location_greedy(ctx, k, lazy=True) if lazy else None

    def evaluate(self, ctx, subset):
        fq, scale = fixed_point_similarity(ctx)
        s = subset & ctx.mask
        best = fq.masked_fill(~s.unsqueeze(-1), 0).amax(1)  # [B, N]: max(0, max_{s∈S} Fq_sj)
        total = (best.to(torch.int64) * ctx.mask).sum(1)
        return (total.to(torch.float64) / scale).to(torch.float32)


def facility_location_greedy(ctx, k: torch.Tensor, *, lazy: bool = True) -> Selection:
    """Exact greedy on :class:`Coverage` over its fixed-point state, without the criterion protocol.

    Same picks, order and gains as plain greedy on ``Coverage()`` (ties included). The kept-set state
    is one int16 vector ``m`` updated in place, and candidate gains are read from the fixed-point
    similarity rows (keys are the integer sums in float32, divided by the scale at the end, a power
    of two, so exactly the float32 gains of :meth:`Coverage.gains`).

    Parameters
    ----------
    ctx : TokenContext
        The tokens.
    k : torch.Tensor
        long ``[B]`` picks per row (``1 <= k[b] <= valid_b``).
    lazy : bool
        ``True``: lazy greedy (:func:`~tokenprune.criteria._loops.lazy_greedy_loop`, or its NumPy
        version for one sample on the CPU). ``False``: recompute every gain at each step.

    Returns
    -------
    Selection
    """
    with torch.no_grad():
        fq, scale = fixed_point_similarity(ctx)
        B, N = ctx.mask.shape
        m = torch.zeros(B, N, dtype=torch.int16, device=ctx.device)
        first = coverage_sums(fq, m).to(torch.float32)

        def evaluate(index):
            """Integer gains (as float32) of the tokens at ``index`` for the current ``m``."""
            return coverage_sums_at(fq, index, m).to(torch.float32)

        def commit(picked, active):
            """Raise ``m`` in place with the picks' rows, in the active rows only."""
            r = gather_row(fq, picked)
            if B > 1:
                r = torch.where(active[:, None], r, m)
            torch.maximum(m, r, out=m)

        if lazy and use_host(ctx):
            K = int(k[0])
            o, kk = lazy_facility_location(fq[0].numpy(), first[0].numpy(), ctx.mask[0].cpu().numpy(), K)
            order, keys = torch.from_numpy(o)[None], torch.from_numpy(kk)[None]
            valid = torch.ones(1, K, dtype=torch.bool)
        elif lazy:
            order, keys, valid = lazy_greedy_loop(first, evaluate, commit, ctx.mask, k)
        else:
            order, keys, valid = dense_greedy_loop(first, lambda: coverage_sums(fq, m).to(torch.float32),
                                                   commit, ctx.mask, k)
        return from_order(order, keys / scale, valid)
