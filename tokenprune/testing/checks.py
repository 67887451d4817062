"""Conformance checks: does a criterion, selector or method keep the tokenprune contract?

Plugin authors run these on their own components, as scikit-learn's ``check_estimator``:

>>> import tokenprune as tp
>>> from tokenprune.testing import check_criterion, check_selector, check_method
>>> check_criterion(tp.criteria.Coverage())
>>> check_selector(tp.selectors.TopK(), tp.criteria.Relevance())
>>> check_method(tp.compose(tp.criteria.Coverage(), selector="greedy", budget=4))

Each ``check_*`` runs every applicable check (gated by the component's tags) on a few small
deterministic contexts and raises :class:`ConformanceError` (an ``AssertionError``) naming the check
and what broke. ``criterion_checks`` / ``selector_checks`` / ``method_checks`` return the individual
checks as ``(name, callable)`` pairs, for ``pytest.mark.parametrize``.

The checks run on the CPU in float32 (plus fp16 and bf16 copies), on contexts with padding, all
standard signals (relevance, text embeddings, grid) and any extra signals you pass.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Iterable, Mapping

import torch

from ..budget import Budget
from ..context import TokenContext, make_context
from ..criteria.base import Criterion, WeightedSum, criterion_from_config
from ..errors import BudgetError, MissingSignalError
from ..selection import Selection
from ..selectors.base import Selector, selector_from_config

__all__ = ["ConformanceError", "example_context", "example_contexts", "check_criterion", "check_selector",
           "check_method", "criterion_checks", "selector_checks", "method_checks", "check_selection",
           "parametrize_with_checks", "signals_for", "STANDARD_SIGNALS"]

#: Signals :func:`example_context` provides; a criterion may require any of them.
STANDARD_SIGNALS = ("relevance", "text_embeddings", "grid")

#: Tolerance scale per dtype for comparisons of gains (relative to ``max(1, max |gain|)``).
_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


class ConformanceError(AssertionError):
    """A component breaks the tokenprune contract. The message names the check and the component."""


def _fail(check: str, obj, msg: str):
    """Raise :class:`ConformanceError` naming the check and the component."""
    raise ConformanceError(f"[{check}] {obj!r}: {msg}")


# ------------------------------------------------------------------------------------------------
# Contexts
# ------------------------------------------------------------------------------------------------


def example_context(*, batch: int = 3, rows: int = 4, cols: int = 4, dim: int = 8, seed: int = 0,
                    padding: bool = True, ties: bool = False, dtype: torch.dtype = torch.float32,
                    text_tokens: int = 3, signals: Mapping | None = None) -> TokenContext:
    """A small deterministic context with every standard signal.

    Parameters
    ----------
    batch, rows, cols, dim : int
        ``B`` samples of ``N = rows * cols`` tokens with ``dim`` channels; ``grid = (rows, cols)``.
    seed : int
        Seed of the values (and of the context).
    padding : bool
        If true (and ``B >= 2``), row 1 has its last third padded and row 2 (if any) every third
        token padded, so padding at the end and in the middle are both exercised.
    ties : bool
        If true, some tokens duplicate others exactly (features and relevance), to exercise ties.
    dtype : torch.dtype
        Dtype of the features and text embeddings.
    text_tokens : int
        ``T`` text embeddings per sample.
    signals : mapping, optional
        Extra signals: name to a tensor with leading dims ``[B, N]``, or to a callable
        ``(B, N, generator) -> tensor``.

    Returns
    -------
    TokenContext
        With ``relevance`` (positive, ``[B, N]``), ``text_embeddings`` ``[B, T, D]``,
        ``text_relevance`` (positive, ``[B, T]``), ``grid``.
    """
    g = torch.Generator().manual_seed(int(seed))
    n = rows * cols
    feats = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    rel = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.05
    if ties and n >= 4:
        src = torch.arange(0, n // 2, 2)
        feats[:, src + 1] = feats[:, src]
        rel[:, src + 1] = rel[:, src]
    mask = torch.ones(batch, n, dtype=torch.bool)
    if padding and batch >= 2 and n >= 3:
        mask[1, n - n // 3:] = False
        if batch >= 3:
            mask[2, 1::3] = False
    text = torch.randn(batch, max(1, text_tokens), dim, generator=g, dtype=torch.float64)
    text_rel = torch.rand(batch, max(1, text_tokens), generator=g, dtype=torch.float64) + 0.05
    extra = {}
    for name, v in (signals or {}).items():
        extra[name] = v(batch, n, g) if callable(v) else v
    return make_context(feats.to(dtype), mask=mask, relevance=rel.float(), text_embeddings=text.to(dtype),
                        text_relevance=text_rel.float(), grid=(rows, cols), seed=seed, **extra)


def example_contexts(signals: Mapping | None = None, *, ties: bool = True) -> list:
    """The default contexts of the checks: a padded 3 x 16 batch, one sample of 20 tokens, and (if
    ``ties``) a 2 x 9 batch whose tokens 1 and 3 duplicate tokens 0 and 2 exactly.

    Features have 8 channels, so the few tokens a check picks are linearly independent (kernel
    criteria such as log-det stay well conditioned) except for the exact duplicates.
    """
    out = [example_context(batch=3, rows=4, cols=4, dim=8, seed=0, signals=signals),
           example_context(batch=1, rows=4, cols=5, dim=8, seed=2, padding=False, signals=signals)]
    if ties:
        out.insert(1, example_context(batch=2, rows=3, cols=3, dim=8, seed=1, ties=True, signals=signals))
    return out


def _has_ties(ctx) -> bool:
    """Do two valid tokens of a row have identical features?"""
    x = ctx.features.float()
    for b in range(ctx.batch_size):
        v = x[b, ctx.mask[b]]
        if torch.unique(v, dim=0).shape[0] < v.shape[0]:
            return True
    return False


def signals_for(*components) -> frozenset:
    """Signal names the given criteria (or methods' objectives) declare in their tags."""
    out = set()
    for c in components:
        tags = getattr(c, "tags", None)
        if tags is not None:
            out |= set(tags.requires)
    return frozenset(out)


def _default_signal(B, N, g):
    """A positive random per-token signal ``[B, N]`` (for relevance-like inputs)."""
    return torch.rand(B, N, generator=g) + 0.05


def _with_required(signals: Mapping | None, *components) -> dict:
    """``signals`` plus a default ``[B, N]`` positive float tensor for every non-standard signal the
    components declare and the caller did not give."""
    out = dict(signals or {})
    for name in sorted(signals_for(*components)):
        if name not in STANDARD_SIGNALS and name != "text_mask" and name not in out:
            out[name] = _default_signal
    return out


def _rebuild(ctx: TokenContext, *, rows=None, tokens=None, drop=(), dtype=None, keep_grid=True) -> TokenContext:
    """A new validated context from parts of ``ctx``: a subset of rows, a subset/permutation of tokens,
    without some signals, or with another feature dtype."""
    r = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    t = slice(None) if tokens is None else torch.as_tensor(tokens, dtype=torch.long)

    def take(x):
        if x is None:
            return None
        x = x[r]
        return x[:, t]

    feats = take(ctx.features)
    if dtype is not None:
        feats = feats.to(dtype)
    te, tm, tr = ctx.text_embeddings, ctx.text_mask, ctx.text_relevance
    if te is not None:
        te, tm = te[r], tm[r]
        tr = None if tr is None else tr[r]
        if dtype is not None:
            te = te.to(dtype)
    kw = dict(mask=take(ctx.mask), relevance=take(ctx.relevance), text_embeddings=te, text_mask=tm,
              text_relevance=tr, grid=ctx.grid if (keep_grid and tokens is None) else None, seed=ctx.seed)
    kw.update({k: take(v) for k, v in ctx.extra.items()})
    for d in drop:
        if d == "text_embeddings":
            kw["text_embeddings"] = kw["text_mask"] = kw["text_relevance"] = None
        else:
            kw[d] = None
    return make_context(feats, **kw)


# ------------------------------------------------------------------------------------------------
# Criterion checks
# ------------------------------------------------------------------------------------------------


def _scale(*ts) -> float:
    """The largest finite magnitude among the tensors (at least 1), to scale tolerances."""
    m = 1.0
    for t in ts:
        if t is not None and t.numel():
            v = t[torch.isfinite(t)]
            if v.numel():
                m = max(m, float(v.abs().max()))
    return m


def _random_chain(ctx: TokenContext, steps: int, seed: int = 0):
    """Random picks ``[B, steps]`` among valid tokens with ``active`` flags (rows stop when out of tokens)."""
    g = torch.Generator().manual_seed(1234 + seed)
    B, N = ctx.mask.shape
    chosen = torch.zeros(B, N, dtype=torch.bool)
    picks = torch.zeros(B, steps, dtype=torch.long)
    active = torch.zeros(B, steps, dtype=torch.bool)
    for s in range(steps):
        cand = ctx.mask.cpu() & ~chosen
        w = torch.rand(B, N, generator=g).masked_fill(~cand, -1.0)
        idx = w.argmax(1)
        act = cand.any(1)
        picks[:, s] = idx
        active[:, s] = act
        chosen[act, idx[act]] = True
    return picks.to(ctx.device), active.to(ctx.device)


def _walk(crit: Criterion, ctx: TokenContext, picks, active):
    """Walk ``crit``'s state along a chain of picks.

    Yields ``(state, candidates [B, N])`` before each pick and after the last one; the state is
    advanced with ``crit.update`` only when the consumer asks for the next step.
    """
    B, N = ctx.mask.shape
    state = crit.prepare(ctx)
    chosen = torch.zeros(B, N, dtype=torch.bool, device=ctx.device)
    rows = torch.arange(B, device=ctx.device)
    for s in range(picks.shape[1] + 1):
        yield state, ctx.mask & ~chosen
        if s == picks.shape[1]:
            break
        idx, act = picks[:, s], active[:, s]
        state = crit.update(ctx, state, idx, act)
        chosen = chosen.clone()
        chosen[rows[act], idx[act]] = True


def _replay(crit: Criterion, ctx: TokenContext, picks, active):
    """Gains before each pick along a chain: lists of (gains [B, N] float32, candidates [B, N])."""
    return [(crit.gains(ctx, state, cand), cand) for state, cand in _walk(crit, ctx, picks, active)]


def _chain_len(ctx) -> int:
    """Picks in a random chain: up to 5, leaving at least one candidate in every row."""
    return max(1, min(5, int(ctx.n_valid.min()) - 1))


def check_criterion_is_dataclass(crit, ctx=None):
    """Frozen dataclass: constructors store parameters only; equal parameters give equal criteria."""
    name = "dataclass"
    if not isinstance(crit, Criterion):
        _fail(name, crit, f"is a {type(crit).__name__}, not a tokenprune Criterion")
    if not dataclasses.is_dataclass(crit) or not type(crit).__dataclass_params__.frozen:
        _fail(name, crit, "criteria must be @dataclass(frozen=True, kw_only=True) classes")
    if dataclasses.replace(crit) != crit:
        _fail(name, crit, "a copy with the same parameters does not compare equal")
    if not hasattr(crit.tags, "requires"):
        _fail(name, crit, "tags must be a tokenprune Tags")


def check_criterion_config(crit, ctx=None):
    """``to_config`` is JSON-able and rebuilds an equal criterion (registered criteria only)."""
    from ..registry import criteria

    if not isinstance(crit, WeightedSum) and criteria.name_of(crit) is None:
        return  # not registered (yet): no config name
    _check_config_round_trip(crit, criterion_from_config)


def _check_config_round_trip(obj, from_config, check="config", label=None):
    """``to_config()`` survives JSON and ``from_config`` rebuilds an equal object; returns the rebuilt one."""
    label = obj if label is None else label
    try:
        text = json.dumps(obj.to_config())
    except TypeError as exc:
        _fail(check, label, f"to_config() is not JSON-able: {exc}")
    back = from_config(json.loads(text))
    if back != obj:
        _fail(check, label, f"from_config(to_config()) gave {back!r}")
    return back


def check_criterion_signals(crit, ctx):
    """Every declared signal is needed (its absence raises MissingSignalError) and no undeclared one is."""
    req = set(crit.tags.requires)
    for sig in sorted(req):
        if sig not in STANDARD_SIGNALS and sig not in ctx.extra:
            _fail("signals", crit, f"requires the signal {sig!r}; pass it to the check with signals=")
    present = [s for s in STANDARD_SIGNALS if ctx.get_signal(s) is not None] + list(ctx.extra)
    for sig in present:
        small = _rebuild(ctx, drop=(sig,)) if sig in STANDARD_SIGNALS else _drop_extra(ctx, sig)
        try:
            crit.check(small)
            crit.prepare(small)
            raised = None
        except MissingSignalError as exc:
            raised = exc
        except Exception as exc:  # noqa: BLE001
            _fail("signals", crit, f"without {sig!r} it raised {type(exc).__name__}: {exc} "
                                   "(expected MissingSignalError if it needs it, or to work if not)")
        if sig in req and raised is None:
            _fail("signals", crit, f"declares it requires {sig!r} in tags.requires, but check() and prepare() work "
                                   "without it (tags.requires and check() disagree)")
        if sig not in req and raised is not None:
            _fail("signals", crit, f"needs {sig!r} but does not declare it in tags.requires: {raised}")


def _drop_extra(ctx, name):
    """``ctx`` without the extra signal ``name``."""
    return dataclasses.replace(ctx, extra={k: v for k, v in ctx.extra.items() if k != name})


def check_criterion_shapes(crit, ctx):
    """gains: float32 ``[B, N]``, finite at candidates, on the context's device, deterministic;
    evaluate: float32 ``[B]`` finite; neither changes the context."""
    name = "shapes"
    B, N = ctx.mask.shape
    before = ctx.features.clone()
    rel_before = None if ctx.relevance is None else ctx.relevance.clone()
    state = crit.prepare(ctx)
    g = crit.gains(ctx, state, ctx.mask)
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, N):
        _fail(name, crit, f"gains must be a [B, N] = {(B, N)} tensor, got "
                          f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if g.dtype != torch.float32:
        _fail(name, crit, f"gains must be float32, got {g.dtype}")
    if g.device != ctx.device:
        _fail(name, crit, f"gains are on {g.device}, the context on {ctx.device}")
    if not torch.isfinite(g[ctx.mask]).all():
        _fail(name, crit, "gains are not finite at valid tokens")
    g2 = crit.gains(ctx, crit.prepare(ctx), ctx.mask)
    if not torch.equal(g[ctx.mask], g2[ctx.mask]):
        _fail(name, crit, "gains differ between two identical calls (not deterministic)")
    sub = ctx.mask.clone()
    sub[:, ::2] = False
    v = crit.evaluate(ctx, sub)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B,) or v.dtype != torch.float32:
        _fail(name, crit, f"evaluate must return a float32 [B] tensor, got "
                          f"{(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if not torch.isfinite(v).all():
        _fail(name, crit, "evaluate is not finite")
    if not torch.equal(before, ctx.features) or (rel_before is not None and not torch.equal(rel_before, ctx.relevance)):
        _fail(name, crit, "changed the context's tensors in place")


def check_criterion_gains_match_evaluate(crit, ctx):
    """With ``exact_gains``: ``gains(S)[e] == evaluate(S ∪ {e}) - evaluate(S)`` along a random chain."""
    if not crit.tags.exact_gains:
        return
    B, N = ctx.mask.shape
    picks, active = _random_chain(ctx, _chain_len(ctx))
    for s, (g, cand) in enumerate(_replay(crit, ctx, picks, active)):
        chosen = ctx.mask & ~cand  # the picks so far (always valid tokens)
        base = crit.evaluate(ctx, chosen).float()
        diffs = torch.zeros(B, N)
        for e in range(N):
            with_e = chosen.clone()
            with_e[:, e] = True
            diffs[:, e] = crit.evaluate(ctx, with_e).float().cpu() - base.cpu()
        g = g.float().cpu()
        c = cand.cpu()
        tol = _TOL[torch.float32] * _scale(base, diffs[c], g[c]) * 10
        err = (g - diffs).abs().masked_fill(~c, 0.0)
        if float(err.max()) > tol:
            b, e = divmod(int(err.argmax()), N)
            _fail("gains_match_evaluate", crit, f"after {s} picks, row {b} token {e}: gains() = {float(g[b, e]):.6g} "
                                                f"but evaluate(S + e) - evaluate(S) = {float(diffs[b, e]):.6g}")


def check_criterion_tags_hold(crit, ctx):
    """Tag-gated properties along random chains: monotone (gains >= 0), non-increasing gains
    (submodular), constant gains (modular)."""
    tags = crit.tags
    if not (tags.monotone or tags.submodular or tags.nonincreasing_gains or tags.modular):
        return
    for seed in range(2):
        picks, active = _random_chain(ctx, _chain_len(ctx), seed=seed)
        hist = [(g.float().cpu(), c.cpu()) for g, c in _replay(crit, ctx, picks, active)]
        tol = _TOL[torch.float32] * _scale(*[g[c] for g, c in hist]) * 10
        for s, (g, c) in enumerate(hist):
            if tags.monotone and bool((g[c] < -tol).any()):
                _fail("monotone", crit, f"tagged monotone but a gain is {float(g[c].min()):.6g} < 0 after {s} picks")
            if s == 0:
                continue
            for s0 in range(s):
                g0 = hist[s0][0]
                if (tags.submodular or tags.nonincreasing_gains) and bool((g[c] > g0[c] + tol).any()):
                    what = "submodular" if tags.submodular else "nonincreasing_gains"
                    inc = float((g[c] - g0[c]).max())
                    _fail(what, crit, f"tagged {what} but a candidate's gain grew by {inc:.6g} from {s0} to {s} picks")
                if tags.modular and bool(((g[c] - g0[c]).abs() > tol).any()):
                    _fail("modular", crit, f"tagged modular but gains changed between {s0} and {s} picks")


def check_criterion_rows_independent(crit, ctx):
    """Rows of a batch are independent: each row alone gives the same gains, and so does the batch
    in reverse order; a padded row trimmed to its valid tokens gives the same gains there."""
    B, N = ctx.mask.shape
    picks, active = _random_chain(ctx, _chain_len(ctx))
    full = [(g.float().cpu(), c.cpu()) for g, c in _replay(crit, ctx, picks, active)]
    tol = _TOL[torch.float32] * _scale(*[g[c] for g, c in full]) * 10

    def compare(what, got, rows_map, cols=None):
        for s, ((g, c), (h, _)) in enumerate(zip(full, got)):
            for new_b, old_b in rows_map:
                ref = g[old_b][c[old_b]] if cols is None else g[old_b][cols][c[old_b][cols]]
                val = h[new_b][c[old_b] if cols is None else c[old_b][cols]]
                if ref.numel() and float((ref - val).abs().max()) > tol:
                    _fail("rows_independent", crit, f"{what}: row {old_b} gains differ after {s} picks "
                                                    f"(max diff {float((ref - val).abs().max()):.3g})")

    rev = list(range(B))[::-1]
    got = [(g.float().cpu(), c) for g, c in _replay(crit, _rebuild(ctx, rows=rev), picks[rev], active[rev])]
    compare("batch in reverse order", got, [(i, b) for i, b in enumerate(rev)])
    for b in range(B):
        got = [(g.float().cpu(), c) for g, c in _replay(crit, _rebuild(ctx, rows=[b]), picks[b:b + 1],
                                                           active[b:b + 1])]
        compare("row alone", got, [(0, b)])
    if "grid" in crit.tags.requires:
        return  # a trimmed row has no grid
    for b in range(B):
        pos = torch.nonzero(ctx.mask[b].cpu()).squeeze(1)
        if pos.numel() == N:
            continue
        new_of_old = torch.full((N,), -1, dtype=torch.long)
        new_of_old[pos] = torch.arange(pos.numel())
        p = new_of_old[picks[b].cpu()].clamp_min(0)[None]
        got = [(g.float().cpu(), c) for g, c in _replay(crit, _rebuild(ctx, rows=[b], tokens=pos), p.to(ctx.device),
                                                           active[b:b + 1])]
        for s, ((g, c), (h, _)) in enumerate(zip(full, got)):
            ref, val = g[b][pos], h[0]
            cc = c[b][pos]
            if cc.any() and float((ref[cc] - val[cc]).abs().max()) > tol:
                _fail("rows_independent", crit, f"padding changes the gains of row {b} after {s} picks "
                                                f"(max diff {float((ref[cc] - val[cc]).abs().max()):.3g})")


def check_criterion_permutation(crit, ctx):
    """Permuting the tokens permutes the gains the same way (skipped for criteria that need the grid)."""
    if "grid" in crit.tags.requires:
        return
    B, N = ctx.mask.shape
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N)
    picks, active = _random_chain(ctx, _chain_len(ctx))
    full = [(g.float().cpu(), c.cpu()) for g, c in _replay(crit, ctx, picks, active)]
    got = [(g.float().cpu(), c.cpu()) for g, c in _replay(crit, _rebuild(ctx, tokens=perm),
                                                           inv.to(ctx.device)[picks], active)]
    tol = _TOL[torch.float32] * _scale(*[g[c] for g, c in full]) * 10
    for s, ((g, c), (h, _)) in enumerate(zip(full, got)):
        diff = (g[:, perm] - h).abs().masked_fill(~c[:, perm], 0.0)
        if float(diff.max()) > tol:
            _fail("permutation", crit, f"gains are not permuted with the tokens after {s} picks "
                                       f"(max diff {float(diff.max()):.3g})")


