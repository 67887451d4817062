"""CDPruner's instruction relevance through ``prune(..., text_encoder=TextEncoder(...))``: a tiny random
CLIP (and SigLIP) built from a config, checked against a manual computation of the official rule
(Theia-4869/CDPruner, commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864): the vision tower's
feature-layer patch states through ``post_layernorm`` and the CLIP ``visual_projection``, the CLIP
text embedding of the instruction cut into segments of ``max_position_embeddings`` tokens, the
negated mean cosine; per crop on LLaVA-NeXT, with the budget split over the crops."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.selectors.dpp import equal_shares
from tokenprune.testing.tiny_models import make_tokenizer, shared_tiny_vlm

SEGMENT = 16  # the tiny CLIP's max_position_embeddings: instructions longer than this are cut into segments


def tiny_clip(vision_width=64, seed=1):
    """A tiny random ``CLIPModel`` whose vision width matches the tiny VLMs' tower (64)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=SEGMENT, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=3),
                     vision_config=dict(hidden_size=vision_width, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=112, patch_size=14),
                     projection_dim=16)
    return CLIPModel(cfg).eval()


def tiny_siglip(vision_width=64, seed=2):
    """A tiny random ``SiglipModel`` (vision width 64, as LLaVA-OneVision's tiny tower)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(text_config=dict(vocab_size=512, hidden_size=vision_width, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=SEGMENT,
                                        pad_token_id=3, bos_token_id=1, eos_token_id=2),
                       vision_config=dict(hidden_size=vision_width, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=112, patch_size=14))
    return SiglipModel(cfg).eval()


def manual_text_embeddings(clip, tok, text):
    """The official text side: tokenize the whole instruction, zero-pad to a multiple of the segment
    length (mask 0), one CLIP text embedding per segment."""
    enc = tok(text=text, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = (-ids.shape[1]) % SEGMENT
    ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).reshape(-1, SEGMENT)
    mask = torch.cat([mask, mask.new_zeros(1, pad)], 1).reshape(-1, SEGMENT)
    return clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def manual_relevance(model, clip, tok, inputs, text, negate=True):
    """float32 ``[n_crops, P]``: -mean_m cos(visual_projection(post_layernorm(patch state)), t_m), the
    patches being the vision tower's feature-layer states without [CLS] (the official encode_images)."""
    ikw = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    out = model.model.get_image_features(**ikw, return_dict=True)
    states = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    e = clip.visual_projection(_post_layernorm(model.model.vision_tower)(states))
    t = manual_text_embeddings(clip, tok, text)
    sim = (e / e.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).t()
    r = sim.mean(-1)
    return -r if negate else r


def _post_layernorm(tower):
    """The tower's ``post_layernorm`` (``CLIPVisionModel`` holds it directly or in ``.vision_model``)."""
    return getattr(getattr(tower, "vision_model", tower), "post_layernorm")


def projected_features(model, inputs):
    ikw = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    pooler = model.model.get_image_features(**ikw, return_dict=True).pooler_output
    return torch.cat(list(pooler)) if isinstance(pooler, (list, tuple)) else pooler.reshape(-1, pooler.shape[-1])


@pytest.mark.parametrize("question", ["What is shown in this image?",
                                      "Describe the image in detail. How many objects are there and what colour "
                                      "is the flower on the left of the table?"])  # one and several segments
def test_llava_relevance_is_the_clip_text_towers(question):
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    model, clip, tok = tiny.model, tiny_clip(), make_tokenizer()
    inputs = tiny.inputs(question)
    enc = tp.TextEncoder(clip, tok, instruction=question)
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=16, text_encoder=enc) as report:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        want = manual_relevance(model, clip, tok, inputs, question)[0]
        feats = projected_features(model, inputs)
    stage = report.stages[0]
    assert stage.relevance == "text_encoder"
    assert any("stage 0: relevance 'text_encoder': CLIPModel" in n for n in report.notes)
    torch.testing.assert_close(stage.scores[0], want, rtol=1e-5, atol=1e-6)  # what the selector received
    # and the kept set is the DPP's on the projected features with that relevance
    sel = tp.select("cdpruner", feats[None], relevance=want[None], budget=16)
    assert stage.kept[0].tolist() == sel.indices[0].tolist()


