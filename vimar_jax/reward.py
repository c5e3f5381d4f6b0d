"""Sentence rewards for TD training (SPEC §2).

δ(s, I) is the raw cosine similarity of the L2-normalised CLIP image and sentence embeddings (no logit
scale). ViMaR shapes it with a margin τ: a sentence whose δ clears τ keeps δ as its reward, one below τ is
penalised by the gap, r = α·(δ − τ). The paper's appendix compares other shapings; all are selectable by
name:

| variant       | δ ≥ τ | δ < τ      | used by            |
|---------------|-------|------------|--------------------|
| `margin`      | δ     | α·(δ − τ)  | ViMaR (default)    |
| `raw`         | δ     | δ          | VisVM (no margin)  |
| `zero_below`  | δ     | 0          | ablation           |
| `clip_at_tau` | δ     | τ          | ablation, max(δ,τ) |

Ground-truth caption sentences (ViMaR's 6th trajectory) get the constant `GROUND_TRUTH_REWARD` instead.
τ is a float, or a percentile of δ over the training rollouts written `"p17"` (resolve it once with
`resolve_tau` before computing rewards). Everything here works on numpy arrays and on jax arrays.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_TAU = 0.16          # ≈ P17 of δ for CLIP-L/336 on COCO (SPEC §2)
DEFAULT_ALPHA = 1.0
GROUND_TRUTH_REWARD = 0.27  # ≈ P90 of δ
REWARD_VARIANTS = ("margin", "raw", "zero_below", "clip_at_tau")

_PERCENTILE = re.compile(r"^p(\d+(?:\.\d*)?)$")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How δ becomes a reward. `tau` must be a float by the time rewards are computed (see `resolve_tau`)."""
    tau: float | str = DEFAULT_TAU
    alpha: float = DEFAULT_ALPHA
    variant: str = "margin"
    ground_truth_reward: float = GROUND_TRUTH_REWARD

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "RewardConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown reward config keys {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def _xp(x):
    """numpy for numpy/python inputs, jax.numpy for jax arrays and tracers."""
    if isinstance(x, (np.ndarray, np.generic, float, int, list, tuple)):
        return np
    import jax.numpy as jnp
    return jnp


def margin_reward(delta, tau: float, alpha: float = DEFAULT_ALPHA):
    """ViMaR margin reward: r = δ if δ ≥ τ else α·(δ − τ)."""
    xp = _xp(delta)
    delta = xp.asarray(delta)
    return xp.where(delta >= tau, delta, alpha * (delta - tau))


def shape_reward(delta, tau: float, variant: str = "margin", alpha: float = DEFAULT_ALPHA):
    """Reward of CLIP similarity `delta` under a named variant (see the module docstring)."""
    if isinstance(tau, str):
        raise TypeError(f"tau={tau!r} is a percentile: resolve it first with resolve_tau(tau, deltas)")
    xp = _xp(delta)
    delta = xp.asarray(delta)
    if variant == "margin":
        return margin_reward(delta, tau, alpha)
    if variant == "raw":
        return delta
    if variant == "zero_below":
        return xp.where(delta >= tau, delta, xp.zeros_like(delta))
    if variant == "clip_at_tau":
        return xp.maximum(delta, xp.asarray(tau, dtype=delta.dtype))
    raise ValueError(f"unknown reward variant {variant!r}; choose one of {REWARD_VARIANTS}")


def resolve_tau(tau: float | str, deltas: Sequence[float] | np.ndarray | None = None) -> float:
    """τ as a float: a number is returned as is; `"pQ"` (0 ≤ Q ≤ 100) is the Q-th percentile of `deltas`
    (linear interpolation, `np.percentile`'s default), i.e. of δ over all sentences of the rollouts."""
    if isinstance(tau, (int, float, np.floating, np.integer)) and not isinstance(tau, bool):
        return float(tau)
    if not isinstance(tau, str):
        raise TypeError(f"tau must be a float or a percentile string like 'p17', got {tau!r}")
    m = _PERCENTILE.match(tau.strip())
    if m is None:
        try:
            return float(tau)
        except ValueError:
            raise ValueError(f"tau={tau!r}: expected a float or a percentile like 'p17'") from None
    q = float(m.group(1))
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"tau={tau!r}: percentile must be in [0, 100]")
    if deltas is None:
        raise ValueError(f"tau={tau!r} is a percentile of δ: pass the rollouts' deltas")
    d = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError(f"tau={tau!r}: no deltas to take a percentile of")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"tau={tau!r}: deltas contain NaN or Inf")
    return float(np.percentile(d, q))


def ground_truth_rewards(n: int, value: float = GROUND_TRUTH_REWARD) -> np.ndarray:
    """Rewards of the n sentences of a ground-truth caption: the constant `value` each."""
    return np.full((n,), value, dtype=np.float32)


def sentence_deltas(clip, image_embed, sentences: Sequence[str]) -> np.ndarray:
    """δ = cos(image, sentence) for each sentence, with a cached image embedding `image_embed` [P] (or
    [1, P]). `clip` is anything with `embed_texts(list[str]) -> [N, P]` (e.g. `vimar_jax.models.clip`'s
    loaded CLIP, which truncates to CLIP's 77 tokens). Both sides are L2-normalised here again."""
    sentences = list(sentences)
    img = np.asarray(image_embed, dtype=np.float32).reshape(-1)
    if not sentences:
        return np.zeros((0,), np.float32)
    txt = np.asarray(clip.embed_texts(sentences), dtype=np.float32)
    if txt.ndim != 2 or txt.shape != (len(sentences), img.shape[0]):
        raise ValueError(f"embed_texts returned shape {txt.shape}, expected ({len(sentences)}, {img.shape[0]}) "
                         f"to match the image embedding")
    img = img / max(np.linalg.norm(img), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
    return (txt @ img).astype(np.float32)


def sentence_rewards(clip, image_embed, sentences: Sequence[str], cfg: RewardConfig | Mapping[str, Any] | None = None,
                     *, ground_truth: bool = False) -> np.ndarray:
    """Rewards [len(sentences)] of one caption's sentences: CLIP δ shaped by `cfg`, or the ground-truth
    constant when `ground_truth` (no CLIP call then)."""
    cfg = RewardConfig() if cfg is None else cfg if isinstance(cfg, RewardConfig) else RewardConfig.from_mapping(cfg)
    if ground_truth:
        return ground_truth_rewards(len(sentences), cfg.ground_truth_reward)
    if isinstance(cfg.tau, str):
        raise ValueError(f"reward tau={cfg.tau!r} is a percentile: resolve it over the rollouts' δ with "
                         f"resolve_tau and pass a config with the float")
    delta = sentence_deltas(clip, image_embed, sentences)
    return np.asarray(shape_reward(delta, float(cfg.tau), cfg.variant, cfg.alpha), dtype=np.float32)
