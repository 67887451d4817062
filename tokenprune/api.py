"""The public functional API: registries, ``get_method`` and ``select``."""

from __future__ import annotations

import inspect

from . import registry as _reg
from .errors import ConfigError, IncompatibleComponentsError
from .methods.compose import PruningMethod
from .selection import Selection

register_criterion, get_criterion, list_criteria = _reg.make_api(_reg.criteria)
register_selector, get_selector, list_selectors = _reg.make_api(_reg.selectors)
register_adapter, get_adapter, list_adapters = _reg.make_api(_reg.adapters)
_register_method, _get_method_factory, list_methods = _reg.make_api(_reg.methods)


def register_method(name=None, factory=None, **kw):
    """Register a method factory: a callable ``(budget=..., **params) -> PruningMethod``.

    Usable as a decorator, ``@register_method("my_method")``, or called directly. The registry
    entry-point group is ``tokenprune.methods``.
    """
    return _register_method(name, factory, **kw)


def get_method(name: str, **params) -> PruningMethod:
    """Build the registered method ``name`` with ``params`` (``budget`` and method options).

    Raises
    ------
    UnknownNameError
        No method of that name (the message suggests close names).
    TypeError
        A parameter the method does not take.
    """
    factory = _get_method_factory(name)
    sig = inspect.signature(factory)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters and not accepts_any]
    if unknown:
        raise TypeError(f"method {name!r} takes no parameter(s) {unknown}; it takes "
                        f"{[p for p in sig.parameters]}")
    method = factory(**params)
    if not isinstance(method, PruningMethod):
        raise IncompatibleComponentsError(f"method factory {name!r} returned {type(method).__name__}, "
                                          "not a PruningMethod")
    bound = {k: v for k, v in params.items()}
    return PruningMethod(stages=method.stages, name=name, params=bound)


def from_config(cfg: dict) -> PruningMethod:
    """Rebuild a method from :meth:`PruningMethod.to_config` output (raises :class:`ConfigError`)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a method config is a dict, got {type(cfg).__name__}")
    return PruningMethod.from_config(cfg)


def resolve_method(method, **params) -> PruningMethod:
    """A :class:`PruningMethod` from a method, a registered name, or a config dict."""
    if isinstance(method, PruningMethod):
        return method
    if isinstance(method, str):
        return get_method(method, **params)
    if isinstance(method, dict):
        return from_config(method)
    raise IncompatibleComponentsError(f"expected a PruningMethod, a registered method name or a config dict, "
                                      f"got {type(method).__name__}")


def select(method, features, *, budget, relevance=None, mask=None, stage: int = 0, **signals) -> Selection:
    """Select visual tokens with a method, on plain tensors.

    Parameters
    ----------
    method : PruningMethod, str or dict
        A method, a registered method name (built with its defaults), or a config.
    features : torch.Tensor
        ``[B, N, D]`` (or ``[N, D]``) visual-token features, fp32, fp16 or bf16.
    budget : int or float
        Tokens kept (int >= 1) or fraction kept (float in (0, 1]); at or above the valid count keeps all.
    relevance : torch.Tensor, optional
        ``[B, N]`` relevance scores ([CLS] or text attention, ...), for methods that need them.
    mask : torch.Tensor, optional
        ``[B, N]`` bool validity mask; padding is never selected.
    stage : int
        Which stage's selection core to run, for multi-stage methods (default: the first).
    **signals
        ``text_embeddings`` ``[B, T, D]``, ``text_mask`` ``[B, T]``, ``grid`` ``(rows, cols)``, ``seed``,
        or plugin signals.

    Returns
    -------
    Selection
        ``indices`` long ``[B, K]`` ascending, ``order``, ``gains`` and ``valid``.

    Raises
    ------
    BudgetError, ShapeError, InvalidFeaturesError, MissingSignalError, UnknownNameError

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> feats, r = torch.randn(2, 576, 64), torch.rand(2, 576)
    >>> tp.select("tops", feats, relevance=r, budget=64).indices.shape
    torch.Size([2, 64])
    """
    m = resolve_method(method)
    return m.select(features, budget=budget, relevance=relevance, mask=mask, stage=stage, **signals)
