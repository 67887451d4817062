"""Evaluation examples and the local VQA JSONL format.

JSONL format (one JSON object per line; blank lines and lines starting with ``#`` are skipped):

``image`` (str, required)
    Path to the image file, absolute or relative to the JSONL file's folder.
``question`` (str, required)
    The question, as the user would type it.
``answers`` (list of str, or one str; required)
    Reference answers (VQAv2: the 10 human answers). Scored with :func:`vqa_accuracy`.
``id`` (str or int, optional)
    Identifier kept in the per-example output.
``family`` (str, optional; ``question_type`` is read as a synonym)
    A question family; accuracy is also reported per family.
``evidence`` (list of int, optional)
    Raster-order indices of the image patches that hold the evidence, on the model's patch grid
    (testbed: 14 x 14). With it, evidence recall is reported for pre-LLM stages.

Example line::

    {"image": "images/0001.png", "question": "what color is the circle ?", "answers": ["red"], "family": "color"}
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, ImageError

__all__ = ["VQAExample", "read_vqa_jsonl", "write_vqa_jsonl", "load_image"]

REQUIRED_FIELDS = ("image", "question", "answers")


@dataclass(frozen=True)
class VQAExample:
    """One question about one image.

    Attributes
    ----------
    question : str
        The question text (without any chat template; the evaluator adds the model's template).
    answers : tuple of str
        Reference answers.
    image : str, pathlib.Path, PIL.Image.Image or numpy.ndarray
        A path, a PIL image, or a uint8 ``(H, W, 3)`` array.
    family : str or None
        Question family, for per-family accuracy.
    evidence : numpy.ndarray or None
        Int64 raster-order indices of the evidence patches on the model's patch grid (testbed: 14 x 14).
    id : str or None
        Identifier.
    """

    question: str
    answers: tuple
    image: Any
    family: str | None = None
    evidence: np.ndarray | None = field(default=None, compare=False)
    id: str | None = None


def load_image(image):
    """Return ``image`` as an RGB ``PIL.Image.Image``.

    Parameters
    ----------
    image : str, pathlib.Path, PIL.Image.Image or numpy.ndarray
        A path to an image file, a PIL image, or a uint8 ``(H, W, 3)`` array.

    Returns
    -------
    PIL.Image.Image
        In mode ``"RGB"``.

    Raises
    ------
    ImageError
        The file does not exist, is not a file, or is not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"an image array must have shape (H, W, 3), got {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    path = Path(image)
    if not path.exists():
        raise ImageError(f"image file not found: {str(path)!r}")
    if path.is_dir():
        raise ImageError(f"image path is not a file (it is a directory): {str(path)!r}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {str(path)!r}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {str(path)!r}: {e}") from e


def read_vqa_jsonl(path, *, check_images: bool = True) -> list:
    """Read a local VQA set in the JSONL format described in this module.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.jsonl`` file.
    check_images : bool
        Check now that every image file exists (the error then names the line).

    Returns
    -------
    list of VQAExample
        In file order; image paths resolved against the file's folder.

    Raises
    ------
    DatasetError
        The file is missing, empty or not UTF-8 text (e.g. UTF-16), a line is not a JSON object, a
        required field (``image``, ``question``, ``answers``) is missing, or a field has the wrong
        type. The message names the line number (1-based).
    ImageError
        ``check_images`` and an image file does not exist (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {str(path)!r}")
    base = path.parent
    out = []
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4096]:  # a BOM or NUL bytes: UTF-16/32
        raise DatasetError(f"{path.name}: the file is not UTF-8 text (it looks like UTF-16 or UTF-32); "
                           f"save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted
    except UnicodeDecodeError as e:
        at = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path.name}, line {at}: the file is not UTF-8 text ({e.reason}); "
                           f"save it as UTF-8") from None
    with io.StringIO(text, newline=None) as fh:  # universal newlines, as open() reads
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            where = f"{path.name}, line {lineno}"
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            missing = [f for f in REQUIRED_FIELDS if f not in rec]
            if missing:
                raise DatasetError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)} "
                                   f"(required: {', '.join(REQUIRED_FIELDS)})")
            image, question, answers = rec["image"], rec["question"], rec["answers"]
            if not isinstance(image, str) or not image:
                raise DatasetError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
            if not isinstance(question, str) or not question.strip():
                raise DatasetError(f"{where}: 'question' must be a non-empty string, got {question!r}")
            if isinstance(answers, str):
                answers = [answers]
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
                raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings, got {rec['answers']!r}")
            answers = tuple(str(a) for a in answers)
            family = rec.get("family", rec.get("question_type"))
            if family is not None and not isinstance(family, str):
                raise DatasetError(f"{where}: 'family' must be a string, got {family!r}")
            evidence = rec.get("evidence")
            if evidence is not None:
                if not isinstance(evidence, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             and i >= 0 for i in evidence):
                    raise DatasetError(f"{where}: 'evidence' must be a list of patch indices (ints >= 0), "
                                       f"got {evidence!r}")
                evidence = np.asarray(evidence, dtype=np.int64)
            img_path = Path(image) if os.path.isabs(image) else base / image
            if check_images and not img_path.is_file():
                raise ImageError(f"{where}: image file not found: {str(img_path)!r}")
            ex_id = rec.get("id")
            out.append(VQAExample(question=question.strip(), answers=answers, image=str(img_path), family=family,
                                  evidence=evidence, id=None if ex_id is None else str(ex_id)))
    if not out:
        raise DatasetError(f"{path.name}: no examples (the file is empty)")
    return out


def write_vqa_jsonl(examples, path, *, image_dir: str = "images") -> Path:
    """Write examples in the JSONL format, saving in-memory images as PNG files next to it.

    Parameters
    ----------
    examples : iterable of VQAExample
        Examples; those whose ``image`` is an array or PIL image are saved as
        ``<image_dir>/<index>.png``. ``evidence`` masks are written as index lists.
    path : str or pathlib.Path
        The ``.jsonl`` file to write (its folder is created).
    image_dir : str
        Folder, relative to the file's folder, for saved images.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, ex in enumerate(examples):
            if isinstance(ex.image, (str, Path)):
                image = str(ex.image)
            else:
                image = f"{image_dir}/{i:05d}.png"
                load_image(ex.image).save(path.parent / image)
            rec = {"id": ex.id if ex.id is not None else str(i), "image": image, "question": ex.question,
                   "answers": list(ex.answers)}
            if ex.family is not None:
                rec["family"] = ex.family
            if ex.evidence is not None:
                ev = np.asarray(ex.evidence)
                rec["evidence"] = (np.flatnonzero(ev) if ev.dtype == bool else ev).astype(int).tolist()
            fh.write(json.dumps(rec) + "\n")
    return path
