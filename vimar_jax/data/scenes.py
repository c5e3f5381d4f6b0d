"""The tiny world: procedurally drawn scenes of coloured shapes, with exact ground truth and captions.

A scene is 1-6 objects on a textured dark background, each a shape with a colour, a size and a cell of a
3x3 grid (at most one object per cell, so a position names one object). Scenes vary in size and aspect
ratio so that anyres tiling is exercised. Everything is deterministic: `scene_at(seed, i)` is scene i of
the stream `seed`, and `render(scene)` depends only on the scene.

Captions use a closed vocabulary (`vocabulary()`), every sentence ends with '.' and no '.' occurs inside a
sentence, so splitting on '.' recovers the sentences.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart")
PLURALS = {s: s + ("es" if s.endswith(("s", "x", "sh", "ch")) else "s") for s in SHAPES}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
# Canonical name of each grid cell (row, col).
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DETAIL_PROMPTS = (
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "Describe the shapes in this picture and where they are.",
    "What do you see in this image? Describe it in detail.",
    "Tell me everything you see in the image.",
    "Write a detailed caption for this image.",
)
CAPTION_STYLES = ("detail", "objects", "short")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Ranges of the generator. Sizes in pixels; fractions of the smaller side of a grid cell."""

    min_side: int = 48
    max_side: int = 160
    max_aspect: float = 3.0  # width/height and height/width are at most this
    min_objects: int = 1
    max_objects: int = 6
    small_radius: tuple[float, float] = (0.22, 0.28)  # object radius / min(cell width, cell height)
    large_radius: tuple[float, float] = (0.36, 0.44)
    spill: float = 0.3  # how far (fraction of its radius) an object may reach past its cell
    # How far an object's centre may move from its cell's centre, as a fraction of the cell's width (x) and
    # height (y). Small on purpose: a one-patch-per-cell ViT (the tiny CLIP) reads shapes that sit near a
    # fixed place in their patch (pairwise shape accuracy at chance with centres anywhere in the cell).
    max_shift: float = 0.05
    max_angle: float = 10.0  # degrees of random rotation (small, so a square never becomes a diamond)
    max_overlap: float = 0.1  # pairwise |A & B| / min(|A|, |B|)
    min_visible: float = 0.85  # fraction of each object's pixels not covered by objects drawn later
    color_jitter: int = 12  # per-channel uniform jitter of an object's colour
    noise: float = 5.0  # per-pixel Gaussian noise (std, grey levels)
    background_max: int = 75  # background channels stay below this (objects are bright)

    def __post_init__(self):
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError(f"SceneConfig: need 8 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 0 <= self.max_shift <= 0.5:
            raise ValueError(f"SceneConfig: max_shift must be in [0, 0.5], got {self.max_shift}")
        if self.max_aspect < 1:
            raise ValueError(f"SceneConfig: max_aspect must be >= 1, got {self.max_aspect}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"SceneConfig: need 1 <= min_objects <= max_objects <= 9, got "
                             f"{self.min_objects}, {self.max_objects}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    row: int  # grid cell, 0..2 top to bottom
    col: int  # 0..2 left to right
    cx: float  # centre in pixels
    cy: float
    radius: float  # the shape lies within this distance of its centre
    angle: float  # rotation in degrees
    rgb: tuple[int, int, int]  # the drawn colour (the palette colour plus jitter)

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]  # in drawing order (later ones on top)
    background: tuple[int, int, int]
    noise_seed: int
    noise: float = 5.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        try:
            objects = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])
            return Scene(width=int(d["width"]), height=int(d["height"]), objects=objects,
                         background=tuple(d["background"]), noise_seed=int(d["noise_seed"]),
                         noise=float(d.get("noise", 5.0)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a scene dict: {e!r} (keys: {sorted(d)})") from None


# ----------------------------------------------------------------------------------------------- geometry

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of `shape` (None for the circle), all within distance r of the centre."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.98 * r / np.sqrt(2)  # half side: the corners stay within r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * np.cos(t), r * np.sin(t)) for t in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r) * np.cos(t), (r if k % 2 == 0 else 0.45 * r) * np.sin(t))
               for k, t in enumerate(np.deg2rad(-90 + 36 * np.arange(10)))]
    elif shape == "diamond":
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
    elif shape == "cross":
        a, w = r * 0.96, r * 0.3
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
               (-a, -w), (-w, -w)]
    elif shape == "hexagon":
        pts = [(r * np.cos(t), r * np.sin(t)) for t in np.deg2rad(60 * np.arange(6))]
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        y = y + 2.5  # centre the curve vertically (y spans about [-14.5, 19.5])
        scale = r / np.max(np.hypot(x, y))
        pts = list(zip(x * scale, y * scale))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    c, s_ = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    return [(cx + c * x - s_ * y, cy + s_ * x + c * y) for x, y in pts]


