"""The ``tokenprune`` command line.

Subcommands:

``tokenprune eval``
    The main job: accuracy, evidence recall, tokens and prefill latency of every registered method
    at the TOPS paper's three reductions, plus the unpruned model, on the bundled testbed model and
    its 1,000 held-out questions, or on ``--model PATH --data FILE.jsonl``.
``tokenprune run``
    One image and one question: the answer unpruned and pruned, tokens per stage, timings, and a
    picture of the kept patches of each stage.
``tokenprune testbed train`` / ``tokenprune testbed export``
    Train the testbed model from scratch; write held-out questions as a JSONL set with images, or
    (``--format parquet``) as a parquet file with the lmms-eval task ``tokenprune_testbed``.
``tokenprune lmms task``
    Write an lmms-eval task folder over a local VQA set in the JSONL format.
``tokenprune report``
    The paper table (method x budget, score per task, relative to the unpruned run, equivalent tokens,
    prefill latency) from lmms-eval output folders holding tokenprune reports.

``tokenprune eval`` runs data-parallel when launched by ``torchrun`` or ``accelerate launch``: each
rank evaluates its share of the batches and rank 0 prints and writes the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import string
import sys
import tempfile
import time
from pathlib import Path

from .errors import OutputPathError, TokenPruneError

__all__ = ["main", "build_parser"]

DEFAULT_RUN_OVERLAY = "tokenprune_run.png"
DEFAULT_PLOT = "tokenprune_eval.png"


def _csv(text):
    """Comma-separated values, stripped, empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


#: Fields a ``--prompt`` template may use.
PROMPT_FIELDS = ("question", "image")


def _check_positive(value, option: str) -> None:
    """Raise :class:`TokenPruneError` unless ``value`` is ``None`` or an int >= 1."""
    if value is not None and value < 1:
        raise TokenPruneError(f"{option} must be >= 1, got {value}")


