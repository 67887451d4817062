"""Task functions of tokenprune's offline lmms-eval tasks (``!function utils.*`` in the template).

Documents carry the fields of the local VQA format (:mod:`tokenprune.evaluation.data`): ``image`` (a
decoded image, an ``{"bytes", "path"}`` record, or an absolute file path), ``question``,
``answers`` (list of str) and optionally ``id`` and ``family``. Answers are scored with
:func:`tokenprune.evaluation.vqa_accuracy`, the metric of ``tokenprune eval``.

Examples
--------
>>> doc = {"question": "what color is the circle ?", "answers": ["red"], "family": "color", "id": "q1"}
>>> doc_to_text(doc, {"pre_prompt": "", "post_prompt": ""})
'what color is the circle ?'
>>> r = process_results(doc, ["Red."])["vqa_accuracy"]
>>> r["score"], aggregate_accuracy([r, {"score": 0.0}])
(1.0, 0.5)
"""

from __future__ import annotations

import io

from tokenprune.evaluation.data import load_image
from tokenprune.evaluation.vqa import vqa_accuracy

__all__ = ["doc_to_visual", "doc_to_text", "doc_to_target", "process_results", "aggregate_accuracy"]


def doc_to_visual(doc) -> list:
    """The document's image as a one-element list of RGB PIL images.

    Raises
    ------
    ImageError
        A path that does not exist or is not an image.
    """
    from PIL import Image

    image = doc["image"]
    if isinstance(image, dict):  # a parquet image column read without decoding
        if image.get("bytes"):
            with Image.open(io.BytesIO(image["bytes"])) as im:
                return [im.convert("RGB")]
        image = image.get("path")
    return [load_image(image)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """``pre_prompt + question + post_prompt`` (both empty by default: the model adds its template)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{str(doc['question']).strip()}{kw.get('post_prompt', '')}"


def _answers(doc) -> list:
    answers = doc["answers"]
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def doc_to_target(doc) -> str:
    """The first reference answer."""
    return _answers(doc)[0]


def process_results(doc, results) -> dict:
    """``{"vqa_accuracy": {"score", "prediction", "id", "family"}}`` for one answered document."""
    pred = results[0] if results else ""
    if isinstance(pred, (list, tuple)):  # a multi-round answer: the last round
        pred = pred[-1] if pred else ""
    return {"vqa_accuracy": {"score": vqa_accuracy(str(pred), _answers(doc)), "prediction": str(pred),
                             "id": doc.get("id"), "family": doc.get("family")}}


def aggregate_accuracy(results) -> float:
    """Mean VQA accuracy in [0, 1] over the documents."""
    return sum(float(r["score"]) for r in results) / len(results) if results else float("nan")
