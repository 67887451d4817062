"""Function signatures, read once per function.

The pruning hooks bind call arguments on every forward; ``inspect.signature`` costs about 20 µs a
call, a noticeable part of a batch-1 prefill's pruning overhead.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=256)
def _signature(function, bound: bool) -> inspect.Signature:
    sig = inspect.signature(function)
    return sig.replace(parameters=list(sig.parameters.values())[1:]) if bound else sig


def signature(function) -> inspect.Signature:
    """``inspect.signature(function)``, computed once per function (a bound method shares its
    function's, without ``self``): the hooks read signatures on every call, where
    ``inspect.signature`` costs about 20 µs.

    Raises
    ------
    TypeError, ValueError
        As ``inspect.signature`` does.
    """
    func = getattr(function, "__func__", None)
    try:
        return _signature(function, False) if func is None else _signature(func, True)
    except TypeError:  # unhashable callables
        return inspect.signature(function)
