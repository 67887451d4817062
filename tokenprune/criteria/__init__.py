"""Criteria: set functions over visual tokens (task relevance, information coverage, semantic diversity)."""

from .base import Criterion, ModularCriterion, Tags, WeightedSum, criterion_from_config, normalize_gains
from .coverage import Coverage
from .relevance import Relevance

__all__ = ["Criterion", "ModularCriterion", "Tags", "WeightedSum", "criterion_from_config", "normalize_gains",
           "Coverage", "Relevance"]
