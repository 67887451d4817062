"""Run a model unpruned and under every (method, budget), and score it.

The runner batches the questions, runs only the prefill when answers are one token (the answer is
the argmax of the last position's logits) and ``generate`` otherwise, and applies each method with
:func:`tokenprune.prune`, the same adapters a user gets. Per configuration it records accuracy,
per-family accuracy, evidence recall, tokens per stage, equivalent tokens and prefill latency.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from .. import registry
from ..budget import Budget, parse_budget
from ..errors import ConfigError
from ..methods.build import accepted_parameters, create_method
from ..methods.compose import PruningMethod
from ..runtime import PrefixCache, VisionCache, prune
from .data import load_image
from .distributed import SINGLE, Shard
from .models import build_prompt, image_grid, num_image_tokens, with_generation_positions
from .vqa import vqa_accuracy

# ``parse_budget`` lives in :mod:`tokenprune.budget`; it stays importable from here.
__all__ = ["DEFAULT_BUDGETS", "parse_budget", "budget_label", "Evaluator", "ConfigResult", "validate_method_names"]

#: Fractions of the image tokens kept at the TOPS paper's reductions (LLaVA-1.5: 128, 64 and 32 of
#: 576 tokens, i.e. 77.8%, 88.9% and 94.4% removed).
DEFAULT_BUDGETS = (128 / 576, 64 / 576, 32 / 576)

def budget_label(budget) -> str:
    """Short label: ``"64 tok"`` for counts, ``"-77.8%"`` (share of image tokens removed) for fractions."""
    if budget is None:
        return "100%"
    if isinstance(budget, float):
        return f"-{(1 - budget) * 100:.1f}%"
    return f"{budget} tok"


def validate_method_names(names) -> list:
    """Check that method names are registered; ``None`` or ``["all"]`` stands for every method.

    Nothing is built (see :func:`build_method`).

    Parameters
    ----------
    names : list of str or None
        Method names or aliases, as given on the command line.

    Returns
    -------
    list of str
        The names without repeats, in the order given; every registered method (sorted) for
        ``None`` or ``["all"]``.

    Raises
    ------
    UnknownNameError
        A name that is not registered (the message suggests close names).
    """
    if names is None or list(names) == ["all"]:
        return sorted(registry.methods.list())
    out = []
    for n in names:
        registry.methods.get(n)  # raises UnknownNameError
        if n not in out:
            out.append(n)
    return out


def build_method(name: str, budget, seed: int):
    """Build the registered method ``name`` at ``budget``, passing ``seed`` to methods that take one.

    Parameters
    ----------
    name : str
        A registered method name.
    budget : int or float
        Its budget.
    seed : int
        Passed as ``seed=`` when the method's factory names a ``seed`` parameter.

    Returns
    -------
    PruningMethod
        From :func:`tokenprune.methods.build.create_method`.
    """
    params = {"budget": budget}
    accepted = accepted_parameters(name)
    if accepted is not None and "seed" in accepted:
        params["seed"] = seed
    return create_method(name, **params)


@dataclass
class StageStats:
    """Tokens kept by one stage, averaged over the questions."""

    label: str
    layer: int | None
    tokens: float


@dataclass
class ConfigResult:
    """Everything measured for one configuration (one method at one budget, or unpruned)."""

    method: str
    budget: object
    n_image_tokens: int
    scores: np.ndarray
    predictions: list
    families: list
    prefill_ms: list
    stages: list = field(default_factory=list)
    equivalent_tokens: float | None = None
    recall_pre_llm: np.ndarray | None = None
    recall_first_stage: np.ndarray | None = None
    first_stage_label: str | None = None
    selection_ms: float | None = None
    wall_s: float | None = None

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.scores)) if len(self.scores) else float("nan")

    def family_accuracy(self, order=()) -> dict:
        """Accuracy per question family.

        Parameters
        ----------
        order : sequence of str
            Families listed first, in this order (e.g. the testbed's
            :data:`~tokenprune.testbed.scenes.QUESTION_FAMILIES`); the others follow alphabetically.

        Returns
        -------
        dict
            ``{family: mean score}`` over the questions that have a family, in that order.
        """
        order = {f: i for i, f in enumerate(order)}
        fams = sorted({f for f in self.families if f is not None}, key=lambda f: (order.get(f, len(order)), f))
        arr = np.asarray(self.families, dtype=object)
        return {f: float(np.mean(self.scores[arr == f])) for f in fams}

    @property
    def prefill_median_ms(self) -> float:
        return float(np.median(self.prefill_ms)) if self.prefill_ms else float("nan")

    @property
    def nominal_tokens(self) -> int:
        if self.budget is None:
            return self.n_image_tokens
        return Budget(self.budget).resolve(self.n_image_tokens)


@dataclass
class _Batch:
    """One batch of questions: the examples, their processor output (``None`` when not cached) and evidence."""
    examples: list
    inputs: dict
    evidence: list


def _nanmean(x):
    """Mean of the non-NaN values (``None`` when there are none, or for ``None``)."""
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


class Evaluator:
    """Evaluates one model on one set of questions, unpruned and under pruning methods.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A vision-language model with a tokenprune adapter, in eval mode.
    processor : transformers.ProcessorMixin
        Its processor.
    examples : list of VQAExample
        The questions.
    batch_size : int
        Questions per batch (default 100).
    max_new_tokens : int
        1 (default): the answer is the argmax of the prefill's last logits (one forward, no
        decoding). More: greedy ``generate`` with that many new tokens, and the prefill is timed
        with a separate forward.
    prompt : str, optional
        Prompt template with ``{question}`` (see :func:`build_prompt`).
    progress : bool
        Show a tqdm progress bar.
    vision_cache : bool or VisionCache
        Share the vision side across configurations (default ``True``: a
        :class:`~tokenprune.VisionCache` bounded by ``cache_bytes``): the vision tower, projector and
        vision signals run once per batch of images, and every configuration, the unpruned one
        included, reuses them. Results are identical to recomputing them. ``False`` recomputes them
        in every configuration; a :class:`~tokenprune.VisionCache` instance is used as given (and can
        be shared between evaluators of the same model).
    prefix_cache : bool or PrefixCache
        Share the unpruned first decoder layers across configurations (default ``True``: a
        :class:`~tokenprune.PrefixCache` bounded by ``cache_bytes``): methods whose first stage acts
        inside the LLM at layer ``k``, with no stage before it, compute layers ``0 .. k-1`` once per batch
        (FastV, ReverseFastV, WindowFastV and DART at layer 2 share theirs); in :meth:`run_all` the
        unpruned run records them. Results are identical to recomputing them; ``False`` recomputes them.
    cache_bytes : int
        Keep the processor's output for every batch when it fits in this many bytes (default 2 GiB;
        the testbed's 1,000 questions take about 0.6 GB); otherwise re-encode each batch when used.
    shard : Shard, optional
        This process's rank among data-parallel processes (see
        :func:`tokenprune.evaluation.distributed.shard_from_environment`): it evaluates the batches
        whose index is its rank modulo the world size, and :meth:`run` gathers every rank's batches
        and merges them in batch order, so every rank returns what one process would (latencies
        aside). Default: one process.

    Notes
    -----
    The processor runs once per batch and its output is reused by every configuration (see
    ``cache_bytes``), and so is the vision side (see ``vision_cache``). Latency is
    the wall time of the prefill forward (vision tower, selection and LLM prefill), divided by the
    batch size, median over batches, after one untimed warm-up forward per configuration. With the
    shared vision side and LLM prefix, the time the shared work took when it was computed is added to the
    prefill of every configuration that reused it, so the latency keeps its meaning (vision included).
    """

    def __init__(self, model, processor, examples, *, batch_size: int = 100, max_new_tokens: int = 1,
                 prompt: str | None = None, progress: bool = True, cache_bytes: int = 2 << 30,
                 vision_cache=True, prefix_cache=True, shard: Shard | None = None):
        if not examples:
            raise ValueError("no examples to evaluate")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.examples = list(examples)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.progress = progress
        self.cache_bytes = int(cache_bytes)
        self.grid = image_grid(model)
        self._batches = None
        self.n_image_tokens = None
        self._bar = None
        self._seed = 0
        self.vision_cache = self._cache_option("vision_cache", vision_cache, VisionCache)
        self.prefix_cache = self._cache_option("prefix_cache", prefix_cache, PrefixCache)
        self._prefix_depth = 0  # first layers the unpruned run records (set by run_all)
        if shard is not None and not isinstance(shard, Shard):
            raise ConfigError(f"shard must be a tokenprune.evaluation.distributed.Shard, got {type(shard).__name__}")
        self.shard = SINGLE if shard is None else shard

    def _cache_option(self, name: str, value, cls):
        """``True``: a new ``cls`` bounded by ``cache_bytes``; ``False``/``None``: none; an instance as given."""
        if value is True:
            return cls(max_bytes=self.cache_bytes)
        if value is False or value is None:
            return None
        if not isinstance(value, cls):
            raise ConfigError(f"{name} must be True, False or a {cls.__name__}, got {type(value).__name__}")
        return value

    # -- data -------------------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, exs) -> dict:
        """Processor output (CPU tensors) for some examples, left-padded."""
        tok = self.processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            images = [load_image(ex.image) for ex in exs]
            texts = [build_prompt(self.processor, ex.question, self.prompt) for ex in exs]
            return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))
        finally:
            tok.padding_side = old_side

    def inputs_of(self, batch) -> dict:
        """The model inputs of a batch, on the model's device (re-encoded when not cached)."""
        inputs = batch.inputs if batch.inputs is not None else self._encode(batch.examples)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    def prepare(self):
        """Split into batches and run the processor on this rank's batches; its output is cached when it
        fits in ``cache_bytes``. Returns every batch (other ranks' batches have no inputs)."""
        if self._batches is not None:
            return self._batches
        batches = []
        for start in range(0, len(self.examples), self.batch_size):
            exs = self.examples[start:start + self.batch_size]
            ev = [None if ex.evidence is None else np.asarray(ex.evidence, dtype=np.int64) for ex in exs]
            batches.append(_Batch(exs, None, ev))
        mine = [b for i, b in enumerate(batches) if self.shard.owns(i)]
        if mine:
            first = self._encode(mine[0].examples)
            per_batch = sum(v.numel() * v.element_size() for v in first.values() if hasattr(v, "numel"))
            mine[0].inputs = first
            if per_batch * len(mine) <= self.cache_bytes:
                for b in mine[1:]:
                    b.inputs = self._encode(b.examples)
        if self.shard.owns(0):
            self.n_image_tokens = num_image_tokens(batches[0].inputs if batches[0].inputs is not None
                                                   else self._encode(batches[0].examples), self.model)
        else:  # the first prompt's count, as one process reads it from the first batch
            self.n_image_tokens = num_image_tokens(self._encode(batches[0].examples[:1]), self.model)
        self._batches = batches
        return batches

    def my_batches(self) -> list:
        """``(index, batch)`` of the batches this rank evaluates."""
        return [(i, b) for i, b in enumerate(self.prepare()) if self.shard.owns(i)]

    # -- running ----------------------------------------------------------------------------------
    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _prefill(self, inputs):
        """The scoring forward: last-position logits, with the positions ``generate`` would use."""
        return self.model(**with_generation_positions(self.model, inputs), logits_to_keep=1)

    def _answer(self, inputs):
        """Decoded answers and the prefill wall time (s) of one batch.

        Work reused from the vision and prefix caches during the prefill counts with the time it took
        when it was computed, so the prefill time includes the vision side and every LLM layer in
        every configuration.
        """
        tok = self.processor.tokenizer
        saved0 = self._saved_ms()
        self._sync()
        t0 = time.perf_counter()
        out = self._prefill(inputs)
        self._sync()
        dt = time.perf_counter() - t0
        dt += (self._saved_ms() - saved0) / 1e3
        if self.max_new_tokens == 1:
            ids = out.logits[:, -1].argmax(-1)[:, None]
        else:
            gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      return_dict_in_generate=True, output_scores=True)
            ids = gen.sequences[:, gen.sequences.shape[1] - len(gen.scores):]
        return [s.strip() for s in tok.batch_decode(ids, skip_special_tokens=True)], dt

    def _saved_ms(self) -> float:
        """Compute time (ms) of the shared work handed out so far (vision side, LLM prefix layers)."""
        return sum(c.saved_ms for c in (self.vision_cache, self.prefix_cache) if c is not None)

    @contextlib.contextmanager
    def _pruned(self, method):
        """The seam where pruning plugs in: ``tokenprune.prune`` around the model calls (unpruned:
        only the vision cache, when there is one)."""
        if method is None:
            with contextlib.ExitStack() as stack:
                if self.vision_cache is not None:
                    stack.enter_context(self.vision_cache.attach(self.model))
                if self.prefix_cache is not None and self._prefix_depth:
                    stack.enter_context(self.prefix_cache.attach(self.model, self._prefix_depth))
                yield None
            return
        with prune(self.model, method, seed=self._seed, vision_cache=self.vision_cache,
                   prefix_cache=self.prefix_cache) as report:
            yield report

    def run(self, method=None, *, name: str = "none", budget=None, seed: int = 0) -> ConfigResult:
        """Evaluate one configuration.

        With a :class:`~tokenprune.evaluation.distributed.Shard` of several ranks, every rank must call
        it with the same arguments: each evaluates its batches, and the results of all batches are
        gathered and merged in batch order (every rank returns the merged result).

        Parameters
        ----------
        method : PruningMethod, callable or None
            ``None``: unpruned. A callable ``examples -> PruningMethod`` builds one method per batch
            (the testbed's evidence oracle, which needs each batch's evidence).
        name, budget
            Labels stored in the result.
        seed : int
            ``torch.manual_seed`` before the configuration runs.
        """
        import torch

        self.prepare()
        mine = self.my_batches()
        t_start = time.perf_counter()
        torch.manual_seed(seed)
        self._seed = seed
        per_batch = callable(method) and not isinstance(method, PruningMethod)
        parts = []
        with torch.no_grad():
            if mine:
                first = self.inputs_of(mine[0][1])
                warm = {k: (v[:2] if hasattr(v, "shape") and v.shape[:1] == first["input_ids"].shape[:1] else v)
                        for k, v in first.items()}
                with self._pruned(method(mine[0][1].examples[:2]) if per_batch else method):
                    self._prefill(warm)
            for index, b in mine:
                with self._pruned(method(b.examples) if per_batch else method) as report:
                    answers, dt = self._answer(self.inputs_of(b))
                info = summarize_report(report, len(b.examples), self.n_image_tokens, self.grid)
                parts.append({
                    "index": index, "n": len(b.examples), "ms_per_question": dt * 1000.0 / len(b.examples),
                    "predictions": answers,
                    "scores": [vqa_accuracy(a, ex.answers) for a, ex in zip(answers, b.examples)],
                    "families": [ex.family for ex in b.examples], "stages": info["stages"],
                    "equivalent_tokens": info["equivalent_tokens"],
                    "selection_ms": None if info["selection_ms"] is None else info["selection_ms"] / len(b.examples),
                    "recall_pre": _recall(b.evidence, info["kept_pre_llm"]),
                    "recall_first": _recall(b.evidence, info["kept_first"]), "first_label": info["first_label"]})
                if self._bar is not None:
                    self._bar.update(1)
        wall = time.perf_counter() - t_start
        gathered = self.shard.gather({"parts": parts, "wall_s": wall})
        parts = sorted((p for g in gathered for p in g["parts"]), key=lambda p: p["index"])
        return self._merge(parts, method, name, budget, max(g["wall_s"] for g in gathered))

    def _merge(self, parts, method, name, budget, wall_s) -> ConfigResult:
        """One :class:`ConfigResult` from the per-batch results, in batch order."""
        scores, preds, fams, times, recall_pre, recall_first, sel_ms = [], [], [], [], [], [], []
        first_label = None
        for p in parts:
            preds.extend(p["predictions"])
            scores.extend(p["scores"])
            fams.extend(p["families"])
            times.append(p["ms_per_question"])
            recall_pre.extend(p["recall_pre"])
            recall_first.extend(p["recall_first"])
            if p["selection_ms"] is not None:
                sel_ms.append(p["selection_ms"])
            first_label = p["first_label"]
        weights = [p["n"] for p in parts]
        stages = []
        if parts and parts[0]["stages"]:
            for i, (label, layer, _) in enumerate(parts[0]["stages"]):
                stages.append(StageStats(label, layer, float(np.average([p["stages"][i][2] for p in parts],
                                                                        weights=weights))))
        equiv = [p["equivalent_tokens"] for p in parts]
        eq = None if any(e is None for e in equiv) else float(np.average(equiv, weights=weights))
        return ConfigResult(
            method=name, budget=budget, n_image_tokens=self.n_image_tokens, scores=np.asarray(scores),
            predictions=preds, families=fams, prefill_ms=times, stages=stages,
            equivalent_tokens=eq if method is not None else float(self.n_image_tokens),
            recall_pre_llm=np.asarray(recall_pre, dtype=np.float64),
            recall_first_stage=np.asarray(recall_first, dtype=np.float64),
            first_stage_label=first_label,
            selection_ms=float(np.median(sel_ms)) if sel_ms else None,
            wall_s=wall_s,
        )

    def run_all(self, methods, budgets, *, seed: int = 0, baseline: bool = True, references=None) -> list:
        """Unpruned (if ``baseline``), every method at every budget, then the references.

        Parameters
        ----------
        methods : list of str
            Registered method names.
        budgets : list of int or float
            Budgets.
        seed : int
            Seed of every configuration.
        baseline : bool
            Run the unpruned model first (the reference for relative accuracy and speed-up).
        references : dict, optional
            ``{label: make(budget) -> (examples -> PruningMethod)}``: reference selections built per
            batch (the testbed's evidence oracle), run at every budget after the methods.

        Returns
        -------
        list of ConfigResult
        """
        from tqdm.auto import tqdm

        self.prepare()
        n_mine = len(self.my_batches())
        configs = ([(None, "none", None)] if baseline else []) + [
            (name, name, b) for name in methods for b in budgets] + [
            (make, label, b) for label, make in (references or {}).items() for b in budgets]
        if self.prefix_cache is not None and baseline:  # the unpruned run records what the methods share
            self._prefix_depth = max([self._shared_depth(build_method(name, b, seed)) for name, _, b in configs
                                      if isinstance(name, str)], default=0)
        results = []
        with tqdm(total=len(configs) * n_mine, desc="tokenprune eval", unit="batch",
                  disable=not self.progress or not self.shard.is_main, dynamic_ncols=True) as bar:
            self._bar = bar
            try:
                for name, label, b in configs:
                    bar.set_postfix_str(f"{label} {budget_label(b)}")
                    if name is None:
                        method = None
                    elif callable(name):
                        method = name(b)
                    else:
                        method = build_method(name, b, seed)
                    results.append(self.run(method, name=label, budget=b, seed=seed))
            finally:
                self._bar = None
                self._prefix_depth = 0
        return results

    def _shared_depth(self, method) -> int:
        """How many first decoder layers ``method`` runs on the unpruned prompt (0: none to share)."""
        plan = prune(self.model, method).plan  # planned only: nothing is attached
        return plan.first_llm_layer if plan.shares_llm_prefix else 0


