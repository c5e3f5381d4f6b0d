"""The value model: a LLaVA-NeXT backbone plus a float32 linear head on one decoder layer's hidden state.

`value(state) = h[value_layer, t_end] @ kernel + bias` (SPEC §1): the hidden state of layer `value_layer`
(HF `hidden_states` indexing: -2 = output of the first L - 1 decoder layers, -1 = the final normed state) at
the state's last token. The head is always float32, whatever the backbone's compute dtype.

Three ways to value many sentence states of one image, all equal (tests/test_value.py):
- one state per row (image + sentence), `query_index` = each row's last token;
- packed: `[image prefix, sentence_1, ..., sentence_m]` in one row with `segment_ids` 0 for the prefix and
  k for sentence k (positions of every sentence continue after the prefix), one query per sentence;
- cached: `prefill` the image prefix once (batch 1), then value a batch of sentence suffixes with `prefix=`.

Value checkpoints are HF LLaVA-NeXT directories with two extra tensors `value_head.weight [1, E]`,
`value_head.bias [1]` and `config.json["vimar_value"] = {"value_layer": -2, "state": "sentence", ...}`;
HF `LlavaNextForConditionalGeneration` still loads them (the extra keys are ignored).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vimar_jax.convert import spec
from vimar_jax.data.packing import STATES
from vimar_jax.models.decoder import KVCache
from vimar_jax.models.llava_next import F32, LlavaNext, LlavaNextConfig, checked_layout, llava_next_rules


@dataclasses.dataclass(frozen=True)
class ValueConfig:
    llava: LlavaNextConfig
    value_layer: int = -2
    state: str = "sentence"
    # Any other `vimar_value` entries (value statistics, template, ...), kept as read.
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        L = self.llava.text.num_layers
        if not isinstance(self.value_layer, int) or not -(L + 1) <= self.value_layer <= L:
            raise ValueError(f"vimar_value.value_layer={self.value_layer!r}: expected an int in "
                             f"[{-(L + 1)}, {L}] (HF hidden_states index for {L} decoder layers)")
        if self.state not in STATES:
            raise ValueError(f"vimar_value.state={self.state!r}: expected one of {STATES}")

    @property
    def num_layers(self) -> int | None:
        """Decoder layers to run: k for HF `hidden_states[k]` (k < L); None (all + final norm) for k = L."""
        L = self.llava.text.num_layers
        k = self.value_layer % (L + 1)
        return None if k == L else k

    @property
    def cache_layers(self) -> int:
        """Layers a prefix cache for this model needs."""
        n = self.num_layers
        return self.llava.text.num_layers if n is None else n

    @classmethod
    def from_hf(cls, d: dict[str, Any], **kw) -> "ValueConfig":
        """From a value checkpoint's `config.json` (a llava_next config with a `vimar_value` entry)."""
        if "vimar_value" not in d or not isinstance(d["vimar_value"], dict):
            raise ValueError("config.json has no 'vimar_value' dict: not a value checkpoint")
        v = dict(d["vimar_value"])
        layer = v.pop("value_layer", -2)
        state = v.pop("state", "sentence")
        return cls(LlavaNextConfig.from_hf(d, **kw), value_layer=layer, state=state, extra=v)

    def hf_entry(self) -> dict:
        """The `config.json["vimar_value"]` dict of this config."""
        return {"value_layer": self.value_layer, "state": self.state, **self.extra}


class ValueHead(nnx.Module):
    """kernel [E, 1], bias [1]; float32 parameters and arithmetic."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, init_std: float = 1e-3):
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (hidden_size, 1), F32),
                                axes=("embed", "value"))
        self.bias = nnx.Param(jnp.zeros((1,), F32), axes=("value",))

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., E] -> [...] float32."""
        out = jnp.einsum("...e,eo->...o", h.astype(F32), self.kernel[...].astype(F32),
                         precision=jax.lax.Precision.HIGHEST)
        return (out + self.bias[...].astype(F32))[..., 0]


