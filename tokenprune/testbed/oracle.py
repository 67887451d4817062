"""The evidence oracle: a reference selection that keeps the patches holding the question's evidence.

It is not a pruning method (it reads the answer's evidence, which no real method can see); the
testbed uses it to show that its questions can be answered from the evidence patches alone, so a
method that loses accuracy at a budget lost evidence, not the budget itself. It runs through
:func:`tokenprune.prune` like every method: a top-k stage before the LLM over a modular criterion
whose scores are 1 on evidence patches plus a seeded random tie-break in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..criteria.base import ModularCriterion
from ..errors import ShapeError
from ..methods.compose import PruningMethod, Stage

__all__ = ["EvidenceOracle", "oracle_method", "ORACLE_NAME"]

ORACLE_NAME = "evidence_oracle"


@dataclass(frozen=True, kw_only=True, eq=False)
class EvidenceOracle(ModularCriterion):
    """Scores the visual tokens by whether their patch holds the question's evidence.

    Parameters
    ----------
    evidence : torch.Tensor
        Bool ``[B, rows * cols]``: per sample, the evidence patches in raster order.
    cols : int
        Columns of the patch grid (14 for the testbed).
    seed : int
        Seed of the tie-break among evidence patches and among the other patches.

    Notes
    -----
    Reads the ``coords`` signal the adapters attach (``(image, crop, row, col)`` per candidate), so it
    follows the tokens through earlier stages. ``O(B N)``. Not registered: it is a testbed reference,
    not a method, and its evidence is data, not a parameter.
    """

    evidence: torch.Tensor
    cols: int = 14
    seed: int = 0

    def scores(self, ctx) -> torch.Tensor:
        ctx.require("coords", by="the evidence oracle")
        coords = ctx.get_signal("coords")
        ev = self.evidence.to(ctx.features.device)
        if ev.shape[0] != ctx.features.shape[0]:
            raise ShapeError(f"evidence for {ev.shape[0]} samples, context has {ctx.features.shape[0]}")
        raster = (coords[..., 2] * self.cols + coords[..., 3]).long().clamp(0, ev.shape[1] - 1)
        hit = torch.gather(ev.float(), 1, raster)
        g = torch.Generator().manual_seed(self.seed)
        tie = torch.rand(ctx.features.shape[:2], generator=g).to(ctx.features.device)
        return hit + tie


class _OracleMethod(PruningMethod):
    def to_config(self) -> dict:  # the evidence is data: describe the method without it
        return {"name": ORACLE_NAME, "params": dict(self.params), "stages": []}


def oracle_method(examples, budget, *, n_patches: int = 196, cols: int = 14, seed: int = 0) -> PruningMethod:
    """A one-stage pre-LLM method that keeps the evidence patches of each example's question first.

    Parameters
    ----------
    examples : list of VQAExample
        The batch, in order; their ``evidence`` (raster indices) are used.
    budget : int or float
        Tokens kept.
    """
    from ..selectors.topk import TopK

    ev = torch.zeros(len(examples), n_patches, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex.evidence is not None and len(ex.evidence):
            ev[i, torch.as_tensor(np.asarray(ex.evidence), dtype=torch.long)] = True
    stage = Stage(objective=EvidenceOracle(evidence=ev, cols=cols, seed=seed), selector=TopK(), budget=budget)
    return _OracleMethod(stages=(stage,), name=ORACLE_NAME, params={"budget": budget})
