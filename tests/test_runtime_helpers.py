"""The runtime's small tensor helpers against plain references, and the report's per-sample tensors.

``gather`` copies whole rows with ``index_select`` along dim 1 and falls back to ``torch.gather``
elsewhere; ``true_positions`` scatters one ``nonzero`` over the batch. Both must equal the obvious
per-sample loops exactly, holes and broadcast batches included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.runtime.state import gather, take_rows, true_positions
from tokenprune.testing.tiny_models import shared_tiny_vlm


def gather_reference(t, idx, dim, fill):
    """One sample and one index at a time."""
    B = idx.shape[0]
    t = t.expand(B, *t.shape[1:]) if t.shape[0] != B else t
    rows = []
    for b in range(B):
        parts = []
        for i in idx[b].tolist():
            piece = t[b].select(dim - 1, max(i, 0)).unsqueeze(dim - 1)
            parts.append(torch.full_like(piece, fill) if i < 0 else piece)
        rows.append(torch.cat(parts, dim - 1) if parts else t[b].narrow(dim - 1, 0, 0))
    return torch.stack(rows)


@st.composite
def gather_cases(draw):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    trailing = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    dim = draw(st.integers(1, 1 + len(trailing)))
    size = [B, L, *trailing]
    n_idx = draw(st.integers(0, 7))
    idx = torch.tensor(draw(st.lists(st.lists(st.integers(-1, size[dim] - 1), min_size=n_idx, max_size=n_idx),
                                     min_size=B, max_size=B)), dtype=torch.long).view(B, n_idx)
    broadcast = draw(st.sampled_from(["none", "batch_one", "expanded"]))
    t = torch.randn(size) if draw(st.booleans()) else torch.randint(-50, 50, size)
    if broadcast == "batch_one":
        t = t[:1]
    elif broadcast == "expanded":
        t = t[:1].expand(B, *size[1:])
    fill = draw(st.sampled_from([0, -1, 7]))
    return t, idx, dim, fill


@given(gather_cases())
def test_gather_equals_the_per_sample_reference(case):
    t, idx, dim, fill = case
    out = gather(t, idx, dim, fill)
    ref = gather_reference(t, idx, dim, fill)
    assert out.dtype == t.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 3), st.booleans(), st.data())
def test_take_rows_equals_gather(B, L, D, batch_one, data):
    """Consecutive runs at one offset (the view) and any other rows, holes (-1) included (the gather),
    give gather's values."""
    t = torch.randn(1 if batch_one else B, L, *([D] if D else []))
    V = data.draw(st.integers(0, L))
    if data.draw(st.booleans()):
        start = data.draw(st.integers(0, L - V))
        idx = (torch.arange(V) + start)[None].repeat(B, 1)
    else:
        idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, L - 1), min_size=V, max_size=V),
                                              min_size=B, max_size=B)), dtype=torch.long).view(B, V)
    out = take_rows(t, idx)
    assert out.shape == (B, V, *t.shape[2:]) and torch.equal(out, gather(t, idx, 1))


@pytest.mark.parametrize("B,V,D", [(1, 5, 3), (4, 6, 2), (3, 1, 0)])
def test_take_rows_of_flattened_features_is_a_view_with_gather_values(B, V, D):
    flat = torch.randn(1, B * V, *([D] if D else []))
    idx = torch.arange(B * V).view(B, V)
    out = take_rows(flat, idx)
    assert out.data_ptr() == flat.data_ptr() and torch.equal(out, gather(flat, idx, 1))
    shifted = idx.roll(1, dims=1)  # not the flattened layout: a copy, still gather's values
    assert torch.equal(take_rows(flat, shifted), gather(flat, shifted, 1))


@given(st.integers(1, 5), st.integers(0, 12), st.data())
def test_true_positions_equals_nonzero_per_row(B, L, data):
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=L, max_size=L), min_size=B, max_size=B)),
                        dtype=torch.bool).view(B, L)
    out = true_positions(mask)
    n = int(mask.sum(1).max()) if mask.numel() else 0
    assert out.shape == (B, n) and out.dtype == torch.long
    for b in range(B):
        row = mask[b].nonzero().flatten()
        assert torch.equal(out[b, : len(row)], row)
        assert (out[b, len(row):] == -1).all()


