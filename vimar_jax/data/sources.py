"""Where rollout images and prompts come from: an image folder, a JSON-lines file, COCO through TFDS, or the
tiny world.

A source is a list of `Item`s, each one (image, prompt) pair with an optional ground-truth caption. Items are
cheap: the image is read only by `Item.load()`, so a missing or corrupt image surfaces there (as
`ImageError`, naming the image) and the caller can report it, skip it and count it. Every item carries an
image *reference* string that `open_image(ref, root)` turns back into the image at training time:

| spec                        | items                                                     | reference          |
|-----------------------------|-----------------------------------------------------------|--------------------|
| `folder:PATH`               | the image files under PATH (sorted, recursive)            | path below PATH    |
| `jsonl:PATH`                | lines `{"image": path, "prompt"?: str, "caption"?: str}`  | path as resolved   |
| `coco:DIR[:SPLIT[:N]]`      | TFDS `coco_captions/2017` (prepared in DIR, array_record) | `coco:SPLIT:INDEX` |
| `tiny:SEED:N`               | tiny-world scenes 0..N-1 of stream SEED, true captions    | `tiny:SEED:INDEX`  |

Prompts: a jsonl line's own `prompt`, else one drawn per item (deterministically from the item index) from
the prompt set: a single prompt string, or the name of a set (`"llava_detail"`, `"tiny_detail"`). The tiny
world uses its own detail prompts. Ground truth: a jsonl line's `caption`, the COCO reference captions (one
sentence each, joined), the tiny world's true detail caption; image folders have none.

COCO goes through `tensorflow_datasets.data_source` (random access over the prepared array_record files; no
TensorFlow needed, and never `tfds.load`): prepare `coco_captions/2017` with `file_format=array_record`
once, wherever TensorFlow is available.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from vimar_jax.data import scenes as S

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe this image in detail."
# LLaVA's detailed-description instructions (the prompts of LLaVA-Instruct detail_23k, used by ViMaR).
LLAVA_DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)
PROMPT_SETS = {"llava_detail": LLAVA_DETAIL_PROMPTS, "tiny_detail": S.DETAIL_PROMPTS}
COCO_DATASET = "coco_captions/2017"


class ImageError(ValueError):
    """An image that is missing or cannot be decoded; the message names it."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One (image, prompt) pair. `name` identifies the image in reports; `ref` is what transition records
    store (resolved by `open_image(ref, root)`); `caption` is a reference caption, or a zero-argument
    callable returning one (read lazily, e.g. from a COCO record), or None."""
    index: int
    name: str
    ref: str
    prompt: str
    caption: str | Callable[[], str | None] | None
    loader: Callable[[], Image.Image] = dataclasses.field(repr=False, compare=False)

    def ground_truth(self) -> str | None:
        """The reference caption (None if the source has none)."""
        c = self.caption() if callable(self.caption) else self.caption
        return c.strip() or None if c else None

    def load(self) -> Image.Image:
        """The image in RGB; `ImageError` (naming the image) if it is missing or unreadable."""
        try:
            im = self.loader()
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 — any decoding failure is a bad image
            raise ImageError(f"{self.name}: cannot read image ({type(e).__name__}: {e})") from e
        return im if im.mode == "RGB" else im.convert("RGB")


@dataclasses.dataclass
class Source:
    """A parsed source: its items, the root that its references are relative to, and a JSON description."""
    kind: str
    items: list[Item]
    root: str | None
    spec: str

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "root": self.root, "num_items": len(self.items)}


# ----------------------------------------------------------------------------------------------- images

def read_image_file(path: str) -> Image.Image:
    """Decode an image file fully (so a truncated file fails here, not later); `ImageError` names it."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=8)