def check_criterion_dtypes(crit, ctx, dtypes=(torch.float16, torch.bfloat16)):
    """fp16 and bf16 features give float32 gains close to the float32 ones (dtype-scaled tolerance)."""
    picks, active = _random_chain(ctx, min(2, _chain_len(ctx)))
    ref = [(g.float().cpu(), c.cpu()) for g, c in _replay(crit, ctx, picks, active)]
    for dt in dtypes:
        low = _rebuild(ctx, dtype=dt)
        got = _replay(crit, low, picks, active)
        for s, ((g, c), (h, _)) in enumerate(zip(ref, got)):
            if h.dtype != torch.float32:
                _fail("dtypes", crit, f"gains must be float32 for {dt} features, got {h.dtype}")
            h = h.cpu()
            if not torch.isfinite(h[c]).all():
                _fail("dtypes", crit, f"gains are not finite with {dt} features")
            tol = _TOL[dt] * _scale(g[c])
            if c.any() and float((g[c] - h[c]).abs().max()) > tol:
                _fail("dtypes", crit, f"{dt} gains differ from float32 ones by {float((g[c] - h[c]).abs().max()):.3g} "
                                      f"> {tol:.3g} after {s} picks")


def check_criterion_gains_at(crit, ctx):
    """``gains_at(index)`` (the few-candidates path lazy and stochastic greedy use) equals
    ``gains().gather(1, index)`` along a random chain."""
    if not hasattr(crit, "gains_at"):
        return
    B, N = ctx.mask.shape
    picks, active = _random_chain(ctx, _chain_len(ctx))
    g = torch.Generator().manual_seed(99)
    for s, (state, cand) in enumerate(_walk(crit, ctx, picks, active)):
        full = crit.gains(ctx, state, cand).float()
        # a few candidate positions per row (any valid position; padding rows repeat a valid one)
        w = torch.rand(B, N, generator=g).to(ctx.device).masked_fill(~cand, -1.0)
        index = w.topk(min(3, N), dim=1).indices
        index = torch.where(cand.gather(1, index), index, w.argmax(1, keepdim=True))
        part = crit.gains_at(ctx, state, index, cand)
        want = full.gather(1, index)
        if tuple(part.shape) != tuple(index.shape):
            _fail("gains_at", crit, f"gains_at must return {tuple(index.shape)}, got {tuple(part.shape)}")
        tol = _TOL[torch.float32] * _scale(want)
        if float((part.float() - want).abs().max()) > tol:
            _fail("gains_at", crit, f"gains_at differs from gains().gather after {s} picks "
                                    f"(max diff {float((part.float() - want).abs().max()):.3g})")


