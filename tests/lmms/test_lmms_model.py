"""The ``tokenprune`` lmms-eval model: registration, load-time errors, every tiny family, the request types."""

from __future__ import annotations

import pytest
from .lmms_helpers import run_lmms

import tokenprune as tp
from tokenprune.errors import ConfigError, ImageError, UnknownNameError, UnsupportedModelError
from tokenprune.integrations.lmms.model import TokenPruneLMM
from tokenprune.testbed.evaluate import checkpoint_path
from tokenprune.testing.tiny_models import MODEL_FAMILIES, build_tiny_vlm

CKPT = str(checkpoint_path())


def test_registered_through_the_entry_point():
    import lmms_eval.models as models
    from lmms_eval.api.model import lmms

    assert "tokenprune" in models.list_available_models()
    cls = models.get_model("tokenprune")
    assert cls is TokenPruneLMM and issubclass(cls, lmms) and cls.is_simple


@pytest.mark.parametrize("args, error, words", [
    ("pretrained={ckpt},metod=divprune", ConfigError, ["metod", "pretrained"]),
    ("pretrained={ckpt},method=divprune,budget=22,alpha=0.5", ConfigError, ["alpha", "divprune"]),
    ("pretrained={ckpt},method=no_such_method", UnknownNameError, ["no_such_method"]),
    ("pretrained={ckpt},method=divprune,budget=0", ConfigError, ["budget"]),
    ("pretrained={ckpt},dtype=float64", ConfigError, ["dtype"]),
    ("pretrained={ckpt},budget=22", ConfigError, ["method"]),
    ("method=divprune", ConfigError, ["pretrained"]),
])
def test_bad_model_args_fail_at_load(args, error, words):
    with pytest.raises(error) as e:
        TokenPruneLMM.create_from_arg_string(args.format(ckpt=CKPT))
    for w in words:
        assert w in str(e.value)


def test_unsupported_model_type_fails_at_load(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModelError, match="bert"):
        TokenPruneLMM.create_from_arg_string(f"pretrained={tmp_path},method=divprune,budget=8")


def test_method_that_cannot_run_on_the_family_fails_at_load():
    # FasterVLM ranks by the vision tower's [CLS] attention; Qwen2-VL's tower has no [CLS]
    tiny = build_tiny_vlm("qwen2_vl", small=True)
    with pytest.raises(UnsupportedModelError, match="CLS|cls"):
        TokenPruneLMM.from_model(tiny.model, tiny.processor, method="fastervlm", budget=8, cls_fallback="error")


def _write(method, path):
    import json

    with open(path, "w") as fh:
        json.dump(method.to_config(), fh)
    return path


def test_a_composed_method_from_a_json_config(testbed_task, tmp_path):
    cfg = _write(tp.compose(0.5 * tp.criteria.Coverage() + 0.5 * tp.criteria.Relevance(), selector="greedy",
                            budget=44, relevance="cls_attention"), tmp_path / "m.json")
    res = run_lmms("tokenprune", ["tokenprune_testbed"], testbed_task, limit=4,
                   model_args=f"pretrained={CKPT},method={cfg},budget=22")
    assert 0.0 <= res["results"]["tokenprune_testbed"]["vqa_accuracy,none"] <= 1.0


def _chat_template(tiny) -> str:
    """A Jinja chat template reproducing the tiny model's prompt template (images, then the text)."""
    import json

    def lit(text):  # a Jinja string expression: literal text is not touched by trim_blocks / lstrip_blocks
        return "{{ " + json.dumps(text) + " }}"

    pre, rest = tiny.template.split("{image}")
    mid, post = rest.split("{question}")
    return ("{% for m in messages %}{% if m['role'] == 'user' %}" + lit(pre)
            + "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + lit(tiny.image_placeholder)
            + "{% endif %}{% endfor %}" + lit(mid)
            + "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
            + lit(post) + "{% endif %}{% endfor %}")


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_every_tiny_family_runs_through_lmms_eval(family, photo_task):
    """A before-LLM method and an in-LLM method on a tiny model of each family, with its chat template."""
    for method in ("divprune", "fastv"):
        tiny = build_tiny_vlm(family, small=True)
        kw = {}
        if family == "smolvlm":  # its apply_chat_template needs the video processor the tiny model lacks
            kw["prompt"] = tiny.template
        else:
            tiny.processor.chat_template = _chat_template(tiny)
        lm = TokenPruneLMM.from_model(tiny.model, tiny.processor, method=method, budget=16, batch_size=2, **kw)
        res = run_lmms(lm, ["tiny_photos"], photo_task, limit=2)
        samples = res["samples"]["tiny_photos"]
        assert len(samples) == 2 and all(isinstance(s["vqa_accuracy"]["prediction"], str) for s in samples)
        rep = lm.tokenprune_report
        assert rep["requests"] == 2 and rep["model"]["model_type"] == family and rep["method"] == method
        assert rep["stages"] and rep["equivalent_tokens"] < rep["visual_tokens"]
        if method == "divprune":
            # LLaVA-NeXT / OneVision keep their newline tokens besides the 16 (newlines="keep")
            assert rep["stages"][0]["where"] == "before LLM" and rep["stages"][0]["tokens"] >= 16
            assert rep["nominal_tokens"] == 16 and rep["equivalent_tokens"] == rep["stages"][0]["tokens"]
        else:
            assert rep["stages"][0]["layer"] is not None