def test_default_instruction_is_the_decoded_text_after_the_image():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    model, clip, tok = tiny.model, tiny_clip(), make_tokenizer()
    inputs = tiny.inputs("What is shown in this image?")
    ids = inputs["input_ids"][0]
    last = int((ids == model.config.image_token_id).nonzero().max())
    text = tiny.processor.tokenizer.decode(ids[last + 1:].tolist(), skip_special_tokens=True).strip()
    assert text.startswith("What is shown") and text.endswith("ASSISTANT:")
    enc = tp.TextEncoder(clip, tok, prompt_tokenizer=tiny.processor)  # a processor: its tokenizer decodes
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=16, text_encoder=enc) as report:
        model(**inputs)
        want = manual_relevance(model, clip, tok, inputs, text)[0]
    torch.testing.assert_close(report.stages[0].scores[0], want, rtol=1e-5, atol=1e-6)
    # a callable trims it (e.g. to the question alone, as the official evaluation passes it)
    enc = tp.TextEncoder(clip, tok, prompt_tokenizer=tiny.processor, instruction=lambda s: s.split(" ASSISTANT")[0])
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=16, text_encoder=enc) as report:
        model(**inputs)
        want = manual_relevance(model, clip, tok, inputs, "What is shown in this image?")[0]
    torch.testing.assert_close(report.stages[0].scores[0], want, rtol=1e-5, atol=1e-6)


def test_batch_reads_each_prompts_own_instruction():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    model, clip, tok = tiny.model, tiny_clip(), make_tokenizer()
    questions = ["What is shown in this image?", "Describe the flower."]
    inputs = tiny.inputs(questions)
    enc = tp.TextEncoder(clip, tok, instruction=questions)
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=16, text_encoder=enc) as report:
        model(**inputs)
        for b, q in enumerate(questions):
            one = {k: v[b:b + 1] for k, v in inputs.items() if k == "pixel_values"}
            want = manual_relevance(model, clip, tok, one, q)[0]
            torch.testing.assert_close(report.stages[0].scores[b], want, rtol=1e-5, atol=1e-6)


def test_sign_follows_the_encoder_and_can_be_set():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    model, clip, tok = tiny.model, tiny_clip(), make_tokenizer()
    inputs = tiny.inputs("What is shown in this image?")
    runs = {}
    for negate in (None, False):
        enc = tp.TextEncoder(clip, tok, instruction="a flower", negate=negate)
        with torch.no_grad(), tp.prune(model, "cdpruner", budget=16, text_encoder=enc) as report:
            model(**inputs)
        runs[negate] = report.stages[0].scores[0]
    assert tp.TextEncoder(clip, tok, instruction="x").negate is True  # CLIP: negated, as the official code
    torch.testing.assert_close(runs[False], -runs[None])


def test_without_a_text_encoder_the_report_names_the_fallback():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    with torch.no_grad(), tp.prune(tiny.model, "cdpruner", budget=16) as report:
        tiny.model(**tiny.inputs("What is shown in this image?"))
    assert report.stages[0].relevance == "text_similarity"
    assert any("fallback" in n and "input embeddings" in n for n in report.notes)


def test_llava_next_relevance_and_selection_per_crop():
    tiny = shared_tiny_vlm("llava_next", small=True, num_layers=2)
    model, clip, tok = tiny.model, tiny_clip(), make_tokenizer()
    inputs = tiny.inputs("What is shown in this image?")
    enc = tp.TextEncoder(clip, tok, instruction="a temple")
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=1.0, text_encoder=enc) as full:
        model(**inputs)
        want = manual_relevance(model, clip, tok, inputs, "a temple")  # [n_crops, P], one row per crop
    s = full.stages[0]
    coords, kept = s.coords[0], s.kept[0]  # every patch token (newline tokens are protected)
    side = 112 // 14
    crops = coords[:, 1]
    assert len(torch.unique(crops)) > 2
    manual = want[crops, coords[:, 2] * side + coords[:, 3]]
    torch.testing.assert_close(s.scores[0][kept], manual, rtol=1e-5, atol=1e-6)
    # a budget of 20 tokens: split evenly over the crops, a DPP in each
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=20, text_encoder=enc) as report:
        model(**inputs)
    got = report.stages[0].coords[0][:, 1]
    sizes = [int((crops == c).sum()) for c in torch.unique(crops)]
    assert [int((got == c).sum()) for c in torch.unique(crops)] == equal_shares(sizes, 20)


