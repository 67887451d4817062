"""Share the unpruned first decoder layers across pruning contexts: computed once per prompt batch.

An in-LLM method whose first stage acts at decoder layer ``k`` (FastV, DART, ReverseFastV and
WindowFastV at layer 2, PyramidDrop at its first layer) runs layers ``0 .. k-1`` on the full prompt,
untouched: in a sweep over such methods and budgets, every configuration computes exactly the same
thing there. :class:`PrefixCache` records what those layers produced in one context (their output
hidden states, the keys and values they wrote into the KV cache, the post-RoPE queries their
attention saw) and replays it in later contexts whose layers receive the identical input, instead of
computing it again (``tokenprune.prune(..., prefix_cache=cache)``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import TokenPruneError
from . import attention as attn
from .hookset import HookSet
from .vision_cache import ModelKeys, _fingerprint


def _same(a, b) -> bool:
    """Whether two layer arguments are identical: tensors equal in shape, dtype, device and values
    (compared in full), tuples element-wise, anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


#: Decoder-layer arguments a replay must match (besides the hidden states): everything that, with the
#: weights, decides what the layer computes during a prefill.
_COMPARED = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


@dataclass
class _Layer:
    """What one decoder layer produced for one prompt batch."""

    output: object                 # the layer's return value (a tensor, or a tuple holding one)
    keys: torch.Tensor | None      # what it wrote into the KV cache
    values: torch.Tensor | None
    query: torch.Tensor | None     # post-RoPE queries its attention saw (for attention captures)
    attn_key: torch.Tensor | None  # post-RoPE keys its attention saw
    attn_mask: object = None
    attn_kwargs: dict = field(default_factory=dict)
    ms: float = 0.0