class ValueModel(nnx.Module):
    def __init__(self, config: ValueConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs,
                 backbone: LlavaNext | None = None):
        self.config, self.dtype = config, dtype
        self.backbone = backbone if backbone is not None else LlavaNext(config.llava, dtype=dtype,
                                                                        param_dtype=param_dtype, rngs=rngs)
        self.value_head = ValueHead(config.llava.text.hidden_size, rngs=rngs)

    @classmethod
    def from_policy(cls, policy: LlavaNext, value_layer: int = -2, rng: int | jax.Array = 0, *,
                    state: str = "sentence") -> "ValueModel":
        """A value model whose backbone is a copy of `policy` (arrays shared until updated) + a fresh head."""
        config = ValueConfig(policy.config, value_layer=value_layer, state=state)
        rngs = nnx.Rngs(params=rng)
        return cls(config, dtype=policy.dtype, rngs=rngs, backbone=nnx.clone(policy))

    def hidden(self, input_ids, pixel_values=None, image_sizes=None, gather_index=None, positions=None,
               segment_ids=None, cache: KVCache | None = None, cache_index=None,
               prefix: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """The `value_layer` hidden states [B, T, E] (and the updated cache, if any)."""
        return self.backbone(input_ids, pixel_values, image_sizes, gather_index, positions, segment_ids,
                             cache=cache, cache_index=cache_index, prefix=prefix,
                             num_layers=self.config.num_layers)

    def values(self, input_ids, pixel_values=None, image_sizes=None, gather_index=None, positions=None,
               segment_ids=None, cache: KVCache | None = None, cache_index=None, prefix: KVCache | None = None,
               *, query_index: jax.Array) -> jax.Array:
        """Values [B, Q] float32 at token indices `query_index [B, Q]` (the last token of each state)."""
        h, _ = self.hidden(input_ids, pixel_values, image_sizes, gather_index, positions, segment_ids,
                           cache=cache, cache_index=cache_index, prefix=prefix)
        if query_index.ndim != 2 or query_index.shape[0] != h.shape[0]:
            raise ValueError(f"query_index must be [B={h.shape[0]}, Q], got shape {tuple(query_index.shape)}")
        picked = jnp.take_along_axis(h, query_index.astype(jnp.int32)[..., None], axis=1)
        return self.value_head(picked)

    def prefill(self, input_ids, pixel_values=None, image_sizes=None, gather_index=None, positions=None, *,
                max_len: int | None = None) -> KVCache:
        """KV cache (only the layers the value needs) of a prompt, e.g. an image prefix shared by states."""
        B, T = input_ids.shape
        max_len = T if max_len is None else max_len
        cache = KVCache.init(self.config.llava.text, B, max_len, self.dtype, num_layers=self.config.cache_layers)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # Run exactly `cache_layers` layers (the final norm of value_layer=-1 does not touch the cache).
        _, cache = self.backbone(input_ids, pixel_values, image_sizes, gather_index, positions, cache=cache,
                                 cache_index=0, num_layers=self.config.cache_layers)
        return cache


def value_head_rules(config: ValueConfig) -> list[spec.TensorRule]:
    E = config.llava.text.hidden_size
    return [spec.linear("value_head.weight", ("value_head", "kernel"), (1,), (E,)),
            spec.reshaped("value_head.bias", ("value_head", "bias"), (1,), (1,))]


def value_rules(config: ValueConfig, layout) -> list[spec.TensorRule]:
    """The LLaVA-NeXT rules of `layout` under `backbone` plus the two head tensors."""
    return llava_next_rules(config.llava, layout, our_prefix=("backbone",)) + value_head_rules(config)


def checkpoint_spec(config: dict, hf_keys: set[str]) -> spec.CheckpointSpec:
    """A value checkpoint: LLaVA-NeXT keys (either layout) + `value_head.weight`, `value_head.bias`."""
    cfg = ValueConfig.from_hf(config)
    layout = checked_layout(cfg.llava, set(hf_keys))

    def make_module(dtype=F32, param_dtype=F32, rngs: nnx.Rngs | None = None):
        return ValueModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

    return spec.CheckpointSpec("value", make_module, value_rules(cfg, layout), layout.to_dict())
