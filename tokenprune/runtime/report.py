"""What a pruning context did: tokens per stage and per layer, kept patches, timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TokenPruneError


@dataclass
class StageReport:
    """One stage of the last pruned prefill.

    Attributes
    ----------
    index : int
        Position of the stage in the method.
    layer : int or None
        Decoder layer the stage acted at (after scaling with ``reference_depth``); ``None``: before the LLM.
    budget : int or float
        The stage's nominal budget (tokens kept, or fraction of the tokens the earlier stage left).
    relevance : str or None
        Where the relevance signal came from, as resolved for this model: the stage's own source
        (``"cls_attention"``, ``"text_attention"``, ``"own_layer_attention"``, ``"key_norm"``,
        ``"text_similarity"``), or what replaced it: ``"mean_attention"`` or ``"text_similarity"`` on a
        tower without [CLS]; ``"text_encoder"`` for a before-LLM ``"text_similarity"`` stage given
        :func:`tokenprune.prune`'s ``text_encoder`` (the encoder's patch-instruction similarity,
        CDPruner's paper), while ``"text_similarity"`` before the LLM is the fallback (the projected
        features' cosine similarity to the LLM's input embeddings of the prompt's text). The
        report's notes give each such stage's source in words.
    tokens_before, tokens_after : list of int
        Visual tokens per sample before and after the stage, protected tokens (LLaVA-NeXT newline
        tokens under ``newlines="keep"``) included.
    protected : list of int
        Protected visual tokens per sample (kept without counting against the budget).
    kept : list of torch.Tensor
        Per sample, long ``[k]``: kept visual tokens as indices into the sample's *original* visual
        tokens (``0 .. N-1`` in prompt order), ascending. ``kept``, ``coords`` and ``scores`` are
        CPU tensors built on first access from what the stage saw (a prefill that nobody reports on
        does not pay for them).
    coords : list of torch.Tensor
        Per sample, long ``[k, 4]``: ``(image, crop, row, col)`` of each kept token in the original patch
        grid (see :class:`tokenprune.adapters.ModelAdapter` for each family's crops); ``-1`` where a
        coordinate does not apply (an ``image_newline`` token) or is unknown.
    scores : list of torch.Tensor
        Per sample, float32 ``[N]`` over the original visual tokens: the relevance signal the stage saw
        (NaN for tokens that were not candidates at this stage, or all NaN when the stage had no
        relevance source). Useful for overlays and for checking the signals.
    select_ms : float
        Wall time spent building the context and selecting, in milliseconds.
    per_sample : tuple or callable
        Where ``kept``, ``coords`` and ``scores`` come from: the three lists, or a function of no
        arguments the runtime leaves, called once on first access (``None``: empty lists).
    """

    index: int
    layer: int | None
    budget: int | float
    relevance: str | None
    tokens_before: list = field(default_factory=list)
    tokens_after: list = field(default_factory=list)
    protected: list = field(default_factory=list)
    select_ms: float = 0.0
    per_sample: object = field(default=None, repr=False, compare=False)

    def _per_sample_lists(self) -> tuple:
        if self.per_sample is None:
            self.per_sample = ([], [], [])
        elif callable(self.per_sample):
            self.per_sample = tuple(self.per_sample())
        return self.per_sample

    @property
    def kept(self) -> list:
        return self._per_sample_lists()[0]

    @property
    def coords(self) -> list:
        return self._per_sample_lists()[1]

    @property
    def scores(self) -> list:
        return self._per_sample_lists()[2]

    @property
    def where(self) -> str:
        return "before LLM" if self.layer is None else f"layer {self.layer}"


@dataclass
class PruneReport:
    """Filled in by :func:`tokenprune.prune` for every pruned prefill; describes the last one.

    Attributes
    ----------
    model_type : str
        ``config.model_type`` of the model.
    adapter : str
        Name of the adapter class used.
    method : dict
        ``method.to_config()`` of the method applied.
    depth : int
        Decoder layers of the text model.
    nominal_budget : int or float or None
        The method's :attr:`~tokenprune.PruningMethod.nominal_budget`: the budget it is quoted at
        (TOPS's ``T``, the ``budget`` a factory was called with, else the last stage's budget).
    stages : list of StageReport
        The stages of the last pruned prefill, in order.
    visual_tokens : list of int
        Visual tokens per sample in the unpruned prompt.
    tokens_per_layer : list of int
        Visual tokens entering each decoder layer (``depth`` entries) in the last pruned prefill.
        Equal for every sample of a rectangular batch; otherwise the maximum over samples (a note says
        so).
    equivalent_tokens : float
        Layer-averaged visual tokens, ``Σ_l n_l / L``, the number to compare multi-stage methods with.
    select_ms : float
        Total selection time of the last prefill, in milliseconds.
    calls : int
        Prefills seen in the context (pruned or not).
    pruned_calls : int
        Prefills that were pruned.
    notes : list of str
        Things worth knowing: prompts without image tokens (nothing pruned), position handling that
        differs from the request, ...
    """

    model_type: str = ""
    adapter: str = ""
    method: dict = field(default_factory=dict, repr=False)
    depth: int = 0
    nominal_budget: int | float | None = None
    stages: list = field(default_factory=list)
    visual_tokens: list = field(default_factory=list)
    tokens_per_layer: list = field(default_factory=list)
    equivalent_tokens: float = 0.0
    select_ms: float = 0.0
    calls: int = 0
    pruned_calls: int = 0
    notes: list = field(default_factory=list)

    def note(self, text: str) -> None:
        """Add a note once."""
        if text not in self.notes:
            self.notes.append(text)

    @property
    def kept_indices(self) -> list:
        """Per stage, per sample: kept original visual-token indices (long ``[k]``)."""
        return [s.kept for s in self.stages]

    @property
    def tokens_per_stage(self) -> list:
        """``[(where, tokens_after of sample 0)]`` for every stage."""
        return [(s.where, s.tokens_after[0] if s.tokens_after else 0) for s in self.stages]

    def summary(self) -> str:
        """A short human-readable description."""
        lines = [f"tokenprune report: {self.model_type} ({self.adapter}), {self.depth} decoder layers, "
                 f"method {self.method.get('name') or 'composed'}"]
        if not self.pruned_calls:
            lines.append(f"  no pruned prefill yet ({self.calls} call(s))")
        else:
            lines.append(f"  visual tokens: {self.visual_tokens} per sample; nominal budget {self.nominal_budget}; "
                         f"equivalent tokens {self.equivalent_tokens:.1f}")
            for s in self.stages:
                prot = f" (+{s.protected[0]} protected)" if s.protected and s.protected[0] else ""
                lines.append(f"  stage {s.index} {s.where:>10}: {s.tokens_before[0]:>5} -> {s.tokens_after[0]:>5}{prot}"
                             f"  budget {s.budget}  relevance {s.relevance}  select {s.select_ms:.1f} ms")
            lines.append(f"  tokens per layer: {self.tokens_per_layer}")
            lines.append(f"  selection time: {self.select_ms:.1f} ms; prefills: {self.calls} "
                         f"({self.pruned_calls} pruned)")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def start_report(model, adapter, method) -> PruneReport:
    """An empty report for ``method`` applied to ``model`` through ``adapter``."""
    nominal = method.nominal_budget
    return PruneReport(model_type=str(getattr(model.config, "model_type", "")), adapter=adapter.name,
                       method=method_config(method), depth=adapter.depth,
                       nominal_budget=None if nominal is None else nominal.value)


def method_config(method) -> dict:
    """``method.to_config()``, or its name and repr when a component is not registered."""
    try:
        return method.to_config()
    except TokenPruneError:  # unregistered components (ad-hoc selectors in a script or test)
        return {"name": method.name, "repr": repr(method)}


def finish_report(report: PruneReport, state) -> None:
    """Fill ``report`` from a finished prefill: its stages, tokens per layer, equivalent tokens, time.

    ``state`` is the prompt's :class:`~tokenprune.runtime.state.PromptState`.
    """
    report.stages = state.stages
    depth = report.depth
    by_layer = {s.layer: s.tokens_after for s in state.stages if s.layer is not None}
    per_layer = []
    cur = state.counts_after_pre
    for li in range(depth):
        if li in by_layer:
            cur = by_layer[li]
        per_layer.append(max(cur) if cur else 0)
        if cur and min(cur) != max(cur):
            report.note("samples kept different numbers of visual tokens; tokens_per_layer gives the maximum")
    report.tokens_per_layer = per_layer
    report.equivalent_tokens = sum(per_layer) / depth if depth else 0.0
    report.select_ms = state.select_ms
