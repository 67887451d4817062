"""Shared test setup: hypothesis profiles, deterministic seeding, and builders for registered components.

Hypothesis profiles (``TOKENPRUNE_HYPOTHESIS_PROFILE``): ``dev`` (default: few examples, derandomized,
so local runs are fast and repeatable), ``ci`` (more examples, derandomized) and ``nightly`` (many
examples, random).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import tokenprune as tp

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("dev", max_examples=8, derandomize=True, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("nightly", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("TOKENPRUNE_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


def build_criterion(name: str):
    """A registered criterion built with its defaults."""
    return tp.get_criterion(name)()


def default_objective_for(selector):
    """An objective a registered selector accepts: an instance of its first accepted type, or coverage
    (non-modular, so greedy-type selectors do real work), or ``None`` for objective-free selectors."""
    if not getattr(selector, "needs_objective", True):
        return None
    types = getattr(selector, "objective_types", ())
    if types:
        return types[0]()
    return tp.criteria.Coverage()
