"""TOPS at 64 visual tokens on a tiny random-weight LLaVA-OneVision (offline; random weights, so the text is noise).

Model: SigLIP tower (no [CLS]), anyres_max_9 packing with image_newline tokens, Qwen2 text model.
Run: ``python examples/adapters/llava_onevision.py``
"""

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("llava_onevision", num_layers=8)
inputs = tiny.inputs("What is shown in this image?")  # the scikit-learn photo china.jpg
# SigLIP has no [CLS] token: TOPS's Stage I relevance is the attention each patch receives instead.
with tp.prune(tiny.model, "tops", budget=64, cls_fallback="mean_attention") as report:
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)

print(tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
print(report.summary())
print("kept patches after the last stage, (image, crop, row, col):", report.stages[-1].coords[0][:4].tolist(), "...")
