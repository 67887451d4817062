"""Building methods from the method registry: the one place that calls registered factories.

A registered method is a factory ``name(budget=..., **params) -> PruningMethod`` (see
:mod:`tokenprune.methods`). This module looks factories up in the ground-layer registry
(:data:`tokenprune.registry.methods`), checks the parameters they accept, and builds methods from a
name, a method, or a config dict. :mod:`tokenprune.api` re-exports these functions; code inside the
package imports them from here.
"""

from __future__ import annotations

import inspect
from typing import Callable

from ..errors import ConfigError, IncompatibleComponentsError
from ..registry import methods as _registry
from .compose import PruningMethod, built_as

__all__ = ["method_factory", "accepted_parameters", "create_method", "resolve_method", "method_from_config"]

_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def method_factory(name: str) -> Callable[..., PruningMethod]:
    """The factory registered as method ``name`` (or an alias of it).

    Parameters
    ----------
    name : str
        A registered method name, e.g. ``"tops"``.

    Returns
    -------
    callable
        ``factory(budget=..., **params) -> PruningMethod``.

    Raises
    ------
    UnknownNameError
        No method of that name (the message suggests close names).
    TypeError
        ``name`` is not a str.

    Examples
    --------
    >>> method_factory("fastv").__name__
    'fastv'
    """
    return _registry.get(name)


def _factory_parameters(factory) -> frozenset | None:
    """Keyword names ``factory`` accepts, or ``None`` if it takes ``**kwargs`` or has no signature.

    ``O(P)`` in the number of parameters.
    """
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in _NAMED_KINDS)


def accepted_parameters(name: str) -> frozenset[str] | None:
    """The keyword parameters the method factory ``name`` accepts.

    The single place where a factory's signature is inspected (parameter validation in
    :func:`create_method`, adapters' default schedules, the evaluation runner's ``seed``).

    Parameters
    ----------
    name : str
        A registered method name.

    Returns
    -------
    frozenset of str or None
        The factory's keyword names (``budget`` included), or ``None`` when it takes ``**kwargs``
        (or its signature cannot be read), i.e. when any keyword may be passed.

    Raises
    ------
    UnknownNameError
        No method of that name.

    Examples
    --------
    >>> sorted(accepted_parameters("scope"))
    ['alpha', 'budget', 'combine']
    """
    return _factory_parameters(method_factory(name))


def create_method(name: str, **params) -> PruningMethod:
    """Build the registered method ``name`` with ``params`` (``budget`` and method options).

    Parameters
    ----------
    name : str
        A registered method name (:func:`tokenprune.list_methods`).
    **params
        Keyword arguments of the method's factory, e.g. ``budget=64``; omitted ones take the
        factory's defaults.

    Returns
    -------
    PruningMethod
        With ``name`` and ``params`` recorded (``params`` holds only what was passed), so it
        round-trips through :meth:`~PruningMethod.to_config` and :meth:`~PruningMethod.with_budget`.

    Raises
    ------
    UnknownNameError
        No method of that name (the message suggests close names).
    IncompatibleComponentsError
        A parameter the method does not take (a ``TypeError``; the message names the method and
        the parameters it takes), or a factory that does not return a :class:`PruningMethod`.
    BudgetError, StageError, ConfigError, ValueError
        Whatever the factory raises for invalid values.

    Examples
    --------
    >>> import tokenprune as tp
    >>> m = tp.create_method("scope", budget=32, alpha=0.5)
    >>> m.name, m.params, m.nominal_budget.value
    ('scope', {'budget': 32, 'alpha': 0.5}, 32)
    """
    factory = method_factory(name)
    accepted = _factory_parameters(factory)
    if accepted is not None:
        unknown = sorted(k for k in params if k not in accepted)
        if unknown:
            raise IncompatibleComponentsError(f"method {name!r} takes no parameter(s) {unknown}; it takes "
                                              f"{sorted(accepted)}")
    return built_as(factory(**params), name, params)


def method_from_config(cfg: dict) -> PruningMethod:
    """Rebuild a method from :meth:`PruningMethod.to_config` output.

    Parameters
    ----------
    cfg : dict
        ``{"name", "params", "nominal_budget", "stages"}``; ``nominal_budget`` may be absent
        (configs written before it existed).

    Returns
    -------
    PruningMethod

    Raises
    ------
    ConfigError
        Not a dict, no ``stages``, or a stage that cannot be rebuilt.

    Examples
    --------
    >>> import tokenprune as tp
    >>> m = tp.create_method("fastv")
    >>> method_from_config(m.to_config()) == m
    True
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"a method config is a dict, got {type(cfg).__name__}")
    return PruningMethod.from_config(cfg)


def resolve_method(method, **params) -> PruningMethod:
    """A :class:`PruningMethod` from a method, a registered name, or a config dict.

    Parameters
    ----------
    method : PruningMethod, str or dict
        A method (returned as is), a registered name (built by :func:`create_method` with
        ``params``), or a config dict (:func:`method_from_config`).
    **params
        Factory parameters, used only with a name.

    Returns
    -------
    PruningMethod

    Raises
    ------
    IncompatibleComponentsError
        ``method`` is of another type, or an unknown parameter for a name.
    UnknownNameError, ConfigError
        From :func:`create_method` or :func:`method_from_config`.

    Examples
    --------
    >>> resolve_method("random", budget=8).nominal_budget.value
    8
    """
    if isinstance(method, PruningMethod):
        return method
    if isinstance(method, str):
        return create_method(method, **params)
    if isinstance(method, dict):
        return method_from_config(method)
    raise IncompatibleComponentsError(f"expected a PruningMethod, a registered method name or a config dict, "
                                      f"got {type(method).__name__}")
