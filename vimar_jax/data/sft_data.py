"""Supervised fine-tuning data for a LLaVA-NeXT policy: (image, prompt, caption) examples -> static-shape batches.

An example is rendered with the checkpoint's chat template as one user turn (`<image>` + prompt) and one
assistant turn (the caption); `<image>` is expanded to the image's token count by our `Processor`. The
labels are the assistant turn's tokens up to and including its EOS; the prompt and image tokens (and
anything the template puts after the EOS) carry no loss.

Sources are random access (`len`, `[i]`), so a grain `MapDataset` shuffles them deterministically by seed and
its iterator state (a position in the stream) makes resuming exact:

- `SceneCaptions`: the tiny world's scenes with true detail captions and detail prompts;
- `CaptionFile`: the JSON lines `vimar caption --json` prints (`image`, `caption`, optionally `prompt`), for
  self-training on the policy's own (e.g. ViMaR) captions. Unreadable images are reported by name, skipped
  and counted when the file is read.

`collate` pads a list of encoded examples to a length bucket and the model's patch count:
input_ids [B, T], label_pos/label_ids/label_mask [B, L] (the logit at `label_pos` predicts `label_ids`),
pixel_values [B, max_patches, 3, S, S], image_sizes [B, 2], gather_index [B, max_image_tokens].
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from vimar_jax import image as image_lib
from vimar_jax.data import scenes as S

DEFAULT_PROMPT = "Describe this image in detail."
_CAPTION_SLOT = "\u2063CAPTION\u2063"  # stands for the caption when the chat template is rendered


@dataclasses.dataclass(frozen=True)
class Example:
    """One SFT example. `image` is a PIL image or a zero-argument callable returning one (loaded lazily);
    `name` identifies the example in error messages."""
    image: Any
    prompt: str
    caption: str
    name: str = ""

    def load_image(self) -> Image.Image:
        im = self.image() if callable(self.image) else self.image
        return im if im.mode == "RGB" else im.convert("RGB")


# ------------------------------------------------------------------------------------------------ sources

class SceneCaptions:
    """Tiny-world scenes `0..num_scenes-1` of stream `seed`, each with `variants` captions and prompts.

    Record i is scene `i % num_scenes`, caption variant `i // num_scenes`; its caption style is drawn from
    `styles` ((style, weight) pairs) and its prompt from `prompts`, all from `(seed, scene, variant)` only."""

    def __init__(self, seed: int, num_scenes: int, *, variants: int = 1,
                 styles: Sequence[tuple[str, float]] = (("detail", 1.0),),
                 prompts: Sequence[str] = S.DETAIL_PROMPTS, scene_config: S.SceneConfig | None = None):
        if num_scenes < 1 or variants < 1:
            raise ValueError(f"SceneCaptions needs num_scenes >= 1 and variants >= 1, got {num_scenes}, {variants}")
        names = [s for s, _ in styles]
        bad = [s for s in names if s not in S.CAPTION_STYLES]
        if bad or not names:
            raise ValueError(f"caption styles {bad or names}: choose from {S.CAPTION_STYLES}")
        weights = np.asarray([float(w) for _, w in styles])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"caption style weights must be >= 0 with a positive sum, got {weights.tolist()}")
        if not prompts:
            raise ValueError("SceneCaptions needs at least one prompt")
        self.seed, self.num_scenes, self.variants = int(seed), int(num_scenes), int(variants)
        self.styles, self.weights = tuple(names), weights / weights.sum()
        self.prompts = tuple(prompts)
        self.scene_config = scene_config

    def __len__(self) -> int:
        return self.num_scenes * self.variants

    def scene(self, i: int) -> S.Scene:
        return S.scene_at(self.seed, int(i) % self.num_scenes, self.scene_config)

    def __getitem__(self, i: int) -> Example:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        k, variant = i % self.num_scenes, i // self.num_scenes
        rng = np.random.default_rng([self.seed, k, variant, 17])
        scene = self.scene(k)
        style = self.styles[rng.choice(len(self.styles), p=self.weights)]
        prompt = self.prompts[rng.integers(len(self.prompts))]
        return Example(image=S.render(scene), prompt=prompt, caption=S.caption(scene, rng, style),
                       name=f"scene {self.seed}/{k}")


class CaptionFile:
    """The JSON lines of `vimar caption --json` (`image`, `caption`; `prompt` if present, else `prompt`).

    Relative image paths are tried against `image_root` if given, else as written (relative to the working
    directory) and then relative to the file's directory. Lines without a caption (e.g. error records),
    torn lines, and images that are missing or cannot be decoded are reported on stderr by name (unless
    `quiet`), skipped, and listed in `.skipped` as (name, reason)."""

    def __init__(self, path: str | os.PathLike, *, prompt: str = DEFAULT_PROMPT, image_root: str | None = None,
                 check_images: bool = True, quiet: bool = False):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"caption file {self.path} does not exist")
        base = os.path.dirname(os.path.abspath(self.path))
        self.records: list[tuple[str, str, str]] = []   # (image path, prompt, caption)
        self.skipped: list[tuple[str, str]] = []

        def skip(name: str, reason: str) -> None:
            self.skipped.append((name, reason))
            if not quiet:
                print(f"warning: {self.path}: skipping {name}: {reason}", file=sys.stderr)

        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"line {lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    skip(where, f"not valid JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                    skip(where, "no 'image' path")
                    continue
                name = rec["image"]
                caption = rec.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    skip(name, f"no caption ({rec.get('error', 'empty')})" if "error" in rec else "no caption")
                    continue
                resolved = self._resolve(name, image_root, base)
                if resolved is None:
                    skip(name, "image file not found")
                    continue
                if check_images:
                    err = _image_error(resolved)
                    if err:
                        skip(name, f"cannot read image: {err}")
                        continue
                p = rec.get("prompt")
                self.records.append((resolved, p if isinstance(p, str) and p.strip() else prompt, caption.strip()))
        if not self.records:
            raise ValueError(f"caption file {self.path} has no usable records ({len(self.skipped)} skipped)")

    @staticmethod
    def _resolve(name: str, root: str | None, base: str) -> str | None:
        if os.path.isabs(name):
            return name if os.path.isfile(name) else None
        candidates = [os.path.join(root, name)] if root else [name, os.path.join(base, name)]
        return next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        path, prompt, caption = self.records[int(i)]

        def load():
            with Image.open(path) as im:
                return im.convert("RGB")
        return Example(image=load, prompt=prompt, caption=caption, name=path)


def _image_error(path: str) -> str | None:
    """None if PIL can decode the image at `path`, else the reason."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 — any decoding failure means a bad image
        return f"{type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------- encoding

