"""Tiny random-weight Hugging Face VLMs, built offline from configs, for tests and examples.

Every family that :mod:`tokenprune.adapters` supports has a builder here: a model with a stock
transformers class (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ...) whose
only difference from a real checkpoint is its size (text hidden 64, a few layers; vision hidden 64 or
32), and a stock processor with a small byte-level BPE tokenizer trained on the fly. Nothing is
downloaded. Images are the two photos shipped with scikit-learn (``china.jpg``, ``flower.jpg``,
640 x 427).

Builders are registered by model type with :func:`tiny_model_builder`, one function per family;
:data:`MODEL_FAMILIES` lists them in registration order, and :func:`build_tiny_vlm` does what every
family shares (seeding, the model from the builder's config, dtype, attention implementation). A new
family adds its builder next to the others.

Examples
--------
>>> from tokenprune.testing.tiny_models import MODEL_FAMILIES, build_tiny_vlm
>>> MODEL_FAMILIES[:3]
('llava', 'llava_next', 'llava_onevision')
>>> tiny = build_tiny_vlm("llava")                                # doctest: +SKIP
>>> inputs = tiny.inputs("What is shown in this image?")          # doctest: +SKIP
>>> out = tiny.model.generate(**inputs, max_new_tokens=5)         # doctest: +SKIP

Notes
-----
Two workarounds are needed with the CPU build of torch (no torchvision): image processors are the
PIL ones, and processors with a ``video_processor`` slot (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
SmolVLM) fail their argument-class check for ``video_processor=None``; :func:`_without_video` skips
that check for ``None``. SmolVLM's processor needs ``num2words``.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

#: Model vocabulary size (>= the tokenizer's length).
VOCAB_SIZE = 512
PAD_ID, BOS_ID, EOS_ID = 3, 1, 2

_SPECIALS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<image>", "<video>",
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A photo of a temple in China with trees and a blue sky.",
    "Describe the image in detail. The flower is pink and the background is green with leaves.",
    "User: How many objects are there? Assistant: There are three objects on the table.",
    "The quick brown fox jumps over the lazy dog. Answer the question using a single word or phrase.",
    "<|im_start|>user What is in the picture?<|im_end|> <|im_start|>assistant The picture shows a building.",
]


@dataclass
class TinyVLM:
    """A tiny model, its processor and how to prompt it.

    Attributes
    ----------
    family : str
        The ``config.model_type``.
    model : transformers.PreTrainedModel
        The ``...ForConditionalGeneration`` model, in eval mode.
    processor : transformers.ProcessorMixin
        Its processor (tokenizer padding side: left).
    template : str
        Prompt template with ``{image}`` (the family's image placeholder) and ``{question}``.
    image_placeholder : str
        What stands for one image in a prompt.
    nested_images : bool
        The processor takes the images as one list per sample (Idefics3, SmolVLM, Gemma3).
    """

    family: str
    model: Any
    processor: Any
    template: str
    image_placeholder: str
    nested_images: bool = False

    def prompt(self, question: str, with_image: bool = True) -> str:
        """The prompt text for ``question`` (with or without the image placeholder)."""
        return self.template.format(image=self.image_placeholder if with_image else "", question=question)

    def inputs(self, questions="What is shown in this image?", images=None, with_image: bool = True):
        """Processor outputs (``return_tensors="pt"``, left padding) for one question or a list.

        Parameters
        ----------
        questions : str or list of str
            One question per sample.
        images : PIL.Image or list, optional
            One image per sample; by default the scikit-learn photos, cycled.
        with_image : bool
            ``False`` builds text-only prompts (no image, no pixel values).
        """
        single = isinstance(questions, str)
        qs = [questions] if single else list(questions)
        texts = [self.prompt(q, with_image) for q in qs]
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        if not with_image:
            return tok(texts, return_tensors="pt", padding=True)
        if images is None:
            photos = sample_images()
            images = [photos[i % len(photos)] for i in range(len(qs))]
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if self.nested_images:
            images = [[im] for im in images]
        return self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)


@functools.lru_cache(maxsize=1)
def sample_images():
    """The two scikit-learn sample photos as RGB ``PIL.Image`` (640 x 427)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return tuple(Image.fromarray(np.asarray(im)) for im in data.images)


def _train_tokenizer():
    """A byte-level BPE (vocab 400) with the special tokens every processor needs; cached on disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(tempfile.gettempdir(), "tokenprune_tiny_tokenizer_v1", "tokenizer.json")
    if os.path.exists(path):
        try:
            return Tokenizer.from_file(path)
        except Exception:  # a corrupt cache is rebuilt
            pass
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def make_tokenizer(extra_special_tokens=None):
    """A ``PreTrainedTokenizerFast`` over the tiny BPE (pad ``<pad>`` = 3, bos 1, eos 2)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens=extra_special_tokens or {})


