"""A modular reading of DART's duplication rule: keep pivot tokens, then the tokens least similar to them.

The method ``"dart"`` follows the official rule instead (:class:`~tokenprune.selectors.DART`); this
criterion stays for compositions that want a modular, top-k-optimal version of it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ParameterError
from ..registry import criteria
from .base import ModularCriterion, Tags

__all__ = ["PivotDissimilarity"]


@criteria.register("pivot_dissimilarity")
@dataclass(frozen=True, kw_only=True)
class PivotDissimilarity(ModularCriterion):
    """A modular reading of DART's duplication score: the pivots, then the tokens least similar to them.

    Pivots ``P`` are the ``num_pivots`` valid tokens with the largest relevance (DART: the L1 norm of
    the tokens' keys at layer ``K - 1``, ``relevance="key_norm"``). Every other token scores its
    dissimilarity to the pivots,

    .. math:: s_i = 1 - \\max_{p \\in P} \\cos(h_i, h_p) \\in [0, 2]
              \\quad(\\text{or } 1 - \\operatorname{mean}_{p \\in P} \\cos(h_i, h_p)),

    and pivots score ``4 - rank / num_pivots`` (in ``(3, 4]``, by decreasing relevance), so they are kept
    first. The criterion is modular; :class:`~tokenprune.selectors.TopK` is its exact optimiser.

    Parameters
    ----------
    num_pivots : int
        Number of pivot tokens per sample (``>= 1``; capped by the valid count). Default 4.
    reduce : {"max", "mean"}
        How the similarities to the pivots are reduced. Default ``"max"`` (a token duplicating any
        pivot is dropped).

    Raises
    ------
    ParameterError
        ``num_pivots`` not a positive int, or an unknown ``reduce``.
    MissingSignalError
        ``ctx.relevance`` (the pivot scores) is absent.

    Notes
    -----
    Tags: modular, monotone (scores are non-negative), submodular; requires ``relevance``.
    ``O(B N |P| D)``.

    Not DART's official rule: the official code takes 4 image pivots and 4 text pivots, splits the
    budget evenly across them, and lets each pivot take its ``K / |P|`` least-similar tokens in turn (a
    union); that is the selector :class:`~tokenprune.selectors.DART`, which the method ``"dart"`` uses.
    This criterion uses image pivots only and one ranking by the dissimilarity to the nearest pivot,
    which keeps the defining idea (drop tokens that duplicate a pivot) and makes it modular (kept
    sets against the official rule: Jaccard about 0.35).

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 8, 4), relevance=torch.arange(8.0)[None])
    >>> PivotDissimilarity(num_pivots=2).scores(ctx).shape
    torch.Size([1, 8])
    """

    tags: ClassVar[Tags] = Tags(modular=True, monotone=True, submodular=True, requires=frozenset({"relevance"}))
    num_pivots: int = 4
    reduce: str = "max"

    def __post_init__(self):
        if isinstance(self.num_pivots, bool) or not isinstance(self.num_pivots, numbers.Integral) \
                or self.num_pivots < 1:
            raise ParameterError(f"num_pivots must be a positive int, got {self.num_pivots!r}")
        if self.reduce not in ("max", "mean"):
            raise ParameterError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def scores(self, ctx) -> torch.Tensor:
        B, N = ctx.mask.shape
        p = min(int(self.num_pivots), N)
        rel = ctx.relevance.float().masked_fill(~ctx.mask, float("-inf"))
        # stable sort: ties go to the lower index
        piv = torch.sort(rel, dim=1, descending=True, stable=True).indices[:, :p]  # [B, p]
        n_piv = torch.minimum(ctx.n_valid, torch.tensor(p, device=ctx.device))  # [B]
        piv_ok = torch.arange(p, device=ctx.device)[None] < n_piv[:, None]  # [B, p]
        sim = torch.gather(ctx.similarity, 2, piv.unsqueeze(1).expand(B, N, p))  # [B, N, p]
        if self.reduce == "max":
            red = sim.masked_fill(~piv_ok[:, None, :], float("-inf")).amax(-1)
        else:
            red = (sim * piv_ok[:, None, :]).sum(-1) / n_piv.clamp_min(1)[:, None]
        out = (1.0 - red).clamp(0.0, 2.0)
        rank_score = 4.0 - torch.arange(p, device=ctx.device, dtype=torch.float32)[None].expand(B, p) / self.num_pivots
        # pivots rank first; a pivot slot beyond the valid count points at padding and is left as is
        out = out.scatter(1, piv, torch.where(piv_ok, rank_score, torch.gather(out, 1, piv)))
        return out.masked_fill(~ctx.mask, 0.0)
