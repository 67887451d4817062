"""Pruned generation (with the KV cache) equals an independent layer-by-layer reference without a cache.

The reference knows nothing of the hooks: it embeds prompt + generated tokens, scatters the unpruned
image features, then runs the decoder layers by hand on the tokens the report says were kept (every
token before the first stage's cut, the kept ones after), with an explicit causal mask, original
(or compacted) positions, and no cache. Each decoding step's logits must match ``generate``'s.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from tokenprune.adapters import get_model_adapter
from tokenprune.runtime import prune  # noqa: E402
from tokenprune.criteria import Relevance  # noqa: E402
from tokenprune.methods.compose import PruningMethod, Stage  # noqa: E402
from tokenprune.testing.tiny_models import shared_tiny_vlm  # noqa: E402

NEW = 4
K = 2  # the in-LLM stage's layer


def _method(first_relevance, positions):
    return PruningMethod(stages=(
        Stage(objective=Relevance(), selector="topk", budget=24, relevance=first_relevance, positions=positions),
        Stage(objective=Relevance(), selector="topk", budget=8, layer=K, relevance="text_attention",
              raters="all_text_mean", positions=positions),
    ))


@torch.no_grad()
def reference_logits(model, inputs, kept0, kept1, gen_ids, positions):
    """Logits of the last token of prompt + ``gen_ids``, computed layer by layer without a cache."""
    ad = get_model_adapter(model)
    base, text = ad.base, ad.text_model
    ids = inputs["input_ids"]
    L = ids.shape[1]
    full = torch.cat([ids, gen_ids], 1)
    T = full.shape[1]
    params = inspect.signature(base.get_image_features).parameters
    feats = ad.flatten_features(base.get_image_features(
        **{k: v for k, v in inputs.items() if k in params}).pooler_output)
    img_pos = (ids[0] == ad.image_token_id).nonzero().flatten()
    emb = base.get_input_embeddings()(full.clamp(max=ad.text_config.vocab_size - 1)).clone()
    emb[0, img_pos] = feats.to(emb.dtype)
    newline = getattr(base, "image_newline", None)
    protected = (feats == newline).all(-1).nonzero().flatten() if newline is not None else img_pos[:0]
    text_pos = torch.tensor([p for p in range(L) if p not in set(img_pos.tolist())], dtype=torch.long)
    gen_pos = torch.arange(L, T)

    def seq(kept):
        keep = torch.cat([kept, protected]).unique()
        return torch.cat([torch.sort(torch.cat([text_pos, img_pos[keep]])).values, gen_pos])

    s0, s1 = seq(kept0), seq(kept1)
    if ad.mrope:
        p3, _ = base.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                    image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        pos_all = torch.cat([p3, (p3.max() + 1 + torch.arange(T - L)).view(1, 1, -1).expand(3, 1, -1)], -1)
    else:
        pos_all = torch.arange(T)[None]

    def rope(hs, s, compact):
        if ad.mrope:
            return text.rotary_emb(hs, pos_all[:, :, s])
        p = torch.arange(len(s))[None] if compact else pos_all[:, s]
        return text.rotary_emb(hs, p)

    compact = positions == "compact"
    hs = emb[:, s0]
    cos_sin = rope(hs, s0, compact)
    mask = torch.ones(len(s0), len(s0), dtype=torch.bool).tril()[None, None]
    sub = torch.searchsorted(s0, s1)  # s1 inside s0
    for i, layer in enumerate(ad.layers):
        if i == K:
            hs = hs[:, sub]
            cos_sin = rope(hs, s1, compact) if compact else tuple(t[:, sub] for t in cos_sin)
            mask = mask[:, :, sub][:, :, :, sub]
        hs = layer(hs, attention_mask=mask, position_embeddings=cos_sin, position_ids=None, past_key_values=None,
                   use_cache=False)
    return model.lm_head(text.norm(hs)[:, -1])


@pytest.mark.parametrize("family,positions", [
    ("llava", "preserve"), ("llava", "compact"), ("llava_next", "preserve"), ("llava_onevision", "preserve"),
    ("qwen2_vl", "preserve"), ("qwen2_5_vl", "preserve"), ("idefics3", "preserve"),
])
def test_pruned_generate_equals_reference(family, positions):
    t = shared_tiny_vlm(family, small=True, num_layers=4)
    m, inputs = t.model, t.inputs()
    ad = get_model_adapter(m)
    first = "cls_attention" if ad.has_cls else "text_similarity"
    with prune(m, _method(first, positions)) as report:
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept0, kept1 = report.stages[0].kept[0], report.stages[1].kept[0]
    assert len(kept0) == 24 and len(kept1) == 8
    gen = out.sequences[:, inputs["input_ids"].shape[1]:]
    for step in range(NEW):
        ref = reference_logits(m, inputs, kept0, kept1, gen[:, :step], positions)
        torch.testing.assert_close(out.logits[step], ref, atol=1e-5, rtol=1e-5)
