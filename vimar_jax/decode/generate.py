"""`generate`: LLaVA-NeXT generation from HF processor arrays through the jitted sampler.

    out = generate(vlm, input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens=64,
                   temperature=[0.1, 0.1, 0.5, 0.5], top_p=0.9, num_candidates=4, seed=0)

Each prompt (text with its image tokens expanded, image features gathered in) is prefilled **once** through
`LlavaNext` at a bucketed length (`vlm.length_bucket`), so prompts of different lengths share a compile.
Then:

- `num_candidates == 1`: the B prompts are right-aligned into one per-row cache (left- or right-padded
  inputs both work: rows are compacted on the host) and decoded together;
- `num_candidates > 1`: each prompt is prefilled with batch 1 and its `num_candidates` rows decode against
  that cache through the decoder's `prefix=` (read once per step for all rows, never copied). The decoder
  takes one batch-1 prefix per call, so several prompts with candidates are run **one prompt after the
  other** (each call reuses the same compilations). Row r = b * num_candidates + j; its random stream is
  `fold_in(key(seed), r)`, so the draws equal those of one big batch with the prompt copied per row.

Sampling settings are scalars or per-row sequences (length `B * num_candidates`, or `num_candidates` to
use the same per-candidate settings for every prompt), e.g. ViMaR's N temperatures x K samples in one
call. Rows stop at EOS (`stop="eos"`, default ids from the checkpoint) or after their first sentence
(`stop="sentence"`, sentence ends from the tokenizer's `SentenceEndTable`), or at `max_new_tokens`.
Sentence boundaries are recorded in both modes when the VLM has a tokenizer (it was loaded from a
directory).

`decoding(vlm)` is the per-VLM runtime (sampler, sentence table, jitted prefill/extension) shared with
`vimar_jax.decode.policy.LlavaPolicy`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.decode.sampler import (Finish, Sampler, SentenceRule, Settings, Start, decoder_prefill_fn,
                                      decoder_step_fn)
from vimar_jax.models.decoder import KVCache

STOPS = ("eos", "sentence")
MAX_SENTENCES = 64          # sentence boundaries kept per row
MIN_BUFFER = 16             # smallest generation buffer (tokens); buffers are powers of two


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


# ------------------------------------------------------------------------------------------ jitted parts

@functools.partial(jax.jit, static_argnums=(0, 7))
def _prefill_prompt(graphdef, state, ids, pixel_values, gather_index, positions, last_index, cache_len):
    """Image + text prompts [B, T] (positions -1 = padding) into a fresh cache of `cache_len` slots.
    Returns (logits [B, V] at `last_index [B]`, cache)."""
    m = nnx.merge(graphdef, state)
    cache = KVCache.init(m.config.text, ids.shape[0], cache_len, m.dtype)
    h, cache = m(ids, pixel_values, None, gather_index, positions, cache=cache, cache_index=0)
    last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)
    return m.logits(last)[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 6))
def _extend_prompt(graphdef, params, prompt, tokens, positions, last_index, extra):
    """A batch-1 prompt cache extended by `extra` slots holding `tokens [1, E]` (positions -1 = padding),
    as a new cache (the prompt cache is not modified). Returns (logits [1, V] at `last_index`, cache)."""
    dec = nnx.merge(graphdef, params)
    n, b, _, k, d = prompt.k.shape
    empty = jnp.zeros((n, b, extra, k, d), prompt.k.dtype)
    cache = KVCache(jnp.concatenate([prompt.k, empty], axis=2), jnp.concatenate([prompt.v, empty], axis=2),
                    jnp.concatenate([prompt.pos, jnp.full((b, extra), -1, jnp.int32)], axis=1))
    h, cache = dec(dec.embed(tokens), positions=positions, cache=cache, cache_index=prompt.max_len)
    last = jnp.take_along_axis(h, last_index[None, None, None], axis=1)
    return dec.logits(last)[:, 0], cache


# ------------------------------------------------------------------------------------------ prompts

@dataclasses.dataclass
class Prompts:
    """Prompts right-aligned and bucketed for `_prefill_prompt` (host arrays)."""
    ids: np.ndarray            # [B, Tb] int32, real tokens first
    positions: np.ndarray      # [B, Tb] int32, -1 = padding
    lengths: np.ndarray        # [B] int32
    pixel_values: np.ndarray   # [B, max_patches, 3, S, S]
    gather_index: np.ndarray   # [B, max_img_tokens] int32

    @property
    def bucket(self) -> int:
        return self.ids.shape[1]


def prepare_prompts(vlm, input_ids, pixel_values, image_sizes, attention_mask=None) -> Prompts:
    """Validate HF processor arrays (via `vlm.prepare`) and right-align each row's real tokens."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids has {ids.shape}")
    lengths = mask.sum(axis=1).astype(np.int32)
    if (lengths == 0).any():
        raise ValueError(f"rows {np.flatnonzero(lengths == 0).tolist()} of attention_mask have no tokens")
    pad = int(vlm.pad_token_id)
    packed = np.full(ids.shape, pad, np.int32)
    packed_mask = np.zeros(ids.shape, np.int32)
    for b in range(ids.shape[0]):
        packed[b, :lengths[b]] = ids[b][mask[b]]
        packed_mask[b, :lengths[b]] = 1
    prep = vlm.prepare(packed, pixel_values, image_sizes, packed_mask)
    if "pixel_values" not in prep:
        raise ValueError("generate needs pixel_values and image_sizes (LLaVA-NeXT prompts hold an image)")
    valid = prep["valid"]
    positions = np.where(valid, np.arange(valid.shape[1])[None], -1).astype(np.int32)
    return Prompts(prep["input_ids"].astype(np.int32), positions, lengths, prep["pixel_values"],
                   prep["gather_index"])


