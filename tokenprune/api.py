"""The public functional API: a thin facade over the registries, the method builders and ``select``.

Everything here is re-exported as ``tokenprune.<name>``. Following timm's convention,
``get_criterion`` / ``get_selector`` / ``get_adapter`` return the registered *class*, and
``create_criterion`` / ``create_selector`` / ``create_method`` build *instances*. ``get_method`` is a
deprecated alias of :func:`create_method`. Code inside the package imports from the modules that
define these (:mod:`tokenprune.methods.build`, :mod:`tokenprune.registry`), never from this facade.
"""

from __future__ import annotations

import warnings

from . import registry as _reg
from .criteria.base import Criterion
from .methods.build import accepted_parameters, create_method, method_factory, method_from_config, resolve_method
from .methods.compose import PruningMethod
from .selection import Selection
from .selectors.base import Selector

__all__ = ["select", "create_method", "get_method", "resolve_method", "from_config", "method_from_config",
           "method_factory", "accepted_parameters", "register_method", "list_methods", "create_criterion",
           "get_criterion", "list_criteria", "register_criterion", "create_selector", "get_selector",
           "list_selectors", "register_selector", "get_adapter", "list_adapters", "register_adapter"]

register_criterion, get_criterion, list_criteria = _reg.make_api(_reg.criteria)
register_selector, get_selector, list_selectors = _reg.make_api(_reg.selectors)
register_adapter, get_adapter, list_adapters = _reg.make_api(_reg.adapters)
_register_method, _, list_methods = _reg.make_api(_reg.methods)
_get_method_factory = method_factory  # the former private name, kept for compatibility

#: Rebuild a method from :meth:`PruningMethod.to_config` output (:func:`method_from_config`).
from_config = method_from_config


def register_method(name=None, factory=None, **kw):
    """Register a method factory: a callable ``(budget=..., **params) -> PruningMethod``.

    Usable as a decorator, ``@register_method("my_method")``, or called directly; keywords
    (``aliases``, ``overwrite``, ...) as :meth:`tokenprune.registry.Registry.register`. The
    entry-point group for plugins is ``tokenprune.methods``.

    Raises
    ------
    ValueError
        The name is not lower-case snake case.
    DuplicateNameError
        The name is taken and ``overwrite`` is false.
    """
    return _register_method(name, factory, **kw)


def create_criterion(name: str, **params) -> Criterion:
    """An instance of the criterion registered as ``name``, built with ``params``.

    Parameters
    ----------
    name : str
        A registered criterion name or alias (:func:`list_criteria`).
    **params
        The criterion's constructor parameters.

    Returns
    -------
    Criterion

    Raises
    ------
    UnknownNameError
        No criterion of that name.
    TypeError, ValueError
        Parameters the criterion does not take or rejects.

    Examples
    --------
    >>> create_criterion("saliency_coverage", alpha=2.0).alpha
    2.0
    """
    return _reg.criteria.create(name, **params)


def create_selector(name: str, **params) -> Selector:
    """An instance of the selector registered as ``name``, built with ``params``.

    Parameters
    ----------
    name : str
        A registered selector name or alias (:func:`list_selectors`).
    **params
        The selector's constructor parameters.

    Returns
    -------
    Selector

    Raises
    ------
    UnknownNameError
        No selector of that name.
    TypeError, ValueError
        Parameters the selector does not take or rejects.

    Examples
    --------
    >>> create_selector("greedy", lazy=True).lazy
    True
    """
    return _reg.selectors.create(name, **params)


def get_method(name: str, **params) -> PruningMethod:
    """Deprecated alias of :func:`create_method` (emits :class:`DeprecationWarning`).

    ``get_*`` functions return registered classes and ``create_*`` functions build instances;
    ``get_method`` builds an instance, so it is renamed :func:`create_method`. Same parameters,
    result and errors.

    Raises
    ------
    UnknownNameError, IncompatibleComponentsError
        As :func:`create_method`.
    """
    warnings.warn("tokenprune.get_method is deprecated; use tokenprune.create_method (same arguments)",
                  DeprecationWarning, stacklevel=2)
    return create_method(name, **params)


def select(method, features, *, budget, relevance=None, mask=None, stage: int = 0, **signals) -> Selection:
    """Select visual tokens with a method, on plain tensors.

    Parameters
    ----------
    method : PruningMethod, str or dict
        A method, a registered method name (built with its defaults), or a config.
    features : torch.Tensor
        ``[B, N, D]`` (or ``[N, D]``) visual-token features, fp32, fp16 or bf16.
    budget : int, float or None
        Tokens kept (int >= 1) or fraction kept (float in (0, 1]); at or above the valid count keeps all.
        Required, so that a selection never depends silently on a method's default; ``None`` says so
        explicitly: the stage's own budget (for a registered method, its default, e.g. 64).
    relevance : torch.Tensor, optional
        ``[B, N]`` relevance scores ([CLS] or text attention, ...), for methods that need them.
    mask : torch.Tensor, optional
        ``[B, N]`` bool validity mask; padding is never selected.
    stage : int
        Which stage's selection core to run, for multi-stage methods (default: the first).
    **signals
        ``text_embeddings`` ``[B, T, D]``, ``text_mask`` ``[B, T]``, ``text_relevance`` ``[B, T]`` (DART's
        text pivots), ``grid`` ``(rows, cols)``, ``seed``, ``compute_dtype`` (``"float32"``, the default,
        or ``"model"``: similarities in the features' own dtype), or plugin signals with leading dims
        ``[B, N]`` (e.g. ``positions``, ``keys``, ``coords``).

    Returns
    -------
    Selection
        ``indices`` long ``[B, K]`` ascending, ``order``, ``gains`` and ``valid``.

    Raises
    ------
    BudgetError, ShapeError, InvalidFeaturesError, MissingSignalError, UnknownNameError
    StageIndexError
        ``stage`` is not one of the method's stages (also an ``IndexError``).
    ParameterError
        A ``seed`` that is not an int.

    Notes
    -----
    The cost is the selector's (e.g. ``O(K N²)`` for greedy coverage, ``O(N log N)`` for top-k).

    Examples
    --------
    >>> import torch, tokenprune as tp
    >>> feats, r = torch.randn(2, 576, 64), torch.rand(2, 576)
    >>> tp.select("tops", feats, relevance=r, budget=64).indices.shape
    torch.Size([2, 64])
    """
    m = resolve_method(method)
    return m.select(features, budget=budget, relevance=relevance, mask=mask, stage=stage, **signals)
