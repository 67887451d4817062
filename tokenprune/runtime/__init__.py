"""The pruning runtime: ``tokenprune.prune`` applies a method to a Hugging Face VLM with hooks only.

The runtime is generic; everything family-specific comes from a
:class:`~tokenprune.adapters.ModelAdapter`. Importing this package does not import transformers.
"""

from .report import PruneReport, StageReport
from .session import PruneSession, prune
from .vision_cache import VisionCache

__all__ = ["PruneSession", "PruneReport", "StageReport", "VisionCache", "prune"]
