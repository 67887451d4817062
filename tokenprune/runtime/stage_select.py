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
from .state import PromptState, gather, true_positions


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
        if vis.marked:
            cand = vis.valid & ~(vis.protected | vis.dropped)
            n_list = cand.sum(1).tolist()
        else:  # nothing protected or dropped: every real visual token is a candidate
            cand, n_list = vis.valid, vis.counts()
        chosen = None  # bool [B, V]: the selection's picks
        B = cand.shape[0]
        first = not state.stages
        t0 = time.perf_counter()
        repl = None
        budget = stage.budget
        rows_with = [b for b, c in enumerate(n_list) if c > 0]
        if not budget.is_fraction and not first:
            for b in rows_with:
                if budget.value > n_list[b]:
                    raise StageError(f"stage {index} keeps {budget.value} tokens but the earlier stage left only "
                                     f"{n_list[b]} candidate visual tokens (sample {b})")
        if rows_with:
            # the samples with candidates (all of them, as a rule: no copies then), candidates to the front
            sub = slice(None) if len(rows_with) == B else torch.tensor(rows_with, device=cand.device)
            V = cand.shape[1]
            if all(c == V for c in n_list):  # every visual token is a candidate: nothing to compact
                cidx, cmask = None, None
                take = lambda t, fill: t  # noqa: E731
            else:
                cidx = true_positions(cand[sub])
                cmask = cidx >= 0
                take = lambda t, fill: gather(t[sub], cidx, 1, fill)  # noqa: E731
            f = take(feats.detach(), 0.0)
            rel = None if relevance is None else take(relevance.float(), 0.0)
            extra = {"coords": take(vis.coords, -1).float()}
            if positions is not None:
                extra["positions"] = take(positions, -1)
            te = None if text_emb is None else text_emb[sub].detach()
            tm = None if text_mask is None else text_mask[sub]
            tr = None if text_relevance is None else text_relevance[sub].float()
            if te is not None and te.shape[1] == 0:
                te, tm, tr = None, None, None
            grid = state.grid if first else None
            with torch.no_grad():
                ctx = make_context(f, mask=cmask, relevance=rel, text_embeddings=te, text_mask=tm,
                                   text_relevance=tr, grid=grid, seed=self.plan.seed + index,
                                   compute_dtype=stage.compute_dtype, **extra)
                sel = stage.selector.select(stage.objective, ctx, budget)
            picked = sel.indices if cidx is None else torch.gather(cidx, 1, sel.indices.clamp_min(0))
            picked = picked.masked_fill(~sel.valid, V)  # holes land in the extra column of hit
            hit = torch.zeros(picked.shape[0], V + 1, dtype=torch.bool, device=vis.valid.device)
            hit.scatter_(1, picked, True)
            if isinstance(sub, slice):
                chosen = hit[:, :V]
            else:
                chosen = torch.zeros_like(vis.valid)
                chosen[sub] = hit[:, :V]
            if sel.features is not None:
                rows = torch.arange(B, device=picked.device) if isinstance(sub, slice) else sub.to(picked.device)
                repl = self._replacement(vis, rows, picked, sel)
        ms = (time.perf_counter() - t0) * 1e3
        state.select_ms += ms
        most = max(n_list[b] for b in rows_with) if rows_with else 0
        if first and rows_with and not budget.is_fraction and budget.value >= most:
            self.report.note(f"stage {index} keeps {budget.value} tokens, at least as many as there are "
                             f"({most}): it kept them all")
        chosen = torch.zeros_like(vis.valid) if chosen is None else chosen & vis.valid
        kept_vis = chosen | (vis.valid & vis.protected) if vis.marked else chosen
        state.stages.append(self._stage_report(vis, index, layer, budget, relevance, cand, kept_vis, chosen, ms))
        return kept_vis, repl

    @staticmethod
    def _replacement(vis, rows, picked, sel):
        """Scatter a selection's new features back onto ``[B, V]``: ``(features, has)``; ``rows`` (long
        ``[B']``) are the samples of the selection's rows."""
        repl = torch.zeros(vis.pos.shape[0], vis.pos.shape[1], sel.features.shape[-1],
                           dtype=sel.features.dtype, device=sel.features.device)
        has = torch.zeros(vis.pos.shape, dtype=torch.bool, device=vis.pos.device)
        ok = sel.valid
        rows, cols = rows[:, None].expand_as(picked)[ok], picked[ok]
        repl[rows, cols] = sel.features[ok]
        has[rows, cols] = True
        return repl, has

    def _stage_report(self, vis, index, layer, budget, relevance, cand, kept_vis, chosen, ms) -> StageReport:
        """The report of one stage: counts now, and the kept original indices and coordinates and the
        scores it saw when first read (from the stage's tensors, which the runtime replaces and never
        writes into). ``chosen``: the kept visual tokens the selection picked (the protected ones aside)."""
        before = vis.counts()
        if vis.marked:
            after, protected = torch.stack([kept_vis.sum(1), (vis.protected & kept_vis).sum(1)]).tolist()
        else:
            after, protected = kept_vis.sum(1).tolist(), [0] * len(before)
        n_orig = list(self.report.visual_tokens) + [0] * max(0, len(before) - len(self.report.visual_tokens))
        orig, coords = vis.orig, vis.coords
        rel = None if relevance is None else relevance.detach()

        def per_sample():
            # one move to the CPU, then per-sample views: the scores the stage saw over the original tokens
            o, c, ch = orig.cpu(), coords.cpu(), chosen.cpu()
            B = o.shape[0]
            scores = torch.full((B, max(n_orig[:B], default=0)), float("nan"))
            if rel is not None:
                r, col = cand.cpu().nonzero(as_tuple=True)
                scores[r, o[r, col]] = rel.float().cpu()[r, col]
            # the kept (not protected) tokens of each sample, ordered by their original index
            srt = o.masked_fill(~ch, torch.iinfo(o.dtype).max).sort(dim=1, stable=True).indices
            counts = ch.sum(1).tolist()
            kept_orig, kept_coords = o.gather(1, srt), c.gather(1, srt[..., None].expand(-1, -1, 4))
            return ([kept_orig[b, : counts[b]].clone() for b in range(B)],
                    [kept_coords[b, : counts[b]].clone() for b in range(B)],
                    [scores[b, : n_orig[b]].clone() for b in range(B)])

        return StageReport(index=index, layer=layer, budget=budget.value, relevance=self.plan.relevance[index],
                           tokens_before=before, tokens_after=after, protected=protected, select_ms=ms,
                           per_sample=per_sample)


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