def tiny_batch(questions=("What is shown in this image?", "Describe.")):
    t = shared_tiny_vlm("llava", small=True, num_layers=4)
    return t.model, t.inputs(list(questions))


def test_report_per_sample_tensors_are_built_when_read_and_do_not_move():
    """kept / coords / scores are built on first access from the stage's own tensors: reading them
    after a later prefill in the same context gives what reading them at once gave."""
    model, inputs = tiny_batch()
    with torch.no_grad(), tp.prune(model, "fastv", budget=5) as report:
        model(**inputs)
        stage = report.stages[0]
        now = ([k.clone() for k in stage.kept], [c.clone() for c in stage.coords], [s.clone() for s in stage.scores])
    with torch.no_grad(), tp.prune(model, "fastv", budget=5) as report:
        model(**inputs)
        first = report.stages[0]
        assert callable(first.per_sample)  # nothing built yet
        _, other = tiny_batch(("How many?", "Which colour is it?"))
        model(**other)
        assert report.stages[0] is not first
    later = first.kept, first.coords, first.scores
    assert not callable(first.per_sample)
    for a, b in zip(now, later):
        assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert [len(k) for k in later[0]] == [5, 5] and [tuple(c.shape) for c in later[1]] == [(5, 4), (5, 4)]
    assert all(k.device.type == "cpu" and k.dtype == torch.long for k in later[0])
    assert [tuple(s.shape) for s in later[2]] == [(n,) for n in report.visual_tokens]


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_a_stage_that_keeps_every_token_leaves_the_call_as_it_is(method):
    """Keep-all before or inside the LLM, on a left-padded batch: the logits equal the unpruned
    model's bit for bit, and every visual token stays at every layer."""
    model, inputs = tiny_batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        with tp.prune(model, method, budget=10_000) as report:
            out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert report.tokens_per_layer == [max(report.visual_tokens)] * report.depth


