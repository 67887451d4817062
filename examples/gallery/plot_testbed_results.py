"""
Testbed results: accuracy against equivalent tokens
===================================================

``tokenprune eval`` runs every registered method at several budgets on the bundled testbed (a
small LLaVA-style model trained on generated scenes; see :doc:`/testbed`) and writes one record per
(method, budget) to a JSON file. This example reads the results shipped with the documentation
(``docs/_static/testbed_eval.json``, 1,000 held-out questions), prints the tables ``tokenprune eval``
prints and plots accuracy against *equivalent tokens*, the visual tokens averaged over the LLM's
layers, which puts methods that prune before the LLM and inside it on one axis. Nothing is
recomputed here.
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tokenprune as tp
from tokenprune.evaluation.report import format_tables

# %%
# Reading the records
# -------------------
# The JSON file holds ``{"meta": ..., "records": [...]}`` as :func:`tokenprune.evaluation.report.write_json`
# writes it. We look for it next to this example's folder in a checkout (the docs build runs the
# example from its own folder) or next to the installed package (an editable install).


def find_results(name="testbed_eval.json"):
    """The path of ``docs/_static/<name>`` in the tokenprune checkout."""
    try:
        here = Path(__file__).resolve().parent  # examples/gallery
    except NameError:  # run line by line (a notebook, an interactive session)
        here = Path.cwd()
    starts = [here, Path.cwd().resolve(), Path(tp.__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            path = folder / "docs" / "_static" / name
            if path.is_file():
                return path
    raise FileNotFoundError(f"docs/_static/{name} not found above {[str(s) for s in starts]}: "
                            "run this example from a tokenprune checkout")


results = json.loads(find_results().read_text(encoding="utf-8"))
meta, records = results["meta"], results["records"]
print(f"{len(records)} records: {len(meta['methods'])} methods x {len(meta['budgets'])} budgets, "
      f"the evidence oracle and the unpruned model; {meta['n']} questions, "
      f"{meta['n_image_tokens']} visual tokens per image")
print("one record:", {k: records[1][k] for k in ("method", "nominal_tokens", "equivalent_tokens", "accuracy")})

# %%
# The tables
# ----------
# :func:`tokenprune.evaluation.report.format_tables` formats the records as ``tokenprune eval``
# prints them: nominal and equivalent tokens, accuracy and accuracy relative to the unpruned model
# (%), evidence recall (the share of the question's evidence patches kept before the LLM; in
# brackets, at the first stage of methods that prune only inside the LLM), prefill time and
# speed-up, then the accuracy per question family. ``evidence_oracle`` is a reference, not a method:
# it keeps the question's evidence patches first (see :doc:`/testbed`).

print(format_tables(records, title="Testbed, 1,000 held-out questions"))

# %%
# Accuracy against equivalent tokens
# ----------------------------------
# One line per method through its three budgets (44, 22 and 11 of 196 tokens). Methods acting
# inside the LLM (FastV, DART, PyramidDrop, ...) sit to the right of their nominal budget: the first
# layers still see all 196 tokens. :func:`tokenprune.evaluation.report.plot_records` saves the same
# plot to a file; here we draw it in place, with the unpruned accuracy as a dashed line.

base = next(r for r in records if r["method"] == "none")
methods = sorted({r["method"] for r in records} - {"none"})
cmap = plt.get_cmap("tab20")
markers = "os^Dv<>pP*Xh"

fig, ax = plt.subplots(figsize=(8, 5.5))
for i, method in enumerate(methods):
    points = sorted((r["equivalent_tokens"], 100 * r["accuracy"]) for r in records if r["method"] == method)
    x, y = np.array(points).T
    if method == "evidence_oracle":  # the reference, drawn apart from the methods
        ax.plot(x, y, color="grey", linestyle=":", marker="x", label=method)
    else:
        ax.plot(x, y, marker=markers[i % len(markers)], color=cmap(i % 20), label=method, linewidth=1.4,
                markersize=5)
ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1,
           label=f"unpruned ({base['nominal_tokens']} tokens)")
ax.set_xlabel("equivalent visual tokens (average over the LLM's layers)")
ax.set_ylabel("accuracy (%)")
ax.set_title("Testbed: accuracy against equivalent tokens")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, ncol=2, loc="lower right")
fig.tight_layout()
plt.show()

# %%
# Where the accuracy is lost
# --------------------------
# Relative accuracy per question family at 22 of 196 tokens, best methods first. Counting
# questions lose the most on average, colour questions the least.

at_22 = [r for r in records if r["method"] != "none" and r["nominal_tokens"] == 22]
at_22.sort(key=lambda r: -r["accuracy"])
families = list(base["per_family"])
table = np.array([[100 * r["per_family"][f]["relative_accuracy"] for f in families] for r in at_22])

fig, ax = plt.subplots(figsize=(6.5, 6))
image = ax.imshow(table, cmap="viridis", vmin=40, vmax=100, aspect="auto")
ax.set_xticks(range(len(families)), families)
ax.set_yticks(range(len(at_22)), [r["method"] for r in at_22])
for (row, col), value in np.ndenumerate(table):
    ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8,
            color="white" if value < 75 else "black")
fig.colorbar(image, ax=ax, label="accuracy relative to unpruned (%)")
ax.set_title("22 of 196 tokens, by question family")
fig.tight_layout()
plt.show()
