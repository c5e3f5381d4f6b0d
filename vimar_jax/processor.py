"""LLaVA-NeXT processor: prompts with `<image>` placeholders + images -> model inputs (numpy), equal to HF
`LlavaNextProcessor` (PIL image backend).

Each `<image>` in the texts (in order, across the batch) is expanded to `num_image_tokens(image size)` copies
of the image token before tokenizing, exactly as HF does; the images become `pixel_values`
[N_images, max_views, 3, S, S] (base view, then anyres tiles, zero views padding images with fewer tiles)
and `image_sizes` [N_images, 2] (original h, w).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from vimar_jax import image as vimage
from vimar_jax import text as vtext


class Processor:
    """Tokenizer + anyres image pipeline of one checkpoint."""

    def __init__(self, tokenizer: vtext.Tokenizer, image_config: vimage.ImageConfig, *,
                 image_token: str = "<image>"):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Processor":
        """From an HF LLaVA-NeXT directory (tokenizer files, preprocessor_config.json, optionally
        processor_config.json and config.json)."""
        path = os.fspath(path)
        tokenizer = vtext.load_tokenizer(path)
        image_config = vimage.ImageConfig.from_dir(path)
        proc_file = os.path.join(path, "processor_config.json")
        proc = {}
        if os.path.isfile(proc_file):
            with open(proc_file, encoding="utf-8") as f:
                proc = json.load(f)
        # HF: the tokenizer's own image token wins over the processor's argument.
        image_token = tokenizer.extra_special_tokens.get("image_token") or proc.get("image_token") or "<image>"
        return cls(tokenizer, image_config, image_token=image_token)

    # ---- counts and gather ----
    def num_image_tokens(self, orig_hw: Sequence[int]) -> int:
        return self.image_config.num_image_tokens(orig_hw)

    def feature_gather_index(self, image_sizes, num_patches_padded: int, *, max_tokens: int | None = None):
        return vimage.feature_gather_index(image_sizes, num_patches_padded, self.image_config,
                                           max_tokens=max_tokens)

    # ---- text ----
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **kwargs) -> str:
        """The prompt string (HF `processor.apply_chat_template(..., tokenize=False)`). If it starts with the
        BOS token, call the processor with `add_special_tokens=False` (HF's tokenize=True path does that)."""
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def expand_image_tokens(self, texts: Sequence[str], image_sizes: Sequence[Sequence[int]]) -> list[str]:
        """Replace the k-th `<image>` (in batch order) by the token repeated for the k-th image."""
        counts = iter([self.num_image_tokens(hw) for hw in image_sizes])
        pattern = re.compile(re.escape(self.image_token))
        return [pattern.sub(lambda _: self.image_token * next(counts), t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- main entry ----
    def __call__(self, images=None, texts: str | Sequence[str] | None = None, *, add_special_tokens: bool = True,
                 pad_patches_to: int | None = None) -> dict[str, np.ndarray]:
        """input_ids, attention_mask [B, T] int32 (padded to the longest text on the tokenizer's padding side)
        and, with images, pixel_values [N, max_views, 3, S, S] float32 and image_sizes [N, 2] int32.
        `images`: one image or a flat list (PIL or uint8 HWC arrays), one per `<image>` in the texts.
        `pad_patches_to` pads the view axis beyond the batch maximum (e.g. `image_config.max_num_patches`)."""
        if texts is None:
            raise ValueError("Processor needs texts (with one <image> placeholder per image)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        n_images = 0 if images is None else len(images)
        if n_placeholders != n_images:
            raise ValueError(f"the texts hold {n_placeholders} {self.image_token} placeholders but {n_images} "
                             "images were given")
        out: dict[str, np.ndarray] = {}
        sizes: list[tuple[int, int]] = []
        if images:
            pixel_values, image_sizes = vimage.batch_pixel_values(images, self.image_config, pad_to=pad_patches_to)
            out["pixel_values"] = pixel_values
            out["image_sizes"] = image_sizes
            sizes = [tuple(s) for s in image_sizes.tolist()]
        enc = self.tokenizer(self.expand_image_tokens(texts, sizes), add_special_tokens=add_special_tokens)
        return {**enc, **out}
