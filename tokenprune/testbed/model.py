"""The testbed model: a small Hugging Face LLaVA (CLIP-style tower with [CLS] + Llama) and its processor.

The architecture is the stock ``LlavaForConditionalGeneration``; only its size is small. The tokenizer
is word-level over the testbed's closed vocabulary, and the processor is a stock ``LlavaProcessor``,
so the model is loaded with ``from_pretrained`` and run with ``generate`` as any user model is.
"""

from __future__ import annotations

from . import scenes as S


def build_model(vision_hidden=128, vision_layers=4, vision_heads=4, text_hidden=192, text_layers=4, text_heads=4,
                seed=0):
    """A randomly initialised testbed model.

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        With a 224 px / 16 px CLIP vision tower (196 patch tokens plus [CLS]) and a Llama text model.
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
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         pad_token_id=S.PAD_ID)
    return LlavaForConditionalGeneration(config)


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
