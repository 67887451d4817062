"""DART: pivot tokens plus, for each pivot, the visual tokens that duplicate it least, inside the LLM.

The selection rule is :class:`~tokenprune.selectors.DART` (``"dart"``).
"""

from __future__ import annotations

from .. import registry
from ._parts import sel
from .compose import PruningMethod, Stage

__all__ = ["dart"]


@registry.methods.register("dart")
def dart(budget=64, layer=2, image_pivots=4, text_pivots=4, count="budget", positions="preserve") -> PruningMethod:
    """DART: keep a few pivot tokens and, for each, the visual tokens least similar to it.

    At decoder layer ``K`` (default 2), pivots are the 4 visual and the 4 text tokens (those after the
    image) whose keys at layer ``K - 1`` have the largest L1 norm; each pivot takes its share of the
    budget among the visual tokens least cosine-similar to it, compared on the hidden states entering
    layer ``K`` passed through the LLM's final RMSNorm (learned weight included). Kept: the image pivots
    and the union of the picks. This is the official rule (:class:`~tokenprune.selectors.DART`).

    Parameters
    ----------
    budget : int or float
        Tokens kept (default 64). See ``count``.
    layer : int
        ``K``: acts on the hidden states entering decoder layer ``K`` (default 2, absolute, as the paper).
    image_pivots, text_pivots : int
        Pivot counts (default 4 and 4, the official defaults).
    count : {"budget", "official"}
        ``"budget"`` (default) keeps exactly the budget; ``"official"`` keeps what the official code
        keeps: the image pivots plus ``budget // (image_pivots + text_pivots)`` tokens per pivot (68 for
        a budget of 64, 132 for 128, 196 for 192), so that a reproduction spends the same tokens. The
        report gives the counts actually kept.
    positions : {"preserve", "compact"}
        Position ids of the kept tokens (the official code keeps the original positions).

    Returns
    -------
    PruningMethod
        One in-LLM stage: the ``"dart"`` selector, ``relevance="key_norm"``,
        ``feature_norm="final_norm"``, ``text_tokens="after_image"``.

    Raises
    ------
    BudgetError, StageError, ParameterError
        Invalid budget, layer, pivot counts or count.

    Notes
    -----
    Signals: ``key_norm`` (the L1 norm of the keys at layer ``K - 1``, for the visual tokens as
    ``relevance`` and for the text tokens after the image as ``text_relevance``), the text tokens'
    hidden states (``text_embeddings``) and their positions.

    Differences from the official code, all without effect on the kept set at ``count="official"``
    (``tests/test_fidelity_dart.py``): batches of any size with padding (the official code handles one
    unpadded sample; we use positions in the unpadded sequence, so the pivots' visiting order is the
    same); similarities in float32 (the official scripts run the model in fp16); ties between exactly
    equal similarities go to the lower token index. ``count="budget"`` differs from the official
    count by design (the same number of tokens as every other method at that budget).

    The modular approximation this library shipped before (one ranking by the dissimilarity to the
    nearest image pivot) remains available as the criterion
    :class:`~tokenprune.criteria.PivotDissimilarity` for compositions.

    References
    ----------
    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More" (DART), arXiv:2502.11494. Code: https://github.com/ZichenWen1/DART (checked at the mirror
    xqy1111111/DART, commit 0247657060a42dd329d6f273455bfad05d5b2c74).

    Examples
    --------
    >>> import tokenprune as tp
    >>> st = tp.create_method("dart").stages[0]
    >>> st.relevance, st.feature_norm, st.text_tokens, st.selector.count
    ('key_norm', 'final_norm', 'after_image', 'budget')
    """
    selector = sel("dart", image_pivots=image_pivots, text_pivots=text_pivots, count=count)
    return PruningMethod(stages=(Stage(objective=None, selector=selector, budget=budget, layer=layer,
                                       relevance="key_norm", positions=positions, feature_norm="final_norm",
                                       text_tokens="after_image"),))
