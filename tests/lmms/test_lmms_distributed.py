"""Data-parallel runs on 2 CPU ranks (gloo) equal 1-rank runs: lmms-eval under torchrun, and ``tokenprune eval``.

Also the end-to-end ``tokenprune report`` on real lmms-eval output folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from .lmms_helpers import bin_path, run_cli

from tokenprune.testbed.evaluate import checkpoint_path

CKPT = str(checkpoint_path())
LIMIT = 9  # odd: lmms-eval pads rank 1 with one request, which the report must not count


def _lmms_cmd(out: Path, task_dir: Path, model_args: str) -> list:
    return ["-m", "lmms_eval", "--model", "tokenprune", "--model_args", model_args, "--include_path",
            str(task_dir), "--tasks", "tokenprune_testbed", "--limit", str(LIMIT), "--batch_size", "2",
            "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]


def _run_folder(out: Path) -> tuple:
    """``(results, per-doc predictions, tokenprune report)`` of an lmms-eval output folder."""
    results = sorted(out.rglob("*_results.json"))
    assert results, f"lmms-eval wrote no results under {out} (it exits 0 on failures: see its output)"
    res = json.loads(results[-1].read_text())
    samples = [json.loads(line) for f in out.rglob("*_samples_tokenprune_testbed.jsonl") for line in open(f)]
    preds = [s["vqa_accuracy"]["prediction"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    report = json.loads(next(out.rglob("tokenprune_report.json")).read_text())
    return res, preds, report


@pytest.fixture(scope="module")
def lmms_runs(testbed_task, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_runs")
    args = f"pretrained={CKPT},method=divprune,budget=22"
    one = run_cli([sys.executable] + _lmms_cmd(root / "div_1rank", testbed_task, args), cwd=root)
    two = run_cli([bin_path("torchrun"), "--standalone", "--nproc_per_node", "2"]
                  + _lmms_cmd(root / "div_2rank", testbed_task, args), cwd=root)
    run_cli([sys.executable] + _lmms_cmd(root / "none_1rank", testbed_task, f"pretrained={CKPT}"), cwd=root)
    return root, one, two


def test_two_ranks_equal_one_rank_in_lmms_eval(lmms_runs):
    root, one, two = lmms_runs
    res1, preds1, rep1 = _run_folder(root / "div_1rank")
    res2, preds2, rep2 = _run_folder(root / "div_2rank")
    acc1 = res1["results"]["tokenprune_testbed"]["vqa_accuracy,none"]
    acc2 = res2["results"]["tokenprune_testbed"]["vqa_accuracy,none"]
    print(f"1 rank: {acc1}, 2 ranks: {acc2}; {preds1}")
    assert len(preds1) == LIMIT and preds1 == preds2 and acc1 == acc2
    # the accounting: every document once, the padding request skipped, the same tokens
    assert (rep1["world_size"], rep1["requests"], rep1["padding_requests_skipped"]) == (1, LIMIT, 0)
    assert (rep2["world_size"], rep2["requests"], rep2["padding_requests_skipped"]) == (2, LIMIT, 1)
    assert sorted(r["requests"] for r in rep2["per_rank"]) == [LIMIT // 2, LIMIT - LIMIT // 2]
    for key in ("visual_tokens", "nominal_tokens", "equivalent_tokens"):
        assert rep1[key] == rep2[key]
    assert rep1["equivalent_tokens"] == 22 and rep1["stages"][0]["tokens"] == 22
    # one line at the end, on rank 0 only
    assert two.stdout.count("tokenprune: divprune @ 22 |") == 1 and "padding skipped" in two.stdout
    assert one.stdout.count("tokenprune: divprune @ 22 |") == 1


def test_report_from_lmms_eval_folders(lmms_runs):
    root, _, _ = lmms_runs
    proc = run_cli([bin_path("tokenprune"), "report", str(root / "none_1rank"), str(root / "div_1rank"), "--out",
                    str(root / "table"), "--plot", str(root / "table.png")], cwd=root)
    print(proc.stdout)
    assert "| none | – |" in proc.stdout and "| divprune | 22 |" in proc.stdout
    table = json.loads((root / "table.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["none"]["equivalent_tokens"] == 196 and rows["divprune"]["equivalent_tokens"] == 22
    rel = rows["divprune"]["relative"]["tokenprune_testbed"]
    assert rel == pytest.approx(100 * rows["divprune"]["scores"]["tokenprune_testbed"]
                                / rows["none"]["scores"]["tokenprune_testbed"])
    assert (root / "table.md").is_file() and (root / "table.csv").is_file() and (root / "table.png").is_file()
    # the 2-rank run repeats divprune @ 22: the table refuses to pick one
    bad = subprocess.run([bin_path("tokenprune"), "report", str(root / "div_1rank"),
                                        str(root / "div_2rank")], capture_output=True, text=True)
    assert bad.returncode == 2 and "two runs of divprune@22" in bad.stderr


def _eval_cmd(out: Path) -> list:
    return ["-m", "tokenprune.cli", "eval", "--limit", "30", "--batch-size", "10", "--methods", "divprune,fastv",
            "--budgets", "22", "--no-progress", "--threads", "1", "--output", str(out)]


def _rows(stdout: str) -> list:
    """The printed table rows without their last two columns (prefill ms and speed-up, timings)."""
    return [ln.split()[:-2] for ln in stdout.splitlines() if ln.startswith(("none ", "divprune ", "fastv "))]


def test_two_ranks_equal_one_rank_in_tokenprune_eval(tmp_path):
    one = run_cli([sys.executable] + _eval_cmd(tmp_path / "one.json"), cwd=tmp_path)
    two = run_cli([bin_path("torchrun"), "--standalone", "--nproc_per_node", "2"] + _eval_cmd(tmp_path / "two.json"),
                  cwd=tmp_path)
    assert "2 ranks" in two.stdout and two.stdout.count("method    budget  tokens") == 1  # rank 0 prints
    r1 = json.loads((tmp_path / "one.json").read_text())["records"]
    r2 = json.loads((tmp_path / "two.json").read_text())["records"]
    timing = {"prefill_ms", "speedup", "selection_ms"}
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert _rows(one.stdout) and _rows(one.stdout) == _rows(two.stdout)
