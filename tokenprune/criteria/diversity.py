"""Semantic diversity: the max-min diversity gain (TOPS, DivPrune) and the DPP log-determinant (CDPruner)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MissingSignalError, ParameterError
from ..registry import criteria
from ._kernels import gather_row
from .base import Criterion, Tags
from .relevance import text_similarity


@criteria.register("diversity")
@dataclass(frozen=True, kw_only=True)
class Diversity(Criterion):
    """Max-min diversity gain: how far a visual token is from its most similar kept token.

    .. math:: d_i(S) = 1 - m_i(S), \\qquad m_i(S) = \\max\\big(0, \\max_{s \\in S} \\cos(h_i, h_s)\\big)

    with ``m_i({}) = 0`` (every token gains 1 on the empty set; greedy then starts at the lowest index,
    while :class:`~tokenprune.selectors.MaxMin` starts at DivPrune's farthest-from-its-neighbour token).

    ``evaluate`` scores a set by the sum over its members of their own gain with respect to the rest,

    .. math:: f(S) = \\sum_{i \\in S} d_i(S \\setminus \\{i\\}),

    i.e. the summed cosine distance (clipped to [0, 1]) of each kept token to its nearest kept
    neighbour, and 1 for a singleton. The gains are **not** marginals of this score (``exact_gains``
    is False): like TOPS's diversity term they are a per-token heuristic, which greedy maximises
    step by step.

    Notes
    -----
    Tags: ``exact_gains=False``, ``nonincreasing_gains=True`` (``m_i`` only grows with ``S``), so
    lazy greedy is exact for it. ``O(N)`` per gain evaluation and ``O(N)`` per update after the
    similarity GEMM.

    References
    ----------
    TOPS, arXiv:2606.27161 (semantic diversity ``d_i = 1 - m_i``). DivPrune, CVPR 2025,
    arXiv:2503.02175 (max-min diversity).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> d = Diversity()
    >>> s = d.update(ctx, d.prepare(ctx), torch.tensor([0]), torch.tensor([True]))
    >>> d.gains(ctx, s, ctx.mask).round(decimals=3)
    tensor([[0.0000, 1.0000, 0.2930]])
    """

    tags: ClassVar[Tags] = Tags(exact_gains=False, nonincreasing_gains=True)

    def prepare(self, ctx):
        return torch.zeros(ctx.mask.shape, dtype=torch.float32, device=ctx.device)

    def gains(self, ctx, state, candidates):
        return 1.0 - state

    def gains_at(self, ctx, state, index, candidates=None):
        return 1.0 - state.gather(1, index)

    def update(self, ctx, state, picked, active):
        new = torch.maximum(state, gather_row(ctx.similarity, picked).clamp(0.0, 1.0))
        return torch.where(active[:, None], new, state)

    def evaluate(self, ctx, subset):
        s = subset & ctx.mask
        sim = ctx.similarity.clamp(0.0, 1.0)
        eye = torch.eye(ctx.num_tokens, dtype=torch.bool, device=ctx.device)
        keep = s.unsqueeze(1) & ~eye  # [B, i, j]: j in S, j != i
        nearest = sim.masked_fill(~keep, 0.0).amax(-1)  # max(0, max_{j∈S\\{i}} F_ij)
        return ((1.0 - nearest) * s).sum(1)


QUALITY_SOURCES = (None, "given", "text_similarity")
KERNELS = ("cosine", "shifted")
#: Added to the numerator of CDPruner's min-max normalisation of the relevance (its official code):
#: ``q = (r - min + 1e-6) / (max - min)``, so the least relevant token keeps a tiny positive quality.
QUALITY_OFFSET = 1e-6


@criteria.register("log_det")
@dataclass(frozen=True, kw_only=True)
class LogDet(Criterion):
    """DPP log-determinant of the kept set's kernel (CDPruner's conditional DPP).

    .. math:: f(S) = \\log\\det(L_S), \\qquad
              L = \\operatorname{diag}(q)\\, K\\, \\operatorname{diag}(q) + \\varepsilon I, \\qquad
              \\Delta(i \\mid S) = \\log\\big(L_{ii} - L_{iS} L_{SS}^{-1} L_{Si}\\big)

    where ``K`` is the cosine similarity ``F`` (``kernel="cosine"``, as CDPruner) or ``(1 + F) / 2``
    (``"shifted"``: non-negative entries), and ``q`` the per-token quality. Both kernels are positive
    semi-definite (``F`` is a Gram matrix of unit vectors); ``εI`` keeps ``L`` positive definite when
    the budget exceeds the feature rank. ``f({}) = 0``.

    Parameters
    ----------
    quality : {None, "given", "text_similarity"}
        ``None``: ``q = 1`` (pure diversity). ``"given"``: ``ctx.relevance``. ``"text_similarity"``:
        cosine similarity to the instruction embeddings reduced over text tokens by ``reduce``
        (CDPruner's instruction relevance).
    reduce : {"mean", "max"}
        Reduction over text tokens for ``quality="text_similarity"`` (CDPruner averages).
    normalize_quality : bool
        Min-max normalise the relevance over each sample's valid tokens before use, as CDPruner's
        code does: ``q = (r - min + 1e-6) / (max - min)`` (the least relevant token gets a quality of
        ``1e-6 / (max - min)`` and is picked last; all equal: ``q = 1``).
    theta : float or None
        If given (in [0, 1)), use Chen et al.'s relevance-diversity trade-off
        ``q = exp(α r̃)``, ``α = θ / (2 (1 - θ))``, instead of ``q = r̃``. ``None`` (default): ``q = r̃``.
    kernel : {"cosine", "shifted"}
        ``K = F`` or ``K = (1 + F) / 2``.
    eps : float
        Diagonal regulariser ``ε > 0``.

    Raises
    ------
    ParameterError
        Unknown option, ``eps <= 0``, ``theta`` outside [0, 1), or a non-bool ``normalize_quality``.
    MissingSignalError
        ``quality`` needs ``ctx.relevance`` or ``ctx.text_embeddings``, which are absent.

    Notes
    -----
    Submodular, not monotone (gains are negative once ``L_ii - L_iS L_SS^{-1} L_Si < 1``); exact gains.
    The state is an incremental Cholesky factor (Chen, Zhang & Zhou 2018): updating it after a pick
    costs ``O(|S| N)`` and reading all gains ``O(N)``, so greedy costs ``O(K² N)`` after the GEMM.
    :class:`~tokenprune.selectors.DPPMap` runs the same recursion with preallocated buffers.

    The paper leaves open whether ``F`` is shifted; CDPruner's code uses ``F`` directly, which we
    default to. Relevance is taken as given: CDPruner's code negates the CLIP text similarity (for
    LLaVA's CLIP tower); :class:`tokenprune.TextEncoder` computes it so when it gives the relevance,
    pass the scores you want on plain tensors. Checked against Theia-4869/CDPruner at commit
    ``9541616c40fcd5625de1cdb8ea6c33c129eb7864`` (``llava/model/llava_arch.py``, ``encode_images``):
    the same normalisation, kernel ``diag(q) F diag(q)`` with ``F`` the cosine similarity of the
    projected features in float32, and fast greedy MAP; the differences are ``εI`` (not in the official
    kernel; it keeps the Schur complements positive once the kernel's rank is exhausted, where the
    official code divides by ``sqrt`` of a non-positive number) and the normalisation's scope: the
    official code takes ``min`` and ``max`` over the whole batch tensor (every crop of the image for
    LLaVA-NeXT at batch size 1), we over each sample's candidate tokens (the same at batch size 1,
    up to LLaVA-NeXT's padded patches, which the official code includes and unpadding removes).

    References
    ----------
    CDPruner, arXiv:2506.10967. Chen, Zhang & Zhou, "Fast greedy MAP inference for determinantal
    point process to improve recommendation diversity", NeurIPS 2018, arXiv:1709.05135.
    Kulesza & Taskar, "Determinantal point processes for machine learning", arXiv:1207.6083.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.selectors import DPPMap
    >>> ctx = tp.make_context(torch.randn(1, 16, 8), relevance=torch.rand(1, 16))
    >>> DPPMap().select(LogDet(quality="given"), ctx, 4).indices.shape
    torch.Size([1, 4])
    """

    quality: str | None = None
    reduce: str = "mean"
    normalize_quality: bool = True
    theta: float | None = None
    kernel: str = "cosine"
    eps: float = 1e-6

    def __post_init__(self):
        if self.quality not in QUALITY_SOURCES:
            raise ParameterError(f"quality must be one of {QUALITY_SOURCES}, got {self.quality!r}")
        if self.reduce not in ("mean", "max"):
            raise ParameterError(f"reduce must be 'mean' or 'max', got {self.reduce!r}")
        if self.kernel not in KERNELS:
            raise ParameterError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 < self.eps < math.inf:
            raise ParameterError(f"eps must be a positive finite float, got {self.eps!r}")
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, numbers.Real)
                                       or not 0.0 <= self.theta < 1.0):
            raise ParameterError(f"theta must be None or in [0, 1), got {self.theta!r}")
        if not isinstance(self.normalize_quality, bool):
            raise ParameterError(f"normalize_quality must be a bool, got {self.normalize_quality!r}")

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        req = {None: (), "given": ("relevance",), "text_similarity": ("text_embeddings",)}[self.quality]
        return Tags(submodular=True, requires=frozenset(req))

    def check(self, ctx):
        need = {"given": "relevance", "text_similarity": "text_embeddings"}.get(self.quality)
        if need is not None and ctx.get_signal(need) is None:
            raise MissingSignalError(f"LogDet(quality={self.quality!r}) needs ctx.{need}, which was not given")

    # -- kernel pieces -------------------------------------------------------------------------------
    def quality_scores(self, ctx) -> torch.Tensor | None:
        """float32 ``[B, N]`` quality ``q`` (0 at padding), or ``None`` for ``q = 1``."""
        self.check(ctx)
        if self.quality is None:
            return None
        r = ctx.relevance.float() if self.quality == "given" else text_similarity(ctx, self.reduce)
        mask = ctx.mask
        if self.normalize_quality:
            inf = torch.tensor(float("inf"), device=r.device)
            lo = torch.where(mask, r, inf).amin(1, keepdim=True)
            hi = torch.where(mask, r, -inf).amax(1, keepdim=True)
            span = hi - lo
            r = torch.where(span > 0, (r - lo + QUALITY_OFFSET) / torch.where(span > 0, span, torch.ones_like(span)),
                            torch.ones_like(r))
        if self.theta is not None:
            r = torch.exp(r * (self.theta / (2.0 * (1.0 - self.theta))))
        return r.masked_fill(~mask, 0.0)

    def kernel_rows(self, ctx, q, picked: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, N]`` off-diagonal kernel rows ``L[b, picked[b], :]`` (without ``ε``)."""
        row = gather_row(ctx.similarity, picked)
        if self.kernel == "shifted":
            row = (row + 1.0).mul_(0.5).mul_(ctx.mask)
        if q is not None:
            row = row * (q.gather(1, picked[:, None]) * q)
        return row

    def kernel_diagonal(self, ctx, q) -> torch.Tensor:
        """float32 ``[B, N]``: ``L_ii = q_i² K_ii + ε`` (``ε`` at padding)."""
        d = ctx.similarity.diagonal(dim1=1, dim2=2).float()
        if self.kernel == "shifted":
            d = (d + 1.0) * 0.5 * ctx.mask
        if q is not None:
            d = d * q * q
        return d + self.eps

    def kernel_matrix(self, ctx, dtype=torch.float64) -> torch.Tensor:
        """``[B, N, N]`` kernel ``L`` (slow, for :meth:`evaluate` and tests)."""
        F = ctx.similarity.to(dtype)
        if self.kernel == "shifted":
            F = (F + 1.0) * 0.5 * (ctx.mask[:, :, None] & ctx.mask[:, None, :])
        q = self.quality_scores(ctx)
        if q is not None:
            q = q.to(dtype)
            F = q[:, :, None] * F * q[:, None, :]
        return F + self.eps * torch.eye(ctx.num_tokens, dtype=dtype, device=ctx.device)

    # -- contract ------------------------------------------------------------------------------------
    def prepare(self, ctx):
        q = self.quality_scores(ctx)
        B, N = ctx.mask.shape
        return {"q": q, "d2": self.kernel_diagonal(ctx, q),
                "C": torch.zeros(B, 0, N, dtype=torch.float32, device=ctx.device)}

    def gains(self, ctx, state, candidates):
        return log_gain(state["d2"])

    def gains_at(self, ctx, state, index, candidates=None):
        return log_gain(state["d2"].gather(1, index))

    def update(self, ctx, state, picked, active):
        e = cholesky_row(self.kernel_rows(ctx, state["q"], picked), state["C"], state["d2"], picked)
        e = e.masked_fill(~active[:, None], 0.0)
        d2 = state["d2"] - e * e
        return {"q": state["q"], "d2": d2, "C": torch.cat([state["C"], e.unsqueeze(1)], 1)}

    def evaluate(self, ctx, subset):
        s = subset & ctx.mask
        L = self.kernel_matrix(ctx)
        both = s[:, :, None] & s[:, None, :]
        eye = torch.eye(ctx.num_tokens, dtype=torch.bool, device=ctx.device)
        M = torch.where(both, L, torch.where(eye, torch.ones_like(L), torch.zeros_like(L)))
        sign, logabs = torch.linalg.slogdet(M)
        return torch.where(sign > 0, logabs, torch.full_like(logabs, float("-inf"))).to(torch.float32)


#: Smallest Schur complement used in logs and square roots (guards rounding below zero).
TINY = 1e-30


def log_gain(d2: torch.Tensor) -> torch.Tensor:
    """``log(max(d², TINY))``: the log-det gain from the Schur complements ``d²``."""
    return d2.clamp_min(TINY).log_()


def cholesky_row(lrow: torch.Tensor, C: torch.Tensor, d2: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The new Cholesky row ``e = (L[j] - c_jᵀ C) / sqrt(d²_j)`` for the pick ``j`` (Chen et al. 2018).

    ``lrow`` ``[B, N]`` kernel rows at the picks, ``C`` ``[B, t, N]`` previous rows, ``d2`` ``[B, N]``
    current Schur complements, ``picked`` long ``[B]``. Returns float32 ``[B, N]``; ``O(t N)``.
    """
    t = C.shape[1]
    if t:
        cj = C.gather(2, picked.view(-1, 1, 1).expand(-1, t, 1))  # [B, t, 1]
        lrow = torch.baddbmm(lrow.unsqueeze(1), cj.transpose(1, 2), C, alpha=-1.0).squeeze(1)
    return lrow / d2.gather(1, picked[:, None]).clamp_min(TINY).sqrt()
