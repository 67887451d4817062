"""Share the vision side across configurations: the vision tower runs once per image batch.

A sweep over methods and budgets runs the same images through the same vision tower and projector
again and again, although only the LLM side differs. :class:`VisionCache` keeps the output of the
model's ``get_image_features`` (the projected features and whatever else the model returns) and the
vision signals captured during it (the [CLS] attention row, or the mean attention per patch), keyed
by the call's inputs, and hands them back to every later call with the same inputs: to pruning
contexts (``tokenprune.prune(..., vision_cache=cache)``) and to unpruned calls
(``with cache.attach(model): ...``).
"""

from __future__ import annotations

import copy
import hashlib
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import TokenPruneError
from .hookset import HookSet
from .state import bind_arguments


def _tensors(obj):
    """Every tensor inside ``obj`` (a tensor, a model output, a dict, list or tuple of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def _nbytes(obj) -> int:
    """Bytes held by the tensors inside ``obj`` (shared storages counted once)."""
    seen, total = set(), 0
    for t in _tensors(obj):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _flatten(arguments: dict) -> dict:
    """Arguments with lists and tuples of tensors spread into ``name[i]`` entries (so each is compared)."""
    out = {}
    for name, v in arguments.items():
        if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
            for i, x in enumerate(v):
                out.update(_flatten({f"{name}[{i}]": x}))
        else:
            out[name] = v
    return out


def _fingerprint(t: torch.Tensor) -> str:
    """A cheap digest of a tensor's shape, dtype, device and a strided sample of its values.

    Only a lookup key: a hit is confirmed by comparing the whole tensor (see :meth:`VisionCache.get`).
    """
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].to("cpu", copy=True).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(t.shape), str(t.dtype), str(t.device))).encode())
    h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


class ModelKeys:
    """The part of a cache key that names a model: its identity (while it is alive), the dtype and
    device of its parameters and the sum of their in-place version counters (a weight update changes it).

    Shared by :class:`VisionCache` and :class:`~tokenprune.PrefixCache`. A model seen at the address of
    a dead one is a new model: ``forget(id(model))`` is called so the cache drops the dead one's entries.
    """

    def __init__(self):
        self._refs: dict = {}  # id(model) -> weakref, to tell a dead model's id from a new one's

    def clear(self) -> None:
        self._refs.clear()

    def key(self, model, forget) -> tuple:
        """``(id, dtype, device, parameter versions)`` of ``model``."""
        ref = self._refs.get(id(model))
        if ref is None or ref() is not model:
            forget(id(model))
            self._refs[id(model)] = weakref.ref(model)
        params = list(model.parameters())
        first = params[0] if params else None
        return (id(model), None if first is None else str(first.dtype), None if first is None else str(first.device),
                sum(p._version for p in params))


@dataclass
class _Entry:
    """One cached ``get_image_features`` call."""

    inputs: dict                       # name -> (tensor, its _version when stored)
    output: object
    signals: dict = field(default_factory=dict)     # kind -> float32 tensor
    compute_ms: dict = field(default_factory=dict)  # None (output) or kind -> wall ms of computing it
    nbytes: int = 0


class VisionCache:
    """The vision side of a model, computed once per distinct image batch and reused.

    Parameters
    ----------
    max_bytes : int
        Upper bound on the memory held by the entries (outputs, captured signals and the input
        tensors they are checked against), in bytes. Least recently used entries are dropped first;
        a single entry larger than the bound is not kept. Default 2 GiB.

    Notes
    -----
    **Keys.** An entry is found by the model (its identity, alive), the dtype and device of its
    parameters, the sum of the parameters' in-place version counters (so training steps or
    ``load_state_dict`` in between invalidate everything), and every argument of the call: tensors by
    shape, dtype, device and a sampled digest, other values by ``repr``. A hit is then confirmed by
    comparing each input tensor in full with the one stored (``torch.equal``), after checking that the
    stored one was not modified in place since. So another image, dtype, device or model never hits a
    stale entry.

    **What is kept.** References to the call's input tensors (not copies), the model's output object
    as returned (every call gets a shallow copy of it: the same tensors in a new container, since
    ``generate`` with beams replaces the container's ``pooler_output`` with a repeated one), and per
    signal kind (``"cls"``: the [CLS] attention row, ``"mean"``: mean attention per patch; for stages
    before the projector, ``site="vision"``, ``"cls+keys"``, ``"mean+keys"`` or ``"keys"``: that row
    and the feature layer's head-averaged keys) the float32 signal. A pruning context that needs a
    signal the entry lacks runs the tower once more with the capture on and adds the signal to the
    entry.

    **Stages before the projector.** They never change what ``get_image_features`` returns: they read
    the feature layer's hidden states, which its output carries (``hidden_states``) and the cache
    keeps with it, and the keys, cached as a signal; the projector runs again on their kept tokens
    during the prefill. So an entry is the same whichever context (pruned, unpruned, before or after
    the projector) filled it.

    **Exactness.** A hit returns exactly what the miss computed; the vision tower in eval mode is
    deterministic for the same inputs, so results equal recomputing (the evaluation tests compare
    full records bit for bit). Training-mode dropout would make recomputation differ: use the cache
    with models in eval mode.

    Complexity: a lookup costs one sampled digest per input tensor, plus one full comparison on a hit.

    Examples
    --------
    >>> import tokenprune as tp
    >>> cache = tp.VisionCache(max_bytes=1 << 30)
    >>> cache.stats()["entries"]
    0
    """

    def __init__(self, max_bytes: int = 2 << 30):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise TokenPruneError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._models = ModelKeys()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.compute_ms = 0.0  # wall time spent computing entries (misses and added signals)
        self.saved_ms = 0.0    # compute time of the entries handed out on hits

    # -- bookkeeping -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """``entries``, ``bytes``, ``hits``, ``misses``, ``compute_ms`` and ``saved_ms`` so far."""
        return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "compute_ms": self.compute_ms, "saved_ms": self.saved_ms}

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._models.clear()
        self.nbytes = 0

    def _model_key(self, model) -> tuple:
        return self._models.key(model, self._forget)

    def _forget(self, model_id: int) -> None:
        """Drop the entries of a dead model whose address ``model_id`` a new model now has."""
        self._entries = OrderedDict((k, e) for k, e in self._entries.items() if k[0] != model_id)
        self.nbytes = sum(e.nbytes for e in self._entries.values())

    def key(self, model, arguments: dict) -> tuple:
        """The lookup key of a ``get_image_features`` call of ``model`` with ``arguments`` (flattened, by name).

        An argument left at ``None`` that names an attribute of ``model.config`` (``vision_feature_layer``,
        ``vision_feature_select_strategy``) stands for that attribute, as in transformers' models, so a call
        that passes the config's value explicitly gets the same key.
        """
        config = getattr(model, "config", None)
        parts = []
        for name in sorted(arguments):
            v = arguments[name]
            if v is None and config is not None and name in getattr(config, "__dict__", {}):
                v = getattr(config, name)
            parts.append((name, _fingerprint(v) if isinstance(v, torch.Tensor) else repr(v)))
        return self._model_key(model) + tuple(parts)

    # -- lookup and store ----------------------------------------------------------------------------
    def get(self, key: tuple, arguments: dict) -> _Entry | None:
        """The entry stored under ``key`` for exactly these ``arguments``, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        for name, (stored, version) in entry.inputs.items():
            given = arguments.get(name)
            if stored._version != version:  # modified in place since: the entry describes other inputs
                self._drop(key)
                return None
            if given is not stored and not (isinstance(given, torch.Tensor) and given.shape == stored.shape
                                            and given.dtype == stored.dtype and torch.equal(given, stored)):
                return None
        self._entries.move_to_end(key)
        return entry

    def _drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def _store(self, key, arguments: dict, output, signals: dict, ms: float) -> None:
        inputs = {n: (v, v._version) for n, v in arguments.items() if isinstance(v, torch.Tensor)}
        entry = _Entry(inputs=inputs, output=output, compute_ms={None: ms})
        for kind, value in signals.items():
            if value is not None:
                entry.signals[kind] = value
                entry.compute_ms[kind] = ms
        entry.nbytes = _nbytes((output, [t for t, _ in inputs.values()], list(entry.signals.values())))
        self._drop(key)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def fetch(self, model, arguments: dict, compute, signal_kind: str | None = None):
        """The output (and signal) of a ``get_image_features`` call, from the cache or computed.

        Parameters
        ----------
        model : torch.nn.Module
            The model whose vision side is called (part of the key).
        arguments : dict
            The call's arguments by name, defaults filled in (``bind_arguments(..., defaults=True)``).
        compute : callable
            ``compute() -> (output, signal or None)``: runs the call (with the capture of
            ``signal_kind`` on, if one is asked for); or ``(output, signal, also)`` where ``also`` maps
            further signal kinds the same pass captured to their values (stored too, so a later
            context that needs one of them does not run the tower again).
        signal_kind : {None, "cls", "mean"}
            The vision signal the caller needs along with the output.

        Returns
        -------
        (output, signal)
            ``signal`` is ``None`` when ``signal_kind`` is ``None``.
        """
        arguments = _flatten(arguments)
        key = self.key(model, arguments)
        entry = self.get(key, arguments)
        if entry is not None and (signal_kind is None or signal_kind in entry.signals):
            self.hits += 1
            self.saved_ms += entry.compute_ms[None] + (entry.compute_ms.get(signal_kind, 0.0) if signal_kind else 0.0)
            return copy.copy(entry.output), entry.signals.get(signal_kind) if signal_kind else None
        self.misses += 1
        t0 = time.perf_counter()
        output, signal, *rest = compute()
        ms = (time.perf_counter() - t0) * 1e3
        self.compute_ms += ms
        signals = dict(rest[0]) if rest else {}
        if signal_kind is not None and signal is not None:
            signals[signal_kind] = signal
        if entry is not None:  # the output was cached, the signal was not: add it (and what came along)
            for kind, value in signals.items():
                if kind not in entry.signals and value is not None:
                    entry.signals[kind] = value
                    entry.compute_ms[kind] = ms
                    entry.nbytes += _nbytes(value)
                    self.nbytes += _nbytes(value)
            return copy.copy(entry.output), signal
        self._store(key, arguments, output, signals, ms)
        return copy.copy(output), signal

    # -- unpruned calls ------------------------------------------------------------------------------
    def attach(self, model, adapter=None) -> "_Attached":
        """A context in which ``model``'s unpruned calls read and fill this cache.

        Parameters
        ----------
        model : transformers.PreTrainedModel
            A model with a tokenprune adapter.
        adapter : ModelAdapter, type or str, optional
            As for :func:`tokenprune.prune`.

        Examples
        --------
        >>> with cache.attach(model):            # doctest: +SKIP
        ...     out = model(**inputs)            # the vision side is shared with pruned runs
        """
        from ..adapters import get_model_adapter

        return _Attached(self, model, get_model_adapter(model, adapter))

    def wrap_call(self, model, original, args, kwargs, signal_kind=None, compute=None):
        """Run ``original(*args, **kwargs)`` (a ``get_image_features``) through the cache.

        ``compute`` overrides how a miss is computed (it must return ``(output, signal)``); by default
        the call runs as it is, without a signal.
        """
        arguments = bind_arguments(original, args, kwargs, defaults=True)
        if compute is None:
            def compute():
                return original(*args, **kwargs), None
        return self.fetch(model, arguments, compute, signal_kind)


class _Attached:
    """``with cache.attach(model):``: ``get_image_features`` served from the cache, restored on exit."""

    def __init__(self, cache: VisionCache, model, adapter):
        self.cache, self.model, self.adapter = cache, model, adapter
        self._hooks = HookSet()

    def __enter__(self) -> VisionCache:
        try:
            self._hooks.wrap_method(self.adapter.base, "get_image_features", self._call)
        except BaseException:
            self._hooks.close()
            raise
        return self.cache

    def _call(self, original, args, kwargs):
        return self.cache.wrap_call(self.model, original, args, kwargs)[0]

    def __exit__(self, *exc):
        self._hooks.close()
        return False