_CRITERION_CHECKS = [
    ("is_dataclass", check_criterion_is_dataclass, False),
    ("config", check_criterion_config, False),
    ("signals", check_criterion_signals, True),
    ("shapes", check_criterion_shapes, True),
    ("gains_match_evaluate", check_criterion_gains_match_evaluate, True),
    ("gains_at", check_criterion_gains_at, True),
    ("tags_hold", check_criterion_tags_hold, True),
    ("rows_independent", check_criterion_rows_independent, True),
    ("permutation", check_criterion_permutation, True),
    ("dtypes", check_criterion_dtypes, True),
]


def criterion_checks(crit: Criterion, *, contexts: Iterable | None = None, signals: Mapping | None = None) -> list:
    """The criterion checks as ``(name, callable)`` pairs (each callable takes no argument).

    Checks that compare values (gains against evaluate, across rows, permutations or dtypes, along
    chains of picks) run on the contexts without duplicated tokens: exact duplicates make kernel
    criteria singular, where any two computations legitimately differ. The others run on all.
    """
    ctxs = list(contexts) if contexts is not None else example_contexts(_with_required(signals, crit))
    exact = [c for c in ctxs if not _has_ties(c)] or ctxs
    out = []
    for name, fn, needs_ctx in _CRITERION_CHECKS:
        if not needs_ctx:
            out.append((name, functools.partial(fn, crit)))
        elif name in ("signals", "shapes"):
            out.append((name, functools.partial(_on_all, fn, ctxs, crit)))
        else:
            out.append((name, functools.partial(_on_all, fn, exact, crit)))
    return out


