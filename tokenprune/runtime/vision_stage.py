"""A before-LLM stage that acts on the vision tower, before the projector (``Stage(site="vision")``).

The vision tower's hidden states at the feature layer ([CLS] included), the [CLS] attention (or mean
attention) and the keys of that layer are captured during ``get_image_features``
(:mod:`~tokenprune.runtime.signals`; the model's own output is left as it is, so the vision cache
needs no change of key). At the prefill, :class:`VisionSiteSelection` selects in every crop of every
image with the stage's selector, projects the kept (or merged) states with the model's projector, and
lays each image's tokens out as the adapter says (:meth:`~tokenprune.adapters.ModelAdapter.arrange_vision_tokens`).
The prefill rewrite then keeps that many image placeholders per image, carrying the new features, with
consecutive positions.

How the budget is spent: a sample keeps ``budget`` visual tokens (resolved against its image
placeholders other than ``image_newline`` tokens), shared among its images in proportion to their
placeholders (largest remainders) and evenly among an image's crops (the first crops get the
remainder). A sample whose budget covers all its placeholders is left as it is.
"""

from __future__ import annotations

import time

import torch

from ..adapters.base import VisionCropTokens
from ..context import make_context
from ..errors import StageError
from .plan import VISION_ATTENTION_SOURCES
from .report import StageReport
from .stage_select import StagePart


def share(total: int, weights: list) -> list:
    """``total`` split over ``weights`` in proportion, by largest remainders (ties to the first); a share
    never exceeds its weight when ``total < sum(weights)``.

    Examples
    --------
    >>> share(10, [3, 3, 4]), share(5, [2, 2]), share(3, [1, 1, 1, 1])
    ([3, 3, 4], [3, 2], [1, 1, 1, 0])
    """
    s = sum(weights)
    if s <= 0:
        return [0] * len(weights)
    exact = [total * w / s for w in weights]
    out = [int(e) for e in exact]
    rest = total - sum(out)
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))[:rest]:
        out[i] += 1
    return out


