"""
Pruning a Hugging Face model
============================

:func:`tokenprune.prune` applies a pruning method to a transformers VLM inside a ``with`` block:
``model(...)`` and ``model.generate(...)`` run with the method's stages applied, and leaving the block
restores the model. This example prunes a LLaVA model with three methods that act at different
places (FastV inside the LLM, DivPrune before it, TOPS at both) and compares the visual tokens each
decoder layer sees.

The model is a tiny LLaVA built from a config with random weights
(:func:`tokenprune.testing.tiny_models.build_tiny_vlm`): same classes, processor and prompt format
as a real ``llava-hf`` checkpoint, 576 visual tokens per image, but a 4-layer text model and
nothing downloaded. Its answers are noise; the pruning is the same as on a trained model.
"""

import matplotlib.pyplot as plt

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

# %%
# The model and its inputs
# ------------------------
# ``tiny.inputs`` runs the model's own processor on a question and a photo (scikit-learn's
# ``china.jpg`` by default). With a real checkpoint this is ``LlavaForConditionalGeneration`` and
# ``AutoProcessor`` from ``from_pretrained``.

tiny = build_tiny_vlm("llava", num_layers=4)
model = tiny.model
inputs = tiny.inputs("What is shown in this image?")
print(type(model).__name__, "with", model.config.text_config.num_hidden_layers, "decoder layers")
print({name: tuple(value.shape) for name, value in inputs.items()})

# %%
# Pruning inside a ``with`` block
# -------------------------------
# The method is a registered name (or any composed method); its parameters follow it. FastV keeps
# the ``budget`` visual tokens that the last prompt token attends to most at decoder layer 1, and
# drops the others from layer 2 on.

with tp.prune(model, "fastv", budget=64) as report:
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print("generated", output.shape[1] - inputs["input_ids"].shape[1], "tokens")
print(report.summary())

# %%
# The report describes the last pruned prefill: the stages and where they acted, the visual tokens
# entering each decoder layer, and the *equivalent tokens*, their average over the layers. That is
# the number to compare methods with: FastV at a budget of 64 still runs the first two layers on
# all 576 tokens.
#
# Three methods, one budget
# -------------------------
# The same nominal budget means different things: DivPrune keeps 64 tokens before the LLM; TOPS
# (its LLaVA schedule, scaled to the model's depth) keeps 128 before the LLM, 64 from the middle
# layer and 16 in the last layers.

reports = {}
for name in ["fastv", "divprune", "tops"]:
    with tp.prune(model, name, budget=64) as report:
        model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reports[name] = report
    print(f"{name:>8}: tokens per layer {report.tokens_per_layer}, "
          f"equivalent tokens {report.equivalent_tokens:.0f}")

# %%
# Visual tokens per decoder layer
# -------------------------------

depth = model.config.text_config.num_hidden_layers
width = 0.8 / len(reports)
fig, ax = plt.subplots(figsize=(7, 4))
for i, (name, report) in enumerate(reports.items()):
    x = [layer + (i - 1) * width for layer in range(depth)]
    bars = ax.bar(x, report.tokens_per_layer, width,
                  label=f"{name} (equivalent {report.equivalent_tokens:.0f})")
    ax.bar_label(bars, fontsize=8)
ax.axhline(576, color="black", linestyle="--", linewidth=1, label="unpruned (576)")
ax.set_xticks(range(depth), [f"layer {i}" for i in range(depth)])
ax.set_ylim(0, 680)
ax.set_ylabel("visual tokens entering the layer")
ax.set_title("tokenprune.prune on a 4-layer LLaVA, budget 64")
ax.legend(fontsize=9, loc="upper right")
fig.tight_layout()
plt.show()

# %%
# A stage before the LLM shortens the prompt itself: inside the block, the forward pass returns
# logits for 21 text positions and 64 visual ones. Leaving the block restores the model, and the
# same call sees all 576 visual tokens again.

with tp.prune(model, "divprune", budget=64) as report:
    pruned = model(**inputs)
after = model(**inputs)
print("inside the block: logits for", pruned.logits.shape[1], "positions")
print("after the block: logits for", after.logits.shape[1], "positions, the prompt's",
      inputs["input_ids"].shape[1])
