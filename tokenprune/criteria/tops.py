"""The TOPS greedy score: task relevance + information coverage + semantic diversity, normalised per step."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MissingSignalError, ParameterError
from ..registry import criteria
from ..selection import from_order
from ._kernels import fixed_point_similarity, gather_rows, row_blocks
from ._loops import use_host
from .base import NORMALIZATIONS, Criterion, Tags
from .coverage import Coverage
from .diversity import Diversity
from .relevance import SOURCES, Relevance

#: Fixed-point "similarity" of tokens outside the candidate pool U (kept or padding): above every Fq.
_OUT = 2 ** 30
#: ``m_j`` of the empty kept set in the paper's reading (``max`` over nothing): below every Fq (>= -32767),
#: so the first pick sets ``m_j = F_{j, i1}`` exactly, negative similarities included.
_EMPTY = -(2 ** 15)
#: Incremental coverage update falls back to the direct formula when more than this fraction of
#: columns changed (the first picks): the direct pass is then cheaper than gathering columns.
_DENSE_FRACTION = 1.0 / 3.0


@criteria.register("tops_objective")
@dataclass(frozen=True, kw_only=True)
class TOPSObjective(Criterion):
    """TOPS's per-step greedy score over the visual tokens.

    On the empty set the gain is the relevance, so the first pick is ``argmax_i r_i`` (the paper's
    ``S_1``). Afterwards, for each candidate ``i ∈ U = V \\ S``,

    .. math:: g_i = \\tilde r_i + \\lambda\\, \\tilde c_i(U) + \\alpha\\, \\tilde d_i(S), \\qquad
              c_i(U) = \\sum_{j \\in U} \\max(0, F_{ji} - m_j), \\quad d_i = 1 - m_i,

    with ``m_j = max_{s∈S} F_js`` shared by coverage and diversity (the paper's ``m_j(S)``; with
    ``clamp_m=True``, ``max(0, max_{s∈S} F_js)``), ``F`` the cosine similarity (symmetric up to the
    GEMM's rounding; we read ``F_ji`` for "``i`` covers ``j``", so that every update reads contiguous
    rows) and ``~`` a normalisation over the current candidates (as
    :func:`~tokenprune.criteria.base.normalize_gains`).

    Parameters
    ----------
    coverage_weight : float
        ``λ >= 0`` (0.5; the paper uses 0.4-1.0 by model and ratio, 0.5 before the LLM).
    diversity_weight : float
        ``α >= 0`` (0.5).
    normalize : {"minmax", "mean", "none"}
        Per-step normalisation of each term over the candidates: min-max to [0, 1] (the paper's main
        text, default), division by the mean (its appendix algorithm), or none.
    source : {"given", "text_similarity"}
        Where the relevance comes from (see :class:`Relevance`): ``ctx.relevance`` ([CLS] or
        text-rater attention) or the similarity to ``ctx.text_embeddings``.
    reduce : {"max", "mean"}
        Reduction over text tokens for ``source="text_similarity"``.
    incremental : bool
        ``True`` (default): keep ``c`` for every token and, after each pick, correct it only for the
        columns ``j`` whose ``m_j`` changed. ``False``: recompute ``c`` from scratch each step (the
        paper's ``O(N²)`` per step; kept as the reference the tests compare against).
    clamp_m : bool
        ``False`` (default, the paper): ``m_j(S) = max_{s∈S} F_js``, negative when every kept token
        points away from ``j``; the diversity ``d_i = 1 - m_i`` then lies in [0, 2] and a token ``j``
        with ``m_j < 0`` still counts in the coverage of a candidate ``i`` with ``m_j < F_ji < 0``.
        ``True``: ``m_j = max(0, max_{s∈S} F_js)``, facility location's usual baseline ``m(∅) = 0``
        (this package's earlier default): similarities below 0 neither cover nor count against
        diversity. The two agree whenever the similarities to the kept set are non-negative; on
        hidden states inside the LLM, where cosine similarities are often negative, they pick
        different tokens.

    Raises
    ------
    ParameterError
        Negative or non-finite weights, unknown ``normalize``, ``source`` or ``reduce``, or a
        non-bool ``incremental`` or ``clamp_m``.
    MissingSignalError
        The relevance signal is absent.

    Notes
    -----
    Tags: ``exact_gains=False`` (normalised per step), requires ``relevance`` (or ``text_embeddings``).

    Complexity. The paper's coverage costs ``O(N)`` per candidate and step, ``O(K N²)`` per
    selection. Here, after a pick ``i*`` only the tokens ``j`` with ``F_{ji*} > m_j`` (plus ``i*``
    itself, which leaves ``U``) change their ``m_j``, and

    .. math:: c_i \\mathrel{-}= \\sum_{j\\ \\text{changed}} \\big[\\max(0, F_{ji} - m_j^{old}) -
              \\max(0, F_{ji} - m_j^{new})\\big],

    ``O(N · |changed|)`` per step (contiguous rows ``j`` of ``F``; the direct formula is used while
    more than a third of the tokens change, e.g. after the first pick). A token's ``m_j`` changes only
    when a pick covers it better than before, which happens a few times per token over a selection
    (about ``ln K`` times for picks in random order; about 4 times on average at N = 576-2880 in
    ``benchmarks/bench_selectors.py``), so a selection costs a few ``N²`` passes instead of ``K``. The sums are
    exact fixed-point integers (see :class:`Coverage`), so the incremental and direct scores, and the
    selections, are bit-identical.

    ``evaluate(S)`` returns ``Σ_{i∈S} r_i + λ·cov(S) + α·div(S)`` (unnormalised; the gains are not
    its marginals), with ``cov(S) = Σ_j m_j(S)`` over the valid tokens (0 for ``S = {}``) and
    ``div(S) = Σ_{i∈S} (1 - m_i(S \\ {i}))`` (1 for a singleton), ``m`` as above
    (:class:`Coverage` and :class:`Diversity` when ``clamp_m=True``).

    What the paper leaves open: ``m_j`` of the empty set (the first pick is by relevance alone, so
    it never enters a gain). We follow its formula ``m_j(S) = max_{k∈S} sim(h_j, h_k)``, without a
    floor at 0, by default; nothing in the paper supports the floor. On 576 random clustered tokens
    (budgets 32-128, 60 selections) the two readings kept identical sets in 60 of 60 selections
    when every similarity was positive and in 19 of 60 when similarities reached -0.47.

    References
    ----------
    TOPS, arXiv:2606.27161 (greedy selection with normalised relevance, coverage and diversity).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> from tokenprune.criteria import TOPSObjective
    >>> from tokenprune.selectors import Greedy
    >>> ctx = tp.make_context(torch.randn(1, 16, 8), relevance=torch.rand(1, 16))
    >>> Greedy().select(TOPSObjective(), ctx, 4).indices.shape
    torch.Size([1, 4])
    """

    coverage_weight: float = 0.5
    diversity_weight: float = 0.5
    normalize: str = "minmax"
    source: str = "given"
    reduce: str = "max"
    incremental: bool = True
    clamp_m: bool = False

    def __post_init__(self):
        for name in ("coverage_weight", "diversity_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= float(w) < math.inf:
                raise ParameterError(f"{name} must be a finite number >= 0, got {w!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ParameterError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.source not in SOURCES:
            raise ParameterError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.reduce not in ("max", "mean"):
            raise ParameterError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")
        if not isinstance(self.incremental, bool):
            raise ParameterError(f"incremental must be a bool, got {self.incremental!r}")
        if not isinstance(self.clamp_m, bool):
            raise ParameterError(f"clamp_m must be a bool, got {self.clamp_m!r}")

    @property
    def _m_empty(self) -> int:
        """Fixed-point ``m_j`` of the empty kept set: 0 (clamped) or below every similarity (the paper)."""
        return 0 if self.clamp_m else _EMPTY

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        return Tags(exact_gains=False,
                    requires=frozenset({"relevance" if self.source == "given" else "text_embeddings"}))

    def _relevance(self) -> Relevance:
        return Relevance(source=self.source, reduce=self.reduce)

    def check(self, ctx):
        need = "relevance" if self.source == "given" else "text_embeddings"
        if ctx.get_signal(need) is None:
            raise MissingSignalError(f"TOPSObjective(source={self.source!r}) needs ctx.{need}, which was not given")

    def prepare(self, ctx):
        self.check(ctx)
        fq, scale = fixed_point_similarity(ctx)
        r = self._relevance().scores(ctx).float().masked_fill(~ctx.mask, 0.0)
        m = torch.where(ctx.mask, self._m_empty, _OUT).to(torch.int32)  # padding is never in U
        return {"r": r, "fq": fq, "scale": scale, "m": m, "c": None,
                "size": torch.zeros(ctx.mask.shape[0], dtype=torch.long, device=ctx.device)}

    def gains(self, ctx, state, candidates):
        r = state["r"]
        if state["c"] is None:
            return r
        scale = state["scale"]
        c = state["c"].to(torch.float32).div_(scale)
        d = state["m"].to(torch.float32).div_(-scale).add_(1.0)
        t = _normalize(torch.stack([r, c, d]), candidates, self.normalize)
        g = (t[0] + self.coverage_weight * t[1]) + self.diversity_weight * t[2]  # same op order as the NumPy loop
        if state["size"].shape[0] == 1:  # one sample: it has picked already (c is set)
            return g
        return torch.where((state["size"] == 0)[:, None], r, g)

    def update(self, ctx, state, picked, active):
        fq, m_old = state["fq"], state["m"]
        B = fq.shape[0]
        # column semantic: token i covers token j with Fq[j, i]; the pick's column raises m
        col = fq[0, :, picked[0]].unsqueeze(0) if B == 1 else \
            fq.gather(2, picked.view(B, 1, 1).expand(B, fq.shape[1], 1)).squeeze(2)
        new = torch.maximum(m_old, col)  # m_j <- max(m_j, F_{j i*})
        new.scatter_(1, picked[:, None], _OUT)  # i* leaves U
        m_new = new if B == 1 else torch.where(active[:, None], new, m_old)
        out = {**state, "m": m_new, "size": state["size"] + active.long()}
        c = state["c"]
        if c is None or not self.incremental:
            out["c"] = _column_sums(fq, m_new)
            return out
        changed = m_new != m_old
        n_changed = int(changed.sum(1).max())
        if n_changed == 0:
            return out
        if n_changed > _DENSE_FRACTION * ctx.num_tokens:
            out["c"] = _column_sums(fq, m_new)
            return out
        # the changed rows j, padded per row with unchanged ones (whose delta is 0)
        rows = changed.to(torch.uint8).topk(n_changed, dim=1, sorted=False).indices
        mo, mn = m_old.gather(1, rows).unsqueeze(-1), m_new.gather(1, rows).unsqueeze(-1)
        fr = gather_rows(fq, rows)  # [B, C, N]: fr[b, k, i] = Fq[b, rows[b, k], i]
        delta = torch.minimum((fr - mo).clamp_min_(0), mn - mo).sum(1, dtype=torch.int32)  # = relu(F-mo) - relu(F-mn)
        out["c"] = c - delta
        return out

    def greedy_fast_path(self, ctx, k, *, lazy):
        """Plain greedy on this score for one sample on the CPU, in NumPy (:func:`_greedy_numpy`).

        See :meth:`Criterion.greedy_fast_path`: same picks and gains as the batched path through
        :meth:`gains` and :meth:`update`. ``None`` when it does not apply (lazy greedy, which this
        score does not allow; several samples; a GPU).
        """
        if lazy or not use_host(ctx):
            return None
        state = self.prepare(ctx)
        K = int(k[0])
        order, gains = _greedy_numpy(state["fq"][0].numpy(), state["r"][0].detach().numpy(), ctx.mask[0].numpy(), K,
                                     state["scale"], float(self.coverage_weight), float(self.diversity_weight),
                                     self.normalize, self.incremental, self._m_empty)
        order = torch.from_numpy(order)[None]
        return from_order(order, torch.from_numpy(gains)[None], torch.ones(order.shape, dtype=torch.bool))

    def evaluate(self, ctx, subset):
        self.check(ctx)
        s = subset & ctx.mask
        r = self._relevance().scores(ctx).float().masked_fill(~ctx.mask, 0.0)
        if self.clamp_m:
            cov, div = Coverage().evaluate(ctx, subset), Diversity().evaluate(ctx, subset)
        else:
            cov, div = _coverage_unclamped(ctx, s), _diversity_unclamped(ctx, s)
        return (r * s).sum(1) + self.coverage_weight * cov + self.diversity_weight * div


def _coverage_unclamped(ctx, s: torch.Tensor) -> torch.Tensor:
    """float32 ``[B]``: ``Σ_j max_{k∈S} F_jk`` over the valid tokens ``j`` (fixed point, as Coverage); 0 for
    ``S = {}``."""
    fq, scale = fixed_point_similarity(ctx)
    best = fq.to(torch.int32).masked_fill(~s.unsqueeze(-1), _EMPTY).amax(1)  # [B, N]: max_{k∈S} Fq_kj
    total = (best.to(torch.int64) * ctx.mask).sum(1)
    total = torch.where(s.any(1), total, torch.zeros_like(total))
    return (total.to(torch.float64) / scale).to(torch.float32)


def _diversity_unclamped(ctx, s: torch.Tensor) -> torch.Tensor:
    """float32 ``[B]``: ``Σ_{i∈S} (1 - max_{k∈S, k≠i} F_ik)``, a member without another kept token counting 1."""
    eye = torch.eye(ctx.num_tokens, dtype=torch.bool, device=ctx.device)
    keep = s.unsqueeze(1) & ~eye
    nearest = ctx.similarity.masked_fill(~keep, float("-inf")).amax(-1)
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    return ((1.0 - nearest) * s).sum(1)


def _column_sums(fq: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, N]``: ``c_i = Σ_j max(0, Fq[j, i] - m_j)``, blocked over ``j`` (no ``N x N`` temporary)."""
    B, N, _ = fq.shape
    c = torch.zeros(B, N, dtype=torch.int32, device=fq.device)
    for a, b in row_blocks(N, N, B):
        c += (fq[:, a:b] - m[:, a:b, None]).clamp_min_(0).sum(1, dtype=torch.int32)
    return c


def _normalize(x: torch.Tensor, candidates: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`normalize_gains` of stacked terms ``[T, B, N]`` over the candidates ``[B, N]``, in one pass."""
    if mode == "none":
        return x
    cand = candidates.unsqueeze(0)
    if mode == "minmax":
        lo = torch.where(cand, x, math.inf).amin(-1, keepdim=True)
        hi = torch.where(cand, x, -math.inf).amax(-1, keepdim=True)
        span = hi - lo
        ok = span > 0  # also False when there are no candidates (inf - inf = nan)
        return torch.where(ok, (x - lo) / torch.where(ok, span, 1.0), 0.0)
    n = candidates.sum(-1, keepdim=True).clamp_min(1).unsqueeze(0)
    mean = (torch.where(cand, x, 0.0).sum(-1, keepdim=True, dtype=torch.float64) / n).to(x.dtype)
    ok = mean.abs() > 1e-12
    return torch.where(ok, x / torch.where(ok, mean.abs(), 1.0), x)


def _normalize_np(x: np.ndarray, cand: np.ndarray, mode: str) -> np.ndarray:
    """:func:`_normalize` for one sample's stacked float32 terms ``[T, N]`` (same arithmetic, same results)."""
    if mode == "none":
        return x
    if mode == "minmax":
        lo = np.where(cand, x, np.float32(np.inf)).min(1, keepdims=True)
        span = np.where(cand, x, np.float32(-np.inf)).max(1, keepdims=True) - lo
        ok = span > 0
        return np.where(ok, (x - lo) / np.where(ok, span, np.float32(1)), np.float32(0))
    n = max(int(cand.sum()), 1)
    mean = (np.where(cand, x, np.float32(0)).sum(1, keepdims=True, dtype=np.float64) / n).astype(np.float32)
    ok = np.abs(mean) > 1e-12
    return np.where(ok, x / np.where(ok, np.abs(mean), np.float32(1)), x)


def _greedy_numpy(fq: np.ndarray, r: np.ndarray, valid: np.ndarray, k: int, scale: float, lam: float,
                  alpha: float, mode: str, incremental: bool, m_empty: int = _EMPTY):
    """Plain greedy on the TOPS score for one sample in NumPy: the arithmetic of
    :meth:`TOPSObjective.gains` and :meth:`TOPSObjective.update` without the per-op overhead of
    torch on tiny tensors (``m_empty``: the fixed-point ``m_j`` of the empty set, see
    :attr:`TOPSObjective.clamp_m`). Returns order int64 ``[k]`` and gains float32 ``[k]``."""
    n = fq.shape[0]
    m = np.where(valid, m_empty, _OUT).astype(np.int32)
    cand = valid.copy()
    c = None
    order = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.float32)
    neg = np.float32(-np.inf)
    f32 = np.float32
    lam32, alpha32 = f32(lam), f32(alpha)
    blocks = row_blocks(n, n)
    terms = np.empty((3, n), dtype=np.float32)
    terms[0] = r
    for t in range(k):
        if t == 0:
            g = r
        else:
            terms[1] = c
            terms[1] /= f32(scale)
            terms[2] = m
            terms[2] /= f32(-scale)
            terms[2] += f32(1.0)
            tn = _normalize_np(terms, cand, mode)
            g = (tn[0] + lam32 * tn[1]) + alpha32 * tn[2]
        i = int(np.where(cand, g, neg).argmax())
        order[t], gains[t] = i, g[i]
        cand[i] = False
        new = np.maximum(m, fq[:, i])
        new[i] = _OUT
        if c is None or not incremental:
            c = _column_sums_np(fq, new, blocks)
        else:
            rows = np.flatnonzero(new != m)
            if len(rows) > _DENSE_FRACTION * n:
                c = _column_sums_np(fq, new, blocks)
            elif len(rows):
                mo = m[rows, None]
                fr = fq[rows] - mo  # int32; max(0, F - mo) - max(0, F - mn) = min(max(F - mo, 0), mn - mo)
                np.maximum(fr, 0, out=fr)
                np.minimum(fr, new[rows, None] - mo, out=fr)
                c = c - fr.sum(0, dtype=np.int32)
        m = new
    return order, gains


def _column_sums_np(fq: np.ndarray, m: np.ndarray, blocks) -> np.ndarray:
    """:func:`_column_sums` for one sample in NumPy, over precomputed row ``blocks``."""
    c = np.zeros(fq.shape[1], dtype=np.int32)
    for a, b in blocks:
        c += np.maximum(fq[a:b].astype(np.int32) - m[a:b, None], 0).sum(0, dtype=np.int32)
    return c
