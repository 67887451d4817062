"""lmms-eval's scores on the testbed equal ``tokenprune eval``'s, question by question.

The bundled testbed checkpoint, its first 50 held-out questions exported as the ``tokenprune_testbed``
task, and the unpruned model, TOPS and DivPrune at 22 tokens: the accuracy lmms-eval reports (and each
answer) equals what the evaluation runner behind ``tokenprune eval --limit 50`` computes.
"""

from __future__ import annotations

import pytest
from .lmms_helpers import predictions, run_lmms

from tokenprune.evaluation.models import load_model
from tokenprune.evaluation.runner import Evaluator, build_method
from tokenprune.testbed.evaluate import checkpoint_path, held_out_examples

CKPT = str(checkpoint_path())
N = 50


@pytest.fixture(scope="module")
def runner_results():
    """``{method: ConfigResult}`` of the runner, as ``tokenprune eval --limit 50 --budgets 22`` builds them."""
    model, processor = load_model(CKPT)
    ev = Evaluator(model, processor, held_out_examples(limit=N), progress=False)
    out = {"none": ev.run(None, name="none")}
    for m in ("tops", "divprune"):
        out[m] = ev.run(build_method(m, 22, 0), name=m, budget=22)
    return out


@pytest.mark.parametrize("method", ["none", "tops", "divprune"])
def test_lmms_eval_accuracy_equals_tokenprune_eval(method, testbed_task, runner_results):
    args = f"pretrained={CKPT}" + ("" if method == "none" else f",method={method},budget=22")
    res = run_lmms("tokenprune", ["tokenprune_testbed"], testbed_task, model_args=args, limit=N, batch_size=10)
    ref = runner_results[method]
    acc = res["results"]["tokenprune_testbed"]["vqa_accuracy,none"]
    print(f"{method}: lmms-eval {acc:.4f}, tokenprune eval {ref.accuracy:.4f}")
    assert predictions(res, "tokenprune_testbed") == ref.predictions
    assert acc == pytest.approx(ref.accuracy, abs=1e-12)