class Encoder:
    """Example -> unpadded arrays: input_ids [n] int32, label_start (index of the first label token),
    pixel_values [views, 3, S, S] float32, image_size (h, w). `processor` is our `vimar_jax.processor.Processor`
    (tokenizer with chat template + anyres image pipeline) of the policy checkpoint.

    Sequences longer than `max_length` lose their tail (the caption end); more than `max_label_tokens`
    label tokens are cut too. `truncated` in the output says whether either happened."""

    def __init__(self, processor, *, max_length: int, max_label_tokens: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.max_length, self.max_label_tokens = int(max_length), int(max_label_tokens)
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError("the policy tokenizer has no eos_token: captions could not be terminated")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self._templates: dict[str, tuple[str, str]] = {}

    def _ids(self, text: str) -> list[int]:
        # HF's chat path: a template that writes the BOS itself is tokenized without special tokens.
        bos = self.tok.bos_token
        return self.tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def _rendered(self, prompt: str) -> tuple[str, str]:
        """(generation prompt, conversation with a placeholder caption) rendered once per prompt: compiling
        and rendering the Jinja template per example would dominate the data pipeline."""
        hit = self._templates.get(prompt)
        if hit is None:
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            assistant = {"role": "assistant", "content": [{"type": "text", "text": _CAPTION_SLOT}]}
            head = self.processor.apply_chat_template([user], add_generation_prompt=True)
            full = self.processor.apply_chat_template([user, assistant])
            if not full.startswith(head) or full.count(_CAPTION_SLOT) != 1 or _CAPTION_SLOT in head:
                raise ValueError("the chat template must render [user, assistant] as the generation prompt followed "
                                 f"by the assistant turn holding the caption once: {head!r} vs {full!r}")
            n_img = full.count(self.processor.image_token)
            if n_img != 1 or head.count(self.processor.image_token) != 1:
                raise ValueError(f"the rendered prompt must hold exactly one {self.processor.image_token}, got "
                                 f"{n_img}: {head!r}")
            hit = self._templates[prompt] = (head, full)
        return hit

    def token_ids(self, prompt: str, caption: str, image_hw: tuple[int, int]) -> tuple[list[int], int]:
        """(input ids with the image expanded, index of the first label token)."""
        head, full = self._rendered(prompt)
        full = full.replace(_CAPTION_SLOT, caption)
        head_x, full_x = self.processor.expand_image_tokens([head, full], [image_hw, image_hw])
        head_ids, ids = self._ids(head_x), self._ids(full_x)
        if ids[:len(head_ids)] != head_ids:
            raise ValueError(f"tokenizing prompt + caption changes the prompt's tokens (prompt {prompt!r}, caption "
                             f"{caption[:60]!r}...): labels would be misaligned")
        try:
            end = ids.index(self.eos_id, len(head_ids))
        except ValueError:
            raise ValueError(f"the chat template does not end the assistant turn with EOS "
                             f"({self.tok.eos_token!r}): {full[-80:]!r}") from None
        if end == len(head_ids):
            raise ValueError(f"empty caption after tokenization: {caption!r}")
        return ids[:end + 1], len(head_ids)

    def __call__(self, ex: Example) -> dict[str, Any]:
        try:
            im = ex.load_image()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read the image of {ex.name or 'an example'}: {e}") from e
        hw = image_lib.image_size_hw(im)
        ids, start = self.token_ids(ex.prompt, ex.caption, hw)
        n = min(len(ids), self.max_length, start + self.max_label_tokens)
        if start >= n:
            raise ValueError(f"{ex.name or 'an example'}: the prompt alone has {start} tokens, max_length is "
                             f"{self.max_length}")
        return {"input_ids": np.asarray(ids[:n], np.int32), "label_start": start,
                "pixel_values": image_lib.preprocess_anyres(im, self.processor.image_config).astype(np.float32),
                "image_size": np.asarray(hw, np.int32), "truncated": n < len(ids)}


# ------------------------------------------------------------------------------------------------ batching

def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending); a clear error past the largest."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"sequence of {n} tokens exceeds the largest length bucket {max(buckets)}")