def _on_all(fn, ctxs, *lead, **kw):
    """Run ``fn(*lead, ctx, **kw)`` on every context of ``ctxs`` (a check on several contexts)."""
    for ctx in ctxs:
        fn(*lead, ctx, **kw)


def check_criterion(crit: Criterion, *, contexts: Iterable | None = None, signals: Mapping | None = None) -> None:
    """Run every criterion check on ``crit``.

    Parameters
    ----------
    crit : Criterion
        The criterion (an instance, with its parameters).
    contexts : iterable of TokenContext, optional
        Contexts to check on (default: :func:`example_contexts`). Each should carry padding, the
        standard signals and those ``crit.tags.requires`` names.
    signals : mapping, optional
        Extra (plugin) signals for the default contexts: name to a ``[B, N, ...]`` tensor or a
        callable ``(B, N, generator) -> tensor``. A required signal that is neither standard nor
        given here gets a default positive ``[B, N]`` float tensor.

    Raises
    ------
    ConformanceError
        The first check that fails, with the check's name and what broke.

    Notes
    -----
    Checks: frozen dataclass; config round trip (registered criteria); declared signals are needed
    and sufficient; shapes, dtype float32, determinism, no in-place change of the context; gains
    equal ``evaluate`` differences (``exact_gains``); monotone / submodular / non-increasing /
    modular when tagged; batch rows independent and padding inert; permutation equivariance (not
    for grid criteria); fp16 and bf16 features.
    """
    for _, fn in criterion_checks(crit, contexts=contexts, signals=signals):
        fn()


