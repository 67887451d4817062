"""Inputs that once gave silent wrong output (issue #13): each case checks what is returned now."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.criteria import Coverage, ModularCriterion, Relevance, Tags
from tokenprune.selectors import Greedy, TopK


class _Scores(ModularCriterion):
    """A modular criterion whose scores are given (as a plugin could return them)."""

    tags = Tags(modular=True, submodular=True)

    def __init__(self, scores):
        object.__setattr__(self, "_s", scores)

    def scores(self, ctx):
        return self._s


SELECTORS = [Greedy(), Greedy(lazy=True), Greedy(stochastic=0.1), TopK(), TopK(largest=False)]


def _check(sel, mask, k, at_most=False):
    """Unique, ascending, valid indices: ``min(k, valid)`` per row (``k`` an int, or a Budget resolved per
    row); with ``at_most``, between 1 and that many (pooling keeps the largest pooled grid that fits)."""
    idx, valid = sel.indices, sel.valid
    for b in range(idx.shape[0]):
        row = idx[b][valid[b]]
        n = int(mask[b].sum())
        want = k.resolve(n) if isinstance(k, tp.Budget) else min(k, n)
        assert (1 <= len(row) <= want) if at_most else len(row) == want
        assert len(set(row.tolist())) == len(row), f"duplicate indices {row.tolist()}"
        assert torch.all(row[1:] > row[:-1]) and bool(mask[b][row].all()), f"invalid indices {row.tolist()}"


@pytest.mark.parametrize("selector", SELECTORS, ids=repr)
@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_non_finite_gains_never_repeat_or_pick_padding(selector, bad):
    torch.manual_seed(0)
    feats = torch.randn(3, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 2:5] = False  # padding in the middle
    scores = torch.randn(3, 10)
    scores[0] = bad  # every gain of a row
    scores[1, ::2] = bad  # some gains
    objective = _Scores(scores)
    if not isinstance(selector, TopK):
        objective = objective + Coverage()
    sel = tp.compose(objective, selector=selector, budget=6).select(feats, mask=mask)
    _check(sel, mask, 6)


@pytest.mark.parametrize("selector", ["greedy", Greedy(lazy=True)], ids=str)
def test_text_relevance_without_text_keeps_valid_unique_indices(selector):
    # the case: a text_mask row that is all False makes every relevance -inf
    torch.manual_seed(1)
    feats, text = torch.randn(2, 10, 8), torch.randn(2, 3, 8)
    text_mask = torch.tensor([[False] * 3, [True, False, True]])
    m = tp.compose(Relevance(source="text_similarity") + Coverage(), selector=selector, budget=6)
    sel = m.select(feats, text_embeddings=text, text_mask=text_mask)
    _check(sel, torch.ones(2, 10, dtype=torch.bool), 6)
    # finite gains are untouched: the row with text selects as before (its plain-greedy order)
    ref = m.select(feats[1:], text_embeddings=text[1:], text_mask=text_mask[1:])
    assert torch.equal(sel.indices[1], ref.indices[0])


def test_batched_and_one_by_one_evaluation_give_the_same_records():
    """Left padding must not move positions: the scoring forward of a padded batch gives each question
    the logits, and each method the kept tokens, it gives the question alone (``random`` draws one
    generator per batch, by design, so its subsets depend on the batch and it is left out)."""
    import tokenprune as tp
    from tokenprune.evaluation.runner import Evaluator
    from tokenprune.testbed.evaluate import held_out_examples
    from tokenprune.testbed.model import build_model, build_processor

    model = build_model(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=4,
                        text_heads=2, seed=3).eval()
    examples = held_out_examples(limit=6)
    ev = Evaluator(model, build_processor(), examples, batch_size=6, progress=False)
    batch = ev.inputs_of(ev.prepare()[0])
    assert bool((batch["attention_mask"] == 0).any()), "the questions must differ in length, so the batch is padded"
    alone = [ev.inputs_of(ev.prepare()[0].__class__([e], ev._encode([e]), [None])) for e in examples]
    for name in [None] + [m for m in tp.list_methods() if m != "random"]:
        method = None if name is None else tp.create_method(name, budget=12)
        with torch.no_grad(), ev._pruned(method) as report:
            logits = ev._prefill(batch).logits[:, -1]
            kept = None if report is None else [[k.tolist() for k in st.kept] for st in report.stages]
        for i, one in enumerate(alone):
            with torch.no_grad(), ev._pruned(method) as report1:
                ref = ev._prefill(one).logits[0, -1]
                if report1 is not None:
                    assert [st.kept[0].tolist() for st in report1.stages] == [k[i] for k in kept], (name, i)
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4, msg=f"{name}, question {i}")


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "idefics3", "gemma3"])
@pytest.mark.parametrize("method", ["fastervlm", "divprune", "fastv"])
def test_beam_search_shares_each_prompts_kept_set(family, method):
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    t = shared_tiny_vlm(family, small=True, num_layers=4)
    inputs = t.inputs(["What is shown?", "Describe the colours in this image, please."])
    params = {"budget": 8}
    if method == "fastervlm" and family not in ("llava", "llava_next"):
        params["cls_fallback"] = "text_similarity"
    gen = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        with tp.prune(t.model, method, **params) as greedy:
            t.model.generate(**inputs, **gen)
        with tp.prune(t.model, method, **params) as beams:
            out = t.model.generate(**inputs, num_beams=2, **gen)
        assert out.shape[0] == 2
        for one, two in zip(greedy.stages, beams.stages):
            assert len(two.kept) == 4  # each prompt's two beams
            for b in range(2):
                assert torch.equal(two.kept[2 * b], one.kept[b]) and torch.equal(two.kept[2 * b + 1], one.kept[b])
        # keep-all beam search is the unpruned beam search
        with tp.prune(t.model, method, **{**params, "budget": 100_000}):
            kept_all = t.model.generate(**inputs, num_beams=2, **gen)
        assert torch.equal(kept_all, t.model.generate(**inputs, num_beams=2, **gen))


@pytest.mark.parametrize("method", tp.list_methods())
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3",
                                    "smolvlm", "gemma3"])
def test_every_method_runs_with_its_defaults_on_every_family(family, method, recwarn):
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    # TOPS's Qwen2.5-VL schedule (layers 12 and 16 of 28) needs 8 layers to keep two distinct layers
    t = shared_tiny_vlm(family, small=True, num_layers=8 if family == "qwen2_5_vl" else 4)
    if family == "smolvlm":
        from tokenprune.adapters import get_model_adapter

        ad = get_model_adapter(t.model)
        if ad.merger_block() and ad.tokens_per_tile() % ad.merger_block():
            pytest.skip("this transformers' SmolVLM merges features in 16-token blocks; the tiny model cannot run")
    inputs = t.inputs()
    with torch.no_grad(), tp.prune(t.model, method) as report:
        out = t.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and report.pruned_calls == 1
    vision = [s.relevance for s in report.stages if s.relevance in ("cls_attention", "mean_attention",
                                                                       "text_similarity")]
    expect_cls = tp.create_method(method).stages[0].relevance == "cls_attention"
    if expect_cls and family in ("llava", "llava_next"):
        assert vision[0] == "cls_attention"
    elif expect_cls:  # the automatic fallback says which signal it used
        assert vision[0] == ("text_similarity" if family.startswith("qwen") else "mean_attention")
        assert any("no vision [CLS] token" in n for n in report.notes)


@pytest.mark.parametrize("method", ["fastervlm", "divprune"])
def test_generate_without_cache_keeps_the_same_tokens_for_image_only_methods(method):
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    t = shared_tiny_vlm("llava", small=True, num_layers=4)
    inputs = t.inputs(["What is shown?", "Describe the colours in this image, please."])
    with torch.no_grad():
        with tp.prune(t.model, method, budget=8) as cached:
            a = t.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with tp.prune(t.model, method, budget=8) as uncached:
            b = t.model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and uncached.pruned_calls == 3
    assert [k.tolist() for k in cached.stages[0].kept] == [k.tolist() for k in uncached.stages[0].kept]


@pytest.mark.parametrize("method", ["fastv", "tops", "cdpruner"])
def test_generate_without_cache_refuses_methods_that_read_the_text(method):
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    t = shared_tiny_vlm("llava", small=True, num_layers=4)
    with pytest.raises(tp.StageError, match="use_cache=False.*reads the text"), torch.no_grad():
        with tp.prune(t.model, method, budget=8):
            t.model.generate(**t.inputs(), max_new_tokens=3, do_sample=False, use_cache=False)
    with torch.no_grad(), tp.prune(t.model, method, budget=8):  # one forward without a cache is fine
        t.model(**t.inputs(), use_cache=False)


@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
def test_static_cache_is_refused_with_the_option_named(method):
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    t = shared_tiny_vlm("llava", small=True, num_layers=4)
    with pytest.raises(tp.StageError, match="static KV cache.*default dynamic cache"), torch.no_grad():
        with tp.prune(t.model, method, budget=8):
            t.model.generate(**t.inputs(), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_calling_the_base_model_directly_warns_once():
    from tokenprune.testing.tiny_models import shared_tiny_vlm

    t = shared_tiny_vlm("llava", small=True, num_layers=4)
    inputs = t.inputs()
    with torch.no_grad(), tp.prune(t.model, "divprune", budget=8) as report:
        with pytest.warns(UserWarning, match="only model\\(...\\) and model.generate\\(...\\) are pruned"):
            t.model.model(**inputs)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither a second direct call nor a pruned call warns again
            t.model.model(**inputs)
            t.model(**inputs)
    assert report.pruned_calls == 1


@pytest.mark.parametrize("method", tp.list_methods())
def test_any_budget_mask_dtype_and_batch_gives_valid_indices(method):
    """Property: for every registered method on plain tensors, random budgets, padding masks, dtypes
    (fp32, fp16, bf16) and batch layouts give unique, ascending, valid indices, as many as the budget
    allows (every stage of multi-stage methods is run on its own)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tokenprune.testing import strategies as tps

    m = tp.create_method(method)

    @given(data=st.data())
    def check(data):
        B = data.draw(st.integers(1, 3), label="batch")
        side = data.draw(st.integers(2, 5), label="grid side")
        N, D = side * side, data.draw(st.integers(3, 8), label="dim")
        dtype = data.draw(tps.dtypes(), label="dtype")
        feats = data.draw(tps.features((B, N, D), dtype=dtype), label="features")
        mask = data.draw(tps.masks(B, N), label="mask")
        budget = data.draw(tps.budgets(N), label="budget")
        g = torch.Generator().manual_seed(data.draw(tps.seeds(), label="seed"))
        signals = dict(relevance=torch.rand(B, N, generator=g), text_embeddings=torch.randn(B, 3, D, generator=g),
                       text_mask=torch.ones(B, 3, dtype=torch.bool), text_relevance=torch.rand(B, 3, generator=g),
                       grid=(side, side))
        if data.draw(st.booleans(), label="full grid"):  # pooling and windows read the grid of a full mask
            mask = torch.ones(B, N, dtype=torch.bool)
        for stage in range(len(m.stages)):
            sel = m.select(feats, budget=budget, mask=mask, stage=stage, **signals)
            _check(sel, mask, tp.Budget(budget), at_most=method == "pooling")

    check()
