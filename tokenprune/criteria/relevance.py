"""Task relevance: modular criteria from per-token relevance scores."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..errors import MissingSignalError, ParameterError
from ..registry import criteria
from .base import ModularCriterion, Tags

SOURCES = ("given", "text_similarity")


@criteria.register("relevance")
@dataclass(frozen=True, kw_only=True)
class Relevance(ModularCriterion):
    """Task relevance, ``f(S) = Σ_{i∈S} r_i``.

    .. math:: r_i = \\text{given scores} \\quad\\text{or}\\quad r_i = \\max_{t} \\cos(h_i, e_t)

    Parameters
    ----------
    source : {"given", "text_similarity"}
        ``"given"`` reads ``ctx.relevance`` (``[B, N]``: [CLS] attention, text-rater attention, ...).
        ``"text_similarity"`` computes the cosine similarity of each visual token to the text
        embeddings (``ctx.text_embeddings`` ``[B, T, D]``), reduced over valid text tokens by ``reduce``.
    reduce : {"max", "mean"}
        Reduction over text tokens for ``"text_similarity"``.

    Raises
    ------
    ParameterError
        An unknown ``source`` or ``reduce``.
    MissingSignalError
        The needed signal is absent.

    Notes
    -----
    Modular (hence submodular); gains never change, so top-k selection is exact. Requires
    ``relevance`` (``source="given"``) or ``text_embeddings`` (``"text_similarity"``). ``O(B N)``
    for given scores, ``O(B N T D)`` for text similarity. Not tagged monotone: scores may be
    negative (e.g. similarities).

    References
    ----------
    TOPS, arXiv:2606.27161 (task relevance); CDPruner, arXiv:2506.10967 (instruction relevance).
    """

    source: str = "given"
    reduce: str = "max"

    @property
    def tags(self) -> Tags:  # type: ignore[override]
        need = "relevance" if self.source == "given" else "text_embeddings"
        return Tags(modular=True, submodular=True, requires=frozenset({need}))

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ParameterError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.reduce not in ("max", "mean"):
            raise ParameterError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def check(self, ctx):
        need = "relevance" if self.source == "given" else "text_embeddings"
        if ctx.get_signal(need) is None:
            raise MissingSignalError(f"Relevance(source={self.source!r}) needs ctx.{need}, which was not given")

    def scores(self, ctx) -> torch.Tensor:
        if self.source == "given":
            return ctx.relevance
        return text_similarity(ctx, self.reduce)


def text_similarity(ctx, reduce: str = "max") -> torch.Tensor:
    """float32 ``[B, N]`` cosine similarity of visual tokens to the valid text embeddings, reduced over text."""
    return cosine_to_text(ctx.unit_features, ctx.text_embeddings, ctx.text_mask, ctx.mask, reduce)


def cosine_to_text(unit_features: torch.Tensor, text_embeddings: torch.Tensor, text_mask: torch.Tensor,
                   mask: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Cosine similarity of each visual token to the valid text tokens, reduced over the text.

    Parameters
    ----------
    unit_features : torch.Tensor
        float32 ``[B, N, D]``: L2-normalised visual-token features (padding rows may be anything).
    text_embeddings : torch.Tensor
        ``[B, T, D]`` text embeddings in the same space (any float dtype; normalised here).
    text_mask : torch.Tensor
        bool ``[B, T]``: the valid text tokens.
    mask : torch.Tensor
        bool ``[B, N]``: the valid visual tokens; padding scores are 0.
    reduce : {"max", "mean"}
        Reduction over the valid text tokens (``"mean"``: 0 for a sample without text).

    Returns
    -------
    torch.Tensor
        float32 ``[B, N]``. ``O(B N T D)``.
    """
    t = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    sim = torch.bmm(unit_features, t.transpose(1, 2))  # [B, N, T]
    tm = text_mask[:, None, :]
    if reduce == "max":
        return sim.masked_fill(~tm, float("-inf")).amax(-1).masked_fill(~mask, 0.0)
    return ((sim * tm).sum(-1) / tm.sum(-1).clamp_min(1)).masked_fill(~mask, 0.0)
