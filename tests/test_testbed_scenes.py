"""The testbed generator: evidence masks match independently rasterised shapes, answers match the scene."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune.testbed import scenes as S

P, G = S.PATCH_SIZE, S.GRID


@pytest.fixture(scope="module")
def backgrounds():
    return S.make_backgrounds(8, seed=3)


def _raster(shape: str, x: int, y: int, s: int) -> np.ndarray:
    """Independent rasterisation: bool (224, 224) of the pixel centres inside the shape's geometry.

    Squares and crosses are exact (PIL fills rectangles inclusively); circles and triangles are the
    analytic shapes, whose boundary pixels may differ from PIL's by about one pixel.
    """
    yy, xx = np.mgrid[0:S.IMAGE_SIZE, 0:S.IMAGE_SIZE].astype(np.float64)
    if shape == "square":
        return (xx >= x) & (xx <= x + s - 1) & (yy >= y) & (yy <= y + s - 1)
    if shape == "cross":
        t = max(6, int(round(s * 0.34)))
        o = (s - t) // 2
        vert = (xx >= x + o) & (xx <= x + o + t - 1) & (yy >= y) & (yy <= y + s - 1)
        horiz = (xx >= x) & (xx <= x + s - 1) & (yy >= y + o) & (yy <= y + o + t - 1)
        return vert | horiz
    if shape == "circle":
        c, r = x + (s - 1) / 2, (s - 1) / 2
        return (xx - c) ** 2 + (yy - (y + (s - 1) / 2)) ** 2 <= r ** 2
    if shape == "triangle":
        apex_x, top, bottom = x + (s - 1) / 2, y, y + s - 1
        frac = (yy - top) / max(bottom - top, 1)
        half = frac * (s - 1) / 2
        return (yy >= top) & (yy <= bottom) & (xx >= apex_x - half) & (xx <= apex_x + half)
    raise AssertionError(shape)


def _cover(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(G, P, G, P).sum((1, 3)).reshape(-1)


def _expected_evidence(scene, q) -> list:
    """Evidence objects from the question text alone (independent of ``Question.evidence_objects``)."""
    objs = scene.objects
    w = q.words
    if q.family == "color":
        return [i for i, (_, s) in enumerate(objs) if s == w[4]]
    if q.family == "shape":
        return [i for i, (c, _) in enumerate(objs) if c == w[4]]
    if q.family == "exists":
        qc, qs = w[3], w[4]
        match = [i for i, o in enumerate(objs) if o == (qc, qs)]
        return match or [i for i, (c, s) in enumerate(objs) if c == qc or s == qs]
    if q.family == "count":
        return [i for i, (_, s) in enumerate(objs) if s == w[2]]
    if q.family == "spatial":
        ref = objs.index((w[6], w[7]))
        xs = scene.centres()[:, 0]
        d = (xs[ref] - xs) if w[3] == "left" else (xs - xs[ref])
        ans = [j for j in range(len(objs)) if j != ref and d[j] >= S.SPATIAL_MARGIN]
        return sorted([ref] + ans)
    raise AssertionError(q.family)


def _expected_answer(scene, q) -> str:
    objs, w = scene.objects, q.words
    if q.family == "color":
        (i,) = [i for i, (_, s) in enumerate(objs) if s == w[4]]
        return objs[i][0]
    if q.family == "shape":
        (i,) = [i for i, (c, _) in enumerate(objs) if c == w[4]]
        return objs[i][1]
    if q.family == "exists":
        return "yes" if (w[3], w[4]) in objs else "no"
    if q.family == "count":
        return str(sum(s == w[2] for _, s in objs))
    if q.family == "spatial":
        ev = [i for i in _expected_evidence(scene, q) if objs[i] != (w[6], w[7])]
        (i,) = ev
        return objs[i][1]
    raise AssertionError(q.family)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), family=st.sampled_from(S.FAMILIES))
def test_evidence_mask_matches_independent_rasterisation(seed, family):
    bgs = S.make_backgrounds(2, seed=seed)
    scene, q = S.make_example(np.random.default_rng(seed), bgs, family)
    ev_objs = _expected_evidence(scene, q)
    assert sorted(q.evidence_objects) == ev_objs
    assert q.answer == _expected_answer(scene, q)
    mask = S.evidence_mask(scene, q)
    assert mask.dtype == bool and mask.shape == (S.NUM_PATCHES,)
    union = np.zeros((S.IMAGE_SIZE, S.IMAGE_SIZE), dtype=bool)
    exact = True
    for j in ev_objs:
        union |= _raster(scene.objects[j][1], *scene.boxes[j])
        exact &= scene.objects[j][1] in ("square", "cross")
    cover = _cover(union)
    if exact:
        np.testing.assert_array_equal(mask, cover >= S.EVIDENCE_MIN_PIXELS)
    else:
        # Boundary pixels of circles and triangles may differ by about one pixel per row.
        assert np.all(mask[cover >= S.EVIDENCE_MIN_PIXELS + 2 * P])
        dilated = union.copy()
        dilated[1:] |= union[:-1]
        dilated[:-1] |= union[1:]
        dilated[:, 1:] |= dilated[:, :-1].copy()
        dilated[:, :-1] |= dilated[:, 1:].copy()
        assert not np.any(mask & (_cover(dilated) == 0))
    if not ev_objs:
        assert not mask.any()


@pytest.mark.parametrize("shape", S.SHAPES)
def test_cover_counts_match_rasterisation(shape, backgrounds):
    rng = np.random.default_rng(7)
    scene = S.render_scene(rng, backgrounds, [("red", shape), ("blue", "square")])
    assert scene is not None
    for j, (_, s) in enumerate(scene.objects):
        ref = _cover(_raster(s, *scene.boxes[j]))
        if s in ("square", "cross"):
            np.testing.assert_array_equal(scene.cover[j], ref)
        else:  # same area to within one boundary pixel per row and column
            assert abs(int(scene.cover[j].sum()) - int(ref.sum())) <= 2 * scene.boxes[j][2]
            assert np.abs(scene.cover[j] - ref).max() <= 2 * P


def test_drawn_pixels_have_the_objects_colour(backgrounds):
    """The image really shows each object where its evidence is: interior pixels carry its colour."""
    rng = np.random.default_rng(11)
    for _ in range(5):
        scene = S.make_scene(rng, backgrounds)
        for (c, s), box in zip(scene.objects, scene.boxes):
            inside = _raster(s, *box)
            # erode by 2 pixels to stay clear of anti-aliasing and approximate boundaries
            core = inside.copy()
            for _ in range(2):
                core[1:-1, 1:-1] &= core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
            px = scene.image[core].astype(int)
            assert len(px) > 0
            assert np.abs(px - np.array(S.COLORS[c])).max() <= 15


def test_evidence_of_no_answer_can_be_empty_and_then_mask_is_empty(backgrounds):
    scene = S.render_scene(np.random.default_rng(0), backgrounds, [("red", "circle"), ("red", "square")])
    q = S.Question(["is", "there", "a", "blue", "cross", "?"], "no", "exists", [])
    assert not S.evidence_mask(scene, q).any()


def test_held_out_set_is_fixed_balanced_and_limit_is_a_prefix():
    a = S.held_out_set(n=50, seed=5)
    b = S.held_out_set(n=50, seed=5, limit=7)
    assert len(a) == 50 and len(b) == 7
    for (sa, qa), (sb, qb) in zip(a, b):
        np.testing.assert_array_equal(sa.image, sb.image)
        assert qa.text == qb.text and qa.answer == qb.answer
    fams = [q.family for _, q in a]
    assert {f: fams.count(f) for f in S.FAMILIES} == {f: 10 for f in S.FAMILIES}


def test_prompt_ids_match_the_processor():
    from tokenprune.testbed.model import build_processor, prompt_text

    proc = build_processor()
    words = ["what", "color", "is", "the", "circle", "?"]
    img = np.zeros((S.IMAGE_SIZE, S.IMAGE_SIZE, 3), dtype=np.uint8)
    from PIL import Image

    enc = proc(images=[Image.fromarray(img)], text=[prompt_text(words)], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == S.prompt_ids(words)
    np.testing.assert_allclose(enc["pixel_values"].numpy(), S.pixel_values(img[None]), atol=1e-5)



def _answer(scene, words):
    """Independent answerer for the question ``words`` (ending in "?") about ``scene``."""
    objs = scene.objects
    if words[:2] == ["what", "color"]:
        (match,) = [c for c, s in objs if s == words[4]]
        return match
    if words[:2] == ["what", "shape"] and words[3] == "the":
        (match,) = [s for c, s in objs if c == words[4]]
        return match
    if words[0] == "is":
        return "yes" if (words[3], words[4]) in objs else "no"
    if words[0] == "how":
        return str(sum(s == words[2] for _, s in objs))
    side, ref = words[3], objs.index((words[6], words[7]))
    xs = scene.centres()[:, 0]
    sign = -1 if side == "left" else 1
    (match,) = [objs[j][1] for j in range(len(objs)) if sign * (xs[j] - xs[ref]) >= S.SPATIAL_MARGIN]
    return match


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_training_sequences_ask_distinct_questions_with_right_answers_at_their_positions(seed):
    """A training sequence asks distinct questions, at most one per requested family entry; the token
    after each answer position is the answer, and an independent answerer agrees with it."""
    from tokenprune.testbed import train as T

    rng = np.random.default_rng(seed)
    families = ("spatial", "spatial", "count", "color", "exists", "exists")
    batch, scenes = T.multi_batch(rng, S.make_backgrounds(2, seed=seed), 3, 3, 6, families)
    for i, scene in enumerate(scenes):
        ids = batch["input_ids"][i].tolist()
        assert ids[: 1 + S.NUM_PATCHES] == S.prompt_ids([])
        questions, words, pos = [], [], 1 + S.NUM_PATCHES
        while pos < len(ids) and ids[pos] != S.PAD_ID:
            words.append(S.VOCAB[ids[pos]])
            if words[-1] == "?":
                questions.append((tuple(words), pos, S.VOCAB[ids[pos + 1]]))
                words, pos = [], pos + 1
            pos += 1
        assert not words
        answers = [(p, a) for p, a in zip(batch["answer_pos"][i].tolist(), batch["answers"][i].tolist()) if a >= 0]
        assert answers == [(p, S.WORD_TO_ID[a]) for _, p, a in questions]
        for q, _, a in questions:
            assert _answer(scene, list(q)) == a, q
        asked = [q for q, _, _ in questions]
        assert len(asked) == len(set(asked)) <= len(families)
        assert sum(q[3] in S.SIDES for q in asked) <= 2