def _check_prompt(template) -> None:
    """Check a ``--prompt`` template before any model loads: ``{question}``, no other field than ``{image}``."""
    if template is None:
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TokenPruneError(f"--prompt {template!r} is not a valid template ({e}); "
                              f"write literal braces as '{{{{' and '}}}}'") from None
    unknown = [f for f in dict.fromkeys(fields) if f not in PROMPT_FIELDS]
    if unknown:
        raise TokenPruneError(f"--prompt has unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                              f"known fields: {{question}} (the question), {{image}} (the image placeholder)")
    if "{question}" not in template:
        raise TokenPruneError(f"--prompt needs a '{{question}}' field, got {template!r}")
    try:
        template.format(question="q", image="<image>")
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise TokenPruneError(f"--prompt {template!r} is not a valid template ({e})") from None


def _check_output_path(path, option: str, *, folder: bool = False) -> None:
    """Check, before any work, that an output path can be written.

    A file path must not be a directory; a folder path must not be a file; the folder that will
    hold the output must exist or be creatable (its nearest existing ancestor a folder in which a
    temporary file can be written), and an existing file must be writable. Nothing is left behind.

    Raises
    ------
    OutputPathError
        The message names ``option`` and the offending path.
    """
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            raise OutputPathError(f"{option} {str(p)!r} is an existing file; give a folder")
        holder = p
    else:
        if p.is_dir():
            raise OutputPathError(f"{option} {str(p)!r} is a directory; give a file path")
        if p.exists() and not os.access(p, os.W_OK):
            raise OutputPathError(f"{option} {str(p)!r} exists and is not writable")
        holder = p.parent
    holder = Path(os.path.abspath(holder))
    existing = holder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{option} {str(p)!r}: {str(existing)!r} is a file, not a folder")
    try:  # a real probe: permission bits say nothing for root or on read-only file systems
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputPathError(f"{option} {str(p)!r}: cannot write in the folder {str(existing)!r} "
                              f"({e.strerror or e})") from None


def _merge_budgets(values) -> list:
    """Parsed budgets without repeats, in order; prints a note for each merged repeat."""
    from .budget import parse_budget

    out, seen = [], {}
    for text in values:
        b = parse_budget(text)
        key = (isinstance(b, float), b)  # 1 (one token) and 1.0 (everything) differ
        if key in seen:
            print(f"tokenprune eval: note: --budgets gives {seen[key]!r} and {text!r}, the same budget; "
                  f"it is evaluated once", file=sys.stderr)
            continue
        seen[key] = text
        out.append(b)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenprune`` argument parser with its subcommands."""
    p = argparse.ArgumentParser(prog="tokenprune", description="Visual-token pruning for multimodal LLMs.")
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"tokenprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{eval,run,testbed,lmms,report}")
    sub.required = True

    e = sub.add_parser("eval", help="rank pruning methods by accuracy, evidence kept and speed",
                       description="Evaluate every method (or --methods) at every budget, plus the unpruned "
                                   "model. Default: the bundled testbed model on its 1,000 held-out questions, "
                                   "at 77.8%, 88.9% and 94.4% of the image tokens removed.")
    e.add_argument("--model", metavar="PATH", help="local folder of a supported HF model (default: the testbed model)")
    e.add_argument("--data", metavar="FILE.jsonl", help="local VQA set (fields image, question, answers; see docs) "
                                                       "(default: the testbed's held-out questions)")
    e.add_argument("--methods", metavar="M1,M2", type=_csv, default=None,
                   help="comma-separated registered methods (default: all)")
    e.add_argument("--budgets", metavar="B1,B2", type=_csv, default=None,
                   help="comma-separated budgets: counts (64), fractions kept (0.25) or percentages kept (25%%) "
                        "(default: 128/576, 64/576, 32/576 of the image tokens kept)")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions")
    e.add_argument("--seed", type=int, default=0, help="seed of randomised methods and torch (default 0)")
    e.add_argument("--batch-size", type=int, default=100, metavar="B", help="questions per batch (default 100)")
    e.add_argument("--max-new-tokens", type=int, default=None, metavar="T",
                   help="answer length; 1 means the prefill's argmax (default: 1 for the testbed model, else 16)")
    e.add_argument("--prompt", default=None, metavar="TEMPLATE",
                   help="prompt template with {question} (and {image}); default: the chat template if the "
                        "processor has one, else '<s><image> {question}'")
    e.add_argument("--output", "-o", metavar="FILE.json", help="write one JSON record per (method, budget)")
    e.add_argument("--plot", nargs="?", const=DEFAULT_PLOT, default=None, metavar="FILE.png",
                   help=f"save accuracy against equivalent tokens (default file: {DEFAULT_PLOT})")
    e.add_argument("--oracle", action="store_true",
                   help="add the testbed's evidence oracle (keeps each question's evidence patches first) at "
                        "every budget, as a reference; needs data with evidence")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument("--no-vision-cache", action="store_true",
                   help="recompute the vision tower in every configuration (default: once per batch of images, "
                        "shared by every configuration; the results are identical)")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute the unpruned first LLM layers in every in-LLM configuration (default: once per "
                        "batch, shared by the methods whose first stage acts at or after them; identical results)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("run", help="one image, one question: answers, tokens per stage, timings, overlay picture")
    r.add_argument("--image", metavar="PATH", help="image file (default: a testbed held-out scene)")
    r.add_argument("--question", metavar="TEXT", help="the question (required with --image)")
    r.add_argument("--model", metavar="PATH", help="local folder of a supported HF model (default: the testbed model)")
    r.add_argument("--method", default="tops", help="registered method (default: tops)")
    r.add_argument("--budget", default="64", help="count (64), fraction kept (0.25) or percentage kept (default 64)")
    r.add_argument("--index", type=int, default=0, help="which testbed held-out question without --image (default 0)")
    r.add_argument("--max-new-tokens", type=int, default=None, metavar="T",
                   help="answer length (default: 1 for the testbed model, else 32)")
    r.add_argument("--prompt", default=None, metavar="TEMPLATE", help="prompt template with {question}")
    r.add_argument("--out", default=DEFAULT_RUN_OVERLAY, metavar="FILE.png",
                   help=f"overlay picture (default: {DEFAULT_RUN_OVERLAY})")
    r.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("testbed", help="the testbed model: train it, export its questions")
    tsub = t.add_subparsers(dest="testbed_command", metavar="{train,export}")
    tsub.required = True
    tsub.add_parser("train", help="train the testbed model from scratch (arguments go to the training script; "
                                  "see `tokenprune testbed train --help`)", add_help=False)
    x = tsub.add_parser("export", help="write held-out questions as a JSONL VQA set with PNG images, or as "
                                       "parquet with the lmms-eval task tokenprune_testbed")
    x.add_argument("--out", required=True, metavar="DIR")
    x.add_argument("--n", type=int, default=None,
                   help="questions (default: 50 for jsonl, all 1,000 for parquet)")
    x.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                   help="jsonl (default): testbed.jsonl and images/; parquet: testbed.parquet (images inside) and "
                        "tokenprune_testbed.yaml, for lmms-eval --include_path DIR --tasks tokenprune_testbed")

    lm = sub.add_parser("lmms", help="lmms-eval helpers: write a task over a local VQA set")
    lsub = lm.add_subparsers(dest="lmms_command", metavar="{task}")
    lsub.required = True
    lt = lsub.add_parser("task", help="write an lmms-eval task folder over a local VQA set (JSONL format)",
                         description="Check a local VQA set in the JSONL format and write DIR/NAME.yaml and "
                                     "DIR/NAME.jsonl (image paths made absolute; images stay where they are). "
                                     "Run it with: lmms-eval --model tokenprune --include_path DIR --tasks NAME")
    lt.add_argument("--data", required=True, metavar="FILE.jsonl", help="the local VQA set")
    lt.add_argument("--out", required=True, metavar="DIR", help="the task folder (created)")
    lt.add_argument("--name", default="tokenprune_local_vqa", help="task name (default tokenprune_local_vqa)")
    lt.add_argument("--max-new-tokens", type=int, default=16, metavar="T", help="answer length (default 16)")

    rp = sub.add_parser("report", help="the paper table from lmms-eval runs with tokenprune reports",
                        description="Read lmms-eval output folders (each with a *_results.json and the "
                                    "tokenprune_report.json the tokenprune model wrote) and print the table: "
                                    "method x budget, score per task, relative to the unpruned run, equivalent "
                                    "tokens and prefill latency. Runs on different models or task versions are "
                                    "refused.")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lmms-eval --output_path folders (searched recursively)")
    rp.add_argument("--out", metavar="PREFIX", default=None,
                    help="write PREFIX.md, PREFIX.csv and PREFIX.json (default: print only)")
    rp.add_argument("--plot", nargs="?", const="tokenprune_report.png", default=None, metavar="FILE.png",
                    help="save score against equivalent tokens (default file: tokenprune_report.png)")
    return p


# ------------------------------------------------------------------------------------------------
def _is_testbed_processor(processor) -> bool:
    """Whether ``processor`` is the testbed's (its tokenizer has the testbed vocabulary)."""
    from .testbed import scenes as S

    tok = getattr(processor, "tokenizer", None)
    try:
        return tok is not None and tok.get_vocab() == S.WORD_TO_ID
    except Exception:  # pragma: no cover - exotic tokenizers
        return False


def _load(model_path):
    """Load a model folder (default: the testbed checkpoint): ``(model, processor, label, seconds)``."""
    from .evaluation.models import load_model
    from .testbed.evaluate import checkpoint_path

    import transformers

    transformers.utils.logging.set_verbosity_error()  # no torchvision fallback notices
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar next to ours
    path = checkpoint_path() if model_path is None else model_path
    t0 = time.perf_counter()
    model, processor = load_model(path)
    return model, processor, str(path), time.perf_counter() - t0


def cmd_eval(args) -> int:
    """``tokenprune eval``: every method at every budget against the unpruned model; prints tables."""
    import torch

    from .evaluation.report import format_tables, make_records, plot_records, write_json
    from .evaluation.runner import DEFAULT_BUDGETS, Evaluator, validate_method_names
    from .testbed.scenes import QUESTION_FAMILIES

    t_start = time.perf_counter()
    # Validate every option and output path before loading anything.
    _check_positive(args.threads, "--threads")
    _check_positive(args.limit, "--limit")
    _check_positive(args.batch_size, "--batch-size")
    _check_positive(args.max_new_tokens, "--max-new-tokens")
    _check_prompt(args.prompt)
    if args.output:
        _check_output_path(args.output, "--output")
    if args.plot:
        _check_output_path(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TokenPruneError("--plot needs matplotlib: pip install 'tokenprune[plot]'") from None
    if args.methods is not None and not args.methods:
        raise TokenPruneError("--methods is empty: give comma-separated registered method names, or leave it out "
                              "for every method")
    if args.budgets is not None and not args.budgets:
        raise TokenPruneError("--budgets is empty: give comma-separated budgets, or leave it out for the defaults")
    methods = validate_method_names(args.methods)
    budgets = _merge_budgets(args.budgets) if args.budgets else list(DEFAULT_BUDGETS)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .evaluation.distributed import shard_from_environment

    shard = shard_from_environment()  # torchrun / accelerate launch: this rank's share of the batches
    say = print if shard.is_main else (lambda *a, **k: None)
    if args.data is not None:
        from .evaluation.data import read_vqa_jsonl

        examples = read_vqa_jsonl(args.data)
        if args.limit is not None:
            examples = examples[:args.limit]
        data_label = str(args.data)
    else:
        examples = None
    model, processor, model_label, load_s = _load(args.model)
    if examples is None:
        from .testbed.evaluate import HELD_OUT_SIZE, held_out_examples

        examples = held_out_examples(limit=args.limit)
        data_label = f"testbed held-out set ({HELD_OUT_SIZE} questions, seed 12345)"
    testbed = _is_testbed_processor(processor)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (1 if testbed else 16)
    references = None
    if args.oracle:  # checked before any evaluation
        from .evaluation.models import image_grid
        from .testbed.oracle import ORACLE_NAME, oracle_method

        grid = image_grid(model)
        if grid is None or not any(ex.evidence is not None for ex in examples):
            raise TokenPruneError("--oracle needs questions with evidence (the testbed, or a JSONL with 'evidence') "
                                  "and a model with a square patch grid")
        n_patches = grid[0] * grid[1]
        for i, ex in enumerate(examples):
            if ex.evidence is not None and len(ex.evidence) and int(ex.evidence.max()) >= n_patches:
                raise TokenPruneError(f"--oracle: question {i + 1}{f' (id {ex.id})' if ex.id is not None else ''} "
                                      f"has evidence patch {int(ex.evidence.max())}, outside the model's "
                                      f"{grid[0]} x {grid[1]} patch grid (indices 0..{n_patches - 1})")
        seed = args.seed

        def make_oracle(b):
            return lambda exs: oracle_method(exs, b, n_patches=n_patches, cols=grid[1], seed=seed)

        references = {ORACLE_NAME: make_oracle}
    ev = Evaluator(model, processor, examples, batch_size=args.batch_size, max_new_tokens=max_new,
                   prompt=args.prompt, progress=not args.no_progress, vision_cache=not args.no_vision_cache,
                   prefix_cache=not args.no_prefix_cache, shard=shard)
    ev.prepare()
    ranks = (f"; {shard.world_size} ranks ({len(ev.my_batches())} of {len(ev.prepare())} batches on rank 0)"
             if shard.world_size > 1 else "")
    say(f"tokenprune eval: model {model_label} (loaded in {load_s:.1f} s); data {data_label}; "
        f"{len(examples)} questions, {ev.n_image_tokens} image tokens each; {len(methods)} methods x "
        f"{len(budgets)} budgets + unpruned{' + evidence oracle' if args.oracle else ''}; "
        f"batch {args.batch_size}; torch threads {torch.get_num_threads()}{ranks}", flush=True)
    results = ev.run_all(methods, budgets, seed=args.seed, references=references)
    timing = _timing(results, ev)
    if not shard.is_main:  # rank 0 prints and writes
        shard.close()
        return 0
    records = make_records(results, family_order=QUESTION_FAMILIES)
    wall = time.perf_counter() - t_start
    print()
    print(format_tables(records))
    print("\nEvidence recall: share of each question's evidence patches kept by the pre-LLM stage; in "
          "brackets, for methods that prune only inside the LLM, by their first stage. Prefill: ms per "
          "question (vision tower, selection and LLM prefill, median over batches; vision work shared across "
          "configurations counts in each).")
    print(f"\n{timing['text']}")
    print(f"Wall time {wall:.1f} s.")
    if args.output:
        meta = dict(model=model_label, data=data_label, n=len(examples), methods=methods, budgets=budgets,
                    seed=args.seed, batch_size=args.batch_size, max_new_tokens=max_new,
                    n_image_tokens=ev.n_image_tokens, wall_s=round(wall, 1), config_wall_s=timing["configs"],
                    vision=timing["vision"], llm_prefix=timing["llm_prefix"], torch=torch.__version__,
                    transformers=__import__("transformers").__version__, threads=torch.get_num_threads(),
                    machine=platform.machine(), python=platform.python_version(), world_size=shard.world_size)
        path = write_json(records, args.output, meta=meta)
        print(f"Wrote {len(records)} records to {path}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)  # checked before the evaluation
        name = "testbed model" if args.model is None else os.path.basename(model_label.rstrip("/"))
        path = plot_records(records, args.plot, title=f"{name}: {len(examples)} questions")
        print(f"Saved the plot to {path}")
    shard.close()
    return 0


def _timing(results, ev) -> dict:
    """Where the time went: wall seconds per configuration and of the shared vision work.

    Returns ``{"configs": {"method@budget": s}, "vision": {...} or None, "llm_prefix": {...} or None,
    "text": str}``.
    """
    from .evaluation.runner import budget_label

    configs = {f"{r.method}@{budget_label(r.budget)}": round(r.wall_s, 2) for r in results if r.wall_s is not None}
    by_method: dict = {}
    for r in results:
        by_method.setdefault(r.method, []).append(f"{r.wall_s:.1f}")
    lines = ["Wall time per configuration (s; per method, in budget order): "
             + "; ".join(f"{m} {'/'.join(ts)}" for m, ts in by_method.items()) + "."]
    vision = None
    if ev.vision_cache is not None:
        per_rank = ev.shard.gather(ev.vision_cache.stats())  # every rank calls it; one process: [stats]
        st = {k: sum(r[k] for r in per_rank) for k in ("compute_ms", "saved_ms", "hits", "misses", "entries", "bytes")}
        vision = {"computed_s": round(st["compute_ms"] / 1e3, 2), "reused_s": round(st["saved_ms"] / 1e3, 2),
                  "hits": st["hits"], "misses": st["misses"], "entries": st["entries"], "bytes": st["bytes"]}
        lines.append(f"Vision side (tower, projector, vision signals): computed once per batch in "
                     f"{vision['computed_s']:.1f} s ({st['misses']} computations), reused {st['hits']} times "
                     f"(saving about {vision['reused_s']:.1f} s).")
    else:
        lines.append("Vision side recomputed in every configuration (--no-vision-cache).")
    prefix = None
    if ev.prefix_cache is not None:
        per_rank = ev.shard.gather(ev.prefix_cache.stats())
        st = {k: sum(r[k] for r in per_rank) for k in ("compute_ms", "saved_ms", "hits", "misses", "layers_saved")}
        prefix = {"computed_s": round(st["compute_ms"] / 1e3, 2), "reused_s": round(st["saved_ms"] / 1e3, 2),
                  "hits": st["hits"], "misses": st["misses"], "layers_saved": st["layers_saved"]}
        if st["hits"] or st["misses"]:
            lines.append(f"Unpruned first LLM layers of in-LLM methods: computed once per batch in "
                         f"{prefix['computed_s']:.1f} s, replayed {st['hits']} times "
                         f"({st['layers_saved']} layer calls, saving about {prefix['reused_s']:.1f} s).")
    else:
        lines.append("First LLM layers recomputed in every in-LLM configuration (--no-prefix-cache).")
    return {"configs": configs, "vision": vision, "llm_prefix": prefix, "text": "\n".join(lines)}


def cmd_run(args) -> int:
    """``tokenprune run``: one method on one question; prints the answers, tokens and timings."""
    import numpy as np
    import torch

    from .evaluation.data import load_image
    from .evaluation.models import build_prompt, image_grid
    from .evaluation.overlay import model_view, save_overlay
    from .budget import parse_budget
    from .evaluation.runner import build_method, summarize_report, validate_method_names

    if args.image is not None and not args.question:
        raise TokenPruneError("--image needs --question")
    _check_positive(args.max_new_tokens, "--max-new-tokens")
    _check_prompt(args.prompt)
    _check_output_path(args.out, "--out")
    (method_name,) = validate_method_names([args.method])
    budget = parse_budget(args.budget)
    if args.image is not None:
        image = load_image(args.image)
        question, expected, evidence = args.question, None, None
    else:
        from .testbed.evaluate import HELD_OUT_SIZE, held_out_examples

        if not 0 <= args.index < HELD_OUT_SIZE:
            raise TokenPruneError(f"--index must be in 0..{HELD_OUT_SIZE - 1} (a testbed held-out question), "
                                  f"got {args.index}")
        ex = held_out_examples(limit=args.index + 1)[args.index]
        image = load_image(ex.image)
        question = args.question or ex.question
        expected = ex.answers[0] if not args.question else None
        evidence = ex.evidence if not args.question else None
    model, processor, model_label, load_s = _load(args.model)
    testbed = _is_testbed_processor(processor)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (1 if testbed else 32)
    text = build_prompt(processor, question, args.prompt)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    tok = processor.tokenizer
    method = build_method(method_name, budget, args.seed)
    from .evaluation.models import num_image_tokens

    n_img = num_image_tokens(inputs, model)

    def answer():
        with torch.no_grad():
            if max_new == 1:
                ids = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
            else:
                g = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, return_dict_in_generate=True,
                                   output_scores=True)
                ids = g.sequences[:, g.sequences.shape[1] - len(g.scores):]
        return tok.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def prefill_ms(pruned: bool, repeats: int = 3):
        """Median wall time of the prefill forward, after one untimed warm-up."""
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                ctx = prune(model, method, seed=args.seed) if pruned else contextlib.nullcontext()
                with ctx:
                    t0 = time.perf_counter()
                    model(**inputs, logits_to_keep=1)
                    dt = time.perf_counter() - t0
                if i:
                    times.append(dt * 1000)
        return float(np.median(times))

    from .runtime import prune

    torch.manual_seed(args.seed)
    ms_full, ms_pruned = prefill_ms(False), prefill_ms(True)
    a_full = answer()
    with prune(model, method, seed=args.seed) as report:
        a_pruned = answer()
    info = summarize_report(report, 1, n_img, image_grid(model))

    print(f"model {model_label} (loaded in {load_s:.1f} s); {n_img} image tokens")
    print(f"question: {question}" + (f"   (expected: {expected})" if expected else ""))
    print(f"unpruned answer: {a_full!r}")
    print(f"{method_name} @ {args.budget} answer: {a_pruned!r}")
    print("tokens per stage: " + " -> ".join([f"input {n_img}"] + [f"{lab} {t:.0f}" for lab, _, t in info["stages"]]))
    if info["equivalent_tokens"] is not None:
        print(f"equivalent tokens: {info['equivalent_tokens']:.1f} of {n_img}")
    if info["selection_ms"] is not None:
        print(f"selection time: {info['selection_ms']:.2f} ms")
    print(f"prefill (vision, selection, LLM): unpruned {ms_full:.1f} ms, pruned {ms_pruned:.1f} ms "
          f"(speed-up {ms_full / ms_pruned:.2f}x; median of 3 after a warm-up)")
    grid = image_grid(model)
    stages = [(lab, kept[0]) for (lab, _, _), kept in zip(info["stages"], info["kept_per_stage"]) if kept is not None]
    if evidence is not None and len(evidence):
        ev = np.asarray(evidence)
        for lab, kept in stages:
            print(f"evidence patches kept by {lab}: {int(np.isin(ev, kept).sum())}/{len(ev)}")
        stages = [("evidence", ev)] + stages
    if grid is None or not stages:
        print("no patch grid for this model; overlay not saved")
        return 0
    path = save_overlay(model_view(image, inputs, processor), grid, stages, args.out)
    print(f"saved the overlay to {path}")
    return 0


def cmd_testbed(args, rest) -> int:
    """``tokenprune testbed``: train the testbed model, or export held-out questions."""
    if args.testbed_command == "train":
        from .testbed import train

        train.main(rest)
        return 0
    if rest:
        raise TokenPruneError(f"unrecognised arguments: {' '.join(rest)}")
    from .testbed.evaluate import HELD_OUT_SIZE, export_jsonl, export_parquet

    n = args.n if args.n is not None else (HELD_OUT_SIZE if args.format == "parquet" else 50)
    if n < 1:
        raise TokenPruneError(f"--n must be >= 1, got {n}")
    _check_output_path(args.out, "--out", folder=True)
    if args.format == "parquet":
        from .integrations.lmms.taskfiles import TESTBED_TASK, write_testbed_task

        path = export_parquet(args.out, n=n)
        task = write_testbed_task(args.out, path)
        print(f"wrote {n} questions to {path} and the lmms-eval task {TESTBED_TASK} to {task}\n"
              f"run: lmms-eval --model tokenprune --model_args pretrained=MODEL,method=NAME,budget=B "
              f"--include_path {args.out} --tasks {TESTBED_TASK}")
        return 0
    path = export_jsonl(args.out, n=n)
    print(f"wrote {n} questions to {path}")
    return 0


def cmd_lmms(args) -> int:
    """``tokenprune lmms task``: an lmms-eval task folder over a local VQA set."""
    from .integrations.lmms.taskfiles import write_local_vqa_task

    _check_positive(args.max_new_tokens, "--max-new-tokens")
    _check_output_path(args.out, "--out", folder=True)
    path, n = write_local_vqa_task(args.data, args.out, name=args.name, max_new_tokens=args.max_new_tokens)
    print(f"wrote the lmms-eval task {args.name} ({n} questions) to {path}\n"
          f"run: lmms-eval --model tokenprune --model_args pretrained=MODEL,method=NAME,budget=B "
          f"--include_path {args.out} --tasks {args.name}")
    return 0


def cmd_report(args) -> int:
    """``tokenprune report``: the paper table from lmms-eval runs."""
    from .integrations.report import build_table, format_markdown, load_runs, plot_table, write_table

    if args.out:
        for ext in (".md", ".csv", ".json"):
            _check_output_path(f"{args.out}{ext}", "--out")
    if args.plot:
        _check_output_path(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TokenPruneError("--plot needs matplotlib: pip install 'tokenprune[plot]'") from None
    runs = load_runs(args.runs)
    table = build_table(runs)
    print(format_markdown(table))
    if args.out:
        for path in write_table(table, args.out):
            print(f"wrote {path}")
    if args.plot:
        print(f"saved the plot to {plot_table(table, args.plot)}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``tokenprune`` command; returns the exit status (2 on a named error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "testbed":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "lmms":
            return cmd_lmms(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_testbed(args, rest)
    except TokenPruneError as e:
        print(f"tokenprune {args.command}: error: {e} [{type(e).__name__}]", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
