"""FasterVLM: top-k of the vision encoder's [CLS] attention, before the LLM."""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["fastervlm"]


@registry.methods.register("fastervlm")
def fastervlm(budget=64) -> PruningMethod:
    """FasterVLM: before the LLM, keep the visual tokens the vision encoder's [CLS] attends to most.

    .. math:: S = \\operatorname{top-}k_i \\; \\tfrac{1}{H} \\sum_h \\mathrm{Attn}_h([\\mathrm{CLS}] \\to i)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).

    Returns
    -------
    PruningMethod
        One stage before the LLM: top-k of :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError
        Invalid budget.

    Notes
    -----
    Signal: ``cls_attention`` (mean over heads, at the encoder layer whose features are used).
    ``O(N log N)``. Models without a [CLS] token (SigLIP towers) cannot supply it. What the paper
    leaves open and what we chose: the encoder layer of the attention (we take the layer whose
    features the projector reads, LLaVA's penultimate one) and the head reduction (mean; a sum
    ranks the same).

    Checked against Theia-4869/FasterVLM@f5d5f120 (``encode_images`` in ``llava/model/llava_arch.py``,
    ``feature_select`` in ``clip_encoder.py``): the [CLS] row to the patches at the feature layer
    (``select_layer = -2``), mean over heads, top-k; given the same attention the kept sets are
    identical at N = 576 (``tests/test_fidelity.py``). Remaining differences: ties go to the lower
    index (official: ``torch.topk``'s order) and the official code computes in fp16; on LLaVA-NeXT
    the official code keeps the same count in every crop (top-k per crop) where this stage ranks the
    whole sample's tokens together. See ``docs/fidelity.rst``.

    References
    ----------
    Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
    Inference Faster" (FasterVLM), arXiv:2412.01818.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> tp.select("fastervlm", torch.randn(1, 6, 4), relevance=torch.arange(6.0)[None], budget=2).indices
    tensor([[4, 5]])
    """
    return one_stage(crit("relevance"), sel("topk"), budget, relevance="cls_attention")
