"""Running one stage's selection on the visual tokens of a batch, and reporting it.

Shared by both kinds of stages: the before-LLM rewrite and the in-LLM surgery hand over the
candidates' features and signals; :class:`StageSelection` compacts the candidates of each sample,
builds a :class:`~tokenprune.TokenContext`, calls the stage's selector on its objective, and maps the
picks back, appending a :class:`~tokenprune.runtime.StageReport` to the prompt's state.
"""

from __future__ import annotations

import time

import torch

from ..context import make_context
from ..errors import StageError
from .report import StageReport
from .state import PromptState, as_list, gather, true_positions


class StageSelection:
    """Selects among the candidate visual tokens for every stage of a context.

    Parameters
    ----------
    plan : Plan
        Gives each stage's relevance source and the selection seed.
    report : PruneReport
        Receives notes and supplies the original visual-token counts.
    """

    def __init__(self, plan, report):
        self.plan = plan
        self.report = report

    def __call__(self, state: PromptState, index: int, stage, feats: torch.Tensor, relevance, text_emb,
                 text_mask, layer, *, text_relevance=None, positions=None):
        """Run stage ``index`` on ``state.visual``.

        Parameters
        ----------
        feats : torch.Tensor
            ``[B, V]``-aligned features ``[B, V, D]`` of the visual tokens.
        relevance : torch.Tensor or None
            float ``[B, V]``.
        text_emb, text_mask : torch.Tensor or None
            ``[B, T, D]`` and bool ``[B, T]``.
        layer : int or None
            Where the stage acts (for the report).
        text_relevance : torch.Tensor, optional
            float ``[B, T]`` scores of the text tokens (DART's key norms).
        positions : torch.Tensor, optional
            long ``[B, V]`` positions of the visual tokens in the unpadded sequence (``positions`` signal).

        Returns
        -------
        (keep, replacement)
            bool ``[B, V]``: the visual tokens kept (protected ones included); and ``None`` or
            ``(features [B, V, D], has bool [B, V])`` for selectors that return new features (merging).

        Raises
        ------
        StageError
            An int budget above the candidates an earlier stage left.
        """
        vis = state.visual
        cand = vis.valid & ~vis.protected & ~vis.dropped
        n = cand.sum(1)
        first = not state.stages
        t0 = time.perf_counter()
        keep = vis.valid & vis.protected
        repl = None
        rows_with = (n > 0).nonzero().flatten()
        budget = stage.budget
        for b in rows_with.tolist():
            if not budget.is_fraction and budget.value > int(n[b]) and not first:
                raise StageError(f"stage {index} keeps {budget.value} tokens but the earlier stage left only "
                                 f"{int(n[b])} candidate visual tokens (sample {b})")
        if len(rows_with):
            # compact the candidates of each row to the front
            cidx = true_positions(cand[rows_with])
            sub = rows_with
            cmask = cidx >= 0
            f = gather(feats[sub].detach(), cidx, 1, 0.0)
            rel = None if relevance is None else gather(relevance[sub].float(), cidx, 1, 0.0)
            extra = {"coords": gather(vis.coords[sub], cidx, 1, -1).float()}
            if positions is not None:
                extra["positions"] = gather(positions[sub], cidx, 1, -1)
            te = None if text_emb is None else text_emb[sub].detach()
            tm = None if text_mask is None else text_mask[sub]
            tr = None if text_relevance is None else text_relevance[sub].float()
            if te is not None and te.shape[1] == 0:
                te, tm, tr = None, None, None
            grid = self.single_grid(state, cidx) if first else None
            with torch.no_grad():
                ctx = make_context(f, mask=cmask, relevance=rel, text_embeddings=te, text_mask=tm,
                                   text_relevance=tr, grid=grid, seed=self.plan.seed + index,
                                   compute_dtype=stage.compute_dtype, **extra)
                sel = stage.selector.select(stage.objective, ctx, budget)
            picked = torch.where(sel.valid, torch.gather(cidx, 1, sel.indices.clamp_min(0)), -1)
            V = keep.shape[1]
            hit = torch.zeros(len(sub), V + 1, dtype=torch.bool, device=keep.device)
            hit.scatter_(1, picked.masked_fill(picked < 0, V), True)  # holes land in the extra column
            keep[sub] |= hit[:, :V]
            if sel.features is not None:
                repl = self._replacement(vis, sub, picked, sel)
        ms = (time.perf_counter() - t0) * 1e3
        state.select_ms += ms
        if first and len(rows_with) and not budget.is_fraction and budget.value >= int(n[rows_with].max()):
            self.report.note(f"stage {index} keeps {budget.value} tokens, at least as many as there are "
                             f"({int(n[rows_with].max())}): it kept them all")
        kept_vis = keep & vis.valid
        state.stages.append(self._stage_report(vis, index, layer, budget, relevance, cand, kept_vis, ms))
        return kept_vis, repl

    @staticmethod
    def _replacement(vis, sub, picked, sel):
        """Scatter a selection's new features back onto ``[B, V]``: ``(features, has)``."""
        repl = torch.zeros(vis.pos.shape[0], vis.pos.shape[1], sel.features.shape[-1],
                           dtype=sel.features.dtype, device=sel.features.device)
        has = torch.zeros(vis.pos.shape, dtype=torch.bool, device=vis.pos.device)
        ok = sel.valid
        rows, cols = sub.to(picked.device)[:, None].expand_as(picked)[ok], picked[ok]
        repl[rows, cols] = sel.features[ok]
        has[rows, cols] = True
        return repl, has

    def _stage_report(self, vis, index, layer, budget, relevance, cand, kept_vis, ms) -> StageReport:
        """The report of one stage: counts, kept original indices and coordinates, the scores it saw."""
        rep = StageReport(index=index, layer=layer, budget=budget.value, relevance=self.plan.relevance[index],
                          tokens_before=vis.counts(), tokens_after=as_list(kept_vis.sum(1)),
                          protected=as_list((vis.protected & kept_vis).sum(1)), select_ms=ms)
        B = vis.pos.shape[0]
        n_orig = list(self.report.visual_tokens) + [0] * max(0, B - len(self.report.visual_tokens))
        # one move to the CPU, then per-sample views: the scores the stage saw over the original tokens
        orig, coords = vis.orig.cpu(), vis.coords.cpu()
        scores = torch.full((B, max(n_orig[:B], default=0)), float("nan"))
        if relevance is not None:
            c = cand.cpu()
            r, col = c.nonzero(as_tuple=True)
            scores[r, orig[r, col]] = relevance.detach().float().cpu()[r, col]
        # the kept (not protected) tokens of each sample, ordered by their original index
        chosen = (kept_vis & ~vis.protected).cpu()
        key = orig.masked_fill(~chosen, torch.iinfo(orig.dtype).max)
        srt = key.sort(dim=1, stable=True).indices
        counts = chosen.sum(1).tolist()
        kept_orig, kept_coords = orig.gather(1, srt), coords.gather(1, srt[..., None].expand(-1, -1, 4))
        for b in range(B):
            rep.scores.append(scores[b, : n_orig[b]].clone())
            rep.kept.append(kept_orig[b, : counts[b]].clone())
            rep.coords.append(kept_coords[b, : counts[b]].clone())
        return rep

    @staticmethod
    def single_grid(state: PromptState, cidx: torch.Tensor):
        """The ``(rows, cols)`` grid when every sample's candidates are one full image grid, else ``None``."""
        vis = state.visual
        if vis.protected.any() or cidx.shape[1] == 0 or (cidx < 0).any():
            return None
        c = vis.coords
        if (c[..., 1] != 0).any() or (c[..., 0] != 0).any() or (c[..., 2] < 0).any():
            return None
        rows = int(c[..., 2].max()) + 1
        cols = int(c[..., 3].max()) + 1
        return (rows, cols) if rows * cols == cidx.shape[1] else None


class StagePart:
    """What the two places that run stages share: the prefill rewrite (before the LLM) and the layer
    surgery (inside it) read the plan, the adapter and the signals, run :class:`StageSelection`, and
    write the report.

    Parameters
    ----------
    plan : Plan
    adapter : ModelAdapter
    signals : SignalCapture
    select : StageSelection
    report : PruneReport
    """

    def __init__(self, plan, adapter, signals, select: StageSelection, report):
        self.plan = plan
        self.adapter = adapter
        self.signals = signals
        self.select = select
        self.report = report
