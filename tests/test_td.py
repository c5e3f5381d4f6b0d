"""TD targets and loss: per-sample targets (not the released batch-mean broadcast), terminal mask,
stop-gradient through next values, EMA target update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimar_jax import td


def released_loss(values, rewards, next_values, gamma=0.9):
    """The released trainers: rewards (B,) + γ·V_next (B, 1) broadcasts to (B, B); MSE against V (B, 1)."""
    v = np.asarray(values, np.float64)[:, None]
    target = np.asarray(rewards, np.float64) + gamma * np.asarray(next_values, np.float64)[:, None]
    return float(np.mean((v - target) ** 2))


def test_per_sample_targets_and_loss_differ_from_released_broadcast():
    values = np.array([0.7, 0.0, 0.25, -0.22], np.float32)   # near their own targets
    rewards = np.array([0.3, -0.1, 0.2, 0.05], np.float32)
    next_v = np.array([0.4, 0.2, 0.0, -0.3], np.float32)
    done = np.zeros(4, np.float32)
    y = td.td_targets(rewards, next_v, done, gamma=0.9)
    # hand-computed: y_i = r_i + 0.9 * V(s_{i+1})_i
    y_hand = [0.3 + 0.36, -0.1 + 0.18, 0.2 + 0.0, 0.05 - 0.27]
    np.testing.assert_allclose(np.asarray(y), y_hand, rtol=1e-6)
    loss = float(td.td_loss(jnp.asarray(values), y))
    loss_hand = np.mean((values.astype(np.float64) - np.array(y_hand)) ** 2)
    assert loss == pytest.approx(loss_hand, rel=1e-6)
    # the released version regresses onto the batch-mean reward: a clearly different number
    rel = released_loss(values, rewards, next_v)
    assert rel > 5 * loss_hand and rel - loss_hand > 0.02, (rel, loss_hand)
    # (identity: the broadcast loss = MSE to the batch-mean reward + the reward variance)
    v64, r64, n64 = (np.asarray(a, np.float64) for a in (values, rewards, next_v))
    assert rel == pytest.approx(np.mean((v64 - 0.9 * n64 - r64.mean()) ** 2) + r64.var(), rel=1e-9)
    # and the broadcast is refused, not silently applied
    with pytest.raises(ValueError, match=r"\[B, B\]"):
        td.td_targets(rewards, next_v[:, None], done)


def test_terminal_mask_and_padding_mask():
    rewards = np.array([0.2, 0.4, 0.1], np.float32)
    next_v = np.array([1.0, np.nan, 2.0], np.float32)   # garbage after a terminal state is ignored
    done = np.array([0, 1, 0], np.float32)
    y = np.asarray(td.td_targets(rewards, next_v, done, gamma=0.5))
    np.testing.assert_allclose(y, [0.2 + 0.5, 0.4, 0.1 + 1.0], rtol=1e-6)
    values = jnp.array([0.0, 0.0, 5.0])
    mask = jnp.array([1.0, 1.0, 0.0])                   # third sample is padding
    loss = float(td.td_loss(values, y, mask))
    assert loss == pytest.approx((0.7 ** 2 + 0.4 ** 2) / 2, rel=1e-6)
    assert float(td.td_loss(values, y, jnp.zeros(3))) == 0.0     # all-masked: 0, not NaN


def test_no_gradient_through_next_values():
    rewards = jnp.array([0.1, 0.2])
    done = jnp.array([0.0, 0.0])

    def loss(v, v_next):
        return td.td_loss(v, td.td_targets(rewards, v_next, done))

    v, vn = jnp.array([0.3, -0.1]), jnp.array([0.5, 0.7])
    g_v, g_next = jax.grad(loss, argnums=(0, 1))(v, vn)
    np.testing.assert_array_equal(np.asarray(g_next), [0.0, 0.0])
    y = rewards + 0.9 * vn
    np.testing.assert_allclose(np.asarray(g_v), np.asarray(2 * (v - y) / 2), rtol=1e-6)

    # the same when V and V_next come from one shared parameter (the usual case): only the V(s) path counts
    def shared(w):
        return td.td_loss(w * jnp.array([1.0, 2.0]), td.td_targets(rewards, w * jnp.array([3.0, 4.0]), done))

    w = 0.7
    g = float(jax.grad(shared)(w))
    s, sn = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    g_hand = np.mean(2 * (w * s - (np.array([0.1, 0.2]) + 0.9 * w * sn)) * s)
    assert g == pytest.approx(g_hand, rel=1e-6)


def test_loss_and_metrics():
    values = jnp.array([1.0, 2.0, 3.0])
    loss, m = td.td_loss_and_metrics(values, jnp.zeros(3), jnp.array([1.0, 1.0, 1.0]), jnp.array([1, 1, 1]),
                                     mask=jnp.array([1.0, 1.0, 0.0]))
    assert float(loss) == pytest.approx((0 + 1) / 2)
    assert float(m["weight"]) == 2.0
    assert float(m["value_mean"]) == pytest.approx(1.5)
    assert float(m["td_abs_err"]) == pytest.approx(0.5)


def test_ema_update():
    t = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    o = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(0.0)}
    new = td.ema_update(t, o, 0.75)
    np.testing.assert_allclose(np.asarray(new["a"]), [1.5, 1.5])
    assert float(new["b"]) == 3.0
    with pytest.raises(ValueError, match="decay"):
        td.ema_update(t, o, 1.5)
