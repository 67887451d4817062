"""The functional API: select, get/list/resolve methods, configs, composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tokenprune as tp
from tokenprune.errors import ConfigError, IncompatibleComponentsError, UnknownNameError
from tokenprune.testing import check_selection, example_context

NAMED = {"tops", "fastv", "reverse_fastv", "window_fastv", "pyramiddrop", "dart", "fastervlm", "visionzip",
         "divprune", "cdpruner", "facility_location", "scope", "random", "pooling"}


def _signals(ctx):
    return dict(relevance=ctx.relevance, text_embeddings=ctx.text_embeddings, text_mask=ctx.text_mask,
                text_relevance=ctx.text_relevance,
                grid=ctx.grid, mask=ctx.mask, seed=ctx.seed)


def test_import_registers_every_named_method_without_heavy_imports():
    code = ("import sys, tokenprune as tp; print(sorted(tp.list_methods())); "
            "print('transformers' in sys.modules, 'hypothesis' in sys.modules)")
    env = dict(os.environ, TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    names, heavy = out.stdout.strip().splitlines()
    assert NAMED <= set(eval(names))  # noqa: S307 (our own printed list)
    assert heavy == "False False"


def test_select_tops_on_llava_sized_inputs():
    g = torch.Generator().manual_seed(0)
    feats, r = torch.randn(2, 576, 1024, generator=g), torch.rand(2, 576, generator=g)
    sel = tp.select("tops", feats, relevance=r, budget=64)
    assert sel.indices.shape == (2, 64) and sel.counts.tolist() == [64, 64]
    assert bool((sel.indices[:, 1:] > sel.indices[:, :-1]).all())
    assert sel.indices[0, :].tolist().count(int(r[0].argmax())) == 1  # TOPS's first pick is kept
    assert int(sel.order[0, 0]) == int(r[0].argmax()) and int(sel.order[1, 0]) == int(r[1].argmax())


def test_select_accepts_names_methods_and_configs():
    ctx = example_context()
    by_name = tp.select("facility_location", ctx.features, budget=3, mask=ctx.mask)
    method = tp.create_method("facility_location")
    by_method = tp.select(method, ctx.features, budget=3, mask=ctx.mask)
    by_config = tp.select(json.loads(json.dumps(method.to_config())), ctx.features, budget=3, mask=ctx.mask)
    assert torch.equal(by_name.indices, by_method.indices) and torch.equal(by_name.indices, by_config.indices)


def test_select_single_sample_and_fraction():
    x, r = torch.randn(20, 4), torch.rand(20)
    sel = tp.select("fastervlm", x, relevance=r, budget=0.25)
    assert sel.indices.shape == (1, 5)
    assert sel.indices[0].tolist() == sorted(r.argsort(descending=True)[:5].tolist())


def test_select_stage_argument_and_stage_budget_default():
    ctx = example_context(rows=6, cols=6, padding=False, batch=1)
    m = tp.create_method("pyramiddrop")
    full = m.select(ctx.features, relevance=ctx.relevance)
    assert full.counts.tolist() == [18]  # the stage's own budget: half of 36
    assert m.select(ctx.features, relevance=ctx.relevance, stage=2, budget=4).counts.tolist() == [4]
    with pytest.raises(IndexError):
        m.select(ctx.features, relevance=ctx.relevance, stage=3, budget=4)


def test_select_requires_a_budget():
    with pytest.raises(TypeError):
        tp.select("random", torch.randn(1, 4, 2))  # budget is keyword-only and required


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'fastv'") as exc:
        tp.select("fastvv", torch.randn(1, 4, 2), budget=2)
    assert isinstance(exc.value, KeyError) and "fastv" in exc.value.suggestions
    with pytest.raises(UnknownNameError, match="divprune"):
        tp.create_method("div_prune")


def test_get_method_checks_parameters_and_records_them():
    m = tp.create_method("scope", budget=32, alpha=0.5)
    assert m.name == "scope" and m.params == {"budget": 32, "alpha": 0.5}
    assert m.stages[0].objective.alpha == 0.5
    with pytest.raises(TypeError, match="lambda_"):
        tp.create_method("scope", lambda_=1.0)


def test_resolve_method_and_from_config_errors():
    with pytest.raises(IncompatibleComponentsError):
        tp.resolve_method(42)
    with pytest.raises(ConfigError):
        tp.from_config([1, 2])
    with pytest.raises(ConfigError):
        tp.from_config({"name": "x"})
    cfg = tp.create_method("fastv").to_config()
    cfg["stages"][0]["unexpected"] = 1
    with pytest.raises(ConfigError, match="unexpected"):
        tp.from_config(cfg)
    cfg = tp.create_method("fastv").to_config()
    cfg["stages"][0]["objective"] = {"name": "relevance", "params": {"sauce": "given"}}
    with pytest.raises(ConfigError):
        tp.from_config(cfg)


def test_factory_must_return_a_method():
    tp.register_method("test_not_a_method", lambda budget=1: "nope")
    try:
        with pytest.raises(IncompatibleComponentsError):
            tp.create_method("test_not_a_method")
    finally:
        tp.registry.methods.unregister("test_not_a_method")


# -- config round trip for every registered method -------------------------------------------------------

NON_DEFAULT = {"tops": dict(budget=32, coverage_weight=1.0, normalize="mean", schedule="qwen2_5_vl"),
               "pyramiddrop": dict(budget=40, ratio=0.25), "dart": dict(image_pivots=2, text_pivots=1),
               "visionzip": dict(merge="target_plus_mean"), "window_fastv": dict(windows=(2, 3)),
               "scope": dict(alpha=2.0, combine="add"), "random": dict(seed=5), "cdpruner": dict(theta=0.5)}


@pytest.mark.parametrize("name", tp.list_methods())
def test_method_config_json_round_trip(name):
    ctx = example_context()
    for params in ({}, NON_DEFAULT.get(name, {})):
        m = tp.create_method(name, **params)
        text = json.dumps(m.to_config())
        back = tp.from_config(json.loads(text))
        assert back == m and back.name == name
        assert json.dumps(back.to_config()) == text
        for i in range(len(m.stages)):
            a = m.select(ctx.features, stage=i, budget=3, **_signals(ctx))
            b = back.select(ctx.features, stage=i, budget=3, **_signals(ctx))
            assert torch.equal(a.indices, b.indices) and torch.equal(a.order, b.order)
            assert (a.features is None and b.features is None) or torch.equal(a.features, b.features)


@pytest.mark.parametrize("name", tp.list_methods())
def test_with_budget_keeps_the_other_parameters(name):
    m = tp.create_method(name, **NON_DEFAULT.get(name, {}))
    m2 = m.with_budget(7)
    assert m2.name == name and len(m2.stages) == len(m.stages)
    assert [type(s.objective) for s in m2.stages] == [type(s.objective) for s in m.stages]
    assert [s.selector for s in m2.stages] == [s.selector for s in m.stages]


# -- listing, components ---------------------------------------------------------------------------------


def test_list_patterns():
    assert tp.list_methods("*fastv") == ["fastv", "reverse_fastv", "window_fastv"]
    assert tp.list_methods("*fast*", exclude="*_*") == ["fastervlm", "fastv"]
    assert tp.list_methods("nothing*") == []
    assert tp.list_criteria() == sorted(tp.list_criteria())
    assert "facility_location" not in tp.list_criteria()  # an alias of coverage: resolvable, not listed
    assert tp.get_criterion("facility_location") is tp.get_criterion("coverage")
    assert {"greedy", "topk", "visionzip"} <= set(tp.list_selectors())
    assert {"pivot_dissimilarity", "saliency_coverage"} <= set(tp.list_criteria())


def test_compose_and_objective_algebra():
    rel, cov = tp.get_criterion("relevance")(), tp.get_criterion("coverage")()
    obj = 0.6 * rel + 0.4 * cov
    assert isinstance(obj, tp.WeightedSum) and obj.tags.submodular and obj.tags.requires == {"relevance"}
    m = tp.compose(obj, selector="greedy", budget=5)
    ctx = example_context()
    sel = m.select(ctx.features, **_signals(ctx))
    check_selection(sel, ctx, 5)
    back = tp.from_config(json.loads(json.dumps(m.to_config())))
    assert back == m
    with pytest.raises(ValueError):
        -1.0 * rel  # noqa: B018
    with pytest.raises(IncompatibleComponentsError):
        tp.compose(None, selector="greedy", budget=3)


def test_selection_helpers():
    ctx = example_context()
    sel = tp.select("facility_location", ctx.features, budget=6, mask=ctx.mask)
    keep = sel.keep_mask(ctx.num_tokens)
    assert keep.sum(1).tolist() == sel.counts.tolist()
    assert not bool((keep & ~ctx.mask).any())
    pre = sel.prefix(2)
    assert pre.counts.tolist() == [2, 2, 2]
    assert torch.equal(pre.indices, tp.select("facility_location", ctx.features, budget=2, mask=ctx.mask).indices)


def test_get_method_is_a_deprecated_alias_of_create_method():
    with pytest.warns(DeprecationWarning, match="create_method"):
        old = tp.get_method("fastv", budget=32)
    assert old == tp.create_method("fastv", budget=32)