@dataclass
class _Entry:
    """The first layers of one prompt batch: their inputs (to confirm a hit) and outputs, by layer."""

    hidden: torch.Tensor           # layer 0's input hidden states (a copy)
    arguments: dict                # layer 0's other compared arguments (references)
    layers: list = field(default_factory=list)
    nbytes: int = 0


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class PrefixCache:
    """The unpruned first decoder layers of a model, computed once per distinct prompt batch.

    Parameters
    ----------
    max_bytes : int
        Upper bound on the memory held (per layer and prompt batch: the output hidden states, the keys
        and values written to the KV cache, the queries and keys the attention saw; plus each batch's
        input), in bytes.
        Least recently used batches are dropped first. Default 2 GiB.

    Notes
    -----
    **When it applies.** A pruning context given the cache shares layers ``0 .. k-1`` when its method
    has no stage before the LLM and its first in-LLM stage acts at layer ``k``: those layers then see
    the model's own prompt. Contexts with a stage before the LLM neither record nor replay.

    **Keys and exactness.** An entry is found by the model (identity, alive; parameter dtype, device
    and in-place version counters, so a weight update invalidates it) and a sampled digest of layer
    0's input hidden states; a hit is confirmed by comparing those hidden states in full and every
    other argument that decides the layer's output (attention mask, position ids and embeddings,
    cache positions) with ``torch.equal``. On a hit each shared layer writes the recorded keys and
    values into the KV cache, replays the attention capture a pruning stage reads at that layer (the
    recorded post-RoPE queries and keys, the same mask and scaling), and returns a copy of the recorded
    output; the next layer's input is that output, so the whole prefix equals recomputing it bit for
    bit (tested with full logits and ``generate`` outputs). Decoding steps never match (their input is
    one token) and run as usual. Layers in training mode are never shared.

    **Cost.** A lookup costs one sampled digest; a hit one full comparison of layer 0's input and its
    arguments, and one copy of each shared layer's output.

    Examples
    --------
    >>> import tokenprune as tp
    >>> tp.PrefixCache(max_bytes=1 << 30).stats()["entries"]
    0
    """

    def __init__(self, max_bytes: int = 2 << 30):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise TokenPruneError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, list]" = OrderedDict()
        self._models = ModelKeys()
        self.nbytes = 0
        self.hits = 0          # prefills whose shared layers were replayed
        self.misses = 0        # prefills that computed and recorded them
        self.layers_saved = 0  # decoder-layer calls replayed
        self.compute_ms = 0.0  # wall time of the layer calls recorded
        self.saved_ms = 0.0    # recorded wall time of the layer calls replayed

    def stats(self) -> dict:
        """``entries``, ``bytes``, ``hits``, ``misses``, ``layers_saved``, ``compute_ms`` and ``saved_ms``."""
        return {"entries": sum(len(v) for v in self._entries.values()), "bytes": self.nbytes, "hits": self.hits,
                "misses": self.misses, "layers_saved": self.layers_saved, "compute_ms": self.compute_ms,
                "saved_ms": self.saved_ms}

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._models.clear()
        self.nbytes = 0

    def _model_key(self, model) -> tuple:
        return self._models.key(model, self._forget)

    def _forget(self, model_id: int) -> None:
        """Drop the entries of a dead model whose address ``model_id`` a new model now has."""
        for k in [k for k in self._entries if k[0] == model_id]:
            self._drop(k)

    def _drop(self, key) -> None:
        for e in self._entries.pop(key, []):
            self.nbytes -= e.nbytes

    def _store(self, key, entry: _Entry) -> None:
        entry.nbytes = _nbytes(entry.hidden) + sum(
            _nbytes(*(_output_tensors(la.output)), la.keys, la.values, la.query, la.attn_key) for la in entry.layers)
        if entry.nbytes > self.max_bytes:
            return
        self._entries.setdefault(key, []).append(entry)
        self._entries.move_to_end(key)
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            bucket = self._entries[oldest]
            self.nbytes -= bucket.pop(0).nbytes
            if not bucket:
                del self._entries[oldest]

    def _find(self, key, hidden, arguments, depth: int) -> _Entry | None:
        for e in self._entries.get(key, []):
            if len(e.layers) >= depth and _same(e.hidden, hidden) and all(
                    _same(e.arguments.get(n), arguments.get(n)) for n in _COMPARED):
                self._entries.move_to_end(key)
                return e
        return None

    # -- unpruned calls --------------------------------------------------------------------------------
    def attach(self, model, depth: int, adapter=None) -> "_Attached":
        """A context in which ``model``'s unpruned prefills record (or replay) decoder layers
        ``0 .. depth-1``, for pruning contexts given this cache later.

        Parameters
        ----------
        model : transformers.PreTrainedModel
            A model with a tokenprune adapter.
        depth : int
            How many first layers to record: the largest first in-LLM layer of the methods that will
            share them (2 for FastV and DART). ``0`` records nothing.
        adapter : ModelAdapter, type or str, optional
            As for :func:`tokenprune.prune`.

        Raises
        ------
        TokenPruneError
            ``depth`` not an int in ``[0, number of decoder layers)``.

        Examples
        --------
        >>> with prefix.attach(model, depth=2):      # doctest: +SKIP
        ...     ref = model(**inputs)                # the unpruned reference records layers 0-1
        """
        from ..adapters import get_model_adapter

        ad = get_model_adapter(model, adapter)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth < ad.depth:
            raise TokenPruneError(f"depth must be an int in [0, {ad.depth}), got {depth!r}")
        return _Attached(self, model, ad, depth)

    # -- the runtime's side ----------------------------------------------------------------------------
    def share(self, hooks, adapter, depth: int, in_prefill) -> None:
        """Install, with ``hooks`` (a :class:`~tokenprune.runtime.hookset.HookSet`), the wrappers that
        record or replay decoder layers ``0 .. depth-1`` of ``adapter``'s model during prefills.

        ``in_prefill()`` says whether the current top-level call is a prefill of the context.
        """
        run = _PrefixRun(self, adapter, depth)
        for li, (layer, module) in enumerate(zip(run.layers, run.attention_modules)):
            hooks.wrap_method(layer, "forward", run.layer(li, in_prefill))
            hooks.switch_attention(module.config)
            hooks.capture_attention(module, run.attention(li, attn._TARGETS.get(id(module))))


def _output_tensors(output):
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, (tuple, list)):
        return tuple(o for o in output if isinstance(o, torch.Tensor))
    return ()


