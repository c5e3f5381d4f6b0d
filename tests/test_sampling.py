"""Logit processing and sampling against Hugging Face's warpers (temperature -> top-k -> top-p)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from vimar_jax.decode.sampling import (METHODS, default_method, process_logits, row_keys, sample,
                                       token_logprobs)

V = 12
_process = jax.jit(process_logits, static_argnames=("min_tokens_to_keep", "method"))
_sample = jax.jit(sample)


def _hf_processed(logits_row, t, k, p, *, min_keep=1, order=("temperature", "top_k", "top_p")):
    """HF's processed scores for one row: its warpers in `order`, each added as `generate` would add it."""
    scores = torch.tensor(np.asarray(logits_row, np.float32))[None]
    if t == 0:  # greedy: point mass on torch.argmax
        out = torch.full_like(scores, -float("inf"))
        out[0, scores.argmax()] = 0.0
        return out[0].numpy()
    warpers = {
        "temperature": TemperatureLogitsWarper(float(t)) if t != 1.0 else None,
        "top_k": TopKLogitsWarper(int(k), min_tokens_to_keep=min_keep) if k != 0 else None,
        "top_p": TopPLogitsWarper(float(p), min_tokens_to_keep=min_keep) if p < 1.0 else None,
    }
    for name in order:
        if warpers[name] is not None:
            scores = warpers[name](None, scores)
    return scores[0].numpy()


def _probs(processed):
    processed = np.asarray(processed, np.float64)
    e = np.exp(processed - processed.max())
    return e / e.sum()


def _cases():
    r = np.random.default_rng(0)
    rows, params = [], []

    def add(logits, t, k, p):
        rows.append(np.asarray(logits, np.float32))
        params.append((np.float32(t), k, np.float32(p)))

    base = r.normal(0, 2, V)
    add(base, 1.0, 0, 1.0)                      # all no-ops: plain softmax
    add(base, 0.7, 3, 1.0)                      # top-k only
    add(base, 1.3, 0, 0.8)                      # top-p only
    add(r.normal(0, 2, V), 0.5, 5, 0.9)         # all three
    add(r.normal(0, 2, V), 0.0, 4, 0.5)         # temperature 0: greedy, other settings ignored
    tie_k = np.array([3, 2, 2, 1, 0, -1, 2, 0.5, -2, -3, 1.5, 0.1])
    add(tie_k, 1.0, 2, 1.0)                     # ties at the 2nd value: all three 2s kept
    tie_p = np.array([1, 1, 1, 1, -50, -50, -50, -50, -50, -50, -50, -50])
    add(tie_p, 1.0, 0, 0.5)                     # cum 0.25, 0.5 <= 0.5 removed: the two lowest ids go
    add(r.normal(0, 1, V), 2.0, 50, 0.95)       # k > V: no-op
    add(r.normal(0, 1, V), 1.0, 0, 0.0)         # top_p 0: only the most likely survives
    add(np.array([5, 5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 5]), 0.0, 0, 1.0)  # greedy with ties: first argmax
    logits = np.stack(rows)
    t, k, p = (np.array(c) for c in zip(*params))
    return logits, t.astype(np.float32), k.astype(np.int32), p.astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("min_keep", [1, 2])
def test_processed_distribution_equals_hf(min_keep, method):
    logits, t, k, p = _cases()
    ours = np.asarray(_process(jnp.asarray(logits), t, k, p, min_tokens_to_keep=min_keep, method=method))
    for b in range(len(logits)):
        ref = _hf_processed(logits[b], t[b], k[b], p[b], min_keep=min_keep)
        np.testing.assert_array_equal(np.isfinite(ours[b]), np.isfinite(ref), err_msg=f"row {b} kept set")
        np.testing.assert_allclose(_probs(ours[b]), _probs(ref), atol=1e-6, rtol=0, err_msg=f"row {b}")
    # Spot-check the hand-made rows so the comparison cannot pass vacuously.
    kept = np.isfinite(ours)
    if min_keep == 1:
        assert np.flatnonzero(kept[5]).tolist() == [0, 1, 2, 6]
        assert kept[6].tolist() == [False, False, True, True] + [False] * 8
        assert kept[8].sum() == 1
    assert kept[4].sum() == 1 and kept[9].tolist() == [True] + [False] * 11
    assert kept[0].all() and kept[1].sum() == 3