# ------------------------------------------------------------------------------------------ runtime

def checkpoint_eos_ids(vlm) -> tuple[int, ...]:
    """EOS ids of a VLM: `generation_config.json`, else config.json (`text_config`/top level), else the
    tokenizer's EOS; () if none is known."""
    def ids(x):
        if x is None:
            return ()
        return tuple(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))

    path = getattr(vlm, "path", None)
    if path is not None and os.path.isfile(os.path.join(path, "generation_config.json")):
        with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as f:
            found = ids(json.load(f).get("eos_token_id"))
        if found:
            return found
    cfg = vlm.hf_config
    found = ids((cfg.get("text_config") or {}).get("eos_token_id")) or ids(cfg.get("eos_token_id"))
    if found:
        return found
    if path is not None:
        return ids(vlm.processor.tokenizer.eos_token_id)
    return ()


class Decoding:
    """Per-VLM decoding runtime: the sampler over the LLaVA decoder, its sentence table, the jitted prompt
    prefill and extension. Get it with `decoding(vlm)` (one per VLM object)."""

    def __init__(self, vlm):
        self.pad_id = int(vlm.pad_token_id)     # (no reference to vlm: it keys the weak runtime cache)
        self.graphdef, self.state = nnx.split(vlm.module)
        self.text_config = vlm.module.config.text
        self.dtype = vlm.module.dtype
        self.eos_ids = checkpoint_eos_ids(vlm)
        self.table = None
        if getattr(vlm, "path", None) is not None:
            from vimar_jax import text

            self.table = text.sentence_end_table(vlm.processor.tokenizer, self.eos_ids)
        self.dec_graphdef, self.params = nnx.split(vlm.module.decoder)
        self.sampler = _sampler(self.dec_graphdef, self.table, self.pad_id)

    def prefill(self, prompts: Prompts, cache_len: int) -> tuple[Start, KVCache]:
        """Prefill `prompts` into a cache of `cache_len >= bucket` slots -> (decode start, cache)."""
        logits, cache = _prefill_prompt(self.graphdef, self.state, jnp.asarray(prompts.ids),
                                        jnp.asarray(prompts.pixel_values), jnp.asarray(prompts.gather_index),
                                        jnp.asarray(prompts.positions), jnp.asarray(prompts.lengths - 1),
                                        int(cache_len))
        last = prompts.ids[np.arange(len(prompts.lengths)), prompts.lengths - 1]
        start = Start(logits, jnp.asarray(prompts.lengths), jnp.asarray(last, jnp.int32),
                      jnp.asarray(prompts.bucket, jnp.int32))
        return start, cache

    def extend(self, prompt: KVCache, tokens: Sequence[int], first_position: int, *, slots: int,
               bucket_min: int = 16) -> tuple[Start, KVCache]:
        """A batch-1 prompt cache extended by `slots` slots that hold `tokens` (>= 1, run padded to a
        power-of-two width <= slots) at positions `first_position, ...` -> (batch-1 start after them, the
        extended cache of `prompt.max_len + slots` slots). The prompt cache itself is left as it is."""
        n = len(tokens)
        if not 1 <= n <= slots:
            raise ValueError(f"extend needs 1 to {slots} tokens, got {n}")
        width = min(pow2_bucket(n, bucket_min), slots)
        ids = np.full((1, width), self.pad_id, np.int32)
        ids[0, :n] = tokens
        pos = np.where(np.arange(width) < n, first_position + np.arange(width), -1).astype(np.int32)[None]
        logits, cache = _extend_prompt(self.dec_graphdef, self.params, prompt, jnp.asarray(ids), jnp.asarray(pos),
                                       jnp.asarray(n - 1, jnp.int32), int(slots))
        start = Start(logits, jnp.asarray([first_position + n], jnp.int32), jnp.asarray([tokens[-1]], jnp.int32),
                      jnp.asarray(prompt.max_len + n, jnp.int32))
        return start, cache

    def new_cache(self, batch: int, slots: int) -> KVCache:
        return KVCache.init(self.text_config, batch, slots, self.dtype)

    def eos(self, eos_token_id) -> tuple[int, ...]:
        """`None` -> the checkpoint's ids; an int or a sequence -> those (`()` = never stop at EOS)."""
        if eos_token_id is None:
            return self.eos_ids
        return tuple(int(i) for i in np.asarray(eos_token_id, np.int64).reshape(-1))


