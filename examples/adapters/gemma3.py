"""TOPS at 64 visual tokens on a tiny random-weight Gemma3 (offline; random weights, so the text is noise).

Model: SigLIP tower (256 visual tokens), hybrid sliding-window / full-attention text model.
Run: ``python examples/adapters/gemma3.py``
"""

import tokenprune as tp
from tokenprune.testing.tiny_models import build_tiny_vlm

tiny = build_tiny_vlm("gemma3", num_layers=8)
inputs = tiny.inputs("What is shown in this image?")  # the scikit-learn photo china.jpg
# In-LLM stages work while the sequence fits in the sliding window (512 here); else a StageError.
with tp.prune(tiny.model, "tops", budget=64, cls_fallback="mean_attention") as report:
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)

print(tiny.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
print(report.summary())
print("kept patches after the last stage, (image, crop, row, col):", report.stages[-1].coords[0][:4].tolist(), "...")
