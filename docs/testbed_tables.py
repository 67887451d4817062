"""Print the README (Markdown) and docs (reStructuredText) result tables from ``tokenprune eval --output``.

    python docs/testbed_tables.py docs/_static/testbed_eval.json

The tables in README.md and docs/testbed.rst are pasted from this output, so that every number in
them comes from the recorded JSON. Methods are sorted by relative accuracy at the middle budget,
the evidence oracle first.
"""

from __future__ import annotations

import json
import sys


def _load(path):
    with open(path) as fh:
        data = json.load(fh)
    records = data["records"]
    none = next(r for r in records if r["method"] == "none")
    budgets = sorted({r["budget"] for r in records if r["method"] != "none"}, reverse=True)
    rows = {}
    for r in records:
        if r["method"] != "none":
            rows.setdefault(r["method"], {})[r["budget"]] = r
    middle = budgets[len(budgets) // 2]
    order = sorted(rows, key=lambda m: (m != "evidence_oracle", -rows[m][middle]["relative_accuracy"], m))
    return data["meta"], none, budgets, rows, order


def _recall(r):
    """Before-LLM evidence recall in %, "–" for methods that prune only inside the LLM."""
    return f"{100 * r['evidence_recall']:.0f}" if r["first_stage"] == "before LLM" else "–"


def _recall_marked(r):
    """``(recall)`` before the LLM, ``[recall of the first in-LLM stage]`` otherwise."""
    if r["first_stage"] == "before LLM":
        return f"({100 * r['evidence_recall']:.0f})"
    first = r.get("evidence_recall_first_stage")
    return "" if first is None else f"[{100 * first:.0f}]"


def _tokens(x):
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def markdown(path) -> str:
    """Cells: relative accuracy · equivalent tokens · before-LLM evidence recall."""
    meta, none, budgets, rows, order = _load(path)
    n = meta["n_image_tokens"]
    head = " | ".join(f"{round(b * n)} kept ({100 * (1 - b):.1f}% removed)" for b in budgets)
    lines = [f"| method | {head} |", "|---" * (len(budgets) + 1) + "|"]
    for m in order:
        cells = [f"{100 * rows[m][b]['relative_accuracy']:.0f}% · {_tokens(rows[m][b]['equivalent_tokens'])} · "
                 f"{_recall(rows[m][b])}" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rst(path) -> str:
    """Cells: accuracy (before-LLM evidence recall, or [first in-LLM stage's]); equivalent tokens."""
    meta, none, budgets, rows, order = _load(path)
    n = meta["n_image_tokens"]
    widths = [17] + [12] * len(budgets) + [25]
    rule = "  ".join("=" * w for w in widths)
    head = ["method"] + [f"-{100 * (1 - b):.1f}% ({round(b * n)})" for b in budgets] + ["equivalent tokens"]
    body = [["none (%d)" % n, f"{100 * none['accuracy']:.1f}"] + [""] * (len(budgets) - 1) + [str(n)]]
    for m in order:
        rs = [rows[m][b] for b in budgets]
        body.append([m.replace("_", " ") if m == "evidence_oracle" else m]
                    + [f"{100 * r['accuracy']:.1f} {_recall_marked(r)}" for r in rs]
                    + [" / ".join(_tokens(r["equivalent_tokens"]) for r in rs)])
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [rule, fmt.format(*head).rstrip(), rule] + [fmt.format(*row).rstrip() for row in body] + [rule]
    return "\n".join(lines)


def summary(path) -> str:
    meta, none, budgets, rows, order = _load(path)
    fams = ", ".join(f"{f} {100 * v['accuracy']:.1f}" for f, v in none["per_family"].items())
    return f"unpruned {100 * none['accuracy']:.1f}% ({fams}); wall {meta['wall_s'] / 60:.1f} min"


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/_static/testbed_eval.json"
    print(summary(path), markdown(path), rst(path), sep="\n\n")
