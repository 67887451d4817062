"""CDPruner's instruction relevance: a vision-language encoder's text tower on the instruction, its
image side on the vision tower's feature-layer patches.

:class:`TextEncoder` wraps a CLIP or SigLIP model (loaded with ``from_pretrained``), its tokenizer,
and how the instruction is read from the prompt. Passed to :func:`tokenprune.prune` as
``text_encoder=``, it gives the before-LLM stages whose relevance is ``"text_similarity"`` (CDPruner)
the relevance of the paper instead of the fallback (the cosine similarity of the projected features to
the LLM's input embeddings of the prompt text). The stage report's ``relevance`` then says
``"text_encoder"``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, StageError, UnsupportedModelError

__all__ = ["TextEncoder"]

#: What the report says a ``"text_encoder"`` relevance is, with the kind of encoder.
KINDS = ("clip", "siglip")


class TextEncoder:
    """The text tower of a vision-language encoder, for the instruction relevance of CDPruner.

    For each visual token ``i`` and the instruction's text embeddings ``t_1 .. t_M``,

    .. math:: r_i = s \\cdot \\frac{1}{M} \\sum_{m=1}^{M} \\cos(e_i, t_m)

    where ``e_i`` is the patch's embedding in the encoder's joint space, computed from the MLLM's own
    vision tower: its hidden state at the feature layer (``vision_feature_layer``, the [CLS] token
    dropped or kept as the model's features), through the tower's ``post_layernorm`` and the
    encoder's image projection (CLIP: ``visual_projection``; SigLIP: its attention-pooling ``head``
    applied to the patch alone). ``t_m`` are the encoder's text embeddings (``get_text_features``) of
    the instruction split into segments of ``max_position_embeddings`` tokens (one segment for
    instructions up to 77 CLIP tokens), and ``s = -1`` for CLIP (``negate=None``) or ``+1``. The stage
    then min-max normalises ``r`` over its candidates (:class:`~tokenprune.criteria.LogDet`), so
    only the order and the spacing of the scores matter.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``CLIPModel`` or a ``SiglipModel`` (or any model with ``get_text_features`` and either a
        ``visual_projection`` or a ``vision_model.head``), the encoder the MLLM's vision tower comes
        from (LLaVA-1.5 / LLaVA-NeXT: ``openai/clip-vit-large-patch14-336``), loaded with
        ``from_pretrained``. It runs where it is: the vision states and the instruction are moved to
        its device (it may stay on the CPU while the MLLM runs on a GPU).
    tokenizer : transformers tokenizer or processor
        The encoder's tokenizer (``CLIPTokenizer``, ``CLIPTokenizerFast``, ``SiglipTokenizer``) or a
        processor holding one (``CLIPProcessor``: its ``.tokenizer`` is used).
    prompt_tokenizer : transformers tokenizer or processor, optional
        The MLLM's tokenizer (or processor), to decode the prompt's text tokens into the instruction.
        Needed unless ``instruction`` is a string or a list of strings.
    instruction : None, str, list of str or callable, optional
        The text the encoder reads. ``None`` (default): the prompt's text after the last image token,
        decoded with ``prompt_tokenizer`` (special tokens skipped), stripped. A callable
        ``f(text) -> str`` transforms that decoded text (e.g. to keep only the question, as the
        official code, which passes the raw question without the chat template). A string is used for
        every prompt; a list gives one per prompt of the batch.
    negate : bool or None
        Use ``-cos`` (``True``) or ``cos`` (``False``). ``None`` (default): negate for CLIP, as the
        official LLaVA code does, not for SigLIP (see Notes).

    Raises
    ------
    ConfigError
        A model without ``get_text_features`` or without an image projection, a tokenizer that is not
        callable, an ``instruction`` of another type, or neither ``prompt_tokenizer`` nor a string
        instruction.

    Notes
    -----
    Checked against Theia-4869/CDPruner at commit ``9541616c40fcd5625de1cdb8ea6c33c129eb7864``
    (``llava/model/multimodal_encoder/clip_encoder.py`` and ``llava/model/llava_arch.py``,
    ``encode_images``): the image embeddings are the feature-layer patch states (``hidden_states[-2]``
    without [CLS] on LLaVA) through ``post_layernorm`` and ``visual_projection``; the text embeddings
    are ``CLIPTextModelWithProjection`` outputs of the instruction tokenized whole, zero-padded to a
    multiple of 77 tokens and cut into segments; the relevance is ``(-sim).mean(-1)`` over the
    segments, then ``(r - min + 1e-6) / (max - min)`` (the criterion's normalisation here). Why the
    minus: the authors answer in their issue tracker (issues #9, #14) that they observed it only with
    CLIP as used in LLaVA: on the penultimate-layer patch states, the patches of the object the
    instruction names are the *least* similar to its CLIP text embedding (the same sign flip is in TRIM,
    which CDPruner acknowledges, and is reported by later work on CLIP patch-text similarity). The
    released code covers LLaVA-1.5 and LLaVA-NeXT only (CLIP); no code for Qwen2.5-VL or InternVL3 is
    released (their issue #20), so for SigLIP towers we do not negate by default; pass
    ``negate=True`` to try it. On LLaVA-NeXT the official code computes the relevance per crop
    (every crop's patches against the same text embeddings), normalises it over all the crops of the
    image at once, and selects in each crop; the runtime computes it for every crop as well and
    :func:`~tokenprune.methods.cdpruner.cdpruner` selects per crop.

    The instruction: the official evaluation passes the question alone (``line["text"]`` with
    ``"\\nAnswer the question using a single word or phrase."`` removed), not the chat template;
    by default we pass the prompt's text after the image, which includes the template's tail (e.g.
    ``" ASSISTANT:"``). Pass ``instruction=`` to match it exactly.

    Cost: one text-encoder forward per prompt and per prefill (``O(M · 77²)``), and ``O(n_crops · T ·
    D · C)`` for the patch embeddings.

    Examples
    --------
    >>> import tokenprune as tp                                                    # doctest: +SKIP
    >>> from transformers import CLIPModel, CLIPTokenizer                          # doctest: +SKIP
    >>> enc = tp.TextEncoder(CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir),
    ...                      prompt_tokenizer=processor.tokenizer)                 # doctest: +SKIP
    >>> with tp.prune(model, "cdpruner", budget=64, text_encoder=enc) as report:  # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=16)
    >>> report.stages[0].relevance                                                 # doctest: +SKIP
    'text_encoder'
    """

    def __init__(self, model, tokenizer, *, prompt_tokenizer=None, instruction=None, negate: bool | None = None):
        if not callable(getattr(model, "get_text_features", None)):
            raise ConfigError(f"text_encoder model must have get_text_features (a CLIPModel or SiglipModel), got "
                              f"{type(model).__name__}")
        if getattr(model, "visual_projection", None) is not None:
            kind = "clip"
        elif getattr(getattr(model, "vision_model", None), "head", None) is not None:
            kind = "siglip"
        else:
            raise ConfigError(f"text_encoder model {type(model).__name__} has no image projection (CLIP's "
                              "visual_projection or SigLIP's vision_model.head): pass the whole CLIPModel or "
                              "SiglipModel, not only its text tower")
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        if not callable(tok):
            raise ConfigError(f"tokenizer must be a tokenizer or a processor holding one, got "
                              f"{type(tokenizer).__name__}")
        ptok = None if prompt_tokenizer is None else getattr(prompt_tokenizer, "tokenizer", prompt_tokenizer)
        if ptok is not None and not callable(getattr(ptok, "decode", None)):
            raise ConfigError(f"prompt_tokenizer must be a tokenizer or a processor holding one (with decode), got "
                              f"{type(prompt_tokenizer).__name__}")
        fixed = isinstance(instruction, str) or (isinstance(instruction, (list, tuple))
                                                 and all(isinstance(t, str) for t in instruction))
        if instruction is not None and not fixed and not callable(instruction):
            raise ConfigError(f"instruction must be None, a string, a list of strings or a callable, got "
                              f"{type(instruction).__name__}")
        if ptok is None and not fixed:
            raise ConfigError("the text encoder reads the instruction from the prompt: pass prompt_tokenizer= (the "
                              "MLLM's tokenizer or processor, to decode the prompt's text), or instruction='...'")
        if negate is not None and not isinstance(negate, bool):
            raise ConfigError(f"negate must be None (CLIP: True, SigLIP: False), True or False, got {negate!r}")
        self.model = model
        self.tokenizer = tok
        self.prompt_tokenizer = ptok
        self.instruction = list(instruction) if isinstance(instruction, (list, tuple)) else instruction
        self.kind = kind
        self.negate = (kind == "clip") if negate is None else negate

    def __repr__(self) -> str:
        return (f"TextEncoder({type(self.model).__name__}, kind={self.kind!r}, negate={self.negate}, "
                f"instruction={'from the prompt' if self.instruction is None else 'given'})")

    @property
    def description(self) -> str:
        """One line for the report: the encoder and the sign."""
        sign = "-cos" if self.negate else "cos"
        return (f"{type(self.model).__name__} ({self.kind}): mean {sign} of each patch's projected feature-layer "
                f"state to the instruction's text embeddings")

    # -- text -------------------------------------------------------------------------------------
    def instructions(self, ids: torch.Tensor, image: torch.Tensor, attention_mask) -> list:
        """The instruction text of each prompt of a batch.

        Parameters
        ----------
        ids : torch.Tensor
            long ``[B, L]`` prompt ids.
        image : torch.Tensor
            bool ``[B, L]``: the image tokens.
        attention_mask : torch.Tensor or None
            ``[B, L]`` (padding is 0).

        Returns
        -------
        list of str
            ``B`` strings.

        Raises
        ------
        StageError
            A list ``instruction`` of another length than the batch, or a callable that does not
            return a string.
        """
        B, L = ids.shape
        if isinstance(self.instruction, str):
            return [self.instruction] * B
        if isinstance(self.instruction, list):
            if len(self.instruction) != B:
                raise StageError(f"TextEncoder got {len(self.instruction)} instructions for a batch of {B} prompts")
            return list(self.instruction)
        valid = torch.ones_like(image) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(L, device=ids.device)[None]
        last = pos.masked_fill(~image, -1).amax(1, keepdim=True)
        after = valid & (pos > last) & ~image
        out = []
        for b in range(B):
            text = self.prompt_tokenizer.decode(ids[b][after[b]].tolist(), skip_special_tokens=True).strip()
            if callable(self.instruction):
                text = self.instruction(text)
                if not isinstance(text, str):
                    raise StageError(f"the instruction callable must return a string, got {type(text).__name__}")
            out.append(text)
        return out

    @torch.no_grad()
    def encode_text(self, texts: list, device=None) -> list:
        """float32 ``[M_b, C]`` text embeddings per text: the instruction tokenized whole and cut into
        segments of ``max_position_embeddings`` tokens (the last one padded), one embedding each.

        CLIP pads with id 0 and a zero attention mask, as the official code (the pooled EOS token sees
        no padding either way); SigLIP, trained on ``padding="max_length"`` without a mask and pooling
        the last position, pads with the tokenizer's ``pad_token_id`` and gets no mask.
        """
        model = self.model
        cfg = getattr(model.config, "text_config", model.config)
        seg = int(getattr(cfg, "max_position_embeddings", 77))
        dev = device if device is not None else next(model.parameters()).device
        out = []
        for text in texts:
            enc = self.tokenizer(text=text, return_tensors="pt")
            ids = enc["input_ids"]
            mask = enc.get("attention_mask") if self.kind == "clip" else None
            if self.kind == "clip" and mask is None:
                mask = torch.ones_like(ids)
            n = ids.shape[1]
            pad = (-n) % seg if n else seg
            pad_id = 0 if self.kind == "clip" else int(getattr(self.tokenizer, "pad_token_id", None) or 0)
            ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], 1).reshape(-1, seg)
            kw = {"input_ids": ids.to(dev)}
            if mask is not None:
                kw["attention_mask"] = torch.cat([mask, mask.new_zeros((1, pad))], 1).reshape(-1, seg).to(dev)
            feats = model.get_text_features(**kw)
            feats = getattr(feats, "pooler_output", feats)
            out.append(feats.float())
        return out

    # -- image ------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_patches(self, states: torch.Tensor, tower) -> torch.Tensor:
        """``[n, T, C]``: the encoder's image embedding of every token of the vision tower's
        feature-layer states ``states`` ``[n, T, D]``: the tower's ``post_layernorm`` (the
        encoder's own when the tower has none), then CLIP's ``visual_projection`` or SigLIP's pooling
        head on each token alone.

        Raises
        ------
        UnsupportedModelError
            The states' width is not the encoder's vision width.
        """
        model = self.model
        norm = getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)
        if norm is None:
            norm = getattr(getattr(model, "vision_model", None), "post_layernorm", None)
        dev = next(model.parameters()).device
        x = states
        if norm is not None:  # on its own device: the MLLM's modules are never moved
            x = norm(x.to(next(norm.parameters()).device))
        x = x.to(dev)
        n, T, D = x.shape
        if self.kind == "clip":
            proj = model.visual_projection
            if proj.in_features != D:
                raise UnsupportedModelError(f"the text encoder's visual_projection takes width {proj.in_features}, "
                                            f"the vision tower's feature layer has {D}")
            return proj(x.to(proj.weight.dtype))
        head = model.vision_model.head
        return head(x.reshape(n * T, 1, D).to(next(head.parameters()).dtype)).reshape(n, T, -1)

    @staticmethod
    def scores(patches: torch.Tensor, text: torch.Tensor, negate: bool) -> torch.Tensor:
        """float32 ``[n, T]``: ``±`` the mean over the ``M`` text embeddings ``text`` ``[M, C]`` of the
        cosine similarity of each patch embedding ``patches`` ``[n, T, C]``."""
        p = torch.nn.functional.normalize(patches.float(), dim=-1)
        t = torch.nn.functional.normalize(text.float().to(p.device), dim=-1)
        sim = (p @ t.t()).mean(-1)
        return -sim if negate else sim