_RUNTIMES: "weakref.WeakKeyDictionary[Any, Decoding]" = weakref.WeakKeyDictionary()
_SAMPLERS: dict[Any, Sampler] = {}


def _sampler(dec_graphdef, table, pad_id: int) -> Sampler:
    """One `Sampler` (and so one set of compilations) per decoder architecture, sentence table and pad id,
    shared by every VLM object with them (a reloaded checkpoint does not recompile)."""
    digest = None if table is None else hashlib.sha1(b"".join(
        np.ascontiguousarray(a).tobytes() for a in table)).hexdigest()
    key = (dec_graphdef, digest, pad_id)
    if key not in _SAMPLERS:
        rule = None if table is None else SentenceRule.from_table(table)
        _SAMPLERS[key] = Sampler(decoder_step_fn(dec_graphdef), prefill_fn=decoder_prefill_fn(dec_graphdef),
                                 boundary_fn=rule, max_sentences=MAX_SENTENCES, pad_id=pad_id)
    return _SAMPLERS[key]


def decoding(vlm) -> Decoding:
    """The (cached) `Decoding` of a VLM."""
    rt = _RUNTIMES.get(vlm)
    if rt is None:
        rt = _RUNTIMES[vlm] = Decoding(vlm)
    return rt


# ------------------------------------------------------------------------------------------ generate

@dataclasses.dataclass
class Generation:
    """Host arrays of a `generate` call; row r = prompt r // num_candidates. Generated tokens only (no
    prompt); `tokens[r, lengths[r]:]` is padding; an EOS that stopped a row is included and counted."""
    tokens: np.ndarray          # [R, max_new_tokens] int32
    lengths: np.ndarray         # [R] int32
    reason: np.ndarray          # [R] int32 (`sampler.Finish`: EOS, SENTENCE, BUDGET, CACHE_FULL), as DecodeState
    boundaries: np.ndarray      # [R, MAX_SENTENCES] int32: exclusive ends of the sentences
    num_sentences: np.ndarray   # [R] int32
    logprobs: np.ndarray        # [R, max_new_tokens] float32, under the processed distribution (0 if greedy)
    raw_logprobs: np.ndarray    # [R, max_new_tokens] float32, under the model's softmax
    num_candidates: int = 1

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def sentence_spans(self, r: int) -> list[tuple[int, int]]:
        """(start, end) token spans of row r's recorded sentences."""
        ends = self.boundaries[r, :min(int(self.num_sentences[r]), self.boundaries.shape[1])].tolist()
        return list(zip([0] + ends[:-1], ends))

    def reason_names(self) -> list[str]:
        return [Finish(int(f)).name.lower() for f in self.reason]


