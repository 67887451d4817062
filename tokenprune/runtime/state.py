"""Per-prompt state of a pruning context, and the small tensor helpers the runtime shares.

:class:`VisualTokens` says where the visual tokens of a batch are at one point of the forward and
what is known about them; :class:`PromptState` follows one pruned prompt from its prefill through its
decoding steps. Both are plain containers: the runtime's parts (prefill rewrite, layer surgery,
decode mapping, signal capture) read and update them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .._signature import signature

#: The two phases a forward call of a pruned prompt can be in.
PREFILL, DECODE = "prefill", "decode"


def gather(t: torch.Tensor, idx: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
    """Gather ``t`` along ``dim`` with per-sample indices.

    Parameters
    ----------
    t : torch.Tensor
        ``[B or 1, ...]``; a batch dimension of 1 (or expanded from 1) is broadcast to ``B``.
    idx : torch.Tensor
        long ``[B, L']``: indices along ``dim``; ``-1`` marks a hole, filled with ``fill``.
    dim : int
        The dimension gathered (``>= 1``).
    fill : scalar
        Value written at the holes.

    Returns
    -------
    torch.Tensor
        ``t`` with ``dim`` of size ``L'``, same dtype and device.

    Notes
    -----
    Along ``dim=1`` of a tensor with trailing dimensions (hidden states ``[B, L, D]``, coordinates
    ``[B, V, 4]``) whole rows are copied with one ``index_select`` over the flattened batch, about
    three times faster on a CPU than an element-wise ``torch.gather`` with an expanded index.
    """
    B, n = idx.shape
    safe = idx.clamp_min(0)
    holes = idx < 0
    if dim == 1 and t.dim() > 2:
        rest = t.shape[2:]
        if t.shape[0] == 1 or t.stride(0) == 0:  # one sample's rows, broadcast over the batch
            out = t[0].index_select(0, safe.reshape(-1)).view(B, n, *rest)
        else:
            L = t.shape[1]
            rows = safe + torch.arange(0, B * L, L, device=idx.device)[:, None]
            out = t.reshape(B * L, *rest).index_select(0, rows.reshape(-1)).view(B, n, *rest)
        if holes.any():
            out.masked_fill_(holes.view(B, n, *([1] * len(rest))), fill)
        return out
    if t.shape[0] != B:
        t = t.expand(B, *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = B, n
    size = list(t.shape)
    size[dim] = n
    out = torch.gather(t, dim, safe.view(shape).expand(size))
    if holes.any():
        out = out.masked_fill(holes.view(shape).expand(size), fill)
    return out


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B or 1, L, ...]`` at the rows ``idx`` (long ``[B, V]``; ``-1`` holes give rows of 0):
    ``gather(t, idx, 1)``, as a view of ``t`` when every sample takes the same run of consecutive rows
    (one image at the same place in every prompt: always at batch 1) or, for ``t`` ``[1, B * V, ...]``,
    sample ``b`` rows ``b * V .. b * V + V - 1`` (flattened features, as many per sample): no copy of
    ``[B, V, D]`` hidden states or features. The result is read-only for callers (it may be a view)."""
    B, V = idx.shape
    if V and t.shape[0] in (1, B):
        ar = torch.arange(V, device=idx.device)
        start = idx[:1, :1]
        if bool(((idx - start) == ar).all()) and int(start) >= 0:  # (-1, 0, 1, ...: a hole, not a run)
            return run_view(t, int(start), B, V)
        flat = t.shape[0] == 1 and t.shape[1] == B * V
        if flat and bool((idx == ar + V * torch.arange(B, device=idx.device)[:, None]).all()):
            return t[0].view(B, V, *t.shape[2:])  # the samples' rows one after the other (flattened features)
    return gather(t, idx, 1)


def run_view(t: torch.Tensor, start: int, B: int, V: int) -> torch.Tensor:
    """``t[:, start : start + V]`` (``t`` ``[B or 1, L, ...]``) as a ``[B, V, ...]`` view."""
    out = t[:, start: start + V]
    return out if out.shape[0] == B else out.expand(B, *out.shape[1:])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """long ``[B, L]``: consecutive positions of the valid (non-zero) entries of a 2-D mask, 0 at padding."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """long ``[B, n]``: the positions of each row's True entries, ascending, padded with ``-1``.

    ``n`` is the largest count of a row. One ``nonzero`` over the batch, each entry scattered to its
    rank within its row (no Python loop over samples).
    """
    B = mask.shape[0]
    if B == 1:
        return mask[0].nonzero().view(1, -1)
    rows, cols = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    n = int(counts.max()) if B else 0
    if cols.numel() == B * n:  # every row has n entries: the row-major positions are the answer
        return cols.view(B, n)
    rank = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    out = torch.full((B, n), -1, dtype=torch.long, device=mask.device)
    out[rows, rank] = cols
    return out


def max_rows(pos: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions to take maxima over.

    1-D position ids are returned as they are; M-RoPE ids (``[3 or 4, B, L]``) give the largest of the
    ``(t, h, w)`` rows (``generate``'s 4-row ids start with a plain text row, which is skipped).
    """
    if pos.dim() == 3:
        return (pos[1:] if pos.shape[0] == 4 else pos).amax(0)
    return pos


def bind_arguments(function, args, kwargs, *, defaults: bool = False) -> dict:
    """A call's arguments by parameter name, with ``**kwargs`` flattened in.

    With ``defaults``, the function's defaults are filled in too, so two calls that differ only in
    passing a default explicitly (the model's forward passes ``vision_feature_layer=None``, the
    pruning runtime leaves it out) give the same arguments.
    """
    if not args and not defaults:  # keywords only: binding would give them back as they are
        return dict(kwargs)
    try:
        bound = signature(function).bind_partial(*args, **kwargs)
        if defaults:
            bound.apply_defaults()
        bound = dict(bound.arguments)
    except (TypeError, ValueError):
        bound = dict(kwargs)
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    return bound


def as_list(t: torch.Tensor) -> list:
    """A 1-D integer tensor as a list of Python ints."""
    return [int(x) for x in t.tolist()]


@dataclass
class VisualTokens:
    """The visual tokens of a batch at one point of the forward, padded per sample.

    Attributes
    ----------
    pos : torch.Tensor
        long ``[B, V]``: positions in the current sequence, ascending in each row, then 0 at padding.
    valid : torch.Tensor
        bool ``[B, V]``: real entries (the rest is padding).
    orig : torch.Tensor
        long ``[B, V]``: index among the sample's original visual tokens (``-1`` at padding).
    protected : torch.Tensor
        bool ``[B, V]``: always kept, not candidates (``newlines="keep"``).
    dropped : torch.Tensor
        bool ``[B, V]``: removed by the first stage without being candidates (``newlines="drop"``).
    coords : torch.Tensor
        long ``[B, V, 4]``: ``(image, crop, row, col)``, ``-1`` unknown.
    cls : torch.Tensor or None
        float32 ``[B, V]``: the vision tower's [CLS] (or mean) attention, when captured.
    """

    pos: torch.Tensor
    valid: torch.Tensor
    orig: torch.Tensor
    protected: torch.Tensor
    dropped: torch.Tensor
    coords: torch.Tensor
    cls: torch.Tensor | None
    #: Some entry may be protected or dropped (``False``: known to be none, so every real visual token
    #: is a candidate).
    marked: bool = True
    #: :meth:`counts`, when known without reading ``valid`` (``None``: read on first call).
    known_counts: list | None = field(default=None, repr=False, compare=False)
    #: ``start`` when every sample's visual tokens are positions ``start .. start + V - 1``, ``None``
    #: when not, ``-1`` until :meth:`rows` first checks (one device sync per instance).
    run: int | None = field(default=-1, repr=False, compare=False)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B or 1, L, ...]`` at the visual tokens' positions: ``[B, V, ...]`` (padding entries: any
        row). A view of ``t`` when the visual tokens are one run at the same place in every sample (see
        :func:`take_rows`); read-only for callers."""
        if self.run == -1:  # rows ascend and padding sits at their end: first and last entries decide
            V = self.pos.shape[1]
            ends = self.pos[:, [0, -1]].tolist() if V else []
            s = ends[0][0] if ends else None
            self.run = s if ends and all(a == s and b - a == V - 1 for a, b in ends) else None
        B, V = self.pos.shape
        if self.run is None or t.shape[0] not in (1, B):
            return gather(t, self.pos, 1)
        return run_view(t, self.run, B, V)

    def take(self, keep: torch.Tensor, new_pos: torch.Tensor, counts: list | None = None) -> "VisualTokens":
        """Keep entries ``keep`` (bool ``[B, V]``); ``new_pos`` (long ``[B, V]``) are their new positions;
        ``counts``: the kept entries per sample, if known."""
        idx = true_positions(keep)
        valid = idx >= 0
        g = lambda t, fill=0: gather(t, idx, 1, fill)  # noqa: E731
        coords = gather(self.coords, idx, 1, -1) if idx.numel() else self.coords[:, :0]
        return VisualTokens(pos=g(new_pos), valid=valid, orig=g(self.orig, -1),
                            protected=g(self.protected, False) & valid, dropped=torch.zeros_like(valid),
                            coords=coords, cls=None if self.cls is None else g(self.cls, 0.0), marked=self.marked,
                            known_counts=None if counts is None else list(counts))

    def counts(self) -> list:
        """Visual tokens per sample (read once per instance)."""
        if self.known_counts is None:
            self.known_counts = as_list(self.valid.sum(1))
        return list(self.known_counts)

    def to(self, device) -> "VisualTokens":
        """A copy on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return VisualTokens(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


@dataclass
class PromptState:
    """One pruned prompt, from its prefill through its decoding steps.

    The prefill fills it in order: the before-LLM rewrite sets the sequence that enters the LLM
    (``llm_*``), the layer surgery follows the sequence through the decoder (``cur_*``, ``group*``),
    and the decode mapper reads what the prefill left (``next_pos``, ``shift``, ``layer_group``).
    """

    batch_size: int
    #: Prompt length as given.
    orig_len: int
    #: Prompt length entering the LLM.
    llm_len: int = 0
    #: ``[B, llm_len]`` 2-D mask passed to the model (``None``: none was passed).
    llm_mask: torch.Tensor | None = None
    #: The before-LLM stage changed the prompt.
    pre_changed: bool = False
    #: long ``[B]``: next position after the prompt (decoding without explicit positions).
    next_pos: torch.Tensor | None = None
    #: long ``[B]``: original minus passed positions (``positions="compact"`` before the LLM).
    shift: torch.Tensor | None = None
    visual: VisualTokens | None = None
    #: Sequence length at the current decoder layer (prefill).
    cur_len: int = 0
    #: bool ``[B, cur_len]``.
    cur_valid: torch.Tensor | None = None
    #: long ``[B, cur_len]``: indices into the LLM-entry sequence.
    group: torch.Tensor | None = None
    #: Some decoder-layer stage removed tokens (else ``group`` is the identity and nothing is gathered).
    dropped_tokens: bool = False
    #: long ``[B, cur_len]``: compacted positions (``None``: gathered from the originals).
    group_pos: torch.Tensor | None = None
    group_shift: torch.Tensor | None = None
    #: long ``[B, llm_len]``: 1-D positions entering the LLM.
    llm_pos: torch.Tensor | None = None
    #: decoder layer -> ``(group, group_shift or None)`` it ran with, for decoding.
    layer_group: dict = field(default_factory=dict)
    #: decoder layer -> ``{signal name: float32 [B, cur_len or V]}`` captured there.
    captures: dict = field(default_factory=dict)
    #: decoder layer -> what its attention call handed over (stage, query, key, mask, ...), until the
    #: stage reads it (:meth:`~tokenprune.runtime.signals.SignalCapture.layer_signal`).
    attention_inputs: dict = field(default_factory=dict)
    #: The :class:`~tokenprune.runtime.StageReport` of each stage run so far.
    stages: list = field(default_factory=list)
    #: ``(rows, cols)``: every sample's visual tokens as given are one whole patch grid, the same for all
    #: (the first stage's context gets it as ``grid``; ``None``: they are not, or it is not known).
    grid: tuple | None = None
    #: Visual tokens per sample after the before-LLM stage (or as given).
    counts_after_pre: list | None = None
    done_layers: set = field(default_factory=set)
    select_ms: float = 0.0
    #: Keys and values in the unpruned layers' cache at the current decoding step.
    decode_kv: int = 0
    #: The (empty) cache the prefill was given, if any.
    cache_in: object = None
    _padded: bool | None = None

    _PER_TOKEN = ("llm_mask", "cur_valid", "group", "group_pos", "group_shift", "llm_pos", "next_pos", "shift")

    def padded(self) -> bool:
        """Whether a sample of the sequence has padding. Read once per prefill (one device sync): pruning
        inside the LLM keeps every padding token, so the answer holds at every decoder layer."""
        if self._padded is None:
            self._padded = not bool(self.cur_valid.all())
        return self._padded

    def llm_valid(self) -> torch.Tensor:
        """bool ``[B, llm_len]``: the real tokens of the sequence that entered the LLM."""
        if self.llm_mask is not None:
            return self.llm_mask.bool()
        return torch.ones(self.batch_size, self.llm_len, dtype=torch.bool, device=self.llm_pos.device)

    def text_tokens(self) -> torch.Tensor:
        """bool ``[B, cur_len]``: the real tokens of the current sequence that are not visual tokens."""
        L, vis = self.cur_len, self.visual
        is_vis = torch.zeros(self.batch_size, L + 1, dtype=torch.bool, device=self.cur_valid.device)
        is_vis.scatter_(1, vis.pos.masked_fill(~vis.valid, L), True)
        return self.cur_valid & ~is_vis[:, :L]

    def llm_mask_like(self, am: torch.Tensor) -> torch.Tensor:
        """The LLM-entry 2-D mask in the dtype and device of ``am`` (all ones when none was passed)."""
        if self.llm_mask is not None:
            return self.llm_mask.to(am.dtype)
        return torch.ones(self.batch_size, self.llm_len, dtype=am.dtype, device=am.device)

    def move_to(self, device) -> None:
        """Move the per-token state to ``device`` (decoder layers spread over several devices)."""
        for name in self._PER_TOKEN:
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                setattr(self, name, t.to(device))
        self.visual = self.visual.to(device)
        self.captures = {k: {n: t.to(device) for n, t in d.items()} for k, d in self.captures.items()}
