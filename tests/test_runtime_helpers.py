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
    """Consecutive runs at one offset (the view) and any other rows (the gather) give gather's values."""
    t = torch.randn(1 if batch_one else B, L, *([D] if D else []))
    V = data.draw(st.integers(0, L))
    if data.draw(st.booleans()):
        start = data.draw(st.integers(0, L - V))
        idx = (torch.arange(V) + start)[None].repeat(B, 1)
    else:
        idx = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, L - 1), min_size=V, max_size=V),
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
