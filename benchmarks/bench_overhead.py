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
then ``--rounds`` rounds in round-robin order rotated by one each round, so machine-load drift hits
all configurations alike; medians of thread CPU time (``time.thread_time``, the latency on an idle
core with one thread) and of wall time. The keep-all overhead is ``median(keep-all) /
median(unpruned) - 1``, measured side by side in the same run.

Where the runtime's time goes: ``cProfile`` over ``--profile-runs`` keep-all prefills (a quarter of
them, at least 3, above batch 1),
the time spent inside ``tokenprune.runtime`` modules (own time, ``tottime``) per module, per
prefill, and the selection time the report gives (``select_ms``).

Models: ``testbed`` (the bundled checkpoint, 196 visual tokens) and ``llava-tiny`` (bench_e2e's
``tiny`` LLaVA-1.5-shaped random model, 64 visual tokens); ``llava-cpu`` (the 173 M-parameter
LLaVA-1.5 shape, 576 visual tokens) is available but slow on a 2-core CPU at batch 32.

Usage::

    python benchmarks/bench_overhead.py --json /tmp/overhead.json
    python benchmarks/bench_overhead.py --models testbed --batches 1,32 --rounds 7
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
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


def configurations(n_visual: int, budget: int) -> list:
    """``(label, method or None)`` in run order."""
    big = 10 * n_visual
    out = [("unpruned", None), ("keep-all before LLM", tp.create_method("random", budget=big)),
           ("keep-all in LLM", tp.create_method("fastv", budget=big))]
    for name in tp.list_methods():
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


def runtime_profile(model, inputs, method, runs: int) -> dict:
    """Own time (``tottime``) per ``tokenprune.runtime`` module, ms per prefill, over ``runs`` prefills."""
    prof = cProfile.Profile()
    with torch.no_grad(), tp.prune(model, method):
        prof.enable()
        for _ in range(runs):
            model(**inputs, logits_to_keep=1)
        prof.disable()
    per_module: dict = {}
    for (path, _, _), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        if "tokenprune" in path and "runtime" in path:
            name = Path(path).stem
            per_module[name] = per_module.get(name, 0.0) + tottime * 1e3 / runs
    return dict(sorted(per_module.items(), key=lambda kv: -kv[1]))


def run(model_name: str, batch: int, args) -> dict:
    """All configurations of one model at one batch size, interleaved; medians and ratios."""
    if model_name == "testbed":
        model, inputs, n_visual = testbed_inputs(batch)
    else:
        model, inputs, n_visual = llava_inputs("tiny" if model_name == "llava-tiny" else "cpu", batch)
    configs = configurations(n_visual, args.budget)
    samples = {label: [] for label, _ in configs}
    for label, method in configs:  # warm-up
        prefill(model, inputs, method)
    for r in range(args.rounds):
        k = r % len(configs)
        for label, method in configs[k:] + configs[:k]:
            samples[label].append(prefill(model, inputs, method))
    base = statistics.median(s[0] for s in samples["unpruned"])
    rows = []
    for label, _ in configs:
        cpu = statistics.median(s[0] for s in samples[label])
        rows.append({"config": label, "cpu_ms": round(cpu * 1e3, 2),
                     "wall_ms": round(statistics.median(s[1] for s in samples[label]) * 1e3, 2),
                     "select_ms": round(statistics.median(s[2] for s in samples[label]), 3),
                     "vs_unpruned": round(cpu / base, 4)})
    out = {"model": model_name, "batch": batch, "visual_tokens": n_visual, "rounds": args.rounds, "rows": rows}
    runs = args.profile_runs if batch == 1 else max(3, args.profile_runs // 4)
    out["runtime_ms_by_module"] = {
        label: {k: round(v, 3) for k, v in runtime_profile(model, inputs, method, runs).items()}
        for label, method in configs[1:3]}
    return out


def show(result: dict) -> str:
    """A plain-text table of one run."""
    lines = [f"{result['model']}, batch {result['batch']} ({result['visual_tokens']} visual tokens per sample, "
             f"{result['rounds']} rounds; thread CPU ms, median)",
             f"{'configuration':28s} {'cpu ms':>10s} {'wall ms':>10s} {'select ms':>10s} {'vs unpruned':>12s}"]
    for r in result["rows"]:
        lines.append(f"{r['config']:28s} {r['cpu_ms']:10.2f} {r['wall_ms']:10.2f} {r['select_ms']:10.3f} "
                     f"{r['vs_unpruned']:12.4f}")
    for label, mods in result.get("runtime_ms_by_module", {}).items():
        total = sum(mods.values())
        lines.append(f"  runtime own time, {label}: {total:.3f} ms per prefill: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in mods.items()))
    return "\n".join(lines)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="testbed,llava-tiny", help="testbed, llava-tiny, llava-cpu (comma-separated)")
    p.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    p.add_argument("--budget", type=int, default=22, help="budget of the registered methods (default 22)")
    p.add_argument("--rounds", type=int, default=5)
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
