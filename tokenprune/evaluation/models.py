"""Loading a local Hugging Face vision-language model and building its prompts."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnsupportedModelError

__all__ = ["load_model", "supported_model_types", "build_prompt", "image_grid", "num_image_tokens"]

#: The instruction LLaVA-1.5 uses for short-answer VQA benchmarks (VQAv2, GQA, ...).
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def supported_model_types() -> list:
    """``config.model_type`` values that have a registered adapter (sorted)."""
    from .. import adapters  # noqa: F401  (registers the built-in adapters)
    from ..registry import adapters as registered

    return sorted(registered.list())


def _read_config(path: Path) -> dict:
    """The ``config.json`` of a model folder as a dict (raises :class:`UnsupportedModelError`)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UnsupportedModelError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        with open(cfg_file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"cannot read {str(cfg_file)!r}: {e}") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UnsupportedModelError(f"{str(cfg_file)!r} has no 'model_type'; not a supported model")
    return cfg


def load_model(path, *, dtype=None):
    """Load a local vision-language model and its processor with ``from_pretrained``.

    Parameters
    ----------
    path : str or pathlib.Path
        A local folder with ``config.json``, weights (safetensors) and the processor files, e.g. the
        bundled testbed checkpoint or a LLaVA-1.5 download.
    dtype : torch.dtype, optional
        Weights dtype (default: the checkpoint's, fp32 for the testbed).

    Returns
    -------
    (transformers.PreTrainedModel, transformers.ProcessorMixin)
        The model in eval mode and its processor.

    Raises
    ------
    UnsupportedModelError
        The path does not exist, is not a model folder, its ``model_type`` has no tokenprune adapter
        (the message lists the supported types), or transformers cannot load it.
    """
    import transformers

    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"model path not found: {str(path)!r} (pass a local model folder)")
    if not path.is_dir():
        raise UnsupportedModelError(f"model path {str(path)!r} is a file; pass the model's folder")
    cfg = _read_config(path)
    supported = supported_model_types()
    if cfg["model_type"] not in supported:
        raise UnsupportedModelError(f"model type {cfg['model_type']!r} at {str(path)!r} is not supported; "
                                    f"supported types: {', '.join(supported) or '(none registered)'}")
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(path), **kw)
        processor = transformers.AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"transformers could not load the model at {str(path)!r}: {e}") from e
    model.eval()
    return model, processor


def _has_chat_template(processor) -> bool:
    """Whether the processor (or its tokenizer) has a chat template."""
    if getattr(processor, "chat_template", None):
        return True
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(tok, "chat_template", None))


def build_prompt(processor, question: str, template: str | None = None) -> str:
    """The prompt text for one question about one image.

    Parameters
    ----------
    processor : transformers.ProcessorMixin
        The model's processor.
    question : str
        The question.
    template : str, optional
        A format string with ``{question}`` and optionally ``{image}`` (the image placeholder token).

    Returns
    -------
    str
        With ``template``: the formatted template. Otherwise, if the processor has a chat template:
        one user turn holding the image and ``question`` followed by the LLaVA-1.5 short-answer
        instruction (``"Answer the question using a single word or phrase."``), with the generation
        prompt. Otherwise (the testbed): ``"<bos><image> question"``.

    Raises
    ------
    ValueError
        ``template`` lacks ``{question}``.
    """
    image_token = getattr(processor, "image_token", None) or "<image>"
    if template is not None:
        if "{question}" not in template:
            raise ValueError(f"a prompt template needs a '{{question}}' field, got {template!r}")
        return template.format(question=question, image=image_token)
    if _has_chat_template(processor):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": f"{question}\n{SHORT_ANSWER_SUFFIX}"}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(getattr(processor, "tokenizer", None), "bos_token", None) or ""
    return f"{bos}{image_token} {question}"


def image_grid(model) -> tuple | None:
    """``(rows, cols)`` of the vision tower's patch grid for a square-input model, else ``None``."""
    vc = getattr(model.config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return size // patch, size // patch
    return None


def num_image_tokens(inputs, model) -> int:
    """Image placeholder tokens in the first prompt of a processed batch."""
    image_id = getattr(model.config, "image_token_id", None)
    if image_id is None:
        image_id = getattr(model.config, "image_token_index", None)
    return int((inputs["input_ids"][0] == image_id).sum())


def with_generation_positions(model, inputs: dict) -> dict:
    """``inputs`` plus the ``position_ids`` that ``generate`` would build for them.

    A plain forward on a left-padded batch numbers the positions from the first column, padding
    included, so a sample's positions depend on how much padding the batch gave it; ``generate``
    numbers each sample's real tokens from 0 (from the attention mask; M-RoPE models build their 3-D
    positions the same way). A scoring forward must see what ``generate`` sees, or its answers (and
    methods that rank post-RoPE keys, such as DART) change with the batch composition.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model; its own ``_prepare_position_ids_for_generation`` is used when it has one.
    inputs : dict
        Processor output with ``input_ids`` and ``attention_mask``.

    Returns
    -------
    dict
        A new dict; ``inputs`` itself when it already has ``position_ids`` or no ``attention_mask``,
        or when the model's forward takes no ``position_ids``.
    """
    import inspect

    import torch

    mask = inputs.get("attention_mask")
    if inputs.get("position_ids") is not None or mask is None or "input_ids" not in inputs:
        return inputs
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return inputs
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        pos = prepare(inputs["input_ids"], dict(inputs))
    else:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if not isinstance(pos, torch.Tensor):
        return inputs
    return {**inputs, "position_ids": pos}
