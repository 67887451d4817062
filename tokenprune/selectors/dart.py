"""DART's selection rule: pivot tokens, and for each pivot the visual tokens that duplicate it least.

Used by the method ``"dart"`` (:mod:`tokenprune.methods.dart`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MissingSignalError, ParameterError
from ..registry import selectors
from ..selection import from_order
from .base import Selector

__all__ = ["DART", "DART_COUNTS"]

#: How DART's kept count relates to the budget: exactly the budget, or the official code's count.
DART_COUNTS = ("budget", "official")


def _top(scores: torch.Tensor, valid: torch.Tensor, n: int) -> list:
    """Indices of the ``n`` valid entries with the largest ``scores`` (ties: the lower index first)."""
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), descending=True, stable=True).indices
    return order[:n].tolist()


@selectors.register("dart")
@dataclass(frozen=True, kw_only=True)
class DART(Selector):
    """DART's rule: pivots by key norm, then each pivot's least similar visual tokens (a union).

    Pivots are the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens with the largest
    relevance (DART: the L1 norm of their keys at the layer before pruning; ``relevance`` and
    ``text_relevance``). The pivots are visited in the official code's order (below); each takes, from
    the visual tokens that are neither image pivots nor taken yet, its share of the budget: the tokens
    whose features are least cosine-similar to the pivot's. Kept: the image pivots and every pivot's
    picks (text pivots are not visual tokens and are not kept).

    Parameters
    ----------
    image_pivots : int
        Pivots among the visual tokens (``>= 1``; default 4, as the paper).
    text_pivots : int
        Pivots among the text tokens (``>= 0``; default 4). Capped by the valid text tokens; a context
        without ``text_embeddings`` has none, and the image pivots share the budget alone.
    count : {"budget", "official"}
        ``"budget"`` (default): keep exactly ``min(budget, valid)`` tokens: the image pivots plus
        ``budget - image_pivots`` picks split as evenly as the pivots allow (the first pivots visited
        take one more). ``"official"``: the official code's count: every pivot takes
        ``budget // (image_pivots + text_pivots)`` tokens, so ``image_pivots`` more than the budget
        are kept when it divides (68 for a budget of 64), or fewer when it does not (20 for 22).

    Raises
    ------
    ParameterError
        Pivot counts that are not ints in range, or an unknown ``count``.
    MissingSignalError
        ``relevance`` absent, or ``text_embeddings`` given without ``text_relevance`` while
        ``text_pivots > 0``.

    Notes
    -----
    Signals: ``relevance`` ``[B, N]`` (visual key norms), ``text_embeddings`` ``[B, T, D]`` with
    ``text_mask`` and ``text_relevance`` ``[B, T]`` (the text tokens after the image, DART's "query"
    tokens, and their key norms), and optionally ``positions`` (an ``extra`` signal, long ``[B, N]``:
    the visual tokens' positions in the unpadded sequence; default ``0 .. N-1``). Text token ``t``
    (the ``t``-th valid one) sits at ``max(positions) + 1 + t``.

    Visiting order: the official code collects the pivots' sequence positions in a Python ``set`` and
    visits ``list(set)``; since pivots compete for the same tokens, the order changes the kept set, and
    this selector visits the pivots in the same order (CPython's iteration order of that set of ints,
    computed with a ``set``). Features are compared in float32.

    ``O(B (P N D + P N log N))`` with ``P`` pivots; one Python loop over samples and pivots.

    Checked against the official code: ``get_retained_image_token`` in ZichenWen1/DART
    (``llava/model/language_model/modeling_llama_self.py``, read at the mirror xqy1111111/DART,
    commit 0247657060a42dd329d6f273455bfad05d5b2c74) and llmc's port; ``tests/test_fidelity_dart.py``
    re-implements that rule with plain loops and checks identical kept sets.

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494. Code: https://github.com/ZichenWen1/DART.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> g = torch.Generator().manual_seed(0)
    >>> ctx = tp.make_context(torch.randn(1, 32, 8, generator=g), relevance=torch.rand(1, 32, generator=g),
    ...                       text_embeddings=torch.randn(1, 6, 8, generator=g),
    ...                       text_relevance=torch.rand(1, 6, generator=g))
    >>> DART().select(None, ctx, 12).counts, DART(count="official").select(None, ctx, 16).counts
    (tensor([12]), tensor([20]))
    """

    needs_objective: ClassVar[bool] = False
    signals: ClassVar[frozenset] = frozenset({"relevance", "text_embeddings", "text_relevance", "positions"})
    image_pivots: int = 4
    text_pivots: int = 4
    count: str = "budget"

    def __post_init__(self):
        for name, lo in (("image_pivots", 1), ("text_pivots", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ParameterError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.count not in DART_COUNTS:
            raise ParameterError(f"count must be one of {DART_COUNTS}, got {self.count!r}")

    @property
    def exact_budget(self) -> bool:
        """Whether exactly ``min(budget, valid)`` tokens are kept (``count="budget"``)."""
        return self.count == "budget"

    def _select(self, objective, ctx, k):
        ctx.require("relevance", by="the DART selector")
        text = ctx.text_embeddings if self.text_pivots > 0 else None
        if text is not None and ctx.text_relevance is None:
            raise MissingSignalError("the DART selector needs text_relevance (the text tokens' key norms) with "
                                     "text_embeddings, or text_pivots=0")
        B, N = ctx.mask.shape
        unit = ctx.unit_features  # float32 [B, N, D]
        tunit = None if text is None else torch.nn.functional.normalize(text.float(), dim=-1, eps=1e-12)
        positions = ctx.extra.get("positions")
        rows = [self._one(b, unit[b], ctx.mask[b], ctx.relevance[b], int(k[b]),
                          None if tunit is None else tunit[b], None if tunit is None else ctx.text_mask[b],
                          None if tunit is None else ctx.text_relevance[b],
                          None if positions is None else positions[b]) for b in range(B)]
        K = max(len(r) for r in rows)
        order = torch.full((B, K), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            order[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        order = order.to(ctx.device)
        valid = order >= 0
        return from_order(order, torch.zeros(B, K, device=ctx.device), valid)

    def _one(self, b, unit, mask, rel, k, tunit, tmask, trel, positions) -> list:
        """The kept visual-token indices of one sample, in selection order."""
        n_valid = int(mask.sum())
        p_img = min(self.image_pivots, n_valid)
        img = _top(rel, mask, p_img)
        if k <= p_img:
            return img[:k]
        txt = [] if tunit is None else _top(trel, tmask, min(self.text_pivots, int(tmask.sum())))
        pos = (positions.long().tolist() if positions is not None else list(range(unit.shape[0])))
        base = max(p for p, m in zip(pos, mask.tolist()) if m) + 1
        trank = {} if tmask is None else {t: r for r, t in enumerate(tmask.nonzero().flatten().tolist())}
        at = {pos[i]: unit[i] for i in img}
        at.update({base + trank[t]: tunit[t] for t in txt})
        visit = list(set([pos[i] for i in img] + [base + trank[t] for t in txt]))  # the official visiting order
        n_piv = len(visit)
        if self.count == "official":
            shares = [k // (self.image_pivots + self.text_pivots)] * n_piv
        else:
            rest = k - p_img
            shares = [rest // n_piv + (1 if i < rest % n_piv else 0) for i in range(n_piv)]
        pool = mask.clone()
        pool[img] = False
        kept = list(img)
        for p, share in zip(visit, shares):
            take = min(share, int(pool.sum()))
            if take <= 0:
                continue
            sim = (unit @ at[p]).masked_fill(~pool, float("inf"))
            picks = torch.sort(sim, stable=True).indices[:take]
            pool[picks] = False
            kept.extend(picks.tolist())
        return kept
