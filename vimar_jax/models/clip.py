"""CLIP (vision tower, text tower, contrastive model) in Flax NNX, numerically equal to HF `modeling_clip`.

Parameter layout (leading `L` = stacked `layers` axis, run with `jax.lax.scan`):
  vision: patch_embedding [P, P, C, E] (a dense over each P x P x C patch, equal to HF's stride-P conv
          without bias), class_embedding [E], position_embedding [1 + (S/P)^2, E], pre_layrnorm.{scale,bias},
          layers.*, post_layernorm.{scale,bias}
  text:   token_embedding [V, E], position_embedding [max_pos, E], layers.*, final_layer_norm.{scale,bias}
  layers: ln1_scale/ln1_bias [L, E], q_proj/k_proj/v_proj [L, E, H, D], q_bias/k_bias/v_bias [L, H, D],
          out_proj [L, H, D, E], out_bias [L, E], ln2_scale/ln2_bias [L, E], fc1 [L, E, M], fc1_bias [L, M],
          fc2 [L, M, E], fc2_bias [L, E]
  model:  vision, text, visual_projection [Ev, Pr], text_projection [Et, Pr] (no bias), logit_scale []

Configs read HF `config.json` dicts; a field missing from the dict takes HF's class default (older
checkpoints and LLaVA `vision_config`s omit defaults such as `hidden_act`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.convert import spec
from vimar_jax.sharding import constrain

F32 = jnp.float32
BTE = ("activation_batch", "activation_length", "activation_embed")
BTHD = ("activation_batch", "activation_length", "activation_heads", None)
BTM = ("activation_batch", "activation_length", "activation_mlp")

_REMAT = ("none", "full", "dots")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _check_act(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: unsupported hidden_act {name!r} (supported: {sorted(_ACTIVATIONS)})")
    return name


def _check_remat(remat: str) -> str:
    if remat not in _REMAT:
        raise ValueError(f"remat must be one of {_REMAT}, got {remat!r}")
    return remat


def _int_field(d: dict, key: str, default: Any, where: str) -> int:
    v = d.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{where}: only square {key} is supported, got {v!r}")
        v = v[0]
    if v is None or int(v) != v:
        raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
    return int(v)


# ----------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    remat: str = "none"

    def __post_init__(self):
        _check_act(self.hidden_act, "vision_config")
        _check_remat(self.remat)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + 1

    @classmethod
    def from_hf(cls, d: dict, *, remat: str = "none") -> "CLIPVisionConfig":
        w = "vision_config"
        dflt = cls()
        return cls(
            hidden_size=_int_field(d, "hidden_size", dflt.hidden_size, w),
            intermediate_size=_int_field(d, "intermediate_size", dflt.intermediate_size, w),
            num_layers=_int_field(d, "num_hidden_layers", dflt.num_layers, w),
            num_heads=_int_field(d, "num_attention_heads", dflt.num_heads, w),
            num_channels=_int_field(d, "num_channels", dflt.num_channels, w),
            image_size=_int_field(d, "image_size", dflt.image_size, w),
            patch_size=_int_field(d, "patch_size", dflt.patch_size, w),
            hidden_act=d.get("hidden_act", dflt.hidden_act),
            layer_norm_eps=float(d.get("layer_norm_eps", dflt.layer_norm_eps)),
            projection_dim=_int_field(d, "projection_dim", dflt.projection_dim, w),
            remat=remat,
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    remat: str = "none"

    def __post_init__(self):
        _check_act(self.hidden_act, "text_config")
        _check_remat(self.remat)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text_config: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def legacy_pooling(self) -> bool:
        """HF rule: `eos_token_id == 2` (old configs) pools at argmax(input_ids), else at the first EOS."""
        return self.eos_token_id == 2

    @classmethod
    def from_hf(cls, d: dict, *, remat: str = "none") -> "CLIPTextConfig":
        w = "text_config"
        dflt = cls()
        eos = d.get("eos_token_id", dflt.eos_token_id)
        if not isinstance(eos, int):
            raise ValueError(f"text_config: eos_token_id must be one integer, got {eos!r}")
        return cls(
            vocab_size=_int_field(d, "vocab_size", dflt.vocab_size, w),
            hidden_size=_int_field(d, "hidden_size", dflt.hidden_size, w),
            intermediate_size=_int_field(d, "intermediate_size", dflt.intermediate_size, w),
            num_layers=_int_field(d, "num_hidden_layers", dflt.num_layers, w),
            num_heads=_int_field(d, "num_attention_heads", dflt.num_heads, w),
            max_position_embeddings=_int_field(d, "max_position_embeddings", dflt.max_position_embeddings, w),
            hidden_act=d.get("hidden_act", dflt.hidden_act),
            layer_norm_eps=float(d.get("layer_norm_eps", dflt.layer_norm_eps)),
            projection_dim=_int_field(d, "projection_dim", dflt.projection_dim, w),
            pad_token_id=d.get("pad_token_id", dflt.pad_token_id),
            bos_token_id=d.get("bos_token_id", dflt.bos_token_id),
            eos_token_id=eos,
            remat=remat,
        )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, d: dict, *, remat: str = "none") -> "CLIPConfig":
        """From an HF `CLIPConfig` dict (`model_type == "clip"`, with `text_config` and `vision_config`)."""
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"CLIPConfig.from_hf: model_type is {d.get('model_type')!r}, expected 'clip'")
        return cls(
            text=CLIPTextConfig.from_hf(d.get("text_config") or {}, remat=remat),
            vision=CLIPVisionConfig.from_hf(d.get("vision_config") or {}, remat=remat),
            projection_dim=_int_field(d, "projection_dim", 512, "clip config"),
            logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)),
        )


# ------------------------------------------------------------------------------------------- functions


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with float32 statistics; output in the input's dtype."""
    xf = x.astype(F32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(F32) + bias.astype(F32)
    return y.astype(x.dtype)


def _encoder_layer(p: dict, x: jax.Array, allowed: jax.Array | None, *, eps: float, act: str,
                   dtype) -> jax.Array:
    """One pre-norm CLIP encoder layer. `allowed` [B|1, T, T] bool (None = full attention)."""
    c = lambda a: a.astype(dtype)
    h = _layer_norm(x, p["ln1_scale"], p["ln1_bias"], eps)
    q = constrain(jnp.einsum("bte,ehd->bthd", h, c(p["q_proj"])) + c(p["q_bias"]), BTHD)
    k = constrain(jnp.einsum("bte,ehd->bthd", h, c(p["k_proj"])) + c(p["k_bias"]), BTHD)
    v = constrain(jnp.einsum("bte,ehd->bthd", h, c(p["v_proj"])) + c(p["v_bias"]), BTHD)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=F32) * scale
    if allowed is not None:
        logits = jnp.where(allowed[:, None], logits, jnp.finfo(F32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    o = jnp.einsum("bhts,bshd->bthd", probs, v)
    x = x + jnp.einsum("bthd,hde->bte", o, c(p["out_proj"])) + c(p["out_bias"])
    x = constrain(x, BTE)
    h = _layer_norm(x, p["ln2_scale"], p["ln2_bias"], eps)
    h = constrain(jnp.einsum("bte,em->btm", h, c(p["fc1"])) + c(p["fc1_bias"]), BTM)
    h = _ACTIVATIONS[act](h)
    x = x + jnp.einsum("btm,me->bte", h, c(p["fc2"])) + c(p["fc2_bias"])
    return constrain(x, BTE)


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, std: float | None = 0.02, fill: float = 0.0):
    if std is None:
        value = jnp.full(shape, fill, param_dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(param_dtype)
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """LayerNorm parameters `scale`, `bias` [E]."""

    def __init__(self, size: int, eps: float, *, param_dtype=F32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((size,), param_dtype), axes=("norm",))

    def __call__(self, x):
        return _layer_norm(x, self.scale[...], self.bias[...], self.eps)


_LAYER_PARAMS = ("ln1_scale", "ln1_bias", "q_proj", "q_bias", "k_proj", "k_bias", "v_proj", "v_bias",
                 "out_proj", "out_bias", "ln2_scale", "ln2_bias", "fc1", "fc1_bias", "fc2", "fc2_bias")


class EncoderLayers(nnx.Module):
    """The stacked encoder layers (leading `layers` axis), run by `lax.scan` over `_encoder_layer`."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, *, dtype=F32, param_dtype=F32,
                 rngs: nnx.Rngs):
        L, E, H, D, M = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        mk = lambda shape, axes, **kw: _param(rngs, (L, *shape), ("layers", *axes), param_dtype, **kw)
        self.ln1_scale = mk((E,), ("norm",), std=None, fill=1.0)
        self.ln1_bias = mk((E,), ("norm",), std=None)
        self.q_proj = mk((E, H, D), ("embed", "heads", "head_dim"))
        self.q_bias = mk((H, D), ("heads", "head_dim"), std=None)
        self.k_proj = mk((E, H, D), ("embed", "heads", "head_dim"))
        self.k_bias = mk((H, D), ("heads", "head_dim"), std=None)
        self.v_proj = mk((E, H, D), ("embed", "heads", "head_dim"))
        self.v_bias = mk((H, D), ("heads", "head_dim"), std=None)
        self.out_proj = mk((H, D, E), ("heads", "head_dim", "embed"))
        self.out_bias = mk((E,), ("embed",), std=None)
        self.ln2_scale = mk((E,), ("norm",), std=None, fill=1.0)
        self.ln2_bias = mk((E,), ("norm",), std=None)
        self.fc1 = mk((E, M), ("embed", "mlp"))
        self.fc1_bias = mk((M,), ("mlp",), std=None)
        self.fc2 = mk((M, E), ("mlp", "embed"))
        self.fc2_bias = mk((E,), ("embed",), std=None)

    def __call__(self, x: jax.Array, *, start: int = 0, stop: int | None = None,
                 allowed: jax.Array | None = None) -> jax.Array:
        """Run layers [start, stop) (static ints) on x [B, T, E]."""
        stop = self.cfg.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.cfg.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) outside 0..{self.cfg.num_layers}")
        if start == stop:
            return x
        params = {name: getattr(self, name)[start:stop] for name in _LAYER_PARAMS}

        def body(h, p):
            return _encoder_layer(p, h, allowed, eps=self.cfg.layer_norm_eps, act=self.cfg.hidden_act,
                                  dtype=self.dtype), None

        if self.cfg.remat == "full":
            body = jax.checkpoint(body)
        elif self.cfg.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.checkpoint_dots)
        x, _ = jax.lax.scan(body, x, params)
        return x


# --------------------------------------------------------------------------------------------- modules


def hidden_state_index(k: int, num_layers: int) -> int:
    """HF `hidden_states[k]` of a tower of `num_layers` layers as a count of layers run (0 = the embeddings;
    negative k from the end)."""
    L = num_layers
    if not -(L + 1) <= k <= L:
        raise ValueError(f"hidden_states layer {k} out of range for {L} layers (valid: {-(L + 1)}..{L})")
    return k % (L + 1)


class CLIPVision(nnx.Module):
    """HF `CLIPVisionTransformer`: patch dense + CLS + positions, pre-norm, encoder, post-norm on CLS."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs):
        c = config
        self.config, self.dtype = c, dtype
        E, P = c.hidden_size, c.patch_size
        self.patch_embedding = _param(rngs, (P, P, c.num_channels, E), ("patch", "patch", "patch", "embed"),
                                      param_dtype)
        self.class_embedding = _param(rngs, (E,), ("embed",), param_dtype)
        self.position_embedding = _param(rngs, (c.num_positions, E), ("pos", "embed"), param_dtype)
        self.pre_layrnorm = Norm(E, c.layer_norm_eps, param_dtype=param_dtype)
        self.layers = EncoderLayers(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = Norm(E, c.layer_norm_eps, param_dtype=param_dtype)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, C, H, W] -> pre-normed embeddings [N, 1 + P, E] (HF `hidden_states[0]`)."""
        c = self.config
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"CLIPVision expects pixel_values [N, {c.num_channels}, {c.image_size}, "
                             f"{c.image_size}] (NCHW), got shape {tuple(pixel_values.shape)}")
        n, g, P = pixel_values.shape[0], c.grid, c.patch_size
        x = pixel_values.astype(self.dtype).reshape(n, c.num_channels, g, P, g, P)
        patches = jnp.einsum("ncipjq,pqce->nije", x, self.patch_embedding[...].astype(self.dtype))
        patches = patches.reshape(n, g * g, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(self.dtype)
        return constrain(self.pre_layrnorm(constrain(x, BTE)), BTE)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (last_hidden [N, 1+P, E] = output of `num_layers` layers (all if None), pooled [N, E])."""
        x = self.layers(self.embed(pixel_values), stop=num_layers)
        return x, self.post_layernorm(x[:, 0])

    def _layer_index(self, k: int) -> int:
        return hidden_state_index(k, self.config.num_layers)

    def hidden_states(self, pixel_values: jax.Array, layers: int | tuple[int, ...]) -> jax.Array:
        """HF `hidden_states[k]` ([N, 1+P, E]); for a tuple of k, those concatenated on E (as HF LLaVA).

        k indexes the L + 1 states (0 = embeddings after `pre_layrnorm`; negative from the end, -2 = output of
        L - 1 layers). Only as many layers as the deepest requested state are run.
        """
        single = isinstance(layers, (int, np.integer))
        ks = [self._layer_index(int(k)) for k in ((layers,) if single else tuple(layers))]
        if not ks:
            raise ValueError("hidden_states: empty tuple of layers")
        x = self.embed(pixel_values)
        states, done = {0: x}, 0
        for k in sorted(set(ks)):
            if k > done:
                x = self.layers(x, start=done, stop=k)
                states[k], done = x, k
        return states[ks[0]] if single else jnp.concatenate([states[k] for k in ks], axis=-1)


class CLIPText(nnx.Module):
    """HF `CLIPTextTransformer`: token + position embeddings, causal + padding mask, final norm, EOS pooling."""

    def __init__(self, config: CLIPTextConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs):
        c = config
        self.config, self.dtype = c, dtype
        self.token_embedding = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), param_dtype)
        self.position_embedding = _param(rngs, (c.max_position_embeddings, c.hidden_size), ("pos", "embed"),
                                         param_dtype)
        self.layers = EncoderLayers(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = Norm(c.hidden_size, c.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """input_ids, attention_mask [N, T] (1 = token, 0 = padding) -> (last_hidden [N, T, E], pooled [N, E])."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPText expects input_ids [N, T], got shape {tuple(input_ids.shape)}")
        n, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"CLIPText: sequence length {t} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}; truncate when tokenising")
        if attention_mask is not None and tuple(attention_mask.shape) != (n, t):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(n, t)}")
        x = self.token_embedding[...][input_ids].astype(self.dtype)
        x = constrain(x + self.position_embedding[...][:t].astype(self.dtype), BTE)
        pos = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
        allowed = (jax.lax.broadcasted_iota(jnp.int32, (t, t), 1) <= pos)[None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, :] > 0)
        x = self.final_layer_norm(self.layers(x, allowed=allowed))
        ids = input_ids.astype(jnp.int32)
        eos_at = jnp.argmax(ids if c.legacy_pooling else (ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x, x[jnp.arange(n), eos_at]


def _l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(F32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
    """HF `CLIPModel`: both towers, bias-free projections, `logit_scale` (kept for round trips)."""

    def __init__(self, config: CLIPConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        self.vision = CLIPVision(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text = CLIPText(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        pd = config.projection_dim
        self.visual_projection = _param(rngs, (config.vision.hidden_size, pd), ("embed", "proj"), param_dtype)
        self.text_projection = _param(rngs, (config.text.hidden_size, pd), ("embed", "proj"), param_dtype)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype), axes=())

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """[N, C, S, S] -> L2-normalised projected image embeddings [N, projection_dim] float32."""
        _, pooled = self.vision(pixel_values)
        return _l2_normalise(pooled @ self.visual_projection[...].astype(self.dtype))

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[N, T] -> L2-normalised projected text embeddings [N, projection_dim] float32."""
        _, pooled = self.text(input_ids, attention_mask)
        return _l2_normalise(pooled @ self.text_projection[...].astype(self.dtype))


def cosine_similarity(image_embeds: jax.Array, text_embeds: jax.Array, *, matrix: bool = False) -> jax.Array:
    """Cosine of L2-normalised embeddings: per pair [N] (default), or all pairs [N_img, N_txt] (no logit scale)."""
    if matrix:
        return image_embeds @ text_embeds.T
    return jnp.sum(image_embeds * text_embeds, axis=-1)


# ----------------------------------------------------------------------------------------------- rules


def _encoder_rules(cfg, hf_prefix: str, our: spec.Path) -> list[spec.TensorRule]:
    E, H, D, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    lp = our + ("layers",)
    rules = []
    for i in range(cfg.num_layers):
        k = f"{hf_prefix}encoder.layers.{i}."
        for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            rules.append(spec.linear(f"{k}self_attn.{hf}.weight", lp + (f"{ours}_proj",), (H, D), (E,), i))
            rules.append(spec.reshaped(f"{k}self_attn.{hf}.bias", lp + (f"{ours}_bias",), (E,), (H, D), i))
        rules += [
            spec.linear(f"{k}self_attn.out_proj.weight", lp + ("out_proj",), (E,), (H, D), i),
            spec.reshaped(f"{k}self_attn.out_proj.bias", lp + ("out_bias",), (E,), (E,), i),
            spec.reshaped(f"{k}layer_norm1.weight", lp + ("ln1_scale",), (E,), (E,), i),
            spec.reshaped(f"{k}layer_norm1.bias", lp + ("ln1_bias",), (E,), (E,), i),
            spec.reshaped(f"{k}layer_norm2.weight", lp + ("ln2_scale",), (E,), (E,), i),
            spec.reshaped(f"{k}layer_norm2.bias", lp + ("ln2_bias",), (E,), (E,), i),
            spec.linear(f"{k}mlp.fc1.weight", lp + ("fc1",), (M,), (E,), i),
            spec.reshaped(f"{k}mlp.fc1.bias", lp + ("fc1_bias",), (M,), (M,), i),
            spec.linear(f"{k}mlp.fc2.weight", lp + ("fc2",), (E,), (M,), i),
            spec.reshaped(f"{k}mlp.fc2.bias", lp + ("fc2_bias",), (E,), (E,), i),
        ]
    return rules


def _norm_rules(hf_key: str, our: spec.Path, size: int) -> list[spec.TensorRule]:
    return [spec.reshaped(f"{hf_key}.weight", our + ("scale",), (size,), (size,)),
            spec.reshaped(f"{hf_key}.bias", our + ("bias",), (size,), (size,))]


def clip_vision_rules(cfg: CLIPVisionConfig, *, hf_prefix: str, our_prefix: spec.Path) -> list[spec.TensorRule]:
    """Rules for an HF CLIP vision transformer whose keys start with `hf_prefix` (e.g. `"vision_model."`,
    `"vision_tower.vision_model."`), onto our `CLIPVision` at `our_prefix`. Includes `post_layernorm`."""
    p, o = hf_prefix, tuple(our_prefix)
    E, P, C = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    patch = spec.TensorRule(
        f"{p}embeddings.patch_embedding.weight", o + ("patch_embedding",), (E, C, P, P), None,
        lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),   # [E, C, P, P] -> [P, P, C, E]
        lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))   # [P, P, C, E] -> [E, C, P, P]
    return [
        patch,
        spec.reshaped(f"{p}embeddings.class_embedding", o + ("class_embedding",), (E,), (E,)),
        spec.reshaped(f"{p}embeddings.position_embedding.weight", o + ("position_embedding",),
                      (cfg.num_positions, E), (cfg.num_positions, E)),
        *_norm_rules(f"{p}pre_layrnorm", o + ("pre_layrnorm",), E),
        *_encoder_rules(cfg, p, o),
        *_norm_rules(f"{p}post_layernorm", o + ("post_layernorm",), E),
    ]


