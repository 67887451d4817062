"""Hypothesis strategies for tokenprune inputs: features, masks, budgets, contexts and subsets.

For plugin authors' property tests, as ``polars.testing.parametric``:

>>> from hypothesis import given, settings
>>> from tokenprune.testing import strategies as tps
>>> @settings(max_examples=5, deadline=None)
... @given(ctx=tps.contexts())
... def test_gains_are_finite(ctx):
...     ...

Tensor values are drawn from a seeded ``torch`` generator (the strategies draw the seed and the
shapes), which keeps large tensors cheap and shrinks to small shapes. Continuous values have no exact
ties; pass ``ties=True`` to duplicate some tokens exactly (features and relevance), which selectors
must handle (unique indices, a valid count) while tie-breaking may differ.

Requires ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..context import TokenContext, make_context

__all__ = ["seeds", "dtypes", "shapes", "features", "masks", "budgets", "bad_budgets", "contexts", "subsets", "grids"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def seeds() -> st.SearchStrategy:
    """Seeds for the value generator."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def dtypes(low_precision: bool = True) -> st.SearchStrategy:
    """Feature dtypes: float32, and fp16 / bf16 if ``low_precision``."""
    return st.sampled_from(list(_DTYPES.values()) if low_precision else [torch.float32])


@st.composite
def grids(draw, max_side: int = 6, max_tokens: int = 36) -> tuple:
    """``(rows, cols)`` patch grids with ``rows * cols <= max_tokens``."""
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max(1, min(max_side, max_tokens // rows))))
    return rows, cols


@st.composite
def shapes(draw, batch=st.integers(1, 3), tokens=st.integers(1, 24), dim=st.integers(3, 8)) -> tuple:
    """``(B, N, D)``. ``dim`` starts at 3: in 1-2 dimensions cosine similarities tie exactly."""
    return draw(batch), draw(tokens), draw(dim)


def _randn(seed: int, shape, dtype) -> torch.Tensor:
    """Seeded standard normal values of ``shape``, drawn in float64 and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def features(draw, shape=None, *, dtype=torch.float32, ties: bool = False, scale=st.sampled_from([1e-2, 1.0, 30.0])):
    """``[B, N, D]`` features (standard normal times a drawn scale).

    Parameters
    ----------
    shape : strategy or tuple, optional
        ``(B, N, D)`` or a strategy of it (default :func:`shapes`).
    dtype : torch.dtype or strategy
        Feature dtype.
    ties : bool
        Duplicate some tokens exactly (at random pairs).
    """
    if shape is None:
        shape = shapes()
    B, N, D = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    x = _randn(draw(seeds()), (B, N, D), torch.float64) * draw(scale)
    if ties and N >= 2:
        n_dup = draw(st.integers(1, max(1, N // 2)))
        for _ in range(n_dup):
            i, j = draw(st.integers(0, N - 1)), draw(st.integers(0, N - 1))
            x[:, j] = x[:, i]
    return x.to(dt)


@st.composite
def masks(draw, batch: int, tokens: int, *, padding: bool = True, min_valid: int = 1) -> torch.Tensor:
    """bool ``[B, N]`` validity masks with at least ``min_valid`` valid tokens per row.

    Padding is drawn per row as a tail (the common layout) or at random positions.
    """
    m = torch.ones(batch, tokens, dtype=torch.bool)
    if not padding or tokens <= min_valid:
        return m
    for b in range(batch):
        kind = draw(st.sampled_from(["none", "tail", "scattered"]))
        if kind == "tail":
            n = draw(st.integers(min_valid, tokens))
            m[b, n:] = False
        elif kind == "scattered":
            keep = draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))
            row = torch.tensor(keep, dtype=torch.bool)
            if int(row.sum()) < min_valid:
                row[:min_valid] = True
            m[b] = row
    return m


@st.composite
def budgets(draw, max_tokens: int = 32, *, ints: bool = True, floats: bool = True):
    """Valid budgets: ints in ``[1, max_tokens + 2]`` (above the count keeps all) and floats in (0, 1]."""
    opts = []
    if ints:
        opts.append(st.integers(1, max(1, max_tokens + 2)))
    if floats:
        opts.append(st.floats(min_value=1e-3, max_value=1.0, allow_nan=False, allow_infinity=False,
                              exclude_min=False).filter(lambda f: f > 0))
        opts.append(st.sampled_from([1.0, 0.5, 0.25]))
    return draw(st.one_of(*opts))


def bad_budgets() -> st.SearchStrategy:
    """Invalid budgets: zero and negative ints, floats outside (0, 1], NaN, inf, bools, non-numbers."""
    return st.one_of(st.integers(max_value=0), st.floats(min_value=1.0, exclude_min=True, allow_infinity=True),
                     st.floats(max_value=0.0), st.just(float("nan")), st.booleans(), st.just("3"), st.none())


@st.composite
def contexts(draw, *, batch=st.integers(1, 3), grid=None, dim=st.integers(3, 8), dtype=torch.float32,
             padding: bool = True, ties: bool = False,
             signals=("relevance", "text_embeddings", "grid"), extra=None) -> TokenContext:
    """Validated :class:`~tokenprune.context.TokenContext` objects.

    Parameters
    ----------
    batch, dim : strategies of int
        Batch size and feature width.
    grid : strategy of (rows, cols), optional
        The patch grid (default :func:`grids`); ``N = rows * cols``.
    dtype : torch.dtype or strategy
        Feature and text-embedding dtype.
    padding : bool
        Draw padding (see :func:`masks`).
    ties : bool
        Duplicate some tokens (features and relevance) exactly.
    signals : tuple of str
        Which standard signals to attach: ``"relevance"`` (positive ``[B, N]``), ``"text_embeddings"``
        (``[B, T, D]`` with a text mask and positive ``text_relevance`` ``[B, T]``) and ``"grid"``.
    extra : mapping, optional
        Plugin signals: name to a callable ``(B, N, generator) -> tensor``.
    """
    B = draw(batch)
    rows, cols = draw(grid if grid is not None else grids())
    N = rows * cols
    D = draw(dim)
    dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    x = draw(features((B, N, D), dtype=torch.float64, ties=False))
    seed = draw(seeds())
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(B, N, generator=g, dtype=torch.float64) + 1e-3
    if ties and N >= 2:
        for _ in range(draw(st.integers(1, max(1, N // 2)))):
            i, j = draw(st.integers(0, N - 1)), draw(st.integers(0, N - 1))
            x[:, j] = x[:, i]
            rel[:, j] = rel[:, i]
    mask = draw(masks(B, N, padding=padding))
    kw = {}
    if "relevance" in signals:
        kw["relevance"] = rel.float()
    if "text_embeddings" in signals:
        T = draw(st.integers(1, 4))
        kw["text_embeddings"] = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dt)
        tm = torch.ones(B, T, dtype=torch.bool)
        if T > 1 and draw(st.booleans()):
            tm[:, T - 1] = False
        kw["text_mask"] = tm
        kw["text_relevance"] = (torch.rand(B, T, generator=g, dtype=torch.float64) + 1e-3).float()
    if "grid" in signals:
        kw["grid"] = (rows, cols)
    for name, fn in (extra or {}).items():
        kw[name] = fn(B, N, g)
    return make_context(x.to(dt), mask=mask, seed=draw(st.integers(0, 1000)), **kw)


@st.composite
def subsets(draw, ctx: TokenContext, *, max_size: int | None = None) -> torch.Tensor:
    """bool ``[B, N]`` subsets of the valid tokens of ``ctx`` (at most ``max_size`` per row)."""
    B, N = ctx.mask.shape
    out = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        pos = torch.nonzero(ctx.mask[b].cpu()).squeeze(1).tolist()
        cap = len(pos) if max_size is None else min(len(pos), max_size)
        chosen = draw(st.lists(st.sampled_from(pos), max_size=cap, unique=True)) if pos else []
        out[b, chosen] = True
    return out.to(ctx.device)