def object_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of the pixels `obj` covers when drawn alone."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    pts = _polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle)
    if pts is None:
        r = obj.radius
        draw.ellipse([obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=255)
    else:
        draw.polygon(pts, fill=255)
    return np.asarray(img) > 0


def visible_masks(scene: Scene) -> list[np.ndarray]:
    """Per object, the pixels where it is visible in the rendered scene (not covered by later objects)."""
    masks = [object_mask(o, scene.width, scene.height) for o in scene.objects]
    covered = np.zeros((scene.height, scene.width), bool)
    out = []
    for m in reversed(masks):
        out.append(m & ~covered)
        covered |= m
    return out[::-1]


def _layout_ok(masks: Sequence[np.ndarray], cfg: SceneConfig) -> bool:
    areas = [int(m.sum()) for m in masks]
    if min(areas) == 0:
        return False
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if (masks[i] & masks[j]).sum() > cfg.max_overlap * min(areas[i], areas[j]):
                return False
    covered = np.zeros_like(masks[0])
    for m, a in zip(reversed(masks), reversed(areas)):
        if (m & ~covered).sum() < cfg.min_visible * a:
            return False
        covered |= m
    return True


# ----------------------------------------------------------------------------------------------- sampling

def _sample_size(rng: np.random.Generator, cfg: SceneConfig) -> tuple[int, int]:
    while True:
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        if max(w / h, h / w) <= cfg.max_aspect:
            return w, h


def _sample_object(rng, cfg: SceneConfig, w: int, h: int, row: int, col: int, shape: str, color: str,
                   size: str, rgb, jitter: bool) -> SceneObject:
    x0, x1 = col * w / 3, (col + 1) * w / 3
    y0, y1 = row * h / 3, (row + 1) * h / 3
    cell = min(x1 - x0, y1 - y0)
    lo, hi = cfg.small_radius if size == "small" else cfg.large_radius
    r = float(rng.uniform(lo, hi)) * cell
    k = 1.0 - cfg.spill
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if jitter:
        # The centre stays inside the cell (so the position is unambiguous), the shape inside the image.
        sx, sy = cfg.max_shift * (x1 - x0), cfg.max_shift * (y1 - y0)
        bx = (max(x0 + k * r, r, cx - sx), min(x1 - k * r, w - r, cx + sx))
        by = (max(y0 + k * r, r, cy - sy), min(y1 - k * r, h - r, cy + sy))
        if bx[0] < bx[1]:
            cx = float(rng.uniform(*bx))
        if by[0] < by[1]:
            cy = float(rng.uniform(*by))
    angle = float(rng.uniform(-cfg.max_angle, cfg.max_angle)) if shape != "circle" else 0.0
    return SceneObject(shape=shape, color=color, size=size, row=row, col=col, cx=round(cx, 3),
                       cy=round(cy, 3), radius=round(r, 3), angle=round(angle, 3), rgb=rgb)


_MAX_REDRAWS = 200


def sample_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> Scene:
    """One random scene. Objects are placed one by one; a placement that breaks the overlap or visibility
    limits is retried with a new jitter, then at the cell centre, then the whole scene is redrawn."""
    cfg = config or SceneConfig()
    w, h = _sample_size(rng, cfg)
    background = tuple(int(v) for v in rng.integers(15, cfg.background_max - 25, size=3))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    for _ in range(_MAX_REDRAWS):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = rng.permutation(9)[:n]
        objects: list[SceneObject] = []
        masks: list[np.ndarray] = []
        for c in cells:
            row, col = divmod(int(c), 3)
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            size = SIZES[rng.integers(2)]
            base = np.array(COLORS[color])
            rgb = tuple(int(v) for v in np.clip(base + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3),
                                                0, 255))
            for attempt in range(12):
                obj = _sample_object(rng, cfg, w, h, row, col, shape, color, size, rgb, jitter=attempt < 11)
                m = object_mask(obj, w, h)
                if _layout_ok(masks + [m], cfg):
                    break
            else:
                break  # redraw the whole scene
            objects.append(obj)
            masks.append(m)
        if len(objects) == n:
            return Scene(width=w, height=h, objects=tuple(objects), background=background,
                         noise_seed=noise_seed, noise=cfg.noise)
    raise ValueError(f"no {w}x{h} scene meets the overlap/visibility limits of {cfg} in {_MAX_REDRAWS} draws")


