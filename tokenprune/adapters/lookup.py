"""Finding the adapter for a model: by ``config.model_type`` in the adapter registry, or as given."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..registry import adapters as _registry
from .base import ModelAdapter


def get_model_adapter(model, adapter=None) -> ModelAdapter:
    """The adapter instance for ``model``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The VLM.
    adapter : ModelAdapter, type, str or None
        An adapter instance, an adapter class, a registered adapter name, or ``None`` to pick by
        ``model.config.model_type``.

    Raises
    ------
    UnsupportedModelError
        No adapter is registered for the model type (the message lists the supported types).
    """
    if isinstance(adapter, ModelAdapter):
        return adapter
    if isinstance(adapter, type) and issubclass(adapter, ModelAdapter):
        return adapter(model)
    if isinstance(adapter, str):
        return _registry.get(adapter)(model)
    if adapter is not None:
        raise UnsupportedModelError(f"adapter must be a ModelAdapter, a subclass or a registered name, "
                                    f"got {type(adapter).__name__}")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt is None or mt not in _registry:
        raise UnsupportedModelError(
            f"no tokenprune adapter for model type {mt!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(_registry.list())}. Pass adapter=... (a ModelAdapter subclass) for another family.")
    return _registry.get(mt)(model)
