"""Train the testbed model from scratch on generated scenes, on a CPU, under a wall-clock budget.

Run ``python -m tokenprune.testbed.train --minutes 80 --out tokenprune/testbed/checkpoint`` (or
``tokenprune testbed train``); ``--init DIR`` continues from a saved checkpoint (and its auxiliary
heads, saved beside it as ``DIR.aux_heads.pt``). The recipe, each part of which a from-scratch
prototype of this model needed to learn in about an hour of 2-core CPU time:

1. a short vision-only stage: the [CLS] token predicts which (colour, shape) pairs are present (a
   CLIP-like summary, which is also what makes [CLS] attention meaningful for pruning), and every
   patch predicts the object covering it; both heads stay on as a small auxiliary loss afterwards;
2. end-to-end VQA with several questions about one image in one sequence (loss on every answer);
3. an object-count curriculum (1-3, then 1-5, then 2-6 objects);
4. in the last part, "background dropping": in some batches the LLM sees only every object patch plus
   random background patches, at their original positions, so answers do not depend on how many
   background tokens there are (counting otherwise learns "share of object tokens" and breaks under
   any pruning);
5. spatial questions only about scenes with a third object (with two, "the object that is not the
   reference" answers them without looking at positions), and an auxiliary loss at the side word:
   the LLM's last hidden state at "left"/"right" predicts the answer shape through a linear head.
   At that word the reference has not been named yet, so the only way to predict the answer there is
   "the outermost object on that side"; without it the LLM stalls in the shortcut even though the
   visual tokens say where each object is (a fresh 4-layer Llama on the frozen visual tokens of
   3-object scenes stayed at 62-67% over 400 steps; with the side-word loss it reached 88% in 250).

The auxiliary heads are not part of the saved ``LlavaForConditionalGeneration``. The shipped
checkpoint took nine runs, 386 minutes of CPU time in all: five (307 minutes) trained the vision
tower and projector with a first LLM; then ``--reset-language-model`` put a fresh LLM on the frozen
vision side, and four warm starts (79 minutes, ``--freeze-vision --precision fp32`` with the
side-word loss, the last with background dropping from the start and down to 24 tokens) trained it.
Their commands and curves are in the checkpoint's ``training_curve.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time

import numpy as np

from . import scenes as S
from .model import (add_patch_positions, build_model, build_processor, feature_layers, projected_features,
                    reset_language_model, widen_projector)


def _families(text):
    """Parse ``--questions``: comma-separated question families, one per question asked of an image."""
    families = tuple(f.strip() for f in text.split(","))
    unknown = sorted(set(families) - set(S.QUESTION_FAMILIES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown question families {unknown}; "
                                         f"expected some of {S.QUESTION_FAMILIES}")
    if not 0 < len(families) <= MAX_Q:
        raise argparse.ArgumentTypeError(f"{len(families)} questions per image; at most {MAX_Q}")
    return families


def _layers(text):
    """Parse comma-separated vision-tower layer indices."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"feature layers must be comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    """The training script's command-line options."""
    p = argparse.ArgumentParser(prog="tokenprune testbed train", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=80.0,
                   help="wall-clock training budget (both stages, counted once the data and model are set up)")
    p.add_argument("--stage1-minutes", type=float, default=6.0)
    p.add_argument("--bgdrop-from", type=float, default=0.6,
                   help="fraction of stage 2 after which background dropping is on")
    p.add_argument("--bgdrop", default="196:0.4,96:0.3,48:0.3", help="image tokens kept : probability")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=5.0, help="minutes between held-out evaluations")
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="bf16: autocast to bfloat16 (on CPU and CUDA); fp32: no autocast")
    p.add_argument("--out", default="testbed_checkpoint")
    p.add_argument("--curriculum", default="0.15:1-3,0.35:1-5,1.0:2-6",
                   help="object-count curriculum: stage-2 time fraction : min-max objects, comma-separated")
    p.add_argument("--init", default="", help="warm start from a saved testbed checkpoint directory")
    p.add_argument("--questions", type=_families, default=DEFAULT_QUESTIONS,
                   help=f"question families asked about each training image (at most {MAX_Q}, repeats allowed)")
    p.add_argument("--position-weight", type=float, default=0.0,
                   help="weight of an auxiliary loss that has each projected patch token predict its own "
                        "(column, row) in stage 2 (off by default; see the testbed docs)")
    p.add_argument("--feature-layers", type=_layers, default=(0, -1),
                   help="vision hidden states the projector reads (vision_feature_layer), comma-separated; "
                        "a warm start from a single-layer checkpoint gets zero-initialised projector columns")
    p.add_argument("--add-positions", type=float, default=0.0,
                   help="with --init: add this multiple of the 2-D sine-cosine embedding to the tower's patch "
                        "position embeddings (fresh models start with it)")
    p.add_argument("--aux-weight", type=float, default=0.3, help="weight of the auxiliary vision losses in stage 2")
    p.add_argument("--side-word-weight", type=float, default=1.0,
                   help="weight of an auxiliary loss that has the LLM's last hidden state at the side word "
                        "('left'/'right') of each spatial question predict the answer shape (see the module docs)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="in stage 2, train only the language model (tower and projector stay as they are)")
    p.add_argument("--reset-language-model", action="store_true",
                   help="with --init: keep the vision tower and projector, start the language model afresh")
    return p.parse_args(argv)


def patch_targets(batch_scenes, full_pixels=24):
    """Per patch: 1 + combo of the object covering it (0 background, -100 ambiguous), and object centres."""
    import torch

    labels = np.zeros((len(batch_scenes), S.NUM_PATCHES), dtype=np.int64)
    centres = np.zeros((len(batch_scenes), S.NUM_PATCHES), dtype=np.float32)
    for i, sc in enumerate(batch_scenes):
        for x, y, sz in sc.boxes:
            cx = min(int(x + sz / 2) // S.PATCH_SIZE, S.GRID - 1)
            cy = min(int(y + sz / 2) // S.PATCH_SIZE, S.GRID - 1)
            centres[i, cy * S.GRID + cx] = 1.0
        best, best_cover = sc.cover.argmax(0), sc.cover.max(0)
        cls = np.array([1 + S.COLOR_NAMES.index(c) * len(S.SHAPES) + S.SHAPES.index(s) for c, s in sc.objects])
        lab = cls[best]
        lab[best_cover < full_pixels] = -100
        lab[best_cover == 0] = 0
        labels[i] = lab
    return torch.from_numpy(labels), torch.from_numpy(centres)


DEFAULT_QUESTIONS = ("color", "shape", "exists", "exists", "count", "spatial")
# With two objects "what shape is left of the X ?" is answered by "the object that is not X", without
# looking at positions; a model that learns that shortcut early does not unlearn it, so training asks
# spatial questions only where the scene holds a third object.
SPATIAL_MIN_OBJECTS = 3


def scene_questions(rng, scene, families=DEFAULT_QUESTIONS):
    """Valid questions about one scene, one per entry of ``families``, shuffled.

    A family named twice gets two different questions where the scene admits them; ``spatial`` is
    asked only of scenes with at least ``SPATIAL_MIN_OBJECTS`` objects.
    """
    qs, seen = [], set()
    for f in families:
        if f == "spatial" and len(scene.objects) < SPATIAL_MIN_OBJECTS:
            continue
        for _ in range(4):  # a few draws to find a question not asked yet
            q = S.questions_for(rng, scene, f)
            if q is None:
                break
            if (q.text, q.answer) not in seen:
                seen.add((q.text, q.answer))
                qs.append(q)
                break
    return [qs[i] for i in rng.permutation(len(qs))]


MAX_Q = 6
MAX_Q_LEN = 10  # longest question (9 words) plus its answer
SEQ_LEN = 1 + S.NUM_PATCHES + MAX_Q * MAX_Q_LEN


def multi_batch(rng, backgrounds, n, lo, hi, families=DEFAULT_QUESTIONS):
    """Training batch: ``<s> <image>x196 q1 a1 q2 a2 ...`` right-padded, answer positions, answer ids,
    each answer's question family (index into ``QUESTION_FAMILIES``, -1 where no question), and for
    spatial questions the position of the side word and the answer shape (index into ``SHAPES``,
    else -100)."""
    import torch

    batch_scenes = [S.make_scene(rng, backgrounds, lo, hi) for _ in range(n)]
    input_ids = torch.full((n, SEQ_LEN), S.PAD_ID, dtype=torch.long)
    answer_pos = torch.zeros((n, MAX_Q), dtype=torch.long)
    answers = torch.full((n, MAX_Q), -100, dtype=torch.long)
    side_pos = torch.zeros((n, MAX_Q), dtype=torch.long)
    side_answers = torch.full((n, MAX_Q), -100, dtype=torch.long)
    family = torch.full((n, MAX_Q), -1, dtype=torch.long)
    for i, sc in enumerate(batch_scenes):
        ids = [S.BOS_ID] + [S.IMAGE_ID] * S.NUM_PATCHES
        for j, q in enumerate(scene_questions(rng, sc, families)):
            if q.family == "spatial":
                side_pos[i, j] = len(ids) + next(k for k, w in enumerate(q.words) if w in S.SIDES)
                side_answers[i, j] = S.SHAPES.index(q.answer)
            ids += [S.WORD_TO_ID[w] for w in q.words]
            answer_pos[i, j] = len(ids) - 1
            answers[i, j] = S.WORD_TO_ID[q.answer]
            family[i, j] = S.QUESTION_FAMILIES.index(q.family)
            ids.append(S.WORD_TO_ID[q.answer])
        input_ids[i, : len(ids)] = torch.tensor(ids)
    pv = torch.from_numpy(S.pixel_values(np.stack([s.image for s in batch_scenes])))
    pres = torch.from_numpy(np.stack([S.presence(s) for s in batch_scenes]))
    return dict(input_ids=input_ids, answer_pos=answer_pos, answers=answers, family=family, pixel_values=pv,
                presence=pres, side_pos=side_pos, side_answers=side_answers), \
        batch_scenes


def eval_batches(n, seed):
    """Single-question held-out batches (seeds disjoint from training and from the shipped held-out set)."""
    import torch

    rng = np.random.default_rng(seed)
    bgs = S.make_backgrounds(200, seed=seed + 1)
    fams = [S.QUESTION_FAMILIES[i % len(S.QUESTION_FAMILIES)] for i in range(n)]
    out = []
    for start in range(0, n, 50):
        ex = [S.make_example(rng, bgs, f) for f in fams[start:start + 50]]
        ids = [S.prompt_ids(q.words) for _, q in ex]
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ex), L), S.PAD_ID, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
        out.append(dict(
            input_ids=input_ids,
            last=torch.tensor([len(x) - 1 for x in ids]),
            labels=torch.tensor([S.WORD_TO_ID[q.answer] for _, q in ex]),
            family=np.array([S.QUESTION_FAMILIES.index(q.family) for _, q in ex]),
            pixel_values=torch.from_numpy(S.pixel_values(np.stack([sc.image for sc, _ in ex]))),
        ))
    return out


def family_tally(hit, family):
    """Correct answers and questions per family, float64 ``[len(QUESTION_FAMILIES)]`` each.

    ``family`` -1 marks an answer slot with no question.
    """
    asked = family >= 0
    n = len(S.QUESTION_FAMILIES)
    return (np.bincount(family[asked], weights=hit[asked], minlength=n),
            np.bincount(family[asked], minlength=n).astype(np.float64))


def cosine_lr(frac, base, warm=0.03, floor=0.05):
    """Learning rate at ``frac`` of training: linear warm-up, then cosine decay to ``floor * base``."""
    if frac < warm:
        return base * max(frac / warm, 0.02)
    f = (frac - warm) / (1 - warm)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0))))


