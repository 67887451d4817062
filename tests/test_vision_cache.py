"""VisionCache: the vision side computed once and reused, exactly, and never for other inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tokenprune as tp  # noqa: E402
from tokenprune.errors import ConfigError, TokenPruneError  # noqa: E402
from tokenprune.testing.tiny_models import shared_tiny_vlm  # noqa: E402

QUESTIONS = ["What is shown?", "Describe the colours in this image, please."]


def _tiny(family):
    t = shared_tiny_vlm(family, small=True, num_layers=4)
    return t.model, t.inputs(QUESTIONS)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("method", ["fastervlm", "divprune", "fastv"])
def test_cached_vision_side_gives_identical_outputs(family, method):
    model, inputs = _tiny(family)
    params = {"budget": 8}
    if method == "fastervlm" and family in ("qwen2_vl", "idefics3"):
        params["cls_fallback"] = "text_similarity" if family == "qwen2_vl" else "mean_attention"
    cache = tp.VisionCache()
    with torch.no_grad():
        with tp.prune(model, method, **params) as plain:
            ref = model(**inputs).logits
        for _ in range(2):
            with tp.prune(model, method, vision_cache=cache, **params) as rep:
                out = model(**inputs).logits
            assert torch.equal(out, ref)
            assert [torch.equal(a, b) for s, t in zip(plain.stages, rep.stages) for a, b in zip(s.kept, t.kept)]
        with cache.attach(model):
            unpruned_cached = model(**inputs).logits
        assert torch.equal(unpruned_cached, model(**inputs).logits)
    st = cache.stats()
    # computed once; the second context and the unpruned call (the same call, defaults filled in) hit
    assert (st["misses"], st["hits"], st["entries"]) == (1, 2, 1)
    assert "get_image_features" not in model.model.__dict__


def test_other_images_and_in_place_changes_miss():
    model, inputs = _tiny("llava")
    cache = tp.VisionCache()
    with torch.no_grad():
        with tp.prune(model, "divprune", budget=8, vision_cache=cache):
            a = model(**inputs).logits
            other = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))
            b = model(**other).logits
            assert cache.stats()["misses"] == 2 and not torch.equal(a, b)
            copy = dict(inputs, pixel_values=inputs["pixel_values"].clone())  # same content, another tensor
            assert torch.equal(model(**copy).logits, a) and cache.stats()["hits"] == 1
            inputs["pixel_values"].mul_(0.5)  # in place: the stored entry no longer describes it
            c = model(**inputs).logits
            inputs["pixel_values"].mul_(2.0)
        assert cache.stats()["misses"] == 3 and not torch.equal(a, c)


def test_another_dtype_or_changed_weights_miss():
    model, inputs = _tiny("llava")
    cache = tp.VisionCache()
    with torch.no_grad():
        with cache.attach(model):
            model(**inputs)
            p = next(model.model.vision_tower.parameters())
            p.add_(0.0)  # an in-place update (an optimiser step) bumps the parameters' versions
            model(**inputs)
        assert cache.stats()["misses"] == 2
        half = shared_tiny_vlm("llava", small=True, num_layers=4).model.to(torch.bfloat16)
        try:
            with cache.attach(half):
                half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()})
            assert cache.stats()["misses"] == 3
        finally:
            half.to(torch.float32)


def test_memory_bound_evicts_least_recently_used():
    model, inputs = _tiny("llava")
    probe = tp.VisionCache()
    with torch.no_grad(), probe.attach(model):
        model(**inputs)
    one = probe.stats()["bytes"]
    assert one > 0
    cache = tp.VisionCache(max_bytes=int(one * 1.5))
    with torch.no_grad(), cache.attach(model):
        model(**inputs)
        model(**dict(inputs, pixel_values=inputs["pixel_values"].flip(-1)))
        st = cache.stats()
        assert st["entries"] == 1 and st["bytes"] <= cache.max_bytes
        model(**inputs)  # the first entry was evicted
        assert cache.stats()["misses"] == 3
    assert tp.VisionCache(max_bytes=0).max_bytes == 0


def test_attach_and_prune_nest_and_restore():
    model, inputs = _tiny("llava")
    cache = tp.VisionCache()
    base = model.model
    with cache.attach(model):
        wrapper = base.__dict__["get_image_features"]
        with tp.prune(model, "fastervlm", budget=8, vision_cache=cache):
            assert base.__dict__["get_image_features"] is not wrapper
        assert base.__dict__["get_image_features"] is wrapper
    assert "get_image_features" not in base.__dict__


def test_bad_arguments_raise_named_errors():
    model, _ = _tiny("llava")
    with pytest.raises(ConfigError, match="vision_cache"):
        tp.prune(model, "divprune", vision_cache={})
    with pytest.raises(TokenPruneError, match="max_bytes"):
        tp.VisionCache(max_bytes=-1)


def test_beam_search_does_not_change_the_cached_features():
    # generate(num_beams=2) replaces the output's pooler_output with a repeated one: on a cached output
    # that would hand later calls the features of twice as many prompts
    model, inputs = _tiny("llava")
    cache = tp.VisionCache()
    gen = dict(max_new_tokens=3, do_sample=False, num_beams=2)
    with torch.no_grad():
        with tp.prune(model, "divprune", budget=8):
            ref = model.generate(**inputs, **gen)
        for _ in range(2):
            with tp.prune(model, "divprune", budget=8, vision_cache=cache):
                assert torch.equal(model.generate(**inputs, **gen), ref)
    assert cache.stats()["hits"] >= 1


def test_keys_ride_along_with_the_cls_pass_and_serve_visionzip_exactly():
    """A [CLS] pass for the cache also captures the feature layer's keys, so a later pre-projector
    context (VisionZip) runs no tower pass of its own, and selects what it selects without the cache."""
    model, inputs = _tiny("llava")
    with torch.no_grad(), tp.prune(model, "visionzip", budget=8) as alone:
        want = model(**inputs).logits
    cache = tp.VisionCache()
    with torch.no_grad():
        with cache.attach(model):
            model(**inputs)
        with tp.prune(model, "fastervlm", budget=8, vision_cache=cache):
            model(**inputs)
        misses = cache.stats()["misses"]
        with tp.prune(model, "visionzip", budget=8, vision_cache=cache) as shared:
            got = model(**inputs).logits
    assert cache.stats()["misses"] == misses  # no tower pass for visionzip
    assert torch.equal(want, got)
    assert [k.tolist() for k in alone.stages[0].kept] == [k.tolist() for k in shared.stages[0].kept]