def clip_text_rules(cfg: CLIPTextConfig, *, hf_prefix: str, our_prefix: spec.Path) -> list[spec.TensorRule]:
    """Rules for an HF CLIP text transformer (keys `hf_prefix + "embeddings..."`) onto our `CLIPText`."""
    p, o = hf_prefix, tuple(our_prefix)
    E = cfg.hidden_size
    return [
        spec.reshaped(f"{p}embeddings.token_embedding.weight", o + ("token_embedding",),
                      (cfg.vocab_size, E), (cfg.vocab_size, E)),
        spec.reshaped(f"{p}embeddings.position_embedding.weight", o + ("position_embedding",),
                      (cfg.max_position_embeddings, E), (cfg.max_position_embeddings, E)),
        *_encoder_rules(cfg, p, o),
        *_norm_rules(f"{p}final_layer_norm", o + ("final_layer_norm",), E),
    ]


def clip_rules(cfg: CLIPConfig, *, hf_prefix: str = "", our_prefix: spec.Path = ()) -> list[spec.TensorRule]:
    """Every tensor of an HF `CLIPModel` (`text_model.*`, `vision_model.*`, projections, `logit_scale`)."""
    o = tuple(our_prefix)
    pd = cfg.projection_dim
    return [
        *clip_vision_rules(cfg.vision, hf_prefix=f"{hf_prefix}vision_model.", our_prefix=o + ("vision",)),
        *clip_text_rules(cfg.text, hf_prefix=f"{hf_prefix}text_model.", our_prefix=o + ("text",)),
        spec.linear(f"{hf_prefix}visual_projection.weight", o + ("visual_projection",), (pd,),
                    (cfg.vision.hidden_size,)),
        spec.linear(f"{hf_prefix}text_projection.weight", o + ("text_projection",), (pd,),
                    (cfg.text.hidden_size,)),
        # A scalar: not `spec.reshaped`, whose `np.ascontiguousarray` turns 0-d arrays into shape (1,).
        spec.TensorRule(f"{hf_prefix}logit_scale", o + ("logit_scale",), (), None,
                        lambda x: np.array(x).reshape(()), lambda x: np.array(x).reshape(())),
    ]


