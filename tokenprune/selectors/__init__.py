"""Selectors: optimisers of a criterion under a token budget."""

from .base import Selector, greedy_loop, selector_from_config
from .dart import DART
from .dpp import DPPMap
from .facility import FacilityLocationGreedy
from .greedy import Greedy
from .maxmin import MaxMin
from .random import Random
from .spatial import Pooling, WindowTopK
from .topk import TopK
from .visionzip import VisionZip, split_budget

__all__ = ["Selector", "greedy_loop", "selector_from_config", "DART", "Greedy", "TopK", "DPPMap",
           "FacilityLocationGreedy", "MaxMin", "Random", "Pooling", "WindowTopK", "VisionZip", "split_budget"]
