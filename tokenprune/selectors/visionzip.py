"""VisionZip's selector: dominant tokens by [CLS] attention plus contextual tokens merged from the rest.

The method built on it is ``tokenprune.create_method("visionzip")`` (:mod:`tokenprune.methods.visionzip`).
Checked against the official code, dvlab-research/VisionZip at commit
``3151f6df4fca36a4cd1c985e5956e725b1f9ad02`` (``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``), and the llmc port (ModelTC/llmc,
``llmc/compression/token_reduction/visionzip.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..budget import round_count
from ..errors import MissingSignalError, ParameterError, ShapeError
from ..registry import selectors
from ..selection import from_order
from .base import Selector

__all__ = ["VisionZip", "split_budget", "MERGES", "MERGE_BY", "CLS_MODES"]

#: How a contextual token is formed from its target and the tokens assigned to it.
MERGES = ("target_plus_mean", "mean")
#: Which similarity assigns the remaining tokens to the contextual targets.
MERGE_BY = ("auto", "keys", "features")
#: What happens to the [CLS] token(s) marked by the ``cls_token`` signal.
CLS_MODES = ("keep", "drop")


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
        ``dominant + contextual == k``, ``dominant >= 1``. The dominant count includes a kept [CLS]
        token (the official ``dominant=54`` is [CLS] and 53 patches). ``O(1)``.

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

    For ``k`` kept tokens out of ``n`` candidates (``k < n``), with ``c = round(k · contextual_ratio)``
    contextual and ``d = k - c`` dominant tokens:

    1. dominant: the [CLS] token (the ``cls_token`` signal, with ``cls="keep"``), then the
       ``d - 1`` other tokens with the largest objective scores (the gains on the empty set; VisionZip
       uses the [CLS] attention), ties to the lower index; without a [CLS] token (no signal, or
       ``cls="drop"``, which removes it from the candidates) the ``d`` best tokens;
    2. the ``M`` remaining tokens, in index order, give ``c`` uniformly strided targets: positions
       ``0, s, 2s, ...`` with ``s = max(1, M // c)``, the first ``c``;
    3. every other remaining token joins the target it is most similar to (cosine similarity of the
       ``keys`` signal, or of the features), ties to the first target, and each target becomes
       a contextual token:

       .. math:: x_t' = x_t + \\frac{1}{|A_t|} \\sum_{j \\in A_t} x_j \\quad (A_t = \\emptyset: x_t' = x_t)

       (``merge="target_plus_mean"``, the official code) or
       :math:`x_t' = (x_t + \\sum_{j \\in A_t} x_j) / (1 + |A_t|)` (``"mean"``).

    ``order`` (and :meth:`llm_sequence`) is the official sequence: [CLS], the other dominant tokens
    in index order, then the contextual tokens in the order of their targets. With ``k >= n`` every
    candidate is kept with its own feature, in index order ([CLS] first).

    Parameters
    ----------
    contextual_ratio : float
        Share of the budget for contextual tokens, in ``[0, 1)``. Default ``10 / 64``: the paper's
        54+10, 108+20 and 162+30 splits for 64, 128 and 192 tokens, the same ratio for other budgets.
    merge : {"target_plus_mean", "mean"}
        How a contextual token is formed. Default ``"target_plus_mean"`` (the official code).
    merge_by : {"auto", "keys", "features"}
        Similarity used for the assignment: ``"keys"`` reads the signal ``keys`` (``[B, N, Dk]``,
        the vision tower's attention keys at the feature layer, averaged over heads, as the official
        code), ``"features"`` the context features; ``"auto"`` (default) uses ``keys`` when the context
        has them, else the features.
    cls : {"keep", "drop"}
        What happens to the tokens the bool ``cls_token`` signal (``[B, N]``) marks: ``"keep"``
        (default, official) keeps them first, counted among the dominant tokens; ``"drop"`` (the
        llmc port on Hugging Face LLaVA, whose feature selection drops [CLS]) never keeps them, and
        all ``k`` tokens are patches. Without the signal there is no [CLS] token.

    Returns
    -------
    Selection
        ``indices`` are the dominant tokens' and the contextual targets' positions (ascending);
        ``features`` ``[B, K, D]`` (dtype of the context features) hold the merged contextual
        features and the dominant tokens' own features; ``order`` is the official sequence;
        ``gains`` are the tokens' scores. With ``cls="drop"`` a sample keeps at most its non-[CLS]
        tokens.

    Raises
    ------
    ParameterError
        Invalid parameters.
    MissingSignalError
        ``merge_by="keys"`` without a ``keys`` signal.
    ShapeError
        A ``keys`` signal that is not ``[B, N, Dk]``.

    Notes
    -----
    ``O(N log N + M c Dk)`` per sample, in float32. No prefix property (the contextual part depends
    on ``k``). The official code computes in the model's dtype (float16 in its scripts); float32 here.
    Ties: the official ``topk`` leaves their order unspecified; here the lower index wins. The
    official code takes ``keys`` and the [CLS] attention (summed over heads; the ranking is that of
    the mean) from the vision encoder layer that produces the features, and merges the hidden
    states before the projector; :func:`tokenprune.prune` does the same on towers whose projector
    acts token by token (see :func:`tokenprune.methods.visionzip.visionzip`).

    References
    ----------
    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025, arXiv:2412.04467. Official code: https://github.com/dvlab-research/VisionZip (commit
    ``3151f6df4fca36a4cd1c985e5956e725b1f9ad02``).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> ctx = tp.make_context(torch.randn(1, 12, 4), relevance=torch.rand(1, 12))
    >>> VisionZip().select(tp.criteria.Relevance(), ctx, 6).features.shape
    torch.Size([1, 6, 4])
    >>> cls = torch.zeros(1, 12, dtype=torch.bool); cls[0, 0] = True
    >>> ctx = tp.make_context(torch.randn(1, 12, 4), relevance=torch.rand(1, 12), cls_token=cls)
    >>> VisionZip().select(tp.criteria.Relevance(), ctx, 6).order[0, 0].item()   # [CLS] first
    0
    """

    contextual_ratio: float = 10 / 64
    merge: str = "target_plus_mean"
    merge_by: str = "auto"
    cls: str = "keep"

    def __post_init__(self):
        r = self.contextual_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0.0 <= float(r) < 1.0):
            raise ParameterError(f"contextual_ratio must be a number in [0, 1), got {r!r}")
        if self.merge not in MERGES:
            raise ParameterError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.merge_by not in MERGE_BY:
            raise ParameterError(f"merge_by must be one of {MERGE_BY}, got {self.merge_by!r}")
        if self.cls not in CLS_MODES:
            raise ParameterError(f"cls must be one of {CLS_MODES}, got {self.cls!r}")

    # -- helpers ---------------------------------------------------------------------------------
    def _metric(self, ctx) -> torch.Tensor:
        """float32 ``[B, N, *]``: what the assignment compares (keys or features)."""
        keys = ctx.extra.get("keys")
        if self.merge_by == "keys" and keys is None:
            raise MissingSignalError("VisionZip(merge_by='keys') needs the signal 'keys' ([B, N, Dk] vision "
                                     "encoder keys), which was not given")
        if keys is not None and self.merge_by != "features":
            if keys.dim() != 3:
                raise ShapeError(f"signal 'keys' must be [B, N, Dk], got {tuple(keys.shape)}")
            return keys.float()
        return ctx.features.float()

    def _cls_mask(self, ctx) -> torch.Tensor:
        """bool ``[B, N]``: the valid [CLS] tokens marked by the ``cls_token`` signal (none without it)."""
        sig = ctx.extra.get("cls_token")
        if sig is None:
            return torch.zeros_like(ctx.mask)
        if sig.dim() != 2:
            raise ShapeError(f"signal 'cls_token' must be bool [B, N], got {tuple(sig.shape)}")
        return sig.bool() & ctx.mask

    def _split_row(self, mask_b, cls_b):
        """``(forced, candidates)``: the kept [CLS] positions and the other candidates, ascending."""
        forced = torch.nonzero(mask_b & cls_b).squeeze(1)
        cand = torch.nonzero(mask_b & ~cls_b).squeeze(1)
        if self.cls == "drop":
            forced = forced[:0]
        return forced, cand

    # -- selection -------------------------------------------------------------------------------
    def _select(self, objective, ctx, k):
        metric = self._metric(ctx)
        cls_mask = self._cls_mask(ctx)
        B, N, D = ctx.features.shape
        K = int(k.max())
        dev = ctx.device
        scores = objective.gains(ctx, objective.prepare(ctx), ctx.mask).float()
        order = torch.zeros(B, K, dtype=torch.long, device=dev)
        gains = torch.zeros(B, K, dtype=torch.float32, device=dev)
        feats = torch.zeros(B, K, D, dtype=torch.float32, device=dev)
        counts = torch.zeros(B, dtype=torch.long, device=dev)
        x = ctx.features.float()
        for b in range(B):
            forced, cand = self._split_row(ctx.mask[b], cls_mask[b])
            n, kb = forced.numel() + cand.numel(), int(k[b])
            if kb >= n:
                picks = torch.cat([forced, cand])
                fb = x[b, picks]
            else:
                d, c = split_budget(kb, float(self.contextual_ratio))
                forced = forced[:d]
                d_p = d - forced.numel()
                rank = torch.sort(scores[b, cand], descending=True, stable=True).indices
                dominant = torch.cat([forced, torch.sort(cand[rank[:d_p]]).values])
                rest = cand[torch.sort(rank[d_p:]).values]  # remaining candidates in index order
                picks, fb = dominant, x[b, dominant]
                if c > 0:
                    targets, merged = self._contextual(x[b], metric[b], rest, c)
                    picks = torch.cat([dominant, targets])
                    fb = torch.cat([fb, merged])
            cnt = picks.numel()
            counts[b] = cnt
            order[b, :cnt] = picks
            gains[b, :cnt] = scores[b, picks]
            feats[b, :cnt] = fb
        valid = torch.arange(K, device=dev)[None] < counts[:, None]
        return from_order(order, gains, valid, features=feats.to(ctx.features.dtype))

    def _contextual(self, x, metric, rest, c):
        """``(targets, merged)``: ``c`` strided targets among ``rest`` and their merged float32 features."""
        dev = x.device
        m = rest.numel()
        step = max(1, m // c)
        t_local = torch.arange(0, m, step, device=dev)[:c]
        is_t = torch.zeros(m, dtype=torch.bool, device=dev)
        is_t[t_local] = True
        targets, others = rest[is_t], rest[~is_t]
        mt = torch.nn.functional.normalize(metric[targets], dim=-1)
        mo = torch.nn.functional.normalize(metric[others], dim=-1)
        assign = (mo @ mt.T).argmax(1) if others.numel() else torch.zeros(0, dtype=torch.long, device=dev)
        summed = torch.zeros(targets.numel(), x.shape[1], device=dev).index_add_(0, assign, x[others])
        count = torch.zeros(targets.numel(), device=dev).index_add_(0, assign, torch.ones_like(assign,
                                                                                              dtype=torch.float32))
        if self.merge == "mean":
            merged = (x[targets] + summed) / (1.0 + count)[:, None]
        else:
            merged = x[targets] + summed / count.clamp_min(1.0)[:, None]
        return targets, merged

    def llm_sequence(self, selection, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens in the order the LLM sees them, and which of them are merged.

        Used by :func:`tokenprune.prune` when the stage acts on the vision tower
        (``Stage(site="vision")``): [CLS], the dominant tokens in index order, then the contextual
        tokens, as the official code concatenates them.

        Parameters
        ----------
        selection : Selection
            What :meth:`select` returned for ``ctx``.
        ctx : TokenContext
            The context it was selected on.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            long ``[B, K]``: ``selection.order``; bool ``[B, K]``: ``True`` at the contextual
            (merged) tokens, the last ``c`` valid entries of each row.
        """
        cls_mask = self._cls_mask(ctx)
        K = selection.order.shape[1]
        merged = torch.zeros(selection.order.shape, dtype=torch.bool, device=selection.order.device)
        for b in range(selection.batch_size):
            forced, cand = self._split_row(ctx.mask[b], cls_mask[b])
            cnt = int(selection.valid[b].sum())
            if cnt < forced.numel() + cand.numel():
                c = split_budget(cnt, float(self.contextual_ratio))[1]
                merged[b, cnt - c: cnt] = True
        return selection.order[:, :K], merged
