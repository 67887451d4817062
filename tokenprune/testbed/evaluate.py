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

from ..errors import OutputPathError, UnsupportedModelError
from ..evaluation.data import VQAExample, write_vqa_jsonl
from . import scenes as S

__all__ = ["CHECKPOINT_DIR", "checkpoint_path", "load_testbed", "held_out_examples", "export_jsonl",
           "HELD_OUT_SIZE", "HELD_OUT_SEED"]

#: Where the trained checkpoint ships inside the package.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
#: Environment variable that points to another testbed checkpoint folder (e.g. one being trained).
CHECKPOINT_ENV = "TOKENPRUNE_TESTBED_CHECKPOINT"
HELD_OUT_SIZE = 1000
HELD_OUT_SEED = 12345


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
    out = Path(out_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputPathError(f"export folder {str(out)!r}: {str(p)!r} is an existing file, not a folder "
                                      f"(testbed.jsonl and images/ are written in a folder)")
            break
    exs = held_out_examples(n=max(n, HELD_OUT_SIZE), seed=seed, limit=n)
    return write_vqa_jsonl(exs, Path(out_dir) / "testbed.jsonl")
