"""Mistral / Qwen2 language decoder (one NNX module; Qwen2 adds q/k/v biases and per-layer windows).

Layers are stacked (leading `layers` axis) and run with `jax.lax.scan`. Attention supports three ways of
seeing keys (see docs/CONTRACTS.md, "Decoder"):
- no cache: the T tokens of the call, causal by index, with optional packed segments;
- a per-row `KVCache` written at `[cache_index, cache_index + T)`, masked by the position of each slot
  (a one-token decode step reads it in place and attends to the new token beside it; the cache is written
  once, after the last layer);
- an optional batch-1 `prefix` cache shared by every row, whose attention logits are concatenated with the
  row's own logits before one softmax (never copied per row).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.convert import spec
from vimar_jax.sharding import constrain

_F32 = jnp.float32
_NO_WINDOW = int(np.iinfo(np.int32).max)
_REMAT = ("none", "full", "dots")
_LAYER_TYPES = ("full_attention", "sliding_attention")


# --------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    # Window of each layer (None = full attention); defaults to `sliding_window` for every layer.
    layer_windows: tuple[int | None, ...] | None = None
    remat: str = "none"

    def __post_init__(self):
        if self.layer_windows is None:
            object.__setattr__(self, "layer_windows", (self.sliding_window,) * self.num_layers)
        object.__setattr__(self, "layer_windows", tuple(self.layer_windows))
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries, num_layers is {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in _REMAT:
            raise ValueError(f"remat={self.remat!r}: expected one of {_REMAT}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides) -> "DecoderConfig":
        """From a Mistral or Qwen2 HF config dict (a `config.json` or a LLaVA `text_config`)."""
        model_type = d.get("model_type")
        if model_type not in ("mistral", "qwen2"):
            raise ValueError(f"model_type={model_type!r}: the decoder supports 'mistral' and 'qwen2'")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r}: only 'silu' is supported")

        def req(key):
            if d.get(key) is None:
                raise ValueError(f"{model_type} config has no {key!r}")
            return d[key]

        hidden, heads, n_layers = req("hidden_size"), req("num_attention_heads"), req("num_hidden_layers")
        if model_type == "mistral":
            window = d.get("sliding_window")
            windows = (window,) * n_layers          # Mistral applies its window to every layer
        else:
            window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
            types = d.get("layer_types")
            if types is None:
                first = d.get("max_window_layers", 28)
                types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                         for i in range(n_layers)]
            if len(types) != n_layers or any(t not in _LAYER_TYPES for t in types):
                raise ValueError(f"layer_types={types!r}: expected {n_layers} entries from {_LAYER_TYPES}")
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        return cls(
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rope_theta=_rope_theta(d),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            sliding_window=window,
            layer_windows=windows,
            **overrides,
        )


def _rope_theta(d: dict) -> float:
    """`rope_theta` from `rope_parameters` (transformers 5), legacy `rope_scaling`, or the top level."""
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rp = d.get(field) or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise ValueError(f"{field}={rp!r}: per-layer-type RoPE parameters are not supported")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{field}.rope_type={rope_type!r}: only 'default' RoPE is supported")
    partial = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial!r}: only full rotary embeddings are supported")
    return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))


# ---------------------------------------------------------------------------------------------- cache

@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer by slot; `pos[b, s]` is the position held in slot s (-1 = empty)."""
    k: jax.Array    # [L, B, S, Hkv, D]
    v: jax.Array    # [L, B, S, Hkv, D]
    pos: jax.Array  # [B, S] int32

    @staticmethod
    def init(config: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32,
             num_layers: int | None = None) -> "KVCache":
        n = config.num_layers if num_layers is None else num_layers
        shape = (n, batch, max_len, config.num_kv_heads, config.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, max_len), -1, jnp.int32))

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of batch rows `rows [R]` (in that order)."""
        return KVCache(jnp.take(self.k, rows, axis=1), jnp.take(self.v, rows, axis=1), jnp.take(self.pos, rows, axis=0))

    def put_rows(self, rows: jax.Array, part: "KVCache") -> "KVCache":
        """This cache with batch rows `rows [R]` replaced by those of `part` (batch R, same slots)."""
        return KVCache(self.k.at[:, rows].set(part.k), self.v.at[:, rows].set(part.v), self.pos.at[rows].set(part.pos))


# --------------------------------------------------------------------------------------------- module

_BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class DecoderLayers(nnx.Module):
    """The stacked parameters of all decoder layers (leading axis = layer)."""

    def __init__(self, config: DecoderConfig, *, param_dtype, rngs: nnx.Rngs):
        c = config
        L, E, H, K, D, M = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size

        def param(shape, axes, init="normal"):
            value = _normal(rngs, shape, param_dtype) if init == "normal" else \
                jnp.ones(shape, param_dtype) if init == "ones" else jnp.zeros(shape, param_dtype)
            return nnx.Param(value, axes=axes)

        self.input_norm = param((L, E), ("layers", "norm"), "ones")
        self.q_proj = param((L, E, H, D), ("layers", "embed", "heads", "head_dim"))
        self.k_proj = param((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.v_proj = param((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        if c.qkv_bias:
            self.q_bias = param((L, H, D), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = param((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = param((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
        self.o_proj = param((L, H, D, E), ("layers", "heads", "head_dim", "embed"))
        self.post_attn_norm = param((L, E), ("layers", "norm"), "ones")
        self.gate_proj = param((L, E, M), ("layers", "embed", "mlp"))
        self.up_proj = param((L, E, M), ("layers", "embed", "mlp"))
        self.down_proj = param((L, M, E), ("layers", "mlp", "embed"))

    def arrays(self, n: int) -> dict[str, jax.Array]:
        """The first n layers' parameters as a dict of arrays (what the scanned layer function reads)."""
        return {name: var[...][:n] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class Decoder(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Param(_normal(rngs, (c.vocab_size, c.hidden_size), param_dtype),
                                      axes=("vocab", "embed"))
        self.layers = DecoderLayers(config, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), param_dtype), axes=("norm",))
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Param(_normal(rngs, (c.hidden_size, c.vocab_size), param_dtype),
                                     axes=("embed", "vocab"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        return constrain(x, _BATCH_LEN_EMBED)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None, cache_index=None, prefix: KVCache | None = None,
                 num_layers: int | None = None) -> tuple[jax.Array, KVCache | None]:
        """Run the first `num_layers` layers (all + final norm if None) on embeddings x [B, T, E]."""
        c = self.config
        n = c.num_layers if num_layers is None else int(num_layers)
        if not 0 <= n <= c.num_layers:
            raise ValueError(f"num_layers={n} outside [0, {c.num_layers}]")
        if x.ndim != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"x has shape {x.shape}, expected [B, T, {c.hidden_size}]")
        B, T = x.shape[:2]
        if positions.shape != (B, T):
            raise ValueError(f"positions has shape {positions.shape}, expected {(B, T)}")
        positions = positions.astype(jnp.int32)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a cache (cached attention is by position)")
            if cache_index is None:
                raise ValueError("cache_index is required with a cache")
            if cache.num_layers != n or cache.k.shape[1] != B:
                raise ValueError(f"cache has {cache.num_layers} layers and batch {cache.k.shape[1]}, "
                                 f"expected {n} layers and batch {B}")
            if isinstance(cache_index, int) and not 0 <= cache_index <= cache.max_len - T:
                raise ValueError(f"cache_index={cache_index} + {T} tokens exceeds cache length {cache.max_len}")
        if prefix is not None and (prefix.k.shape[1] != 1 or prefix.num_layers < n):
            raise ValueError(f"prefix cache must have batch 1 and >= {n} layers, got k {prefix.k.shape}")

        # Masks ([B, T, S] booleans) and position gaps for the sliding window, built once for all layers.
        in_place = cache is not None and T == 1
        if cache is None:
            i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
            own_ok = jnp.broadcast_to(j <= i, (B, T, T))
            if segment_ids is not None:
                sq, sk = segment_ids[:, :, None], segment_ids[:, None, :]
                own_ok = own_ok & (sk >= 0) & ((sk == 0) | (sk == sq))
            own_gap = positions[:, :, None] - positions[:, None, :]
            new_pos = None
            masks = [(own_ok, own_gap)]
        else:
            cache_index = jnp.asarray(cache_index, jnp.int32)
            new_pos = jax.lax.dynamic_update_slice(cache.pos, positions, (0, cache_index))
            if in_place:
                # A decode step: the cache as it was (read in place; the slot about to be written masked
                # out), then the new token itself. No layer copies the cache to write one token into it;
                # the cache is written once, after the last layer.
                written = jnp.arange(cache.max_len, dtype=jnp.int32) == cache_index
                old_ok, old_gap = _position_mask(positions, cache.pos)
                masks = [(old_ok & ~written[None, None, :], old_gap), _position_mask(positions, positions)]
            else:
                # A prefill: each layer writes the new tokens into its cache slice and attends to all slots
                # (attending to the new tokens beside a mostly empty cache would cost more than the copy).
                masks = [_position_mask(positions, new_pos)]
        if prefix is not None:
            masks.append(_position_mask(positions, prefix.pos))
        windows = c.layer_windows[:n]
        use_window = any(w is not None for w in windows)
        window_arr = jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)

        cos, sin = _rope_tables(positions, c.head_dim, c.rope_theta)
        layer = _make_layer(c, self.dtype, masks, use_window, cos, sin, cache_index, in_place)
        xs = dict(p=self.layers.arrays(n), window=window_arr)
        if cache is not None:
            xs.update(k=cache.k, v=cache.v)
        if prefix is not None:
            xs.update(pk=prefix.k[:n, 0], pv=prefix.v[:n, 0])
        x = constrain(x.astype(self.dtype), _BATCH_LEN_EMBED)
        x, new_kv = jax.lax.scan(layer, x, xs)

        if cache is not None:
            new_k, new_v = new_kv
            start = (0, 0, cache_index, 0, 0)
            cache = KVCache(jax.lax.dynamic_update_slice(cache.k, new_k.astype(cache.k.dtype), start),
                            jax.lax.dynamic_update_slice(cache.v, new_v.astype(cache.v.dtype), start), new_pos)
        if num_layers is None:
            x = _rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [B, T, V] from hidden states [B, T, E] (tied models use embed_tokens.T)."""
        if self.config.tie_word_embeddings:
            w, eq = self.embed_tokens[...], "bte,ve->btv"
        else:
            w, eq = self.lm_head[...], "bte,ev->btv"
        out = jnp.einsum(eq, hidden.astype(self.dtype), w.astype(self.dtype), preferred_element_type=_F32)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))


# ------------------------------------------------------------------------------------ layer function

def _position_mask(q_pos, kv_pos):
    """Slots with 0 <= kv_pos <= q_pos; q_pos [B, T], kv_pos [B or 1, S] -> ([B, T, S] bool, gap int32)."""
    kv = kv_pos[:, None, :]
    q = q_pos[:, :, None]
    return (kv >= 0) & (kv <= q), q - kv


def _rope_tables(positions, head_dim, theta):
    """cos/sin [B, T, D] float32 in HF's rotate-half layout."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = positions.astype(_F32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rope(x, cos, sin):
    """Rotate x [B, T, H, D] by the tables [B, T, D] (in float32), back in x's dtype."""
    xf = x.astype(_F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _rms_norm(x, w, eps):
    xf = x.astype(_F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def _make_layer(c: DecoderConfig, dtype, masks, use_window, cos, sin, cache_index, in_place):
    """The per-layer scan body: (x, layer slice) -> (x, (new k, new v))."""
    K, G, D = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    scale = D ** -0.5
    neg = jnp.finfo(_F32).min

    def layer(x, xs):
        p = {k: v.astype(dtype) for k, v in xs["p"].items()}
        B, T, _ = x.shape
        h = _rms_norm(x, p["input_norm"], c.rms_norm_eps)
        q = jnp.einsum("bte,ehd->bthd", h, p["q_proj"])
        k = jnp.einsum("bte,ekd->btkd", h, p["k_proj"])
        v = jnp.einsum("bte,ekd->btkd", h, p["v_proj"])
        if c.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        q = constrain(_rope(q, cos, sin), ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(_rope(k, cos, sin), ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))

        if "k" not in xs:
            sources = [(k, v, "bskd")]
        elif in_place:  # a decode step: this layer's cache as it was, then the new token
            sources = [(xs["k"].astype(dtype), xs["v"].astype(dtype), "bskd"), (k, v, "bskd")]
        else:           # a prefill: this layer's cache with the new tokens written in
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(xs["k"], k.astype(xs["k"].dtype), start).astype(dtype)
            vals = jax.lax.dynamic_update_slice(xs["v"], v.astype(xs["v"].dtype), start).astype(dtype)
            sources = [(keys, vals, "bskd")]
        if "pk" in xs:  # the shared prefix: one batch row broadcast by the einsum, never copied
            sources.append((xs["pk"].astype(dtype), xs["pv"].astype(dtype), "skd"))

        qg = q.reshape(B, T, K, G, D)
        scores = []
        for (kk, _, sub), (ok, gap) in zip(sources, masks):
            s = jnp.einsum(f"btkgd,{sub}->bkgts", qg, kk, preferred_element_type=_F32) * scale
            if use_window:
                ok = ok & (gap < xs["window"])
            scores.append(jnp.where(ok[:, None, None], s, neg))
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dtype)
        out, offset = 0, 0
        for (_, vv, sub), s in zip(sources, scores):
            width = s.shape[-1]
            out = out + jnp.einsum(f"bkgts,{sub}->btkgd", probs[..., offset:offset + width], vv)
            offset += width
        attn = jnp.einsum("bthd,hde->bte", out.reshape(B, T, K * G, D).astype(dtype), p["o_proj"])
        x = constrain(x + attn, _BATCH_LEN_EMBED)

        h = _rms_norm(x, p["post_attn_norm"], c.rms_norm_eps)
        gate = jnp.einsum("bte,em->btm", h, p["gate_proj"])
        up = jnp.einsum("bte,em->btm", h, p["up_proj"])
        mlp = constrain(jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        x = constrain(x + jnp.einsum("btm,me->bte", mlp, p["down_proj"]), _BATCH_LEN_EMBED)
        return x, ((k, v) if "k" in xs else None)

    if c.remat == "full":
        layer = jax.checkpoint(layer, prevent_cse=False)
    elif c.remat == "dots":
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        layer = jax.checkpoint(layer, prevent_cse=False, policy=policy)
    return layer


# ------------------------------------------------------------------------------------ conversion

def decoder_rules(config: DecoderConfig, *, hf_prefix: str = "model.", lm_head_key: str = "lm_head.weight",
                  our_prefix: tuple[str, ...] = ()) -> list[spec.TensorRule]:
    """Exhaustive map from HF Mistral/Qwen2 keys to our parameters (lm_head only when untied)."""
    c = config
    E, H, K, D, M, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    ours = tuple(our_prefix)
    rules = [spec.reshaped(f"{hf_prefix}embed_tokens.weight", ours + ("embed_tokens",), (V, E), (V, E)),
             spec.reshaped(f"{hf_prefix}norm.weight", ours + ("final_norm",), (E,), (E,))]
    for i in range(c.num_layers):
        hf = f"{hf_prefix}layers.{i}."

        def at(name):
            return ours + ("layers", name)

        rules += [
            spec.reshaped(hf + "input_layernorm.weight", at("input_norm"), (E,), (E,), index=i),
            spec.linear(hf + "self_attn.q_proj.weight", at("q_proj"), (H, D), (E,), index=i),
            spec.linear(hf + "self_attn.k_proj.weight", at("k_proj"), (K, D), (E,), index=i),
            spec.linear(hf + "self_attn.v_proj.weight", at("v_proj"), (K, D), (E,), index=i),
            spec.linear(hf + "self_attn.o_proj.weight", at("o_proj"), (E,), (H, D), index=i),
            spec.reshaped(hf + "post_attention_layernorm.weight", at("post_attn_norm"), (E,), (E,), index=i),
            spec.linear(hf + "mlp.gate_proj.weight", at("gate_proj"), (M,), (E,), index=i),
            spec.linear(hf + "mlp.up_proj.weight", at("up_proj"), (M,), (E,), index=i),
            spec.linear(hf + "mlp.down_proj.weight", at("down_proj"), (E,), (M,), index=i),
        ]
        if c.qkv_bias:
            rules += [spec.reshaped(hf + "self_attn.q_proj.bias", at("q_bias"), (H * D,), (H, D), index=i),
                      spec.reshaped(hf + "self_attn.k_proj.bias", at("k_bias"), (K * D,), (K, D), index=i),
                      spec.reshaped(hf + "self_attn.v_proj.bias", at("v_bias"), (K * D,), (K, D), index=i)]
    if not c.tie_word_embeddings:
        rules.append(spec.linear(lm_head_key, ours + ("lm_head",), (V,), (E,)))
    return rules


def checkpoint_spec(config: dict, hf_keys: set[str]) -> spec.CheckpointSpec:
    """A bare MistralForCausalLM / Qwen2ForCausalLM checkpoint (`model.*` + `lm_head.weight`)."""
    cfg = DecoderConfig.from_hf(config)
    hf_keys = set(hf_keys)
    if "model.embed_tokens.weight" in hf_keys:
        hf_prefix = "model."
    elif "embed_tokens.weight" in hf_keys:
        hf_prefix = ""
    else:
        raise spec.ConversionError("decoder checkpoint has no 'model.embed_tokens.weight' tensor")
    lm_head_key = None if cfg.tie_word_embeddings else "lm_head.weight"
    if lm_head_key is not None and lm_head_key not in hf_keys:
        raise spec.ConversionError(f"config has tie_word_embeddings=False but the checkpoint has no "
                                   f"{lm_head_key!r} tensor")

    def make_module(dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        return Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

    rules = decoder_rules(cfg, hf_prefix=hf_prefix, lm_head_key=lm_head_key or "lm_head.weight")
    return spec.CheckpointSpec("decoder", make_module, rules, {"hf_prefix": hf_prefix, "lm_head_key": lm_head_key})
