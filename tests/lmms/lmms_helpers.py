"""Helpers of the lmms-eval tests (imported by the test modules of this folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ROOT = Path(__file__).resolve().parents[2]


def run_lmms(model, tasks, include_path, *, model_args="", limit=None, **kw) -> dict:
    """lmms-eval's ``simple_evaluate`` in this process, with samples logged."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=str(include_path))
    return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit, task_manager=tm,
                           log_samples=True, verbosity="WARNING", **kw)


def predictions(results: dict, task: str) -> list:
    """Per-document predictions of a run, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["vqa_accuracy"]["prediction"] for s in samples]


def run_cli(args, *, cwd, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run a command with the offline environment; fails the test with its output when it fails."""
    full_env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment."""
    return str(Path(sys.executable).parent / name)
