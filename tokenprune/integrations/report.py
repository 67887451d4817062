"""The paper table from lmms-eval runs: ``tokenprune report RUN_DIR...``.

Each run is an lmms-eval ``--output_path`` folder holding lmms-eval's ``<date>_results.json`` and the
``tokenprune_report.json`` the ``tokenprune`` lmms-eval model wrote next to it
(:mod:`tokenprune.integrations.lmms.accounting`). The table has one row per (method, budget): the
score of every task metric, the scores relative to the unpruned run (when one is given), the mean
equivalent tokens and the prefill latency per request; it is printed as Markdown and written as
Markdown, CSV and JSON, with a plot of the relative score against equivalent tokens.

Runs are only comparable on the same model, the same task versions and the same documents: runs
whose model config, task version or number of documents differ are refused with the two runs named.
Nothing here imports lmms-eval.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .lmms.accounting import REPORT_FORMAT, REPORT_NAME

__all__ = ["Run", "load_runs", "build_table", "format_markdown", "write_table", "plot_table"]


@dataclass
class Run:
    """One lmms-eval run with its tokenprune report.

    Attributes
    ----------
    folder : pathlib.Path
        The folder holding both files.
    results_file : pathlib.Path
        lmms-eval's results JSON.
    method : str
        ``"none"`` for the unpruned model.
    budget : int, float or None
        The method's nominal budget.
    scores : dict
        ``{column: score}``, a column per task (``"task"``) or per task metric (``"task:metric"``).
    versions : dict
        ``{task: (version, metadata)}`` from lmms-eval's results.
    samples : dict
        ``{task: documents evaluated}``.
    report : dict
        The tokenprune report.
    """

    folder: Path
    results_file: Path
    method: str
    budget: object
    scores: dict
    versions: dict
    samples: dict
    report: dict = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.method}" + ("" if self.budget is None else f"@{self.budget}")


def _parse_model_args(text) -> dict:
    """lmms-eval's ``key=value,key=value`` model args as a dict of strings."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for part in str(text or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read the {what} {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"the {what} {str(path)!r} is not a JSON object")
    return data


def _matches(report_args: dict, results_args: dict) -> bool:
    """Whether lmms-eval's model args are those the report was written for (pretrained, method, budget)."""
    for key in ("pretrained", "method", "budget"):
        a = report_args.get(key)
        b = results_args.get(key)
        if key == "method":
            a, b = a or "none", b or "none"
        if (a in (None, "None")) != (b in (None, "None")):
            return False
        if a not in (None, "None") and str(a) != str(b):
            return False
    return True


def _scores(results: dict) -> tuple:
    """``(scores, versions, samples)`` of an lmms-eval results dict."""
    scores, versions, samples = {}, {}, {}
    for task, metrics in sorted((results.get("results") or {}).items()):
        vals = {}
        for key, value in metrics.items():
            name = key.split(",")[0]
            if key == "alias" or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            vals[name] = float(value)
        for name, value in vals.items():
            scores[task if len(vals) == 1 else f"{task}:{name}"] = value
        cfg = (results.get("configs") or {}).get(task, {})
        versions[task] = (results.get("versions", {}).get(task), cfg.get("metadata"))
        n = (results.get("n-samples") or {}).get(task, {})
        samples[task] = n.get("effective", n.get("original")) if isinstance(n, dict) else n
    return scores, versions, samples


def _runs_in(folder: Path) -> list:
    """Every (report, results) pair under ``folder``."""
    reports = sorted(folder.rglob(REPORT_NAME))
    if not reports:
        raise DatasetError(f"no {REPORT_NAME} under {str(folder)!r}: run lmms-eval with --model tokenprune and "
                           f"--output_path, one folder per run")
    runs = []
    for rp in reports:
        report = _read_json(rp, "tokenprune report")
        if report.get("format") != REPORT_FORMAT:
            raise DatasetError(f"{str(rp)!r} is not a tokenprune lmms report (format {report.get('format')!r}, "
                               f"expected {REPORT_FORMAT!r})")
        candidates = []
        for res in sorted(rp.parent.glob("*_results.json")):
            results = _read_json(res, "lmms-eval results file")
            if _matches(report.get("model_args") or {}, _parse_model_args((results.get("config") or {})
                                                                          .get("model_args"))):
                candidates.append((res, results))
        if not candidates:
            raise DatasetError(f"{str(rp)!r}: no lmms-eval results file in its folder was run with the same "
                               f"model args ({report.get('model_args')}); give each run its own --output_path")
        res, results = candidates[-1]  # the newest (lmms-eval names them by date)
        scores, versions, samples = _scores(results)
        runs.append(Run(folder=rp.parent, results_file=res, method=str(report.get("method") or "none"),
                        budget=report.get("budget"), scores=scores, versions=versions, samples=samples,
                        report=report))
    return runs


