"""lmms-eval integration: the ``tokenprune`` model, its accounting report and offline task templates.

Install with ``pip install 'tokenprune[lmms]'`` (see the "Reproduce a paper table" docs page for a
CPU machine). lmms-eval finds the model through the ``lmms_eval.models`` entry point, which calls
:func:`manifest`; tasks live in folders brought in with ``--include_path``:

- ``tokenprune testbed export --format parquet --out DIR`` writes the testbed's held-out questions as
  ``DIR/testbed.parquet`` and the task ``DIR/tokenprune_testbed.yaml``;
- ``tokenprune lmms task --data FILE.jsonl --out DIR`` writes a task over a local VQA set in the
  JSONL format of :mod:`tokenprune.evaluation.data` (``tokenprune_local_vqa`` unless ``--name``).

Both use the template and functions in ``tasks/`` of this package (VQA accuracy as
:func:`tokenprune.evaluation.vqa_accuracy` computes it), so lmms-eval scores them as ``tokenprune
eval`` does.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_NAME", "MODEL_CLASS_PATH", "TASKS_DIR", "TEMPLATE", "manifest"]

#: The name lmms-eval knows the model by (``--model tokenprune``).
MODEL_NAME = "tokenprune"
#: Where the model class lives.
MODEL_CLASS_PATH = "tokenprune.integrations.lmms.model.TokenPruneLMM"
#: The packaged task files: the VQA template and its functions.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
#: The task template every generated task includes.
TEMPLATE = TASKS_DIR / "_tokenprune_vqa_template_yaml"


def manifest():
    """The ``lmms_eval.models`` entry point: the manifest of the ``tokenprune`` model.

    Returns
    -------
    lmms_eval.models.registry_v2.ModelManifest
        Model id ``tokenprune``, a simple (non-chat) model at :data:`MODEL_CLASS_PATH`.

    Raises
    ------
    ImportError
        lmms-eval is not installed (lmms-eval calls this only when it is).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