def _row(x, b: int):
    return None if x is None else np.asarray(x)[b:b + 1]


def _per_row(name: str, value, rows: int, per_prompt: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((rows,), arr, dtype)
    if arr.ndim == 1 and arr.shape[0] == rows:
        return arr
    if arr.ndim == 1 and arr.shape[0] == per_prompt:
        return np.tile(arr, rows // per_prompt)
    raise ValueError(f"{name} must be a scalar or have {rows} (rows) or {per_prompt} (candidates) entries, "
                     f"got shape {arr.shape}")


def generate(vlm, input_ids, pixel_values, image_sizes, attention_mask=None, *, max_new_tokens: int = 64,
             temperature=0.0, top_p=1.0, top_k=0, num_candidates: int = 1, seed: int = 0, stop: str = "eos",
             eos_token_id=None) -> Generation:
    """Generate from HF `LlavaNextProcessor` arrays (see the module docstring). `temperature` 0 = greedy."""
    if stop not in STOPS:
        raise ValueError(f"stop={stop!r}: expected one of {STOPS}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(num_candidates) < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    rt = decoding(vlm)
    if stop == "sentence" and rt.table is None:
        raise ValueError("stop='sentence' needs the tokenizer's sentence table: load the VLM from a directory")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    B, C = ids.shape[0], int(num_candidates)
    R = B * C
    settings = dict(temperature=_per_row("temperature", temperature, R, C, np.float32),
                    top_k=_per_row("top_k", top_k, R, C, np.int32),
                    top_p=_per_row("top_p", top_p, R, C, np.float32))
    max_new_tokens = int(max_new_tokens)
    buffer = pow2_bucket(max_new_tokens, MIN_BUFFER)
    eos = rt.eos(eos_token_id)
    stop_after = 1 if stop == "sentence" else 0
    key = jax.random.key(int(seed))

    def make(rows: slice, n: int) -> Settings:
        return Settings.make(n, **{k: v[rows] for k, v in settings.items()}, max_new_tokens=max_new_tokens,
                             stop_after_sentences=stop_after, eos_ids=eos)

    if C == 1:
        prompts = prepare_prompts(vlm, ids, pixel_values, image_sizes, attention_mask)
        start, cache = rt.prefill(prompts, prompts.bucket + buffer)
        states = [rt.sampler.decode(rt.params, start, cache, make(slice(None), B), key, buffer_size=buffer)]
    else:
        states = []
        for b in range(B):
            one = prepare_prompts(vlm, ids[b:b + 1], _row(pixel_values, b), _row(image_sizes, b),
                                  _row(attention_mask, b))
            start, prefix = rt.prefill(one, one.bucket)
            rows = slice(b * C, (b + 1) * C)
            states.append(rt.sampler.decode(rt.params, start.broadcast(C), rt.new_cache(C, buffer), make(rows, C),
                                            key, buffer_size=buffer, prefix=prefix,
                                            row_ids=np.arange(b * C, (b + 1) * C, dtype=np.int32)))

    def cat(field, width=None):
        out = np.concatenate([np.asarray(getattr(s, field)) for s in states], axis=0)
        return out if width is None else out[:, :width]

    return Generation(tokens=cat("tokens", max_new_tokens), lengths=cat("lengths"), reason=cat("reason"),
                      boundaries=cat("boundaries"), num_sentences=cat("num_sentences"),
                      logprobs=cat("logprobs", max_new_tokens), raw_logprobs=cat("raw_logprobs", max_new_tokens),
                      num_candidates=C)


__all__ = ["generate", "Generation", "Decoding", "decoding", "Prompts", "prepare_prompts", "checkpoint_eos_ids",
           "pow2_bucket", "STOPS"]
