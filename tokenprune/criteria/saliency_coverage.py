"""SCOPE's criterion: facility-location coverage gain combined with per-token saliency.

Used by the method ``"scope"`` (:mod:`tokenprune.methods.scope`). The coverage part is the
criterion registered as ``"coverage"``, looked up in the registry, so a replacement is picked up.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import ParameterError
from ..registry import criteria
from .base import Criterion, Tags

__all__ = ["SaliencyCoverage"]


@criteria.register("saliency_coverage")
@dataclass(frozen=True, kw_only=True)
class SaliencyCoverage(Criterion):
    """SCOPE's score: facility-location coverage gain combined with per-token saliency.

    With ``F`` the cosine similarity, ``m_j = max(0, max_{s∈S} F_js)`` and saliency ``a_i``
    (``ctx.relevance``, the vision encoder's [CLS] attention, clamped at 0):

    .. math:: g_i(S) = \\Delta_{\\mathrm{cov}}(i \\mid S) \\cdot a_i^{\\alpha}
              \\quad(\\text{combine="multiply"}), \\qquad
              g_i(S) = \\Delta_{\\mathrm{cov}}(i \\mid S) + a_i^{\\alpha} \\quad(\\text{combine="add"}),

    with :math:`\\Delta_{\\mathrm{cov}}(i \\mid S) = \\sum_{j} \\max(0, F_{ij} - m_j)`. Greedy
    selection repeatedly keeps the token with the largest score (the paper's "SCOPE score").

    Parameters
    ----------
    alpha : float
        Exponent of the saliency (``>= 0``, finite). Default 1.0, the reference code's default.
    combine : {"multiply", "add"}
        How saliency enters the score. Default ``"multiply"`` (the paper's main setting).

    Raises
    ------
    ParameterError
        Negative or non-finite ``alpha``, or an unknown ``combine``.
    MissingSignalError
        ``ctx.relevance`` (the saliency) is absent.

    Notes
    -----
    ``"add"`` is the exact marginal gain of ``f(S) = cov(S) + Σ_{i∈S} a_i^α``: monotone and
    submodular. ``"multiply"`` is not the gain of a set function (``exact_gains=False``); its gains
    are non-negative and never increase as ``S`` grows (fixed non-negative weights times
    non-increasing coverage gains), so lazy greedy stays exact. For ``"multiply"``,
    :meth:`evaluate` returns the coverage ``cov(S) = Σ_j m_j`` that SCOPE's set-coverage measures.
    ``O(N²)`` per step, as :class:`~tokenprune.criteria.Coverage`.

    What the paper leaves open and what we chose: SCOPE computes saliency at the vision encoder's
    penultimate layer, summed over heads, and runs on the encoder's hidden states; in tokenprune the
    stage runs on the projected features with ``relevance="cls_attention"`` from the adapter.

    Checked against kinredon/SCOPE@6bf73069 (``SCOPE`` in ``scope/clip_encoder.py``): the same score
    (``m`` starting at 0, the sum over all tokens, saliency to the power ``alpha``, ``"multi"`` or
    ``"add"``); greedy on it keeps the official sets on the same inputs, up to near-ties below the
    coverage's fixed-point resolution (``tests/test_fidelity.py``, ``docs/fidelity.rst``).

    References
    ----------
    Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs",
    arXiv:2510.24214.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 6, 4), relevance=torch.rand(1, 6))
    >>> c = SaliencyCoverage()
    >>> c.gains(ctx, c.prepare(ctx), ctx.mask).shape
    torch.Size([1, 6])
    """

    alpha: float = 1.0
    combine: str = "multiply"

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ParameterError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.combine not in ("multiply", "add"):
            raise ParameterError(f"combine must be 'multiply' or 'add', got {self.combine!r}")

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        req = frozenset({"relevance"})
        if self.combine == "add":
            return Tags(monotone=True, submodular=True, requires=req)
        return Tags(monotone=True, exact_gains=False, nonincreasing_gains=True, requires=req)

    def _saliency(self, ctx) -> torch.Tensor:
        return (ctx.relevance.float().clamp_min(0.0) ** float(self.alpha)).masked_fill(~ctx.mask, 0.0)

    def prepare(self, ctx):
        self.check(ctx)
        return {"cov": criteria.create("coverage").prepare(ctx), "sal": self._saliency(ctx)}

    def gains(self, ctx, state, candidates):
        cov = criteria.create("coverage").gains(ctx, state["cov"], candidates).float()
        return cov * state["sal"] if self.combine == "multiply" else cov + state["sal"]

    def gains_at(self, ctx, state, index, candidates=None):
        cov = criteria.create("coverage").gains_at(ctx, state["cov"], index, candidates).float()
        sal = state["sal"].gather(1, index)
        return cov * sal if self.combine == "multiply" else cov + sal

    def update(self, ctx, state, picked, active):
        return {"cov": criteria.create("coverage").update(ctx, state["cov"], picked, active), "sal": state["sal"]}

    def evaluate(self, ctx, subset):
        self.check(ctx)
        cov = criteria.create("coverage").evaluate(ctx, subset).float()
        if self.combine == "multiply":
            return cov
        return cov + (self._saliency(ctx) * (subset & ctx.mask)).sum(1)
