"""Tests of the lmms-eval integration; they run in a venv of their own (``.ci/run``'s lmms-eval step).

Without lmms-eval installed these tests are not collected, so the core suite never depends on it;
with ``TOKENPRUNE_REQUIRE_LMMS=1`` (CI's lmms-eval step) a missing or broken lmms-eval fails the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REQUIRED = os.environ.get("TOKENPRUNE_REQUIRE_LMMS") == "1"

if importlib.util.find_spec("lmms_eval") is None:
    if REQUIRED:
        raise pytest.UsageError("TOKENPRUNE_REQUIRE_LMMS=1 but lmms_eval is not installed: "
                                "pip install -e '.[lmms,test]' -c .ci/lmms/constraints-cpu.txt")
    collect_ignore_glob = ["test_*.py"]

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """No hub access: datasets and models are local (the tests would hang or fail on a download)."""
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def testbed_task(tmp_path_factory):
    """A task folder with the first 50 testbed held-out questions (``tokenprune_testbed``)."""
    from tokenprune.integrations.lmms.taskfiles import write_testbed_task
    from tokenprune.testbed.evaluate import export_parquet

    out = tmp_path_factory.mktemp("testbed_task")
    write_testbed_task(out, export_parquet(out, n=50))
    return out


@pytest.fixture(scope="session")
def photo_task(tmp_path_factory):
    """A local VQA task (``tiny_photos``) over the two scikit-learn photos, written by ``tokenprune lmms task``."""
    from tokenprune.cli import main
    from tokenprune.testing.tiny_models import sample_images

    data = tmp_path_factory.mktemp("photos")
    (data / "img").mkdir()
    rows = []
    for i, im in enumerate(sample_images()):
        im.save(data / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "What is shown in this image?",
                     "answers": ["temple" if i == 0 else "flower"], "family": "what", "id": f"p{i}"})
    (data / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path_factory.mktemp("photo_task")
    assert main(["lmms", "task", "--data", str(data / "set.jsonl"), "--out", str(out), "--name", "tiny_photos",
                 "--max-new-tokens", "4"]) == 0
    return out
