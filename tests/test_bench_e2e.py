"""Smoke test of benchmarks/bench_e2e.py: the --quick path runs every registered method and writes its JSON.

No timing assertions: only that every configuration ran, the records carry what the report needs
(token counts from PruneReport, KV-cache bytes, ideal speed-ups) and the checks are computed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune.runtime import stage_select as hooks

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = mod  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_e2e", None)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    bench.main(["--quick", "--json", str(out)])
    return json.loads(out.read_text())


def test_quick_records_every_method(quick):
    records = {r["label"]: r for r in quick["records"]}
    meta = quick["meta"]
    assert meta["shape"] == "tiny" and meta["rounds"] == 1 and meta["budgets"] == [16]
    expected = {"unpruned", "vision tower only", "tops[single]@16"} | {f"{m}@16" for m in tp.list_methods()}
    assert set(records) == expected
    for label, r in records.items():
        assert r["error"] is None, (label, r["error"])
        assert r["rounds"] == 1 and r["prefill_ms_median"] > 0
    n = quick["summary"]["visual_tokens"]
    assert n == 64 and records["unpruned"]["equivalent_tokens"] == n
    for label, r in records.items():
        if r["kind"] != "pruned":
            continue
        assert 0 < r["equivalent_tokens"] <= n, label
        assert len(r["tokens_per_layer"]) == 4
        assert r["equivalent_tokens"] == pytest.approx(sum(r["tokens_per_layer"]) / 4)
        assert 0 < r["kv_ratio"] <= 1 and r["kv_bytes"] > 0
        assert r["ideal_llm_speedup"] >= r["ideal_e2e_speedup"] >= 1.0
        assert len(r["decode_ms"]) == 1
    # a single-stage pre-LLM method keeps exactly the budget in every layer
    assert records["random@16"]["tokens_per_layer"] == [16] * 4
    assert records["tops[single]@16"]["tokens_per_layer"] == [16] * 4


def test_quick_checks_and_clock_restored(quick):
    kinds = {c["check"] for c in quick["checks"]}
    assert len(quick["checks"]) == 3 and len(kinds) == 2
    assert all(isinstance(c["pass"], bool) for c in quick["checks"])
    # the CPU-clock swap for the selection timer is undone
    assert hooks.time is time


def test_plot_writes_png(bench, quick, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "speedup.png"
    bench.plot(quick["records"], quick["summary"], str(out), "quick")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--methods", "no_such_method"])
    with pytest.raises(SystemExit):
        bench.main(["--shape", "llava-1.5-7b", "--device", "cpu", "--methods", "random"])
