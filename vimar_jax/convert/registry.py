"""Which model family reads a checkpoint: `spec_for(config, hf_keys)` dispatches on `config["model_type"]`.

Each family is a module with `checkpoint_spec(config: dict, hf_keys: set[str]) -> CheckpointSpec`,
imported only when needed. A `"vimar_value"` entry in the config makes any LLaVA-NeXT config a value model.
"""

from __future__ import annotations

import importlib
from typing import Callable

from vimar_jax.convert.spec import CheckpointSpec, ConversionError

SpecFn = Callable[[dict, set], CheckpointSpec]

# kind -> module holding `checkpoint_spec`
FAMILIES: dict[str, str] = {
    "decoder": "vimar_jax.models.decoder",
    "clip": "vimar_jax.models.clip",
    "llava_next": "vimar_jax.models.llava_next",
    "value": "vimar_jax.models.value",
}
# HF model_type -> kind
MODEL_TYPES: dict[str, str] = {
    "mistral": "decoder",
    "qwen2": "decoder",
    "clip": "clip",
    "llava_next": "llava_next",
}
_EXTRA: dict[str, SpecFn] = {}


def register(kind: str, spec_fn: SpecFn, model_types: tuple[str, ...] = ()) -> None:
    """Add a family (e.g. a test-only toy) given directly as a `checkpoint_spec` function."""
    _EXTRA[kind] = spec_fn
    for t in model_types:
        MODEL_TYPES[t] = kind


def unregister(kind: str) -> None:
    _EXTRA.pop(kind, None)
    for t in [t for t, k in MODEL_TYPES.items() if k == kind]:
        del MODEL_TYPES[t]


def kind_of(config: dict) -> str:
    if "vimar_value" in config:
        return "value"
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json model_type {model_type!r} is not supported "
                              f"(known: {', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[model_type]


def spec_for(config: dict, hf_keys: set[str]) -> CheckpointSpec:
    """The CheckpointSpec of the family that `config` names, for a checkpoint holding `hf_keys`."""
    kind = kind_of(config)
    if kind in _EXTRA:
        fn = _EXTRA[kind]
    else:
        try:
            module = importlib.import_module(FAMILIES[kind])
        except ModuleNotFoundError as e:
            if e.name != FAMILIES[kind]:
                raise
            raise ConversionError(f"model family {kind!r} ({FAMILIES[kind]}) is not available") from None
        fn = getattr(module, "checkpoint_spec", None)
        if fn is None:
            raise ConversionError(f"{FAMILIES[kind]} has no checkpoint_spec")
    spec = fn(config, set(hf_keys))
    if spec.kind != kind:
        raise ConversionError(f"{kind!r} family returned a spec of kind {spec.kind!r}")
    return spec