# ------------------------------------------------------------------------------------------------
# Selector checks
# ------------------------------------------------------------------------------------------------


def check_selection(sel: Selection, ctx: TokenContext, budget, *, who=None, exact: bool = True) -> None:
    """Raise :class:`ConformanceError` unless ``sel`` is a valid selection of ``budget`` tokens on ``ctx``.

    Exactly ``min(k_b, valid_b)`` entries per row (``k_b`` the resolved budget; with
    ``exact=False``, for selectors that may keep fewer such as pooling, between 1 and that), unique,
    ascending, in range, never padding; ``-1`` after them; ``order`` the same set; ``gains`` float32
    finite; ``features`` (merging selectors) ``[B, K, D]`` finite at valid entries.
    """
    who = who if who is not None else "selection"
    name = "selection"
    B, N, D = ctx.features.shape
    if not isinstance(sel, Selection):
        _fail(name, who, f"returned {type(sel).__name__}, not a Selection")
    want = Budget(budget).resolve_batch(ctx.n_valid).cpu()
    idx, order, valid, gains = sel.indices.cpu(), sel.order.cpu(), sel.valid.cpu(), sel.gains.cpu()
    K = int(want.max()) if exact else int(idx.shape[1]) if idx.dim() == 2 else -1
    for t, nm in ((idx, "indices"), (order, "order"), (valid, "valid"), (gains, "gains")):
        if tuple(t.shape) != (B, K):
            _fail(name, who, f"{nm} must be [B, K] = {(B, K)} for budget {budget!r}, got {tuple(t.shape)}")
    if idx.dtype != torch.long or order.dtype != torch.long or valid.dtype != torch.bool:
        _fail(name, who, "indices and order must be long, valid bool")
    if gains.dtype != torch.float32:
        _fail(name, who, f"gains must be float32, got {gains.dtype}")
    counts = valid.sum(1)
    if exact and not torch.equal(counts, want):
        _fail(name, who, f"kept {counts.tolist()} tokens per row for budget {budget!r}, expected {want.tolist()}")
    if not exact and (bool((counts > want).any()) or bool((counts < 1).any())):
        _fail(name, who, f"kept {counts.tolist()} tokens per row for budget {budget!r}, expected between 1 and "
                         f"{want.tolist()}")
    if not torch.equal(valid, torch.arange(K)[None] < counts[:, None]):
        _fail(name, who, "valid must be a prefix of each row")
    mask = ctx.mask.cpu()
    for b in range(B):
        c = int(counts[b])
        row = idx[b, :c]
        if c and (int(row.min()) < 0 or int(row.max()) >= N):
            _fail(name, who, f"row {b} has indices out of [0, {N}): {row.tolist()}")
        if c > 1 and not bool((row[1:] > row[:-1]).all()):
            _fail(name, who, f"row {b} indices are not strictly ascending (sorted, unique): {row.tolist()}")
        if c and not bool(mask[b, row].all()):
            _fail(name, who, f"row {b} keeps padding positions: {row[~mask[b, row]].tolist()}")
        if bool((idx[b, c:] != -1).any()):
            _fail(name, who, f"row {b} must hold -1 after its {c} entries")
        if sorted(order[b, :c].tolist()) != row.tolist():
            _fail(name, who, f"row {b}: order {order[b, :c].tolist()} is not the kept set {row.tolist()}")
        if not torch.isfinite(gains[b, :c]).all():
            _fail(name, who, f"row {b} gains are not finite")
    if sel.features is not None:
        f = sel.features
        if tuple(f.shape) != (B, K, D):
            _fail(name, who, f"features must be [B, K, D] = {(B, K, D)}, got {tuple(f.shape)}")
        if not torch.isfinite(f.float().cpu()[valid]).all():
            _fail(name, who, "merged features are not finite at valid entries")


