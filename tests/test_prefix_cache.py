"""PrefixCache: the unpruned first decoder layers shared across pruning contexts, exactly."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

IN_LLM = [("fastv", dict(budget=8)), ("dart", dict(budget=8)), ("reverse_fastv", dict(budget=12)),
          ("window_fastv", dict(budget=16)), ("pyramiddrop", dict()), ("dart", dict(budget=20, count="official"))]


@pytest.fixture(scope="module")
def tiny():
    t = build_tiny_vlm("llava", small=True, num_layers=4)
    return t, t.inputs(["What is shown in this image?", "Describe the colours of the picture in detail."])


def _run(model, inputs, name, params, cache=None):
    with tp.prune(model, name, prefix_cache=cache, **params) as report:
        with torch.no_grad():
            out = model(**inputs)
    return out.logits, [k.tolist() for st in report.stages for k in st.kept]


def test_shared_prefix_equals_recomputing_bit_for_bit(tiny):
    t, inputs = tiny
    want = [_run(t.model, inputs, n, p) for n, p in IN_LLM]
    cache = tp.PrefixCache()
    got = [_run(t.model, inputs, n, p, cache) for n, p in IN_LLM]
    for (n, _), (lw, kw), (lg, kg) in zip(IN_LLM, want, got):
        assert torch.equal(lw, lg), n
        assert kw == kg, n
    s = cache.stats()
    assert s["misses"] == 1  # fastv recorded layers 0-1; every later method replayed them
    assert s["hits"] == len(IN_LLM) - 1
    # layers 0-1 for the layer-2 methods; pyramiddrop acts at layer 1 of 4 (8 of 32): layer 0 only
    assert s["layers_saved"] == 2 * (len(IN_LLM) - 2) + 1


def test_generate_with_a_replayed_prefix_writes_the_same_kv_cache(tiny):
    t, inputs = tiny
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with tp.prune(t.model, "fastv", budget=8):
        want = t.model.generate(**inputs, **kw)
    cache = tp.PrefixCache()
    for name in ("dart", "fastv"):  # dart records, fastv replays
        with tp.prune(t.model, name, budget=8, prefix_cache=cache):
            got = t.model.generate(**inputs, **kw)
    assert cache.stats()["hits"] == 1
    assert torch.equal(want.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(want.scores, got.scores))


def test_other_inputs_and_stages_before_the_llm_never_hit(tiny):
    t, inputs = tiny
    cache = tp.PrefixCache()
    _run(t.model, inputs, "fastv", dict(budget=8), cache)
    other = t.inputs(["What is shown in this image?", "Count the objects."])
    lo, _ = _run(t.model, other, "fastv", dict(budget=8), cache)
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 2
    assert torch.equal(lo, _run(t.model, other, "fastv", dict(budget=8))[0])
    before = cache.stats()
    _run(t.model, inputs, "divprune", dict(budget=8), cache)  # a stage before the LLM: the prefix differs
    assert cache.stats() == before


def test_memory_bound_and_bad_arguments(tiny):
    t, inputs = tiny
    cache = tp.PrefixCache(max_bytes=0)
    _run(t.model, inputs, "fastv", dict(budget=8), cache)
    _run(t.model, inputs, "fastv", dict(budget=8), cache)
    assert cache.stats()["entries"] == 0 and cache.stats()["hits"] == 0 and cache.nbytes == 0
    with pytest.raises(tp.errors.TokenPruneError, match="max_bytes"):
        tp.PrefixCache(max_bytes=-1)
    with pytest.raises(tp.errors.ConfigError, match="prefix_cache"):
        tp.prune(t.model, "fastv", prefix_cache=object())


def test_an_unpruned_run_records_for_the_pruned_ones(tiny):
    t, inputs = tiny
    want = _run(t.model, inputs, "fastv", dict(budget=8))
    cache = tp.PrefixCache()
    with torch.no_grad(), cache.attach(t.model, depth=2):
        ref = t.model(**inputs).logits
    assert cache.stats()["misses"] == 1 and "get_image_features" not in t.model.model.__dict__
    got = _run(t.model, inputs, "fastv", dict(budget=8), cache)
    assert cache.stats()["hits"] == 1
    assert torch.equal(want[0], got[0]) and want[1] == got[1]
    with torch.no_grad():
        assert torch.equal(ref, t.model(**inputs).logits)  # the model is as before after attach
    with pytest.raises(tp.errors.TokenPruneError, match="depth"):
        cache.attach(t.model, depth=4)