def _coco_data_source(data_dir: str, split: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(COCO_DATASET, split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 — tfds raises many kinds; say what to do
        raise FileNotFoundError(
            f"COCO: cannot open TFDS {COCO_DATASET!r} split {split!r} in {data_dir} ({type(e).__name__}: {e}). "
            f"Prepare it once with file_format='array_record' (tfds build {COCO_DATASET} "
            f"--file_format=array_record --data_dir {data_dir}) on a machine with TensorFlow.") from e


def _coco_image(record: dict, name: str) -> Image.Image:
    arr = np.asarray(record["image"])
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ImageError(f"{name}: COCO record image has shape {arr.shape} and dtype {arr.dtype}")
    return Image.fromarray(arr if arr.shape[-1] == 3 else arr[..., 0]).convert("RGB")


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray, np.bytes_)) else str(x)


def coco_captions(record: dict) -> list[str]:
    """The reference captions of a TFDS coco_captions record, each stripped and ending with a period."""
    caps = record.get("captions", {})
    texts = caps.get("text", []) if isinstance(caps, dict) else [c["text"] for c in caps]
    out = []
    for t in texts:
        t = " ".join(_text(t).split())
        if t:
            out.append(t if t[-1] in ".!?" else t + ".")
    return out


def open_image(ref: str, root: str | None = None, *, coco_source=None) -> Image.Image:
    """The RGB image of a transition record's reference (see the module docstring); `root` is the source's
    root directory (image folder, or the COCO TFDS data_dir). `ImageError` names a bad image."""
    if ref.startswith("tiny:"):
        try:
            _, seed, index = ref.split(":")
            return S.render(S.scene_at(int(seed), int(index)))
        except ValueError:
            raise ImageError(f"{ref}: expected a tiny-world reference 'tiny:SEED:INDEX'") from None
    if ref.startswith("coco:"):
        try:
            _, split, index = ref.split(":")
            index = int(index)
        except ValueError:
            raise ImageError(f"{ref}: expected a COCO reference 'coco:SPLIT:INDEX'") from None
        if coco_source is None:
            if not root:
                raise ImageError(f"{ref}: a COCO reference needs the TFDS data_dir as root")
            coco_source = _coco_data_source(root, split)
        return _coco_image(coco_source[index], ref)
    path = ref if os.path.isabs(ref) or not root else os.path.join(root, ref)
    return read_image_file(path)


# ---------------------------------------------------------------------------------------------- prompts

def prompt_picker(prompts: str | Sequence[str], seed: int = 0) -> Callable[[int], str]:
    """index -> prompt: a fixed prompt, or a deterministic draw from a named set / a list of prompts."""
    if isinstance(prompts, str):
        if prompts in PROMPT_SETS:
            prompts = PROMPT_SETS[prompts]
        else:
            if not prompts.strip():
                raise ValueError("the prompt is empty")
            fixed = prompts
            return lambda i: fixed
    choices = tuple(prompts)
    if not choices:
        raise ValueError("the prompt set is empty")
    return lambda i: choices[int(np.random.default_rng([seed, int(i), 31]).integers(len(choices)))]


# ---------------------------------------------------------------------------------------------- sources

def folder_source(path: str, prompts: str | Sequence[str] = DEFAULT_PROMPT, seed: int = 0) -> Source:
    """Every file with an image extension under `path` (recursively, sorted). Dangling links are listed too:
    their image is reported missing when loaded."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {path} does not exist")
    files = []
    for d, _, names in os.walk(root, followlinks=True):
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort()
    pick = prompt_picker(prompts, seed)
    items = [Item(i, os.path.join(root, rel), rel, pick(i), None,
                  functools.partial(read_image_file, os.path.join(root, rel))) for i, rel in enumerate(files)]
    if not items:
        raise ValueError(f"image folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Source("folder", items, root, f"folder:{path}")


def jsonl_source(path: str, prompts: str | Sequence[str] = DEFAULT_PROMPT, seed: int = 0,
                 image_root: str | None = None) -> Source:
    """JSON lines `{"image": path, "prompt"?: str, "caption"?: str}`. Relative image paths are taken against
    `image_root`, else the file's directory. A malformed line is an error naming its line number; a
    missing image is not (it is reported when loaded)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON-lines file {path} does not exist")
    base = os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))
    pick = prompt_picker(prompts, seed)
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ValueError(f"{path}:{lineno}: needs an 'image' path")
            for key in ("prompt", "caption"):
                if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                    raise ValueError(f"{path}:{lineno}: '{key}' must be a string")
            i = len(items)
            img = rec["image"]
            full = img if os.path.isabs(img) else os.path.join(base, img)
            prompt = rec.get("prompt") or pick(i)
            gt = (rec.get("caption") or "").strip() or None
            items.append(Item(i, img, os.path.relpath(full, base), prompt, gt, functools.partial(read_image_file, full)))
    if not items:
        raise ValueError(f"{path} has no records")
    return Source("jsonl", items, base, f"jsonl:{path}")


