"""Methods: registered compositions of criteria, selectors, budgets and stages.

:mod:`~tokenprune.methods.compose` defines :class:`Stage` and :class:`PruningMethod`;
:mod:`~tokenprune.methods.build` builds registered methods by name. Every other module holds one
method (or the variants of one paper), registered where it is defined; importing them here, as
timm's ``models/__init__`` does, registers them all.

Stage semantics (see :class:`Stage`): ``layer=None`` acts before the LLM (after the multimodal
projector); ``layer=k`` acts on the hidden states entering decoder layer ``k``, with attention
signals from layer ``k - 1``; ``reference_depth`` makes the layer scale with the model's depth.
``relevance`` names the signal the model adapter computes for the stage (``"cls_attention"``,
``"text_attention"``, ``"text_similarity"``, ``"key_norm"``). On plain tensors
(:func:`tokenprune.select`) the caller passes that signal as ``relevance=``.
"""

from .compose import PruningMethod, Stage, compose
from .build import accepted_parameters, create_method, method_factory, method_from_config, resolve_method
from . import baselines, cdpruner, dart, divprune, facility_location, fastervlm, fastv  # noqa: F401  (register)
from . import pyramiddrop, scope, tops, visionzip  # noqa: F401  (register)
from .tops import TOPS_SCHEDULES
# Re-exported for compatibility: these now live in tokenprune.criteria and tokenprune.selectors.
from ..criteria import PivotDissimilarity, SaliencyCoverage
from ..selectors import VisionZip

__all__ = ["PruningMethod", "Stage", "compose", "accepted_parameters", "create_method", "method_factory",
           "method_from_config", "resolve_method", "TOPS_SCHEDULES", "PivotDissimilarity", "SaliencyCoverage",
           "VisionZip"]
