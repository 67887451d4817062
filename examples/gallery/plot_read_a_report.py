"""
Reading a pruning report
========================

``with tokenprune.prune(model, method) as report:`` binds a :class:`~tokenprune.PruneReport`, filled
at every pruned prefill. Besides its one-line-per-stage summary, it holds for each stage the kept
visual tokens, their positions in the patch grid and the relevance scores the stage selected with.
This example prunes a tiny LLaVA model (random weights, built from a config; see
:ref:`sphx_glr_auto_examples_plot_prune_a_hf_model.py`) with TOPS and reads its report.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("llava", num_layers=4)
model = tiny.model
inputs = tiny.inputs("What is shown in this image?")

with tp.prune(model, "tops", budget=64) as report:
    model(**inputs)  # one prefill; generate() fills the report the same way
print(report.summary())

# %%
# Stages
# ------
# TOPS at a nominal budget of 64 has three stages on LLaVA: 128 tokens kept before the LLM, ranked
# by the vision tower's [CLS] attention, then 64 and 16 inside the LLM, ranked by the attention of
# the last prompt token (the layers of its 32-layer schedule, scaled to this 4-layer model).
# ``report.stages`` holds one :class:`~tokenprune.runtime.report.StageReport` per stage.

for stage in report.stages:
    print(f"stage {stage.index} ({stage.where}): budget {stage.budget}, relevance {stage.relevance}, "
          f"{stage.tokens_before[0]} -> {stage.tokens_after[0]} tokens, {stage.select_ms:.1f} ms")

# %%
# Kept tokens and their coordinates
# ---------------------------------
# Lists in a stage report have one entry per sample of the batch (here one). ``kept`` holds the kept
# tokens as indices into the sample's *original* visual tokens, so the stages can be compared
# directly (each keeps a subset of the previous one); ``coords`` gives each kept token's
# ``(image, crop, row, col)`` in the patch grid, the same for every model family (LLaVA has one
# 24 x 24 grid: image 0, crop 0).

last = report.stages[-1]
kept, coords = last.kept[0], last.coords[0]
print("kept by the last stage:", kept.tolist())
print("(image, crop, row, col) of the first four:", coords[:4].tolist())
earlier = set(report.stages[0].kept[0].tolist())
print("every token of the last stage was kept by the first:", set(kept.tolist()) <= earlier)

# %%
# Scores: what each stage saw
# ---------------------------
# ``scores`` holds, over the original visual tokens, the relevance the stage selected with (float32
# ``[N]``), NaN for the tokens that were no longer candidates. On LLaVA the visual tokens come in
# row-major order over the 24 x 24 grid, so each stage's scores reshape into a heat map, drawn here
# over the image the vision tower saw (the processor's resized and centre-cropped photo, recovered
# from ``pixel_values``). The model's weights are random, so the maps show how to read a report,
# not where a trained model looks.

processor = tiny.processor.image_processor
mean = torch.tensor(processor.image_mean)[:, None, None]
std = torch.tensor(processor.image_std)[:, None, None]
photo = (inputs["pixel_values"][0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # [336, 336, 3]

grid = 24
fig, axes = plt.subplots(1, len(report.stages), figsize=(11, 4))
for ax, stage in zip(axes, report.stages):
    scores = stage.scores[0].reshape(grid, grid).numpy()
    ax.imshow(photo, extent=(0, grid, grid, 0), alpha=0.5)
    heat = ax.imshow(np.ma.masked_invalid(scores), extent=(0, grid, grid, 0), cmap="magma", alpha=0.75)
    rows, cols = stage.coords[0][:, 2], stage.coords[0][:, 3]
    ax.scatter(cols + 0.5, rows + 0.5, s=10, c="cyan", edgecolors="black", linewidths=0.4)
    ax.set_title(f"stage {stage.index}, {stage.where}\n{stage.relevance}: "
                 f"{stage.tokens_before[0]} -> {stage.tokens_after[0]} kept (dots)", fontsize=9)
    ax.set_axis_off()
    fig.colorbar(heat, ax=ax, shrink=0.7)
fig.tight_layout()
plt.show()

# %%
# Equivalent tokens
# -----------------
# ``tokens_per_layer`` lists the visual tokens entering each decoder layer; ``equivalent_tokens`` is
# their average over the layers, the cost measure to compare multi-stage methods with single-stage
# ones at the same budget.

print("tokens per layer:", report.tokens_per_layer)
print("equivalent tokens:", report.equivalent_tokens, "=", sum(report.tokens_per_layer), "/", report.depth)
print("nominal budget:", report.nominal_budget, "| tokens per stage:", report.tokens_per_stage)

# %%
# Notes
# -----
# ``report.notes`` records what is worth knowing about the calls in the block: here, that a
# text-only prompt had nothing to prune. ``calls`` counts the prefills seen and ``pruned_calls``
# those that were pruned; the stages still describe the last pruned one.

with tp.prune(model, "tops", budget=64) as report:
    model(**inputs)
    model(**tiny.inputs("Say hello.", with_image=False))  # no image: the prefill runs unpruned
print("prefills:", report.calls, "| pruned:", report.pruned_calls)
for note in report.notes:
    print("note:", note)
print("stages of the last pruned prefill:", report.tokens_per_stage)
