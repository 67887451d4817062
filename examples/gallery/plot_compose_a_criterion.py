"""
Composing a new criterion
=========================

A pruning method in tokenprune is a **criterion** (what a good kept set is) optimised by a
**selector** under a **budget**. This example writes a new criterion, a patch saliency from feature
norms, checks it with the public conformance suite, mixes it with the built-in
:class:`~tokenprune.criteria.Coverage` and runs greedy selection on the mix with
:func:`tokenprune.compose`. Plotting the greedy gains shows how the two terms share the budget.
"""

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

import tokenprune as tp
from tokenprune.criteria import ModularCriterion, Tags
from tokenprune.testing import ConformanceError, check_criterion, criterion_checks

# %%
# The criterion
# -------------
# A criterion whose value is a sum of per-token scores, :math:`f(S) = \sum_{i \in S} s_i`, subclasses
# :class:`~tokenprune.ModularCriterion` and implements ``scores(ctx)`` only; the base class handles
# gains, updates and padding. Criteria are frozen keyword-only dataclasses, and their ``tags`` say
# what holds: a sum of non-negative scores is modular, submodular and monotone. Selectors rely on
# the tags (top-k is exact for a modular criterion, lazy greedy for a submodular one).


@dataclass(frozen=True, kw_only=True)
class FeatureNorm(ModularCriterion):
    """Patch saliency: ``s_i = ||h_i||``, the L2 norm of each visual token's features."""

    tags = Tags(modular=True, submodular=True, monotone=True)

    def scores(self, ctx):
        return ctx.features.float().norm(dim=-1)  # [B, N], never negative


# %%
# The conformance suite
# ---------------------
# :func:`tokenprune.testing.check_criterion` runs every check on random padded contexts: frozen
# dataclass, declared signals, shapes and dtypes, gains equal to differences of ``evaluate``, the
# tagged properties, independent batch rows, inert padding, permutation equivariance, fp16 and
# bf16 features. It returns nothing when the criterion passes and raises
# :class:`~tokenprune.testing.ConformanceError` naming the first check that fails.

check_criterion(FeatureNorm())
print("FeatureNorm passes the conformance suite")


# %%
# The suite catches tags that do not hold. The same scores centred on their mean can be negative,
# so the criterion is no longer monotone; claiming it is fails the suite:


@dataclass(frozen=True, kw_only=True)
class CentredNorm(ModularCriterion):
    """Feature norms minus their mean over the valid tokens (wrongly tagged monotone)."""

    tags = Tags(modular=True, submodular=True, monotone=True)

    def scores(self, ctx):
        norms = ctx.features.float().norm(dim=-1)
        mean = (norms * ctx.mask).sum(1, keepdim=True) / ctx.mask.sum(1, keepdim=True).clamp_min(1)
        return norms - mean


try:
    check_criterion(CentredNorm())
except ConformanceError as err:
    print("ConformanceError:", str(err)[:300])

# %%
# Mixing criteria
# ---------------
# Criteria combine with non-negative weights into a :class:`~tokenprune.WeightedSum`, whose tags are
# those that still hold for the sum: saliency plus coverage is monotone and submodular, not modular.
# ``criterion_checks`` gives the suite's checks one by one. The ``config`` check needs every term to
# be registered by name (``@tp.register_criterion("feature_norm")``), which this example skips, so
# it runs the others.

objective = 0.5 * FeatureNorm() + 0.5 * tp.criteria.Coverage()
print(objective.tags)
for name, check in criterion_checks(objective):
    if name != "config":
        check()
print("the weighted sum passes every check but the config round trip")

# %%
# Tokens to select from
# ---------------------
# 576 visual tokens (a 24 x 24 grid) drawn around 8 cluster centres, standing for 8 kinds of image
# region. The clusters differ in feature norm, from 0.5 to 2 times the base: cluster 7 is the most
# "salient".

gen = torch.Generator().manual_seed(0)
n_clusters, n_tokens, dim = 8, 576, 64
centres = torch.randn(n_clusters, dim, generator=gen)
labels = torch.randint(0, n_clusters, (n_tokens,), generator=gen)
scale = torch.linspace(0.5, 2.0, n_clusters)
features = (centres[labels] + 0.5 * torch.randn(n_tokens, dim, generator=gen)) * scale[labels, None]
features = features[None]  # [1, 576, 64]: a batch of one

# %%
# Greedy selection of each objective
# ----------------------------------
# :func:`tokenprune.compose` builds a one-stage method from a criterion and a selector. Greedy
# selection records each pick's marginal gain (``Selection.gains``, aligned with
# ``Selection.order``, the picks in greedy order).

BUDGET = 64
objectives = {
    "saliency (FeatureNorm)": FeatureNorm(),
    "coverage": tp.criteria.Coverage(),
    "0.5 saliency + 0.5 coverage": objective,
}
selections = {}
for label, crit in objectives.items():
    method = tp.compose(crit, selector="greedy", budget=BUDGET)
    selections[label] = sel = method.select(features)
    per_cluster = torch.bincount(labels[sel.indices[0]], minlength=n_clusters).tolist()
    print(f"{label:>28}: tokens kept per cluster {per_cluster}")

# %%
# Saliency alone spends the budget on the two highest-norm clusters; coverage spreads it over all
# eight. Coverage gains fall fast: once every cluster has a representative, the other tokens add
# little. In the mix, the first eight picks are coverage's (one per cluster, large gains), then the
# saliency term, whose gains never change, takes over.

fig, (ax_gain, ax_seen) = plt.subplots(1, 2, figsize=(10, 4))
picks = torch.arange(1, BUDGET + 1)
for label, sel in selections.items():
    ax_gain.plot(picks, sel.gains[0], marker=".", label=label)
    n_seen = [len(set(labels[sel.order[0, :k]].tolist())) for k in range(1, BUDGET + 1)]
    ax_seen.plot(picks, n_seen, label=label)  # the mix and coverage overlap
ax_gain.set_yscale("log")
ax_gain.set_xlabel("greedy pick")
ax_gain.set_ylabel("marginal gain (log scale)")
ax_gain.set_title("greedy gains")
ax_gain.legend(fontsize=8)
ax_seen.set_xlabel("tokens kept")
ax_seen.set_ylabel("clusters with a kept token")
ax_seen.set_title("clusters represented")
ax_seen.set_ylim(0, n_clusters + 0.5)
for ax in (ax_gain, ax_seen):
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %%
# The gains of a monotone submodular objective never increase along the greedy order (the curves
# above are non-increasing), which is what makes greedy a :math:`(1 - 1/e)` approximation and lazy
# greedy exact. For the mix, the weights set the trade-off: the coverage term's gains are sums over
# all 576 tokens, so they dominate the first picks at equal weights.
