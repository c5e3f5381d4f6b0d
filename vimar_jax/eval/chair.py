"""CHAIR (Rohrbach et al. 2018): how many of the objects a caption mentions are not in the image.

    CHAIR_I = hallucinated object mentions / object mentions
    CHAIR_S = captions with >= 1 hallucinated mention / captions
    recall  = ground-truth objects mentioned / ground-truth objects
plus sentences and words per caption (a method can lower CHAIR by saying less). All rates are fractions
in [0, 1] (0 when the denominator is 0); the CLI prints them as percentages.

Two settings:
- **tiny world** (`tiny_chair`): exact. Mentions are parsed with the closed vocabulary of
  `vimar_jax.data.scenes` (shape word, with its colour, count and stated position when present) and
  compared with the scene's objects. Recall is over object instances. Variants: `attr_*` (a mention with
  a colour is correct only if an object of that colour and shape exists), `pos_*` (also the stated cell
  must hold a matching object), and `count_error_rate` (mentions with a number, e.g. "two squares", whose
  number differs from the true count).
- **COCO** (`coco_chair`): object words of the COCO-80 synonym table (`vimar_jax.eval.coco`) against the
  categories annotated in `instances.json`; every mention counts (as in the original CHAIR), recall is over
  the distinct ground-truth categories of each image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

from vimar_jax.data import scenes as S
from vimar_jax.eval import coco

# ------------------------------------------------------------------------------------------- tiny world

_SHAPE_OF = {**{s: s for s in S.SHAPES}, **{p: s for s, p in S.PLURALS.items()}}
_PLURAL = set(S.PLURALS.values())
_NUMBER = {w: i for i, w in enumerate(S.NUMBERS)}
_VERTICAL = {"top": 0, "bottom": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_POSITION_WORDS = {"top", "bottom", "left", "right", "middle", "center", "corner"}


@dataclasses.dataclass(frozen=True)
class Mention:
    """One shape mentioned in a caption."""

    shape: str  # singular
    color: str | None
    count: int | None  # an explicit number ("two squares", "Two of them are squares"), else None
    plural: bool
    definite: bool  # "the red circle": refers to an object already introduced
    cell: tuple[int, int] | None  # the position its sentence states, when the sentence has one mention
    sentence: int


def _sentences(text: str) -> list[list[str]]:
    """Lower-case words of each sentence (split at . ! ?), empty sentences dropped."""
    out, cur = [], []
    for w in S.split_words(text):
        if w in (".", "!", "?"):
            if cur:
                out.append(cur)
            cur = []
        elif w.isalnum():
            cur.append(w.lower())
    if cur:
        out.append(cur)
    return out


def _positions(ws: Sequence[str]) -> list[tuple[int, int]]:
    """Cells named by "in/at/on the <top|bottom|left|right|middle|center|corner>..." (not "... of")."""
    cells = []
    for i in range(len(ws) - 2):
        if ws[i] in ("in", "at", "on") and ws[i + 1] == "the" and ws[i + 2] in _POSITION_WORDS:
            j = i + 2
            while j < len(ws) and ws[j] in _POSITION_WORDS:
                j += 1
            if j < len(ws) and ws[j] == "of":
                continue  # "at the left of ...": a relation, not a cell
            words = ws[i + 2:j]
            row = next((_VERTICAL[w] for w in words if w in _VERTICAL), 1)
            col = next((_HORIZONTAL[w] for w in words if w in _HORIZONTAL), 1)
            cells.append((row, col))
    return cells


def parse_mentions(caption: str) -> list[Mention]:
    """The shapes a tiny-world caption mentions, with colour, number, article and position.

    A mention is a shape word (singular or plural) with the colour and size words right before it and a
    determiner before those: "a", "an", "one", a number word, "the", or "no" (a negation: not a mention).
    "Two of them are squares" gives the plural mention its number.
    """
    out = []
    for si, ws in enumerate(_sentences(caption)):
        found = []
        for i, w in enumerate(ws):
            if w not in _SHAPE_OF:
                continue
            j, color = i - 1, None
            while j >= 0 and (ws[j] in S.COLORS or ws[j] in S.SIZES):
                if ws[j] in S.COLORS and color is None:
                    color = ws[j]
                j -= 1
            det = ws[j] if j >= 0 else None
            if det in ("no", "zero"):
                continue
            plural = w in _PLURAL
            count = _NUMBER.get(det) if plural else None
            if plural and count is None and len(ws) > 2 and ws[0] in _NUMBER and ws[1:3] == ["of", "them"]:
                count = _NUMBER[ws[0]]
            found.append(dict(shape=_SHAPE_OF[w], color=color, count=count, plural=plural, definite=det == "the"))
        cells = _positions(ws)
        cell = cells[0] if len(cells) == 1 and len(found) == 1 else None
        out.extend(Mention(**m, cell=cell, sentence=si) for m in found)
    return out


def _matches(obj: S.SceneObject, m: Mention, use_color: bool) -> bool:
    return obj.shape == m.shape and (not use_color or m.color is None or obj.color == m.color)


def _covered(scene: S.Scene, mentions: Sequence[Mention], use_color: bool) -> set[int]:
    """Indices of the scene's objects the mentions account for.

    A mention with a stated cell takes the object there if it matches; otherwise it takes unclaimed
    matching objects (those of its own colour first): one for "a red circle", n for "two red circles", all
    for an unnumbered plural, and one for "the red circle" only if no object of its exact kind is claimed
    yet. With `use_color` a mention must state the right colour; without it the shape is enough.
    """
    objs = scene.objects
    taken: set[int] = set()
    rest = []
    for m in mentions:
        if use_color and m.color is None:
            continue
        at = [k for k, o in enumerate(objs) if m.cell is not None and o.cell == m.cell and _matches(o, m, use_color)]
        if at:
            taken.add(at[0])
        else:
            rest.append(m)
    for m in rest:
        exact = [k for k, o in enumerate(objs) if _matches(o, m, True)]
        same = exact + [k for k, o in enumerate(objs) if _matches(o, m, use_color) and k not in exact]
        free = [k for k in same if k not in taken]
        if m.definite:
            n = 0 if any(k in taken for k in exact) else 1
        elif m.plural:
            n = m.count if m.count is not None else len(free)
        else:
            n = 1
        taken.update(free[:n])
    return taken


@dataclasses.dataclass(frozen=True)
class CaptionScore:
    """CHAIR counts of one tiny-world caption."""

    mentions: tuple[Mention, ...]
    hallucinated: tuple[Mention, ...]  # shape absent from the scene
    attr_hallucinated: tuple[Mention, ...]  # also: no object of the stated colour and shape
    pos_hallucinated: tuple[Mention, ...]  # also: the stated cell holds no matching object
    count_errors: tuple[Mention, ...]  # stated number != number of matching objects
    n_counted: int  # mentions with a stated number
    n_objects: int
    recalled: int  # objects mentioned (by shape)
    attr_recalled: int  # objects mentioned with their colour
    sentences: int
    words: int


def score_caption(caption: str, scene: S.Scene) -> CaptionScore:
    mentions = parse_mentions(caption)
    objs = scene.objects
    hall = [m for m in mentions if not any(_matches(o, m, False) for o in objs)]
    attr = [m for m in mentions if not any(_matches(o, m, True) for o in objs)]
    pos = [m for m in mentions if not any(_matches(o, m, True) and (m.cell is None or o.cell == m.cell)
                                          for o in objs)]
    counted = [m for m in mentions if m.count is not None]
    wrong = [m for m in counted if sum(_matches(o, m, True) for o in objs) != m.count]
    sentences = _sentences(caption)
    return CaptionScore(
        mentions=tuple(mentions), hallucinated=tuple(hall), attr_hallucinated=tuple(attr),
        pos_hallucinated=tuple(pos), count_errors=tuple(wrong), n_counted=len(counted), n_objects=len(objs),
        recalled=len(_covered(scene, mentions, use_color=False)),
        attr_recalled=len(_covered(scene, mentions, use_color=True)),
        sentences=len(sentences), words=sum(len(s) for s in sentences))


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def tiny_chair(pairs: Iterable[tuple[str, S.Scene]]) -> dict:
    """Aggregate tiny-world CHAIR over (caption, scene) pairs."""
    scores = [score_caption(c, s) for c, s in pairs]
    n = len(scores)
    mentions = sum(len(s.mentions) for s in scores)
    objects = sum(s.n_objects for s in scores)
    out = {"n_captions": n, "n_mentions": mentions, "n_objects": objects}
    for prefix, field in (("", "hallucinated"), ("attr_", "attr_hallucinated"), ("pos_", "pos_hallucinated")):
        bad = sum(len(getattr(s, field)) for s in scores)
        out[f"{prefix}n_hallucinated"] = bad
        out[f"{prefix}chair_i"] = _rate(bad, mentions)
        out[f"{prefix}chair_s"] = _rate(sum(bool(getattr(s, field)) for s in scores), n)
    out["recall"] = _rate(sum(s.recalled for s in scores), objects)
    out["attr_recall"] = _rate(sum(s.attr_recalled for s in scores), objects)
    counted = sum(s.n_counted for s in scores)
    out["n_counted"] = counted
    out["count_error_rate"] = _rate(sum(len(s.count_errors) for s in scores), counted)
    out["sentences_per_caption"] = _rate(sum(s.sentences for s in scores), n)
    out["words_per_caption"] = _rate(sum(s.words for s in scores), n)
    return out


# ------------------------------------------------------------------------------------------------- COCO

def _coco_sentences(text: str) -> int:
    return sum(1 for frag in re.split(r"[.!?]", text) if re.search(r"[A-Za-z]", frag))


def coco_chair(pairs: Iterable[tuple[str, set[str]]]) -> dict:
    """Aggregate COCO CHAIR over (caption, ground-truth category names) pairs."""
    n = mentions = bad = bad_caps = gt_total = recalled = n_sent = n_words = 0
    for caption, gt in pairs:
        found = [cat for _, cat in coco.find_objects(caption)]
        wrong = [c for c in found if c not in gt]
        n += 1
        mentions += len(found)
        bad += len(wrong)
        bad_caps += bool(wrong)
        gt_total += len(gt)
        recalled += len(set(found) & set(gt))
        n_sent += _coco_sentences(caption)
        n_words += len(re.findall(r"[A-Za-z]+", caption))
    return {"n_captions": n, "n_mentions": mentions, "n_hallucinated": bad, "chair_i": _rate(bad, mentions),
            "chair_s": _rate(bad_caps, n), "n_objects": gt_total, "recall": _rate(recalled, gt_total),
            "sentences_per_caption": _rate(n_sent, n), "words_per_caption": _rate(n_words, n)}


# ------------------------------------------------------------------------------------------------ input

def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_instances(path: str) -> dict[int, set[str]]:
    """image id -> set of COCO category names annotated in it, from a COCO `instances_*.json`.
    Images without annotations map to the empty set."""
    data = _read_json(path, "annotations file")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (expected COCO instances format)")
    names = {}
    for c in data["categories"]:
        if c["name"] not in coco.SYNONYMS:
            raise ValueError(f"{path}: category {c['name']!r} (id {c['id']}) is not one of the COCO-80 categories")
        names[c["id"]] = c["name"]
    gt: dict[int, set[str]] = {int(im["id"]): set() for im in data["images"]}
    for a in data["annotations"]:
        image_id, cat = int(a["image_id"]), a["category_id"]
        if cat not in names:
            raise ValueError(f"{path}: annotation {a.get('id')} has unknown category_id {cat}")
        if image_id not in gt:
            raise ValueError(f"{path}: annotation {a.get('id')} names image_id {image_id} not in 'images'")
        gt[image_id].add(names[cat])
    return gt


def image_id_of(record: dict) -> int:
    """The image id of a caption record: `image_id`, else the digits of the `image` file name
    ("val2017/000000000139.jpg" -> 139)."""
    if "image_id" in record:
        return int(record["image_id"])
    if "image" in record:
        stem = os.path.splitext(os.path.basename(str(record["image"])))[0]
        digits = re.findall(r"\d+", stem)
        if digits:
            return int(digits[-1])
        raise ValueError(f"no image id in file name {record['image']!r}")
    raise ValueError("record has neither 'image_id' nor 'image'")


def load_captions(path: str) -> list[tuple[int, str, int]]:
    """(image id, caption, line number) for each line of a captions JSONL file; blank lines skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("caption"), str):
                raise ValueError(f"{path}:{lineno}: missing string field 'caption'")
            try:
                image_id = image_id_of(rec)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            out.append((image_id, rec["caption"], lineno))
    return out


def evaluate_file(captions_path: str, *, annotations: str | None = None, scenes: str | None = None) -> dict:
    """CHAIR of a captions JSONL file against COCO `annotations` or tiny-world `scenes` (exactly one).
    Captions naming an image id absent from the ground truth are skipped and counted (`n_unknown_images`,
    with the first few listed in `unknown_images` as (line, image id))."""
    if (annotations is None) == (scenes is None):
        raise ValueError("give exactly one of annotations= (COCO instances.json) or scenes= (tiny world)")
    gt = load_instances(annotations) if annotations else S.load_scenes(scenes)
    records = load_captions(captions_path)
    known = [(cap, gt[i]) for i, cap, _ in records if i in gt]
    unknown = [(line, i) for i, _, line in records if i not in gt]
    result = coco_chair(known) if annotations else tiny_chair(known)
    result = {"setting": "coco" if annotations else "tiny", **result, "n_unknown_images": len(unknown)}
    if unknown:
        result["unknown_images"] = unknown[:10]
    return result
