"""TOPS at 64 visual tokens on a tiny random-weight LLaVA-NeXT (offline; random weights, so the text is noise).

Model: anyres: base image + 4 high-resolution crops, unpadded, with image_newline tokens (2144 visual tokens).
Run: ``python examples/adapters/llava_next.py``
"""

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("llava_next", num_layers=8)
inputs = tiny.inputs("What is shown in this image?")  # the scikit-learn photo china.jpg
# image_newline tokens are protected by default (newlines="keep"): kept, not counted against the budget.
with tp.prune(tiny.model, "tops", budget=64) as report:
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)

print(tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
print(report.summary())
print("kept patches after the last stage, (image, crop, row, col):", report.stages[-1].coords[0][:4].tolist(), "...")
