"""VQA accuracy, the JSONL format, budgets on the command line, records and tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenprune.errors import BudgetError, DatasetError, ImageError, UnknownNameError
from tokenprune.evaluation import (VQAExample, load_image, normalize_answer, read_vqa_jsonl, vqa_accuracy,
                                   write_vqa_jsonl)
from tokenprune.budget import parse_budget
from tokenprune.evaluation.runner import DEFAULT_BUDGETS, budget_label
from tokenprune.evaluation.runner import validate_method_names as resolve_methods


# -- VQA accuracy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("two dogs.", "2 dogs"), ("The red circle", "red circle"), ("yes!", "yes"),
    ("dont", "don't"), ("3.5", "3.5"), ("1,000", "1000"), ("a  blue\tcar", "blue car"), ("none", "0"),
    ("left-hand", "left hand"), ("what's up?", "what's up"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_ten_humans_is_the_leave_one_out_average():
    # 3 of 10 humans: 7 subsets see 3 matches (1.0), 3 subsets see 2 (2/3) -> 0.9
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    # brute force over subsets equals the formula
    answers = ["cat"] * 2 + ["dog"] * 8
    brute = np.mean([min(sum(a == "cat" for j, a in enumerate(answers) if j != i) / 3, 1) for i in range(10)])
    assert vqa_accuracy("Cat", answers) == pytest.approx(brute)


def test_vqa_accuracy_few_answers_is_share_of_matches():
    assert vqa_accuracy("Red.", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    assert vqa_accuracy("red", ["red", "crimson"]) == 0.5
    assert vqa_accuracy("red", "red") == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


# -- JSONL ----------------------------------------------------------------------------------------
def _img(tmp_path, name="a.png"):
    from PIL import Image

    p = tmp_path / name
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    return p


def test_jsonl_roundtrip(tmp_path):
    _img(tmp_path)
    f = tmp_path / "d.jsonl"
    f.write_text('{"image": "a.png", "question": "what?", "answers": ["x", "y"], "family": "f", "id": 3}\n'
                 "\n# a comment\n"
                 '{"image": "a.png", "question": "q2", "answers": "z", "question_type": "g", "evidence": [1, 5]}\n')
    exs = read_vqa_jsonl(f)
    assert [e.question for e in exs] == ["what?", "q2"]
    assert exs[0].answers == ("x", "y") and exs[1].answers == ("z",)
    assert exs[0].family == "f" and exs[1].family == "g" and exs[0].id == "3"
    assert exs[0].image == str(tmp_path / "a.png")
    assert exs[1].evidence.tolist() == [1, 5] and exs[0].evidence is None
    out = write_vqa_jsonl([VQAExample("q", ("a",), np.full((4, 4, 3), 200, np.uint8), "fam",
                                      np.array([0, 3]), "i0")], tmp_path / "w" / "o.jsonl")
    (back,) = read_vqa_jsonl(out)
    assert back.question == "q" and back.answers == ("a",) and back.family == "fam"
    assert back.evidence.tolist() == [0, 3]
    assert np.asarray(load_image(back.image)).max() == 200


@pytest.mark.parametrize("line, match", [
    ('{"image": "a.png", "answers": ["x"]}', r"line 2: missing field\(s\) 'question'"),
    ('{"question": "q", "answers": ["x"]}', r"line 2: missing field\(s\) 'image'"),
    ('{"image": "a.png", "question": "q"}', r"line 2: missing field\(s\) 'answers'"),
    ('{"image": "a.png", "question": "q", "answers": []}', "line 2: 'answers' must be"),
    ('{"image": "a.png", "question": "", "answers": ["x"]}', "line 2: 'question' must be"),
    ('{"image": "a.png", "question": "q", "answers": ["x"], "evidence": [-1]}', "line 2: 'evidence'"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"image": "a.png", ', "line 2: not valid JSON"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, match):
    _img(tmp_path)
    f = tmp_path / "d.jsonl"
    f.write_text('{"image": "a.png", "question": "q", "answers": ["x"]}\n' + line + "\n")
    with pytest.raises(DatasetError, match=match):
        read_vqa_jsonl(f)


def test_jsonl_missing_file_and_image(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_vqa_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        read_vqa_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "m.jsonl").write_text('{"image": "missing.png", "question": "q", "answers": ["x"]}\n')
    with pytest.raises(ImageError, match="line 1: image file not found"):
        read_vqa_jsonl(tmp_path / "m.jsonl")


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)
    assert load_image(_img(tmp_path)).mode == "RGB"


# -- budgets and methods --------------------------------------------------------------------------
def test_parse_budget():
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget("0.25") == 0.25 and parse_budget("25%") == 0.25 and parse_budget("1.0") == 1.0
    assert parse_budget(32) == 32
    for bad in ["abc", "0", "-3", "1.5", "150%", "0%", "", "nan", "inf"]:
        with pytest.raises(BudgetError, match="budget"):
            parse_budget(bad)
    with pytest.raises(BudgetError):
        parse_budget(True)


def test_default_budgets_are_the_tops_reductions():
    from tokenprune.budget import Budget

    assert [Budget(b).resolve(576) for b in DEFAULT_BUDGETS] == [128, 64, 32]
    assert [Budget(b).resolve(196) for b in DEFAULT_BUDGETS] == [44, 22, 11]
    assert [budget_label(b) for b in DEFAULT_BUDGETS] == ["-77.8%", "-88.9%", "-94.4%"]


def test_resolve_methods():
    import tokenprune as tp

    assert resolve_methods(None) == sorted(tp.list_methods())
    assert resolve_methods(["random", "random"]) == ["random"]
    with pytest.raises(UnknownNameError, match="tops"):
        resolve_methods(["topz"])


# -- records and tables ---------------------------------------------------------------------------
def _result(method, budget, scores, fams, ms, stages=(), recall=None):
    from tokenprune.evaluation.runner import ConfigResult, StageStats

    n = len(scores)
    return ConfigResult(method=method, budget=budget, n_image_tokens=196, scores=np.asarray(scores, float),
                        predictions=["x"] * n, families=fams, prefill_ms=ms,
                        stages=[StageStats(*s) for s in stages], equivalent_tokens=196.0 if not stages else 30.0,
                        recall_pre_llm=np.asarray(recall if recall is not None else [1.0] * n),
                        recall_first_stage=np.asarray(recall if recall is not None else [1.0] * n))


def test_records_and_tables(tmp_path):
    from tokenprune.evaluation.report import format_tables, make_records, write_json

    fams = ["a", "a", "b", "b"]
    res = [_result("none", None, [1, 1, 1, 0], fams, [10.0, 12.0, 11.0]),
           _result("m", 0.25, [1, 0, 0, 0], fams, [2.0, 2.5, 3.0], stages=[("pre-LLM", None, 49.0)],
                   recall=[0.5, np.nan, 1.0, 0.0]),
           _result("fv", 0.25, [1, 1, 0, 0], fams, [5.5], stages=[("layer 2", 2, 49.0)], recall=[0.2] * 4)]
    recs = make_records(res)
    none, m, fv = recs
    assert none["method"] == "none" and none["budget"] == 1.0 and none["relative_accuracy"] == 1.0
    assert m["accuracy"] == 0.25 and m["relative_accuracy"] == pytest.approx(0.25 / 0.75, abs=1e-4)
    assert m["per_family"]["a"] == {"accuracy": 0.5, "relative_accuracy": 0.5}
    assert m["evidence_recall"] == 0.5  # NaN (no evidence) left out
    assert m["nominal_tokens"] == 49 and m["reduction"] == pytest.approx(0.75)
    assert m["prefill_ms"] == 2.5 and m["speedup"] == pytest.approx(11.0 / 2.5, abs=1e-3)
    assert fv["evidence_recall"] is None and fv["evidence_recall_first_stage"] == 0.2
    for key in ["method", "budget", "equivalent_tokens", "accuracy", "relative_accuracy", "evidence_recall",
                "prefill_ms"]:
        assert all(key in r for r in recs)
    text = format_tables(recs)
    assert "none" in text and "-75.0%" in text and "(20.0)" in text and "4.40x" in text
    out = write_json(recs, tmp_path / "r.json", meta={"n": 4})
    data = json.loads(out.read_text())
    assert data["records"] == recs and data["meta"] == {"n": 4}
