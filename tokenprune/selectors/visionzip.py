"""VisionZip's selector: dominant tokens by [CLS] attention plus contextual tokens merged from the rest.

The method built on it is ``tokenprune.create_method("visionzip")`` (:mod:`tokenprune.methods.visionzip`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..budget import round_count
from ..errors import MissingSignalError, ParameterError
from ..registry import selectors
from ..selection import from_order
from .base import Selector

__all__ = ["VisionZip", "split_budget", "MERGES", "MERGE_BY"]

MERGES = ("mean", "target_plus_mean")
MERGE_BY = ("features", "keys")


def split_budget(k: int, contextual_ratio: float) -> tuple[int, int]:
    """``(dominant, contextual)`` counts for ``k`` kept tokens: ``contextual = round(k * ratio)``, at most ``k - 1``.

    Parameters
    ----------
    k : int
        Tokens kept (``>= 1``).
    contextual_ratio : float
        Share of ``k`` for contextual tokens, in ``[0, 1)``; rounded halves up
        (:func:`tokenprune.budget.round_count`).

    Returns
    -------
    (int, int)
        ``dominant + contextual == k``, ``dominant >= 1``. ``O(1)``.

    Examples
    --------
    >>> [split_budget(k, 10 / 64) for k in (64, 128, 192, 1)]
    [(54, 10), (108, 20), (162, 30), (1, 0)]
    """
    c = max(min(round_count(k * contextual_ratio, minimum=0), k - 1), 0)
    return k - c, c


@selectors.register("visionzip")
@dataclass(frozen=True, kw_only=True)
class VisionZip(Selector):
    """Keep the top-scoring ("dominant") tokens and merge the rest into a few "contextual" tokens.

    For ``k`` kept tokens out of ``n`` valid ones (``k < n``), with ``c = round(k · contextual_ratio)``
    contextual and ``d = k - c`` dominant tokens:

    1. dominant: the ``d`` tokens with the largest objective scores (the gains on the empty set;
       VisionZip uses [CLS] attention), ties to the lower index;
    2. the ``M = n - d`` remaining tokens, in spatial order, give ``c`` uniformly strided targets
       (every ``max(1, M // c)``-th, the first ``c``);
    3. every other remaining token joins the target it is most similar to (cosine similarity of the
       features, or of the ``keys`` signal), and each target's feature becomes the mean of itself and
       the tokens that joined it (``merge="mean"``), or its own feature plus their mean
       (``"target_plus_mean"``, what the reference code does).

    With ``k >= n`` every token is kept with its own feature.

    Parameters
    ----------
    contextual_ratio : float
        Share of the budget for contextual tokens, in ``[0, 1)``. Default ``10 / 64``: the paper's
        54+10, 108+20 and 162+30 splits for 64, 128 and 192 tokens.
    merge : {"mean", "target_plus_mean"}
        How a contextual token's feature is formed. Default ``"mean"`` (the paper's description).
    merge_by : {"features", "keys"}
        Similarity used for the assignment: the context features (default) or the extra signal
        ``keys`` (``[B, N, Dk]``, the vision encoder's keys, as the paper).

    Returns
    -------
    Selection
        ``indices`` are the dominant tokens' and the contextual targets' positions (ascending);
        ``features`` ``[B, K, D]`` (dtype of the context features) hold the merged contextual
        features and the dominant tokens' own features; ``gains`` are the tokens' scores.

    Raises
    ------
    ParameterError
        Invalid parameters.
    MissingSignalError
        ``merge_by="keys"`` without a ``keys`` signal.

    Notes
    -----
    ``O(N log N + M c Dk)`` per sample. No prefix property (the contextual part depends on ``k``).
    What the paper leaves open and what we chose: the reference code adds the target's own hidden
    state to the mean of the tokens merged into it (a token of twice the usual scale); the paper
    describes the merge as averaging, which is our default. The reference merges by the keys of the
    encoder's penultimate layer; the projected features are the default here because they are what
    every adapter has.

    References
    ----------
    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    arXiv:2412.04467.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 12, 4), relevance=torch.rand(1, 12))
    >>> VisionZip().select(tp.criteria.Relevance(), ctx, 6).features.shape
    torch.Size([1, 6, 4])
    """

    contextual_ratio: float = 10 / 64
    merge: str = "mean"
    merge_by: str = "features"

    def __post_init__(self):
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0.0 <= float(r) < 1.0):
            raise ParameterError(f"contextual_ratio must be a number in [0, 1), got {r!r}")
        if self.merge not in MERGES:
            raise ParameterError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.merge_by not in MERGE_BY:
            raise ParameterError(f"merge_by must be one of {MERGE_BY}, got {self.merge_by!r}")

    def _select(self, objective, ctx, k):
        if self.merge_by == "keys":
            keys = ctx.extra.get("keys")
            if keys is None:
                raise MissingSignalError("VisionZip(merge_by='keys') needs the signal 'keys' ([B, N, Dk] vision "
                                         "encoder keys), which was not given")
            metric = keys.float()
        else:
            metric = ctx.features.float()
        B, N, D = ctx.features.shape
        K = int(k.max())
        dev = ctx.device
        scores = objective.gains(ctx, objective.prepare(ctx), ctx.mask).float()
        order = torch.zeros(B, K, dtype=torch.long, device=dev)
        gains = torch.zeros(B, K, dtype=torch.float32, device=dev)
        valid = torch.arange(K, device=dev)[None] < k[:, None].to(dev)
        feats = torch.zeros(B, K, D, dtype=torch.float32, device=dev)
        x = ctx.features.float()
        for b in range(B):
            pos = torch.nonzero(ctx.mask[b]).squeeze(1)  # valid positions, ascending
            n, kb = pos.numel(), int(k[b])
            if kb >= n:
                picks = pos
                fb = x[b, pos]
            else:
                d, c = split_budget(kb, float(self.contextual_ratio))
                key = scores[b, pos]
                rank = torch.sort(key, descending=True, stable=True).indices
                dominant = pos[rank[:d]]
                rest = pos[torch.sort(rank[d:]).values]  # remaining valid positions in spatial order
                fb = x[b, dominant]
                picks = dominant
                if c > 0:
                    m = rest.numel()
                    step = max(1, m // c)
                    t_local = torch.arange(0, m, step, device=dev)[:c]
                    is_t = torch.zeros(m, dtype=torch.bool, device=dev)
                    is_t[t_local] = True
                    targets, others = rest[is_t], rest[~is_t]
                    mt = torch.nn.functional.normalize(metric[b, targets], dim=-1)
                    mo = torch.nn.functional.normalize(metric[b, others], dim=-1)
                    assign = (mo @ mt.T).argmax(1) if others.numel() else torch.zeros(0, dtype=torch.long, device=dev)
                    summed = torch.zeros(c, D, device=dev).index_add_(0, assign, x[b, others])
                    ones = torch.ones_like(assign, dtype=torch.float32)
                    count = torch.zeros(c, device=dev).index_add_(0, assign, ones)
                    if self.merge == "mean":
                        merged = (x[b, targets] + summed) / (1.0 + count)[:, None]
                    else:
                        merged = x[b, targets] + summed / count.clamp_min(1.0)[:, None]
                    picks = torch.cat([dominant, targets])
                    fb = torch.cat([fb, merged])
            cnt = picks.numel()
            order[b, :cnt] = picks
            gains[b, :cnt] = scores[b, picks]
            feats[b, :cnt] = fb
        return from_order(order, gains, valid, features=feats.to(ctx.features.dtype))
