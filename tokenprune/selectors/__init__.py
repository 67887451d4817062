"""Selectors: optimisers of a criterion under a token budget."""

from .base import Selector, greedy_loop, selector_from_config
from .greedy import Greedy
from .topk import TopK

__all__ = ["Selector", "greedy_loop", "selector_from_config", "Greedy", "TopK"]
