"""Reward shaping: margin, variants, percentile τ, ground-truth constant, sentence rewards via CLIP."""

import jax.numpy as jnp
import numpy as np
import pytest

from vimar_jax import reward as R


def test_margin_below_and_above_tau():
    delta = np.array([0.30, 0.16, 0.159, 0.10, -0.05], np.float32)
    r = R.margin_reward(delta, tau=0.16, alpha=1.0)
    # above/at τ: δ itself; below: the gap (δ − τ), a penalty
    np.testing.assert_allclose(r, [0.30, 0.16, 0.159 - 0.16, 0.10 - 0.16, -0.05 - 0.16], rtol=1e-6, atol=1e-7)
    r2 = R.margin_reward(delta, tau=0.16, alpha=2.5)
    np.testing.assert_allclose(r2, [0.30, 0.16, 2.5 * (0.159 - 0.16), 2.5 * (0.10 - 0.16), 2.5 * (-0.21)],
                               rtol=1e-6, atol=1e-7)
    # the margin makes rewards discontinuous at τ: just below is negative, at τ it is τ
    assert r[2] < 0 < r[1]


def test_margin_works_on_jax_arrays():
    delta = jnp.array([0.2, 0.1])
    r = R.margin_reward(delta, 0.15)
    assert isinstance(r, type(delta))
    np.testing.assert_allclose(np.asarray(r), [0.2, -0.05], rtol=1e-6)


def test_variants():
    delta = np.array([0.25, 0.12], np.float32)
    tau = 0.16
    np.testing.assert_allclose(R.shape_reward(delta, tau, "margin"), [0.25, 0.12 - 0.16], rtol=1e-6)
    np.testing.assert_allclose(R.shape_reward(delta, tau, "raw"), [0.25, 0.12], rtol=1e-6)
    np.testing.assert_allclose(R.shape_reward(delta, tau, "zero_below"), [0.25, 0.0], rtol=1e-6)
    np.testing.assert_allclose(R.shape_reward(delta, tau, "clip_at_tau"), [0.25, 0.16], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown reward variant 'nope'"):
        R.shape_reward(delta, tau, "nope")
    with pytest.raises(TypeError, match="resolve_tau"):
        R.shape_reward(delta, "p17")


def test_percentile_tau():
    deltas = np.arange(101, dtype=np.float64) / 100.0   # 0.00 .. 1.00: the Q-th percentile is Q/100
    assert R.resolve_tau("p17", deltas) == pytest.approx(0.17, abs=1e-12)
    assert R.resolve_tau("p0", deltas) == 0.0
    assert R.resolve_tau("p100", deltas) == 1.0
    assert R.resolve_tau("p12.5", [0.0, 1.0]) == pytest.approx(0.125)   # linear interpolation
    assert R.resolve_tau(0.16) == 0.16
    assert R.resolve_tau("0.2") == 0.2
    with pytest.raises(ValueError, match="pass the rollouts' deltas"):
        R.resolve_tau("p17")
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        R.resolve_tau("p150", deltas)
    with pytest.raises(ValueError, match="expected a float or a percentile"):
        R.resolve_tau("q17", deltas)
    with pytest.raises(ValueError, match="NaN"):
        R.resolve_tau("p17", [0.1, np.nan])


def test_ground_truth_constant():
    assert R.GROUND_TRUTH_REWARD == 0.27
    np.testing.assert_array_equal(R.ground_truth_rewards(3), np.full(3, 0.27, np.float32))


class FakeClip:
    """Deterministic text embeddings (unnormalised on purpose) with a call log."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def embed_texts(self, texts):
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts])


def test_sentence_rewards_with_cached_image_embedding():
    img = np.array([3.0, 4.0, 0.0])          # norm 5
    table = {"a red circle.": np.array([6.0, 8.0, 0.0]),     # cos 1.0
             "a blue star.": np.array([0.0, 0.0, 2.0]),      # cos 0.0
             "two shapes.": np.array([4.0, -3.0, 0.0])}      # cos 0.0
    clip = FakeClip(table)
    sents = ["a red circle.", "a blue star.", "two shapes."]
    d = R.sentence_deltas(clip, img, sents)
    np.testing.assert_allclose(d, [1.0, 0.0, 0.0], atol=1e-6)
    r = R.sentence_rewards(clip, img, sents, {"tau": 0.16, "alpha": 1.0})
    np.testing.assert_allclose(r, [1.0, -0.16, -0.16], atol=1e-6)
    assert clip.calls[-1] == sents                       # one batched call per caption
    n_calls = len(clip.calls)
    gt = R.sentence_rewards(clip, img, sents, R.RewardConfig(), ground_truth=True)
    np.testing.assert_allclose(gt, [0.27] * 3)
    assert len(clip.calls) == n_calls                    # ground truth needs no CLIP call
    vis = R.sentence_rewards(clip, img, sents, R.RewardConfig(variant="raw"))
    np.testing.assert_allclose(vis, [1.0, 0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="percentile"):
        R.sentence_rewards(clip, img, sents, {"tau": "p17"})
    with pytest.raises(ValueError, match="unknown reward config keys"):
        R.sentence_rewards(clip, img, sents, {"margin": 0.1})
    with pytest.raises(ValueError, match="embed_texts returned shape"):
        R.sentence_deltas(FakeClip({"x": np.ones(4)}), img, ["x"])