def _without_video(cls):
    """``cls`` with the argument-class check skipped for ``None`` (see the module notes)."""

    class _Processor(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _Processor.__name__ = cls.__name__
    _Processor.__qualname__ = cls.__qualname__
    return _Processor


def _image_processor(name: str, **kw):
    """The PIL image processor ``name + "Pil"`` when transformers has it (same outputs, no torchvision
    warning), else ``name``."""
    import transformers

    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kw)


def _llama(num_layers, **kw):
    """A tiny ``LlamaConfig`` (hidden 64, 4 heads, 2 key/value heads) with ``kw`` overriding."""
    from transformers import LlamaConfig

    d = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=8192, pad_token_id=PAD_ID,
             bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    d.update(kw)
    return LlamaConfig(**d)


def _clip(image_size, patch_size, num_layers):
    """A tiny ``CLIPVisionConfig`` (hidden 64, 4 heads) with a [CLS] token."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=64)


@dataclass
class TinyParts:
    """What a family's builder returns: everything of a tiny model but its weights.

    Attributes
    ----------
    config : transformers.PretrainedConfig
        The model config.
    model_class : type
        The ``...ForConditionalGeneration`` class built from ``config``.
    processor : transformers.ProcessorMixin
        The processor.
    template : str
        Prompt template with ``{image}`` and ``{question}``.
    image_placeholder : str
        What stands for one image in a prompt.
    nested_images : bool
        The processor takes one list of images per sample.
    """

    config: Any
    model_class: type
    processor: Any
    template: str
    image_placeholder: str = "<image>"
    nested_images: bool = False


#: The builders by model type, in registration order.
_BUILDERS: dict = {}


def tiny_model_builder(model_type: str) -> Callable:
    """Register the decorated function as the builder of the tiny ``model_type`` model.

    The builder is called as ``builder(num_layers=..., vision_layers=..., small=...)`` after the
    random seed is set, and returns a :class:`TinyParts`; it must not draw random numbers (the
    weights are drawn when :func:`build_tiny_vlm` instantiates the model).

    Parameters
    ----------
    model_type : str
        The ``config.model_type`` the builder makes, the name :func:`build_tiny_vlm` takes.

    Returns
    -------
    callable
        A decorator that registers the function and returns it unchanged.

    Raises
    ------
    DuplicateNameError
        ``model_type`` already has a builder.
    """

    def add(fn: Callable) -> Callable:
        from ..errors import DuplicateNameError

        if model_type in _BUILDERS:
            raise DuplicateNameError(f"tiny model {model_type!r} already has a builder "
                                     f"({_BUILDERS[model_type].__name__})")
        _BUILDERS[model_type] = fn
        return fn

    return add


@tiny_model_builder("llava")
def _build_llava(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """LLaVA-1.5: CLIP 336 px / 14 px tower with [CLS] (112 px with ``small``), Llama."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = make_tokenizer()
    size = 112 if small else 336
    cfg = LlavaConfig(vision_config=_clip(size, 14, vision_layers), text_config=_llama(num_layers),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=(size // 14) ** 2)
    ip = _image_processor("CLIPImageProcessor", size={"shortest_edge": size},
                          crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return TinyParts(cfg, LlavaForConditionalGeneration, proc, "USER: {image}\n{question} ASSISTANT:")


@tiny_model_builder("llava_next")
def _build_llava_next(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """LLaVA-NeXT: CLIP tower, anyres crops from five pinpoints, Llama."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tok = make_tokenizer()
    size = 112 if small else 336
    pin = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]
    cfg = LlavaNextConfig(vision_config=_clip(size, 14, vision_layers), text_config=_llama(num_layers),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pin,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = _image_processor("LlavaNextImageProcessor", size={"shortest_edge": size},
                          crop_size={"height": size, "width": size}, image_grid_pinpoints=pin)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return TinyParts(cfg, LlavaNextForConditionalGeneration, proc, "USER: {image}\n{question} ASSISTANT:")


@tiny_model_builder("llava_onevision")
def _build_llava_onevision(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """LLaVA-OneVision: SigLIP tower (no [CLS]), ``anyres_max_9`` packing, Qwen2."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    tok = make_tokenizer()
    size = 112 if small else 384
    pin = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=size, patch_size=14)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                max_position_embeddings=8192, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               image_grid_pinpoints=pin, vision_feature_select_strategy="full",
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    ip = _image_processor("LlavaOnevisionImageProcessor", size={"height": size, "width": size},
                          image_grid_pinpoints=pin)
    proc = _without_video(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=(size // 14) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return TinyParts(cfg, LlavaOnevisionForConditionalGeneration, proc,
                     "<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n")


def _qwen_parts(config_cls, model_cls, processor_cls, vision: dict, num_layers: int) -> TinyParts:
    """Qwen2-VL and Qwen2.5-VL: their shared text config, token ids, processor and prompt."""
    tok = make_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>").items()}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = config_cls(text_config=text, vision_config=vision, **ids)
    ip = _image_processor("Qwen2VLImageProcessor", size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448})
    proc = _without_video(processor_cls)(image_processor=ip, tokenizer=tok, video_processor=None)
    return TinyParts(cfg, model_cls, proc, "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
                     image_placeholder="<|vision_start|><|image_pad|><|vision_end|>")


@tiny_model_builder("qwen2_vl")
def _build_qwen2_vl(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """Qwen2-VL: dynamic-resolution ViT, 2 x 2 merged patches, M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=vision_layers, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return _qwen_parts(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision, num_layers)


@tiny_model_builder("qwen2_5_vl")
def _build_qwen2_5_vl(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """Qwen2.5-VL: windowed ViT (last layer full attention), 2 x 2 merged patches, M-RoPE."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=4,
                  out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[vision_layers - 1])
    return _qwen_parts(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision,
                       num_layers)


def _idefics_parts(config_cls, model_cls, processor, image_processor_name: str, num_layers: int,
                   vision_layers: int) -> TinyParts:
    """Idefics3 and SmolVLM: 224 px tiles of 16 px patches, pixel shuffle by 2 (49 tokens a tile).

    ``processor`` is called with ``image_processor``, ``tokenizer`` and ``image_seq_len``.
    """
    tok = make_tokenizer()
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=224, patch_size=16)
    image_seq_len = (224 // 16) ** 2 // 4  # pixel shuffle with scale factor 2 -> 49 tokens per tile
    cfg = config_cls(vision_config=vision, text_config=_llama(num_layers), scale_factor=2,
                     image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=PAD_ID)
    ip = _image_processor(image_processor_name, do_image_splitting=True, size={"longest_edge": 448},
                          max_image_size={"longest_edge": 224})
    proc = processor(image_processor=ip, tokenizer=tok, image_seq_len=image_seq_len)
    return TinyParts(cfg, model_cls, proc, "User:{image}{question}<end_of_utterance>\nAssistant:",
                     nested_images=True)


@tiny_model_builder("idefics3")
def _build_idefics3(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """Idefics3: image splitting into tiles plus a global image, Llama at ``text_model``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    return _idefics_parts(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                          "Idefics3ImageProcessor", num_layers, vision_layers)


@tiny_model_builder("smolvlm")
def _build_smolvlm(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """SmolVLM: as Idefics3, with SmolVLM's classes (its processor has a video slot)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor

    processor = functools.partial(_without_video(SmolVLMProcessor), video_processor=None)
    return _idefics_parts(SmolVLMConfig, SmolVLMForConditionalGeneration, processor, "SmolVLMImageProcessor",
                          num_layers, vision_layers)


@tiny_model_builder("gemma3")
def _build_gemma3(*, num_layers: int, vision_layers: int, small: bool) -> TinyParts:
    """Gemma3: SigLIP 224 px tower pooled to 256 tokens (64 with ``small``), sliding / full attention."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    tok = make_tokenizer(extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB_SIZE, sliding_window=512,
                layer_types=types, max_position_embeddings=8192, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID)
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=224, patch_size=14)
    n_img = 64 if small else 256  # SigLIP 224 / 14 = 16 x 16 patches, pooled to 8 x 8 or kept
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=n_img,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id)
    ip = _image_processor("Gemma3ImageProcessor", size={"height": 224, "width": 224})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=n_img)
    return TinyParts(cfg, Gemma3ForConditionalGeneration, proc, "<s>user\n{image}{question}\nmodel\n",
                     image_placeholder="<start_of_image>", nested_images=True)


#: The model types that have a tiny builder, in registration order (the order tests are parametrized in).
MODEL_FAMILIES: tuple = tuple(_BUILDERS)


def build_tiny_vlm(family: str, *, num_layers: int = 4, vision_layers: int = 2, attn: str = "sdpa", seed: int = 0,
                   small: bool = False, dtype=None, text_kw: dict | None = None) -> TinyVLM:
    """Build a tiny random-weight VLM of ``family`` and its processor, offline.

    Parameters
    ----------
    family : str
        A model type with a registered builder (see :data:`MODEL_FAMILIES`).
    num_layers : int
        Decoder layers of the text model.
    vision_layers : int
        Layers of the vision tower.
    attn : str
        Attention implementation (``"sdpa"`` or ``"eager"``).
    seed : int
        Seed of the random weights.
    small : bool
        Smaller image resolutions (fewer visual tokens, faster tests): LLaVA 112 px (64 tokens),
        LLaVA-NeXT 112 px crops, LLaVA-OneVision 112 px crops, Gemma3 64 tokens per image (pooled
        2 x 2); the other families are already small.
    dtype : torch.dtype, optional
        Model dtype (default float32).
    text_kw : dict, optional
        Overrides for the text config (e.g. ``sliding_window`` for Gemma3, whose default here is 512).

    Returns
    -------
    TinyVLM

    Raises
    ------
    UnsupportedModelError
        Unknown family.

    Notes
    -----
    Visual tokens for the 640 x 427 sample photo (``small=False``): llava 576, llava_next 2144 (5 crops,
    unpadded, with ``image_newline``), llava_onevision 2709, qwen2_vl / qwen2_5_vl 247 (a 19 x 13
    merged grid), idefics3 / smolvlm 245 (4 tiles and the global image, 49 each), gemma3 256 (64 with
    ``small=True``).
    """
    import torch

    from ..errors import UnsupportedModelError

    builder = _BUILDERS.get(family)
    if builder is None:
        raise UnsupportedModelError(f"no tiny model for family {family!r}; known: {', '.join(_BUILDERS)}")
    torch.manual_seed(seed)
    parts = builder(num_layers=num_layers, vision_layers=vision_layers, small=small)
    cfg = parts.config
    if text_kw:
        sub = cfg.get_text_config()
        for k, v in text_kw.items():
            setattr(sub, k, v)
    model = parts.model_class(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model = model.eval()
    model.set_attn_implementation(attn)
    parts.processor.tokenizer.padding_side = "left"
    return TinyVLM(family=family, model=model, processor=parts.processor, template=parts.template,
                   image_placeholder=parts.image_placeholder, nested_images=parts.nested_images)


@functools.lru_cache(maxsize=None)
def shared_tiny_vlm(family: str, **kw) -> TinyVLM:
    """:func:`build_tiny_vlm`, built once per process and argument set (tests share it; do not modify it)."""
    return build_tiny_vlm(family, **kw)
