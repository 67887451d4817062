"""The result of a selection: which visual tokens are kept, in which greedy order, with which gains."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, eq=False)
class Selection:
    """Kept visual tokens of a batch.

    Rows may keep fewer tokens than ``K`` when a sample has fewer valid tokens than the budget; their
    tail is padding, marked by ``valid`` and filled with ``-1``.

    Attributes
    ----------
    indices : torch.Tensor
        long ``[B, K]``: kept token positions, ascending within each row (spatial order kept).
    order : torch.Tensor
        long ``[B, K]``: the same positions in the order the selector picked them (for greedy
        selectors, a prefix of length ``k`` is the selection at budget ``k``).
    gains : torch.Tensor
        float32 ``[B, K]``: the objective's marginal gain (or score) at each pick, aligned with ``order``.
    valid : torch.Tensor
        bool ``[B, K]``: ``True`` for real entries (a prefix of each row).
    features : torch.Tensor or None
        ``[B, K, D]`` replacement features aligned with ``indices`` for merging methods (pooling,
        VisionZip's contextual tokens), else ``None``: the kept tokens keep their own features.
    """

    indices: torch.Tensor
    order: torch.Tensor
    gains: torch.Tensor
    valid: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def counts(self) -> torch.Tensor:
        """long ``[B]``: tokens kept per sample."""
        return self.valid.sum(1)

    def keep_mask(self, num_tokens: int) -> torch.Tensor:
        """bool ``[B, N]``: ``True`` at kept positions."""
        out = torch.zeros(self.batch_size, num_tokens + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.valid, self.indices, num_tokens)
        out.scatter_(1, idx, True)
        return out[:, :num_tokens]

    def prefix(self, k: int) -> "Selection":
        """The selection a greedy selector makes at budget ``k``: the first ``k`` picks of ``order``.

        Only meaningful for selectors with the prefix property (greedy, top-k); merged features are
        dropped.
        """
        k = max(0, min(int(k), self.k))
        return from_order(self.order[:, :k], self.gains[:, :k], self.valid[:, :k])

    def to(self, device) -> "Selection":
        return replace(self, **{f: (getattr(self, f).to(device) if getattr(self, f) is not None else None)
                                for f in ("indices", "order", "gains", "valid", "features")})


def from_order(order: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor,
               features: torch.Tensor | None = None) -> Selection:
    """Build a :class:`Selection` from picks in selection order.

    ``order`` long ``[B, K]`` may hold anything where ``valid`` is ``False``; ``valid`` must be a
    prefix in each row. ``features``, if given, are aligned with ``order`` and get re-sorted too.
    """
    order = torch.where(valid, order, torch.full_like(order, -1))
    big = torch.iinfo(torch.long).max
    key = torch.where(valid, order, torch.full_like(order, big))
    sorted_key, perm = key.sort(dim=1)
    indices = torch.where(sorted_key == big, torch.full_like(sorted_key, -1), sorted_key)
    if features is not None:
        features = torch.gather(features, 1, perm.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    gains = torch.where(valid, gains.float(), torch.zeros_like(gains, dtype=torch.float32))
    return Selection(indices=indices, order=order, gains=gains, valid=valid.clone(), features=features)
