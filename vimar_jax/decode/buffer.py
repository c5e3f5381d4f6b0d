"""A caption as a static-shape token buffer with sentence (segment) ids, and jitted edits on it.

Stage 2 of ViMaR replaces weak sentences of a caption and appends new ones. Doing that on Python lists
would be simple, but every edit would change array shapes for whatever runs on the caption next. Here a
caption is a fixed-length buffer:

- ``tokens [L] int32``: the caption tokens, left-aligned, ``pad_id`` after ``length``;
- ``seg [L] int32``: the sentence index of each token (0, 1, ...), ``-1`` after ``length``.

`splice` replaces (or deletes, with an empty replacement) one segment and `append` adds one at the end,
both as one gather through an index map built from `iota` comparisons, so one compilation serves every
edit of every caption of a given buffer length.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class CaptionBuffer:
    tokens: jax.Array        # [L] int32
    seg: jax.Array           # [L] int32, -1 = empty slot

    @property
    def capacity(self) -> int:
        return self.tokens.shape[-1]

    @staticmethod
    def from_sentences(sentences: Sequence[Sequence[int]], capacity: int, pad_id: int = 0) -> "CaptionBuffer":
        """Host-side constructor from token lists, one per sentence."""
        total = sum(len(s) for s in sentences)
        if total > capacity:
            raise ValueError(f"caption of {total} tokens does not fit a buffer of {capacity}")
        tokens = np.full(capacity, pad_id, np.int32)
        seg = np.full(capacity, -1, np.int32)
        i = 0
        for k, s in enumerate(sentences):
            tokens[i:i + len(s)] = s
            seg[i:i + len(s)] = k
            i += len(s)
        return CaptionBuffer(jnp.asarray(tokens), jnp.asarray(seg))

    def length(self) -> jax.Array:
        return jnp.sum(self.seg >= 0)

    def num_segments(self) -> jax.Array:
        return jnp.max(self.seg, initial=-1) + 1

    def to_sentences(self) -> list[list[int]]:
        """Host-side: the token lists of the sentences, in order."""
        tokens, seg = np.asarray(self.tokens), np.asarray(self.seg)
        n = int(seg.max(initial=-1)) + 1
        return [tokens[seg == k].tolist() for k in range(n)]


def _edit(buf: CaptionBuffer, start, old_len, new_tokens, new_len, new_seg_id, seg_shift, pad_id):
    """Replace buf[start : start+old_len] by new_tokens[:new_len]; later segment ids shift by seg_shift."""
    L = buf.capacity
    i = jnp.arange(L)
    before = i < start
    inside = (i >= start) & (i < start + new_len)
    src_old = i - new_len + old_len                      # where a token after the edit comes from
    after_valid = (~before) & (~inside) & (src_old < L)
    old_idx = jnp.clip(jnp.where(before, i, src_old), 0, L - 1)
    new_idx = jnp.clip(i - start, 0, new_tokens.shape[-1] - 1)
    old_tok = buf.tokens[old_idx]
    old_seg = buf.seg[old_idx]
    tokens = jnp.where(before, old_tok, jnp.where(inside, new_tokens[new_idx],
                                                  jnp.where(after_valid, old_tok, pad_id)))
    seg = jnp.where(before, old_seg, jnp.where(inside, new_seg_id,
                                               jnp.where(after_valid & (old_seg >= 0), old_seg + seg_shift, -1)))
    overflow = buf.length() - old_len + new_len > L
    return CaptionBuffer(tokens.astype(jnp.int32), seg.astype(jnp.int32)), overflow


@jax.jit
def splice(buf: CaptionBuffer, k, new_tokens, new_len, pad_id=0):
    """Replace segment k by new_tokens[:new_len] (new_len == 0 deletes it and renumbers later segments).

    Returns (buffer, overflow): overflow is True when the result did not fit and was cut at capacity.
    """
    in_k = buf.seg == k
    start = jnp.argmax(in_k)
    old_len = jnp.sum(in_k)
    new_len = jnp.where(old_len > 0, new_len, 0)        # absent segment: no-op
    shift = jnp.where((new_len > 0) | (old_len == 0), 0, -1)
    return _edit(buf, start, old_len, new_tokens, new_len, k, shift, pad_id)


@jax.jit
def append(buf: CaptionBuffer, new_tokens, new_len, pad_id=0):
    """Append new_tokens[:new_len] as a new last segment. Returns (buffer, overflow)."""
    return _edit(buf, buf.length(), 0, new_tokens, new_len, buf.num_segments(), 0, pad_id)


def weak_segments(values, num_segments, theta) -> jax.Array:
    """Mask [S] of segments whose value is below theta (only the first num_segments count)."""
    values = jnp.asarray(values)
    return (values < theta) & (jnp.arange(values.shape[-1]) < num_segments)
