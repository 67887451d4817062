"""Token budgets: how many visual tokens a stage keeps.

A budget is an ``int`` (tokens kept) or a ``float`` in (0, 1] (fraction of the valid tokens kept), as
``amount`` in :mod:`torch.nn.utils.prune`. It is validated when it is made and again against the
number of tokens at run time. A budget at or above the valid count keeps everything.
"""

from __future__ import annotations

import math
import numbers
import re
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
        """Whether the budget is a fraction kept (a float) rather than a count."""
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
        """The plain value (``int`` or ``float``), for configs."""
        return self.value


def as_budget(value) -> Budget:
    """Coerce an int, a float or a :class:`Budget` to a :class:`Budget` (raises :class:`BudgetError`)."""
    if value is None:
        raise BudgetError("a budget is required: an int (tokens kept) or a float in (0, 1] (fraction kept)")
    return value if isinstance(value, Budget) else Budget(value)


def round_count(x: float, minimum: int = 1) -> int:
    """A token count from a real number: rounded to the nearest int (halves up), at least ``minimum``.

    The one rounding rule of budgets: fractions of a token count (:meth:`Budget.resolve`), multiples
    of a nominal budget (TOPS's schedules) and shares of a budget (VisionZip's contextual tokens).

    Parameters
    ----------
    x : float
        A finite, non-negative number of tokens.
    minimum : int
        The smallest count returned (default 1: a budget never keeps nothing).

    Returns
    -------
    int

    Examples
    --------
    >>> round_count(2.5), round_count(0.2), round_count(0.2, minimum=0)
    (3, 1, 0)
    """
    return max(minimum, math.floor(x + 0.5))


_INT = re.compile(r"^[+]?\d+$")


def parse_budget(value):
    """Parse a budget given as text (the command line) or a number.

    Parameters
    ----------
    value : str, int or float
        A count (``"64"``: tokens kept), a fraction kept (``"0.25"``), or a percentage kept
        (``"25%"``).

    Returns
    -------
    int or float
        An int >= 1 or a float in (0, 1], a valid :class:`Budget` value.

    Raises
    ------
    BudgetError
        Anything else (text, zero, negative numbers, fractions above 1, percentages above 100).

    Examples
    --------
    >>> parse_budget("64"), parse_budget("0.25"), parse_budget("12.5%")
    (64, 0.25, 0.125)
    """
    if isinstance(value, bool):
        raise BudgetError(f"budget {value!r} is not a count (int >= 1) or a fraction (float in (0, 1])")
    if isinstance(value, (int, float)):
        return Budget(value).value
    s = str(value).strip()
    message = (f"budget {value!r} is not a count (an int >= 1, tokens kept) or a fraction kept "
               f"(a number in (0, 1], or a percentage such as '25%')")
    try:
        if s.endswith("%"):
            v = float(s[:-1]) / 100.0
            if not math.isfinite(v) or not 0.0 < v <= 1.0:
                raise ValueError
            return Budget(v).value
        if _INT.match(s):
            return Budget(int(s)).value
        v = float(s)
    except (ValueError, BudgetError):
        raise BudgetError(message) from None
    try:
        return Budget(v).value
    except BudgetError:
        # text has no int/float types: say what a count and a fraction are, not "a float budget"
        hint = "; for a count, write a whole number" if math.isfinite(v) and v > 1 else ""
        raise BudgetError(message + hint) from None
