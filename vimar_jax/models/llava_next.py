"""LLaVA-NeXT (CLIP vision tower + 2-layer projector + anyres packing + Mistral/Qwen2 decoder) in Flax NNX.

Numerically equal to HF `LlavaNextForConditionalGeneration`. HF packs each image's features with Python
loops over a data-dependent number of tiles; here everything in the graph has a static shape:

1. the vision tower runs on all `B * max_patches` patch images (padded patches included);
2. the selected hidden state(s), CLS token included, go through the projector
   -> `features [B * max_patches, 1 + P, E]`;
3. `flat = concat(features.reshape(-1, E), image_newline[None])` and a host-computed `gather_index
   [B, max_img_tokens]` (`vimar_jax.image.feature_gather_index`) picks each image's packed sequence
   (base view, unpadded tiles in grid order, one newline per row; the CLS rows are never picked);
4. the k-th `<image>` token of row b takes the k-th gathered feature of row b (cumsum + gather + where).

Two HF key layouts are read (both with or without `vision_model.` under the vision tower):
`language_model.model.* / language_model.lm_head.weight / vision_tower.* / multi_modal_projector.* /
image_newline` (llava-hf hub checkpoints, transformers-5 `save_pretrained`) and `model.language_model.* /
lm_head.weight / model.vision_tower.* / model.multi_modal_projector.* / model.image_newline`
(the in-memory transformers-5 module, transformers 4.5x saves).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.convert import spec
from vimar_jax.models.clip import _ACTIVATIONS, CLIPVision, CLIPVisionConfig, clip_vision_rules
from vimar_jax.models.decoder import Decoder, DecoderConfig, KVCache, decoder_rules
from vimar_jax.sharding import constrain

F32 = jnp.float32
_STRATEGIES = ("default", "full")

# HF class defaults for fields that llava-hf `text_config`s omit (they rely on the config class).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, sliding_window=4096, hidden_act="silu", tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  hidden_act="silu", tie_word_embeddings=False),
}
# LlavaNextConfig's vision defaults when `vision_config` is absent altogether.
_VISION_DEFAULTS = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                        image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class LlavaNextConfig:
    vision: CLIPVisionConfig
    text: DecoderConfig
    image_grid_pinpoints: tuple[tuple[int, int], ...] = _DEFAULT_PINPOINTS
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576

    def __post_init__(self):
        if self.vision_feature_select_strategy not in _STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: "
                             f"expected one of {_STRATEGIES}")
        if self.vision_feature_select_strategy == "full":
            # HF reshapes each tile's features into a (S/P) x (S/P) grid, which only works without the
            # CLS token; every CLIP tower has one, so HF itself fails on such a checkpoint.
            raise ValueError("vision_feature_select_strategy='full' keeps the CLIP CLS token, which LLaVA-NeXT's "
                             "anyres packing cannot lay out (HF fails on it too); only 'default' is supported")
        if self.projector_hidden_act not in _ACTIVATIONS:
            raise ValueError(f"projector_hidden_act={self.projector_hidden_act!r}: supported are "
                             f"{sorted(_ACTIVATIONS)}")
        layers = self.feature_layers
        L = self.vision.num_layers
        if not layers or any(not -(L + 1) <= k <= L for k in layers):
            raise ValueError(f"vision_feature_layer={self.vision_feature_layer!r}: each entry must index one of "
                             f"the {L + 1} vision hidden states")
        for h, w in self.image_grid_pinpoints:
            if h % self.vision.image_size or w % self.vision.image_size:
                raise ValueError(f"image_grid_pinpoints entry {[h, w]} is not a multiple of the vision "
                                 f"image_size {self.vision.image_size}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} outside the vocabulary "
                             f"(vocab_size={self.text.vocab_size})")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        v = self.vision_feature_layer
        return (v,) if isinstance(v, int) else tuple(v)

    @property
    def vision_feature_size(self) -> int:
        """Width of the projector's input: vision hidden size times the number of selected layers."""
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def max_patches(self) -> int:
        """Most patch images one image can produce: the base view plus the largest pinpoint's tiles."""
        s = self.vision.image_size
        return 1 + max((h // s) * (w // s) for h, w in self.image_grid_pinpoints)

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, remat: str = "none") -> "LlavaNextConfig":
        """From an HF `LlavaNextConfig` dict (`config.json` of a llava_next checkpoint)."""
        if d.get("model_type", "llava_next") != "llava_next":
            raise ValueError(f"model_type={d.get('model_type')!r}: expected 'llava_next'")
        vision_d = d.get("vision_config")
        vision_d = dict(_VISION_DEFAULTS) if vision_d is None else dict(vision_d)
        if vision_d.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"vision_config.model_type={vision_d.get('model_type')!r}: only "
                             f"'clip_vision_model' towers are supported")
        text_d = dict(d.get("text_config") or {})
        text_type = text_d.get("model_type", "llama")
        if text_type not in _TEXT_DEFAULTS:
            raise ValueError(f"text_config.model_type={text_type!r}: supported are {sorted(_TEXT_DEFAULTS)}")
        text_d = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text_d.items()
                                                  if v is not None or k == "sliding_window"}}
        text = DecoderConfig.from_hf(text_d, remat=remat)
        # The LM head belongs to the LLaVA model: HF ties it by the top-level flag.
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
        text = dataclasses.replace(text, tie_word_embeddings=bool(tie))
        layer = d.get("vision_feature_layer", -2)
        if isinstance(layer, (list, tuple)):
            layer = tuple(int(k) for k in layer)
        elif isinstance(layer, (int, np.integer)):
            layer = int(layer)
        else:
            raise ValueError(f"vision_feature_layer={layer!r}: expected an int or a list of ints")
        if "image_token_index" in d or "image_token_id" in d:
            token = d.get("image_token_index", d.get("image_token_id"))
        else:
            token = 32000
        pinpoints = d.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS
        try:
            pinpoints = tuple((int(h), int(w)) for h, w in pinpoints)
        except (TypeError, ValueError):
            raise ValueError(f"image_grid_pinpoints={pinpoints!r}: expected a list of [height, width]") from None
        return cls(
            vision=CLIPVisionConfig.from_hf(vision_d, remat=remat),
            text=text,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            image_token_id=int(token),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)),
            image_seq_length=int(d.get("image_seq_length", 576)),
        )

    def image_config(self):
        """The host-side `vimar_jax.image.ImageConfig` of this model's tiling and token bookkeeping (its pixel
        fields are irrelevant here: pixels come from the processor)."""
        from vimar_jax import image

        S = self.vision.image_size
        return image.ImageConfig(image_size=S, patch_size=self.vision.patch_size, pinpoints=self.image_grid_pinpoints,
                                 strategy=self.vision_feature_select_strategy, has_cls=True,
                                 size=(("shortest_edge", S),), crop_size=(S, S))