def _copy_output(output):
    """A detached copy of a layer's output (a tensor, or a tuple holding tensors)."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(o.detach().clone() if isinstance(o, torch.Tensor) else o for o in output)
    return output


def _cache_layer(cache, li: int):
    """The ``(keys, values)`` tensors a cache holds for layer ``li`` (``None`` if it has none)."""
    layers = getattr(cache, "layers", None)
    if layers is None or li >= len(layers):
        return None
    layer = layers[li]
    k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
    return (k, v) if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) else None


class _PrefixRun:
    """The record-or-replay state of one pruning context over the prefills it sees."""

    def __init__(self, cache: PrefixCache, adapter, depth: int):
        self.cache, self.adapter, self.depth = cache, adapter, depth
        self.layers = adapter.layers[:depth]  # resolved once: the wrappers run on every layer call
        self.attention_modules = [adapter.attention_module(li) for li in range(depth)]
        self.mode = None      # None (not sharing this call), "record" or "replay"
        self.entry = None
        self.key = None
        self.pending: dict = {}  # layer -> attention inputs seen while recording

    def layer(self, li: int, in_prefill):
        def around(original, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if li == 0:
                self.mode = None
                if in_prefill() and not self.layers[0].training and isinstance(hidden, torch.Tensor):
                    self._start(hidden, kwargs)
            if self.mode == "replay":
                return self._replay(li, kwargs)
            if self.mode != "record":
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            ms = (time.perf_counter() - t0) * 1e3
            self._record(li, out, kwargs, ms)
            return out
        return around

    def attention(self, li: int, downstream):
        def capture(module, query, key, attention_mask, kwargs):
            if self.mode == "record":
                self.pending[li] = (query.detach(), key.detach(), attention_mask,
                                    {k: kwargs[k] for k in ("scaling", "softcap") if k in kwargs})
            if downstream is not None:
                downstream(module, query, key, attention_mask, kwargs)
        return capture

    def _start(self, hidden, kwargs) -> None:
        cache = self.cache
        key = cache._model_key(self.adapter.model) + (_fingerprint(hidden),)
        arguments = {n: kwargs.get(n) for n in _COMPARED}
        entry = cache._find(key, hidden, arguments, self.depth)
        if entry is not None:
            self.mode, self.entry = "replay", entry
            cache.hits += 1
            return
        self.mode, self.key, self.pending = "record", key, {}
        self.entry = _Entry(hidden=hidden.detach().clone(), arguments=arguments)
        cache.misses += 1

    def _record(self, li: int, out, kwargs, ms: float) -> None:
        kv = _cache_layer(self.adapter.kv_cache(kwargs), li)
        q = self.pending.pop(li, None)
        self.entry.layers.append(_Layer(
            output=_copy_output(out),
            keys=None if kv is None else kv[0].detach().clone(), values=None if kv is None else kv[1].detach().clone(),
            query=None if q is None else q[0].clone(), attn_key=None if q is None else q[1].clone(),
            attn_mask=None if q is None else q[2], attn_kwargs={} if q is None else q[3], ms=ms))
        self.cache.compute_ms += ms
        if li == self.depth - 1:
            self.cache._store(self.key, self.entry)
            self.mode, self.entry, self.key = None, None, None

    def _replay(self, li: int, kwargs):
        rec = self.entry.layers[li]
        cache = self.adapter.kv_cache(kwargs)
        if cache is not None and rec.keys is not None:
            cache.update(rec.keys, rec.values, li)
        attn_module = self.attention_modules[li]
        capture = attn._TARGETS.get(id(attn_module))
        if capture is not None and rec.query is not None:
            capture(attn_module, rec.query, rec.attn_key, rec.attn_mask, dict(rec.attn_kwargs))
        self.cache.layers_saved += 1
        self.cache.saved_ms += rec.ms
        if li == self.depth - 1:
            self.mode, self.entry = None, None
        return _copy_output(rec.output)


class _Attached:
    """``with cache.attach(model, depth):``: unpruned prefills record their first layers; restored on exit."""

    def __init__(self, cache: PrefixCache, model, adapter, depth: int):
        self.cache, self.model, self.adapter, self.depth = cache, model, adapter, depth
        self._hooks = HookSet()
        self._prefill = False

    def __enter__(self) -> PrefixCache:
        if self.depth:
            try:
                self._hooks.forward_pre_hook(self.model, self._top)
                self.cache.share(self._hooks, self.adapter, self.depth, lambda: self._prefill)
            except BaseException:
                self._hooks.close()
                raise
        return self.cache

    def _top(self, module, args, kwargs):
        """A top-level call is a prefill when it has no KV cache yet."""
        pkv = self.adapter.kv_cache(kwargs)
        self._prefill = pkv is None or not hasattr(pkv, "get_seq_length") or pkv.get_seq_length() == 0
        return None

    def __exit__(self, *exc):
        self._hooks.close()
        return False