def test_siglip_text_encoder_on_onevision():
    tiny = shared_tiny_vlm("llava_onevision", small=True, num_layers=2)
    model, sig, tok = tiny.model, tiny_siglip(), make_tokenizer()
    inputs = tiny.inputs("What is shown in this image?")
    enc = tp.TextEncoder(sig, tok, instruction="a temple")
    assert enc.kind == "siglip" and enc.negate is False  # the sign flip is documented for CLIP only
    with torch.no_grad(), tp.prune(model, "cdpruner", budget=1.0, text_encoder=enc) as report:
        model(**inputs)
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             return_dict=True)
        x = _post_layernorm(model.model.vision_tower)(out.hidden_states[model.config.vision_feature_layer])
        head = sig.vision_model.head
        # SigLIP's pooling head on one patch alone: attention weight 1, so out_proj(v_proj(x)), then its MLP
        v = torch.nn.functional.linear(x, *[p[2 * x.shape[-1]:] for p in (head.attention.in_proj_weight,
                                                                           head.attention.in_proj_bias)])
        h = head.attention.out_proj(v)
        e = h + head.mlp(head.layernorm(h))
        ids = tok(text="a temple", return_tensors="pt")["input_ids"]  # SigLIP: pad ids to the length, no mask
        ids = torch.cat([ids, ids.new_full((1, SEGMENT - ids.shape[1]), tok.pad_token_id)], 1)
        t = sig.get_text_features(input_ids=ids).pooler_output
    s = report.stages[0]
    assert s.relevance == "text_encoder"
    coords, kept = s.coords[0], s.kept[0]
    side = 112 // 14
    r = (torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).t()).mean(-1)
    # OneVision may scale the high-resolution grid down: compare the tokens it kept at full resolution
    exact = (coords[:, 1] == 0)
    manual = r[coords[exact, 1], coords[exact, 2] * side + coords[exact, 3]]
    torch.testing.assert_close(s.scores[0][kept[exact]], manual, rtol=1e-4, atol=1e-5)


def test_misuse_raises_errors_that_name_the_problem():
    tiny = shared_tiny_vlm("llava", small=True, num_layers=2)
    clip, tok = tiny_clip(), make_tokenizer()
    enc = tp.TextEncoder(clip, tok, instruction="x")
    with pytest.raises(tp.ConfigError, match="TextEncoder"):
        tp.prune(tiny.model, "cdpruner", text_encoder=clip)
    with pytest.raises(tp.ConfigError, match="no stage before the LLM"):
        tp.prune(tiny.model, "divprune", text_encoder=enc)
    with pytest.raises(tp.ConfigError, match="prompt_tokenizer"):
        tp.TextEncoder(clip, tok)
    with pytest.raises(tp.ConfigError, match="get_text_features"):
        tp.TextEncoder(clip.text_model, tok, instruction="x")
    qwen = shared_tiny_vlm("qwen2_vl", small=True, num_layers=2)
    with pytest.raises(tp.UnsupportedModelError, match="feature layer"):
        tp.prune(qwen.model, "cdpruner", text_encoder=enc)


def official_dpp_map(features, raw_relevance, k):
    """The official selection (greedy MAP of the DPP ``L = diag(q) F diag(q)``, ``F`` the cosine
    similarity of the features, ``q = (r - min + 1e-6) / (max - min)``), written plainly: each step
    picks the token whose Schur complement ``L_ii - L_iS L_SS^-1 L_Si`` (the determinant ratio) is
    largest, in float64, without the incremental Cholesky factor of the official fast greedy."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    r = raw_relevance.double()
    q = (r - r.min() + 1e-6) / (r.max() - r.min())
    L = q[:, None] * (x @ x.T) * q[None, :]
    picks = []
    for _ in range(k):
        if picks:
            S = torch.tensor(picks)
            sol = torch.linalg.solve(L[S][:, S], L[S])  # L_SS^-1 L_S.
            gain = L.diagonal() - (L[S] * sol).sum(0)
        else:
            gain = L.diagonal().clone()
        gain[picks] = float("-inf")
        picks.append(int(torch.argmax(gain)))
    return picks


@pytest.mark.parametrize("seed", [0, 1])
def test_dpp_map_keeps_the_official_set_at_realistic_shapes(seed):
    """Given the same relevance, CDPruner's selection core keeps the official kept set (N = 576,
    D = 1024, K = 64 / 128 / 192; the greedy picks do not depend on K, so one run to 192 serves all)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(24, 1024, generator=gen) * 2
    x = centers[torch.randint(0, 24, (576,), generator=gen)] + torch.randn(576, 1024, generator=gen)
    r = -torch.rand(576, generator=gen)  # the official relevance is a negated mean cosine
    want = official_dpp_map(x, r, 192)
    for k in (64, 128, 192):
        sel = tp.select("cdpruner", x[None], relevance=r[None], budget=k)
        assert sel.indices[0].tolist() == sorted(want[:k])
