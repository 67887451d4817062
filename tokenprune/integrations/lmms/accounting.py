"""Pruning accounting for lmms-eval runs: per request, over ranks, as ``tokenprune_report.json``.

The lmms-eval model (:mod:`tokenprune.integrations.lmms.model`) adds one :class:`RequestRecord` per
request it answers (never for the padding requests lmms-eval adds to even out ranks), reading the
:class:`~tokenprune.PruneReport` of the batch the request was in. At the end of the run every rank's
records are gathered to rank 0 (:func:`gather_states`) and summarised (:func:`summarize`): mean
visual, nominal and equivalent tokens, mean tokens after each stage, selection and prefill time per
request, and the peak memory of each rank.

Nothing here imports lmms-eval; it runs (and is tested) without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...budget import Budget
from ...errors import OutputPathError

__all__ = ["RequestRecord", "Accounting", "sample_equivalent_tokens", "gather_states", "summarize", "one_line",
           "write_report", "REPORT_NAME", "REPORT_FORMAT"]

#: File name of the report written next to lmms-eval's results.
REPORT_NAME = "tokenprune_report.json"
#: Format tag stored in every report (``tokenprune report`` checks it).
REPORT_FORMAT = "tokenprune-lmms-report/1"


@dataclass
class RequestRecord:
    """What pruning did to one request.

    Attributes
    ----------
    task : str
        lmms-eval task name.
    visual_tokens : int
        Visual tokens of the unpruned prompt.
    nominal_tokens : float
        The method's nominal budget resolved against ``visual_tokens`` (``visual_tokens`` unpruned).
    equivalent_tokens : float
        Layer-averaged visual tokens of this request, ``sum_l n_l / L``.
    stages : list of (str, int or None, int)
        ``(where, layer, tokens kept)`` per stage (``layer`` ``None``: before the LLM).
    select_ms : float
        Selection time, the batch's divided by its size (ms).
    prefill_ms : float
        Wall time of the prefill forward (vision tower, selection, LLM prefill), the batch's divided
        by its size (ms).
    """

    task: str
    visual_tokens: int
    nominal_tokens: float
    equivalent_tokens: float
    stages: list = field(default_factory=list)
    select_ms: float = 0.0
    prefill_ms: float = 0.0


def sample_equivalent_tokens(report, i: int) -> float:
    """Layer-averaged visual tokens of sample ``i`` of a report's last pruned prefill.

    Parameters
    ----------
    report : PruneReport
        With at least one pruned prefill.
    i : int
        Sample index in that prefill's batch.

    Returns
    -------
    float
        ``sum_l n_l(i) / L`` over the ``L`` decoder layers, with ``n_l(i)`` the visual tokens of sample
        ``i`` entering layer ``l``; equal to ``report.equivalent_tokens`` when every sample kept the same
        numbers (the report takes the maximum over samples otherwise).
    """
    depth = int(report.depth)
    pre = next((s for s in report.stages if s.layer is None), None)
    cur = pre.tokens_after[i] if pre is not None else report.visual_tokens[i]
    by_layer = {s.layer: s.tokens_after[i] for s in report.stages if s.layer is not None}
    total = 0.0
    for li in range(depth):
        cur = by_layer.get(li, cur)
        total += cur
    return total / depth if depth else float(cur)


class Accounting:
    """The records of one rank, and what it skipped.

    Cost: O(1) per request to add; the summary is O(requests).
    """

    def __init__(self):
        self.records: list = []
        self.padding_skipped = 0

    def add_batch(self, *, tasks, padding, visual_tokens, report=None, prefill_ms: float = 0.0) -> None:
        """Add the requests of one batch.

        Parameters
        ----------
        tasks : sequence of str
            Task name of each sample.
        padding : sequence of bool
            Whether each sample is a padding request (lmms-eval's ``__padding_only__``): counted in
            ``padding_skipped``, not recorded.
        visual_tokens : sequence of int
            Visual tokens per sample in the unpruned prompt (used when nothing was pruned).
        report : PruneReport, optional
            The batch's report (``None``: unpruned run).
        prefill_ms : float
            Wall time of the batch's prefill forward (ms).
        """
        n = len(tasks)
        pruned = report is not None and getattr(report, "pruned_calls", 0) and report.stages
        nominal = None
        if pruned and report.nominal_budget is not None:
            nominal = Budget(report.nominal_budget)
        sel = (float(report.select_ms) if pruned else 0.0) / max(n, 1)
        for i in range(n):
            if padding[i]:
                self.padding_skipped += 1
                continue
            if pruned:
                vis = int(report.visual_tokens[i])
                eq = sample_equivalent_tokens(report, i)
                stages = [(s.where, s.layer, int(s.tokens_after[i])) for s in report.stages]
                nom = float(nominal.resolve(vis)) if nominal is not None else float(stages[-1][2])
            else:
                vis = int(visual_tokens[i])
                eq, stages, nom = float(vis), [], float(vis)
            self.records.append(RequestRecord(task=str(tasks[i]), visual_tokens=vis, nominal_tokens=nom,
                                              equivalent_tokens=float(eq), stages=stages, select_ms=sel,
                                              prefill_ms=float(prefill_ms) / max(n, 1)))

    def state(self, *, rank: int = 0, peak_memory_mib: float | None = None, memory_kind: str = "") -> dict:
        """A picklable summary of this rank for :func:`gather_states`."""
        return {"rank": int(rank), "records": [asdict(r) for r in self.records],
                "padding_skipped": int(self.padding_skipped), "peak_memory_mib": peak_memory_mib,
                "memory_kind": memory_kind}


def gather_states(state: dict) -> list:
    """Every rank's :meth:`Accounting.state`, gathered to each rank (one process: ``[state]``).

    Uses ``torch.distributed.all_gather_object`` when a process group is initialised with more than
    one rank (every rank must call this, as lmms-eval's ``clean`` does).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, state)
        return sorted(out, key=lambda s: s["rank"])
    return [state]


def _mean(values):
    return float(np.mean(values)) if len(values) else None


def _stats(records) -> dict:
    """Means over a list of record dicts."""
    out = {
        "requests": len(records),
        "visual_tokens": _mean([r["visual_tokens"] for r in records]),
        "nominal_tokens": _mean([r["nominal_tokens"] for r in records]),
        "equivalent_tokens": _mean([r["equivalent_tokens"] for r in records]),
        "selection_ms": _mean([r["select_ms"] for r in records]),
        "prefill_ms": _mean([r["prefill_ms"] for r in records]),
        "prefill_ms_median": float(np.median([r["prefill_ms"] for r in records])) if records else None,
    }
    stages = {}
    for r in records:
        for idx, (where, layer, tokens) in enumerate(r["stages"]):
            stages.setdefault((idx, where, layer), []).append(tokens)
    out["stages"] = [{"stage": idx, "where": where, "layer": layer, "tokens": float(np.mean(v)),
                      "requests": len(v)} for (idx, where, layer), v in sorted(stages.items(), key=lambda kv: kv[0][0])]
    return out


def summarize(states, meta: dict | None = None) -> dict:
    """The report of a run from every rank's state.

    Parameters
    ----------
    states : list of dict
        :meth:`Accounting.state` of each rank.
    meta : dict, optional
        Run metadata (model, method, budget, model_args, versions) merged into the report.

    Returns
    -------
    dict
        JSON-able: ``format``, the metadata, ``world_size``, ``requests``,
        ``padding_requests_skipped``, mean ``visual_tokens``, ``nominal_tokens``,
        ``equivalent_tokens``, ``stages`` (mean tokens kept per stage), ``selection_ms`` and
        ``prefill_ms`` per request (means; ``prefill_ms_median``), ``peak_memory_mib`` (the largest
        over ranks) and its ``memory_kind``, ``per_task`` (the same means per task) and ``per_rank``.
    """
    records = [r for s in states for r in s["records"]]
    tasks = sorted({r["task"] for r in records})
    peaks = [s["peak_memory_mib"] for s in states if s.get("peak_memory_mib") is not None]
    out = {"format": REPORT_FORMAT, **(meta or {}), "world_size": len(states)}
    out.update(_stats(records))
    out["padding_requests_skipped"] = int(sum(s["padding_skipped"] for s in states))
    out["peak_memory_mib"] = max(peaks) if peaks else None
    out["memory_kind"] = next((s["memory_kind"] for s in states if s.get("memory_kind")), "")
    out["per_task"] = {t: _stats([r for r in records if r["task"] == t]) for t in tasks}
    out["per_rank"] = [{"rank": s["rank"], "requests": len(s["records"]), "padding_skipped": s["padding_skipped"],
                        "peak_memory_mib": s["peak_memory_mib"]} for s in states]
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def one_line(summary: dict) -> str:
    """The report as one line, printed at the end of a run."""
    method = summary.get("method") or "none"
    budget = summary.get("budget")
    stages = " -> ".join(f"{s['where']} {s['tokens']:.1f}" for s in summary.get("stages", []))
    return (f"tokenprune: {method}" + (f" @ {budget}" if budget is not None else "")
            + f" | {summary['requests']} requests on {summary['world_size']} rank(s)"
            + (f" ({summary['padding_requests_skipped']} padding skipped)"
               if summary["padding_requests_skipped"] else "")
            + f" | visual {_fmt(summary['visual_tokens'])}, nominal {_fmt(summary['nominal_tokens'])}, "
              f"equivalent {_fmt(summary['equivalent_tokens'])} tokens"
            + (f" | stages: {stages}" if stages else "")
            + f" | selection {_fmt(summary['selection_ms'], '.2f')} ms, prefill {_fmt(summary['prefill_ms'])} ms "
              f"per request | peak memory {_fmt(summary['peak_memory_mib'], '.0f')} MiB"
            + (f" ({summary['memory_kind']})" if summary.get("memory_kind") else ""))


def write_report(summary: dict, path) -> Path:
    """Write ``summary`` as JSON to ``path`` (a folder: ``<folder>/tokenprune_report.json``).

    Raises
    ------
    OutputPathError
        The folder cannot be created or the file written.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        path = path / REPORT_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"cannot write the tokenprune report to {str(path)!r}: {e}") from e
    return path
