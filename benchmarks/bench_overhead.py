"""What the pruning runtime itself costs: keep-all pruning and every method against the unpruned model.

For each model and batch size, one interleaved run times the prefill (``model(**inputs,
logits_to_keep=1)``, vision tower included) of:

* ``unpruned``: the model alone;
* ``keep-all before LLM``: ``random`` with a budget above the visual-token count (the runtime finds the
  visual tokens, maps the layout, runs the selection and keeps everything: the prompt is unchanged);
* ``keep-all in LLM``: ``fastv`` with such a budget (text-attention capture at layer 1, the in-LLM
  gathers at every later layer, nothing dropped);
* every registered method at ``--budget`` (default 22 of the testbed's 196 tokens).

Method: ``torch.set_num_threads(--threads)`` (default 1), one warm-up pass over all configurations,
then two timed blocks, each in round-robin order rotated by one each round, so machine-load drift
hits all configurations alike: the unpruned model and the two keep-all configurations
(``--overhead-rounds`` rounds), then the unpruned model and every method (``--rounds``); at batch 1,
where a millisecond is a few percent, ``--rounds-batch1`` rounds each. The keep-all block is timed
apart because a prefill's time depends on the configuration before it (after a pruned prefill the
allocator has returned the larger activations' memory, and the next full-size prefill pays page
faults for it: 10-20% at batch 32 on this VM); in their own block every configuration follows one
with the activations of the whole prompt. Medians of thread CPU time (``time.thread_time``, the
latency on an idle core with one thread) and of wall time; each method's ratio is to the unpruned
model of its own block. The keep-all overhead is ``median(keep-all) - median(unpruned)``, in milliseconds
and relative, measured side by side in the same run; less the selection time the report gives
(``select_ms``: building the selector's context and selecting, the method's own work) it is the
runtime's overhead outside selection.

Where the runtime's time goes (:class:`PhaseTimer`): ``--profile-runs`` keep-all prefills (a quarter
of them, at least 3, above batch 1) with the runtime's functions timed by phase (visual tokens and
layout, signal capture, input rewrite, stage bookkeeping, selection, layer gathers, report),
exclusive wall time per prefill, each phase's median over the profiled prefills (totals add the
medians), the model's own work left out.

Models: ``testbed`` (the bundled checkpoint, 196 visual tokens) and ``llava-tiny`` (bench_e2e's
``tiny`` LLaVA-1.5-shaped random model, 64 visual tokens); ``llava-cpu`` (the 173 M-parameter
LLaVA-1.5 shape, 576 visual tokens) is available but slow on a 2-core CPU at batch 32.

Usage::

    python benchmarks/bench_overhead.py --json /tmp/overhead.json
    python benchmarks/bench_overhead.py --models testbed --batches 1,32 --rounds 7
    python benchmarks/bench_overhead.py --models llava-cpu --batches 1 --methods none --rounds-batch1 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenprune as tp  # noqa: E402


def testbed_inputs(batch: int):
    """The testbed model and ``batch`` held-out questions through its processor (left padding)."""
    from tokenprune.evaluation.runner import Evaluator
    from tokenprune.testbed.evaluate import held_out_examples, load_testbed

    model, processor = load_testbed()
    ev = Evaluator(model, processor, held_out_examples(limit=batch), batch_size=batch, progress=False,
                   vision_cache=False)
    batch_inputs = ev.inputs_of(ev.prepare()[0])
    from tokenprune.evaluation.models import with_generation_positions

    return model.eval(), with_generation_positions(model, batch_inputs), ev.n_image_tokens


def llava_inputs(shape: str, batch: int):
    """bench_e2e's LLaVA-1.5-shaped random model, its photo prompt repeated ``batch`` times."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import build

    b = build(shape, "cpu", torch.float32)
    inputs = {k: v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in b.inputs.items()}
    return b.model, inputs, b.visual_tokens


def configurations(n_visual: int, budget: int, methods=None) -> list:
    """``(label, method or None)`` in run order; ``methods``: the registered methods timed at ``budget``
    (default all)."""
    big = 10 * n_visual
    out = [("unpruned", None), ("keep-all before LLM", tp.create_method("random", budget=big)),
           ("keep-all in LLM", tp.create_method("fastv", budget=big))]
    for name in tp.list_methods() if methods is None else methods:
        out.append((f"{name}@{budget}", tp.create_method(name, budget=budget)))
    return out


def prefill(model, inputs, method):
    """One timed prefill: ``(thread s, wall s, select ms)``."""
    with torch.no_grad():
        if method is None:
            t0, w0 = time.thread_time(), time.perf_counter()
            model(**inputs, logits_to_keep=1)
            return time.thread_time() - t0, time.perf_counter() - w0, 0.0
        with tp.prune(model, method) as report:
            t0, w0 = time.thread_time(), time.perf_counter()
            model(**inputs, logits_to_keep=1)
            return time.thread_time() - t0, time.perf_counter() - w0, report.select_ms


PER_PREFILL = ("visual tokens and layout", "vision record", "report")
SELECTION = "selection (context and selector)"

