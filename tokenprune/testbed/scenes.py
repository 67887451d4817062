"""Procedural VQA scenes with ground-truth evidence, the data of the tokenprune testbed.

Each scene is a 224 x 224 RGB image: a dimmed, partly desaturated crop of one of the photos that
scikit-learn ships (``sklearn.datasets.load_sample_images``), with 2 to 6 non-overlapping solid shapes
(circle, square, triangle, cross) in 6 colours. The image is cut into a 14 x 14 grid of 16 x 16
patches, the 196 visual tokens of the testbed model, and for every object we record how many pixels
of each patch it covers. A question's *evidence* is the set of patches covered (at least
``EVIDENCE_MIN_PIXELS``) by the objects one must see to answer it.

Question families (every answer is one word):

========== ============================================ ========================================
family     question                                     evidence
========== ============================================ ========================================
color      ``what color is the triangle ?``             the (unique) queried object
shape      ``what shape is the red object ?``           the (unique) queried object
exists     ``is there a red circle ?``                  the match ("yes"), else the near misses
count      ``how many square are there ?`` (0-4)        every object of that shape
spatial    ``what shape is left of the blue square ?``  the reference object and the answer
========== ============================================ ========================================

``spatial`` asks only where the answer is unambiguous: exactly one object has its centre at least
``SPATIAL_MARGIN`` pixels to the left (or right) of the reference object's centre, and no other
object is within the margin of that line.

Everything is seeded: the same seed gives the same scenes, questions and evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 224
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 14
NUM_PATCHES = GRID * GRID  # 196

COLORS = {
    "red": (235, 35, 35),
    "green": (40, 200, 60),
    "blue": (40, 80, 245),
    "yellow": (245, 225, 30),
    "purple": (160, 50, 235),
    "white": (245, 245, 245),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "cross"]
#: The question families, in the order tables list them.
QUESTION_FAMILIES = ["color", "shape", "exists", "count", "spatial"]
#: Former name of :data:`QUESTION_FAMILIES`, kept as an alias (not to be confused with the model
#: families of :mod:`tokenprune.testing.tiny_models`).
FAMILIES = QUESTION_FAMILIES
COUNT_WORDS = ["0", "1", "2", "3", "4"]
SIDES = ["left", "right"]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    ["what", "color", "is", "the", "shape", "object", "there", "a", "how", "many", "are", "?", "yes", "no", "of"]
    + SIDES
    + COLOR_NAMES
    + SHAPES
    + COUNT_WORDS
)
VOCAB = SPECIAL_TOKENS + WORDS
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 24, 40
EVIDENCE_MIN_PIXELS = 4  # a patch holds evidence of an object if >= 4 of its 256 pixels are covered
SPATIAL_MARGIN = 12  # pixels between centres for "left of" / "right of" to count

NUM_COMBOS = len(COLOR_NAMES) * len(SHAPES)

_PHOTOS = None


def _photos():
    """The background photos (scikit-learn's sample images), loaded once."""
    global _PHOTOS
    if _PHOTOS is None:
        from PIL import Image
        from sklearn.datasets import load_sample_images

        _PHOTOS = [Image.fromarray(np.asarray(im)) for im in load_sample_images().images]
    return _PHOTOS


def make_backgrounds(n: int, seed: int) -> np.ndarray:
    """Return ``n`` dimmed, partly desaturated random crops of the scikit-learn photos.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``(n, 224, 224, 3)``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        width, height = photo.size
        side = int(rng.integers(160, height + 1))
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        a = np.asarray(crop, dtype=np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = 0.6 * a + 0.4 * a.mean(-1, keepdims=True)
        a = a * rng.uniform(0.35, 0.6)
        out[i] = np.clip(a, 0, 255).astype(np.uint8)
    return out


def _draw(draw, shape: str, x: int, y: int, s: int, fill) -> None:
    """Draw one ``shape`` of size ``s`` with its top-left corner at ``(x, y)``."""
    if shape == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    elif shape == "cross":
        t = max(6, int(round(s * 0.34)))
        o = (s - t) // 2
        draw.rectangle([x + o, y, x + o + t - 1, y + s - 1], fill=fill)
        draw.rectangle([x, y + o, x + s - 1, y + o + t - 1], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _place(rng, sizes, gap=4, tries=200):
    """Top-left corners of non-overlapping boxes of ``sizes``, ``gap`` pixels apart (rejection sampling)."""
    boxes = []
    for s in sizes:
        for _ in range(tries):
            x = int(rng.integers(2, IMAGE_SIZE - s - 2))
            y = int(rng.integers(2, IMAGE_SIZE - s - 2))
            if all(
                x + s + gap <= bx or bx + bs + gap <= x or y + s + gap <= by or by + bs + gap <= y
                for bx, by, bs in boxes
            ):
                boxes.append((x, y, s))
                break
        else:
            return None
    return boxes


@dataclass
class Scene:
    """One generated image and its objects.

    Attributes
    ----------
    image : numpy.ndarray
        uint8, ``(224, 224, 3)``.
    objects : list of (str, str)
        ``(color, shape)`` per object.
    boxes : list of (int, int, int)
        ``(x, y, size)`` in pixels per object.
    cover : numpy.ndarray
        int16, ``(n_objects, 196)``: pixels of each patch covered by each object (raster order).
    """

    image: np.ndarray
    objects: list
    boxes: list
    cover: np.ndarray
    count_shape: str | None = None

    def centres(self) -> np.ndarray:
        """Object centres in pixels, float ``(n_objects, 2)`` as ``(x, y)``."""
        return np.array([(x + s / 2, y + s / 2) for x, y, s in self.boxes], dtype=np.float64)


@dataclass
class Question:
    """A question about a scene, its answer and its evidence objects."""

    words: list
    answer: str
    family: str
    evidence_objects: list = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.words)


def render_scene(rng, backgrounds, objects, count_shape=None) -> Scene | None:
    """Place and draw ``objects`` on a random background; ``None`` if they do not fit."""
    from PIL import Image, ImageDraw

    sizes = [int(rng.integers(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE + 1)) for _ in objects]
    boxes = _place(rng, sizes)
    if boxes is None:
        return None
    im = Image.fromarray(backgrounds[rng.integers(len(backgrounds))])
    draw = ImageDraw.Draw(im)
    cover = np.zeros((len(objects), NUM_PATCHES), dtype=np.int16)
    for j, ((c, s), (x, y, sz)) in enumerate(zip(objects, boxes)):
        jitter = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[c])
        _draw(draw, s, x, y, sz, jitter)
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw(ImageDraw.Draw(m), s, x, y, sz, 1)
        cover[j] = np.asarray(m, dtype=np.int16).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).sum((1, 3)).reshape(-1)
    return Scene(np.asarray(im), list(objects), boxes, cover, count_shape)


def make_scene(rng, backgrounds, min_objects=2, max_objects=6) -> Scene:
    """A random scene; half are built around a (shape, count 0-4) pair so count answers are balanced."""
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        if rng.random() < 0.5:
            count_shape = SHAPES[rng.integers(4)]
            k = int(rng.integers(0, min(4, n) + 1))
            others = [s for s in SHAPES if s != count_shape]
            shapes = [count_shape] * k + [others[rng.integers(3)] for _ in range(n - k)]
        else:
            count_shape = None
            shapes = [SHAPES[rng.integers(4)] for _ in range(n)]
        objects = [(COLOR_NAMES[rng.integers(6)], s) for s in shapes]
        objects = [objects[i] for i in rng.permutation(n)]
        scene = render_scene(rng, backgrounds, objects, count_shape)
        if scene is not None:
            return scene


def spatial_candidates(scene: Scene) -> list:
    """Unambiguous ``(reference index, side, answer index)`` triples for the spatial family."""
    xs = scene.centres()[:, 0]
    out = []
    for ref, obj in enumerate(scene.objects):
        if scene.objects.count(obj) != 1:
            continue
        for side in SIDES:
            d = (xs[ref] - xs) if side == "left" else (xs - xs[ref])
            clearly = [j for j in range(len(xs)) if j != ref and d[j] >= SPATIAL_MARGIN]
            unclear = [j for j in range(len(xs)) if j != ref and 0 < abs(d[j]) < SPATIAL_MARGIN]
            if len(clearly) == 1 and not unclear:
                out.append((ref, side, clearly[0]))
    return out


def questions_for(rng, scene: Scene, family: str) -> Question | None:
    """One random question of ``family`` valid for ``scene``, or ``None`` if the scene admits none."""
    objs = scene.objects
    colors = [c for c, _ in objs]
    shapes = [s for _, s in objs]
    if family == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[rng.integers(len(unique))]
        i = shapes.index(s)
        return Question(["what", "color", "is", "the", s, "?"], colors[i], family, [i])
    if family == "shape":
        unique = [c for c in COLOR_NAMES if colors.count(c) == 1]
        if not unique:
            return None
        c = unique[rng.integers(len(unique))]
        i = colors.index(c)
        return Question(["what", "shape", "is", "the", c, "object", "?"], shapes[i], family, [i])
    if family == "exists":
        present = set(objs)
        if rng.random() < 0.5:
            qc, qs = objs[rng.integers(len(objs))]
            answer = "yes"
        else:
            answer = "no"
            hard = [(c, s) for c in sorted(set(colors)) for s in sorted(set(shapes)) if (c, s) not in present]
            if hard and rng.random() < 0.5:
                qc, qs = hard[rng.integers(len(hard))]
            else:
                absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
                qc, qs = absent[rng.integers(len(absent))]
        if answer == "yes":
            ev = [i for i, o in enumerate(objs) if o == (qc, qs)]
        else:
            ev = [i for i, (c, s) in enumerate(objs) if c == qc or s == qs]
        return Question(["is", "there", "a", qc, qs, "?"], answer, family, ev)
    if family == "count":
        s = scene.count_shape if scene.count_shape is not None else SHAPES[rng.integers(4)]
        k = shapes.count(s)
        if k > 4:
            return None
        return Question(["how", "many", s, "are", "there", "?"], COUNT_WORDS[k], family,
                        [i for i in range(len(objs)) if shapes[i] == s])
    if family == "spatial":
        cands = spatial_candidates(scene)
        if not cands:
            return None
        ref, side, ans = cands[rng.integers(len(cands))]
        c, s = objs[ref]
        return Question(["what", "shape", "is", side, "of", "the", c, s, "?"], shapes[ans], family, [ref, ans])
    raise ValueError(f"unknown question family {family!r}; expected one of {QUESTION_FAMILIES}")


def make_example(rng, backgrounds, family: str) -> tuple:
    """A scene with one question of ``family`` (redrawn until the scene admits one)."""
    while True:
        lo = 3 if family == "spatial" else 2
        scene = make_scene(rng, backgrounds, lo, 6)
        q = questions_for(rng, scene, family)
        if q is not None:
            return scene, q


def evidence_mask(scene: Scene, question: Question, min_pixels: int = EVIDENCE_MIN_PIXELS) -> np.ndarray:
    """Boolean ``(196,)`` mask of the patches holding the question's evidence."""
    if not question.evidence_objects:
        return np.zeros(NUM_PATCHES, dtype=bool)
    return scene.cover[question.evidence_objects].sum(0) >= min_pixels


def object_mask(scene: Scene, min_pixels: int = EVIDENCE_MIN_PIXELS) -> np.ndarray:
    """Boolean ``(196,)`` mask of the patches covered by any object."""
    return scene.cover.sum(0) >= min_pixels


def prompt_ids(words) -> list:
    """``<s> <image> x 196 question...``: what the testbed processor produces for ``"<s><image> question"``."""
    return [BOS_ID] + [IMAGE_ID] * NUM_PATCHES + [WORD_TO_ID[w] for w in words]


def pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 ``(B, 224, 224, 3)`` to float32 ``(B, 3, 224, 224)``, CLIP-normalised as the processor does."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def presence(scene: Scene) -> np.ndarray:
    """float32 ``(24,)`` multi-hot of the (colour, shape) pairs present."""
    out = np.zeros(NUM_COMBOS, dtype=np.float32)
    for c, s in scene.objects:
        out[COLOR_NAMES.index(c) * len(SHAPES) + SHAPES.index(s)] = 1.0
    return out


def held_out_set(n: int = 1000, seed: int = 12345, limit: int | None = None):
    """The fixed held-out evaluation set: ``n`` (scene, question) pairs, families in equal shares.

    The backgrounds and the scenes come from seeds disjoint from training's. ``limit`` returns only
    the first ``limit`` pairs of that same set (generated without the rest).
    """
    rng = np.random.default_rng(seed)
    backgrounds = make_backgrounds(300, seed=seed + 1)
    families = [QUESTION_FAMILIES[i % len(QUESTION_FAMILIES)] for i in range(n)]
    families = [families[i] for i in rng.permutation(n)]
    return [make_example(rng, backgrounds, f) for f in families[:limit]]
