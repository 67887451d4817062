"""TOPS at 64 visual tokens on a tiny random-weight LLaVA-1.5 (offline; random weights, so the text is noise).

Model: CLIP 336 px / 14 px tower with [CLS] (576 visual tokens) and a Llama text model.
Run: ``python examples/adapters/llava.py``
"""

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("llava", num_layers=8)
inputs = tiny.inputs("What is shown in this image?")  # the scikit-learn photo china.jpg
with tp.prune(tiny.model, "tops", budget=64) as report:
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)

print(tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
print(report.summary())
print("kept patches after the last stage, (image, crop, row, col):", report.stages[-1].coords[0][:4].tolist(), "...")
