"""Token budgets: how many visual tokens a stage keeps.

A budget is an ``int`` (tokens kept) or a ``float`` in (0, 1] (fraction of the valid tokens kept), as
``amount`` in :mod:`torch.nn.utils.prune`. It is validated when it is made and again against the
number of tokens at run time. A budget at or above the valid count keeps everything.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """A validated budget.

    Parameters
    ----------
    value : int or float
        ``int >= 1``: tokens kept. ``float`` in (0, 1]: fraction of the valid tokens kept, rounded to
        the nearest count (halves up) and never below 1.

    Raises
    ------
    BudgetError
        If ``value`` is a bool, not a number, an int below 1, or a float outside (0, 1] or not finite.

    Examples
    --------
    >>> Budget(64).resolve(576), Budget(0.25).resolve(576), Budget(1000).resolve(576)
    (64, 144, 576)
    """

    value: int | float

    def __post_init__(self):
        v = self.value
        if isinstance(v, Budget):
            object.__setattr__(self, "value", v.value)
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise BudgetError(f"budget must be an int (tokens kept) or a float in (0, 1] (fraction kept), "
                              f"got {v!r} of type {type(v).__name__}")
        if isinstance(v, numbers.Integral):
            if v < 1:
                raise BudgetError(f"an int budget counts tokens kept and must be >= 1, got {v}")
            object.__setattr__(self, "value", int(v))
        else:
            v = float(v)
            if not math.isfinite(v) or not 0.0 < v <= 1.0:
                raise BudgetError(f"a float budget is the fraction of tokens kept and must be in (0, 1], got {v}"
                                  + ("; for a count pass an int" if math.isfinite(v) and v > 1 else ""))
            object.__setattr__(self, "value", v)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.value, float)

    def resolve(self, n: int) -> int:
        """Tokens kept out of ``n`` valid tokens (``0 <= result <= n``)."""
        if n <= 0:
            return 0
        if self.is_fraction:
            return max(1, min(n, math.floor(self.value * n + 0.5)))
        return min(int(self.value), n)

    def resolve_batch(self, n_valid: torch.Tensor) -> torch.Tensor:
        """Per-sample counts: long ``[B]`` from the valid counts ``n_valid`` (long ``[B]``)."""
        return torch.tensor([self.resolve(int(n)) for n in n_valid.tolist()], dtype=torch.long,
                            device=n_valid.device)

    def to_config(self):
        return self.value


def as_budget(value) -> Budget:
    """Coerce an int, a float or a :class:`Budget` to a :class:`Budget` (raises :class:`BudgetError`)."""
    if value is None:
        raise BudgetError("a budget is required: an int (tokens kept) or a float in (0, 1] (fraction kept)")
    return value if isinstance(value, Budget) else Budget(value)