def coco_source(data_dir: str, split: str = "train", limit: int | None = None,
                prompts: str | Sequence[str] = "llava_detail", seed: int = 0, data_source=None) -> Source:
    """COCO images with their reference captions from the TFDS `coco_captions/2017` array_record files in
    `data_dir` (`data_source`: any random-access sequence of TFDS-style records, for tests)."""
    ds = data_source if data_source is not None else _coco_data_source(os.path.abspath(data_dir), split)
    n = len(ds) if limit is None else min(int(limit), len(ds))
    pick = prompt_picker(prompts, seed)

    def item(i: int) -> Item:
        ref = f"coco:{split}:{i}"
        return Item(i, ref, ref, pick(i), lambda: " ".join(coco_captions(ds[i])),
                    lambda: _coco_image(ds[i], ref))

    return Source("coco", [item(i) for i in range(n)], os.path.abspath(data_dir), f"coco:{data_dir}:{split}")


def tiny_source(seed: int, n: int, prompts: str | Sequence[str] = "tiny_detail") -> Source:
    """Tiny-world scenes 0..n-1 of stream `seed`, each with a detail prompt and its true detail caption."""
    if n < 1:
        raise ValueError(f"tiny source needs N >= 1 scenes, got {n}")
    pick = prompt_picker(prompts, seed)
    items = []
    for i in range(n):
        scene = S.scene_at(seed, i)
        gt = S.caption(scene, np.random.default_rng([seed, i, 53]), "detail")
        items.append(Item(i, f"tiny:{seed}:{i}", f"tiny:{seed}:{i}", pick(i), gt,
                          functools.partial(lambda sc: S.render(sc), scene)))
    return Source("tiny", items, None, f"tiny:{seed}:{n}")


def parse_source(spec: str, *, prompts: str | Sequence[str] | None = None, seed: int = 0,
                 image_root: str | None = None) -> Source:
    """A source from its command-line spec (see the module docstring). `prompts` overrides the default
    prompt (set) of the kind."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"source {spec!r}: expected folder:PATH, jsonl:PATH, coco:DIR[:SPLIT[:N]] or tiny:SEED:N")
    if kind == "folder":
        return folder_source(rest, prompts or DEFAULT_PROMPT, seed)
    if kind == "jsonl":
        return jsonl_source(rest, prompts or DEFAULT_PROMPT, seed, image_root)
    if kind == "coco":
        parts = rest.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        try:
            limit = int(parts[2]) if len(parts) > 2 and parts[2] else None
        except ValueError:
            raise ValueError(f"source {spec!r}: N must be an integer") from None
        return coco_source(parts[0], split, limit, prompts or "llava_detail", seed)
    if kind == "tiny":
        try:
            s, n = (int(x) for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"source {spec!r}: expected tiny:SEED:N with integers") from None
        return tiny_source(s, n, prompts or "tiny_detail")
    raise ValueError(f"source {spec!r}: unknown kind {kind!r}; expected folder, jsonl, coco or tiny")