#: ``(module, class or None, attribute, phase)``: the runtime functions the phase profile times. A
#: function's time, less the time of the timed functions and model modules it calls, goes to its phase.
#: :data:`PER_PREFILL` phases are paid once per prefill, the others once per stage.
PHASES = [
    ("tokenprune.runtime.session", "PruneSession", "_outer_pre", "visual tokens and layout"),
    ("tokenprune.runtime.prefill", "PrefillRewriter", "__call__", "visual tokens and layout"),
    ("tokenprune.runtime.prefill", "PrefillRewriter", "_apply_pre_stage", "input rewrite"),
    ("tokenprune.runtime.prefill", "PrefillRewriter", "_apply_vision_stage", "input rewrite"),
    ("tokenprune.runtime.prefill", "PrefillRewriter", "_rewrite", "input rewrite"),
    ("tokenprune.runtime.signals", "SignalCapture", "on_image_features", "vision record"),
    ("tokenprune.runtime.signals", "SignalCapture", "capture_cls", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "capture_mean", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "capture_keys", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "capture_text", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "capture_own_attention", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "before_llm", "signal capture"),
    ("tokenprune.runtime.signals", "SignalCapture", "in_llm", "signal capture"),
    ("tokenprune.runtime.stage_select", "StageSelection", "__call__", "stage bookkeeping"),
    ("tokenprune.runtime.vision_stage", "VisionSiteSelection", "__call__", "stage bookkeeping"),
    ("tokenprune.runtime.stage_select", None, "make_context", SELECTION),
    ("tokenprune.selectors.base", "Selector", "select", SELECTION),
    ("tokenprune.runtime.layers", "LayerSurgery", "prefill", "layer gathers"),
    ("tokenprune.runtime.layers", "LayerSurgery", "_apply_stage", "layer gathers"),
    ("tokenprune.runtime.session", "PruneSession", "_outer_post", "report"),
]


class PhaseTimer:
    """Exclusive wall time per phase of the runtime's functions (see :data:`PHASES`).

    Each timed function pushes its phase; time is charged to the phase on top of the stack, so a
    phase's time excludes the timed functions it calls. The model's own work met inside (the base
    model's ``get_image_features``, which the prefill hook runs) pushes ``"model"``, which is left
    out. Enter it before :func:`tokenprune.prune`, whose hooks then call the timed functions.
    Wrapping costs about a microsecond per call.
    """

    def __init__(self, model):
        self.totals: dict = {}
        self._stack: list = []
        self._last = 0.0
        self._restore: list = []
        self._model = model

    def _switch(self, phase):
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            self.totals[top] = self.totals.get(top, 0.0) + now - self._last
        self._last = now
        if phase is None:
            self._stack.pop()
        else:
            self._stack.append(phase)

    def _wrap(self, fn, phase):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._switch(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self._switch(None)
        return timed

    def __enter__(self):
        import importlib

        for module, cls, attr, phase in PHASES:
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            fn = owner.__dict__[attr] if cls else getattr(owner, attr)
            self._restore.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(fn, phase))
        from tokenprune.adapters import get_model_adapter

        base = type(get_model_adapter(self._model).base)  # its get_image_features is the model's own work
        self._restore.append((base, "get_image_features", base.__dict__["get_image_features"]))
        base.get_image_features = self._wrap(base.__dict__["get_image_features"], "model")
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._restore):
            setattr(owner, attr, fn)


def runtime_profile(model, inputs, method, runs: int) -> dict:
    """Exclusive wall time per runtime phase, ms per prefill: each phase's median over ``runs`` prefills
    (after one untimed prefill), so that one page-faulting call does not move it; the model's own work
    (``"model"``) is left out."""
    per_run = []
    with PhaseTimer(model) as timer, torch.no_grad(), tp.prune(model, method):
        model(**inputs, logits_to_keep=1)
        for _ in range(runs):
            timer.totals.clear()
            model(**inputs, logits_to_keep=1)
            per_run.append(dict(timer.totals))
    phases = {k for run in per_run for k in run} - {"model"}
    medians = {k: statistics.median(run.get(k, 0.0) for run in per_run) * 1e3 for k in phases}
    return dict(sorted(medians.items(), key=lambda kv: -kv[1]))


def phase_split(phases: dict) -> dict:
    """Totals of a phase profile (ms per prefill): all, once per prefill, the stage outside selection,
    selection."""
    per_prefill = sum(v for k, v in phases.items() if k in PER_PREFILL)
    selection = phases.get(SELECTION, 0.0)
    total = sum(phases.values())
    return {"total": total, "per_prefill": per_prefill, "per_stage": total - per_prefill - selection,
            "selection": selection}


def timed(model, inputs, configs: list, rounds: int) -> dict:
    """``{label: [(thread s, wall s, select ms), ...]}`` over ``rounds`` rounds, the order rotated by one
    each round."""
    samples = {label: [] for label, _ in configs}
    for r in range(rounds):
        k = r % len(configs)
        for label, method in configs[k:] + configs[:k]:
            samples[label].append(prefill(model, inputs, method))
    return samples


