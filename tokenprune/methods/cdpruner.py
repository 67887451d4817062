"""CDPruner: MAP inference of an instruction-conditioned DPP, before the LLM."""

from __future__ import annotations

from .. import registry
from ..errors import StageError
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["cdpruner"]


@registry.methods.register("cdpruner")
def cdpruner(budget=64, quality="given", theta=None, per_crop=True, compute_dtype="float32") -> PruningMethod:
    """CDPruner: before the LLM, the MAP subset of a DPP conditioned on the instruction.

    .. math:: L = \\operatorname{diag}(q)\\, F\\, \\operatorname{diag}(q), \\qquad
              S = \\arg\\max_{|S| = k} \\log\\det L_S

    with ``F`` the cosine similarity of the projected features and ``q`` the instruction relevance
    (min-max normalised), maximised by fast greedy MAP inference, in every crop of the image.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64), over all the crops of an image (LLaVA-NeXT's official scripts give
        a count per crop: ``32`` there is ``budget=32 * crops`` here, e.g. 160 for 5 crops).
    quality : {"given", "text_similarity", None}
        Where ``q`` comes from: ``"given"`` (default) reads ``relevance``, which the runtime fills with
        the instruction relevance (``Stage.relevance="text_similarity"``: with
        :func:`tokenprune.prune`'s ``text_encoder``, the paper's; without it, the fallback, see
        Notes); ``"text_similarity"`` computes it from ``text_embeddings`` in the feature space;
        ``None`` drops the condition (``q = 1``, a plain DPP).
    theta : float, optional
        Relevance-diversity trade-off of :class:`~tokenprune.criteria.LogDet` (``None``: ``q`` as is,
        as the official code, which has it commented out).
    per_crop : bool
        Select in every ``(image, crop)`` of the adapter's token coordinates, the budget split evenly
        (default ``True``, the official code on LLaVA-NeXT; one crop on LLaVA-1.5, so no change there);
        see :class:`~tokenprune.selectors.DPPMap`.
    compute_dtype : {"float32", "model"}
        Arithmetic of the similarity (see :class:`~tokenprune.methods.compose.Stage`; default
        ``"float32"``; the official code normalises the features in the model's dtype and multiplies
        them in float32, between the two).

    Returns
    -------
    PruningMethod
        One stage before the LLM: ``dpp_map`` on :class:`~tokenprune.criteria.LogDet`.

    Raises
    ------
    BudgetError, ParameterError, StageError
        Invalid budget or parameters.

    Notes
    -----
    Signal: ``text_similarity``, the instruction relevance. The paper's (and the official code's,
    with :class:`tokenprune.TextEncoder`): the similarity of each patch's CLIP image embedding (the
    vision tower's feature-layer state through ``post_layernorm`` and ``visual_projection``) to the
    CLIP text embedding of the instruction, negated for CLIP, per crop; the stage report's relevance is
    then ``"text_encoder"``. Without a text encoder, the fallback: the mean cosine similarity of the
    projected features to the LLM's input embeddings of the prompt's text (report relevance
    ``"text_similarity"`` and a note). Either way it is min-max normalised by the criterion as the
    official code does, ``(r - min + 1e-6) / (max - min)``. Greedy MAP with an incremental Cholesky
    factor (Chen et al. 2018), ``O(K² N)``.

    Checked against Theia-4869/CDPruner at commit ``9541616c40fcd5625de1cdb8ea6c33c129eb7864``
    (``llava/model/llava_arch.py`` ``encode_images`` and ``prepare_inputs_labels_for_multimodal``,
    ``llava/model/multimodal_encoder/clip_encoder.py``). Identical given the same relevance: the
    kernel, the normalisation and the greedy MAP picks (``εI`` aside, see
    :class:`~tokenprune.criteria.LogDet`). Remaining differences: on LLaVA-NeXT the official code
    selects among each crop's 576 patches before unpadding and then drops the picks that fall in the
    padding (so it keeps up to the budget), we select among the unpadded tokens of each crop (and
    keep the budget), and its min-max runs over the padded patches too; the instruction text (see
    :class:`tokenprune.TextEncoder`). Official code exists for LLaVA-1.5 and LLaVA-NeXT only.

    References
    ----------
    Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs" (CDPruner, NeurIPS 2025), arXiv:2506.10967.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("cdpruner", torch.randn(1, 10, 4), relevance=torch.rand(1, 10), budget=3).counts
    tensor([3])
    """
    if not isinstance(per_crop, bool):
        raise StageError(f"per_crop must be a bool, got {per_crop!r}")
    return one_stage(crit("log_det", quality=quality, theta=theta), sel("dpp_map", per_crop=per_crop), budget,
                     relevance="text_similarity" if quality == "given" else None, compute_dtype=compute_dtype)
