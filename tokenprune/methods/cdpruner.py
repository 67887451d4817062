"""CDPruner: MAP inference of an instruction-conditioned DPP, before the LLM."""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["cdpruner"]


@registry.methods.register("cdpruner")
def cdpruner(budget=64, quality="given", theta=None) -> PruningMethod:
    """CDPruner: before the LLM, the MAP subset of a DPP conditioned on the instruction.

    .. math:: L = \\operatorname{diag}(q)\\, F\\, \\operatorname{diag}(q), \\qquad
              S = \\arg\\max_{|S| = k} \\log\\det L_S

    with ``F`` the cosine similarity of the projected features and ``q`` the instruction relevance
    (min-max normalised text-image similarity), maximised by fast greedy MAP inference.

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64).
    quality : {"given", "text_similarity", None}
        Where ``q`` comes from: ``"given"`` (default) reads ``relevance``, which the adapter fills with
        the instruction relevance (``Stage.relevance="text_similarity"``); ``"text_similarity"``
        computes it from ``text_embeddings`` in the feature space; ``None`` drops the condition
        (``q = 1``, a plain DPP).
    theta : float, optional
        Relevance-diversity trade-off of :class:`~tokenprune.criteria.LogDet` (``None``: ``q`` as is).

    Returns
    -------
    PruningMethod
        One stage before the LLM: ``dpp_map`` on :class:`~tokenprune.criteria.LogDet`.

    Raises
    ------
    BudgetError, ValueError
        Invalid budget or parameters.

    Notes
    -----
    Signal: ``text_similarity`` (the adapter computes the instruction relevance and passes it as
    ``relevance``; min-max normalised by the criterion, as the paper). Greedy MAP with an
    incremental Cholesky factor (Chen et al. 2018), ``O(K² N)``. On LLaVA-NeXT the paper runs it per
    crop. What the paper leaves open: CDPruner computes the relevance with the vision encoder's
    text tower (before the projector); adapters supply the closest signal they have.

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
    return one_stage(crit("log_det", quality=quality, theta=theta), sel("dpp_map"), budget,
                      relevance="text_similarity" if quality == "given" else None)