def summarise(samples: dict) -> list:
    """One row per configuration: medians, the ratio to ``unpruned`` (the first), and for keep-all
    configurations the overhead in ms, in all and outside selection."""
    base = statistics.median(s[0] for s in samples["unpruned"])
    rows = []
    for label, runs in samples.items():
        cpu = statistics.median(s[0] for s in runs)
        select = statistics.median(s[2] for s in runs)
        wall = statistics.median(s[1] for s in runs)
        row = {"config": label, "cpu_ms": round(cpu * 1e3, 2), "wall_ms": round(wall * 1e3, 2),
               "select_ms": round(select, 3), "vs_unpruned": round(cpu / base, 4)}
        if label.startswith("keep-all"):
            row["overhead_ms"] = round((cpu - base) * 1e3, 3)
            row["overhead_outside_selection_ms"] = round((cpu - base) * 1e3 - select, 3)
        rows.append(row)
    return rows


def run(model_name: str, batch: int, args) -> dict:
    """All configurations of one model at one batch size, interleaved; medians and ratios."""
    if model_name == "testbed":
        model, inputs, n_visual = testbed_inputs(batch)
    else:
        model, inputs, n_visual = llava_inputs("tiny" if model_name == "llava-tiny" else "cpu", batch)
    names = None if args.methods == "all" else [m for m in args.methods.split(",") if m and m != "none"]
    configs = configurations(n_visual, args.budget, names)
    for label, method in configs:  # warm-up
        prefill(model, inputs, method)
    rounds = args.rounds_batch1 if batch == 1 else args.rounds
    overhead_rounds = args.rounds_batch1 if batch == 1 else args.overhead_rounds
    # two blocks, each interleaved: the keep-all configurations against the unpruned model (all with the
    # activations of the whole prompt, so none inherits another's allocator state), then the methods
    rows = summarise(timed(model, inputs, configs[:3], overhead_rounds))
    if len(configs) > 3:
        rows += summarise(timed(model, inputs, configs[:1] + configs[3:], rounds))[1:]
    out = {"model": model_name, "batch": batch, "visual_tokens": n_visual, "rounds": rounds,
           "overhead_rounds": overhead_rounds, "rows": rows}
    runs = args.profile_runs if batch == 1 else max(3, args.profile_runs // 4)
    out["runtime_ms_by_phase"] = {
        label: {k: round(v, 3) for k, v in runtime_profile(model, inputs, method, runs).items()}
        for label, method in configs[1:3]}
    out["runtime_split"] = {label: {k: round(v, 3) for k, v in phase_split(phases).items()}
                            for label, phases in out["runtime_ms_by_phase"].items()}
    return out


def show(result: dict) -> str:
    """A plain-text table of one run."""
    lines = [f"{result['model']}, batch {result['batch']} ({result['visual_tokens']} visual tokens per sample, "
             f"{result['rounds']} rounds; thread CPU ms, median)",
             f"{'configuration':28s} {'cpu ms':>10s} {'wall ms':>10s} {'select ms':>10s} {'vs unpruned':>12s}"]
    for r in result["rows"]:
        lines.append(f"{r['config']:28s} {r['cpu_ms']:10.2f} {r['wall_ms']:10.2f} {r['select_ms']:10.3f} "
                     f"{r['vs_unpruned']:12.4f}")
    for r in result["rows"]:
        if "overhead_ms" in r:
            lines.append(f"  {r['config']}: {r['overhead_ms']:+.3f} ms against unpruned, "
                         f"{r['overhead_outside_selection_ms']:+.3f} ms outside selection")
    for label, phases in result.get("runtime_ms_by_phase", {}).items():
        split = phase_split(phases)
        lines.append(f"  runtime phases, {label}: {split['total']:.3f} ms per prefill; once per prefill "
                     f"{split['per_prefill']:.3f}, the stage outside selection {split['per_stage']:.3f}, selection "
                     f"{split['selection']:.3f}: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    return "\n".join(lines)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="testbed,llava-tiny", help="testbed, llava-tiny, llava-cpu (comma-separated)")
    p.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    p.add_argument("--budget", type=int, default=22, help="budget of the registered methods (default 22)")
    p.add_argument("--methods", default="all", help="registered methods timed at --budget, comma-separated "
                   "(default all; 'none' times only the keep-all configurations)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the methods above batch 1 (default 5)")
    p.add_argument("--overhead-rounds", type=int, default=25, help="timed rounds of the keep-all configurations "
                   "against the unpruned model above batch 1 (default 25: 9 left +-4%% between runs at batch 32)")
    p.add_argument("--rounds-batch1", type=int, default=40, help="timed rounds at batch 1 (default 40)")
    p.add_argument("--profile-runs", type=int, default=20, help="keep-all prefills profiled at batch 1 "
                   "(a quarter above batch 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    results = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            res = run(name, batch, args)
            print(show(res), "\n", flush=True)
            results.append(res)
    if args.json:
        meta = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": args.threads,
                "torch": torch.__version__, "tokenprune": tp.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
