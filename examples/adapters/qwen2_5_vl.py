"""TOPS at 64 visual tokens on a tiny random-weight Qwen2.5-VL (offline; random weights, so the text is noise).

Model: windowed ViT, 2 x 2 merged patches (247 visual tokens), 3-D M-RoPE positions.
Run: ``python examples/adapters/qwen2_5_vl.py``
"""

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("qwen2_5_vl", num_layers=8)
inputs = tiny.inputs("What is shown in this image?")  # the scikit-learn photo china.jpg
# "tops" by name picks the adapter's default schedule for Qwen2.5-VL (layers 12 and 16 of 28).
with tp.prune(tiny.model, "tops", budget=64, cls_fallback="text_similarity") as report:
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)

print(tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
print(report.summary())
print("kept patches after the last stage, (image, crop, row, col):", report.stages[-1].coords[0][:4].tolist(), "...")
