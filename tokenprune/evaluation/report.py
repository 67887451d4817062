"""Results of an evaluation as records, text tables, JSON and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import _nanmean, budget_label

__all__ = ["make_records", "format_tables", "write_json", "plot_records"]


def _r(x, nd=4):
    """``x`` rounded to ``nd`` digits for the records (``None`` for ``None`` and NaN)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def make_records(results, *, family_order=()) -> list:
    """One JSON-able dict per configuration.

    Parameters
    ----------
    results : list of ConfigResult
        From :meth:`Evaluator.run_all`; the unpruned one (method ``"none"``) is the reference for
        relative accuracy and speed-up.
    family_order : sequence of str
        Question families listed first in ``per_family`` (and so in :func:`format_tables`), in
        this order; the others follow alphabetically. ``tokenprune eval`` passes the testbed's
        :data:`~tokenprune.testbed.scenes.QUESTION_FAMILIES`.

    Returns
    -------
    list of dict
        Keys: ``method``, ``budget`` (int tokens kept, float fraction kept; 1.0 for ``"none"``),
        ``reduction`` (share of image tokens removed at the nominal budget), ``nominal_tokens``,
        ``equivalent_tokens`` (image tokens averaged over the LLM's layers, from the adapter's
        report), ``tokens_per_stage``, ``accuracy``, ``relative_accuracy``, ``per_family``
        (``{family: {"accuracy", "relative_accuracy"}}``), ``evidence_recall`` (pre-LLM stage; ``None``
        for methods without one or data without evidence), ``evidence_recall_first_stage`` and
        ``first_stage``, ``prefill_ms`` (per question, median over batches), ``speedup`` (unpruned
        prefill time over this one), ``selection_ms`` (per question, if reported) and ``n``.
    """
    base = next((r for r in results if r.method == "none"), None)
    base_fam = base.family_accuracy(family_order) if base is not None else {}
    out = []
    for r in results:
        fam = r.family_accuracy(family_order)
        rel = (r.accuracy / base.accuracy) if base is not None and base.accuracy > 0 else None
        speed = (base.prefill_median_ms / r.prefill_median_ms) if base is not None and r.prefill_median_ms > 0 \
            else None
        pre = _nanmean(r.recall_pre_llm)
        has_pre = r.method == "none" or any(s.layer is None for s in r.stages)
        out.append({
            "method": r.method,
            "budget": 1.0 if r.budget is None else r.budget,
            "reduction": _r(1.0 - r.nominal_tokens / r.n_image_tokens),
            "nominal_tokens": r.nominal_tokens,
            "equivalent_tokens": _r(r.equivalent_tokens, 2),
            "tokens_per_stage": [{"stage": s.label, "layer": s.layer, "tokens": _r(s.tokens, 2)} for s in r.stages],
            "accuracy": _r(r.accuracy),
            "relative_accuracy": _r(rel),
            "per_family": {f: {"accuracy": _r(a),
                               "relative_accuracy": _r(a / base_fam[f]) if base_fam.get(f) else None}
                           for f, a in fam.items()},
            "evidence_recall": _r(pre) if has_pre else None,
            "evidence_recall_first_stage": _r(_nanmean(r.recall_first_stage)),
            "first_stage": r.first_stage_label,
            "prefill_ms": _r(r.prefill_median_ms, 3),
            "speedup": _r(speed, 3),
            "selection_ms": _r(r.selection_ms, 3),
            "n": int(len(r.scores)),
        })
    return out


def _table(header, rows, align) -> str:
    """A plain-text table: columns padded to their widest cell, aligned per ``align`` (``"l"`` or ``"r"``)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        return "  ".join(str(c).rjust(w) if a == "r" else str(c).ljust(w) for c, w, a in zip(cells, widths, align))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _pct(x, nd=1):
    """A share as a percentage with ``nd`` decimals (``"n/a"`` for ``None``)."""
    return "n/a" if x is None else f"{100 * x:.{nd}f}"


def format_tables(records, *, title: str | None = None) -> str:
    """The text tables ``tokenprune eval`` prints.

    The first table has one row per (method, budget): nominal and equivalent tokens, accuracy (%),
    accuracy relative to unpruned (%), evidence recall (%, pre-LLM stage; the first stage's in
    brackets for methods that prune only inside the LLM), prefill latency (ms per question) and
    speed-up. The second gives per-family accuracy (%), with the relative accuracy in brackets.
    """
    header = ["method", "budget", "tokens", "equiv", "acc", "rel", "recall", "prefill ms", "speed-up"]
    rows = []
    for r in records:
        if r["evidence_recall"] is not None:
            recall = _pct(r["evidence_recall"])
        elif r["evidence_recall_first_stage"] is not None:
            recall = f"({_pct(r['evidence_recall_first_stage'])})"
        else:
            recall = "n/a"
        b = None if r["method"] == "none" else r["budget"]
        rows.append([r["method"], budget_label(b), r["nominal_tokens"],
                     "n/a" if r["equivalent_tokens"] is None else f"{r['equivalent_tokens']:.1f}",
                     _pct(r["accuracy"]), _pct(r["relative_accuracy"]), recall,
                     "n/a" if r["prefill_ms"] is None else f"{r['prefill_ms']:.2f}",
                     "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"])
    parts = []
    if title:
        parts.append(title)
    parts.append(_table(header, rows, ["l", "l"] + ["r"] * 7))
    families = []
    for r in records:
        for f in r["per_family"]:
            if f not in families:
                families.append(f)
    if families:
        frows = []
        for r in records:
            b = None if r["method"] == "none" else r["budget"]
            cells = []
            for f in families:
                v = r["per_family"].get(f)
                if v is None:
                    cells.append("-")
                elif r["method"] == "none" or v["relative_accuracy"] is None:
                    cells.append(_pct(v["accuracy"]))
                else:
                    cells.append(f"{_pct(v['accuracy'])} ({_pct(v['relative_accuracy'], 0)})")
            frows.append([r["method"], budget_label(b)] + cells)
        parts.append("\nAccuracy per question family, % (relative to unpruned, %):")
        parts.append(_table(["method", "budget"] + families, frows, ["l", "l"] + ["r"] * len(families)))
    return "\n".join(parts)


def write_json(records, path, *, meta: dict | None = None) -> Path:
    """Write ``{"meta": meta, "records": records}`` as indented JSON; returns the path."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta or {}, "records": records}, fh, indent=1)
        fh.write("\n")
    return path


def plot_records(records, path, *, title: str | None = None) -> Path:
    """Save accuracy against equivalent tokens, one line per method, the unpruned model as a line.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install tokenprune[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("--plot needs matplotlib: pip install 'tokenprune[plot]'") from e
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = []
    for r in records:
        if r["method"] != "none" and r["method"] not in methods:
            methods.append(r["method"])
    cmap = plt.get_cmap("tab20")
    markers = "os^Dv<>pP*Xh"
    for i, m in enumerate(methods):
        pts = sorted((r["equivalent_tokens"], r["accuracy"]) for r in records
                     if r["method"] == m and r["equivalent_tokens"] is not None and r["accuracy"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=markers[i % len(markers)],
                    color=cmap(i % 20), label=m, linewidth=1.4, markersize=5)
    base = next((r for r in records if r["method"] == "none"), None)
    if base is not None and base["accuracy"] is not None:
        ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"unpruned ({base['nominal_tokens']} tokens)")
    ax.set_xlabel("equivalent image tokens (average over LLM layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy against equivalent tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