class _Req:
    """A stand-in for lmms-eval's ``Instance`` (``args`` and ``metadata``)."""

    def __init__(self, args, padding=False):
        self.args = args
        self.metadata = {"__padding_only__": True} if padding else {}


@pytest.fixture(scope="module")
def llava_lm():
    tiny = build_tiny_vlm("llava", small=True)
    tiny.processor.chat_template = _chat_template(tiny)
    from tokenprune.testing.tiny_models import sample_images

    lm = TokenPruneLMM.from_model(tiny.model, tiny.processor, method="divprune", budget=8)
    lm.task_dict = {"t": {"test": [{"image": sample_images()[0]}, {"image": "not an image"}]}}
    return lm


def _visual(doc):
    return [doc["image"]]


def test_generate_until_cuts_at_until_and_skips_padding(llava_lm):
    lm = llava_lm
    before = (len(lm.accounting.records), lm.accounting.padding_skipped)
    gen = {"max_new_tokens": 3, "until": ["\n"], "do_sample": False}
    out = lm.generate_until([_Req(("hi", dict(gen), _visual, 0, "t", "test")),
                             _Req(("hi", dict(gen), _visual, 0, "t", "test"), padding=True)])
    assert len(out) == 2 and all(isinstance(o, str) and "\n" not in o for o in out)
    assert out[0] == out[1]  # the padding request is answered like its source
    assert (len(lm.accounting.records) - before[0], lm.accounting.padding_skipped - before[1]) == (1, 1)


def test_unknown_generation_setting_raises(llava_lm):
    with pytest.raises(ConfigError, match="not_a_setting"):
        llava_lm.generate_until([_Req(("hi", {"not_a_setting": 1}, _visual, 0, "t", "test"))])


def test_an_error_inside_a_request_raises(llava_lm):
    with pytest.raises(ImageError, match="PIL"):
        llava_lm.generate_until([_Req(("hi", {"max_new_tokens": 2}, _visual, 1, "t", "test"))])


def test_loglikelihood(llava_lm):
    out = llava_lm.loglikelihood([_Req(("What is shown?", " a temple", _visual, 0, "t", "test")),
                                  _Req(("What is shown?", lambda d: " a flower", _visual, 0, "t", "test"))])
    assert len(out) == 2 and all(isinstance(s, float) and s < 0 and isinstance(g, bool) for s, g in out)


def test_multi_round(llava_lm):
    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        return [doc["image"]], f"round {round_idx}", round_idx >= 3, previous_output, {"r": round_idx}

    out = llava_lm.generate_until_multi_round([_Req(("round 0", {"max_new_tokens": 2}, _visual, doc_to_text, 0,
                                                     "t", "test"))])
    assert len(out) == 1 and len(out[0]) == 3 and all(isinstance(o, str) for o in out[0])


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "gemma3"])
def test_from_pretrained_with_the_saved_chat_template(family, photo_task, tmp_path):
    """``pretrained=DIR`` loads model, processor and chat template with ``from_pretrained`` (families whose tiny
    processors can be saved: the others have no video processor without torchvision)."""
    tiny = build_tiny_vlm(family, small=True)
    tiny.processor.chat_template = _chat_template(tiny)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    lm = TokenPruneLMM.create_from_arg_string(f"pretrained={tmp_path},method=divprune,budget=16")
    assert lm.processor.chat_template == _chat_template(tiny) and lm.model_type == family
    assert lm._prompt("What is it?", 1) == tiny.prompt("What is it?")  # its chat template, not a fallback
    res = run_lmms(lm, ["tiny_photos"], photo_task, limit=1)
    assert isinstance(res["samples"]["tiny_photos"][0]["vqa_accuracy"]["prediction"], str)
    assert lm.tokenprune_report["model"]["pretrained"] == str(tmp_path)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_loglikelihood_on_every_family(family):
    from tokenprune.testing.tiny_models import sample_images

    tiny = build_tiny_vlm(family, small=True)
    kw = {"prompt": tiny.template} if family == "smolvlm" else {}
    if family != "smolvlm":
        tiny.processor.chat_template = _chat_template(tiny)
    lm = TokenPruneLMM.from_model(tiny.model, tiny.processor, method="divprune", budget=16, **kw)
    lm.task_dict = {"t": {"test": [{"image": sample_images()[0]}]}}
    (score, greedy), = lm.loglikelihood([_Req(("What is shown?", " a temple", _visual, 0, "t", "test"))])
    assert -1e4 < score < 0 and isinstance(greedy, bool)
    assert lm.accounting.records[-1].stages[0][2] >= 16 and lm.accounting.records[-1].nominal_tokens == 16
