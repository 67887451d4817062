"""Prune the visual tokens of a Hugging Face VLM: every supported family on a tiny model, or a checkpoint.

Runs ``generate`` inside ``tokenprune.prune(model, "tops", budget=64)`` and prints the answer, the
report and the first kept patches ``(image, crop, row, col)``. Everything is offline:

* by default, for every model family with a tiny builder (``tokenprune.testing.tiny_models``), a
  tiny random-weight model is built from configs (random weights, so the text is noise);
* ``--family NAME`` (repeatable) runs only those families;
* ``--model DIR`` loads a real checkpoint from a local directory with ``from_pretrained`` and
  prompts it through the processor's chat template.

The first TOPS stage reads the vision tower's [CLS] attention where the tower has one (LLaVA,
LLaVA-NeXT); elsewhere ``prune`` falls back by itself (``cls_fallback="auto"``) to the attention each
patch receives (OneVision, Idefics3, SmolVLM, Gemma3) or to the similarity to the prompt's text
(Qwen2-VL, Qwen2.5-VL), and the report's stage line names the signal used.

Run::

    python examples/prune_hf_model.py                          # every family, tiny models
    python examples/prune_hf_model.py --family llava_next      # one family
    python examples/prune_hf_model.py --model ~/models/llava-1.5-7b-hf --image photo.jpg --budget 128
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import tokenprune as tp
from tokenprune.adapters import get_model_adapter
from tokenprune.testing.tiny_models import MODEL_FAMILIES, build_tiny_vlm, sample_images


def run(model, inputs, decode, args) -> None:
    """Generate under pruning and print the answer and the report."""
    adapter = get_model_adapter(model)
    notes = type(adapter).layout_notes.replace("``", "") or "see its docstring"
    print(f"adapter: {adapter.name} ({notes})")
    with warnings.catch_warnings():  # the automatic [CLS] fallback warns; the report's note says the same
        warnings.simplefilter("ignore", UserWarning)
        session = tp.prune(model, args.method, budget=args.budget)
    with session as report:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("answer:", decode(out[:, inputs["input_ids"].shape[1]:]))
    print(report.summary())
    print("kept patches after the last stage, (image, crop, row, col):",
          report.stages[-1].coords[0][:4].tolist(), "...")


def run_tiny(family: str, args) -> None:
    """One family on its tiny random-weight model (8 decoder layers, so TOPS's layers fit)."""
    tiny = build_tiny_vlm(family, num_layers=8)
    images = None if args.image is None else load_image(args.image)
    inputs = tiny.inputs(args.question, images=images)  # default image: the scikit-learn photo china.jpg
    run(tiny.model, inputs, tiny.processor.batch_decode, args)


def run_checkpoint(args) -> None:
    """A real checkpoint from a local directory, prompted through its processor's chat template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    image = load_image(args.image) if args.image is not None else sample_images()[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(args.device)
    run(model, inputs, lambda ids: processor.batch_decode(ids, skip_special_tokens=True), args)


def load_image(path: str):
    """An RGB ``PIL.Image`` from a file."""
    from PIL import Image

    return Image.open(path).convert("RGB")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--family", action="append", choices=MODEL_FAMILIES,
                     help="a model family on its tiny model (repeatable; default: every family)")
    src.add_argument("--model", metavar="DIR", help="a local checkpoint directory (from_pretrained)")
    p.add_argument("--method", default="tops", help="a registered method name (default: tops)")
    p.add_argument("--budget", type=int, default=64, help="visual tokens kept (default: 64)")
    p.add_argument("--question", default="What is shown in this image?")
    p.add_argument("--image", metavar="PATH", help="an image file (default: the scikit-learn photo china.jpg)")
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--device", default="cpu", help="with --model (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="with --model (default: float32)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the example; returns the exit status (1 if a family failed)."""
    args = parse_args(argv)
    if args.model is not None:
        run_checkpoint(args)
        return 0
    failed = []
    for family in args.family or MODEL_FAMILIES:
        print(f"\n=== {family} " + "=" * (60 - len(family)))
        try:
            run_tiny(family, args)
        except tp.TokenPruneError as exc:  # e.g. SmolVLM's block merger on transformers 5.20.1-5.20.2
            print(f"{family}: {type(exc).__name__}: {exc}")
            failed.append(family)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
