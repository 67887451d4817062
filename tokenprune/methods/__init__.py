"""Methods: registered compositions of criteria, selectors, budgets and stages."""

from .compose import PruningMethod, Stage, compose
from . import visionzip  # noqa: F401  (registers the "visionzip" selector)
from . import catalog  # noqa: F401  (registers the named methods)
from .catalog import PivotDissimilarity, SaliencyCoverage
from .visionzip import VisionZip

__all__ = ["PruningMethod", "Stage", "compose", "PivotDissimilarity", "SaliencyCoverage", "VisionZip"]