# ----------------------------------------------------------------------------------------------- modules

class Dense(nnx.Module):
    """`y = x @ kernel + bias` with kernel [in, out] (HF `nn.Linear` transposed)."""

    def __init__(self, n_in: int, n_out: int, *, axes: tuple[str, str], use_bias: bool, param_dtype,
                 rngs: nnx.Rngs):
        std = n_in ** -0.5
        self.kernel = nnx.Param((std * jax.random.normal(rngs.params(), (n_in, n_out), F32)).astype(param_dtype),
                                axes=axes)
        self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype), axes=(axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Projector(nnx.Module):
    """HF `LlavaNextMultiModalProjector`: linear_1 -> act -> linear_2."""

    def __init__(self, config: LlavaNextConfig, *, param_dtype, rngs: nnx.Rngs):
        E, bias = config.text.hidden_size, config.multimodal_projector_bias
        self.act = config.projector_hidden_act
        self.linear_1 = Dense(config.vision_feature_size, E, axes=("proj", "embed"), use_bias=bias,
                              param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Dense(E, E, axes=("proj", "embed"), use_bias=bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.linear_1(x), ("activation_batch", "activation_length", "activation_embed"))
        return self.linear_2(_ACTIVATIONS[self.act](h))


class LlavaNext(nnx.Module):
    """Vision tower, projector, `image_newline` and the language decoder."""

    def __init__(self, config: LlavaNextConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        E = config.text.hidden_size
        self.vision = CLIPVision(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projector = Projector(config, param_dtype=param_dtype, rngs=rngs)
        self.image_newline = nnx.Param(
            (E ** -0.5 * jax.random.normal(rngs.params(), (E,), F32)).astype(param_dtype), axes=("embed",))
        self.decoder = Decoder(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, Np, C, S, S] -> projected features of every token of every patch image
        [B * Np, 1 + P, E] (CLS included: the gather index skips it under the 'default' strategy)."""
        c = self.config
        v = c.vision
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be [B, max_patches, {v.num_channels}, {v.image_size}, "
                             f"{v.image_size}], got shape {tuple(pixel_values.shape)}")
        x = pixel_values.reshape(-1, *pixel_values.shape[2:])
        h = self.vision.hidden_states(x, c.vision_feature_layer)
        return self.projector(h.astype(self.dtype))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_sizes=None,
              gather_index: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, E] with row b's k-th `<image>` token replaced by its k-th image feature.

        `gather_index [B, max_img_tokens]` comes from `vimar_jax.image.feature_gather_index` (host side); if
        None it is computed here from concrete `image_sizes` (outside jit only). Without `pixel_values`
        (e.g. decode steps) this is the plain text embedding.
        """
        x = self.decoder.embed(input_ids)
        if pixel_values is None:
            return x
        B, T = input_ids.shape
        if pixel_values.shape[0] != B:
            raise ValueError(f"pixel_values has batch {pixel_values.shape[0]}, input_ids has {B}")
        if gather_index is None:
            if image_sizes is None:
                raise ValueError("embed needs gather_index (or concrete image_sizes to compute it)")
            gather_index = self.gather_index(image_sizes, pixel_values.shape[1])
        if gather_index.ndim != 2 or gather_index.shape[0] != B:
            raise ValueError(f"gather_index must be [B={B}, max_img_tokens], got {tuple(gather_index.shape)}")
        feats = self.image_features(pixel_values)
        E = feats.shape[-1]
        flat = jnp.concatenate([feats.reshape(-1, E), self.image_newline[...].astype(feats.dtype)[None]], axis=0)
        is_image = input_ids == self.config.image_token_id
        k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, gather_index.shape[1] - 1)
        src = jnp.take_along_axis(gather_index.astype(jnp.int32), k, axis=1)      # [B, T] rows of `flat`
        img = jnp.take(flat, src, axis=0)
        out = jnp.where(is_image[..., None], img.astype(x.dtype), x)
        return constrain(out, ("activation_batch", "activation_length", "activation_embed"))

    def gather_index(self, image_sizes, num_patches: int) -> jax.Array:
        """Host helper: `feature_gather_index` for concrete `image_sizes [B, 2]` (height, width)."""
        from vimar_jax import image

        index, _ = image.feature_gather_index(np.asarray(image_sizes), int(num_patches), self.config.image_config())
        return jnp.asarray(index, jnp.int32)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_sizes=None,
                 gather_index: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None, cache_index=None,
                 prefix: KVCache | None = None, num_layers: int | None = None) -> tuple[jax.Array, KVCache | None]:
        """Embed (with images) and run the decoder -> (hidden [B, T, E], cache). `positions` default to
        0..T-1; the other arguments are the decoder's (docs/CONTRACTS.md)."""
        x = self.embed(input_ids, pixel_values, image_sizes, gather_index)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        return self.decoder(x, positions=positions, segment_ids=segment_ids, cache=cache, cache_index=cache_index,
                            prefix=prefix, num_layers=num_layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [B, T, V] from the final hidden states."""
        return self.decoder.logits(hidden)


# --------------------------------------------------------------------------------------------- key maps

@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where a LLaVA-NeXT checkpoint keeps its tensors.

    `nested=False`: `language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`,
    `multi_modal_projector.*`, `image_newline` (llava-hf hub; transformers-5 `save_pretrained`).
    `nested=True`: `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`, ... (transformers 4.5x).
    `vision_model`: the CLIP tower's keys sit under `vision_tower.vision_model.` (hub, 4.x) rather than
    directly under `vision_tower.` (transformers 5).
    """
    nested: bool = False
    vision_model: bool = True

    @property
    def root(self) -> str:
        return "model." if self.nested else ""

    @property
    def text_prefix(self) -> str:
        return "model.language_model." if self.nested else "language_model.model."

    @property
    def lm_head_key(self) -> str:
        return "lm_head.weight" if self.nested else "language_model.lm_head.weight"

    @property
    def vision_prefix(self) -> str:
        return f"{self.root}vision_tower." + ("vision_model." if self.vision_model else "")

    @property
    def projector_prefix(self) -> str:
        return f"{self.root}multi_modal_projector."

    @property
    def newline_key(self) -> str:
        return f"{self.root}image_newline"

    @property
    def name(self) -> str:
        return ("model.language_model" if self.nested else "language_model.model") + \
            ("+vision_model" if self.vision_model else "")

    def to_dict(self) -> dict:
        return {"llava_layout": self.name, "nested": self.nested, "vision_model": self.vision_model}


def detect_layout(hf_keys) -> KeyLayout:
    """The `KeyLayout` of a checkpoint from its key set (clear error if it is no LLaVA-NeXT checkpoint)."""
    keys = set(hf_keys)
    if "model.language_model.embed_tokens.weight" in keys:
        nested = True
    elif "language_model.model.embed_tokens.weight" in keys:
        nested = False
    else:
        raise spec.ConversionError("LLaVA-NeXT checkpoint has neither 'language_model.model.embed_tokens.weight' "
                                   "nor 'model.language_model.embed_tokens.weight'")
    root = "model." if nested else ""
    if f"{root}vision_tower.vision_model.embeddings.class_embedding" in keys:
        vision_model = True
    elif f"{root}vision_tower.embeddings.class_embedding" in keys:
        vision_model = False
    else:
        raise spec.ConversionError(f"LLaVA-NeXT checkpoint has no '{root}vision_tower.vision_model.embeddings."
                                   f"class_embedding' (nor '{root}vision_tower.embeddings.class_embedding')")
    return KeyLayout(nested=nested, vision_model=vision_model)


def llava_next_rules(config: LlavaNextConfig, layout: KeyLayout | dict = KeyLayout(), *,
                     our_prefix: tuple[str, ...] = ()) -> list[spec.TensorRule]:
    """Exhaustive map from the HF keys of `layout` onto our `LlavaNext` at `our_prefix`."""
    if isinstance(layout, dict):
        layout = KeyLayout(nested=layout["nested"], vision_model=layout["vision_model"])
    ours = tuple(our_prefix)
    E, Ev = config.text.hidden_size, config.vision_feature_size
    rules = clip_vision_rules(config.vision, hf_prefix=layout.vision_prefix, our_prefix=ours + ("vision",))
    p, o = layout.projector_prefix, ours + ("projector",)
    rules += [spec.linear(f"{p}linear_1.weight", o + ("linear_1", "kernel"), (E,), (Ev,)),
              spec.linear(f"{p}linear_2.weight", o + ("linear_2", "kernel"), (E,), (E,))]
    if config.multimodal_projector_bias:
        rules += [spec.reshaped(f"{p}linear_1.bias", o + ("linear_1", "bias"), (E,), (E,)),
                  spec.reshaped(f"{p}linear_2.bias", o + ("linear_2", "bias"), (E,), (E,))]
    rules.append(spec.reshaped(layout.newline_key, ours + ("image_newline",), (E,), (E,)))
    rules += decoder_rules(config.text, hf_prefix=layout.text_prefix, lm_head_key=layout.lm_head_key,
                           our_prefix=ours + ("decoder",))
    return rules


def checked_layout(config: LlavaNextConfig, hf_keys) -> KeyLayout:
    """`detect_layout`, plus a check that the LM head is present exactly when the config says untied."""
    layout = detect_layout(hf_keys)
    has_head = layout.lm_head_key in hf_keys
    if not config.text.tie_word_embeddings and not has_head:
        raise spec.ConversionError(f"config has tie_word_embeddings=False but the checkpoint has no "
                                   f"{layout.lm_head_key!r} tensor")
    return layout


def checkpoint_spec(config: dict, hf_keys: set[str]) -> spec.CheckpointSpec:
    """A `LlavaNextForConditionalGeneration` checkpoint in either key layout."""
    cfg = LlavaNextConfig.from_hf(config)
    layout = checked_layout(cfg, set(hf_keys))

    def make_module(dtype=F32, param_dtype=F32, rngs: nnx.Rngs | None = None):
        return LlavaNext(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

    return spec.CheckpointSpec("llava_next", make_module, llava_next_rules(cfg, layout), layout.to_dict())
