"""The training script runs end to end: both stages, evaluation, a loadable checkpoint and its auxiliary heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenprune.testbed import scenes as S
from tokenprune.testbed import train as T
from tokenprune.testbed.evaluate import load_testbed
from tokenprune.testbed.model import build_model, build_processor

TINY = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    build_model(**TINY, seed=4).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_short_run_trains_and_saves_a_loadable_checkpoint(tiny_init, tmp_path, capsys):
    out = tmp_path / "ckpt"
    T.main(["--init", str(tiny_init), "--minutes", "0.12", "--stage1-minutes", "0.03", "--batch-size", "4",
            "--eval-n", "10", "--threads", "1", "--compile", "0", "--bgdrop-from", "0.0", "--bgdrop", "48:1",
            "--questions", "spatial,count,color", "--out", str(out)])
    log = capsys.readouterr().out
    assert "FINAL accuracy" in log
    before, _ = load_testbed(tiny_init)
    after, _ = load_testbed(out)
    w0, w1 = _weights(before), _weights(after)
    assert w0.keys() == w1.keys()
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert any(k.startswith("model.vision_tower") for k in changed)
    assert any(k.startswith("model.language_model") for k in changed)
    curve = json.loads((out / "training_curve.json").read_text())
    assert curve["curve"] and 0.0 <= curve["curve"][-1]["accuracy"] <= 1.0
    assert curve["args"]["questions"] == ["spatial", "count", "color"]
    heads = torch.load(str(out) + ".aux_heads.pt")
    assert set(heads) == {"cls_head", "patch_head", "position_head", "side_head"}
    assert before.config.vision_feature_layer == -1
    assert after.config.vision_feature_layer == [0, -1]  # the default --feature-layers widened the projector


def test_warm_start_takes_the_saved_auxiliary_heads(tiny_init, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--minutes", "0.05", "--stage1-minutes", "0", "--batch-size", "2", "--eval-n", "5", "--threads", "1",
              "--compile", "0"]
    T.main(["--init", str(tiny_init), "--out", str(first)] + common)
    heads = torch.load(str(first) + ".aux_heads.pt")
    T.main(["--init", str(first), "--out", str(second), "--lr", "0"] + common)
    again = torch.load(str(second) + ".aux_heads.pt")
    for name in heads:
        for key in heads[name]:
            assert torch.equal(heads[name][key], again[name][key]), (name, key)


@pytest.mark.parametrize("questions, message", [("color,colour", "unknown question families ['colour']"),
                                                ("color," * 6 + "shape", "7 questions per image")])
def test_bad_question_families_are_refused(questions, message, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--questions", questions])
    assert message in capsys.readouterr().err


def test_bad_feature_layers_are_refused(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--feature-layers", "0,last"])
    assert "feature layers must be comma-separated integers, got '0,last'" in capsys.readouterr().err


def test_family_tally_counts_asked_questions_per_family():
    hit = torch.tensor([1, 0, 1, 1, 0, 1]).numpy()
    family = torch.tensor([0, 0, 4, -1, 2, -1]).numpy()  # -1: no question in that slot
    hits, counts = T.family_tally(hit, family)
    assert hits.tolist() == [1, 0, 0, 0, 1] and counts.tolist() == [2, 0, 1, 0, 1]


def test_reset_language_model_needs_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--reset-language-model needs --init"):
        T.main(["--reset-language-model", "--minutes", "0.01", "--out", str(tmp_path / "x")])


def test_spatial_questions_are_asked_only_with_a_third_object():
    rng = np.random.default_rng(3)
    backgrounds = S.make_backgrounds(4, seed=3)
    asked, admitted = {2: 0, 3: 0}, {2: 0, 3: 0}
    for _ in range(60):
        n = int(rng.integers(2, 4))
        scene = S.make_scene(rng, backgrounds, n, n)
        spatial = [q for q in T.scene_questions(rng, scene, ("spatial", "color")) if q.family == "spatial"]
        asked[n] += len(spatial)
        admitted[n] += bool(S.spatial_candidates(scene))
    assert admitted[2] > 0  # the generator has spatial questions about two objects; training skips them
    assert asked[2] == 0 and asked[3] > 0


def test_batches_mark_the_side_word_and_shape_of_each_spatial_question():
    rng = np.random.default_rng(8)
    batch, _ = T.multi_batch(rng, S.make_backgrounds(4, seed=8), 6, 3, 5, ("spatial", "spatial", "color"))
    spatial = batch["family"] == S.FAMILIES.index("spatial")
    assert spatial.any()
    assert torch.equal(batch["side_answers"] >= 0, spatial)
    for i, j in spatial.nonzero().tolist():
        side_word = S.VOCAB[int(batch["input_ids"][i, batch["side_pos"][i, j]])]
        assert side_word in S.SIDES
        answer = S.VOCAB[int(batch["answers"][i, j])]
        assert S.SHAPES[int(batch["side_answers"][i, j])] == answer
        # the side word belongs to this question: its answer follows within the question's length
        assert 0 < int(batch["answer_pos"][i, j] - batch["side_pos"][i, j]) < T.MAX_Q_LEN


def test_freeze_vision_trains_only_the_language_model(tiny_init, tmp_path):
    out = tmp_path / "frozen"
    T.main(["--init", str(tiny_init), "--freeze-vision", "--precision", "fp32", "--feature-layers", "-1",
            "--minutes", "0.05", "--stage1-minutes", "0", "--batch-size", "4", "--eval-n", "5", "--threads", "1",
            "--compile", "0", "--lr", "3e-3", "--out", str(out)])
    before, _ = load_testbed(tiny_init)
    after, _ = load_testbed(out)
    w0, w1 = _weights(before), _weights(after)
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert any(k.startswith("model.language_model") for k in changed)
    assert not any(k.startswith(("model.vision_tower", "model.multi_modal_projector")) for k in changed)
