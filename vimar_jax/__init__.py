"""vimar-jax: ViMaR (value-guided captioning with LLaVA-NeXT) in JAX/Flax.

The top-level loaders are imported lazily, so `import vimar_jax` does not import JAX or Flax:
`load_vlm(dir)` (LLaVA-NeXT), `load_value(dir)` (value model), `load_clip(dir)` (CLIP reward model).
"""

import importlib

_LAZY = {
    "load_vlm": "vimar_jax.vlm",
    "load_value": "vimar_jax.vlm",
    "load_clip": "vimar_jax.clip",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vimar_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
