"""Information coverage: the facility-location function over cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import criteria
from ._kernels import as_float_gains, coverage_sums, coverage_sums_at, fixed_point_similarity, gather_row
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
    ``O(M N)``, which lazy greedy and
    :class:`~tokenprune.selectors.FacilityLocationGreedy` use.

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

    def evaluate(self, ctx, subset):
        fq, scale = fixed_point_similarity(ctx)
        s = subset & ctx.mask
        best = fq.masked_fill(~s.unsqueeze(-1), 0).amax(1)  # [B, N]: max(0, max_{s∈S} Fq_sj)
        total = (best.to(torch.int64) * ctx.mask).sum(1)
        return (total.to(torch.float64) / scale).to(torch.float32)
