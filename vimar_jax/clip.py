"""`load_clip(dir)`: the CLIP reward model (SPEC §2) as a host-side API over the Flax `CLIPModel`.

    clip = load_clip("openai-clip-vit-large-patch14-336")        # HF directory or `vimar convert` output
    img = clip.embed_images([pil_a, "photo.jpg"])                   # [N, P] float32, L2-normalised
    txt = clip.embed_texts(["a red cat.", "a dog."])                # [N, P]
    clip.similarity_from_embeds(img, txt)                           # [N] cosine of each (image_i, text_i)
    clip.similarity(images, texts, matrix=True)                     # [N_img, N_txt]

Images are preprocessed by `vimar_jax.image.clip_preprocess` (equal to HF `CLIPImageProcessor`, PIL backend);
texts are tokenised from the checkpoint's `tokenizer.json` like HF `CLIPTokenizer` with `truncation=True,
max_length=max_position_embeddings` (77): a longer text keeps its BOS/EOS and loses its tail, it is never
dropped. Batches are cut into chunks of `batch_size` rows and padded to a few static shapes (rows to a
power of two, text length to a multiple of 8), so repeated calls reuse compiled functions; padding does not
change any embedding.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from vimar_jax import image as image_lib
from vimar_jax import text as text_lib
from vimar_jax.models.clip import CLIPConfig, CLIPModel

_LENGTH_STEP = 8


def _bucket_rows(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, n - 1).bit_length())


def _open_image(path) -> Image.Image:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


class CLIP:
    """A loaded CLIP model with its tokenizer and image preprocessing. See the module docstring."""

    def __init__(self, model: CLIPModel, tokenizer: text_lib.Tokenizer, image_config: image_lib.ImageConfig,
                 *, batch_size: int = 64):
        if not isinstance(model, CLIPModel):
            raise TypeError(f"CLIP needs a vimar_jax.models.clip.CLIPModel, got {type(model).__name__}")
        self.model = model
        self.config: CLIPConfig = model.config
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.batch_size = int(batch_size)
        self.max_length = self.config.text.max_position_embeddings
        s = self.config.vision.image_size
        if image_config.do_center_crop and image_config.crop_size != (s, s):
            raise ValueError(f"image processor crop_size {list(image_config.crop_size)} does not match the vision "
                             f"tower's image_size {s}")
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self._pad_id is None:
            raise ValueError("the CLIP tokenizer has neither a pad_token nor an eos_token to pad with")
        # A private copy of the backend that truncates like HF (post-processor tokens are kept).
        from tokenizers import Tokenizer as Backend

        self._backend = Backend.from_str(tokenizer.backend.to_str())
        self._backend.no_padding()
        self._backend.enable_truncation(self.max_length)
        graphdef, state = nnx.split(model)
        self._state = state
        self._image_fn = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_embeds(px))
        self._text_fn = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st).text_embeds(ids, mask))

    @property
    def embed_dim(self) -> int:
        return self.config.projection_dim

    # ---- preprocessing ----
    def pixel_values(self, images) -> np.ndarray:
        """float32 [N, 3, S, S] for a list of PIL images, image file paths or uint8 HWC arrays."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        out = []
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                im = _open_image(im)
            elif not isinstance(im, (Image.Image, np.ndarray)):
                raise TypeError(f"image {i}: expected a PIL image, a file path or a uint8 array, "
                                f"got {type(im).__name__}")
            out.append(image_lib.clip_preprocess(im, self.image_config))
        s, c = self.config.vision.image_size, self.config.vision.num_channels
        if not out:
            return np.zeros((0, c, s, s), np.float32)
        return np.stack(out)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [N, longest], truncated to `max_length` (BOS/EOS kept, as HF
        `CLIPTokenizer(..., truncation=True, max_length=77)`), right-padded with the pad token."""
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i}: expected str, got {type(t).__name__}")
        batch = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)]
        n = max((len(x) for x in batch), default=0)
        ids = np.full((len(batch), n), self._pad_id, np.int32)
        mask = np.zeros((len(batch), n), np.int32)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        return ids, mask

    # ---- embeddings ----
    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            yield start, stop, _bucket_rows(stop - start, self.batch_size)

    def embed_pixels(self, pixel_values) -> np.ndarray:
        """[N, 3, S, S] preprocessed pixels -> [N, P] L2-normalised image embeddings (float32)."""
        px = np.asarray(pixel_values, np.float32)
        s, c = self.config.vision.image_size, self.config.vision.num_channels
        if px.ndim != 4 or px.shape[1:] != (c, s, s):
            raise ValueError(f"pixel_values must be [N, {c}, {s}, {s}], got shape {px.shape}")
        out = np.zeros((px.shape[0], self.embed_dim), np.float32)
        for start, stop, rows in self._chunks(px.shape[0]):
            chunk = np.zeros((rows,) + px.shape[1:], np.float32)
            chunk[:stop - start] = px[start:stop]
            out[start:stop] = np.asarray(self._image_fn(self._state, chunk))[:stop - start]
        return out

    def embed_images(self, images) -> np.ndarray:
        """[N, P] L2-normalised image embeddings (float32) of images (PIL, paths, uint8 arrays) or of an
        already preprocessed float pixel batch [N, 3, S, S]. Compute once per image and reuse."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
            return self.embed_pixels(images)
        return self.embed_pixels(self.pixel_values(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, P] L2-normalised text embeddings (float32); texts longer than 77 tokens are truncated."""
        ids, mask = self.tokenize(texts)
        out = np.zeros((ids.shape[0], self.embed_dim), np.float32)
        for start, stop, rows in self._chunks(ids.shape[0]):
            sub = mask[start:stop]
            length = min(self.max_length, -(-int(sub.sum(1).max()) // _LENGTH_STEP) * _LENGTH_STEP)
            cid = np.full((rows, length), self._pad_id, np.int32)
            cmask = np.zeros((rows, length), np.int32)
            n = stop - start
            w = min(length, ids.shape[1])
            cid[:n, :w] = ids[start:stop, :w]
            cmask[:n, :w] = sub[:, :w]
            cmask[n:, 0] = 1   # padding rows: one real token, so they are well defined (and discarded)
            out[start:stop] = np.asarray(self._text_fn(self._state, cid, cmask))[:n]
        return out

    # ---- similarity ----
    @staticmethod
    def similarity_from_embeds(image_embeds, text_embeds, *, matrix: bool = False) -> np.ndarray:
        """Cosine of L2-normalised embeddings: [N] for pairs (image_i, text_i), or [N_img, N_txt] with
        `matrix=True`. Raw cosine: no logit scale."""
        img = np.asarray(image_embeds, np.float32)
        txt = np.asarray(text_embeds, np.float32)
        if img.ndim == 1:
            img = img[None]
        if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
            raise ValueError(f"embeddings must be [N, P] with the same P, got {img.shape} and {txt.shape}")
        if matrix:
            return img @ txt.T
        if img.shape[0] == 1 and txt.shape[0] != 1:
            img = np.broadcast_to(img, txt.shape)   # one (cached) image against many texts
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"pairwise similarity needs as many images as texts, got {img.shape[0]} and "
                             f"{txt.shape[0]} (use matrix=True for all pairs)")
        return np.sum(img * txt, axis=-1)

    def similarity(self, images, texts: Sequence[str], *, matrix: bool = False) -> np.ndarray:
        """Cosine similarity of images and texts: per pair [N] (default) or all pairs [N_img, N_txt]."""
        return self.similarity_from_embeds(self.embed_images(images), self.embed_texts(texts), matrix=matrix)


def load_clip(path, dtype=jnp.float32, *, batch_size: int = 64) -> CLIP:
    """A CLIP from an HF `CLIPModel` directory (config.json, model.safetensors, tokenizer.json,
    preprocessor/processor config) or its `vimar convert` output. `dtype` is the compute dtype."""
    from vimar_jax.convert import io

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP checkpoint directory not found: {path}")
    model, config = io.load_module(path, dtype=dtype)
    if not isinstance(model, CLIPModel):
        raise ValueError(f"{path} holds a {config.get('model_type')!r} model, not a CLIP model (model_type 'clip')")
    tokenizer = text_lib.load_tokenizer(path)
    image_config = image_lib.ImageConfig.from_dir(path)
    return CLIP(model, tokenizer, image_config, batch_size=batch_size)
