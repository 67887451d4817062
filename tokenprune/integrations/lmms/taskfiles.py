"""Writing lmms-eval task folders for the testbed and for local VQA sets (no lmms-eval import).

A task folder holds the data and one YAML that includes the packaged template
(:data:`tokenprune.integrations.lmms.TEMPLATE`); ``lmms-eval --include_path DIR --tasks NAME`` runs it
offline. The YAML's ``metadata`` carries the sha256 of the data file, so ``tokenprune report`` can
tell runs on different data apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ...errors import ConfigError, OutputPathError
from . import TEMPLATE

__all__ = ["TESTBED_TASK", "LOCAL_VQA_TASK", "write_testbed_task", "write_local_vqa_task", "file_sha256"]

#: Task name of the testbed's held-out set.
TESTBED_TASK = "tokenprune_testbed"
#: Default task name of a local VQA set.
LOCAL_VQA_TASK = "tokenprune_local_vqa"
#: Version of the task definitions (bumped when prompts, generation settings or scoring change).
TASK_VERSION = 1.0

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def file_sha256(path) -> str:
    """sha256 of a file (hex; read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _yaml(task: str, builder: str, data_file: str, sha: str, max_new_tokens: int, note: str) -> str:
    """The task YAML (JSON-quoted scalars are valid YAML)."""
    q = json.dumps
    return "\n".join([
        f"# {note}",
        "# Written by tokenprune; run with: lmms-eval --include_path <this folder> --tasks " + task,
        f"include: {q(str(TEMPLATE))}",
        f"task: {q(task)}",
        f"dataset_path: {builder}",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(data_file)}",
        "generation_kwargs:",
        f"  max_new_tokens: {int(max_new_tokens)}",
        "  temperature: 0",
        "  do_sample: false",
        "  num_beams: 1",
        "metadata:",
        f"  version: {TASK_VERSION}",
        f"  data_sha256: {q(sha)}",
        "",
    ])


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"task name {name!r} must be lower-case letters, digits and '_', starting with a letter")
    return name


def write_testbed_task(out_dir, parquet_path) -> Path:
    """Write ``tokenprune_testbed.yaml`` next to a testbed parquet export.

    The answers are one word and the model's single next token, as ``tokenprune eval`` scores the
    testbed (``max_new_tokens: 1``).

    Parameters
    ----------
    out_dir : str or pathlib.Path
        The task folder (holding the parquet file).
    parquet_path : str or pathlib.Path
        The parquet file (:func:`tokenprune.testbed.evaluate.export_parquet`).

    Returns
    -------
    pathlib.Path
        The YAML file.
    """
    out = Path(out_dir)
    parquet = Path(parquet_path)
    rel = parquet.name if parquet.resolve().parent == out.resolve() else str(parquet.resolve())
    path = out / f"{TESTBED_TASK}.yaml"
    path.write_text(_yaml(TESTBED_TASK, "parquet", rel, file_sha256(parquet), 1,
                          "The tokenprune testbed's held-out questions (tokenprune testbed export --format parquet)."),
                    encoding="utf-8")
    return path


def write_local_vqa_task(data, out_dir, name: str = LOCAL_VQA_TASK, max_new_tokens: int = 16) -> tuple:
    """Write a task over a local VQA set in tokenprune's JSONL format.

    The set is read and checked with :func:`tokenprune.evaluation.read_vqa_jsonl` (images must exist);
    a copy of its records with absolute image paths is written as ``<name>.jsonl`` in ``out_dir``
    (the images stay where they are), and ``<name>.yaml`` next to it.

    Parameters
    ----------
    data : str or pathlib.Path
        The ``.jsonl`` file.
    out_dir : str or pathlib.Path
        The task folder (created).
    name : str
        The task name (default ``tokenprune_local_vqa``).
    max_new_tokens : int
        Answer length (default 16, as ``tokenprune eval`` on models other than the testbed).

    Returns
    -------
    (pathlib.Path, int)
        The YAML file and the number of questions.

    Raises
    ------
    DatasetError, ImageError
        From reading the set.
    ConfigError
        A bad task name or ``max_new_tokens``.
    OutputPathError
        ``out_dir`` cannot be created.
    """
    from ...evaluation.data import read_vqa_jsonl

    _check_name(name)
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    examples = read_vqa_jsonl(data)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create the task folder {str(out)!r}: {e}") from None
    jsonl = out / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for i, ex in enumerate(examples):
            rec = {"id": ex.id if ex.id is not None else str(i), "image": str(Path(ex.image).resolve()),
                   "question": ex.question, "answers": list(ex.answers), "family": ex.family}
            fh.write(json.dumps(rec) + "\n")
    path = out / f"{name}.yaml"
    path.write_text(_yaml(name, "json", jsonl.name, file_sha256(jsonl), max_new_tokens,
                          f"Local VQA set {str(Path(data).resolve())} (tokenprune lmms task)."), encoding="utf-8")
    return path, len(examples)
