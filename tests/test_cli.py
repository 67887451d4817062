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
