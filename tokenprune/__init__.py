"""tokenprune: visual token pruning for multimodal LLMs.

Criteria (what to keep) and selectors (how to optimise it under a budget) compose into methods
(``tokenprune.compose``), which run on plain tensors (``tokenprune.select``) or on Hugging Face
models, before the LLM and inside it (``tokenprune.prune``).
"""

from ._version import __version__
from .budget import Budget
from .context import TokenContext, make_context
from .errors import (BudgetError, ConfigError, DuplicateNameError, IncompatibleComponentsError,
                     InvalidFeaturesError, MissingSignalError, ParameterError, PluginWarning, ShapeError,
                     StageError, TokenPruneError, UnknownNameError, UnsupportedModelError)
from .selection import Selection
from . import criteria, selectors  # noqa: E402  (registers the built-ins)
from .criteria import Criterion, ModularCriterion, Tags, WeightedSum
from .selectors import Selector
from .methods import PruningMethod, Stage, compose
from . import methods  # noqa: F401
from .api import (create_criterion, create_method, create_selector, from_config, get_adapter, get_criterion,
                  get_method, get_selector, list_adapters, list_criteria, list_methods, list_selectors,
                  register_adapter, register_criterion, register_method, register_selector, resolve_method, select)
from . import adapters  # noqa: E402,F401  (registers the built-in adapters; no transformers import)
from .runtime import PrefixCache, PruneReport, TextEncoder, VisionCache, prune  # noqa: E402

__all__ = [
    "__version__", "Budget", "TokenContext", "make_context", "Selection", "Criterion", "ModularCriterion", "Tags",
    "WeightedSum", "Selector", "PruningMethod", "Stage", "compose", "select", "from_config", "resolve_method",
    "create_method", "get_method", "list_methods", "register_method", "create_criterion", "get_criterion",
    "list_criteria", "register_criterion", "create_selector", "get_selector", "list_selectors", "register_selector",
    "get_adapter", "list_adapters", "register_adapter",
    "TokenPruneError", "BudgetError", "ConfigError", "DuplicateNameError", "IncompatibleComponentsError",
    "InvalidFeaturesError", "MissingSignalError", "ParameterError", "PluginWarning", "ShapeError", "StageError",
    "UnknownNameError", "UnsupportedModelError", "criteria", "selectors", "methods", "prune", "PruneReport",
    "VisionCache", "PrefixCache", "TextEncoder",
]