# Scene streams kept for evaluation: no training data is drawn from them and no recipe is chosen on 1000-1003.
EVALUATION_SEEDS = {100: "the validation stream", 1000: "`vimar eval`'s held-out stream",
                    1001: "the demo's stream", 1002: "the provenance's held-out CHAIR stream",
                    1003: "the claims' held-out stream"}


def check_training_seed(seed: int, what: str = "--seed") -> None:
    """ValueError naming the stream's role when `seed` is one of `EVALUATION_SEEDS`."""
    if seed in EVALUATION_SEEDS:
        raise ValueError(f"{what} {seed} is {EVALUATION_SEEDS[seed]}, kept for evaluation: train on another "
                         "seed, e.g. 2")


def scene_at(seed: int, index: int, config: SceneConfig | None = None) -> Scene:
    """Scene `index` of the stream `seed` (random access: independent of the other indices)."""
    return sample_scene(np.random.default_rng([seed, index]), config)


def scenes(seed: int, n: int, config: SceneConfig | None = None) -> list[Scene]:
    """The first n scenes of the stream `seed`."""
    return [scene_at(seed, i, config) for i in range(n)]


def save_scenes(path: str, items: Iterable[tuple[int, Scene]]) -> None:
    """Write (image_id, scene) pairs as JSON lines: the tiny world's ground truth for `vimar eval chair`."""
    with open(path, "w") as f:
        for image_id, scene in items:
            f.write(json.dumps({"image_id": image_id, **scene.to_dict()}) + "\n")


def load_scenes(path: str) -> dict[int, Scene]:
    """Read `save_scenes` output: {image_id: scene}."""
    out = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out[int(d.pop("image_id"))] = Scene.from_dict(d)
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: bad scene line: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------- rendering

