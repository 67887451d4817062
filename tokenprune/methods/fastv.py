"""FastV and two variants of it: ReverseFastV (the reversed ranking) and WindowFastV (per window).

All three keep, at one in-LLM stage, visual tokens by the attention text raters give them; see
:class:`~tokenprune.methods.compose.Stage` for what ``layer`` and ``relevance`` mean.
"""

from __future__ import annotations

from .. import registry
from ._parts import crit, one_stage, sel
from .compose import PruningMethod

__all__ = ["fastv", "reverse_fastv", "window_fastv"]


@registry.methods.register("fastv")
def fastv(budget=64, layer=2, raters="last_token", positions="preserve") -> PruningMethod:
    """FastV: after layer ``K``, keep the visual tokens the last token attends to most.

    .. math:: S = \\operatorname{top-}k_i \\; \\tfrac{1}{H} \\sum_h \\mathrm{Attn}_h(t_{\\mathrm{last}} \\to i)

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64, for comparisons at equal counts; the paper's default is to drop
        50%, ``budget=0.5``).
    layer : int
        ``K``: the stage acts on the hidden states entering decoder layer ``K`` with the attention of
        layer ``K - 1`` (default 2, absolute: the paper fixes ``K = 2`` whatever the depth).
    raters : {"last_token", "all_text_mean", "dynamic"}
        Which text tokens' attention is used (default the last token, as in the paper).
    positions : {"preserve", "compact"}
        Position ids of the kept tokens (default: the original ones, as FastV's code keeps them).

    Returns
    -------
    PruningMethod
        One in-LLM stage: top-k of :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.

    Notes
    -----
    Signal: ``text_attention`` at layer ``K - 1``. ``O(N log N)``. The public code forces eager
    attention for the whole model; tokenprune's adapters compute only the needed attention rows.
    What the paper leaves open and what we chose: it states "after layer K" with attention "of
    layer K"; the reference code prunes the input of layer ``K`` with the attention weights of
    layer ``K - 1`` (the last computed), which is what ``layer=K`` means here. Heads are averaged.

    Checked against pkunlp-icler/FastV@d1659729 (``fastv_forward`` in the repository's patched
    ``modeling_llama.py`` and ``src/FastV/lmms-eval/fastv_kvcache.py``): given the same attention row, the kept
    sets are identical at N = 576 (``tests/test_fidelity.py``). Remaining differences: the default
    budget (64 tokens for comparisons at equal counts; the official code takes a count or a ratio
    ``R``, the paper's default being 50%); the official code ranks the first sample of a batch only
    and leaves ties to ``torch.topk`` (here: the lower index); it computes eager attention in the
    model's fp16, where near-equal scores can swap (ties only). See ``docs/fidelity.rst``.

    References
    ----------
    Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (FastV, ECCV 2024), arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.create_method("fastv").stages[0].layer
    2
    """
    return one_stage(crit("relevance"), sel("topk"), budget, relevance="text_attention", layer=layer,
                      raters=raters, positions=positions)


@registry.methods.register("reverse_fastv")
def reverse_fastv(budget=64, layer=2, raters="last_token", positions="preserve") -> PruningMethod:
    """ReverseFastV: FastV that keeps the visual tokens with the *lowest* last-token attention.

    A control from the seed paper: if it does about as well as FastV, attention does not identify the
    tokens that matter.

    Parameters
    ----------
    budget, layer, raters, positions
        As for :func:`fastv`.

    Returns
    -------
    PruningMethod
        One in-LLM stage: bottom-k of :class:`~tokenprune.criteria.Relevance`
        (``TopK(largest=False)``).

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.

    Notes
    -----
    Signal: ``text_attention`` at layer ``K - 1``. What the paper leaves open: the seed paper's exact
    definitions were not retrievable; we use the usual reading (the FastV rule with the order
    reversed). No released code was found (neither with the seed paper nor in FastV's repository),
    so it is checked against this rule: bottom-k of the same attention row as FastV, ties to the lower
    index, at N = 576 (``tests/test_fidelity.py``).

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501. FastV: arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.create_method("reverse_fastv").stages[0].selector.largest
    False
    """
    return one_stage(crit("relevance"), sel("topk", largest=False), budget, relevance="text_attention",
                      layer=layer, raters=raters, positions=positions)


@registry.methods.register("window_fastv")
def window_fastv(budget=64, layer=2, windows=4, raters="last_token", positions="preserve") -> PruningMethod:
    """WindowFastV: FastV's attention ranking applied inside local spatial windows.

    The patch grid is split into windows and each window keeps its share of the budget by
    last-token attention, so the kept tokens stay spread over the image.

    Parameters
    ----------
    budget, layer, raters, positions
        As for :func:`fastv`.
    windows : int or (int, int)
        Windows per side of the patch grid (default 4: 4 x 4 windows of 6 x 6 tokens on LLaVA-1.5's
        24 x 24 grid); the budget is spread over the windows in proportion to their valid tokens.

    Returns
    -------
    PruningMethod
        One in-LLM stage: ``window_topk`` on :class:`~tokenprune.criteria.Relevance`.

    Raises
    ------
    BudgetError, StageError
        Invalid budget or layer.
    ValueError
        ``windows`` not a positive int or pair.

    Notes
    -----
    Signals: ``text_attention`` at layer ``K - 1`` and the patch ``grid`` (or, with several crops or
    tiles per sample, the adapters' token coordinates: windows per crop). What the paper leaves
    open: the seed paper's definitions were not retrievable; we use the usual reading (top-k inside
    local spatial windows, the budget spread evenly over them) and choose 4 x 4 windows. No released
    code was found, so it is checked against this rule (windows, largest-remainder shares, top-k in
    each) at N = 576 (``tests/test_fidelity.py``).

    References
    ----------
    Wen et al., "Token Pruning in Multimodal Large Language Models: Are We Solving the Right
    Problem?", arXiv:2502.11501. FastV: arXiv:2403.06764.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.create_method("window_fastv").stages[0].relevance
    'text_attention'
    """
    return one_stage(crit("relevance"), sel("window_topk", windows=windows), budget, relevance="text_attention",
                      layer=layer, raters=raters, positions=positions)
