"""`build_engine`: the search engine over real models (policy VLM, value model, CLIP) from directories.

    engine = build_engine(policy="ckpt/llava", value="ckpt/value", clip=False, config=SearchConfig(theta=2.0))
    result = engine.run(pil_image, "Describe this image in detail.", "vimar")

Each model argument is a directory (HF or `vimar convert` output), an already loaded object, `None` for the
shipped tiny-world model (`vimar_jax/assets/tiny_world/{policy,value,clip}`), or `False` when the method
does not need it. θ is `config.theta`, else a percentile (`config.theta_percentile`, or the stored default)
of the value checkpoint's stored statistics (`decode.scorers.theta_default`); without either, ViMaR's Stage 2
raises asking for `--theta` (`require_theta=True` or a `theta_percentile` raises here instead).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from vimar_jax.decode.search import Engine, SearchConfig

TINY_WORLD = Path(__file__).resolve().parent / "assets" / "tiny_world"
ROLES = ("policy", "value", "clip")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_dir(role: str) -> Path:
    """Where the shipped tiny-world model of `role` lives; a clear error if it is missing."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {ROLES}")
    path = TINY_WORLD / role
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no {role} model given and the shipped tiny-world {role} model is missing ({path} has no config.json); "
            f"pass --{role} DIR, or build the tiny world with `python train/tiny_world.py --out {TINY_WORLD}`")
    return path


def _dir(role: str, arg) -> Path:
    path = default_dir(role) if arg is None else Path(os.fspath(arg))
    if not path.is_dir():
        raise FileNotFoundError(f"{role} model directory {path} does not exist")
    return path


def _dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_policy(arg=None, *, dtype="float32", prompt_template=None, compact: bool = False):
    """A `LlavaPolicy` from a directory / `VLM` / `LlavaPolicy` (None: the tiny world's). Each of its calls
    decodes the rows it samples (a power of two: 32 for N·K = 30, one for greedy) against the prompt and the
    caption prefix (a power-of-two extension), so a search compiles a few decode shapes, not one. `compact`:
    its candidate batches shrink as rows stop (`LlavaPolicy`; for long CPU runs); ignored for a given
    `LlavaPolicy`."""
    from vimar_jax.decode.policy import LlavaPolicy
    from vimar_jax.vlm import VLM, load_vlm

    if isinstance(arg, LlavaPolicy):
        return arg
    vlm = arg if isinstance(arg, VLM) else load_vlm(_dir("policy", arg), dtype=_dtype(dtype))
    return LlavaPolicy(vlm, prompt_template, compact=compact)


def load_value_scorer(arg=None, *, dtype="float32"):
    """A `ValueScorer` from a directory / `Value` / `ValueScorer` (None: the tiny world's). Its states are
    packed several to a row, so its calls run the rows the states fill (see `ValueScorer`), not N·K rows."""
    from vimar_jax.decode.scorers import ValueScorer
    from vimar_jax.vlm import Value, load_value

    if isinstance(arg, ValueScorer):
        return arg
    value = arg if isinstance(arg, Value) else load_value(_dir("value", arg), dtype=_dtype(dtype))
    return ValueScorer(value)


def load_clip_scorer(arg=None, *, config: SearchConfig = SearchConfig()):
    """A `ClipScorer` from a directory / CLIP / `ClipScorer` (None: the tiny world's). CLIP runs in float32
    whatever the policy's dtype (its δ is the reward the value model was trained on)."""
    from vimar_jax.decode.scorers import ClipScorer

    if isinstance(arg, ClipScorer):
        return arg
    if arg is not None and not isinstance(arg, (str, os.PathLike)):
        return ClipScorer(arg, min_rows=config.num_candidates)
    from vimar_jax.clip import load_clip

    return ClipScorer(load_clip(_dir("clip", arg)), min_rows=config.num_candidates)


def build_engine(policy=None, value=None, clip=None, config: SearchConfig = SearchConfig(), dtype="float32", *,
                 prompt_template: str | None = None, require_theta: bool = False) -> Engine:
    """The search `Engine` over the given models (see the module docstring)."""
    from vimar_jax.decode.scorers import theta_default

    if policy is False:
        raise ValueError("every search method needs a policy")
    pol = load_policy(policy, dtype=dtype, prompt_template=prompt_template, compact=config.compact_decode)
    val = None if value is False else load_value_scorer(value, dtype=dtype)
    clp = None if clip is False else load_clip_scorer(clip, config=config)
    theta = config.theta
    if theta is None and val is not None:
        try:
            theta = theta_default(val.value, config.theta_percentile)
        except ValueError:
            if require_theta or config.theta_percentile is not None:
                raise
    if theta is None and require_theta:
        raise ValueError("ViMaR Stage 2 needs θ: pass --theta (SearchConfig.theta) or a value model with stored "
                         "value statistics")
    return Engine(pol, config, value=val, clip=clp, theta=theta)


__all__ = ["build_engine", "load_policy", "load_value_scorer", "load_clip_scorer", "default_dir", "TINY_WORLD"]