def _recall(evidence, kept):
    """Per example: share of the evidence patches among the kept patches (NaN when undefined)."""
    out = []
    for i, ev in enumerate(evidence):
        if ev is None or len(ev) == 0:
            out.append(float("nan"))
        elif kept is None:
            out.append(float("nan"))
        else:
            k = kept[i]
            out.append(float(np.isin(ev, k).mean()))
    return out


def _patch_indices(stage, sample: int, grid) -> np.ndarray:
    """Raster indices (on the first image's base grid) of one sample's kept tokens in one stage."""
    coords = stage.coords[sample] if stage.coords else None
    if coords is None or grid is None or len(coords) == 0:
        return np.asarray(stage.kept[sample].cpu(), dtype=np.int64)
    c = np.asarray(coords.cpu(), dtype=np.int64).reshape(-1, 4)
    ok = (c[:, 0] == 0) & (c[:, 1] <= 0) & (c[:, 2] >= 0) & (c[:, 3] >= 0)
    return c[ok, 2] * grid[1] + c[ok, 3]


def summarize_report(report, batch_size, n_image_tokens, grid):
    """Normalise a :class:`~tokenprune.runtime.PruneReport` for the tables.

    Parameters
    ----------
    report : PruneReport or None
        The report of one pruned prefill (``None``: unpruned).
    batch_size : int
        Samples in that prefill.
    n_image_tokens : int
        Image tokens per sample before pruning.
    grid : (int, int) or None
        ``(rows, cols)`` of the patch grid, to turn the report's ``(row, col)`` coordinates into
        raster indices.

    Returns
    -------
    dict
        ``stages``: list of ``(label, layer, mean tokens kept)``; ``equivalent_tokens``;
        ``selection_ms`` (the whole batch); ``kept_per_stage``: per stage, per sample, int arrays of
        raster patch indices; ``kept_pre_llm`` (the before-LLM stage's, or ``None``); ``kept_first``
        and ``first_label`` (the first stage's).
    """
    if report is None or not getattr(report, "pruned_calls", 0) or not report.stages:
        all_kept = [np.arange(n_image_tokens)] * batch_size
        return dict(stages=[], equivalent_tokens=float(n_image_tokens), selection_ms=None,
                    kept_per_stage=[], kept_pre_llm=all_kept, kept_first=all_kept, first_label=None)
    stages, kept = [], []
    for st in report.stages:
        stages.append((st.where, st.layer, float(np.mean(st.tokens_after)) if st.tokens_after else float("nan")))
        kept.append([_patch_indices(st, i, grid) for i in range(len(st.kept))])
    pre = next((k for st, k in zip(report.stages, kept) if st.layer is None), None)
    return dict(stages=stages, equivalent_tokens=float(report.equivalent_tokens),
                selection_ms=float(report.select_ms), kept_per_stage=kept, kept_pre_llm=pre, kept_first=kept[0],
                first_label=report.stages[0].where)
