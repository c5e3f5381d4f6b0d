"""The tiny world's CLIP data: its tokenizer, its image processor, and contrastive batches of scenes.

Tokenizer: the tiny word-level vocabulary, lower-cased (as CLIP's), with CLIP-style specials. Ids: the
words, the punctuation marks, `<|unk|>`, `<|startoftext|>`, then `<|endoftext|>` (EOS, also the padding
token) as the HIGHEST id, so that both of HF's EOS-pooling rules (argmax(input_ids) for legacy configs
with `eos_token_id == 2`, the first `eos_token_id` otherwise) pool at the same token. Every text is
`<|startoftext|> words <|endoftext|>`, truncated to 77 tokens with the EOS kept.

Image processor: resize to (S, S) without centre crop (scenes have aspect ratios up to 3 and objects in
every grid cell; a crop would cut them off), rescale and OpenAI-CLIP normalisation.

Batches: a pool of rendered scenes of one seed; step k of a run draws its images and sentences from
`(seed, k)` only, so a run is deterministic and resumes exactly. Each image comes with one true sentence
(sampled from its captions) and hard negatives, one per kind of `scenes.false_sentence`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vimar_jax import image as image_lib
from vimar_jax.data import scenes as S

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
PAD = EOS
MAX_LENGTH = 77
NEGATIVE_KINDS = ("color", "shape", "absent", "position")
# Probabilities of the caption style a positive sentence is drawn from.
POSITIVE_STYLES = (("detail", 0.7), ("objects", 0.1), ("short", 0.2))

_PUNCT = Regex(r"[.,!?:;]")


# ------------------------------------------------------------------------------------------ tokenizer

def clip_vocab() -> dict[str, int]:
    """token -> id: lower-case words (sorted), punctuation, `<|unk|>`, `<|startoftext|>`, `<|endoftext|>`."""
    words = S.vocabulary()
    alpha = sorted({w.lower() for w in words if w.isalpha()})
    punct = [w for w in words if not w.isalpha()]
    tokens = alpha + punct + [UNK, BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def build_clip_tokenizer(max_length: int = MAX_LENGTH) -> Tokenizer:
    """The tiny CLIP tokenizer: lower-cases, splits on whitespace and punctuation, adds BOS/EOS, truncates
    to `max_length` tokens (EOS kept). Decoding joins words with spaces and none before punctuation."""
    vocab = clip_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(_PUNCT, behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    tok.enable_truncation(max_length)
    return tok


def special_token_ids() -> dict[str, int]:
    """{"bos": id, "eos": id, "pad": id, "unk": id} of the tiny CLIP tokenizer (eos == pad == vocab_size - 1)."""
    v = clip_vocab()
    return {"bos": v[BOS], "eos": v[EOS], "pad": v[PAD], "unk": v[UNK]}


def save_clip_tokenizer(directory: str, max_length: int = MAX_LENGTH) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

    transformers' `CLIPTokenizer` always builds a byte-level BPE model of its own, so the config names the
    generic `PreTrainedTokenizerFast`, which loads `tokenizer.json` as it is; `AutoTokenizer` and
    `CLIPProcessor` then load the directory offline.
    """
    tok = build_clip_tokenizer(max_length)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_length,
              "padding_side": "right", "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "added_tokens_decoder": added}
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)
    return tok


