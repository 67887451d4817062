"""VisionZip, the method: dominant tokens by [CLS] attention plus merged contextual tokens.

The selector doing the work is :class:`~tokenprune.selectors.VisionZip` (``"visionzip"``), in
:mod:`tokenprune.selectors.visionzip`.
"""

from __future__ import annotations

from .. import registry
from ..errors import ParameterError
from ._parts import crit, sel
from .compose import SITES, PruningMethod, Stage

__all__ = ["visionzip"]


@registry.methods.register("visionzip")
def visionzip(budget=64, contextual_ratio=10 / 64, merge="target_plus_mean", merge_by="auto", cls="keep",
              site="vision") -> PruningMethod:
    """VisionZip: [CLS]-dominant tokens plus a few contextual tokens merged from the rest.

    At its defaults it keeps what the official code keeps (dvlab-research/VisionZip, commit
    ``3151f6df4fca36a4cd1c985e5956e725b1f9ad02``, ``visionzip(model, dominant=54, contextual=10)``):
    on a CLIP tower (LLaVA-1.5, LLaVA-NeXT) the [CLS] token, the 53 patches with the largest [CLS]
    attention at the feature layer (the encoder layer whose output is ``vision_feature_layer``), and
    10 contextual tokens: uniformly strided targets among the remaining tokens, each other remaining
    token assigned to its most similar target by that layer's attention keys (mean over heads), a
    contextual token being its target's hidden state plus the mean of those assigned to it. All of it
    on the feature-layer hidden states before the projector, which then runs on the 64 tokens; the LLM
    sees [CLS], the dominant patches in raster order, then the contextual tokens, at consecutive
    positions.

    Parameters
    ----------
    budget : int or float
        Visual tokens per sample the LLM sees (default 64: [CLS] + 53 + 10). On LLaVA-NeXT the budget
        is per image, split evenly over its crops (the official code keeps ``dominant + contextual``
        per crop: ``budget=320`` on a five-crop image reproduces its 54 + 10 per crop).
    contextual_ratio : float
        Share of the budget given to contextual tokens (default ``10 / 64``: 54+10, 108+20 and 162+30
        for 64, 128 and 192, the paper's splits, and the same ratio for other budgets).
    merge : {"target_plus_mean", "mean"}
        How a contextual token is formed (see :class:`~tokenprune.selectors.VisionZip`); default
        the official ``target + mean``.
    merge_by : {"auto", "keys", "features"}
        Similarity used to assign tokens to contextual targets; ``"auto"`` (default) uses the vision
        tower's keys where the runtime supplies them (``site="vision"``) and the features otherwise.
    cls : {"keep", "drop"}
        ``"keep"`` (default, official): [CLS] is a visual token of its own, counted in the budget.
        ``"drop"``: the llmc port on Hugging Face LLaVA (ModelTC/llmc, whose ``default`` feature
        selection removes [CLS] after VisionZip ran): ``budget`` patches, ``round(budget · ratio)`` of
        them contextual (54 + 10 for 64), [CLS] neither kept nor merged.
    site : {"vision", "projected"}
        ``"vision"`` (default): on the vision tower's feature-layer states, before the projector.
        ``"projected"``: on the projected features, the previous behaviour of this package (no keys,
        so ``merge_by="auto"`` compares features; contextual tokens take their targets' places in the
        prompt; no [CLS] token unless the family feeds it to the LLM).

    Returns
    -------
    PruningMethod
        One stage before the LLM with the ``"visionzip"`` selector on
        :class:`~tokenprune.criteria.Relevance` and ``relevance="cls_attention"``. Its selections
        carry merged ``features``.

    Raises
    ------
    BudgetError, ParameterError
        Invalid budget or parameters.

    Notes
    -----
    Signals: ``cls_attention`` (VisionZip sums the heads; the ranking is that of the mean used here),
    and at ``site="vision"`` the keys (``keys``) and the [CLS] mark (``cls_token``), supplied by the
    adapter.

    Families (what :func:`tokenprune.prune` does at the defaults): LLaVA-1.5 and LLaVA-NeXT run at
    the vision tower as above. On LLaVA-NeXT each crop keeps its share of the budget and the image's
    tokens follow the official layout for ``spatial_unpad``: the base crop's tokens, then the
    high-resolution crops' dominant patches in the raster order of the whole crop grid, their [CLS]
    tokens, their contextual tokens; no ``image_newline`` tokens and no unpadding, as the official
    code. The official code supports nothing else. On the other families the stage runs on the
    projected features (``site="projected"``, a note in the report says so): Qwen2-VL / Qwen2.5-VL
    (2 x 2 patch merger), Idefics3 / SmolVLM (pixel shuffle), Gemma3 (average pooling) project groups
    of patches into one token, so a kept patch has no projected token of its own; LLaVA-OneVision's
    SigLIP tower has no [CLS] and its anyres packing (unpadding, down-scaling, newlines) has no
    official VisionZip layout. There the relevance is the :func:`tokenprune.prune` fallback for
    towers without [CLS] (``cls_fallback``), and tokens merge by feature similarity.

    References
    ----------
    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025, arXiv:2412.04467. Official code: https://github.com/dvlab-research/VisionZip.

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> sel = tp.select("visionzip", torch.randn(1, 16, 4), relevance=torch.rand(1, 16), budget=8)
    >>> sel.indices.shape, sel.features.shape
    (torch.Size([1, 8]), torch.Size([1, 8, 4]))
    >>> tp.create_method("visionzip").stages[0].site
    'vision'
    """
    if site not in SITES:
        raise ParameterError(f"site must be one of {SITES}, got {site!r}")
    selector = sel("visionzip", contextual_ratio=contextual_ratio, merge=merge, merge_by=merge_by, cls=cls)
    stage = Stage(objective=crit("relevance"), selector=selector, budget=budget, relevance="cls_attention",
                  site=site)
    return PruningMethod(stages=(stage,))