def load_runs(folders) -> list:
    """Read runs from lmms-eval output folders and check that they are comparable.

    Parameters
    ----------
    folders : list of str or pathlib.Path
        Folders searched recursively for ``tokenprune_report.json``.

    Returns
    -------
    list of Run

    Raises
    ------
    DatasetError
        A folder without a report, a report without matching results, or an unreadable file.
    ConfigError
        Two runs on different models (config fingerprint or model type), different versions of a task,
        or different numbers of documents of a task; the message names both runs.
    """
    runs = []
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            raise DatasetError(f"run folder not found: {str(p)!r}")
        runs.extend(_runs_in(p))
    first = runs[0]
    m0 = first.report.get("model") or {}
    for r in runs[1:]:
        m = r.report.get("model") or {}
        if (m.get("model_type"), m.get("config_sha256")) != (m0.get("model_type"), m0.get("config_sha256")):
            raise ConfigError(f"runs disagree on the model: {first.folder} has {m0.get('pretrained')!r} "
                              f"({m0.get('model_type')}, config {m0.get('config_sha256')}), {r.folder} has "
                              f"{m.get('pretrained')!r} ({m.get('model_type')}, config {m.get('config_sha256')})")
    seen: dict = {}
    for r in runs:
        for task, ver in r.versions.items():
            if task in seen and seen[task][1] != ver:
                raise ConfigError(f"runs disagree on the version of task {task!r}: {seen[task][0].folder} has "
                                  f"{seen[task][1]}, {r.folder} has {ver}")
            if task in seen and seen[task][0].samples.get(task) != r.samples.get(task):
                raise ConfigError(f"runs scored different numbers of {task!r} documents: {seen[task][0].folder} "
                                  f"{seen[task][0].samples.get(task)}, {r.folder} {r.samples.get(task)} "
                                  f"(same --limit for every run)")
            seen.setdefault(task, (r, ver))
    return runs


def _budget_key(b):
    if b is None:
        return (0, 0.0)
    return (1, -float(b)) if isinstance(b, int) else (1, -float(b) * 1e9)


def build_table(runs) -> dict:
    """The table: ``{"columns": [...], "rows": [...], "baseline": label or None, "model": {...}}``.

    Rows are sorted unpruned first, then by method and decreasing budget; each row has ``method``,
    ``budget``, ``scores`` (by column), ``relative`` (% of the unpruned score, by column; ``None``
    without an unpruned run), ``relative_mean``, ``equivalent_tokens``, ``nominal_tokens``,
    ``visual_tokens``, ``prefill_ms`` (mean) and ``prefill_ms_median`` per request, ``selection_ms``,
    ``requests`` and ``folder``.

    Raises
    ------
    ConfigError
        Two runs of the same method and budget (the table would have to pick one).
    """
    columns = sorted({c for r in runs for c in r.scores})
    by_key = {}
    for r in runs:
        key = (r.method, None if r.budget is None else json.dumps(r.budget))
        if key in by_key:
            raise ConfigError(f"two runs of {r.label}: {by_key[key].folder} and {r.folder}; give one of them")
        by_key[key] = r
    base = next((r for r in runs if r.method == "none"), None)
    rows = []
    for r in sorted(runs, key=lambda r: (r.method != "none", r.method, _budget_key(r.budget))):
        rel = {}
        for c in columns:
            s, b = r.scores.get(c), (base.scores.get(c) if base is not None else None)
            rel[c] = None if s is None or b in (None, 0) else 100.0 * s / b
        vals = [v for v in rel.values() if v is not None]
        rows.append({"method": r.method, "budget": r.budget, "scores": {c: r.scores.get(c) for c in columns},
                     "relative": rel, "relative_mean": sum(vals) / len(vals) if vals else None,
                     "equivalent_tokens": r.report.get("equivalent_tokens"),
                     "nominal_tokens": r.report.get("nominal_tokens"), "visual_tokens": r.report.get("visual_tokens"),
                     "prefill_ms": r.report.get("prefill_ms"), "prefill_ms_median": r.report.get("prefill_ms_median"),
                     "selection_ms": r.report.get("selection_ms"),
                     "requests": r.report.get("requests"), "folder": str(r.folder)})
    return {"columns": columns, "rows": rows, "baseline": None if base is None else str(base.folder),
            "model": runs[0].report.get("model"), "versions": {t: list(v) for r in runs for t, v in r.versions.items()}}


