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