def _stable_reference_kept(logits_row, t, k, p, min_keep):
    """HF's temperature -> top-k -> top-p kept set in numpy, its sort made stable (ties by token id), which is
    the order HF's torch.sort gives small rows and our documented semantics for all."""
    x = np.asarray(logits_row, np.float32) / np.float32(t)
    v = x.shape[0]
    keep = np.ones(v, bool)
    if k > 0:
        kk = min(max(int(k), min_keep), v)
        keep &= x >= np.sort(x)[v - kk]
    if p < 1.0:
        masked = np.where(keep, x, -np.inf).astype(np.float32)
        order = np.argsort(masked, kind="stable")
        e = np.exp(masked[order] - masked[order].max())
        cum = np.cumsum((e / e.sum()).astype(np.float32), dtype=np.float32)
        gone = cum <= np.float32(1.0) - np.float32(p)
        gone[v - min_keep:] = False
        keep[order[gone]] = False
    return keep


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("min_keep", [1, 3])
def test_kept_sets_on_random_rows_with_ties(min_keep, method):
    """200 rows of a 391-token vocabulary (the tiny world's), half of them with logits rounded to a coarse
    grid so that many values tie, with random temperatures, top-k and top-p: the kept set equals HF's on the
    rows without ties, and the stable-sort reference's (ties by token id) on all rows."""
    r = np.random.default_rng(5)
    n, vocab = 200, 391
    logits = r.normal(0, 3, (n, vocab)).astype(np.float32)
    logits[::2] = np.round(logits[::2] * 2) / 2                  # ties everywhere in even rows
    logits[10, :] = 1.0                                           # one flat row
    t = r.choice([0.1, 0.5, 0.7, 1.0, 1.5], n).astype(np.float32)
    k = r.choice([0, 0, 1, 5, 40, 400], n).astype(np.int32)
    p = r.choice([1.0, 0.9, 0.5, 0.2, 0.0], n).astype(np.float32)
    ours = np.isfinite(np.asarray(_process(jnp.asarray(logits), t, k, p, min_tokens_to_keep=min_keep,
                                           method=method)))
    for b in range(n):
        ref = _stable_reference_kept(logits[b], t[b], k[b], p[b], min_keep)
        np.testing.assert_array_equal(ours[b], ref, err_msg=f"row {b}: t={t[b]} k={k[b]} p={p[b]}")
        if b % 2:
            hf = np.isfinite(_hf_processed(logits[b], t[b], k[b], p[b], min_keep=min_keep))
            np.testing.assert_array_equal(ours[b], hf, err_msg=f"row {b} against HF")
    sizes = ours.sum(-1)
    assert sizes.min() >= min_keep and (sizes < vocab).mean() > 0.5 and (sizes == vocab).any()
    assert 0 < ours[10].sum() < vocab          # the flat row is cut inside its one tie group


def test_sample_returns_processed_and_raw_logprobs():
    logits, t, k, p = _cases()
    keys = row_keys(jax.random.key(1), jnp.arange(len(logits)))
    tokens, logprobs = _sample(jnp.asarray(logits), keys, t, k, p)
    tokens = np.asarray(tokens)
    for b in range(len(logits)):
        ref = _hf_processed(logits[b], t[b], k[b], p[b])
        assert np.isfinite(ref[tokens[b]]), f"row {b} drew a removed token {tokens[b]}"
        np.testing.assert_allclose(logprobs[b], np.log(_probs(ref)[tokens[b]]), atol=1e-5)
    assert tokens[4] == logits[4].argmax() and tokens[9] == 0 and logprobs[4] == 0.0
    raw = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    ref_raw = torch.log_softmax(torch.tensor(logits), -1)[torch.arange(len(logits)), torch.tensor(tokens)]
    np.testing.assert_allclose(raw, ref_raw.numpy(), atol=1e-6)


def _tv(a, b):
    return 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum()


