"""End-to-end latency of visual-token pruning on a LLaVA-shaped model: prefill, decode, KV cache.

Every registered method (``tokenprune.list_methods()``) runs through ``tokenprune.prune`` on a
``LlavaForConditionalGeneration`` built from configs with random weights (latency does not depend on
weight values), next to the unpruned model measured side by side in the same process. The input is a
real photo (``sklearn.datasets.load_sample_images()``, ``china.jpg``) through a stock ``LlavaProcessor``
and a short question.

What is measured, per configuration (medians over rounds):

* **prefill**: ``model(**inputs, logits_to_keep=1)`` on the prompt, with the cache built: the vision
  tower, the selection (all stages) and the LLM. The processor runs once, outside the timing.
* **decode per token**: ``generate(N new tokens)`` (``min_new_tokens = max_new_tokens = N``, greedy)
  minus its own prefill, divided by the ``N - 1`` decoding steps. The prefill is cut off inside the
  same ``generate`` call (a forward hook marks the end of its first forward), since subtracting a
  separately timed prefill adds that call's noise (about +-5% of a 2 s prefill on a shared CPU, which
  is +-15 ms per token over 7 steps) to a 40-50 ms step. Includes ``generate``'s own per-step work
  and the pruning hooks' decode-time mapping of masks and positions.
* **KV cache**: bytes of the key and value tensors of the prefill's cache (all layers; in-LLM stages
  leave fewer entries in later layers). On CUDA also ``torch.cuda.max_memory_allocated`` of the
  prefill.
* From ``PruneReport``: nominal budget, equivalent tokens ``Σ_l n_l / L`` (visual tokens entering each
  decoder layer, averaged over layers), tokens per stage, selection time ``select_ms``.

Ideal speed-ups (what the token counts alone imply), with ``T`` text tokens, ``N`` visual tokens and
``E`` equivalent visual tokens:

* ``ideal LLM = (T + N) / (T + E)``: the LLM's prefill cost taken as linear in the tokens of each
  layer (projections and MLP dominate at these lengths; the quadratic attention term, which would
  favour pruning a little more, and the lm_head of one position are ignored);
* ``ideal e2e = t0 / (t_vis + (t0 - t_vis) / ideal_LLM)``: the same with the vision tower (measured
  here, ``vision tower only`` row) as a fixed cost and selection taken as free. The measured
  speed-up falls short of this by the selection time, the relevance signals' cost and overheads.

Method: ``torch.set_num_threads(1)`` by default (timings on a shared machine are erratic with more);
one warm-up pass over all configurations, then ``--rounds`` rounds, each running every configuration
once in round-robin order (rotated by one each round), so slow drifts in machine load hit all
configurations alike and ratios to the unpruned baseline stay meaningful.

Clock (``--clock``): on CPU the default is thread CPU time (``time.thread_time``): with one torch
thread all the work runs on the calling thread, so this is the latency the work would have on an idle
core, while wall time on a shared machine is mostly waiting for a core. ``PruneReport.select_ms`` is
put on the same clock for the run (see :func:`_selection_clock`). Wall-clock medians and speed-ups are
recorded too. On CUDA the clock is wall time with ``torch.cuda.synchronize()``.

Checks printed as PASS/FAIL (issue 5): TOPS's selection time is under 10% of the prefill time it saves
(per budget, for the registered TOPS and for the pre-LLM-only ``schedule="single"``), and pre-LLM
TOPS reaches at least 0.9x random selection's prefill speed-up at the same budget.

Usage::

    python benchmarks/bench_e2e.py --quick --json /tmp/q.json            # smoke run, seconds
    python benchmarks/bench_e2e.py --json benchmarks/results_e2e.json --plot benchmarks/e2e_speedup.png
    python benchmarks/bench_e2e.py --device cuda --shape llava-1.5-7b    # bf16, real 7B shapes
    python benchmarks/bench_e2e.py --device cuda --shape llava-next-7b   # 2880 visual tokens (+48 newlines)

Shapes (all random weights, built from configs):

* ``cpu`` (default on CPU): LLaVA-1.5 scaled to a 2-core CPU: CLIP 336/14 (576 patches + [CLS]),
  hidden 256, 4 layers; Llama hidden 1024, 8 layers, 16 heads, MLP 2816, vocab 32000; ~173 M params.
* ``tiny`` (``--quick``): the same classes at 112 px (64 visual tokens), CLIP hidden 64 / 2 layers,
  text hidden 64 / 4 layers, vocab 512; default budget 16. Only checks that everything runs.
* ``tiny-next``: the ``llava-next-7b`` code path at the ``tiny`` sizes (112 px crops, 320 visual
  tokens + 16 newlines, default budget 64), to check that path on a CPU.
* ``llava-1.5-7b``: CLIP ViT-L/14-336 (1024, 24 layers) and Llama-2-7B-shaped Vicuna (4096, 32 layers,
  MLP 11008, vocab 32064), 576 visual tokens.
* ``llava-next-7b``: the same towers, anyres pinpoints of LLaVA-v1.6; the photo is resized to
  672 x 672 so the prompt holds the paper's maximum of 2880 visual tokens (4 crops + base image) plus
  48 ``image_newline`` tokens (kept and counted, ``newlines="keep"``). Default budgets 640/320/160.

The 7B shapes need a GPU (about 15 GB in bf16); on CPU they are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenprune as tp  # noqa: E402
from tokenprune.runtime import stage_select as _selection_timer  # noqa: E402
from tokenprune.testing.tiny_models import make_tokenizer, sample_images  # noqa: E402

QUESTION = "What is shown in this image? Answer in one short sentence."
TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
#: budgets (visual tokens kept of 576) of the TOPS paper: 77.8 / 88.9 / 94.4 % removed
BUDGETS = {"cpu": (128, 64, 32), "tiny": (16,), "tiny-next": (64,), "llava-1.5-7b": (128, 64, 32),
           "llava-next-7b": (640, 320, 160)}
SHAPES = tuple(BUDGETS)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """A model, its prompt inputs and what describes them."""

    shape: str
    model: object
    inputs: dict
    params: int
    prompt_tokens: int
    visual_tokens: int
    image_size: tuple
    family: str


def _clip(hidden, inter, layers, heads, size=336):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=size, patch_size=14, projection_dim=768,
                            hidden_act="quick_gelu")


def _llama(hidden, inter, layers, heads, vocab):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=3, bos_token_id=1,
                       eos_token_id=2)


def build(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> Bench:
    """Build the random-weight model of ``shape`` and its prompt inputs on ``device``.

    Raises
    ------
    SystemExit
        A 7B shape requested on CPU.
    """
    import transformers
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)

    if shape.endswith("7b") and device == "cpu":
        raise SystemExit(f"--shape {shape} is a 7B model: run it with --device cuda")
    torch.manual_seed(seed)
    tok = make_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    photo = sample_images()[0]  # china.jpg, 640 x 427
    if shape in ("tiny", "tiny-next"):
        vision, text = _clip(64, 128, 2, 4, size=112), _llama(64, 128, 4, 4, 512)
    elif shape == "cpu":
        vision, text = _clip(256, 1024, 4, 4), _llama(1024, 2816, 8, 16, 32000)
    else:
        vision, text = _clip(1024, 4096, 24, 16), _llama(4096, 11008, 32, 32, 32064)
    size = vision.image_size
    common = dict(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    next_ = shape in ("llava-next-7b", "tiny-next")
    ip_name = "LlavaNextImageProcessor" if next_ else "CLIPImageProcessor"
    ip_cls = getattr(transformers, ip_name + "Pil", None) or getattr(transformers, ip_name)
    if next_:  # LLaVA-v1.6 pinpoints; a square 2x2-crop image gives the maximum token count
        pin = [[size * a, size * c] for a, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
        cfg = LlavaNextConfig(image_grid_pinpoints=pin, **common)
        ip = ip_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pin)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
        model_cls, photo = LlavaNextForConditionalGeneration, photo.resize((2 * size, 2 * size))
    else:
        cfg = LlavaConfig(image_seq_length=(size // 14) ** 2, **common)
        ip = ip_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
        model_cls = LlavaForConditionalGeneration
    with torch.device(device):
        model = model_cls._from_config(cfg, dtype=dtype)
    model = model.eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 3
    inputs = proc(images=[photo], text=[TEMPLATE.format(image="<image>", question=QUESTION)], return_tensors="pt")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    n_vis = int((inputs["input_ids"] == image_id).sum())
    return Bench(shape=shape, model=model, inputs=inputs, params=sum(p.numel() for p in model.parameters()),
                 prompt_tokens=int(inputs["input_ids"].shape[1]), visual_tokens=n_vis, image_size=photo.size,
                 family=cfg.model_type)


# ------------------------------------------------------------------------------------------------
# configurations and measurements
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """One measured configuration and its samples."""

    label: str
    method: str | None = None        # registered name; None: unpruned or vision only
    budget: int | None = None
    params: dict = field(default_factory=dict)
    kind: str = "pruned"             # "unpruned", "vision", "pruned"
    prefill_ms: list = field(default_factory=list)       # wall clock
    generate_ms: list = field(default_factory=list)
    prefill_cpu_ms: list = field(default_factory=list)   # thread CPU time
    generate_cpu_ms: list = field(default_factory=list)
    decode_ms: list = field(default_factory=list)        # per new token, wall clock
    decode_cpu_ms: list = field(default_factory=list)
    select_ms: list = field(default_factory=list)
    kv_bytes: int | None = None
    peak_bytes: int | None = None
    report: dict | None = None
    error: str | None = None


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers cache (all layers)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for lay in layers:
            for name in ("keys", "values"):
                t = getattr(lay, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for kv in cache:  # legacy tuple of (key, value) per layer
        total += sum(t.numel() * t.element_size() for t in kv)
    return total


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _report_dict(rep) -> dict:
    return {"nominal_budget": rep.nominal_budget, "equivalent_tokens": rep.equivalent_tokens,
            "tokens_per_layer": list(rep.tokens_per_layer), "visual_tokens": list(rep.visual_tokens),
            "stages": [{"where": s.where, "before": s.tokens_before[0], "after": s.tokens_after[0],
                        "relevance": s.relevance, "select_ms": s.select_ms} for s in rep.stages],
            "notes": list(rep.notes)}


def run_once(b: Bench, cfg: Config, device: str, decode_tokens: int, record: bool = True) -> None:
    """Measure ``cfg`` once: prefill, then generate; appends to ``cfg`` when ``record``."""
    model, inputs = b.model, b.inputs
    if cfg.kind == "vision":
        with torch.inference_mode():
            _sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra)
            _sync(device)
            ms, cms = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
        if record:
            cfg.prefill_ms.append(ms)
            cfg.prefill_cpu_ms.append(cms)
        return
    ctx = None
    if cfg.kind == "pruned":
        ctx = tp.prune(model, cfg.method, budget=cfg.budget, **cfg.params)
    rep = ctx.__enter__() if ctx is not None else None
    try:
        with torch.inference_mode():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            out = model(**inputs, logits_to_keep=1, use_cache=True)
            _sync(device)
            pre, pre_c = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
            kv = kv_cache_bytes(out.past_key_values)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            sel = rep.select_ms if rep is not None else 0.0
            rep_d = _report_dict(rep) if rep is not None else None
            del out
            first: list = []  # (wall, cpu) at the end of generate's first forward (its prefill)

            def _prefill_done(module, args, kwargs, output):
                if not first:
                    _sync(device)
                    first.append((time.perf_counter(), time.thread_time()))

            hook = model.register_forward_hook(_prefill_done, with_kwargs=True)
            try:
                _sync(device)
                t0, c0 = time.perf_counter(), time.thread_time()
                gen = model.generate(**inputs, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                     do_sample=False)
                _sync(device)
                t1, c1 = time.perf_counter(), time.thread_time()
            finally:
                hook.remove()
            g, g_c = (t1 - t0) * 1e3, (c1 - c0) * 1e3
            d, d_c = ((t1 - first[0][0]) * 1e3 / (decode_tokens - 1), (c1 - first[0][1]) * 1e3 / (decode_tokens - 1))
            new = gen.shape[1] - inputs["input_ids"].shape[1]
            if new != decode_tokens:
                raise RuntimeError(f"generate produced {new} new tokens, expected {decode_tokens}")
            del gen
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if record:
        cfg.prefill_ms.append(pre)
        cfg.generate_ms.append(g)
        cfg.prefill_cpu_ms.append(pre_c)
        cfg.generate_cpu_ms.append(g_c)
        cfg.decode_ms.append(d)
        cfg.decode_cpu_ms.append(d_c)
        cfg.select_ms.append(sel)
        cfg.kv_bytes, cfg.peak_bytes, cfg.report = kv, peak, rep_d


@contextlib.contextmanager
def _selection_clock(clock: str):
    """With ``clock="cpu"``, make ``PruneReport.select_ms`` thread CPU time instead of wall time.

    The adapter times each selection with ``time.perf_counter`` (module ``tokenprune.runtime.stage_select``);
    for the duration of the block that module sees ``time.thread_time`` instead, so the selection time
    and the prefill time it is compared with come from the same clock. Restored on exit.
    """
    if clock != "cpu":
        yield
        return
    saved = _selection_timer.time
    _selection_timer.time = types.SimpleNamespace(perf_counter=time.thread_time)
    try:
        yield
    finally:
        _selection_timer.time = saved


def make_configs(methods, budgets, with_single: bool) -> list:
    cfgs = [Config(label="unpruned", kind="unpruned"), Config(label="vision tower only", kind="vision")]
    for name in methods:
        for bud in budgets:
            cfgs.append(Config(label=f"{name}@{bud}", method=name, budget=bud))
            if name == "tops" and with_single:
                cfgs.append(Config(label=f"tops[single]@{bud}", method="tops", budget=bud,
                                   params={"schedule": "single"}))
    return cfgs


def med(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------
def _series(c: Config, clock: str) -> tuple:
    """(prefill, generate, decode per token) samples of ``c`` in ms for ``clock`` ("cpu" or "wall")."""
    if clock == "cpu":
        return c.prefill_cpu_ms, c.generate_cpu_ms, c.decode_cpu_ms
    return c.prefill_ms, c.generate_ms, c.decode_ms


def analyse(b: Bench, cfgs: list, clock: str) -> tuple:
    """Records (one dict per configuration), checks (PASS/FAIL dicts) and the baseline summary.

    ``clock`` picks the primary measurement: ``"cpu"`` (thread CPU time; with one torch thread all the
    work runs on the calling thread, so on a shared machine this is the latency the work would have on
    an idle core) or ``"wall"``. Wall-clock speed-ups are always given as well.
    """
    base = next(c for c in cfgs if c.kind == "unpruned")
    vis = next(c for c in cfgs if c.kind == "vision")
    t0 = med(_series(base, clock)[0])
    t0_wall = med(base.prefill_ms)
    tv = med(_series(vis, clock)[0])
    d0 = med(_series(base, clock)[2])
    kv0 = base.kv_bytes
    text = b.prompt_tokens - b.visual_tokens
    summary = {"clock": clock, "unpruned_prefill_ms": t0, "vision_ms": tv, "unpruned_decode_ms": d0,
               "text_tokens": text, "visual_tokens": b.visual_tokens, "unpruned_prefill_wall_ms": t0_wall}
    records = []
    for c in cfgs:
        pre, gen, dec = _series(c, clock)
        r = {"label": c.label, "method": c.method, "schedule": c.params.get("schedule"), "budget": c.budget,
             "kind": c.kind, "error": c.error, "rounds": len(pre),
             "prefill_wall_ms": c.prefill_ms, "prefill_cpu_ms": c.prefill_cpu_ms,
             "generate_wall_ms": c.generate_ms, "generate_cpu_ms": c.generate_cpu_ms, "select_ms": c.select_ms}
        if c.error is None and pre:
            p = med(pre)
            r.update(prefill_ms_median=p, prefill_ms_min=min(pre), prefill_ms_max=max(pre), prefill_speedup=t0 / p,
                     prefill_wall_ms_median=med(c.prefill_ms), prefill_wall_speedup=t0_wall / med(c.prefill_ms))
        if c.kind != "vision" and c.error is None and pre:
            eq = c.report["equivalent_tokens"] if c.report else float(b.visual_tokens)
            ideal_llm = (text + b.visual_tokens) / (text + eq)
            ideal_e2e = t0 / (tv + (t0 - tv) / ideal_llm)
            dm = med(dec)
            r.update(nominal_tokens=c.budget if c.report else b.visual_tokens, equivalent_tokens=eq,
                     tokens_per_layer=c.report["tokens_per_layer"] if c.report else None,
                     stages=c.report["stages"] if c.report else [], notes=c.report["notes"] if c.report else [],
                     ideal_llm_speedup=ideal_llm, ideal_e2e_speedup=ideal_e2e,
                     select_ms_median=med(c.select_ms), decode_ms=dec, decode_ms_per_token=dm, decode_speedup=d0 / dm,
                     generate_ms_median=med(gen), kv_bytes=c.kv_bytes, kv_ratio=c.kv_bytes / kv0,
                     peak_bytes=c.peak_bytes)
        records.append(r)
    by = {r["label"]: r for r in records}
    checks = []
    budgets = sorted({c.budget for c in cfgs if c.method == "tops"}, reverse=True)
    for bud in budgets:
        for lab in (f"tops@{bud}", f"tops[single]@{bud}"):
            r = by.get(lab)
            if r is None or "prefill_ms_median" not in r:
                continue
            saved = t0 - r["prefill_ms_median"]
            sel = r["select_ms_median"]
            ok = saved > 0 and sel < 0.1 * saved
            pct = f"{100 * sel / saved:.1f}%" if saved > 0 else "no time saved"
            checks.append({"check": "TOPS selection time < 10% of the prefill time it saves", "config": lab,
                           "pass": ok, "detail": f"selection {sel:.1f} ms, prefill saved {saved:.1f} ms "
                                                 f"({clock} time) -> {pct}"})
        s, rnd = by.get(f"tops[single]@{bud}"), by.get(f"random@{bud}")
        if s and rnd and "prefill_speedup" in s and "prefill_speedup" in rnd:
            ratio = s["prefill_speedup"] / rnd["prefill_speedup"]
            checks.append({"check": "pre-LLM TOPS prefill speed-up >= 0.9x random's at the same budget",
                           "config": f"budget {bud}", "pass": ratio >= 0.9,
                           "detail": f"tops[single] {s['prefill_speedup']:.2f}x vs random "
                                     f"{rnd['prefill_speedup']:.2f}x ({clock} time) -> ratio {ratio:.3f} "
                                     f"(wall clock: {s['prefill_wall_speedup'] / rnd['prefill_wall_speedup']:.3f})"})
    return records, checks, summary


def table(records: list) -> str:
    """A Markdown table of the records (primary clock; wall-clock speed-up in its own column)."""
    head = ("| config | nominal | equiv. tokens | prefill ms (min-max) | speed-up | ideal LLM | ideal e2e | "
            "wall speed-up | select ms | decode ms/tok | decode x | KV MiB | KV ratio |")
    lines = [head, "|" + "---|" * 13]
    for r in records:
        if r["error"]:
            lines.append(f"| {r['label']} | error: {r['error'][:100]} |" + " |" * 11)
            continue
        if r["kind"] == "vision":
            lines.append(f"| {r['label']} | | | {r['prefill_ms_median']:.0f} ({r['prefill_ms_min']:.0f}-"
                         f"{r['prefill_ms_max']:.0f}) |" + " |" * 9)
            continue
        lines.append(
            f"| {r['label']} | {r['nominal_tokens']} | {r['equivalent_tokens']:.1f} | {r['prefill_ms_median']:.0f} "
            f"({r['prefill_ms_min']:.0f}-{r['prefill_ms_max']:.0f}) | {r['prefill_speedup']:.2f} | "
            f"{r['ideal_llm_speedup']:.2f} | {r['ideal_e2e_speedup']:.2f} | {r['prefill_wall_speedup']:.2f} | "
            f"{r['select_ms_median']:.1f} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f} | "
            f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_ratio']:.3f} |")
    return "\n".join(lines)


def plot(records: list, summary: dict, out: str, title: str) -> None:
    """Measured prefill speed-up against equivalent tokens, one line per method, and the ideal curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["kind"] == "pruned" and "prefill_speedup" in r and "equivalent_tokens" in r]
    groups: dict = {}
    for r in ok:
        key = r["method"] + (f"[{r['schedule']}]" if r["schedule"] else "")
        groups.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.8))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>phX*"
    for i, (key, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["equivalent_tokens"])
        bold = key.startswith("tops")
        ax.plot([r["equivalent_tokens"] for r in rs], [r["prefill_speedup"] for r in rs],
                marker=markers[i % len(markers)], lw=2.4 if bold else 1.0, ms=7 if bold else 5,
                color="crimson" if key == "tops" else ("darkorange" if bold else cmap(i % 20)),
                label=key, zorder=3 if bold else 2)
    n, text = summary["visual_tokens"], summary["text_tokens"]
    frac = summary["vision_ms"] / summary["unpruned_prefill_ms"]
    lo = min([r["equivalent_tokens"] for r in ok] + [n]) / 1.5
    xs = [lo * (n / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [1.0 / (frac + (1 - frac) * (text + x) / (text + n)) for x in xs], "k--", lw=1,
            label="ideal e2e (token counts, free selection)", zorder=1)
    ax.plot(xs, [(text + n) / (text + x) for x in xs], "k:", lw=1, label="ideal LLM only", zorder=1)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("equivalent visual tokens  (Σ_l n_l / L, from PruneReport)")
    ax.set_ylabel(f"measured prefill speed-up vs unpruned ({summary['clock']} time)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_start": load,
            "torch": torch.__version__, "transformers": transformers.__version__, "tokenprune": tp.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, budget 16, 1 round, 2 new tokens (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    ap.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    ap.add_argument("--budgets", default=None, help="comma-separated visual-token budgets (default per shape)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 1; 0 with --quick)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="new tokens for the decode timing (default 8)")
    ap.add_argument("--no-single", action="store_true", help="skip the pre-LLM-only TOPS (schedule='single')")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", default=None, choices=SHAPES, help="default: cpu (tiny with --quick)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--clock", default=None, choices=("cpu", "wall"),
                    help="primary timing: thread CPU time (default on CPU) or wall clock (default on CUDA)")
    ap.add_argument("--json", default=None, help="write records and checks to this JSON file")
    ap.add_argument("--plot", default=None, help="write the speed-up plot (PNG) here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape = args.shape or ("tiny" if args.quick else "cpu")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    decode_tokens = args.decode_tokens if args.decode_tokens is not None else (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if rounds < 1 or decode_tokens < 2 or warmup < 0:
        ap.error("--rounds must be >= 1, --decode-tokens >= 2 and --warmup >= 0")
    budgets = [int(x) for x in args.budgets.split(",")] if args.budgets else list(BUDGETS[shape])
    methods = args.methods.split(",") if args.methods else tp.list_methods()
    unknown = [m for m in methods if m not in tp.list_methods()]
    if unknown:
        ap.error(f"unknown methods {unknown}; registered: {tp.list_methods()}")
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    if clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        ap.error("--clock cpu measures the calling thread: use it only on CPU with --threads 1")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))

    meta = machine()
    t_start = time.perf_counter()
    b = build(shape, args.device, dtype)
    meta.update(shape=shape, device=args.device, dtype=str(dtype).replace("torch.", ""), params=b.params,
                prompt_tokens=b.prompt_tokens, visual_tokens=b.visual_tokens, image_size=list(b.image_size),
                rounds=rounds, warmup=warmup, decode_tokens=decode_tokens, clock=clock, budgets=budgets,
                methods=methods, question=QUESTION,
                command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print(f"# {meta['cpu']}, {meta['cores']} cores, {meta['threads']} thread(s), load {meta['loadavg_start']}; "
          f"torch {meta['torch']}, transformers {meta['transformers']}")
    print(f"# shape {shape}: {b.params / 1e6:.0f} M params, {meta['dtype']}, {args.device}; prompt {b.prompt_tokens} "
          f"tokens ({b.visual_tokens} visual); rounds {rounds}; decode {decode_tokens} new tokens")

    cfgs = make_configs(methods, budgets, with_single=not args.no_single)
    live = list(cfgs)
    with _selection_clock(clock):
        for r in range(-warmup, rounds):
            k = r % len(live) if r >= 0 else 0
            order = live[k:] + live[:k]
            t_round = time.perf_counter()
            for c in order:
                try:
                    run_once(b, c, args.device, decode_tokens, record=r >= 0)
                except Exception as e:  # reported in the record and the table, never hidden
                    c.error = f"{type(e).__name__}: {e}"
                    print(f"# {c.label}: {c.error}", flush=True)
                gc.collect()
            live = [c for c in live if c.error is None]
            what = f"warm-up {r + warmup + 1}/{warmup}" if r < 0 else f"round {r + 1}/{rounds}"
            print(f"# {what}: {time.perf_counter() - t_round:.1f} s wall", flush=True)

    records, checks, summary = analyse(b, cfgs, clock)
    meta.update(elapsed_s=time.perf_counter() - t_start, loadavg_end=os.getloadavg(),
                maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"\n# {clock} time; speed-ups against the unpruned prefill ({summary['unpruned_prefill_ms']:.0f} ms) "
          f"measured in the same rounds")
    print(table(records))
    print()
    for ch in checks:
        print(f"{'PASS' if ch['pass'] else 'FAIL'}: {ch['check']} [{ch['config']}]: {ch['detail']}")
    print(f"# elapsed {meta['elapsed_s']:.0f} s; load at end {meta['loadavg_end']}")
    result = {"meta": meta, "summary": summary, "records": records, "checks": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(records, summary, args.plot,
             f"{shape}: {b.params / 1e6:.0f} M params, {b.visual_tokens} visual + {summary['text_tokens']} text "
             f"tokens, "
             f"{meta['dtype']}, {args.device}, {meta['threads']} thread(s); medians of {rounds} interleaved rounds")
    return result


if __name__ == "__main__":
    main()
