"""The testbed evaluation: the bundled model, the held-out questions and their evidence.

:func:`held_out_examples` turns :func:`tokenprune.testbed.scenes.held_out_set` into
:class:`~tokenprune.evaluation.VQAExample` objects (image array, question, answer, family and the
evidence patches), and :func:`load_testbed` loads the bundled checkpoint with ``from_pretrained``.
``tokenprune eval`` with no arguments runs every registered method on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, OutputPathError, UnsupportedModelError
from ..evaluation.data import VQAExample, write_vqa_jsonl
from . import scenes as S

__all__ = ["CHECKPOINT_DIR", "checkpoint_path", "load_testbed", "held_out_examples", "export_jsonl",
           "export_parquet", "HELD_OUT_SIZE", "HELD_OUT_SEED", "PARQUET_NAME"]

#: Where the trained checkpoint ships inside the package.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
#: Environment variable that points to another testbed checkpoint folder (e.g. one being trained).
CHECKPOINT_ENV = "TOKENPRUNE_TESTBED_CHECKPOINT"
HELD_OUT_SIZE = 1000
HELD_OUT_SEED = 12345
#: File name of the parquet export (:func:`export_parquet`).
PARQUET_NAME = "testbed.parquet"


def checkpoint_path() -> Path:
    """The testbed checkpoint folder: ``$TOKENPRUNE_TESTBED_CHECKPOINT`` if set, else the bundled one.

    Raises
    ------
    UnsupportedModelError
        No checkpoint there (the message says how to train one).
    """
    env = os.environ.get(CHECKPOINT_ENV)
    path = Path(env) if env else CHECKPOINT_DIR
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"no testbed checkpoint at {str(path)!r}"
            + (f" (from ${CHECKPOINT_ENV})" if env else "")
            + "; train one with `tokenprune testbed train --out DIR` and pass `--model DIR`")
    return path


def load_testbed(path=None):
    """Load the testbed model and processor with ``from_pretrained``.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A checkpoint folder (default: :func:`checkpoint_path`).

    Returns
    -------
    (transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor)

    Raises
    ------
    UnsupportedModelError
        No checkpoint, or not a model folder.
    """
    from ..evaluation.models import load_model

    return load_model(checkpoint_path() if path is None else path)


def held_out_examples(n: int = HELD_OUT_SIZE, seed: int = HELD_OUT_SEED, limit: int | None = None) -> list:
    """The held-out testbed questions as evaluation examples.

    Parameters
    ----------
    n : int
        Size of the held-out set (default 1000; the set depends on ``n`` and ``seed``).
    seed : int
        Its seed (default 12345, disjoint from training's seeds).
    limit : int, optional
        Keep only the first ``limit`` examples (the first ``limit`` of the same fixed set).

    Returns
    -------
    list of VQAExample
        ``image`` a uint8 ``(224, 224, 3)`` array, ``answers`` one word, ``family`` one of
        ``color, shape, exists, count, spatial``, ``evidence`` the raster indices (14 x 14 grid) of
        the patches holding the question's evidence (empty for an "is there" question whose answer
        is no and no object shares the colour or the shape), ``id`` ``"heldout-<i>"``.
    """
    pairs = S.held_out_set(n=n, seed=seed, limit=limit)
    return [VQAExample(question=q.text, answers=(q.answer,), image=scene.image, family=q.family,
                       evidence=np.flatnonzero(S.evidence_mask(scene, q)), id=f"heldout-{i}")
            for i, (scene, q) in enumerate(pairs)]


def export_jsonl(out_dir, n: int = 50, seed: int = HELD_OUT_SEED) -> Path:
    """Write the first ``n`` held-out questions as a local VQA JSONL set with PNG images.

    Returns
    -------
    pathlib.Path
        ``out_dir / "testbed.jsonl"`` (images in ``out_dir / "images"``).

    Raises
    ------
    OutputPathError
        ``out_dir``, or a folder above it, is an existing file (checked before any scene is drawn).
    """
    _check_export_folder(out_dir, "testbed.jsonl and images/")
    exs = held_out_examples(n=max(n, HELD_OUT_SIZE), seed=seed, limit=n)
    return write_vqa_jsonl(exs, Path(out_dir) / "testbed.jsonl")


def _check_export_folder(out_dir, what: str) -> None:
    """Raise :class:`OutputPathError` if ``out_dir`` or a folder above it is an existing file."""
    out = Path(out_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputPathError(f"export folder {str(out)!r}: {str(p)!r} is an existing file, not a folder "
                                      f"({what} are written in a folder)")
            break


def export_parquet(out_dir, n: int = HELD_OUT_SIZE, seed: int = HELD_OUT_SEED) -> Path:
    """Write the first ``n`` held-out questions as one parquet file with the images inside.

    The columns are those of the local VQA format (``id``, ``image``, ``question``, ``answers``,
    ``family``, ``evidence``), with ``image`` a Hugging Face ``datasets.Image`` column (PNG bytes), so
    ``datasets.load_dataset("parquet", ...)`` and lmms-eval read it as images.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        The folder (created).
    n : int
        Questions (default: all 1,000; the first ``n`` of the same fixed set).
    seed : int
        Seed of the held-out set.

    Returns
    -------
    pathlib.Path
        ``out_dir / "testbed.parquet"`` (about 57 KB per question).

    Raises
    ------
    OutputPathError
        ``out_dir``, or a folder above it, is an existing file.
    ConfigError
        The ``datasets`` package is not installed (``pip install 'tokenprune[lmms]'``).
    """
    _check_export_folder(out_dir, PARQUET_NAME)
    try:
        import datasets
    except ImportError:
        raise ConfigError("the parquet export needs the datasets package: pip install 'tokenprune[lmms]' "
                          "(or pip install datasets)") from None
    from PIL import Image

    exs = held_out_examples(n=max(n, HELD_OUT_SIZE), seed=seed, limit=n)
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")) if hasattr(datasets, "List")
        else datasets.Sequence(datasets.Value("string")),
        "family": datasets.Value("string"),
        "evidence": datasets.List(datasets.Value("int64")) if hasattr(datasets, "List")
        else datasets.Sequence(datasets.Value("int64"))})
    data = {"id": [ex.id for ex in exs], "image": [Image.fromarray(ex.image) for ex in exs],
            "question": [ex.question for ex in exs], "answers": [list(ex.answers) for ex in exs],
            "family": [ex.family for ex in exs], "evidence": [[int(i) for i in ex.evidence] for ex in exs]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PARQUET_NAME
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path
