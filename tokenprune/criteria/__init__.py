"""Criteria: set functions over visual tokens (task relevance, information coverage, semantic diversity)."""

from .base import Criterion, ModularCriterion, Tags, WeightedSum, criterion_from_config, normalize_gains
from .coverage import Coverage
from .diversity import Diversity, LogDet
from .pivot_dissimilarity import PivotDissimilarity
from .relevance import Relevance
from .saliency_coverage import SaliencyCoverage
from .tops import TOPSObjective

__all__ = ["Criterion", "ModularCriterion", "Tags", "WeightedSum", "criterion_from_config", "normalize_gains",
           "Coverage", "Diversity", "LogDet", "PivotDissimilarity", "Relevance", "SaliencyCoverage", "TOPSObjective"]
