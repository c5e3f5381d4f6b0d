"""The contract between model modules and the converter: one `TensorRule` per Hugging Face tensor.

Every model module exposes a function returning the exhaustive list of rules that map its Hugging Face
tensors onto its own parameters, e.g. `decoder_rules(config, hf_prefix=..., our_prefix=...)`. A rule says
which HF key feeds which of our parameters (optionally one slice along the stacked `layers` axis) and how
the array is transformed each way. The converter (`vimar_jax.convert.io`) streams tensors through these
rules; tests use the in-memory helpers below.

Paths are tuples of attribute names in the NNX module tree, e.g. ``("decoder", "layers", "q_proj")``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

Path = tuple[str, ...]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_key: str
    path: Path
    hf_shape: tuple[int, ...]
    # Slice of a stacked parameter along axis 0 (the `layers` axis), or None for the whole parameter.
    index: int | None = None
    to_ours: Callable[[np.ndarray], np.ndarray] = _identity
    to_hf: Callable[[np.ndarray], np.ndarray] = _identity


class ConversionError(ValueError):
    """A checkpoint does not match the model: the message names the key, file or shape at fault."""


def linear(hf_key: str, path: Path, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
           index: int | None = None) -> TensorRule:
    """A torch `Linear.weight` [prod(out), prod(in)] stored by us as a kernel [*in_shape, *out_shape]."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))

    def to_ours(w):
        return np.ascontiguousarray(w.T.reshape(*in_shape, *out_shape))

    def to_hf(k):
        return np.ascontiguousarray(k.reshape(n_in, n_out).T)

    return TensorRule(hf_key, path, (n_out, n_in), index, to_ours, to_hf)


def reshaped(hf_key: str, path: Path, hf_shape: tuple[int, ...], our_shape: tuple[int, ...],
             index: int | None = None) -> TensorRule:
    """A tensor that only changes shape (biases split into heads, scalars, ...)."""
    # np.array(...) copies into a contiguous array; np.ascontiguousarray would turn a 0-d array into 1-d.
    return TensorRule(hf_key, path, tuple(hf_shape), index,
                      lambda x: np.array(x).reshape(our_shape),
                      lambda x: np.array(x).reshape(hf_shape))


def param_shapes(module) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """Our parameter paths with their shapes and dtypes, from an (abstract or concrete) NNX module."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[tuple(str(p) for p in path)] = (tuple(value.shape), np.dtype(value.dtype))
    return out


def check_rules(rules: Iterable[TensorRule], shapes: Mapping[Path, tuple]) -> None:
    """Every parameter is covered exactly once (whole, or every layer slice once) and nothing else."""
    seen: dict[Path, set] = {}
    for r in rules:
        if r.path not in shapes:
            raise ConversionError(f"rule for HF key {r.hf_key!r} targets unknown parameter {'.'.join(r.path)}")
        s = seen.setdefault(r.path, set())
        if r.index in s or (r.index is None and s) or (None in s):
            raise ConversionError(f"parameter {'.'.join(r.path)} is written twice (HF key {r.hf_key!r})")
        s.add(r.index)
    for path, (shape, _) in shapes.items():
        got = seen.get(path)
        if not got:
            raise ConversionError(f"no HF tensor maps onto parameter {'.'.join(path)}")
        if None not in got and got != set(range(shape[0])):
            raise ConversionError(f"parameter {'.'.join(path)}: layer slices {sorted(got)} do not cover "
                                  f"all {shape[0]} layers")


def assemble(rules: Iterable[TensorRule], shapes: Mapping[Path, tuple],
             get_tensor: Callable[[str], np.ndarray]) -> dict[Path, np.ndarray]:
    """Build our flat parameter dict from HF tensors (in memory; the converter streams instead)."""
    rules = list(rules)
    check_rules(rules, shapes)
    out: dict[Path, np.ndarray] = {}
    for r in rules:
        t = np.asarray(get_tensor(r.hf_key))
        if tuple(t.shape) != r.hf_shape:
            raise ConversionError(f"HF tensor {r.hf_key!r} has shape {tuple(t.shape)}, expected {r.hf_shape}")
        shape, dtype = shapes[r.path]
        x = r.to_ours(t)
        if r.index is None:
            if tuple(x.shape) != shape:
                raise ConversionError(f"{r.hf_key!r} maps to shape {x.shape}, parameter "
                                      f"{'.'.join(r.path)} has {shape}")
            out[r.path] = x.astype(dtype, copy=False)
        else:
            buf = out.get(r.path)
            if buf is None:
                buf = out[r.path] = np.zeros(shape, dtype)
            if tuple(x.shape) != shape[1:]:
                raise ConversionError(f"{r.hf_key!r} maps to shape {x.shape}, layer slice of "
                                      f"{'.'.join(r.path)} has {shape[1:]}")
            buf[r.index] = x
    return out


def disassemble(rules: Iterable[TensorRule], params: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat parameter dict back to HF tensors."""
    out = {}
    for r in rules:
        p = np.asarray(params[r.path])
        out[r.hf_key] = r.to_hf(p if r.index is None else p[r.index])
    return out


def load_into(module, flat: Mapping[Path, np.ndarray]) -> None:
    """Write a flat parameter dict into an NNX module in place (dtype of the module's parameters kept)."""
    from flax import nnx
    import jax.numpy as jnp

    state = nnx.state(module, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        old = var.get_value() if hasattr(var, "get_value") else var.value
        var.set_value(jnp.asarray(flat[key], dtype=old.dtype)) if hasattr(var, "set_value") else \
            setattr(var, "value", jnp.asarray(flat[key], dtype=old.dtype))
    nnx.update(module, state)


def from_torch_state_dict(module, rules: Iterable[TensorRule], state_dict) -> None:
    """Test helper: load a torch model's `state_dict()` (fp32) into our module through the rules."""
    shapes = param_shapes(module)
    tensors = {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()}

    def get(key):
        if key not in tensors:
            raise ConversionError(f"HF state dict has no tensor {key!r}")
        return tensors[key]

    load_into(module, assemble(rules, shapes, get))


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """How to build a model for one HF checkpoint: what each model family returns to the converter.

    Each top-level model module has `checkpoint_spec(config: dict, hf_keys: set[str]) -> CheckpointSpec`:
    it reads the HF `config.json` dict, detects the key layout from the key set (e.g. llava-hf's
    `language_model.model.*` vs `model.language_model.*`) and returns the module factory and the rules.
    """
    kind: str                                  # "clip" | "llava_next" | "value" | "decoder"
    make_module: Callable[..., object]         # make_module(dtype=..., param_dtype=..., rngs=nnx.Rngs(0))
    rules: list[TensorRule]
    layout: dict = dataclasses.field(default_factory=dict)   # whatever is needed to write the layout back