def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = scene.height, scene.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy, phase = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 2 * np.pi)
    wave = 8.0 * np.sin(fx * xx + fy * yy + phase)  # a gentle texture
    return np.asarray(scene.background, np.float32)[None, None, :] + wave[..., None]


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image (deterministic: same scene, same bytes)."""
    rng = np.random.default_rng(scene.noise_seed)
    img = _background(scene, rng)
    for obj in scene.objects:
        m = object_mask(obj, scene.width, scene.height)
        img[m] = np.asarray(obj.rgb, np.float32)
    img = img + rng.normal(0.0, scene.noise, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------- captions

# Phrases naming each grid cell; a parser reads them back as (vertical word, horizontal word).
POSITION_PHRASES = {
    (0, 0): ("in the top left", "in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "at the top center"),
    (0, 2): ("in the top right", "in the top right corner", "at the top right"),
    (1, 0): ("on the left", "at the left", "in the middle left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right", "in the middle right"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
# {np}: "a small red circle"; {pos}: a position phrase. Sentences are capitalised afterwards.
OBJECT_TEMPLATES = (
    "there is {np} {pos}.",
    "{np} is {pos}.",
    "{np} sits {pos}.",
    "{pos}, there is {np}.",
    "we can see {np} {pos}.",
    "{pos} is {np}.",
    "the image shows {np} {pos}.",
)
COUNT_TEMPLATES = ("there are {n} objects.", "the image contains {n} shapes.", "i can see {n} objects.",
                   "the image shows {n} shapes on a dark background.")
COUNT_ONE_TEMPLATES = ("there is only one object.", "the image contains one shape.",
                       "the image shows one shape on a dark background.")
SHAPE_COUNT_TEMPLATES = ("{n} of them are {shapes}.", "there are {n} {shapes}.")
SHAPE_ALL_TEMPLATES = ("they are all {shapes}.",)
RELATION_WORDS = {
    "left": ("is left of", "is to the left of"),
    "right": ("is right of", "is to the right of"),
    "above": ("is above",),
    "below": ("is below",),
}
SHORT_TEMPLATES = ("the image shows {list}.", "the picture contains {list}.", "we can see {list}.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: SceneObject, with_size: bool, article: str | None = "indefinite") -> str:
    """"a small red circle", "an orange star", "the blue cross" (article=None: no article)."""
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    if article == "indefinite":
        words = [_article(words[0])] + words
    elif article == "definite":
        words = ["the"] + words
    return " ".join(words)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def object_sentence(obj: SceneObject, rng: np.random.Generator) -> str:
    """One true sentence about `obj`: its colour, shape, position and sometimes its size."""
    template = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))]
    phrases = POSITION_PHRASES[obj.cell]
    pos = phrases[rng.integers(len(phrases))]
    return _sentence(template.format(np=noun_phrase(obj, bool(rng.integers(2))), pos=pos))


def _count_sentences(scene: Scene, rng) -> list[str]:
    n = len(scene.objects)
    pool = COUNT_ONE_TEMPLATES if n == 1 else COUNT_TEMPLATES
    out = [_sentence(pool[rng.integers(len(pool))].format(n=NUMBERS[n]))]
    shape_counts: dict[str, int] = {}
    for o in scene.objects:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
    for shape, k in shape_counts.items():
        if k == n >= 2:
            t = SHAPE_ALL_TEMPLATES[rng.integers(len(SHAPE_ALL_TEMPLATES))]
        elif k >= 2:
            t = SHAPE_COUNT_TEMPLATES[rng.integers(len(SHAPE_COUNT_TEMPLATES))]
        else:
            continue
        out.append(_sentence(t.format(n=NUMBERS[k], shapes=PLURALS[shape])))
    return out


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    if a.row == b.row and a.col != b.col:
        return "left" if a.col < b.col else "right"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def _relation_sentences(scene: Scene, rng, limit: int) -> list[str]:
    keys = [(o.color, o.shape) for o in scene.objects]
    unique = [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]  # "the red circle" is unambiguous
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:] if _relation(a, b)]
    out = []
    for idx in rng.permutation(len(pairs))[:limit]:
        a, b = pairs[idx]
        if rng.integers(2):
            a, b = b, a
        verbs = RELATION_WORDS[_relation(a, b)]
        text = f"{noun_phrase(a, False, 'definite')} {verbs[rng.integers(len(verbs))]} " \
               f"{noun_phrase(b, False, 'definite')}."
        out.append(_sentence(text))
    return out


def caption_sentences(scene: Scene, rng: np.random.Generator, style: str = "detail") -> list[str]:
    """The sentences of a true caption of `scene`.

    styles: "detail" (one sentence per object, counts, up to two relations; order varies), "objects" (one
    sentence per object, shuffled), "short" (one sentence listing every object).
    """
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    if style == "objects":
        return [object_sentence(o, rng) for o in objs]
    if style == "short":
        nps = [noun_phrase(o, bool(rng.integers(2))) for o in objs]
        listing = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
        t = SHORT_TEMPLATES[rng.integers(len(SHORT_TEMPLATES))]
        return [_sentence(t.format(list=listing))]
    if style != "detail":
        raise ValueError(f"unknown caption style {style!r}; known: {CAPTION_STYLES}")
    body = [object_sentence(o, rng) for o in objs]
    counts = _count_sentences(scene, rng)
    relations = _relation_sentences(scene, rng, limit=int(rng.integers(0, 3)))
    if rng.random() < 0.5:
        return counts[:1] + body + counts[1:] + relations  # "There are three objects. ..." first
    extras = counts + relations
    for s in extras:  # interleave the extra sentences after the first object sentence
        body.insert(int(rng.integers(1, len(body) + 1)), s)
    return body


def caption(scene: Scene, rng: np.random.Generator, style: str = "detail") -> str:
    """A true caption: sentences joined by single spaces, each ending with '.'."""
    return " ".join(caption_sentences(scene, rng, style))


def detail_prompt(rng: np.random.Generator) -> str:
    return DETAIL_PROMPTS[rng.integers(len(DETAIL_PROMPTS))]


def false_sentence(scene: Scene, rng: np.random.Generator, kind: str) -> str:
    """A sentence that is false for `scene` (a hard negative for contrastive training): `false_object` of a
    random object of the scene, described by `object_sentence`.

    kind: "color" (an object with a colour no object of its shape has), "shape" (an object's colour on a
    shape that colour never takes), "absent" (a shape that is not in the scene at all) or "position" (an
    object moved to an empty cell). Falls back to "absent" when the scene leaves no such choice.
    """
    return object_sentence(false_object(scene, rng, kind), rng)


def false_object(scene: Scene, rng: np.random.Generator, kind: str, obj: SceneObject | None = None) -> SceneObject:
    """`obj` (default: a random object of `scene`) altered so that describing it is false for `scene`, by
    `kind` as in `false_sentence`. Describing `obj` and the result with equally seeded generators gives a
    minimal pair: the same template and phrasing, one attribute apart."""
    if kind not in ("color", "shape", "absent", "position"):
        raise ValueError(f"unknown negative kind {kind!r}")
    present = {(o.color, o.shape) for o in scene.objects}
    if obj is None:
        obj = scene.objects[rng.integers(len(scene.objects))]
    replace = None
    if kind == "color":
        options = [c for c in COLORS if (c, obj.shape) not in present]
        if options:
            replace = {"color": options[rng.integers(len(options))]}
    elif kind == "shape":
        options = [s for s in SHAPES if (obj.color, s) not in present]
        if options:
            replace = {"shape": options[rng.integers(len(options))]}
    elif kind == "position":
        empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {o.cell for o in scene.objects}]
        if empty:
            r, c = empty[rng.integers(len(empty))]
            replace = {"row": r, "col": c}
    if replace is None:  # "absent", or no alternative above
        shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
        replace = {"shape": shapes[rng.integers(len(shapes))], "color": list(COLORS)[rng.integers(len(COLORS))]}
    return dataclasses.replace(obj, **replace)


COUNTERFACTUAL_KINDS = ("color", "shape", "position")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_CELL_OF_PHRASE = {p: cell for cell, ps in POSITION_PHRASES.items() for p in ps}
_PHRASE_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _CELL_OF_PHRASE), key=len, reverse=True)) + r")\b",
                        re.IGNORECASE)


def _same_case(new: str, old: str) -> str:
    return _sentence(new) if old[:1].isupper() else new


def counterfactual_sentence(sentence: str, rng: np.random.Generator,
                            kinds: Sequence[str] = COUNTERFACTUAL_KINDS) -> tuple[str, str] | None:
    """(`sentence` with one attribute word or position phrase replaced by another of its kind, the kind),
    or None when the sentence has none of `kinds`. No scene is consulted: whether the result is true is for
    the reward model to say. The article before a replaced colour follows it ("a red" -> "an orange"); a
    plural shape stays plural. The kind, and which occurrence, are drawn from `rng`."""
    bad = [k for k in kinds if k not in COUNTERFACTUAL_KINDS]
    if bad:
        raise ValueError(f"unknown counterfactual kind(s) {bad}; expected some of {COUNTERFACTUAL_KINDS}")
    spots: list[tuple[str, int, int, str]] = []        # (kind, start, end, matched text)
    if "position" in kinds:
        spots += [("position", m.start(), m.end(), m.group(0)) for m in _PHRASE_RE.finditer(sentence)]
    taken = [(a, b) for _, a, b, _ in spots]
    for m in WORD_RE.finditer(sentence):
        w = m.group(0).lower()
        kind = "color" if w in COLORS else "shape" if w in _SHAPE_WORDS else None
        if kind in kinds and not any(a <= m.start() < b for a, b in taken):
            spots.append((kind, m.start(), m.end(), m.group(0)))
    if not spots:
        return None
    present = sorted({k for k, *_ in spots})
    kind = present[rng.integers(len(present))]
    mine = [s for s in spots if s[0] == kind]
    _, a, b, old = mine[rng.integers(len(mine))]
    low = old.lower()
    if kind == "color":
        options = [c for c in COLORS if c != low]
        new = options[rng.integers(len(options))]
    elif kind == "shape":
        base = _SHAPE_WORDS[low]
        options = [s for s in SHAPES if s != base]
        new = options[rng.integers(len(options))]
        new = PLURALS[new] if low != base else new
    else:
        cell = _CELL_OF_PHRASE[low]
        options = [p for c, ps in POSITION_PHRASES.items() if c != cell for p in ps]
        new = options[rng.integers(len(options))]
    head, tail = sentence[:a], sentence[b:]
    if kind == "color":   # fix the indefinite article right before the colour word
        m = re.search(r"\b(an?)(\s+)$", head, re.IGNORECASE)
        if m:
            head = head[:m.start()] + _same_case(_article(new), m.group(1)) + m.group(2)
    return head + _same_case(new, old) + tail, kind


# ------------------------------------------------------------------------------------------- vocabulary

WORD_RE = re.compile(r"[A-Za-z]+|[0-9]+|[.,!?:;]|\n")
PUNCTUATION = (".", ",", "?", "!", ":", ";")


def split_words(text: str) -> list[str]:
    """Words and punctuation of `text` (whitespace dropped)."""
    return WORD_RE.findall(text)


def vocabulary() -> list[str]:
    """Every word a caption or prompt of the tiny world can use, lower case and capitalised, sorted;
    then the punctuation marks."""
    texts = [*DETAIL_PROMPTS, *OBJECT_TEMPLATES, *COUNT_TEMPLATES, *COUNT_ONE_TEMPLATES, *SHAPE_COUNT_TEMPLATES,
             *SHAPE_ALL_TEMPLATES, *SHORT_TEMPLATES, "there is an and only of the",
             *(p for ps in POSITION_PHRASES.values() for p in ps), *(v for vs in RELATION_WORDS.values() for v in vs),
             *SHAPES, *PLURALS.values(), *COLORS, *SIZES, *NUMBERS, "no not"]
    words = set()
    for t in texts:
        words.update(w.lower() for w in split_words(re.sub(r"\{\w+\}", " ", t)) if w.isalpha())
    return sorted(words | {w.capitalize() for w in words}) + list(PUNCTUATION)