@st.composite
def attention_cases(draw):
    B, Hkv, group, L, d = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                           draw(st.integers(1, 9)), draw(st.sampled_from([2, 4])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    query = torch.randn(B, Hkv * group, L, d, generator=gen)
    key = torch.randn(B, Hkv, L, d, generator=gen)
    kind = draw(st.sampled_from(["causal", "none", "bool", "float"]))
    mask = None
    if kind in ("bool", "float"):
        allowed = torch.rand(draw(st.sampled_from([1, B])), 1, L, L, generator=gen) > 0.3
        mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    row = draw(st.integers(0, L - 1))
    return query, key, mask, kind == "causal", row


@given(attention_cases())
def test_attention_rows_of_one_row_equal_the_gathered_row(case):
    """``rows`` given as one position (views of the query and the mask) and as a ``[B, 1]`` tensor (the
    gather) give the same probabilities bit for bit: causal or not without a mask, bool or additive
    masks, grouped-query keys, rows that allow no key."""
    from tokenprune.runtime.attention import attention_rows

    query, key, mask, causal, row = case
    as_int = attention_rows(query, key, mask, None, row, causal=causal)
    as_tensor = attention_rows(query, key, mask, None, torch.full((query.shape[0], 1), row), causal=causal)
    assert as_int.shape == (query.shape[0], 1, key.shape[2]) and as_int.dtype == torch.float32
    assert torch.equal(as_int, as_tensor)


@given(st.integers(1, 4), st.integers(2, 9), st.data())
def test_visual_tokens_rows_equal_gather_and_the_run_is_read_once(B, L, data):
    """``VisualTokens.rows`` over ascending positions: gather's values, a view of the hidden states when
    every sample's visual tokens are one run of positions at the same place (``run``, found on first use)."""
    from tokenprune.runtime.state import VisualTokens

    V = data.draw(st.integers(1, L))
    start = data.draw(st.integers(0, L - V))
    run = (torch.arange(V) + start)[None].repeat(B, 1)
    ascending = st.lists(st.integers(0, L - 1), min_size=V, max_size=V, unique=True).map(sorted)
    other = torch.tensor(data.draw(st.lists(ascending, min_size=B, max_size=B)), dtype=torch.long).view(B, V)
    t = torch.randn(B, L, 3)
    ones = torch.ones(B, V, dtype=torch.bool)
    for pos in (run, other):
        rows = pos.tolist()
        expected = rows[0][0] if all(r == list(range(rows[0][0], rows[0][0] + V)) for r in rows) else None
        vis = VisualTokens(pos=pos, valid=ones, orig=pos, protected=~ones, dropped=~ones,
                           coords=torch.zeros(B, V, 4, dtype=torch.long), cls=None)
        assert vis.run == -1
        out = vis.rows(t)
        assert vis.run == expected
        assert torch.equal(out, gather(t, pos, 1)) and torch.equal(vis.rows(t[..., 0]), gather(t[..., 0], pos, 1))
        if expected is not None:
            assert out.data_ptr() == t[:, expected:].data_ptr()


@pytest.mark.parametrize("method,budget", [("fastv", 5), ("fastv", 10_000), ("divprune", 5), ("dart", 5)])
def test_the_unmarked_fast_path_equals_the_general_one(monkeypatch, method, budget):
    """Visual tokens known to have nothing protected or dropped (every real one a candidate, counts
    known) select, report and run exactly as when the runtime reads the masks."""
    from tokenprune.runtime.prefill import PrefillRewriter

    model, inputs = tiny_batch()

    def run():
        with torch.no_grad(), tp.prune(model, method, budget=budget) as report:
            logits = model(**inputs).logits
        return logits, [(s.tokens_before, s.tokens_after, s.protected, s.kept, s.scores) for s in report.stages]

    fast = run()
    original = PrefillRewriter._initial_visual

    def marked(self, *args):
        vis, flat_idx = original(self, *args)
        assert not vis.marked  # the tiny LLaVA has no newline tokens
        vis.marked, vis.known_counts = True, None
        return vis, flat_idx

    monkeypatch.setattr(PrefillRewriter, "_initial_visual", marked)
    general = run()
    assert torch.equal(fast[0], general[0])
    for a, b in zip(fast[1], general[1]):
        assert a[:3] == b[:3]
        assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
        for x, y in zip(a[4], b[4]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_visual_tokens_rows_of_a_padded_batch_are_gathered():
    """A sample with fewer visual tokens (padding at the end of its row, position 0) is not a run."""
    from tokenprune.runtime.state import VisualTokens

    pos = torch.tensor([[3, 4, 5], [3, 4, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    vis = VisualTokens(pos=pos, valid=valid, orig=pos, protected=~valid & False, dropped=~valid & False,
                       coords=torch.zeros(2, 3, 4, dtype=torch.long), cls=None)
    t = torch.randn(2, 7, 3)
    assert torch.equal(vis.rows(t), gather(t, pos, 1)) and vis.run is None


def test_the_query_handed_over_for_an_attention_signal_is_not_kept_for_decoding(monkeypatch):
    """Layer k - 1's query lives until the stage at k reads it, not with the prompt's state (which the
    context keeps, with the KV cache, for decoding)."""
    import gc
    import weakref

    from tokenprune.runtime.signals import SignalCapture

    model, inputs = tiny_batch()
    seen = []
    original = SignalCapture.capture_text

    def capture_text(self, state, layer_idx, stage, module, query, key, attention_mask, kwargs):
        seen.append(weakref.ref(query))
        return original(self, state, layer_idx, stage, module, query, key, attention_mask, kwargs)

    monkeypatch.setattr(SignalCapture, "capture_text", capture_text)
    with torch.no_grad(), tp.prune(model, "fastv", budget=5):
        out = model(**inputs, use_cache=True)
        gc.collect()
        assert out.past_key_values is not None and len(seen) == 1
        assert seen[0]() is None
