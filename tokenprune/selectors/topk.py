"""Top-k: exact for modular objectives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..criteria._loops import rank_keys
from ..errors import ParameterError
from ..registry import selectors
from ..selection import from_order
from .base import Selector


@selectors.register("topk")
@dataclass(frozen=True, kw_only=True)
class TopK(Selector):
    """Keep the ``k`` tokens with the largest gains on the empty set.

    Exact for modular objectives (relevance scores); for other objectives it ranks tokens by their
    gain alone (e.g. FastV's attention top-k). Ties go to the lower index. ``O(N log N)`` per sample.

    Parameters
    ----------
    largest : bool
        ``False`` keeps the smallest gains instead (ReverseFastV: the usual reading of the seed paper's
        baseline, arXiv:2502.11501, which keeps the lowest-attention tokens).

    Raises
    ------
    ParameterError
        ``largest`` is not a bool.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import Relevance
    >>> ctx = tp.make_context(torch.randn(1, 6, 4), relevance=torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]]))
    >>> TopK().select(Relevance(), ctx, 3).order.tolist()
    [[1, 3, 5]]
    >>> TopK(largest=False).select(Relevance(), ctx, 2).indices.tolist()
    [[0, 4]]
    """

    largest: bool = True

    def __post_init__(self):
        if not isinstance(self.largest, bool):
            raise ParameterError(f"largest must be a bool, got {self.largest!r}")

    def _select(self, objective, ctx, k):
        with torch.no_grad():
            return self._topk(objective, ctx, k)

    def _topk(self, objective, ctx, k):
        """The ``k`` tokens of largest (or smallest) gain on the empty set, in that order.

        The sort is stable: ties go to the lower index.
        """
        state = objective.prepare(ctx)
        g = objective.gains(ctx, state, ctx.mask).float()
        key = g if self.largest else -g
        key = rank_keys(key).masked_fill(~ctx.mask, float("-inf"))
        K = int(k.max())
        # stable descending sort: ties keep the lower index first
        idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :K]
        valid = torch.arange(K, device=ctx.device)[None] < k[:, None].to(ctx.device)
        return from_order(idx, torch.gather(g, 1, idx), valid)
