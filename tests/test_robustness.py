"""Bad parameters raise named tokenprune errors (issue #13, item 5).

Every error derives from :class:`tokenprune.errors.TokenPruneError` and from the built-in exception a
caller would catch (``ValueError``, ``TypeError``, ``IndexError``). Each case checks the class, the
built-in it also is, and a fragment of the message naming the problem.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune import errors
from tokenprune.criteria import (Coverage, LogDet, PivotDissimilarity, Relevance, SaliencyCoverage, TOPSObjective,
                                 WeightedSum)
from tokenprune.criteria.base import normalize_gains
from tokenprune.selectors import FacilityLocationGreedy, Greedy, Pooling, Random, TopK, VisionZip, WindowTopK


def _feats(n=16):
    return torch.randn(1, n, 8)


# (id, call, error class name in tokenprune.errors, built-in it must also be, message fragment)
PARAMETER_CASES = [
    # negative weights
    ("tops_negative_weight", lambda: tp.create_method("tops", coverage_weight=-1),
     "ParameterError", ValueError, "coverage_weight must be a finite number >= 0"),
    ("tops_objective_negative_weight", lambda: TOPSObjective(diversity_weight=-0.1),
     "ParameterError", ValueError, "diversity_weight must be a finite number >= 0"),
    ("negative_scalar_times_criterion", lambda: -0.5 * Coverage(),
     "ParameterError", ValueError, "criterion weights must be finite and >= 0"),
    ("weighted_sum_negative_weight", lambda: WeightedSum.of([(-1.0, Coverage())]),
     "ParameterError", ValueError, "criterion weights must be finite and >= 0"),
    ("weighted_sum_empty", lambda: WeightedSum.of([]),
     "ParameterError", ValueError, "at least one term"),
    # unknown normalize
    ("weighted_sum_normalize", lambda: WeightedSum.of([(1.0, Coverage())], normalize="x"),
     "ParameterError", ValueError, "normalize must be one of"),
    ("tops_objective_normalize", lambda: TOPSObjective(normalize="x"),
     "ParameterError", ValueError, "normalize must be one of"),
    ("normalize_gains_mode", lambda: normalize_gains(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), "x"),
     "ParameterError", ValueError, "normalize must be one of"),
    # unknown merge / merge_by
    ("visionzip_method_merge", lambda: tp.create_method("visionzip", merge="x"),
     "ParameterError", ValueError, "merge must be one of"),
    ("visionzip_merge_by", lambda: VisionZip(merge_by="x"),
     "ParameterError", ValueError, "merge_by must be one of"),
    ("visionzip_contextual_ratio", lambda: VisionZip(contextual_ratio=1.5),
     "ParameterError", ValueError, "contextual_ratio must be a number in [0, 1)"),
    # criterion constructors
    ("relevance_source", lambda: Relevance(source="x"), "ParameterError", ValueError, "source must be one of"),
    ("relevance_reduce", lambda: Relevance(reduce="x"), "ParameterError", ValueError, "reduce must be 'max' or 'mean'"),
    ("pivot_num_pivots", lambda: PivotDissimilarity(num_pivots=0),
     "ParameterError", ValueError, "num_pivots must be a positive int"),
    ("pivot_reduce", lambda: PivotDissimilarity(reduce="x"), "ParameterError", ValueError, "reduce must be"),
    ("saliency_alpha", lambda: SaliencyCoverage(alpha=-1),
     "ParameterError", ValueError, "alpha must be a finite number >= 0"),
    ("saliency_combine", lambda: SaliencyCoverage(combine="x"),
     "ParameterError", ValueError, "combine must be 'multiply' or 'add'"),
    ("logdet_quality", lambda: LogDet(quality="x"), "ParameterError", ValueError, "quality must be one of"),
    ("logdet_kernel", lambda: LogDet(kernel="x"), "ParameterError", ValueError, "kernel must be one of"),
    ("logdet_eps", lambda: LogDet(eps=0), "ParameterError", ValueError, "eps must be a positive finite float"),
    ("logdet_theta", lambda: LogDet(theta=1.5), "ParameterError", ValueError, "theta must be None or in [0, 1)"),
    ("logdet_normalize_quality", lambda: LogDet(normalize_quality="yes"),
     "ParameterError", ValueError, "normalize_quality must be a bool"),
    ("tops_objective_source", lambda: TOPSObjective(source="x"), "ParameterError", ValueError, "source must be one of"),
    ("tops_objective_incremental", lambda: TOPSObjective(incremental="no"),
     "ParameterError", ValueError, "incremental must be a bool"),
    ("create_criterion_bad_value", lambda: tp.create_criterion("saliency_coverage", alpha=-2),
     "ParameterError", ValueError, "alpha must be"),
    # selector constructors
    ("greedy_stochastic", lambda: Greedy(stochastic=2),
     "ParameterError", ValueError, "stochastic must be None or an epsilon in (0, 1)"),
    ("greedy_lazy_type", lambda: Greedy(lazy="x"), "ParameterError", ValueError, "lazy must be a bool"),
    ("greedy_lazy_and_stochastic", lambda: Greedy(lazy=True, stochastic=0.5),
     "ParameterError", ValueError, "not both"),
    ("topk_largest", lambda: TopK(largest="x"), "ParameterError", ValueError, "largest must be a bool"),
    ("facility_lazy", lambda: FacilityLocationGreedy(lazy="x"), "ParameterError", ValueError, "lazy must be a bool"),
    ("random_seed", lambda: Random(seed="x"), "ParameterError", ValueError, "seed must be an int or None"),
    ("window_topk_windows", lambda: WindowTopK(windows=0),
     "ParameterError", ValueError, "windows must be a positive int"),
    ("create_selector_bad_value", lambda: tp.create_selector("greedy", stochastic=-1),
     "ParameterError", ValueError, "stochastic must be"),
    # method parameters
    ("pyramiddrop_layers_not_a_sequence", lambda: tp.create_method("pyramiddrop", layers=8),
     "StageError", ValueError, "layers must be a sequence"),
    # tp.select arguments
    ("select_seed", lambda: tp.select("random", _feats(), budget=3, seed="abc"),
     "ParameterError", ValueError, "seed must be an int"),
    ("select_stage_out_of_range", lambda: tp.select("fastv", _feats(), budget=3, relevance=torch.rand(1, 16), stage=5),
     "StageIndexError", IndexError, "stage must be the index of one of the method's 1 stage"),
    ("select_stage_not_an_int", lambda: tp.select("fastv", _feats(), budget=3, relevance=torch.rand(1, 16), stage="1"),
     "StageIndexError", IndexError, "stage must be the index"),
    ("select_negative_grid", lambda: tp.select("pooling", _feats(), budget=4, grid=(-2, 3)),
     "ShapeError", ValueError, "grid must be a (rows, cols) pair of positive ints"),
    ("select_negative_grid_matching_n", lambda: tp.select("pooling", _feats(), budget=4, grid=(-4, -4)),
     "ShapeError", ValueError, "positive ints"),
    ("selector_negative_grid", lambda: Pooling().select(None, tp.make_context(_feats(), grid=(-4, -4)), 4),
     "ShapeError", ValueError, "grid of positive ints"),
]


@pytest.mark.parametrize("call, name, builtin, fragment", [c[1:] for c in PARAMETER_CASES],
                         ids=[c[0] for c in PARAMETER_CASES])
def test_bad_parameters_raise_named_errors(call, name, builtin, fragment):
    cls = getattr(errors, name, None)
    assert cls is not None, f"tokenprune.errors has no {name}"
    with pytest.raises(cls) as info:
        call()
    assert isinstance(info.value, errors.TokenPruneError) and isinstance(info.value, builtin)
    assert fragment in str(info.value)


def test_parameter_error_is_exported_and_catchable_as_value_error():
    assert tp.ParameterError is errors.ParameterError
    assert "ParameterError" in tp.__all__
    assert issubclass(errors.ParameterError, errors.TokenPruneError) and issubclass(errors.ParameterError, ValueError)
    assert issubclass(errors.StageIndexError, errors.StageError) and issubclass(errors.StageIndexError, IndexError)
    with pytest.raises(ValueError):
        Relevance(source="x")


def test_valid_stage_seed_and_grid_still_work():
    feats = _feats()
    assert tp.select("random", feats, budget=3, seed=5).counts.tolist() == [3]
    m = tp.create_method("pyramiddrop")
    assert m.select(feats, relevance=torch.rand(1, 16), stage=-1, budget=2).counts.tolist() == [2]
    assert tp.select("pooling", feats, budget=4, grid=(4, 4)).indices.shape[0] == 1


# Already named before #13 item 5; kept as regression tests.
ALREADY_NAMED = [
    ("tops_method_normalize", lambda: tp.create_method("tops", normalize="x"),
     "ConfigError", ValueError, "normalize must be"),
    ("fastv_unknown_keyword", lambda: tp.create_method("fastv", foo=1),
     "IncompatibleComponentsError", TypeError, "takes no parameter(s) ['foo']"),
]


@pytest.mark.parametrize("call, name, builtin, fragment", [c[1:] for c in ALREADY_NAMED],
                         ids=[c[0] for c in ALREADY_NAMED])
def test_already_named_errors(call, name, builtin, fragment):
    test_bad_parameters_raise_named_errors(call, name, builtin, fragment)


# -- on a model -------------------------------------------------------------------------------------

def _tiny():
    pytest.importorskip("transformers")
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    return shared_tiny_vlm("llava", small=True, num_layers=4)


def test_labels_with_an_in_llm_stage_raise_stage_error_before_the_model_runs():
    t = _tiny()
    inputs = t.inputs()
    with pytest.raises(errors.StageError, match=r"labels \(a training loss\) are not supported with in-LLM"):
        with tp.prune(t.model, "fastv", budget=8) as report:
            t.model(**inputs, labels=inputs["input_ids"])
    assert report.calls == 0  # refused before the prefill rewrite
    with torch.no_grad(), tp.prune(t.model, "fastv", budget=8):  # the model is left usable
        assert t.model(**inputs).logits.shape[0] == 1


def test_flex_attention_with_a_text_attention_method_is_unsupported_at_prune_time():
    t = _tiny()
    cfg = t.model.config.text_config
    saved = cfg._attn_implementation_internal
    try:
        cfg._attn_implementation_internal = "flex_attention"
        assert cfg._attn_implementation == "flex_attention"
        with pytest.raises(errors.UnsupportedModelError, match="flex attention") as info:
            with tp.prune(t.model, "fastv", budget=8):
                pass  # raised on entering, before any forward
        assert "sdpa" in str(info.value) and "eager" in str(info.value)
        assert cfg._attn_implementation_internal == "flex_attention"  # nothing left switched
    finally:
        cfg._attn_implementation_internal = saved


def test_flex_attention_wrapper_name_is_refused():
    pytest.importorskip("transformers")
    from tokenprune.runtime.attention import wrapper_name

    with pytest.raises(errors.UnsupportedModelError, match="flex attention"):
        wrapper_name("flex_attention")
    assert wrapper_name("sdpa") == "tokenprune_sdpa"


def test_wrong_adapter_names_adapter():
    t = _tiny()
    with pytest.raises(errors.UnsupportedModelError, match="adapter must be a ModelAdapter"):
        tp.prune(t.model, "fastv", adapter=3)


@pytest.mark.parametrize("kw, error, fragment", [(dict(seed="x"), errors.ParameterError, "seed must be an int"),
                                                 (dict(dynamic_threshold="x"), errors.StageError, "dynamic_threshold")])
def test_prune_seed_and_dynamic_threshold_raise_named_errors(kw, error, fragment):
    t = _tiny()
    with pytest.raises(error, match=fragment):
        tp.prune(t.model, "fastv", **kw)


# ---------------------------------------------------------------------------------------------------
# the probe's other bad inputs on plain tensors: each raises a named error that says what is wrong
_F, _R = torch.randn(2, 16, 8), torch.rand(2, 16)
_BAD_INPUTS = {
    "budget 0": (lambda: tp.select("fastervlm", _F, relevance=_R, budget=0), errors.BudgetError, "must be >= 1"),
    "budget negative": (lambda: tp.select("fastervlm", _F, relevance=_R, budget=-3), errors.BudgetError, ">= 1"),
    "budget NaN": (lambda: tp.select("fastervlm", _F, relevance=_R, budget=float("nan")), errors.BudgetError,
                   "in \\(0, 1\\]"),
    "budget bool": (lambda: tp.select("fastervlm", _F, relevance=_R, budget=True), errors.BudgetError, "got True"),
    "budget str": (lambda: tp.select("fastervlm", _F, relevance=_R, budget="8"), errors.BudgetError, "got '8'"),
    "budget 1.5": (lambda: tp.select("fastervlm", _F, relevance=_R, budget=1.5), errors.BudgetError, "for a count"),
    "features NaN": (lambda: tp.select("divprune", _F.clone().index_fill_(1, torch.tensor([3]), float("nan")),
                                       budget=4), errors.InvalidFeaturesError, "NaN or inf"),
    "features inf": (lambda: tp.select("divprune", _F.clone().index_fill_(1, torch.tensor([3]), float("inf")),
                                       budget=4), errors.InvalidFeaturesError, "NaN or inf"),
    "features rank 4": (lambda: tp.select("divprune", _F[None], budget=4), errors.ShapeError, "\\[B, N, D\\]"),
    "features rank 1": (lambda: tp.select("divprune", _F[0, 0], budget=4), errors.ShapeError, "\\[B, N, D\\]"),
    "features empty": (lambda: tp.select("divprune", _F[:, :0], budget=4), errors.ShapeError, "at least one token"),
    "features int": (lambda: tp.select("divprune", _F.long(), budget=4), errors.InvalidFeaturesError,
                     "floating-point"),
    "mask all False": (lambda: tp.select("divprune", _F, budget=4, mask=torch.zeros(2, 16, dtype=torch.bool)),
                       errors.InvalidFeaturesError, "all-padding row"),
    "mask mis-shaped": (lambda: tp.select("divprune", _F, budget=4, mask=torch.ones(2, 15, dtype=torch.bool)),
                        errors.ShapeError, "mask must be \\[B, N\\]"),
    "relevance mis-shaped": (lambda: tp.select("fastervlm", _F, relevance=torch.rand(2, 15), budget=4),
                             errors.ShapeError, "relevance must be \\[B, N\\]"),
    "relevance missing": (lambda: tp.select("fastervlm", _F, budget=4), errors.MissingSignalError, "ctx.relevance"),
    "text embeddings mis-shaped": (lambda: tp.select("cdpruner", _F, relevance=_R, budget=4,
                                                     text_embeddings=torch.randn(2, 3, 7)),
                                   errors.ShapeError, "text_embeddings must be \\[B, T, D\\]"),
    "unknown method": (lambda: tp.create_method("fastvv"), errors.UnknownNameError, "Did you mean 'fastv'"),
    "unknown criterion": (lambda: tp.create_criterion("coverag"), errors.UnknownNameError, "Did you mean 'coverage'"),
    "unknown selector": (lambda: tp.create_selector("gredy"), errors.UnknownNameError, "Did you mean 'greedy'"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_inputs_raise_named_errors(case):
    call, error, fragment = _BAD_INPUTS[case]
    with pytest.raises(error, match=fragment) as info:
        call()
    assert isinstance(info.value, errors.TokenPruneError)
