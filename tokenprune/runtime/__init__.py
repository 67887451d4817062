"""The pruning runtime: ``tokenprune.prune`` applies a method to a Hugging Face VLM with hooks only.

The runtime is generic; everything family-specific comes from a
:class:`~tokenprune.adapters.ModelAdapter`. Importing this package does not import transformers.
"""

from .prefix_cache import PrefixCache
from .report import PruneReport, StageReport
from .session import PruneSession, prune
from .text_encoder import TextEncoder
from .vision_cache import VisionCache

__all__ = ["PruneSession", "PruneReport", "StageReport", "TextEncoder", "VisionCache", "PrefixCache", "prune"]