class VisionSiteSelection(StagePart):
    """Runs the before-LLM stage on the vision tower's states (constructed as :class:`StagePart`)."""

    def __call__(self, state, layout, flat_idx, rec):
        """Select, merge and project per crop; return what the prefill rewrite needs.

        Parameters
        ----------
        state : PromptState
            The prompt; ``state.visual`` are its image placeholders (with newline tokens).
        layout : TokenLayout
            The adapter's layout of the placeholders, ``coords[:, 0]`` numbering the images of ``rec``.
        flat_idx : torch.Tensor
            long ``[B, V]``: each visual token's row in ``layout`` (``-1`` at padding).
        rec : VisionRecord or None
            The ``get_image_features`` call, with ``vision_states`` and ``keys``.

        Returns
        -------
        (keep, replacement, coords, orig)
            bool ``[B, V]`` placeholders kept; ``(features [B, V, D], has bool [B, V])`` their new
            features; long ``[B, V, 4]`` the coordinates of the tokens now at those placeholders
            (image relative to the sample) and long ``[B, V]`` the original visual token they stand
            for: a patch's placeholder, a contextual token's target's, the [CLS] placeholder under
            ``vision_feature_select_strategy="full"``; ``-1`` for tokens without one ([CLS] under
            ``"default"``, LLaVA-NeXT patches removed by the unpadding).

        Raises
        ------
        StageError
            The tower's states or keys were not captured (features computed outside the context).
        """
        index, stage = self.plan.pre_stage
        ad = self.adapter
        if rec is None or rec.vision_states is None or rec.keys is None:
            raise StageError(f"stage {index} acts on the vision tower (site='vision'): it needs the vision tower to "
                             "run inside the prune() context (pass pixel_values, not precomputed mm_encoder_outputs)")
        t0 = time.perf_counter()
        vis = state.visual
        B, V = vis.pos.shape
        states = rec.vision_states
        crops_per_image = ad.vision_crops(rec)
        first_row = [0]
        for n in crops_per_image:
            first_row.append(first_row[-1] + n)
        T = int(states.shape[1])
        lay_coords = layout.coords[flat_idx.clamp_min(0).cpu()]          # [B, V, 4], absolute image index
        newline = layout.newline[flat_idx.clamp_min(0).cpu()] & vis.valid.cpu()
        valid = vis.valid.cpu()
        # per sample: its images' placeholder runs, and how many tokens each crop keeps
        plans, tasks, kept_all = [], {}, False
        images, is_newline = lay_coords[..., 0].tolist(), newline.tolist()
        for b in range(B):
            cols = torch.nonzero(valid[b]).squeeze(1).tolist()
            runs = []
            for j in cols:
                i = images[b][j]
                if not runs or runs[-1][0] != i:
                    runs.append((i, []))
                runs[-1][1].append(j)
            cand = [sum(1 for j in js if not is_newline[b][j]) for _, js in runs]
            n_b = sum(cand)
            k_b = stage.budget.resolve(n_b) if n_b else 0
            if k_b >= n_b:
                plans.append(None)  # keeps everything: left as it is
                kept_all |= n_b > 0
                continue
            if any(i < 0 or i >= len(crops_per_image) for i, _ in runs):
                raise StageError(f"stage {index} acts on the vision tower (site='vision') but the image of some visual "
                                 f"tokens of sample {b} is not known")
            per_image = share(k_b, cand)
            crops = []
            for (i, _), k_img in zip(runs, per_image):
                n_c = crops_per_image[i]
                ks = share(k_img, [1] * n_c)
                crops.append([(first_row[i] + c, c, kc) for c, kc in enumerate(ks) if kc > 0])
                for row, _, kc in crops[-1]:
                    tasks.setdefault((row, kc), None)
            plans.append((runs, per_image, crops))
        results = self._select_crops(index, stage, rec, states, tasks)
        keep = torch.zeros(B, V, dtype=torch.bool)
        coords = torch.full((B, V, 4), -1, dtype=torch.long)
        orig = torch.full((B, V), -1, dtype=torch.long)
        repl_rows = []  # (sample, placeholder column) of each row of the concatenated features
        feats_out = []
        kept_orig, tokens_after, protected = [], [], []
        newline_dropped = False
        for b, p in enumerate(plans):
            cols = torch.nonzero(valid[b]).squeeze(1)
            if p is None:
                keep[b, cols] = True
                coords[b, cols] = lay_coords[b, cols]
                orig[b, cols] = vis.orig[b, cols].cpu()
                tokens_after.append(int(cols.numel()))
                protected.append(int((vis.protected[b].cpu() & valid[b]).sum()))
                kept_orig.append(vis.orig[b].cpu()[cols[~(vis.protected[b].cpu()[cols])]])
                continue
            runs, per_image, crops = p
            sample_coords, sample_orig = lay_coords[b].tolist(), vis.orig[b].tolist()
            where = {tuple(sample_coords[j]): sample_orig[j] for j in cols.tolist() if not is_newline[b][j]}
            newline_dropped |= bool(newline[b].any())
            picked = []
            for (i, js), k_img, crop_list in zip(runs, per_image, crops):
                parts = []
                for row, c, kc in crop_list:
                    r = results[(row, kc)]
                    cc = ad.tower_coords(i, c, r["tokens"], T)
                    parts.append(VisionCropTokens(crop=c, tokens=r["tokens"], features=r["features"],
                                                  merged=r["merged"], cls=r["cls"], coords=cc))
                if not parts:
                    continue
                f, cc = ad.arrange_vision_tokens(i, parts, rec)
                if f.shape[0] != k_img or k_img > len(js):
                    raise StageError(f"stage {index}: image {i} got {f.shape[0]} tokens for a share of {k_img} "
                                     f"and {len(js)} placeholders")
                slots = torch.tensor(js[:k_img], dtype=torch.long)
                keep[b, slots] = True
                coords[b, slots] = cc
                # a patch: its placeholder; [CLS]: the image's [CLS] placeholder ("full" feature selection)
                o = torch.tensor([where.get(tuple(x), where.get((x[0], -1, -1, -1), -1) if x[2] < 0 else -1)
                                  for x in cc.tolist()], dtype=torch.long)
                orig[b, slots] = o
                picked.append(o[o >= 0])
                repl_rows.extend((b, int(s)) for s in slots)
                feats_out.append(f)
            tokens_after.append(int(keep[b].sum()))
            protected.append(0)
            kept_orig.append(torch.unique(torch.cat(picked)) if picked else torch.zeros(0, dtype=torch.long))
        # relative image index, as the visual tokens' coordinates
        first = coords[..., 0].masked_fill(coords[..., 0] < 0, 1 << 30).amin(1, keepdim=True)
        coords[..., 0] = torch.where(coords[..., 0] >= 0, coords[..., 0] - first, coords[..., 0])
        repl = None
        if feats_out:
            f = torch.cat(feats_out)
            r = torch.zeros(B, V, f.shape[-1], dtype=f.dtype, device=f.device)
            has = torch.zeros(B, V, dtype=torch.bool, device=f.device)
            bi = torch.tensor([x for x, _ in repl_rows], dtype=torch.long, device=f.device)
            ci = torch.tensor([y for _, y in repl_rows], dtype=torch.long, device=f.device)
            r[bi, ci] = f
            has[bi, ci] = True
            repl = (r.to(vis.pos.device), has.to(vis.pos.device))
        if newline_dropped:
            self.report.note(f"stage {index} acts on the vision tower (site='vision'): the image_newline tokens are "
                             "not used, as in the official VisionZip layout")
        if kept_all:
            self.report.note(f"stage {index} keeps {stage.budget.value} tokens, at least as many as some sample has: "
                             "it kept them all")
        ms = (time.perf_counter() - t0) * 1e3
        state.select_ms += ms
        state.stages.append(self._report(index, stage, vis, newline, kept_orig, lay_coords, tokens_after,
                                         protected, ms))
        dev = vis.pos.device
        return keep.to(dev), repl, coords.to(dev), orig.to(dev)

    def _select_crops(self, index, stage, rec, states, tasks: dict) -> dict:
        """Run the stage on the crops, grouped by their token count: ``(row, k) -> kept tokens``."""
        ad = self.adapter
        T = int(states.shape[1])
        source = self.plan.relevance[index]
        side = ad.patch_grid_side()
        has_cls = ad.has_cls and T == side * side + 1
        out = {}
        by_k: dict = {}
        for row, k in tasks:
            by_k.setdefault(k, []).append(row)
        for k, rows in sorted(by_k.items()):
            r = torch.tensor(rows, dtype=torch.long, device=states.device)
            x = states[r].detach()
            rel = None
            if source in VISION_ATTENTION_SOURCES and rec.cls_attention is not None:
                rel = rec.cls_attention[r.to(rec.cls_attention.device)].float()
            cls_mark = torch.zeros(len(rows), T, dtype=torch.bool, device=x.device)
            if has_cls:
                cls_mark[:, 0] = True
            with torch.no_grad():
                ctx = make_context(x, relevance=rel, keys=rec.keys[r.to(rec.keys.device)],
                                   cls_token=cls_mark if has_cls else None, seed=self.plan.seed + index,
                                   compute_dtype=getattr(stage, "compute_dtype", "float32"))
                sel = stage.selector.select(stage.objective, ctx, k)
                sequence = getattr(stage.selector, "llm_sequence", None)
                if sequence is not None:
                    seq, merged = sequence(sel, ctx)
                else:
                    seq, merged = sel.indices, torch.zeros_like(sel.valid)
                if sel.features is not None:
                    at = torch.searchsorted(sel.indices.masked_fill(~sel.valid, T), seq.masked_fill(~sel.valid, T))
                    f = torch.gather(sel.features, 1, at.clamp_max(sel.features.shape[1] - 1)[..., None]
                                     .expand(-1, -1, sel.features.shape[-1]))
                else:
                    f = torch.gather(x, 1, seq.clamp_min(0)[..., None].expand(-1, -1, x.shape[-1]))
                proj = ad.project_vision_states(f.to(x.dtype))
            for n, row in enumerate(rows):
                cnt = int(sel.valid[n].sum())
                toks = seq[n, :cnt]
                out[(row, k)] = {"tokens": toks, "features": proj[n, :cnt], "merged": merged[n, :cnt].cpu(),
                                 "cls": cls_mark[n, toks].cpu()}
        return out

    def _report(self, index, stage, vis, newline, kept_orig, lay_coords, tokens_after, protected, ms) -> StageReport:
        """The stage's report: counts, kept patches (by their original visual token), the scores it saw."""
        B = vis.pos.shape[0]
        rep = StageReport(index=index, layer=None, budget=stage.budget.value, relevance=self.plan.relevance[index],
                          tokens_before=vis.counts(), tokens_after=tokens_after, protected=protected, select_ms=ms)
        n_orig = list(self.report.visual_tokens) + [0] * max(0, B - len(self.report.visual_tokens))
        cls = None if vis.cls is None else vis.cls.detach().float().cpu()
        coords = vis.coords.cpu()
        for b in range(B):
            n = n_orig[b]
            scores = torch.full((n,), float("nan"))
            if cls is not None and self.plan.relevance[index] in VISION_ATTENTION_SOURCES:
                ok = vis.valid[b].cpu() & ~newline[b]
                scores[vis.orig[b].cpu()[ok]] = cls[b][ok]
            k = kept_orig[b].long()
            rep.scores.append(scores)
            rep.kept.append(k)
            pos = torch.full((n,), -1, dtype=torch.long)
            o = vis.orig[b].cpu()
            ok = o >= 0
            pos[o[ok]] = torch.nonzero(ok).squeeze(1)
            rep.coords.append(coords[b, pos[k]] if k.numel() else torch.zeros(0, 4, dtype=torch.long))
        return rep
