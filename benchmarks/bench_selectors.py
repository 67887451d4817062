"""Time every registered selector next to the similarity GEMM, the floor for similarity-based selection.

For each grid point (N visual tokens, feature dim D, budget K) the script times, in one process:

* ``gemm``: the fp32 cosine-similarity GEMM ``Ĥ Ĥᵀ`` (normalise + ``bmm``), i.e. ``ctx.similarity``;
* each registered selector with a natural objective, twice: ``sel`` with the similarity already
  computed (the selector's own cost, including any fixed-point conversion it caches), and ``total``
  from raw features (normalise + GEMM + selector).

Medians of thread CPU time over repeats after a warm-up (CPU time, not wall time, so that other
jobs on a shared machine do not inflate the figures; with one torch thread all work runs on the
calling thread); ratios are to the GEMM median. Features are synthetic but
CLIP-like (blocky regions and small objects on the patch grid, a shared direction, noise; see
:func:`synthetic`), with positive relevance scores.

Usage::

    python benchmarks/bench_selectors.py --quick              # smoke run, ~1 minute
    python benchmarks/bench_selectors.py --json out.json      # full grid (N 576/2880, D 1024/4096, K 64/192)

``--threads`` (default 1) sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenprune as tp  # noqa: E402
from tokenprune.criteria import Coverage, Diversity, LogDet, Relevance, TOPSObjective  # noqa: E402

FULL = [(576, 1024, 64), (576, 1024, 192), (576, 4096, 64), (576, 4096, 192),
        (2880, 1024, 64), (2880, 1024, 192), (2880, 4096, 64), (2880, 4096, 192)]
QUICK = [(576, 1024, 64), (1152, 1024, 128)]
GRIDS = {576: (24, 24), 1152: (24, 48), 2880: (48, 60)}

#: (label, selector name, selector params, objective factory or None). Extra variants of greedy are
#: listed explicitly; any other registered selector is added with a guessed objective.
CASES = [
    ("greedy(coverage)", "greedy", {}, Coverage),
    ("greedy-lazy(coverage)", "greedy", {"lazy": True}, Coverage),
    ("greedy-stochastic0.01(coverage)", "greedy", {"stochastic": 0.01}, Coverage),
    ("facility_location_greedy", "facility_location_greedy", {}, Coverage),
    ("greedy(tops_objective)", "greedy", {}, TOPSObjective),
    ("greedy(tops_objective,direct)", "greedy", {}, lambda: TOPSObjective(incremental=False)),
    ("dpp_map(log_det,q=relevance)", "dpp_map", {}, lambda: LogDet(quality="given")),
    ("greedy(log_det,q=relevance)", "greedy", {}, lambda: LogDet(quality="given")),
    ("max_min", "max_min", {}, None),
    ("greedy-lazy(diversity)", "greedy", {"lazy": True}, Diversity),
    ("topk(relevance)", "topk", {}, Relevance),
    ("random", "random", {}, None),
    ("pooling", "pooling", {}, None),
    ("window_topk(relevance)", "window_topk", {}, Relevance),
]
#: cases too slow to repeat at the largest sizes: (label, N) -> repeats
SLOW = {"greedy(coverage)": 2880, "greedy(tops_objective,direct)": 2880}


def synthetic(n: int, d: int, grid, seed: int = 0):
    """CLIP-like features on a ``grid``: blocky regions (12 kinds, 4x4-token blocks), 25% of tokens
    from 32 small-object kinds, a shared direction and noise. Pairwise cosine similarity quantiles
    (5/50/95%) are about 0.17 / 0.22 / 0.63. Relevance: ``U(0, 1)³`` (few high-scoring tokens)."""
    g = torch.Generator().manual_seed(seed)
    R, C = grid
    lab = torch.randint(0, 12, (-(-R // 4), -(-C // 4)), generator=g)
    lab = lab.repeat_interleave(4, 0).repeat_interleave(4, 1)[:R, :C].reshape(-1)
    obj = torch.randint(12, 44, (n,), generator=g)
    z = torch.where(torch.rand(n, generator=g) < 0.25, obj, lab)
    shared = torch.randn(d, generator=g)
    centers = torch.randn(44, d, generator=g)
    x = 0.7 * shared + centers[z] + 0.9 * torch.randn(n, d, generator=g)
    rel = torch.rand(n, generator=g) ** 3
    return x.unsqueeze(0), rel.unsqueeze(0)


def timeit(fn, repeats: int, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median CPU time of ``fn`` in ms (thread CPU time: robust to other jobs on a shared machine;
    with one torch thread all work runs on the calling thread)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times) * 1e3


def gemm(x):
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    return torch.bmm(u, u.transpose(1, 2))


def cases():
    listed = {name for _, name, _, _ in CASES}
    out = list(CASES)
    for name in tp.list_selectors():
        if name not in listed:
            out.append((name, name, {}, "guess"))
    return out


def run_case(sel, obj_factory, base_ctx, k, sim):
    """Two closures: the selector on a fresh context whose similarity is already computed, and on a
    fresh context that computes it (normalise + GEMM). ``make_context``'s validation is timed apart."""

    def make(with_sim: bool):
        ctx = dataclasses.replace(base_ctx)  # same inputs, empty caches
        if with_sim:
            ctx.__dict__["similarity"] = sim  # reuse the GEMM result: time the selector alone
        return ctx

    if obj_factory == "guess":  # another team's selector: try without an objective, then with relevance
        for guess in (None, Relevance, Coverage):
            try:
                sel.select(None if guess is None else guess(), make(True), k)
                obj_factory = guess
                break
            except Exception:  # noqa: BLE001 - we are only probing what it accepts
                continue
        else:
            return None
    obj = None if obj_factory is None else obj_factory()
    return (lambda: sel.select(obj, make(True), k)), (lambda: sel.select(obj, make(False), k))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid for a smoke run")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", default=None, help="substring filter on case labels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:  # NumPy's BLAS (used by the single-sample DPP loop) gets the same thread count
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:  # pragma: no cover
        pass
    grid_points = QUICK if args.quick else FULL
    results = []
    print(f"# tokenprune {tp.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, B=1, fp32, median thread-CPU time of up to {args.repeats} after warm-up")
    for n, d, k in grid_points:
        grid = GRIDS[n]
        x, rel = synthetic(n, d, grid)
        t_gemm = timeit(lambda: gemm(x), args.repeats)
        sim = gemm(x)
        t_ctx = timeit(lambda: tp.make_context(x, relevance=rel, grid=grid), args.repeats)
        base_ctx = tp.make_context(x, relevance=rel, grid=grid)
        print(f"\n## N={n} D={d} K={k}   gemm {t_gemm:9.2f} ms   (make_context validation {t_ctx:.2f} ms, "
              "not included below)")
        print(f"{'selector':36s} {'sel ms':>9s} {'total ms':>9s} {'sel/gemm':>9s} {'total/gemm':>10s}")
        results.append({"N": n, "D": d, "K": k, "case": "gemm", "sel_ms": t_gemm, "total_ms": t_gemm})
        results.append({"N": n, "D": d, "K": k, "case": "make_context", "sel_ms": t_ctx, "total_ms": t_ctx})
        with torch.no_grad():
            for label, name, params, obj_factory in cases():
                if args.only and args.only not in label:
                    continue
                reps = 1 if SLOW.get(label, 10 ** 9) <= n else args.repeats
                try:
                    sel = tp.get_selector(name)(**params)
                    fns = run_case(sel, obj_factory, base_ctx, k, sim)
                    if fns is None:
                        print(f"{label:36s} (skipped: no objective it accepts)")
                        continue
                    t_sel = timeit(fns[0], reps, warmup=1 if reps > 1 else 0)
                    t_tot = timeit(fns[1], reps, warmup=0) if reps > 1 else t_sel + t_gemm
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{label:36s} (error: {type(exc).__name__}: {exc})")
                    continue
                print(f"{label:36s} {t_sel:9.2f} {t_tot:9.2f} {t_sel / t_gemm:9.3f} {t_tot / t_gemm:10.3f}"
                      + ("   (1 run)" if reps == 1 else ""))
                results.append({"N": n, "D": d, "K": k, "case": label, "sel_ms": t_sel, "total_ms": t_tot,
                                "repeats": reps})
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
