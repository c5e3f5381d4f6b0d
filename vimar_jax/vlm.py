"""User API: `load_vlm(dir)` -> `VLM` and `load_value(dir)` -> `Value`, jit-compiled, fed HF processor arrays.

Both take exactly the arrays HF's `LlavaNextProcessor` (or our `Processor`) returns: `input_ids`,
`attention_mask`, `pixel_values [B, patches, 3, S, S]`, `image_sizes [B, 2]` (numpy, or anything
`np.asarray` accepts). On the host they

- pad the patch axis to the model's maximum patch count (one compiled shape for any image mix),
- compute the image-feature gather index (`vimar_jax.image.feature_gather_index`) and check every row
  has exactly as many `<image>` tokens as its image has features,
- derive positions from the attention mask like HF generation (`cumsum(mask) - 1`) and mask padded tokens
  out (segment id -1), so left- and right-padded batches both work,
- pad the prompt length to a bucket (`length_bucket="pow2"`, or an int multiple such as 64), so prompts of
  different lengths reuse one compilation per bucket.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.models.decoder import KVCache
from vimar_jax.models.llava_next import LlavaNext, LlavaNextConfig
from vimar_jax.models.value import ValueConfig, ValueModel
from vimar_jax.sharding import DEFAULT_RULES, use_rules


def bucket_length(n: int, bucket: str | int = "pow2", minimum: int = 16) -> int:
    """The padded length for n tokens: the next power of two (>= minimum) or the next multiple of `bucket`."""
    if n <= 0:
        raise ValueError(f"sequence length must be positive, got {n}")
    if bucket == "pow2":
        return max(minimum, 1 << (n - 1).bit_length())
    if isinstance(bucket, (int, np.integer)) and bucket > 0:
        return -(-n // int(bucket)) * int(bucket)
    raise ValueError(f"length_bucket={bucket!r}: expected 'pow2' or a positive int")


class _Base:
    """Shared host-side preparation of processor arrays for a LLaVA-NeXT-backed model."""

    def __init__(self, path: str | Path | None, llava: LlavaNextConfig, hf_config: dict, *,
                 length_bucket: str | int = "pow2", pad_token_id: int | None = None, mesh=None,
                 rules=DEFAULT_RULES):
        self.path = None if path is None else Path(path)
        # (mesh, rules) under which activations are constrained; a static argument of the jitted functions.
        self._ctx = None if mesh is None else (mesh, tuple(rules))
        self.llava_config = llava
        self.hf_config = hf_config
        self.length_bucket = length_bucket
        bucket_length(1, length_bucket)  # validate early
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else hf_config.get("pad_token_id") or 0)
        self._processor = None

    @property
    def processor(self):
        """Our `vimar_jax.processor.Processor` for the checkpoint directory (loaded on first use)."""
        if self._processor is None:
            if self.path is None:
                raise ValueError("this model was not loaded from a directory: it has no processor")
            from vimar_jax.processor import Processor

            self._processor = Processor.from_dir(self.path)
        return self._processor

    def prepare(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> dict:
        """Host arrays for the jitted forward (see the module docstring); `length` = the unpadded T."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        B, T = ids.shape
        mask = np.ones((B, T), np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids has {(B, T)}")
        c = self.llava_config
        out = {"length": T}
        if pixel_values is not None:
            pv = np.asarray(pixel_values, np.float32)
            S, C = c.vision.image_size, c.vision.num_channels
            if pv.ndim != 5 or pv.shape[0] != B or pv.shape[2:] != (C, S, S):
                raise ValueError(f"pixel_values must be [B={B}, patches, {C}, {S}, {S}], got shape {pv.shape}")
            if image_sizes is None:
                raise ValueError("image_sizes [B, 2] is required with pixel_values")
            sizes = np.asarray(image_sizes).astype(np.int64)
            if sizes.shape != (B, 2):
                raise ValueError(f"image_sizes must be [B={B}, 2] (height, width), got shape {sizes.shape}")
            n_max = c.max_patches
            if pv.shape[1] > n_max:
                raise ValueError(f"pixel_values has {pv.shape[1]} patches per image, the model's pinpoints allow "
                                 f"at most {n_max}")
            pv = np.pad(pv, ((0, 0), (0, n_max - pv.shape[1]), (0, 0), (0, 0), (0, 0)))
            from vimar_jax import image

            index, n_tokens = image.feature_gather_index(sizes, n_max, c.image_config())
            counts = (ids == c.image_token_id).sum(axis=1)   # the model merges features by this count
            bad = np.nonzero(counts != np.asarray(n_tokens))[0]
            if bad.size:
                b = int(bad[0])
                raise ValueError(f"row {b} has {counts[b]} <image> tokens (id {c.image_token_id}) but its image of "
                                 f"size {sizes[b].tolist()} has {int(n_tokens[b])} features")
            out.update(pixel_values=pv, gather_index=np.asarray(index, np.int32))
        elif (ids == c.image_token_id).any():
            raise ValueError("input_ids contain <image> tokens but no pixel_values were given")
        Tb = bucket_length(T, self.length_bucket)
        pad = ((0, 0), (0, Tb - T))
        valid = np.pad(mask > 0, pad)
        positions = np.where(valid, np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        out.update(input_ids=np.pad(ids.astype(np.int32), pad, constant_values=self.pad_token_id),
                   positions=positions, segment_ids=np.where(valid, 0, -1).astype(np.int32), valid=valid)
        return out


def _rules(ctx):
    return contextlib.nullcontext() if ctx is None else use_rules(*ctx)


# One jitted function per task, keyed by the module's (hashable) graph definition and the sharding context:
# models of the same architecture share compilations, whichever `VLM` / `Value` object runs them.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits_fn(graphdef, ctx, state, ids, pixel_values, gather_index, positions, segment_ids):
    with _rules(ctx):
        m = nnx.merge(graphdef, state)
        h, _ = m(ids, pixel_values, None, gather_index, positions, segment_ids)
        return m.logits(h)


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def _prefill_fn(graphdef, ctx, state, ids, pixel_values, gather_index, positions, last_index, cache_len):
    """Prompts (with images) into a fresh per-row cache of `cache_len` slots -> (last-token logits, cache)."""
    with _rules(ctx):
        m = nnx.merge(graphdef, state)
        cache = KVCache.init(m.config.text, ids.shape[0], cache_len, m.dtype)
        h, cache = m(ids, pixel_values, None, gather_index, positions, cache=cache, cache_index=0)
        last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)
        return m.logits(last)[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _values_fn(graphdef, ctx, state, ids, pixel_values, gather_index, positions, segment_ids, query_index):
    with _rules(ctx):
        m = nnx.merge(graphdef, state)
        return m.values(ids, pixel_values, None, gather_index, positions, segment_ids, query_index=query_index)


def _forward_args(prep: dict):
    return (jnp.asarray(prep["input_ids"]),
            None if "pixel_values" not in prep else jnp.asarray(prep["pixel_values"]),
            None if "gather_index" not in prep else jnp.asarray(prep["gather_index"]),
            jnp.asarray(prep["positions"]), jnp.asarray(prep["segment_ids"]))


class VLM(_Base):
    """A loaded LLaVA-NeXT: `.config`, `.module`, `.processor`, `.logits(...)`, `.prefill(...)`, `.generate(...)`.

    The parameters are captured when the object is made: after changing `module`, make a new `VLM`."""

    def __init__(self, module: LlavaNext, hf_config: dict, path: str | Path | None = None, **kw):
        super().__init__(path, module.config, hf_config, **kw)
        self.module = module
        self.config = module.config
        self._graphdef, self._state = nnx.split(module)

    def logits(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> jax.Array:
        """float32 logits [B, T, V] for HF processor arrays (values at padded positions are meaningless)."""
        prep = self.prepare(input_ids, pixel_values, image_sizes, attention_mask)
        out = _logits_fn(self._graphdef, self._ctx, self._state, *_forward_args(prep))
        return out[:, :prep["length"]]

    def prefill(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, extra_slots: int):
        """Run prompts (left- or right-padded) into a per-row cache with `extra_slots` free slots after the
        length bucket -> (`decode.sampler.Start`, cache) for `Sampler.decode` over `self.module.decoder`."""
        from vimar_jax.decode.sampler import Start

        prep = self.prepare(input_ids, pixel_values, image_sizes, attention_mask)
        valid = prep["valid"]
        if not valid[:, :prep["length"]].any(axis=1).all():
            raise ValueError("a row of attention_mask has no tokens")
        last = (valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)).astype(np.int32)
        ids, pv, gidx, positions, _ = _forward_args(prep)
        positions = jnp.where(jnp.asarray(valid), positions, -1)
        Tb = prep["input_ids"].shape[1]
        logits, cache = _prefill_fn(self._graphdef, self._ctx, self._state, ids, pv, gidx, positions,
                                    jnp.asarray(last), Tb + int(extra_slots))
        rows = np.arange(valid.shape[0])
        start = Start(logits, jnp.asarray(valid.sum(axis=1), jnp.int32),
                      jnp.asarray(prep["input_ids"][rows, last], jnp.int32), jnp.asarray(Tb, jnp.int32))
        return start, cache

    def generate(self, input_ids, pixel_values, image_sizes, attention_mask=None, max_new_tokens: int = 64,
                 temperature=0.0, top_p=1.0, top_k=0, num_candidates: int = 1, seed: int = 0, *,
                 stop: str = "eos", eos_token_id=None):
        """Generate from HF processor arrays -> `vimar_jax.decode.generate.Generation` (host arrays: `tokens
        [B * num_candidates, max_new_tokens]`, `lengths`, `reason`, sentence `boundaries`, `logprobs`, ...).

        Delegates to `vimar_jax.decode.generate.generate` (see there): each prompt is prefilled once and its
        `num_candidates` rows (row r = prompt r // num_candidates) decode against that shared cache. Sampling
        settings are scalars or per-row sequences; temperature 0 = greedy. `stop` is "eos" or "sentence";
        `eos_token_id` defaults to the checkpoint's EOS ids (`()` = never stop at EOS)."""
        from vimar_jax.decode.generate import generate

        return generate(self, input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, num_candidates=num_candidates,
                        seed=seed, stop=stop, eos_token_id=eos_token_id)


class Value(_Base):
    """A loaded value model: `.config` (ValueConfig), `.module`, `.processor`, `.values(...)`."""

    def __init__(self, module: ValueModel, hf_config: dict, path: str | Path | None = None, **kw):
        super().__init__(path, module.config.llava, hf_config, **kw)
        self.module = module
        self.config = module.config
        self._graphdef, self._state = nnx.split(module)

    def values(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
               query_index=None) -> jax.Array:
        """Values of states given as HF processor arrays: one per row at its last real token ([B] float32),
        or at `query_index [B, Q]` token indices ([B, Q])."""
        prep = self.prepare(input_ids, pixel_values, image_sizes, attention_mask)
        if query_index is None:
            valid = prep["valid"][:, :prep["length"]]
            if not valid.any(axis=1).all():
                raise ValueError("a row of attention_mask has no tokens")
            last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
            query = jnp.asarray(last[:, None], jnp.int32)
            return _values_fn(self._graphdef, self._ctx, self._state, *_forward_args(prep), query)[:, 0]
        q = np.asarray(query_index)
        if q.ndim != 2 or q.shape[0] != prep["input_ids"].shape[0]:
            raise ValueError(f"query_index must be [B, Q], got shape {q.shape}")
        if (q < 0).any() or (q >= prep["length"]).any():
            raise ValueError(f"query_index entries must be in [0, {prep['length']})")
        return _values_fn(self._graphdef, self._ctx, self._state, *_forward_args(prep), jnp.asarray(q, jnp.int32))


def load_vlm(path, dtype=jnp.float32, *, param_dtype=None, length_bucket: str | int = "pow2", mesh=None,
             rules=DEFAULT_RULES) -> VLM:
    """A LLaVA-NeXT checkpoint directory (HF, either key layout, or a `vimar convert` output) -> `VLM`.

    With a `mesh`, parameters are placed by their logical axes under `rules` and activations are constrained
    by the same rules. A value-model directory also loads: its backbone is the VLM."""
    from vimar_jax.convert.io import load_module

    module, config = load_module(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    if isinstance(module, ValueModel):
        module = module.backbone
    if not isinstance(module, LlavaNext):
        raise ValueError(f"{path}: config.json model_type {config.get('model_type')!r} is not a LLaVA-NeXT model")
    return VLM(module, config, path, length_bucket=length_bucket, mesh=mesh, rules=rules)


def load_value(path, dtype=jnp.float32, *, param_dtype=None, length_bucket: str | int = "pow2",
               mesh=None, rules=DEFAULT_RULES) -> Value:
    """A value checkpoint directory (LLaVA-NeXT + `value_head.*` + `config.json["vimar_value"]`) -> `Value`.
    The value head stays float32 whatever `dtype` / `param_dtype`."""
    from vimar_jax.convert.io import load_module

    module, config = load_module(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    if not isinstance(module, ValueModel):
        raise ValueError(f"{path}: not a value checkpoint (config.json has no 'vimar_value' entry)")
    return Value(module, config, path, length_bucket=length_bucket, mesh=mesh, rules=rules)


__all__ = ["VLM", "Value", "load_vlm", "load_value", "bucket_length", "ValueConfig"]