def _f(x, spec=".1f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _score(x):
    """Scores in [0, 1] as percentages, larger ones (MME) as they are."""
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if abs(x) <= 1.0 else f"{x:.1f}"


def format_markdown(table) -> str:
    """The table as Markdown: each score cell ``score (relative %)``."""
    cols = table["columns"]
    head = ["method", "budget"] + cols + ["rel. mean %", "equiv. tokens", "prefill ms (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in table["rows"]:
        cells = [r["method"], "–" if r["budget"] is None else str(r["budget"])]
        for c in cols:
            rel = r["relative"][c]
            cells.append(_score(r["scores"][c]) + ("" if rel is None or r["method"] == "none" else f" ({rel:.1f}%)"))
        cells += [_f(r["relative_mean"]), _f(r["equivalent_tokens"]), _f(r["prefill_ms_median"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if table["baseline"] is None:
        notes.append("no unpruned run given (method=none): relative scores are left out")
    m = table.get("model") or {}
    notes.append(f"model {m.get('pretrained')} ({m.get('model_type')}); scores in % (MME-style totals as they are); "
                 f"equivalent tokens: visual tokens averaged over the decoder layers; prefill: ms per request, "
                 f"median over requests")
    return "\n".join(lines + [""] + [f"Note: {n}." for n in notes])


def write_table(table, prefix) -> list:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.json``; returns the paths."""
    prefix = str(prefix)
    cols = table["columns"]
    md = Path(prefix + ".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(format_markdown(table) + "\n", encoding="utf-8")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "budget"] + cols + [f"{c} relative %" for c in cols]
               + ["relative mean %", "equivalent tokens", "nominal tokens", "prefill ms (mean)", "prefill ms (median)",
                  "selection ms", "requests", "folder"])
    for r in table["rows"]:
        w.writerow([r["method"], "" if r["budget"] is None else r["budget"]] + [r["scores"][c] for c in cols]
                   + [r["relative"][c] for c in cols]
                   + [r["relative_mean"], r["equivalent_tokens"], r["nominal_tokens"], r["prefill_ms"],
                      r["prefill_ms_median"], r["selection_ms"], r["requests"], r["folder"]])
    cs = Path(prefix + ".csv")
    cs.write_text(buf.getvalue(), encoding="utf-8")
    js = Path(prefix + ".json")
    js.write_text(json.dumps(table, indent=2, default=str) + "\n", encoding="utf-8")
    return [md, cs, js]


def plot_table(table, path) -> Path:
    """Save the mean relative score (or the first column's score without an unpruned run) against
    equivalent tokens, one line per method; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_rel = table["baseline"] is not None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = {}
    for r in table["rows"]:
        y = r["relative_mean"] if use_rel else (r["scores"][table["columns"][0]] if table["columns"] else None)
        if y is None or r["equivalent_tokens"] is None:
            continue
        methods.setdefault(r["method"], []).append((r["equivalent_tokens"], y))
    for name, pts in methods.items():
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if name != "none" else "*", ms=6 if name != "none" else 12, label=name)
    ax.set_xlabel("equivalent visual tokens (mean over requests)")
    ax.set_ylabel("score relative to unpruned (%, mean over tasks)" if use_rel else table["columns"][0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
