"""The ``tokenprune`` command line on a tiny random-weight testbed checkpoint and a few questions."""

from __future__ import annotations

import json

import pytest

from tokenprune import cli
from tokenprune.testbed.model import build_model, build_processor

TINY = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=4, text_heads=2)
RECORD_KEYS = {"method", "budget", "equivalent_tokens", "accuracy", "relative_accuracy", "evidence_recall",
               "prefill_ms"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    build_model(**TINY, seed=2).save_pretrained(path)
    build_processor().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    out = tmp_path_factory.mktemp("jsonl")
    assert cli.main(["testbed", "export", "--out", str(out), "--n", "10"]) == 0
    return out / "testbed.jsonl"


def test_eval_small(ckpt, tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    rc = cli.main(["eval", "--model", ckpt, "--methods", "random,fastv", "--budgets", "0.25,11", "--limit", "12",
                   "--batch-size", "6", "--output", str(out), "--plot", str(plot), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "12 questions" in text and "random" in text and "fastv" in text and "-75.0%" in text
    assert "Accuracy per question family" in text
    data = json.loads(out.read_text())
    recs = data["records"]
    assert [(r["method"], r["budget"]) for r in recs] == [
        ("none", 1.0), ("random", 0.25), ("random", 11), ("fastv", 0.25), ("fastv", 11)]
    assert all(RECORD_KEYS <= set(r) for r in recs)
    byname = {(r["method"], r["budget"]): r for r in recs}
    assert byname[("none", 1.0)]["evidence_recall"] == 1.0 and byname[("none", 1.0)]["equivalent_tokens"] == 196
    assert byname[("random", 11)]["nominal_tokens"] == 11
    assert byname[("random", 11)]["tokens_per_stage"] == [{"stage": "before LLM", "layer": None, "tokens": 11.0}]
    assert 0 <= byname[("random", 11)]["evidence_recall"] <= 1
    # FastV prunes inside the LLM only: no pre-LLM recall, a first-stage recall instead
    assert byname[("fastv", 11)]["evidence_recall"] is None
    assert byname[("fastv", 11)]["equivalent_tokens"] > 11
    assert data["meta"]["n"] == 12 and plot.stat().st_size > 0


def test_eval_jsonl(ckpt, jsonl, capsys):
    rc = cli.main(["eval", "--model", ckpt, "--data", str(jsonl), "--methods", "fastervlm", "--budgets", "0.5",
                   "--no-progress", "--limit", "8", "--oracle"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "testbed.jsonl" in text and "8 questions" in text and "fastervlm" in text
    oracle_row = next(line for line in text.splitlines() if line.startswith("evidence_oracle"))
    assert "100.0" in oracle_row.split()  # keeps every evidence patch at half the tokens


def test_run_default_scene_and_image(ckpt, jsonl, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert cli.main(["run", "--model", ckpt, "--method", "tops", "--budget", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unpruned answer" in text and "tops @ 16 answer" in text and "tokens per stage" in text
    assert "evidence patches kept by" in text
    from PIL import Image

    with Image.open(out) as im:
        assert im.width > im.height  # panels side by side: evidence + 3 TOPS stages
    image = jsonl.parent / "images" / "00000.png"
    out2 = tmp_path / "o2.png"
    assert cli.main(["run", "--model", ckpt, "--image", str(image), "--question", "what color is the circle ?",
                     "--method", "fastv", "--budget", "0.25", "--out", str(out2)]) == 0
    assert out2.exists()


@pytest.mark.parametrize("argv, error, match", [
    (["run", "--image", "/nonexistent.png", "--question", "q"], "ImageError", "not found"),
    (["eval", "--model", "/nonexistent_model_dir"], "UnsupportedModelError", "not found"),
    (["eval", "--methods", "topz"], "UnknownNameError", "Did you mean 'tops'"),
    (["eval", "--budgets", "abc"], "BudgetError", "not a count"),
    (["eval", "--budgets", "1.5"], "BudgetError", "1.5"),
    (["run", "--method", "nope"], "UnknownNameError", "unknown method"),
    (["run", "--budget", "-3"], "BudgetError", "-3"),
    (["run", "--image", "x.png"], "TokenPruneError", "--image needs --question"),
])
def test_named_errors(argv, error, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert error in err and match in err


def test_errors_with_files(ckpt, tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "bert"}')
    assert cli.main(["eval", "--model", str(tmp_path / "cfg"), "--methods", "random"]) == 2
    assert "not supported" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q"}\n')
    assert cli.main(["eval", "--model", ckpt, "--data", str(bad)]) == 2
    assert "line 1: missing field(s) 'answers'" in capsys.readouterr().err
    img = tmp_path / "broken.png"
    img.write_bytes(b"not a png")
    assert cli.main(["run", "--model", ckpt, "--image", str(img), "--question", "q"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_testbed_train_forwards_arguments(monkeypatch):
    from tokenprune.testbed import train

    seen = {}
    monkeypatch.setattr(train, "main", lambda argv=None: seen.setdefault("argv", argv))
    assert cli.main(["testbed", "train", "--minutes", "1", "--out", "x"]) == 0
    assert seen["argv"] == ["--minutes", "1", "--out", "x"]


# -- every option and output path is checked before any work (#13) ---------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model fail loudly: a check that runs after it comes too late."""
    def _load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load", _load)


@pytest.mark.parametrize("argv, error, match", [
    (["run", "--index", "1000"], "TokenPruneError", "--index must be in 0..999"),
    (["run", "--index", "-1"], "TokenPruneError", "--index must be in 0..999"),
    (["eval", "--prompt", "Q: {q} {question}"], "TokenPruneError", "unknown field(s) {q}"),
    (["eval", "--prompt", "{question} {"], "TokenPruneError", "not a valid template"),
    (["run", "--prompt", "no question here"], "TokenPruneError", "needs a '{question}' field"),
    (["eval", "--max-new-tokens", "-1"], "TokenPruneError", "--max-new-tokens must be >= 1, got -1"),
    (["eval", "--max-new-tokens", "0"], "TokenPruneError", "--max-new-tokens must be >= 1, got 0"),
    (["run", "--max-new-tokens", "0"], "TokenPruneError", "--max-new-tokens must be >= 1, got 0"),
    (["eval", "--threads", "0"], "TokenPruneError", "--threads must be >= 1, got 0"),
    (["eval", "--data", "{tmp}/utf16.jsonl"], "DatasetError", "utf16.jsonl: the file is not UTF-8 text"),
    (["eval", "--methods", ""], "TokenPruneError", "--methods is empty"),
    (["eval", "--budgets", ""], "TokenPruneError", "--budgets is empty"),
    (["eval", "--budgets", "-5"], "BudgetError", "a count (an int >= 1, tokens kept) or a fraction kept"),
    (["run", "--budget", "-5"], "BudgetError", "a count (an int >= 1, tokens kept) or a fraction kept"),
    (["run", "--image", "{tmp}/folder", "--question", "q"], "ImageError", "it is a directory"),
    (["eval", "--output", "{tmp}/folder"], "OutputPathError", "is a directory; give a file path"),
    (["eval", "--output", "{tmp}/file.txt/r.json"], "OutputPathError", "file.txt' is a file, not a folder"),
    (["eval", "--plot", "{tmp}/folder"], "OutputPathError", "--plot"),
    (["run", "--out", "{tmp}/folder"], "OutputPathError", "--out"),
    (["run", "--out", "{tmp}/file.txt/sub/o.png"], "OutputPathError", "is a file, not a folder"),
    (["testbed", "export", "--out", "{tmp}/file.txt"], "OutputPathError", "is an existing file; give a folder"),
])
def test_options_and_output_paths_are_checked_before_any_work(argv, error, match, tmp_path, no_model, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    rec = {"image": "a.png", "question": "q", "answers": ["x"]}
    (tmp_path / "utf16.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-16")
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert error in err and match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one line
    assert "float budget" not in err


def test_export_into_an_existing_file_fails_before_drawing_scenes(tmp_path, monkeypatch):
    from tokenprune.errors import OutputPathError
    from tokenprune.testbed import evaluate

    monkeypatch.setattr(evaluate, "held_out_examples", lambda **k: pytest.fail("scenes drawn before the check"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputPathError, match="is an existing file, not a folder"):
        evaluate.export_jsonl(tmp_path / "file.txt", n=2)
    with pytest.raises(OutputPathError):
        evaluate.export_jsonl(tmp_path / "file.txt" / "sub", n=2)


def test_duplicate_budgets_are_merged_with_a_note(capsys):
    assert cli._merge_budgets(["0.25", "25%", "8", "8", "1", "1.0"]) == [0.25, 8, 1, 1.0]  # 1 token != all
    err = capsys.readouterr().err
    assert "'0.25' and '25%', the same budget" in err and "'8' and '8'" in err and "'1'" not in err


def test_duplicate_budgets_are_evaluated_once(ckpt, tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"  # a missing folder is created
    assert cli.main(["eval", "--model", ckpt, "--methods", "random", "--budgets", "8,0.25,8", "--limit", "4",
                     "--batch-size", "4", "--no-progress", "--output", str(out)]) == 0
    assert "evaluated once" in capsys.readouterr().err
    recs = json.loads(out.read_text())["records"]
    assert [(r["method"], r["budget"]) for r in recs] == [("none", 1.0), ("random", 8), ("random", 0.25)]


def test_oracle_evidence_outside_the_grid_fails_before_running(ckpt, jsonl, tmp_path, monkeypatch, capsys):
    from tokenprune.evaluation import runner

    monkeypatch.setattr(runner.Evaluator, "prepare", lambda self: pytest.fail("evaluation started"))
    image = jsonl.parent / "images" / "00000.png"
    bad = tmp_path / "ev.jsonl"
    bad.write_text(json.dumps({"id": "q7", "image": str(image), "question": "what color is the circle ?",
                               "answers": ["red"], "evidence": [3, 500]}) + "\n")
    assert cli.main(["eval", "--model", ckpt, "--data", str(bad), "--methods", "random", "--budgets", "8",
                     "--oracle", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "question 1 (id q7) has evidence patch 500, outside the model's 14 x 14 patch grid" in err
    assert len(err.strip().splitlines()) == 1


# -- lmms-eval helpers that need no lmms-eval: task folders, the accounting, `tokenprune report` --------
def test_lmms_task_writes_a_task_over_a_local_set(jsonl, tmp_path, capsys):
    out = tmp_path / "task"
    assert cli.main(["lmms", "task", "--data", str(jsonl), "--out", str(out), "--name", "my_vqa"]) == 0
    assert "--include_path" in capsys.readouterr().out
    yaml_text = (out / "my_vqa.yaml").read_text()
    assert 'task: "my_vqa"' in yaml_text and "dataset_path: json" in yaml_text
    assert "_tokenprune_vqa_template_yaml" in yaml_text
    rows = [json.loads(line) for line in (out / "my_vqa.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["image"].startswith("/") and r["answers"] for r in rows)
    from pathlib import Path

    from tokenprune.integrations.lmms import TEMPLATE
    assert TEMPLATE.is_file() and Path(rows[0]["image"]).is_file()


def test_lmms_task_named_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q"}\n')
    assert cli.main(["lmms", "task", "--data", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "answers" in capsys.readouterr().err
    assert cli.main(["lmms", "task", "--data", str(bad), "--out", str(tmp_path / "t"), "--name", "Bad-Name"]) == 2
    assert "task name" in capsys.readouterr().err


def test_testbed_export_parquet(tmp_path, capsys):
    import importlib.util

    rc = cli.main(["testbed", "export", "--format", "parquet", "--out", str(tmp_path), "--n", "3"])
    if importlib.util.find_spec("datasets") is None:
        assert rc == 2 and "datasets" in capsys.readouterr().err
        return
    assert rc == 0 and (tmp_path / "testbed.parquet").is_file()
    assert 'task: "tokenprune_testbed"' in (tmp_path / "tokenprune_testbed.yaml").read_text()


class _Stage:
    def __init__(self, layer, after):
        self.layer, self.tokens_after = layer, after

    @property
    def where(self):
        return "before LLM" if self.layer is None else f"layer {self.layer}"


class _Report:
    """A PruneReport stand-in: 2 samples, 100 visual tokens, 40 kept before a 4-layer LLM, 10 from layer 2."""
    pruned_calls, depth, nominal_budget, select_ms = 1, 4, 10, 8.0
    visual_tokens = [100, 100]
    stages = [_Stage(None, [40, 40]), _Stage(2, [10, 10])]


def test_accounting_per_request_skips_padding_and_merges_ranks():
    from tokenprune.integrations.lmms.accounting import Accounting, one_line, summarize

    a, b = Accounting(), Accounting()
    a.add_batch(tasks=["t", "t"], padding=[False, False], visual_tokens=[100, 100], report=_Report(), prefill_ms=20)
    b.add_batch(tasks=["t", "u"], padding=[False, True], visual_tokens=[100, 100], report=_Report(), prefill_ms=20)
    b.add_batch(tasks=["u"], padding=[False], visual_tokens=[50], report=None, prefill_ms=5)
    s = summarize([a.state(rank=0, peak_memory_mib=10.0), b.state(rank=1, peak_memory_mib=12.0)], {"method": "m"})
    assert (s["requests"], s["padding_requests_skipped"], s["world_size"], s["peak_memory_mib"]) == (4, 1, 2, 12.0)
    eq = (40 + 40 + 10 + 10) / 4
    assert s["equivalent_tokens"] == pytest.approx((3 * eq + 50) / 4)
    assert s["nominal_tokens"] == pytest.approx((3 * 10 + 50) / 4)
    assert s["selection_ms"] == pytest.approx(3 * 4.0 / 4) and s["prefill_ms"] == pytest.approx((3 * 10 + 5) / 4)
    assert [(st["where"], st["tokens"], st["requests"]) for st in s["stages"]] == [("before LLM", 40, 3),
                                                                                   ("layer 2", 10, 3)]
    assert s["per_task"]["u"]["requests"] == 1 and s["per_task"]["t"]["equivalent_tokens"] == eq
    assert "4 requests on 2 rank(s) (1 padding skipped)" in one_line(s)


def _fake_run(folder, method, budget, score, *, sha="abc", version=1.0, n=50, model_type="llava"):
    """An lmms-eval output folder: a results file and the tokenprune report the model writes."""
    run = folder / "model"
    run.mkdir(parents=True)
    args = "pretrained=/m" + ("" if method == "none" else f",method={method},budget={budget}")
    results = {"results": {"gqa": {"alias": "gqa", "exact_match,none": score, "exact_match_stderr,none": 0.01},
                           "mme": {"alias": "mme", "mme_perception_score,none": 1500 * score,
                                   "mme_cognition_score,none": 300.0}},
               "versions": {"gqa": version, "mme": 0.0}, "configs": {"gqa": {"metadata": {"version": version}}},
               "n-samples": {"gqa": {"original": 100, "effective": n}, "mme": {"original": 10, "effective": 10}},
               "config": {"model_args": args}}
    (run / "2026_results.json").write_text(json.dumps(results))
    eq = 576.0 if method == "none" else float(budget)
    report = {"format": "tokenprune-lmms-report/1", "method": method, "budget": None if method == "none" else budget,
              "model": {"pretrained": "/m", "model_type": model_type, "config_sha256": sha},
              "model_args": {"pretrained": "/m", "method": method, "budget": None if method == "none" else str(budget)},
              "equivalent_tokens": eq, "nominal_tokens": eq, "prefill_ms": 100.0 * eq / 576,
              "prefill_ms_median": 90.0 * eq / 576, "selection_ms": 1.0, "requests": 60}
    (run / "tokenprune_report.json").write_text(json.dumps(report))
    return folder


def test_report_builds_the_paper_table(tmp_path, capsys):
    runs = [_fake_run(tmp_path / "a", "none", None, 0.6), _fake_run(tmp_path / "b", "divprune", 64, 0.57),
            _fake_run(tmp_path / "c", "divprune", 128, 0.6)]
    assert cli.main(["report", *map(str, runs), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| method | budget | gqa | mme:mme_cognition_score | mme:mme_perception_score |")
    assert lines[1].startswith("| none | – | 60.0 | 300.0 | 900.0 |")
    assert lines[2].startswith("| divprune | 128 | 60.0 (100.0%)")
    assert lines[3].startswith("| divprune | 64 | 57.0 (95.0%) |") and lines[3].endswith("| 96.7 | 64.0 | 10.0 |")
    table = json.loads((tmp_path / "t.json").read_text())
    row = table["rows"][2]
    assert row["relative"]["gqa"] == pytest.approx(95.0) and row["equivalent_tokens"] == 64
    assert row["relative_mean"] == pytest.approx((95 + 100 + 95) / 3)
    assert (tmp_path / "t.csv").read_text().startswith("method,budget,gqa,")


@pytest.mark.parametrize("change, match", [
    ({"sha": "other"}, "disagree on the model"),
    ({"model_type": "qwen2_vl"}, "disagree on the model"),
    ({"version": 2.0}, "version of task 'gqa'"),
    ({"n": 40}, "different numbers of 'gqa' documents"),
])
def test_report_refuses_runs_that_disagree(tmp_path, capsys, change, match):
    a = _fake_run(tmp_path / "a", "none", None, 0.6)
    b = _fake_run(tmp_path / "b", "divprune", 64, 0.57, **change)
    assert cli.main(["report", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert match in err and "ConfigError" in err


def test_report_named_errors_for_missing_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no tokenprune_report.json" in capsys.readouterr().err
    run = _fake_run(tmp_path / "x", "divprune", 64, 0.5)
    (run / "model" / "2026_results.json").write_text(json.dumps({"config": {"model_args": "pretrained=/other"}}))
    assert cli.main(["report", str(run)]) == 2
    assert "same model args" in capsys.readouterr().err
