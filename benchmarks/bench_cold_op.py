"""How much a small tensor operation costs right after a large matrix product, on this CPU.

The pruning runtime runs a few small operations between the model's layers (the prefill hook, the
attention capture at layer ``k - 1``, the stage's layer). This measures the floor such an entry
pays: a one-op and a three-op line timed hot (after themselves) and cold (right after a
``[1024, 1024] @ [1024, 4096]`` product), and ten different small operations in a row, each timed,
after the product and hot (how far into an entry the cost lasts); one thread, medians of ``--repeats``.

Usage::

    python benchmarks/bench_cold_op.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)
    x, mask = torch.zeros(1), torch.ones(1, 620, dtype=torch.bool)
    lines = {"one op (x.add_(1))": lambda: x.add_(1),
             "three ops (arange, expand, masked_fill)":
                 lambda: torch.arange(620)[None].expand(1, -1).masked_fill(~mask, -1)}
    out = {}
    for name, line in lines.items():
        for _ in range(5):
            line()
        cold, hot = [], []
        for _ in range(args.repeats):
            a @ b
            t = time.perf_counter()
            line()
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            line()
            hot.append(time.perf_counter() - t)
        out[name] = {"cold_us": statistics.median(cold) * 1e6, "hot_us": statistics.median(hot) * 1e6}
        print(f"{name:42s} cold {out[name]['cold_us']:7.1f} us   hot {out[name]['hot_us']:6.1f} us")
    pos = torch.arange(30, 606)[None]
    sequence = [lambda: torch.arange(620)[None], lambda: mask.sum(1), lambda: pos.clamp_min(0),
                lambda: pos[:, :1], lambda: (pos - 3) == 4, lambda: mask & mask, lambda: mask.any(),
                lambda: pos.amax(1), lambda: pos + 1, lambda: mask.float()]
    for after_product in (True, False):
        times = [[] for _ in sequence]
        for _ in range(args.repeats):
            if after_product:
                a @ b
            for i, op in enumerate(sequence):
                t = time.perf_counter()
                op()
                times[i].append(time.perf_counter() - t)
        key = "sequence_after_product_us" if after_product else "sequence_hot_us"
        out[key] = [statistics.median(t) * 1e6 for t in times]
        print(f"ten ops in a row, {'after the product' if after_product else 'hot':17s}: "
              + " ".join(f"{v:.1f}" for v in out[key]) + " us")
    return out


if __name__ == "__main__":
    main()
