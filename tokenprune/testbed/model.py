"""The testbed model: a small Hugging Face LLaVA (CLIP-style tower with [CLS] + Llama) and its processor.

The architecture is the stock ``LlavaForConditionalGeneration``; only its size is small. The tokenizer
is word-level over the testbed's closed vocabulary, and the processor is a stock ``LlavaProcessor``,
so the model is loaded with ``from_pretrained`` and run with ``generate`` as any user model is.
"""

from __future__ import annotations

from . import scenes as S


def sincos_position_2d(grid: int, dim: int):
    """Fixed 2-D sine-cosine position embedding of a ``grid x grid`` patch raster (as in MAE).

    Half of the ``dim`` channels encode the column, half the row, each as sines and cosines at
    ``dim / 4`` frequencies from 1 down to 1/10000 per patch; the slow ones are monotone across the grid.

    Returns
    -------
    torch.Tensor
        float32 ``[grid * grid, dim]`` in raster (row-major) order; every row has norm ``sqrt(dim / 2)``.

    Raises
    ------
    ValueError
        ``dim`` is not a multiple of 4.
    """
    import torch

    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    idx = torch.arange(grid * grid)
    col, row = (idx % grid).double(), (idx // grid).double()
    parts = []
    for coord in (col, row):
        angle = coord[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, 1).float()


def build_model(vision_hidden=128, vision_layers=4, vision_heads=4, text_hidden=192, text_layers=4, text_heads=4,
                feature_layers=(-1,), seed=0):
    """A randomly initialised testbed model.

    Parameters
    ----------
    feature_layers : tuple of int
        Vision hidden states the projector reads (``vision_feature_layer``), concatenated when more
        than one; ``(0, -1)`` gives the LLM the tower's input (patch plus position embedding) beside
        its output.

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        With a 224 px / 16 px CLIP vision tower (196 patch tokens plus [CLS]) whose patch position
        embeddings start as :func:`sincos_position_2d`, and a Llama text model.

    Raises
    ------
    ValueError
        ``vision_hidden`` is not a multiple of 4 (the sine-cosine embedding splits it in four).
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=S.IMAGE_SIZE, patch_size=S.PATCH_SIZE, projection_dim=vision_hidden,
                              num_channels=3)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=int(text_hidden * 8 / 3 // 32 * 32),
                       num_hidden_layers=text_layers, num_attention_heads=text_heads,
                       num_key_value_heads=text_heads, vocab_size=64, max_position_embeddings=512,
                       pad_token_id=S.PAD_ID, bos_token_id=S.BOS_ID, eos_token_id=S.EOS_ID,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=S.IMAGE_ID,
                         image_seq_length=S.NUM_PATCHES, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default",
                         vision_feature_layer=feature_layers[0] if len(feature_layers) == 1 else list(feature_layers),
                         pad_token_id=S.PAD_ID)
    model = LlavaForConditionalGeneration(config)
    add_patch_positions(model)
    return model


def feature_layers(config) -> list:
    """``config.vision_feature_layer`` as a list of ints (one entry for a single layer)."""
    layers = config.vision_feature_layer
    return [layers] if isinstance(layers, int) else list(layers)


def projected_features(model, vision_output):
    """The visual tokens ``get_image_features`` makes (strategy "default"), from a tower output.

    Training calls the tower once (``output_hidden_states=True``) for both the auxiliary losses and the
    LLM's input; this is the stock computation on that output.

    Returns
    -------
    torch.Tensor
        ``[B, 196, text_hidden]`` in the projector's dtype.
    """
    import torch

    hidden = torch.cat([vision_output.hidden_states[i][:, 1:] for i in feature_layers(model.config)], -1)
    return model.model.multi_modal_projector(hidden)


def add_patch_positions(model, scale: float = 1.0) -> None:
    """Add ``scale`` times :func:`sincos_position_2d` to the tower's patch position embeddings, in place.

    A tower trained only on position-invariant objectives lets its learned position embeddings
    collapse (the testbed checkpoint trained without this: norm 0.9 against 28 for an object patch's
    embedding), and then nothing but the LLM's 1-D RoPE over raster order says where a patch is.
    """
    import torch

    emb = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        emb.weight[1:] += scale * sincos_position_2d(S.GRID, emb.weight.shape[1]).to(emb.weight.dtype)


def reset_language_model(model, seed: int = 0):
    """A model with ``model``'s vision tower and projector and a freshly initialised language model.

    For retraining the LLM on top of a vision side that already encodes what it needs (a language model
    stuck in a shortcut does not leave it by training on).

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        A new model with ``model.config``; ``model`` is not changed.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    fresh = LlavaForConditionalGeneration(model.config)
    fresh.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    fresh.model.multi_modal_projector.load_state_dict(model.model.multi_modal_projector.state_dict())
    return fresh


def widen_projector(model, feature_layers) -> None:
    """Make a single-layer model's projector read ``feature_layers``, in place, computing the same function.

    The columns of ``linear_1`` for the layers added are zero, so outputs are unchanged until training
    moves them.

    Raises
    ------
    ValueError
        The model already reads several layers, or ``feature_layers`` does not contain its current one.
    """
    import torch

    old = model.config.vision_feature_layer
    if not isinstance(old, int):
        raise ValueError(f"the projector already reads layers {old}")
    layers = [int(v) for v in feature_layers]
    if old not in layers:
        raise ValueError(f"feature layers {layers} do not include the model's current layer {old}")
    lin = model.model.multi_modal_projector.linear_1
    vh = model.config.vision_config.hidden_size
    new = torch.nn.Linear(vh * len(layers), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        i = layers.index(old)
        new.weight[:, i * vh:(i + 1) * vh] = lin.weight
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    model.model.multi_modal_projector.linear_1 = new
    model.config.vision_feature_layer = layers


def build_tokenizer():
    """Word-level tokenizer over :data:`tokenprune.testbed.scenes.VOCAB`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=S.WORD_TO_ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_processor():
    """A stock ``LlavaProcessor`` (CLIP image processor at 224 px and the word-level tokenizer)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": S.IMAGE_SIZE},
                                         crop_size={"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE},
                                         do_center_crop=True, do_resize=True, resample=3, do_convert_rgb=True,
                                         image_mean=list(S.CLIP_MEAN), image_std=list(S.CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=S.PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def prompt_text(question_words) -> str:
    """The prompt string the testbed processor expects for a question."""
    return "<s><image> " + " ".join(question_words)
