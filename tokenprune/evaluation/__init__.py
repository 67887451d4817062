"""Evaluation: VQA accuracy, local JSONL data, the pruned-vs-unpruned runner, tables, JSON and plots.

``tokenprune eval`` (see :mod:`tokenprune.cli`) is built on this package.
"""

from .data import VQAExample, load_image, read_vqa_jsonl, write_vqa_jsonl
from .vqa import normalize_answer, vqa_accuracy

__all__ = ["VQAExample", "load_image", "read_vqa_jsonl", "write_vqa_jsonl", "normalize_answer", "vqa_accuracy"]
