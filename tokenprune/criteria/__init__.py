"""Criteria: set functions over visual tokens (task relevance, information coverage, semantic diversity)."""

from .base import Criterion, ModularCriterion, Tags, WeightedSum, criterion_from_config, normalize_gains
from .coverage import Coverage
from .diversity import Diversity, LogDet
from .relevance import Relevance
from .tops import TOPSObjective

__all__ = ["Criterion", "ModularCriterion", "Tags", "WeightedSum", "criterion_from_config", "normalize_gains",
           "Coverage", "Diversity", "LogDet", "Relevance", "TOPSObjective"]
