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
    """The vision and prefix caches change nothing but the time: full records equal, bit for bit, for
    methods reading [CLS] attention, the features only, the LLM's attention or key norms, and the
    unpruned model."""
    from tokenprune.evaluation.report import make_records

    model, proc, exs = setup
    methods, budgets = ["fastervlm", "divprune", "fastv", "tops", "dart"], [12, 0.5]
    runs = {}
    for cached in (False, True):
        ev = Evaluator(model, proc, exs, batch_size=4, progress=False, vision_cache=cached, prefix_cache=cached)
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
    assert runs[False][0].vision_cache is None and runs[False][0].prefix_cache is None
    # fastv and dart act at layer 2 with nothing before the LLM: the unpruned run records layers 0-1 of
    # each batch and of the warm-up slice, the four in-LLM configurations replay them
    prefix = runs[True][0].prefix_cache.stats()
    assert prefix["misses"] == 4 and prefix["hits"] == 4 * 4 and prefix["layers_saved"] == 2 * 4 * 4


class _TwoRanks:
    """Two ranks simulated in one process: rank 1 runs first and leaves its share for rank 0's gather."""

    def __init__(self):
        self.left = {}

    def shard(self, rank):
        from tokenprune.evaluation.distributed import Shard

        left = self.left

        class _Shard(Shard):
            def gather(self, obj):
                if self.rank == 1:
                    left["obj"] = obj
                    return [obj]
                return [obj, left.pop("obj")]

        return _Shard(rank=rank, world_size=2)


@pytest.mark.parametrize("method", [None, "divprune", "fastv"])
def test_sharded_ranks_merge_into_the_single_process_result(setup, method):
    """Each rank runs every other batch (3 batches: rank 0 gets 2, rank 1 gets 1); merged in batch order,
    the result is the one of a single process, timings aside."""
    model, proc, exs = setup
    built = None if method is None else build_method(method, 12, 0)
    single = Evaluator(model, proc, exs, batch_size=4, progress=False).run(built, name=str(method), budget=12)
    ranks = _TwoRanks()
    ev1 = Evaluator(model, proc, exs, batch_size=4, progress=False, shard=ranks.shard(1))
    assert [i for i, _ in ev1.my_batches()] == [1] and ev1._batches[0].inputs is None  # only its own batch encoded
    ev1.run(built, name=str(method), budget=12)
    ev0 = Evaluator(model, proc, exs, batch_size=4, progress=False, shard=ranks.shard(0))
    merged = ev0.run(built, name=str(method), budget=12)
    assert ev0.n_image_tokens == ev1.n_image_tokens == single.n_image_tokens
    assert merged.predictions == single.predictions and merged.families == single.families
    np.testing.assert_array_equal(merged.scores, single.scores)
    np.testing.assert_array_equal(merged.recall_pre_llm, single.recall_pre_llm)
    np.testing.assert_array_equal(merged.recall_first_stage, single.recall_first_stage)
    assert merged.equivalent_tokens == single.equivalent_tokens and len(merged.prefill_ms) == 3
    stages = [[(s.label, s.layer, s.tokens) for s in r.stages] for r in (merged, single)]
    assert stages[0] == stages[1]


def test_shard_from_the_launcher_environment():
    from tokenprune.errors import ConfigError
    from tokenprune.evaluation.distributed import SINGLE, Shard, shard_from_environment

    assert shard_from_environment({}) == SINGLE and SINGLE.is_main and SINGLE.gather(3) == [3]
    assert Shard(rank=1, world_size=3).owns(4) and not Shard(rank=1, world_size=3).owns(3)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        shard_from_environment({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="integers"):
        shard_from_environment({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="rank 2"):
        Shard(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="process group"):
        Shard(rank=0, world_size=2).gather(1)