# Non-parameter buffers that checkpoints saved by older transformers contain (arange position ids).
_BUFFER_SUFFIXES = ("embeddings.position_ids",)
_ANCHOR = "text_model.embeddings.token_embedding.weight"


def checkpoint_spec(config: dict, hf_keys: set[str]) -> spec.CheckpointSpec:
    """CheckpointSpec (kind "clip") for an HF `CLIPModel` checkpoint.

    The key prefix in front of `text_model.`/`vision_model.` is detected from `hf_keys`. `layout` holds
    `hf_prefix` and `buffer_keys`: the `*.embeddings.position_ids` buffers (int64 `arange` [1, n]) that older
    checkpoints carry; they map onto no parameter and are rebuilt when writing the HF layout back. Any other
    key not covered by the rules, or a rule key missing from the checkpoint, is a `ConversionError`.
    """
    cfg = CLIPConfig.from_hf(config)
    anchors = [k for k in hf_keys if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise spec.ConversionError(f"CLIP checkpoint: expected one key ending in {_ANCHOR!r}, found "
                                   f"{sorted(anchors) or 'none'}")
    prefix = anchors[0][: -len(_ANCHOR)]
    rules = clip_rules(cfg, hf_prefix=prefix)
    covered = {r.hf_key for r in rules}
    missing = sorted(covered - set(hf_keys))
    if missing:
        raise spec.ConversionError(f"CLIP checkpoint lacks tensor(s) {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''}")
    extra = set(hf_keys) - covered
    buffers = sorted(k for k in extra if k.endswith(_BUFFER_SUFFIXES))
    unknown = sorted(extra - set(buffers))
    if unknown:
        raise spec.ConversionError(f"CLIP checkpoint has tensor(s) no rule maps: {unknown[:5]}"
                                   f"{' ...' if len(unknown) > 5 else ''}")

    def make_module(*, dtype=F32, param_dtype=F32, rngs: nnx.Rngs | None = None):
        return CLIPModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0))

    return spec.CheckpointSpec(kind="clip", make_module=make_module, rules=rules,
                               layout={"hf_prefix": prefix, "buffer_keys": buffers})
