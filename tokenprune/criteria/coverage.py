"""Information coverage: the facility-location function over cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import criteria
from .base import Criterion, Tags


@criteria.register("coverage", aliases=("facility_location",))
@dataclass(frozen=True, kw_only=True)
class Coverage(Criterion):
    """Facility-location coverage of the visual tokens by the kept set.

    .. math:: f(S) = \\sum_{j \\in V} \\max\\big(0, \\max_{s \\in S} F_{js}\\big), \\qquad
              \\Delta(i \\mid S) = \\sum_{j \\in V} \\max(0, F_{ij} - m_j)

    with ``F`` the cosine similarity and ``m_j = max(0, max_{s∈S} F_js)`` (``m = 0`` for ``S = {}``).

    This is also TOPS's coverage term ``c_i(U) = Σ_{j∈U} max(0, F_ij − m_j)``: for ``j ∈ S``,
    ``m_j = F_jj = 1 ≥ F_ij``, so summing over ``U = V \\ S`` or over ``V`` gives the same gain.

    Notes
    -----
    Monotone submodular (Nemhauser et al. 1978), so greedy is a ``(1 - 1/e)`` approximation and lazy
    greedy is exact. Computing all gains costs ``O(N²)`` per sample and step (``O(K N²)`` per
    selection), after the ``O(N² D)`` similarity GEMM.

    References
    ----------
    TOPS, arXiv:2606.27161 (information coverage); Mirchandani et al., facility location.
    """

    tags: ClassVar[Tags] = Tags(monotone=True, submodular=True)

    def prepare(self, ctx):
        sim = ctx.similarity.clamp_min(0.0)
        return {"sim": sim, "m": torch.zeros(ctx.mask.shape, device=ctx.device)}

    def gains(self, ctx, state, candidates):
        col = ctx.mask.unsqueeze(1)  # sum over valid j only
        return ((state["sim"] - state["m"].unsqueeze(1)).clamp_min(0.0) * col).sum(-1)

    def update(self, ctx, state, picked, active):
        rows = torch.arange(picked.shape[0], device=picked.device)
        new = torch.maximum(state["m"], state["sim"][rows, picked])
        return {"sim": state["sim"], "m": torch.where(active[:, None], new, state["m"])}

    def evaluate(self, ctx, subset):
        sim = ctx.similarity.clamp_min(0.0)
        s = subset & ctx.mask
        best = sim.masked_fill(~s.unsqueeze(1), 0.0).amax(-1)  # [B, N]: max over s in S of F_js
        return (best * ctx.mask).sum(1)
