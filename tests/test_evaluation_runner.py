"""The evaluation runner on a tiny random-weight testbed model, through the real adapters."""

from __future__ import annotations

import numpy as np
import pytest

from tokenprune.evaluation.runner import Evaluator, build_method, summarize_report
from tokenprune.testbed.evaluate import held_out_examples
from tokenprune.testbed.model import build_model, build_processor
from tokenprune.testbed.oracle import oracle_method

TINY = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=4, text_heads=2)


@pytest.fixture(scope="module")
def setup():
    model = build_model(**TINY, seed=3).eval()
    return model, build_processor(), held_out_examples(limit=10)


def test_cached_and_reencoded_inputs_agree(setup):
    model, proc, exs = setup
    a = Evaluator(model, proc, exs, batch_size=4, progress=False).run(None)
    ev = Evaluator(model, proc, exs, batch_size=4, progress=False, cache_bytes=0)
    b = ev.run(None)
    assert ev._batches[1].inputs is None  # not cached
    assert a.predictions == b.predictions and len(a.prefill_ms) == 3
    assert a.equivalent_tokens == 196.0 and np.all(a.recall_pre_llm[~np.isnan(a.recall_pre_llm)] == 1.0)


def test_report_is_summarised_per_stage(setup):
    model, proc, exs = setup
    ev = Evaluator(model, proc, exs, batch_size=5, progress=False)
    r = ev.run(build_method("tops", 12, 0), name="tops", budget=12)
    # TOPS keeps 2T before the LLM, T at the scaled layer 12/32 and T/4 at layer 24/32
    assert [(s.layer, s.tokens) for s in r.stages] == [(None, 24.0), (2, 12.0), (3, 3.0)]
    assert r.equivalent_tokens == pytest.approx((24 + 24 + 12 + 3) / 4)
    assert r.first_stage_label == "before LLM" and r.selection_ms is not None
    assert len(r.predictions) == 10 and len(r.prefill_ms) == 2


def test_oracle_keeps_all_evidence_when_it_fits(setup):
    model, proc, exs = setup
    ev = Evaluator(model, proc, exs, batch_size=5, progress=False)
    big = max(len(e.evidence) for e in exs)
    r = ev.run(lambda b: oracle_method(b, big), name="evidence_oracle", budget=big)
    rec = r.recall_pre_llm[~np.isnan(r.recall_pre_llm)]
    assert len(rec) and np.all(rec == 1.0)
    # at 2 tokens it cannot: recall is the kept share of each evidence set, min(2, |E|) / |E|
    r2 = ev.run(lambda b: oracle_method(b, 2), name="evidence_oracle", budget=2)
    want = [min(2, len(e.evidence)) / len(e.evidence) if len(e.evidence) else np.nan for e in exs]
    np.testing.assert_allclose(r2.recall_pre_llm, want)


def test_random_recall_matches_kept_patches(setup):
    """Recall is computed from the adapter's (row, col) coordinates: check against its kept indices."""
    import torch

    from tokenprune.runtime import prune

    model, proc, exs = setup
    ev = Evaluator(model, proc, exs[:4], batch_size=4, progress=False)
    inputs = ev.inputs_of(ev.prepare()[0])
    with torch.no_grad(), prune(model, build_method("random", 30, 0)) as report:
        model(**inputs, logits_to_keep=1)
    info = summarize_report(report, 4, 196, (14, 14))
    for i, ex in enumerate(exs[:4]):
        kept = report.stages[0].kept[i].numpy()
        np.testing.assert_array_equal(np.sort(info["kept_pre_llm"][i]), np.sort(kept))
    assert info["stages"] == [("before LLM", None, 30.0)]


def test_shared_vision_side_gives_the_records_of_recomputing_it(setup):
    """The vision cache changes nothing but the time: full records equal, bit for bit, for methods
    reading [CLS] attention, the features only, the LLM's attention, and the unpruned model."""
    from tokenprune.evaluation.report import make_records

    model, proc, exs = setup
    methods, budgets = ["fastervlm", "divprune", "fastv", "tops"], [12, 0.5]
    runs = {}
    for cached in (False, True):
        ev = Evaluator(model, proc, exs, batch_size=4, progress=False, vision_cache=cached)
        runs[cached] = (ev, make_records(ev.run_all(methods, budgets, seed=1)))
    timing = ("prefill_ms", "speedup", "selection_ms")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in recs] for _, recs in runs.values()]
    assert strip[0] == strip[1]
    stats = runs[True][0].vision_cache.stats()
    # 3 batches plus the warm-up slice: computed by the unpruned run, then once more by the first
    # context that needs [CLS] attention (fastervlm), which adds it to the same entries; no later
    # configuration computes anything
    calls = (1 + len(methods) * len(budgets)) * 4
    assert stats["entries"] == 4 and stats["misses"] == 8 and stats["hits"] == calls - 8
    assert runs[False][0].vision_cache is None
