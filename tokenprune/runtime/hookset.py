"""Everything a pruning context changes on a model, and how it is undone.

A :class:`HookSet` is the only place that touches the model: forward (pre-)hooks, an instance
attribute that shadows a method (``get_image_features``), the attention implementation name of a
sub-config, and capture callbacks in the attention wrapper's target table. Each change is recorded
with its undo as it is made, and :meth:`HookSet.close` undoes them in reverse order, so a context
that fails half-way through entering is restored as completely as one that exits normally.
"""

from __future__ import annotations

import functools

from . import attention as attn


class HookSet:
    """Changes to a model, undone in reverse order by :meth:`close`."""

    def __init__(self):
        self._undo: list = []
        self._switched: list = []  # configs whose attention name is switched

    def __len__(self) -> int:
        return len(self._undo)

    def add_handle(self, handle) -> None:
        """Take ownership of a ``torch.utils.hooks.RemovableHandle``."""
        self._undo.append(handle.remove)

    def forward_pre_hook(self, module, hook) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=True)``, removed on close."""
        self.add_handle(module.register_forward_pre_hook(hook, with_kwargs=True))

    def forward_hook(self, module, hook) -> None:
        """``module.register_forward_hook(hook, with_kwargs=True)``, removed on close."""
        self.add_handle(module.register_forward_hook(hook, with_kwargs=True))

    def wrap_method(self, obj, name: str, around) -> None:
        """Shadow the method ``obj.name`` with an instance attribute calling ``around(original, args, kwargs)``.

        No class is modified; close deletes the instance attribute (or puts back the instance attribute
        that was there, e.g. another context's wrapper), so the method shows as before.
        """
        original = getattr(obj, name)
        missing = object()
        previous = obj.__dict__.get(name, missing)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            return around(original, args, kwargs)

        setattr(obj, name, wrapper)

        def restore():
            if previous is missing:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        self._undo.append(restore)

    def switch_attention(self, config) -> None:
        """Point ``config`` at the tokenprune attention wrapper of its implementation (once per config).

        Raises
        ------
        UnsupportedModelError
            The implementation has no mask function the wrapper can reuse.
        """
        if any(c is config for c in self._switched):
            return
        saved = getattr(config, "_attn_implementation_internal", None)
        name = attn.wrapper_name(config._attn_implementation)
        self._switched.append(config)
        config._attn_implementation_internal = name

        def restore():
            config._attn_implementation_internal = saved
            self._switched = [c for c in self._switched if c is not config]

        self._undo.append(restore)

    def capture_attention(self, module, callback) -> None:
        """Call ``callback(module, query, key, attention_mask, kwargs)`` whenever ``module`` attends."""
        attn._TARGETS[id(module)] = callback
        self._undo.append(lambda: attn._TARGETS.pop(id(module), None))

    def close(self) -> None:
        """Undo every change, last first. Safe to call more than once."""
        while self._undo:
            self._undo.pop()()