def main(argv=None):
    """Train the testbed model (both stages) and save the checkpoint; see the module docstring."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import transformers

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    budget = args.minutes * 60

    def elapsed():
        return time.time() - t0

    def log(msg):
        print(f"[{elapsed() / 60:6.2f} min] {msg}", flush=True)

    rng = np.random.default_rng(args.seed)
    backgrounds = S.make_backgrounds(1500, seed=args.seed + 1)
    evals = eval_batches(args.eval_n, seed=50_000 + args.seed)
    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init)
        if feature_layers(model.config) != list(args.feature_layers):
            widen_projector(model, args.feature_layers)
        if args.reset_language_model:
            model = reset_language_model(model, args.seed)
        if args.add_positions:
            add_patch_positions(model, args.add_positions)
        model.train()
    else:
        if args.reset_language_model:
            raise SystemExit("--reset-language-model needs --init (a checkpoint whose vision side to keep)")
        model = build_model(feature_layers=args.feature_layers, seed=args.seed)
    vh = model.config.vision_config.hidden_size
    cls_head = nn.Linear(vh, S.NUM_COMBOS)
    patch_head = nn.Sequential(nn.LayerNorm(vh), nn.Linear(vh, S.NUM_COMBOS + 2))
    th = model.config.text_config.hidden_size
    position_head = nn.Sequential(nn.LayerNorm(th), nn.Linear(th, 2))
    side_head = nn.Linear(th, len(S.SHAPES))
    aux_path = args.out.rstrip("/") + ".aux_heads.pt"
    init_aux = args.init.rstrip("/") + ".aux_heads.pt" if args.init else ""
    if init_aux and os.path.exists(init_aux):
        heads = torch.load(init_aux)
        cls_head.load_state_dict(heads["cls_head"])
        patch_head.load_state_dict(heads["patch_head"])
        if "position_head" in heads:
            position_head.load_state_dict(heads["position_head"])
        if "side_head" in heads:
            side_head.load_state_dict(heads["side_head"])
    base = model.model
    tower = base.vision_tower
    log(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; args {vars(args)}")

    dev = torch.device(args.device)
    model.to(dev)
    cls_head.to(dev)
    patch_head.to(dev)
    position_head.to(dev)
    side_head.to(dev)
    grid = torch.arange(S.NUM_PATCHES, device=dev)
    patch_xy = torch.stack([grid % S.GRID, grid // S.GRID], -1).float() / (S.GRID - 1) * 2 - 1  # (196, 2)

    def position_loss(feats):
        """Every projected patch token predicts its own (column, row): keeps "where" in what the LLM sees."""
        return F.mse_loss(position_head(feats).float(), patch_xy.expand(feats.shape[0], -1, -1))

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def aux_losses(vout, presence, plab, pcen):
        l_cls = F.binary_cross_entropy_with_logits(cls_head(vout.pooler_output).float(), presence)
        po = patch_head(vout.last_hidden_state[:, 1:]).float()
        l_patch = F.cross_entropy(po[..., : S.NUM_COMBOS + 1].reshape(-1, S.NUM_COMBOS + 1), plab.reshape(-1),
                                  ignore_index=-100)
        l_patch = l_patch + F.binary_cross_entropy_with_logits(po[..., -1], pcen,
                                                               pos_weight=torch.tensor(10.0, device=dev))
        return l_cls + l_patch

    @torch.no_grad()
    def evaluate():
        model.eval()
        correct = np.zeros(len(S.QUESTION_FAMILIES))
        total = np.zeros(len(S.QUESTION_FAMILIES))
        for b in evals:
            b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
            with autocast():
                feats = projected_features(model, tower(b["pixel_values"], output_hidden_states=True))
                emb = base.get_input_embeddings()(b["input_ids"])
                emb = emb.masked_scatter((b["input_ids"] == S.IMAGE_ID)[..., None], feats.to(emb.dtype))
                h = base.language_model(inputs_embeds=emb).last_hidden_state
                pred = model.lm_head(h[torch.arange(h.shape[0]), b["last"]]).float().argmax(-1)
            hits, counts = family_tally((pred == b["labels"]).cpu().numpy(), b["family"])
            correct += hits
            total += counts
        model.train()
        return correct / np.maximum(total, 1), correct.sum() / total.sum()

    def save(curve):
        model.eval()
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out)
        build_processor().save_pretrained(args.out)
        torch.save({"cls_head": cls_head.state_dict(), "patch_head": patch_head.state_dict(),
                    "position_head": position_head.state_dict(), "side_head": side_head.state_dict()}, aux_path)
        with open(os.path.join(args.out, "training_curve.json"), "w") as fh:
            json.dump(dict(args=vars(args), curve=curve, train_minutes=elapsed() / 60), fh, indent=1)
        model.train()

    log("data and model ready; the time budget starts now")
    t0 = time.time()

    # Stage 1: vision tower and auxiliary heads only.
    s1 = args.stage1_minutes * 60
    params1 = list(tower.parameters()) + list(cls_head.parameters()) + list(patch_head.parameters())
    opt1 = torch.optim.AdamW(params1, lr=1.5e-3, betas=(0.9, 0.98), weight_decay=0.01)

    def stage1_loss(pv, pres, plab, pcen):
        with autocast():
            return aux_losses(tower(pv), pres, plab, pcen)

    stage1 = torch.compile(stage1_loss) if args.compile else stage1_loss
    step = 0
    while elapsed() < s1:
        for g in opt1.param_groups:
            g["lr"] = cosine_lr(elapsed() / s1, 1.5e-3, warm=0.05, floor=0.1)
        batch_scenes = [S.make_scene(rng, backgrounds) for _ in range(64)]
        pv = torch.from_numpy(S.pixel_values(np.stack([s.image for s in batch_scenes])))
        pres = torch.from_numpy(np.stack([S.presence(s) for s in batch_scenes]))
        loss = stage1(pv.to(dev), pres.to(dev), *(t.to(dev) for t in patch_targets(batch_scenes)))
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params1, 1.0)
        opt1.step()
        step += 1
        if step % 25 == 0:
            log(f"stage 1 step {step} aux loss {loss.item():.4f}")
    del opt1

    # Stage 2: end-to-end VQA.
    vis_ids = {id(p) for p in tower.parameters()}
    if args.freeze_vision:
        vis_ids |= {id(p) for p in base.multi_modal_projector.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in vis_ids)
    other = [p for p in model.parameters() if id(p) not in vis_ids]
    aux = [p for head in (cls_head, patch_head, position_head, side_head) for p in head.parameters()]
    opt = torch.optim.AdamW([
        {"params": other, "mult": 1.0},
        {"params": list(tower.parameters()), "mult": 0.5},  # --freeze-vision: no gradients, AdamW skips them
        {"params": aux, "mult": 0.5},
    ], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    all_params = [p for g in opt.param_groups for p in g["params"]]

    def stage2_loss(input_ids, pv, answer_pos, answers, side_pos, side_answers, pres, plab, pcen, keep):
        with autocast():
            vout = tower(pv, output_hidden_states=True)
            feats = projected_features(model, vout)
            emb = base.get_input_embeddings()(input_ids)
            B, K = keep.shape
            kept = torch.gather(feats, 1, keep[..., None].expand(-1, -1, feats.shape[-1]))
            seq = torch.cat([emb[:, :1], kept.to(emb.dtype), emb[:, 1 + S.NUM_PATCHES:]], 1)
            n_text = input_ids.shape[1] - 1 - S.NUM_PATCHES
            pos = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), 1 + keep,
                             (1 + S.NUM_PATCHES + torch.arange(n_text, device=dev))[None].expand(B, -1)], 1)
            h = base.language_model(inputs_embeds=seq, position_ids=pos,
                                    attention_mask=torch.ones(B, seq.shape[1], dtype=torch.long, device=dev),
                                    ).last_hidden_state

            def at(pos):  # hidden states at text positions of the full sequence, in the pruned one
                idx = torch.where(pos > S.NUM_PATCHES, pos - S.NUM_PATCHES + K, 0)
                return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

            lg = model.lm_head(at(answer_pos)).float()
            lg = lg.reshape(-1, lg.shape[-1])
            l_ans = F.cross_entropy(lg, answers.reshape(-1), ignore_index=-100)
            loss = l_ans + args.aux_weight * aux_losses(vout, pres, plab, pcen)
            if args.side_word_weight and bool((side_answers >= 0).any()):
                side = side_head(at(side_pos)).float().reshape(-1, len(S.SHAPES))
                loss = loss + args.side_word_weight * F.cross_entropy(side, side_answers.reshape(-1),
                                                                      ignore_index=-100)
            if args.position_weight:
                loss = loss + args.position_weight * position_loss(feats)
            return loss, l_ans, lg

    stage2 = torch.compile(stage2_loss, dynamic=False) if args.compile else stage2_loss
    bgdrop = [(int(k), float(p)) for k, p in (x.split(":") for x in args.bgdrop.split(","))]
    drop_p = np.array([p for _, p in bgdrop]) / sum(p for _, p in bgdrop)
    curriculum = [(float(f), tuple(int(v) for v in r.split("-")))
                  for f, r in (x.split(":") for x in args.curriculum.split(","))]
    t2 = elapsed()
    s2 = budget - t2
    curve, recent = [], collections.deque(maxlen=20)  # (answer loss, hits, counts) of the last steps
    next_eval = t2 + args.eval_every * 60
    step = 0
    while elapsed() < budget:
        frac = (elapsed() - t2) / s2
        for g in opt.param_groups:
            g["lr"] = cosine_lr(frac, args.lr) * g["mult"]
        lo, hi = next(r for f, r in curriculum if frac <= f)
        b, batch_scenes = multi_batch(rng, backgrounds, args.batch_size, lo, hi, args.questions)
        plab, pcen = patch_targets(batch_scenes)
        k = S.NUM_PATCHES
        if frac >= args.bgdrop_from:
            k = bgdrop[rng.choice(len(bgdrop), p=drop_p)][0]
        if k < S.NUM_PATCHES:
            keep = []
            for sc in batch_scenes:
                cov = sc.cover.sum(0)
                prio = np.where(cov > 0, 1e6 + cov, 0.0) + rng.random(S.NUM_PATCHES)
                keep.append(np.sort(np.argsort(-prio)[:k]))
            keep = torch.from_numpy(np.stack(keep)).long()
        else:
            keep = torch.arange(S.NUM_PATCHES)[None].expand(args.batch_size, -1).contiguous()
        b = {k_: v.to(dev) for k_, v in b.items()}
        loss, l_ans, lg = stage2(b["input_ids"], b["pixel_values"], b["answer_pos"], b["answers"], b["side_pos"],
                                 b["side_answers"], b["presence"],
                                 plab.to(dev), pcen.to(dev), keep.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        step += 1
        recent.append((l_ans.item(), *family_tally((lg.argmax(-1) == b["answers"].reshape(-1)).cpu().numpy(),
                                                   b["family"].reshape(-1).cpu().numpy())))
        if step % 20 == 0:
            hits, counts = np.sum([h[1] for h in recent], 0), np.sum([h[2] for h in recent], 0)
            per = " ".join(f"{f} {h / c:.2f}" for f, h, c in zip(S.QUESTION_FAMILIES, hits, counts) if c)
            log(f"stage 2 step {step} answer loss {np.mean([h[0] for h in recent]):.4f} train acc "
                f"{hits.sum() / counts.sum():.3f} ({per}) lr {opt.param_groups[0]['lr']:.2e}")
        if elapsed() >= next_eval:
            per, acc = evaluate()
            curve.append(dict(minutes=elapsed() / 60, step=step, accuracy=acc, per_family=per.tolist()))
            log(f"EVAL step {step} accuracy {acc:.3f} " + str(dict(zip(S.QUESTION_FAMILIES, np.round(per, 3)))))
            save(curve)
            next_eval = elapsed() + args.eval_every * 60
    per, acc = evaluate()
    curve.append(dict(minutes=elapsed() / 60, step=step, accuracy=acc, per_family=per.tolist()))
    log(f"FINAL accuracy {acc:.3f} " + str(dict(zip(S.QUESTION_FAMILIES, np.round(per, 3)))))
    save(curve)
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
