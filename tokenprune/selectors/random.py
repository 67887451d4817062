"""Seeded uniform random selection."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ParameterError
from ..registry import selectors
from ..selection import from_order
from .base import Selector


@selectors.register("random")
@dataclass(frozen=True, kw_only=True)
class Random(Selector):
    """A uniformly random subset of ``k`` valid tokens per sample, returned in ascending order.

    Parameters
    ----------
    seed : int or None
        Seed of the draw; ``None`` uses ``ctx.seed``. The same seed, shapes and mask give the same
        selection on any device (the draw is made on the CPU).

    Raises
    ------
    ParameterError
        A seed that is not an int.

    Notes
    -----
    Needs no objective (an objective, if given, is ignored). ``O(N)`` per sample: ``k`` largest of
    ``N`` uniform keys. ``order`` is the random draw order; ``gains`` are 0. Indices are sorted, so
    the kept tokens keep their spatial order (unsorted random subsets scramble positions, a known
    bug in one public benchmark). A strong baseline (arXiv:2502.11501).

    References
    ----------
    "Token pruning in multimodal LLMs: are we solving the right problem?", arXiv:2502.11501.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 10, 4))
    >>> a, b = Random(seed=1).select(None, ctx, 4), Random(seed=1).select(None, ctx, 4)
    >>> torch.equal(a.indices, b.indices), a.indices[0].tolist() == sorted(a.indices[0].tolist())
    (True, True)
    """

    needs_objective: ClassVar[bool] = False
    seed: int | None = None

    def __post_init__(self):
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ParameterError(f"seed must be an int or None, got {self.seed!r}")

    def _select(self, objective, ctx, k):
        B, N = ctx.mask.shape
        gen = ctx.generator() if self.seed is None else torch.Generator().manual_seed(int(self.seed))
        keys = torch.rand(B, N, generator=gen).to(ctx.device).masked_fill(~ctx.mask, -1.0)
        K = int(k.max())
        order = keys.topk(K, dim=1).indices
        valid = torch.arange(K, device=ctx.device)[None] < k[:, None].to(ctx.device)
        return from_order(order, torch.zeros(B, K, device=ctx.device), valid)