def _same(a: Selection, b: Selection, features=True) -> bool:
    """Whether two selections keep the same tokens (and, with ``features``, close features)."""
    if not (torch.equal(a.indices.cpu(), b.indices.cpu()) and torch.equal(a.valid.cpu(), b.valid.cpu())):
        return False
    if features and (a.features is None) != (b.features is None):
        return False
    if features and a.features is not None:
        va = a.valid.cpu()
        return torch.allclose(a.features.float().cpu()[va], b.features.float().cpu()[va], atol=1e-5, rtol=1e-4)
    return True


def _tied(ctx, b, idx_a, idx_b) -> bool:
    """Do two kept sets of row ``b`` differ only by exactly duplicated tokens (equal features and signals)?"""
    def key(i):
        parts = [ctx.features[b, i].double().cpu()]
        if ctx.relevance is not None:
            parts.append(ctx.relevance[b, i].double().cpu().reshape(1))
        return tuple(torch.cat(parts).tolist())

    if idx_a.numel() != idx_b.numel():
        return False
    return sorted(key(int(i)) for i in idx_a) == sorted(key(int(i)) for i in idx_b)


def _budgets_for(ctx) -> list:
    """Budgets every selector is checked at on ``ctx``: small, half, fractions, all and above all."""
    n = ctx.num_tokens
    return [1, 3, max(1, n // 2), 0.25, 0.5, 1.0, n, n + 4]


def check_selector_is_dataclass(selector, objective=None):
    """Frozen dataclass with a config round trip (registered selectors)."""
    from ..registry import selectors

    if not isinstance(selector, Selector):
        _fail("dataclass", selector, f"is a {type(selector).__name__}, not a tokenprune Selector")
    if not dataclasses.is_dataclass(selector) or not type(selector).__dataclass_params__.frozen:
        _fail("dataclass", selector, "selectors must be @dataclass(frozen=True, kw_only=True) classes")
    if selectors.name_of(selector) is not None:
        _check_config_round_trip(selector, selector_from_config)


def _exact(selector) -> bool:
    """Whether ``selector`` keeps exactly ``min(budget, valid)`` tokens."""
    return bool(getattr(selector, "exact_budget", True))


def check_selector_budgets(selector, objective, ctx):
    """Valid selections of ``min(k, valid)`` tokens for int and float budgets (at most that for
    selectors with ``exact_budget = False``); everything kept at or above the valid count (exact
    selectors); deterministic for the context's seed."""
    exact = _exact(selector)
    for budget in _budgets_for(ctx):
        sel = selector.select(objective, ctx, budget)
        check_selection(sel, ctx, budget, who=selector, exact=exact)
        again = selector.select(objective, ctx, budget)
        if not _same(sel, again):
            _fail("deterministic", selector, f"two runs with seed {ctx.seed} and budget {budget!r} differ")
        if exact and isinstance(budget, int) and budget >= ctx.num_tokens:
            for b in range(ctx.batch_size):
                c = int(ctx.n_valid[b])
                if sel.indices[b, :c].cpu().tolist() != torch.nonzero(ctx.mask[b].cpu()).squeeze(1).tolist():
                    _fail("keep_all", selector, f"budget {budget} >= valid tokens must keep every valid token "
                                                f"(row {b})")


def check_selector_bad_budgets(selector, objective, ctx):
    """Invalid budgets raise BudgetError."""
    for bad in (0, -1, 1.5, True, float("nan"), "3", None):
        try:
            selector.select(objective, ctx, bad)
        except BudgetError:
            continue
        except Exception as exc:  # noqa: BLE001
            _fail("bad_budgets", selector, f"budget {bad!r} raised {type(exc).__name__}, expected BudgetError")
        _fail("bad_budgets", selector, f"budget {bad!r} was accepted")


def check_selector_rows_independent(selector, objective, ctx):
    """Selecting a batch equals selecting each sample alone."""
    for budget in (3, 0.5):
        full = selector.select(objective, ctx, budget)
        for b in range(ctx.batch_size):
            one = selector.select(objective, _rebuild(ctx, rows=[b]), budget)
            c = int(one.counts[0])
            if full.indices[b, :c].cpu().tolist() != one.indices[0, :c].cpu().tolist() and not _tied(
                    ctx, b, full.indices[b, :c], one.indices[0, :c]):
                batch_kept, alone_kept = full.indices[b, :c].tolist(), one.indices[0, :c].tolist()
                _fail("rows_independent", selector, f"budget {budget!r}: row {b} in the batch kept "
                                                    f"{batch_kept}, alone {alone_kept}")
            if full.features is not None and not torch.allclose(
                    full.features[b, :c].float().cpu(), one.features[0, :c].float().cpu(), atol=1e-5, rtol=1e-4):
                _fail("rows_independent", selector, f"budget {budget!r}: row {b} merged features differ alone")


def check_selector_prefix(selector, objective, ctx):
    """Greedy-type selectors: the picks at budget ``k`` are the first ``k`` picks at a larger budget."""
    big = selector.select(objective, ctx, ctx.num_tokens)
    for k in (1, 2, 4):
        small = selector.select(objective, ctx, k)
        for b in range(ctx.batch_size):
            c = int(small.counts[b])
            if sorted(small.order[b, :c].tolist()) != sorted(big.order[b, :c].tolist()):
                _fail("prefix", selector, f"row {b}: budget {k} kept {small.order[b, :c].tolist()}, but the first "
                                          f"{c} picks at budget {ctx.num_tokens} are {big.order[b, :c].tolist()}")


def check_selector_dtypes(selector, objective, ctx, dtypes=(torch.float16, torch.bfloat16)):
    """fp16 and bf16 features give valid selections (merged features keep the input dtype)."""
    for dt in dtypes:
        low = _rebuild(ctx, dtype=dt)
        sel = selector.select(objective, low, 3)
        check_selection(sel, low, 3, who=selector, exact=_exact(selector))
        if sel.features is not None and sel.features.dtype != dt:
            _fail("dtypes", selector, f"merged features are {sel.features.dtype} for {dt} input")


def check_selector_matches(selector, objective, ctx, reference):
    """Same kept sets as a reference selector (e.g. lazy greedy against plain greedy)."""
    for budget in (1, 3, 0.5):
        a = selector.select(objective, ctx, budget)
        r = reference.select(objective, ctx, budget)
        if not _same(a, r, features=False):
            _fail("matches_reference", selector, f"budget {budget!r}: kept {a.indices.tolist()}, reference "
                                                 f"{reference!r} kept {r.indices.tolist()}")


def selector_checks(selector: Selector, objective: Criterion | None = None, *, contexts: Iterable | None = None,
                    signals: Mapping | None = None, prefix: bool | None = None, reference: Selector | None = None,
                    rows_independent: bool | None = None) -> list:
    """The selector checks as ``(name, callable)`` pairs (see :func:`check_selector`)."""
    ctxs = list(contexts) if contexts is not None else example_contexts(_with_required(signals, objective))
    exact = [c for c in ctxs if not _has_ties(c)] or ctxs
    if prefix is None:
        prefix = bool(getattr(selector, "prefix_property", False))
    if rows_independent is None:
        rows_independent = bool(getattr(selector, "rows_independent", True))
    out = [("is_dataclass", functools.partial(check_selector_is_dataclass, selector)),
           ("budgets", functools.partial(_on_all, check_selector_budgets, ctxs, selector, objective)),
           ("bad_budgets", functools.partial(check_selector_bad_budgets, selector, objective, ctxs[0])),
           ("dtypes", functools.partial(_on_all, check_selector_dtypes, ctxs, selector, objective))]
    if rows_independent:
        out.append(("rows_independent", functools.partial(_on_all, check_selector_rows_independent, ctxs,
                                                          selector, objective)))
    if prefix:
        # ties make the prefix ambiguous: only on tie-free contexts
        out.append(("prefix", functools.partial(_on_all, check_selector_prefix, exact, selector, objective)))
    if reference is not None:
        out.append(("matches_reference", functools.partial(_on_all, check_selector_matches, exact, selector,
                                                           objective, reference=reference)))
    return out


def check_selector(selector: Selector, objective: Criterion | None = None, *, contexts: Iterable | None = None,
                   signals: Mapping | None = None, prefix: bool | None = None, reference: Selector | None = None,
                   rows_independent: bool | None = None) -> None:
    """Run every selector check on ``selector`` optimising ``objective``.

    Parameters
    ----------
    selector : Selector
        The selector instance.
    objective : Criterion or None
        What it optimises (``None`` for objective-free selectors such as random or pooling).
    contexts : iterable of TokenContext, optional
        Contexts to check on (default: :func:`example_contexts`; the second has exact ties).
    signals : mapping, optional
        Extra signals for the default contexts (see :func:`check_criterion`).
    prefix : bool, optional
        Check the prefix property (greedy and top-k selectors). Default: the selector's
        ``prefix_property`` attribute, else False.
    reference : Selector, optional
        A selector that must keep the same sets (e.g. ``Greedy()`` for ``Greedy(lazy=True)``).
    rows_independent : bool, optional
        Check that a batch selects as its samples alone. Default: the selector's
        ``rows_independent`` attribute, else True (stochastic selectors that draw from one generator
        for the whole batch opt out with ``rows_independent = False`` and say so in their docs).

    Selectors that may keep fewer tokens than the budget (pooling to a grid) declare
    ``exact_budget = False``; their counts are checked to lie between 1 and ``min(k, valid)``.

    Raises
    ------
    ConformanceError
        The first check that fails.

    Notes
    -----
    Checks: frozen dataclass and config round trip; for int and float budgets exactly
    ``min(k, valid)`` unique ascending in-range indices, never padding, ``-1`` padding after them,
    finite gains and merged features; keep-all at or above the valid count; deterministic for a
    seed; invalid budgets raise :class:`~tokenprune.errors.BudgetError`; fp16/bf16 features;
    batch equals per-sample; the prefix property; agreement with a reference.
    """
    for _, fn in selector_checks(selector, objective, contexts=contexts, signals=signals, prefix=prefix,
                                 reference=reference, rows_independent=rows_independent):
        fn()


# ------------------------------------------------------------------------------------------------
# Method checks
# ------------------------------------------------------------------------------------------------


def check_method_config(method, ctx):
    """``to_config`` survives ``json.dumps`` and rebuilds an equal method with equal selections."""
    from ..methods.compose import PruningMethod

    if not isinstance(method, PruningMethod):
        _fail("method_config", method, f"is a {type(method).__name__}, not a PruningMethod")
    back = _check_config_round_trip(method, PruningMethod.from_config, "method_config", method.name or method)
    for i in range(len(method.stages)):
        for budget in (None, 3):
            a = method.select(ctx.features, mask=ctx.mask, stage=i, budget=budget, **_signals_kw(ctx))
            b = back.select(ctx.features, mask=ctx.mask, stage=i, budget=budget, **_signals_kw(ctx))
            if not _same(a, b):
                _fail("method_config", method.name or method, f"stage {i}: the rebuilt method selects differently")


def _signals_kw(ctx) -> dict:
    """``ctx``'s signals as keyword arguments of :meth:`PruningMethod.select`."""
    kw = dict(relevance=ctx.relevance, text_embeddings=ctx.text_embeddings, text_mask=ctx.text_mask,
              text_relevance=ctx.text_relevance, grid=ctx.grid, seed=ctx.seed)
    kw.update(ctx.extra)
    return kw


def check_method_stages(method, ctx):
    """Every stage's selection core gives valid selections at its own budget and at a few others."""
    for i, st in enumerate(method.stages):
        for budget in (st.budget, 1, 3, 0.5, ctx.num_tokens):
            sel = method.select(ctx.features, mask=ctx.mask, stage=i, budget=budget, **_signals_kw(ctx))
            check_selection(sel, ctx, budget, who=f"{method.name or 'method'} stage {i}", exact=_exact(st.selector))
        a = method.select(ctx.features, mask=ctx.mask, stage=i, budget=3, **_signals_kw(ctx))
        b = method.select(ctx.features, mask=ctx.mask, stage=i, budget=3, **_signals_kw(ctx))
        if not _same(a, b):
            _fail("deterministic", method.name or method, f"stage {i} differs between two identical runs")


def check_method_layers(method, ctx=None):
    """Stage layers map to valid decoder layers for a range of depths, in increasing order."""
    for depth in (4, 24, 28, 32, 40, 80):
        layers = [s.layer_for_depth(depth) for s in method.stages if not s.before_llm]
        if any(lay < 1 for lay in layers):
            _fail("layers", method.name or method, f"a stage maps to layer < 1 at depth {depth}: {layers}")
        if layers != sorted(layers):
            _fail("layers", method.name or method, f"stage layers are not increasing at depth {depth}: {layers}")


def method_checks(method, *, contexts: Iterable | None = None, signals: Mapping | None = None) -> list:
    """The method checks as ``(name, callable)`` pairs (see :func:`check_method`)."""
    objectives = [st.objective for st in method.stages] if hasattr(method, "stages") else []
    ctxs = list(contexts) if contexts is not None else example_contexts(_with_required(signals, *objectives))
    return [("config", functools.partial(_on_all, check_method_config, ctxs, method)),
            ("stages", functools.partial(_on_all, check_method_stages, ctxs, method)),
            ("layers", functools.partial(check_method_layers, method))]


def check_method(method, *, contexts: Iterable | None = None, signals: Mapping | None = None) -> None:
    """Run every method check on a :class:`~tokenprune.PruningMethod`.

    Checks: the config survives a JSON round trip and gives an equal method with equal selections;
    each stage's selection core is valid and deterministic at its budget and others; in-LLM layers
    stay valid and increasing when scaled to other depths.

    Raises
    ------
    ConformanceError
        The first check that fails.
    """
    for _, fn in method_checks(method, contexts=contexts, signals=signals):
        fn()


# ------------------------------------------------------------------------------------------------
# pytest helper
# ------------------------------------------------------------------------------------------------


def parametrize_with_checks(components, **kwargs):
    """A ``pytest.mark.parametrize`` over every check of every component, one test per check.

    Parameters
    ----------
    components : iterable
        Criteria, :class:`~tokenprune.PruningMethod` objects, or ``(selector, objective)`` pairs.
    **kwargs
        Passed to :func:`criterion_checks` / :func:`selector_checks` / :func:`method_checks` (e.g.
        ``signals=``; ``prefix=`` and ``reference=`` apply to selectors only).

    Returns
    -------
    pytest.MarkDecorator
        Parametrizes the arguments ``component`` and ``check``; the test body calls ``check()``.

    Examples
    --------
    .. code-block:: python

        @parametrize_with_checks([MyCriterion(), (MySelector(), Coverage())])
        def test_conformance(component, check):
            check()
    """
    import pytest

    from ..methods.compose import PruningMethod

    params, ids = [], []
    sel_only = {k: kwargs.pop(k) for k in ("prefix", "reference", "rows_independent") if k in kwargs}
    for comp in components:
        if isinstance(comp, tuple):
            selector, objective = comp
            checks = selector_checks(selector, objective, **kwargs, **sel_only)
            label = f"{selector!r}-{objective!r}"
        elif isinstance(comp, PruningMethod):
            checks = method_checks(comp, **kwargs)
            label = comp.name or repr(comp)
        else:
            checks = criterion_checks(comp, **kwargs)
            label = repr(comp)
        for name, fn in checks:
            params.append((comp, fn))
            ids.append(f"{label}-{name}")
    return pytest.mark.parametrize("component, check", params, ids=ids)