def tokenize(tok: Tokenizer, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (input_ids [N, length] int32, attention_mask [N, length] int32); texts longer than
    `length` tokens are truncated with their EOS kept."""
    ids = np.full((len(texts), length), special_token_ids()["pad"], np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    eos = special_token_ids()["eos"]
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        row = enc.ids
        if len(row) > length:
            row = row[:length - 1] + [eos]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------- image processor

def image_processor_config(image_size: int) -> dict:
    """`preprocessor_config.json` of the tiny CLIP: HF `CLIPImageProcessor` resizing to (S, S), no crop."""
    s = int(image_size)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"height": s, "width": s}, "resample": 3,
        "do_center_crop": False, "crop_size": {"height": s, "width": s},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(image_lib.OPENAI_CLIP_MEAN),
        "image_std": list(image_lib.OPENAI_CLIP_STD), "do_convert_rgb": True,
    }


def image_config(image_size: int, patch_size: int) -> image_lib.ImageConfig:
    """Our host-side equivalent of `image_processor_config` (for `image.clip_preprocess`)."""
    return image_lib.ImageConfig.from_hf(
        {"model_type": "clip", "vision_config": {"image_size": image_size, "patch_size": patch_size}},
        image_processor_config(image_size))


def pixel_values(images: Sequence, cfg: image_lib.ImageConfig) -> np.ndarray:
    """float32 [N, 3, S, S] of PIL images or uint8 HWC arrays."""
    return np.stack([image_lib.clip_preprocess(im, cfg) for im in images]).astype(np.float32)


# -------------------------------------------------------------------------------------------- batches

# Attribute classes of a grid cell's content: index 0 = empty cell, then the tiny world's values.
CELL_ATTRIBUTES = (("color", tuple(S.COLORS)), ("shape", S.SHAPES), ("size", S.SIZES))


def cell_labels(scene: S.Scene) -> np.ndarray:
    """int32 [9, 3]: per grid cell (row-major), the (colour, shape, size) class of its object, 0 if empty
    (classes 1.. follow `CELL_ATTRIBUTES`)."""
    out = np.zeros((9, len(CELL_ATTRIBUTES)), np.int32)
    for o in scene.objects:
        out[3 * o.row + o.col] = [values.index(getattr(o, name)) + 1 for name, values in CELL_ATTRIBUTES]
    return out


# Classes of what a sentence says about the one object it mentions: 0 = not stated, then the values.
SENTENCE_ATTRIBUTES = (("color", tuple(S.COLORS)), ("shape", S.SHAPES), ("cell", tuple(range(9))))


def sentence_labels(text: str) -> np.ndarray:
    """int32 [3]: the (colour, shape, cell) classes (`SENTENCE_ATTRIBUTES`) of the one object `text`
    mentions (parsed by CHAIR's tiny-world parser); all 0 when it mentions none ("There are three
    objects."), all -1 (ignored) when it mentions several."""
    from vimar_jax.eval.chair import parse_mentions

    mentions = parse_mentions(text)
    if len(mentions) > 1:
        return np.full(3, -1, np.int32)
    if not mentions:
        return np.zeros(3, np.int32)
    m = mentions[0]
    color = list(S.COLORS).index(m.color) + 1 if m.color else 0
    cell = 3 * m.cell[0] + m.cell[1] + 1 if m.cell else 0
    return np.array([color, S.SHAPES.index(m.shape) + 1, cell], np.int32)


def patch_cells(grid: int) -> np.ndarray:
    """int32 [grid * grid]: the 3x3 scene cell each patch (row-major) lies in, by the patch centre. The
    image is resized to a square without cropping, so the scene grid maps onto the patch grid."""
    c = np.minimum(((np.arange(grid) + 0.5) * 3 / grid).astype(np.int32), 2)
    return (3 * c[:, None] + c[None, :]).reshape(-1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ScenePool:
    """Scenes 0..n-1 of the stream `seed`, their preprocessed pixels [n, 3, S, S] and their cell labels
    [n, 9, 3] (`cell_labels`)."""
    seed: int
    scenes: tuple[S.Scene, ...]
    pixels: np.ndarray
    labels: np.ndarray

    @staticmethod
    def build(seed: int, n: int, cfg: image_lib.ImageConfig) -> "ScenePool":
        if n < 1:
            raise ValueError(f"ScenePool needs n >= 1 scenes, got {n}")
        sc = tuple(S.scenes(seed, n))
        return ScenePool(seed, sc, pixel_values([S.render(s) for s in sc], cfg),
                         np.stack([cell_labels(s) for s in sc]))

    def __len__(self) -> int:
        return len(self.scenes)


def positive_sentence(scene: S.Scene, rng: np.random.Generator) -> str:
    """One true sentence of `scene`, from a caption of a random style (`POSITIVE_STYLES`)."""
    styles, probs = zip(*POSITIVE_STYLES)
    style = styles[rng.choice(len(styles), p=np.asarray(probs) / sum(probs))]
    sentences = S.caption_sentences(scene, rng, style)
    return sentences[rng.integers(len(sentences))]


def contrastive_batch(pool: ScenePool, tok: Tokenizer, *, seed: int, step: int, batch_size: int,
                      text_len: int, neg_text_len: int | None = None, kinds: Sequence[str] = NEGATIVE_KINDS
                      ) -> dict[str, np.ndarray]:
    """Batch `step` of the run `seed` (a function of (seed, step) only).

    pixel_values [B, 3, S, S]; input_ids/attention_mask [B, T] (one true sentence per image);
    neg_input_ids/neg_attention_mask [B, K, Tn] (one false sentence per kind in `kinds`; Tn = `neg_text_len`,
    default `text_len`: false sentences are single-object sentences, shorter than captions); cell_labels
    [B, 9, 3]; labels [B, 3] and neg_labels [B, K, 3] (`sentence_labels`); scene_index [B].
    """
    if batch_size > len(pool):
        raise ValueError(f"batch_size {batch_size} exceeds the scene pool ({len(pool)} scenes)")
    rng = np.random.default_rng([seed, step])
    idx = np.sort(rng.choice(len(pool), batch_size, replace=False))
    pos, neg = [], []
    for i in idx:
        scene = pool.scenes[i]
        pos.append(positive_sentence(scene, rng))
        neg.extend(S.false_sentence(scene, rng, k) for k in kinds)
    ids, mask = tokenize(tok, pos, text_len)
    tn = neg_text_len or text_len
    nids, nmask = tokenize(tok, neg, tn)
    k = len(kinds)
    return {"pixel_values": pool.pixels[idx], "input_ids": ids, "attention_mask": mask,
            "neg_input_ids": nids.reshape(batch_size, k, tn),
            "neg_attention_mask": nmask.reshape(batch_size, k, tn),
            "cell_labels": pool.labels[idx],
            "labels": np.stack([sentence_labels(t) for t in pos]),
            "neg_labels": np.stack([sentence_labels(t) for t in neg]).reshape(batch_size, k, 3),
            "scene_index": idx.astype(np.int32)}


class ContrastiveBatches:
    """Infinite iterator over `contrastive_batch(step=0, 1, ...)`, with `get_state`/`set_state` (the step)
    so that trainer checkpoints record and restore the data position."""

    def __init__(self, pool: ScenePool, tok: Tokenizer, *, seed: int, batch_size: int, text_len: int,
                 neg_text_len: int | None = None, kinds: Sequence[str] = NEGATIVE_KINDS):
        self.pool, self.tok, self.seed = pool, tok, seed
        self.batch_size, self.text_len, self.neg_text_len = batch_size, text_len, neg_text_len
        self.kinds = tuple(kinds)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = contrastive_batch(self.pool, self.tok, seed=self.seed, step=self.step,
                                  batch_size=self.batch_size, text_len=self.text_len,
                                  neg_text_len=self.neg_text_len, kinds=self.kinds)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


# ------------------------------------------------------------------------------------------- eval set

@dataclasses.dataclass(frozen=True)
class EvalItem:
    """Sentences of one held-out scene: `true` (a detail caption: objects, counts, relations), `objects`
    (one sentence per object), `listing` (one sentence naming every object), `false[kind]`."""
    true: tuple[str, ...]
    objects: tuple[str, ...]
    listing: str
    false: dict[str, tuple[str, ...]]


def eval_items(pool: ScenePool, *, seed: int, per_kind: int, kinds: Sequence[str] = NEGATIVE_KINDS
               ) -> list[EvalItem]:
    """The sentences scored on each scene of a held-out pool (deterministic from `seed`)."""
    out = []
    for i, scene in enumerate(pool.scenes):
        rng = np.random.default_rng([seed, i])
        true = tuple(S.caption_sentences(scene, rng, "detail"))
        objects = tuple(S.caption_sentences(scene, rng, "objects"))
        listing = S.caption_sentences(scene, rng, "short")[0]
        false = {k: tuple(S.false_sentence(scene, rng, k) for _ in range(per_kind)) for k in kinds}
        out.append(EvalItem(true, objects, listing, false))
    return out


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
