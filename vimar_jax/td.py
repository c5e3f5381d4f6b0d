"""TD(0) targets and loss for the value model (SPEC §3).

A transition is (s_i, r_i, s_{i+1}, done_i). The target is

    y_i = r_i + γ · (1 − done_i) · stopgrad(V(s_{i+1}))          (γ = 0.9)

and the loss is the mean of (V(s_i) − y_i)² over the valid samples of the batch: semi-gradient TD(0), no
target network by default (`ema_update` keeps one if wanted: compute V(s_{i+1}) with its params).

**How this differs from the released ViMaR/VisVM trainers.** They compute `rewards + 0.9 * V_next` with
`rewards` of shape (B,) and `V_next` of shape (B, 1). That broadcasts to (B, B) — element [j, i] =
r_i + 0.9·V_j — and the MSE against V(s) (B, 1) then regresses every V(s_j) onto the mean over i of r_i,
i.e. onto the *batch-mean* reward plus its own discounted next value, not onto its own reward. They also
never mark the final sentence of a caption as terminal, so the last state bootstraps from whatever state
follows it in the batch. Here targets are per-sample (shapes are checked: a (B, 1) next-value array is an
error, not a broadcast) and terminal transitions do not bootstrap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_GAMMA = 0.9


def _check_1d(name: str, x, n: int | None = None) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape [B] (one entry per transition), got {x.shape}; a [B, 1] "
                         f"array would broadcast against [B] into [B, B] (the released code's bug)")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries, expected {n}")
    return x


def td_targets(rewards, next_values, done, gamma: float = DEFAULT_GAMMA) -> jax.Array:
    """Per-sample targets y = r + γ·(1 − done)·stopgrad(V_next), all of shape [B]; float32."""
    rewards = _check_1d("rewards", rewards)
    n = rewards.shape[0]
    next_values = _check_1d("next_values", next_values, n)
    done = _check_1d("done", done, n)
    cont = 1.0 - done.astype(jnp.float32)
    bootstrap = jax.lax.stop_gradient(next_values.astype(jnp.float32))
    # where() rather than a product so a garbage (even non-finite) V after a terminal state is ignored.
    return rewards.astype(jnp.float32) + gamma * jnp.where(cont > 0, cont * bootstrap, 0.0)


def td_loss(values, targets, mask=None) -> jax.Array:
    """Mean of (V − y)² over the samples with mask > 0 (all when mask is None); mask may be 0/1 or weights.
    An all-masked batch gives 0, not NaN."""
    values = _check_1d("values", values)
    targets = _check_1d("targets", targets, values.shape[0])
    err = jnp.square(values.astype(jnp.float32) - jax.lax.stop_gradient(targets.astype(jnp.float32)))
    if mask is None:
        return jnp.mean(err)
    w = _check_1d("mask", mask, values.shape[0]).astype(jnp.float32)
    err = jnp.where(w > 0, err, 0.0)
    return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1e-6)


def td_loss_and_metrics(values, next_values, rewards, done, mask=None, gamma: float = DEFAULT_GAMMA):
    """`(loss, metrics)` for a batch of transitions; metrics (scalars) suit a trainer loss function:
    mean value, mean target, mean |TD error| over valid samples, and `weight` = number of valid samples
    (the trainer uses it to weight micro-batches in gradient accumulation)."""
    targets = td_targets(rewards, next_values, done, gamma)
    loss = td_loss(values, targets, mask)
    values = values.astype(jnp.float32)
    w = jnp.ones_like(values) if mask is None else jnp.asarray(mask, jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1e-6)
    metrics = {
        "value_mean": jnp.sum(w * jnp.where(w > 0, values, 0.0)) / denom,
        "target_mean": jnp.sum(w * targets) / denom,
        "td_abs_err": jnp.sum(w * jnp.where(w > 0, jnp.abs(values - targets), 0.0)) / denom,
        "weight": jnp.sum(w),
    }
    return loss, metrics


def ema_update(target_params, online_params, decay: float):
    """Target network update: target ← decay·target + (1 − decay)·online, leaf by leaf (any pytree,
    including NNX States)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return jax.tree.map(lambda t, o: (decay * t + (1.0 - decay) * o).astype(t.dtype), target_params, online_params)