# Rows where the order of the warpers matters: a sharp or flat temperature moves the top-p cut.
ORDER_ROWS = [
    (np.array([2.0, 1.6, 1.2, 1.0, 0.5, 0.0, -0.5, -1, -1, -2, -3, -4]), 0.5, 0, 0.6),
    (np.array([2.0, 1.6, 1.2, 1.0, 0.5, 0.0, -0.5, -1, -1, -2, -3, -4]), 2.0, 6, 0.8),
    (np.array([3.0, 0.2, 0.1, 0.0, 0.0, -0.1, -0.3, -1, -1, -2, -3, -4]), 3.0, 0, 0.6),
]
N_DRAWS = 20_000
# Total variation between an empirical distribution of 20k draws and its source is ~0.006 for these
# supports (E|p_hat - p| ~ sqrt(2p(1-p) / (pi n))); 0.02 is > 3x that, and each wrong-order
# distribution is >= 0.1 away from the right one.
TV_TOL = 0.02


def test_empirical_distribution_matches_hf_and_rejects_wrong_order():
    logits = np.stack([r[0] for r in ORDER_ROWS]).astype(np.float32)
    t = np.array([r[1] for r in ORDER_ROWS], np.float32)
    k = np.array([r[2] for r in ORDER_ROWS], np.int32)
    p = np.array([r[3] for r in ORDER_ROWS], np.float32)
    n_rows = len(ORDER_ROWS)
    rep = lambda x: jnp.repeat(jnp.asarray(x), N_DRAWS, axis=0)  # noqa: E731
    keys = row_keys(jax.random.key(7), jnp.arange(n_rows * N_DRAWS))
    tokens, _ = _sample(rep(logits), keys, rep(t), rep(k), rep(p))
    tokens = np.asarray(tokens).reshape(n_rows, N_DRAWS)
    for b in range(n_rows):
        empirical = np.bincount(tokens[b], minlength=V) / N_DRAWS
        right = _probs(_hf_processed(logits[b], t[b], k[b], p[b]))
        wrong = _probs(_hf_processed(logits[b], t[b], k[b], p[b], order=("top_p", "temperature", "top_k")))
        assert _tv(right, wrong) >= 0.1, f"row {b} does not discriminate the order"
        assert _tv(empirical, right) < TV_TOL, (b, _tv(empirical, right))
        assert _tv(empirical, wrong) > 3 * TV_TOL, (b, _tv(empirical, wrong))
        assert np.all(empirical[right == 0] == 0), f"row {b} drew a removed token"


def test_rows_are_independent_of_batch_composition():
    logits, t, k, p = _cases()
    keys = row_keys(jax.random.key(3), jnp.arange(len(logits)))
    full, _ = _sample(jnp.asarray(logits), keys, t, k, p)
    part, _ = _sample(jnp.asarray(logits[2:4]), keys[2:4], t[2:4], k[2:4], p[2:4])
    np.testing.assert_array_equal(np.asarray(full)[2:4], np.asarray(part))


def test_each_row_alone_is_processed_as_in_the_batch():
    """Alone, a row whose batch has no top-k (or no top-p) row skips that search: the same result."""
    logits, t, k, p = _cases()
    batch = np.asarray(_process(jnp.asarray(logits), t, k, p))
    for b in range(len(logits)):
        alone = np.asarray(_process(jnp.asarray(logits[b:b + 1]), t[b:b + 1], k[b:b + 1], p[b:b + 1]))
        np.testing.assert_array_equal(alone[0], batch[b], err_msg=f"row {b}")


def test_methods_draw_the_same_tokens_and_the_default_follows_the_backend():
    logits, t, k, p = _cases()
    keys = row_keys(jax.random.key(2), jnp.arange(len(logits)))
    draws = [np.asarray(jax.jit(sample, static_argnames="method")(jnp.asarray(logits), keys, t, k, p,
                                                                  method=m)[0]) for m in METHODS]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert default_method() == ("sort" if jax.default_backend() == "gpu" else "search")
    with pytest.raises(ValueError, match="method='radix'"):
        process_logits(jnp.zeros((1, V)), jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1), method="radix")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="temperature"):
        process_logits(jnp.zeros((2, V)), jnp.ones(()), jnp.zeros(2, jnp.int32), jnp.ones(2))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        process_logits(jnp.zeros((V,)), jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1))
