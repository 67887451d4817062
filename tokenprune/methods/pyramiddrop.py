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
                positions="preserve") -> PruningMethod:
    """PyramidDrop: drop visual tokens in stages, by the last instruction token's attention.

    At the end of each of the first three of four equal parts of the LLM (layers 8, 16 and 24 of 32),
    keep the visual tokens the last instruction token attends to most; each stage keeps a fraction
    ``λ`` of the tokens left.

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
    raters, positions
        As for :func:`~tokenprune.methods.fastv.fastv`.

    Returns
    -------
    PruningMethod
        One in-LLM top-k stage of :class:`~tokenprune.criteria.Relevance` per layer.

    Raises
    ------
    BudgetError
        Invalid budget or ratio.
    StageError
        Layers not a sequence, or not strictly increasing.

    Notes
    -----
    Signal: ``text_attention`` (``raters="last_token"``: the last instruction token) at each layer
    ``k - 1``. With the defaults on 576 tokens and 32 layers the counts are 576 → 288 → 144 → 72, about
    270 equivalent tokens. What the paper leaves open and what we chose: it has no single nominal
    budget; ``budget`` is what the first stage keeps and the later stages keep ``ratio`` of the rest.

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
    stages = [Stage(objective=crit("relevance"), selector=sel("topk"), budget=budget if i == 0 else r.value,
                    layer=lay, reference_depth=reference_depth, relevance="text_attention", raters=raters,
                    positions=positions) for i, lay in enumerate(layers)]
    return PruningMethod(stages=tuple(stages), nominal_budget=budget)
