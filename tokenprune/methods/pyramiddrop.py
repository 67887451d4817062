"""PyramidDrop: multi-stage attention top-k inside the LLM, each stage keeping a fraction of the rest."""

from __future__ import annotations

from .. import registry
from ..budget import as_budget
from ..errors import ConfigError, StageError
from ._parts import crit, sel
from .compose import PruningMethod, Stage

__all__ = ["pyramiddrop"]


@registry.methods.register("pyramiddrop")
def pyramiddrop(budget=0.5, ratio=0.5, layers=(8, 16, 24), reference_depth=32, raters="last_token",
                positions="compact", rank_attention="own_layer") -> PruningMethod:
    """PyramidDrop: drop visual tokens in stages, by the last instruction token's attention.

    At the end of each of the first three of four equal parts of the LLM (layers 8, 16 and 24 of 32),
    keep the visual tokens the last instruction token attends to most; each stage keeps a fraction
    ``λ`` of the tokens left. The attention is the one the stage's own layer computes on the hidden
    states entering it (its input norm, query/key projections and rotary embedding), as the official
    code ranks.

    Parameters
    ----------
    budget : int or float
        Tokens kept by the first stage (int) or the fraction of the visual tokens it keeps (float).
        Default 0.5, the paper's ``λ``.
    ratio : float
        ``λ`` for the later stages: the fraction of the tokens left that each keeps (default 0.5).
    layers : tuple of int
        Pruning layers, written for ``reference_depth`` layers (default ``(8, 16, 24)``).
    reference_depth : int
        Depth the layers are written for (default 32, LLaVA-1.5-7B).
    raters : {"last_token", "all_text_mean", "dynamic"}
        Text raters (default ``"last_token"``: the last instruction token, as the official code at
        inference).
    positions : {"compact", "preserve"}
        ``"compact"`` (default, the official code: after each drop the positions are re-indexed
        ``0 .. L'-1``) or ``"preserve"`` (the kept tokens keep their positions).
    rank_attention : {"own_layer", "previous_layer"}
        Where the ranking attention comes from. ``"own_layer"`` (default, the official code): layer
        ``k``'s own ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary embedding applied to the
        hidden states entering layer ``k`` (``relevance="own_layer_attention"``). ``"previous_layer"``:
        the attention layer ``k - 1`` computed (``relevance="text_attention"``, the FastV way, this
        package's behaviour before the official code was checked; no extra projection).

    Returns
    -------
    PruningMethod
        One in-LLM top-k stage of :class:`~tokenprune.criteria.Relevance` per layer.

    Raises
    ------
    BudgetError
        Invalid budget or ratio.
    StageError
        Layers not a sequence, or not strictly increasing, or an unknown ``rank_attention``.

    Notes
    -----
    Signal: ``own_layer_attention`` (``raters="last_token"``: the last instruction token), computed
    in the pre-hook of each stage's layer ``k`` from the hidden states entering it: softmax in float32
    over the keys the layer's mask allows, averaged over heads, restricted to the image tokens, top-k.
    It costs one extra query/key projection of the sequence at each stage layer. With the defaults on
    576 tokens and 32 layers the counts are 576 → 288 → 144 → 72, about 270 equivalent tokens. What the
    paper leaves open and what we chose: it has no single nominal budget; ``budget`` is what the first
    stage keeps and the later stages keep ``ratio`` of the rest.

    Checked against Cooperx521/PyramidDrop at commit ``6444f304aee4b7edcb022839fb9e8cd07859704a``
    (``llava/model/modeling_llama_pdrop.py``, ``pdrop_forward`` and ``pdrop_rank_drop``; defaults from
    ``scripts/v1_5/pdrop_eval``: ``layer_list [8, 16, 24]``, ``image_token_ratio_list [0.5, 0.25,
    0.125]``). Identical: the rank layers, the rater (the last prompt token), the query/key computation
    at the rank layer, the softmax over all allowed keys, the head average, top-k and the re-indexed
    positions. Remaining differences: the counts are ``floor(N·λ^s)`` of the original ``N`` there and
    successive roundings of the tokens left here (``round(N/2)``, then half of that, ...), equal
    whenever ``N·λ^s`` is an integer (576, 2880) and one token apart otherwise; in fp16 models the
    official code averages the heads' softmax rows after casting them to fp16, we average them in
    float32 (ties may break differently); on LLaVA-NeXT our ``image_newline`` tokens are protected
    (``newlines="keep"``) and not ranked.

    References
    ----------
    Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", arXiv:2410.17247.

    Examples
    --------
    >>> import tokenprune as tp
    >>> [(s.layer, s.budget.value) for s in tp.create_method("pyramiddrop").stages]
    [(8, 0.5), (16, 0.5), (24, 0.5)]
    """
    r = as_budget(ratio)
    if not r.is_fraction:
        raise ConfigError(f"ratio must be a float in (0, 1] (fraction of the tokens left), got {ratio!r}")
    try:
        layers = list(layers)
    except TypeError:
        raise StageError(f"layers must be a sequence of decoder layers, e.g. (8, 16, 24), got {layers!r}") from None
    if not layers:
        raise StageError("pyramiddrop needs at least one layer")
    sources = {"own_layer": "own_layer_attention", "previous_layer": "text_attention"}
    if rank_attention not in sources:
        raise StageError(f"rank_attention must be one of {sorted(sources)}, got {rank_attention!r}")
    stages = [Stage(objective=crit("relevance"), selector=sel("topk"), budget=budget if i == 0 else r.value,
                    layer=lay, reference_depth=reference_depth, relevance=sources[rank_attention], raters=raters,
                    positions=positions) for i, lay in enumerate(layers)]
    return PruningMethod(stages=tuple(stages), nominal_budget=budget)