def collate(items: Sequence[dict], *, length_buckets: Sequence[int], max_label_tokens: int, pad_id: int,
            image_config: image_lib.ImageConfig, image_token_id: int | None = None) -> dict[str, np.ndarray]:
    """Pad encoded examples into one static-shape batch (see the module docstring). With `image_token_id`,
    each row's count of image tokens is checked against its image's feature count."""
    B = len(items)
    T = bucket_for(max(len(it["input_ids"]) for it in items), length_buckets)
    L = int(max_label_tokens)
    n_patch = image_config.max_num_patches
    S = image_config.image_size
    ids = np.full((B, T), pad_id, np.int32)
    label_pos = np.zeros((B, L), np.int32)
    label_ids = np.full((B, L), pad_id, np.int32)
    label_mask = np.zeros((B, L), np.float32)
    pixels = np.zeros((B, n_patch, 3, S, S), np.float32)
    sizes = np.zeros((B, 2), np.int32)
    for b, it in enumerate(items):
        x, s = it["input_ids"], int(it["label_start"])
        ids[b, :len(x)] = x
        k = len(x) - s
        if k > L:
            raise ValueError(f"example {b} has {k} label tokens, max_label_tokens is {L}")
        label_pos[b, :k] = np.arange(s - 1, len(x) - 1)
        label_ids[b, :k] = x[s:]
        label_mask[b, :k] = 1.0
        pv = it["pixel_values"]
        if pv.shape[0] > n_patch or pv.shape[1:] != (3, S, S):
            raise ValueError(f"example {b}: pixel_values of shape {pv.shape} do not fit [{n_patch}, 3, {S}, {S}]")
        pixels[b, :pv.shape[0]] = pv
        sizes[b] = it["image_size"]
    index, n_tokens = image_lib.feature_gather_index(sizes, n_patch, image_config)
    # Row-local indices (each row as a batch of one image), so that any split of the batch into micro-batches
    # or hosts stays right; `model_gather_index` turns them into indices into the batch's feature array.
    per_row = n_patch * image_config.tokens_per_view
    index = np.where(index >= B * per_row, per_row, index - np.arange(B)[:, None] * per_row).astype(np.int32)
    if image_token_id is not None:
        counts = (ids == image_token_id).sum(1)
        if (counts != n_tokens).any():
            b = int(np.nonzero(counts != n_tokens)[0][0])
            raise ValueError(f"example {b}: {counts[b]} image tokens but its image has {n_tokens[b]} features")
    return {"input_ids": ids, "label_pos": label_pos, "label_ids": label_ids, "label_mask": label_mask,
            "pixel_values": pixels, "image_sizes": sizes, "gather_index": index}


def dataset(source, encoder: Encoder, *, batch_size: int, seed: int, length_buckets: Sequence[int],
            shard_index: int = 0, shard_count: int = 1):
    """Infinite grain `MapDataset` of batches: the source reshuffled every epoch from `seed`, this host's
    share (`shard_index` of `shard_count`) of each global batch of `batch_size * shard_count` records."""
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    batch_fn: Callable = lambda items: collate(  # noqa: E731
        items, length_buckets=length_buckets, max_label_tokens=encoder.max_label_tokens, pad_id=encoder.pad_id,
        image_config=encoder.processor.image_config, image_token_id=encoder.processor.image_token_id)
    return ds.map(encoder).batch(batch_size, drop_remainder=True, batch_fn=batch_fn)


def model_gather_index(model, batch):
    """The batch's row-local `gather_index` as indices into the flat features of this (micro-)batch."""
    from vimar_jax.data.packing import batch_gather_index

    return batch_gather_index(batch["gather_index"], batch["pixel_values"].shape[1],
                              model.config.image_config().tokens_per_view)
