"""Per-row logit processing and sampling: temperature -> top-k -> top-p, with Hugging Face's semantics.

Every sampling parameter is a per-row array (`temperature [B]` float, `top_k [B]` int, `top_p [B]` float),
so rows with different settings share one compiled function. Semantics, row by row, as HF's
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` applied in that order:

- temperature `t > 0`: logits / t. `t == 0`: greedy, the row's distribution is a point mass on the first
  argmax of the raw logits (HF `do_sample=False`).
- top-k: `k == 0` is a no-op; otherwise `k = min(max(k, min_tokens_to_keep), V)` and every token whose
  scaled logit is below the k-th largest is removed (ties with the k-th value are all kept).
- top-p: `p >= 1` is a no-op; otherwise tokens are sorted ascending, and those whose cumulative
  probability (softmax over the top-k survivors) is `<= 1 - p` are removed, never the last
  `min_tokens_to_keep`. Tied logits are ordered by token id (a stable sort), so at a tie straddling the
  cut the lower id goes first. HF uses `torch.sort`, which is stable only for small rows; for big
  vocabularies its tie order at the cut is unspecified. `1 - p` is computed in float32 from the float32
  `p` (HF rounds the float64 `1 - p`): the two differ only for a cumulative probability within a float32
  ulp of the cut.

Two ways to the same cuts (`method`): "sort", one stable ascending argsort per row, and "search", no sort
(on a CPU, XLA's sort of a [B, V] row cost most of a small model's decode step): the k-th largest value and
the top-p cut are found per row by a 32-step bisection over the float32 values' bit patterns (masked counts
and sums over the vocabulary), and the tie group straddling a cut is split by token id with one cumsum;
each search is skipped when no row of the batch uses its filter. A GPU sorts fast and would wait on the
device at each of the search's loop steps and branches, so the default is "sort" there, "search" elsewhere.

Removed tokens get logit `-inf`. Sampling draws from `softmax(processed)` with `jax.random.categorical`
(Gumbel-max), one key per row; `row_keys(key, row_ids)` derives them with `jax.random.fold_in`, so a
row's draw does not depend on which other rows share its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
METHODS = ("search", "sort")      # how `process_logits` finds the top-k and top-p cuts (same results)


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One PRNG key per row: `fold_in(key, row_id)` for each id in `row_ids [B]`."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(row_ids, jnp.int32))


def _check(logits, temperature, top_k, top_p):
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    b = logits.shape[0]
    for name, arr in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if jnp.shape(arr) != (b,):
            raise ValueError(f"{name} must be a per-row array of shape ({b},), got shape {jnp.shape(arr)}")


def process_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                   min_tokens_to_keep: int = 1, method: str | None = None) -> jax.Array:
    """Processed float32 logits [B, V]: removed tokens are `-inf`; a greedy row is 0 at its argmax.

    `softmax` of the result is the distribution a row samples from. `method` (static): "search" (bisection,
    no sort) or "sort" (one stable argsort per row); both give the same result; None picks "sort" on a GPU
    (a fast sort, and its loops and branches would each wait on the device) and "search" elsewhere.
    """
    _check(logits, temperature, top_k, top_p)
    method = default_method() if method is None else method
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)[:, None]
    top_k = jnp.asarray(top_k, jnp.int32)[:, None]
    top_p = jnp.asarray(top_p, jnp.float32)[:, None]

    greedy = temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    k = jnp.where(top_k > 0, jnp.clip(top_k, min_tokens_to_keep, v), v)
    processed = (_sorted_filters if method == "sort" else _searched_filters)(scaled, k, top_p, min_tokens_to_keep)
    point_mass = jnp.where(jnp.arange(v) == jnp.argmax(logits, axis=-1)[:, None], 0.0, NEG_INF)
    return jnp.where(greedy, point_mass, processed)


def default_method() -> str:
    """The `process_logits` method for the default backend: "sort" on a GPU, "search" elsewhere."""
    return "sort" if jax.default_backend() == "gpu" else "search"


def _sorted_filters(scaled, k, top_p, min_tokens_to_keep):
    """Top-k then top-p with one stable ascending sort per row: top-k removes a prefix of it (values below
    the k-th largest) and leaves the order of the survivors, which is the order top-p cuts in."""
    v = scaled.shape[-1]
    order = jnp.argsort(scaled, axis=-1, stable=True)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    removed = ranked < jnp.take_along_axis(ranked, v - k, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(jnp.where(removed, NEG_INF, ranked), axis=-1), axis=-1)
    keep_tail = jnp.arange(v) >= v - min_tokens_to_keep
    removed |= (cum <= 1.0 - top_p) & (top_p < 1.0) & ~keep_tail
    rows = jnp.arange(scaled.shape[0])[:, None]
    return jnp.zeros_like(scaled).at[rows, order].set(jnp.where(removed, NEG_INF, ranked))


def _searched_filters(scaled, k, top_p, min_tokens_to_keep):
    """Top-k then top-p without sorting (module docstring); each search is skipped when no row uses it."""
    v = scaled.shape[-1]
    key = _order_key(scaled)
    kth = jax.lax.cond(jnp.any(k < v),      # no row filters: skip the search
                       lambda: _largest(lambda t: jnp.sum(key >= t, axis=-1, keepdims=True) >= k, key.shape[0]),
                       lambda: jnp.zeros((key.shape[0], 1), jnp.uint32))
    removed = key < kth

    removed |= jax.lax.cond(jnp.any(top_p < 1.0),      # no row filters: skip the search
                            lambda: _top_p_removed(scaled, removed, top_p, min_tokens_to_keep),
                            lambda: jnp.zeros_like(removed))
    return jnp.where(removed, NEG_INF, scaled)


def _top_p_removed(scaled, removed, top_p, min_tokens_to_keep):
    """Top-p over the top-k survivors, as an ascending stable sort would cut, without sorting. With the
    tokens in ascending (probability, id) order, a token goes when the cumulative probability through it is
    <= 1 - p: the whole groups of equal probability up to the largest value `low` whose cumulative mass
    (everything <= it) is <= 1 - p go; in the next group, tokens go by id while the mass through them stays
    <= 1 - p; everything above stays."""
    probs = jax.nn.softmax(jnp.where(removed, NEG_INF, scaled), axis=-1)
    pkey = _order_key(probs)
    cut = 1.0 - top_p
    low = _largest(lambda t: jnp.sum(jnp.where(pkey <= t, probs, 0.0), axis=-1, keepdims=True) <= cut,
                   pkey.shape[0])
    below = pkey <= low
    mass_below = jnp.sum(jnp.where(below, probs, 0.0), axis=-1, keepdims=True)
    nxt = jnp.min(jnp.where(below, jnp.uint32(0xFFFFFFFF), pkey), axis=-1, keepdims=True)
    group = pkey == nxt
    through = mass_below + jnp.cumsum(jnp.where(group, probs, 0.0), axis=-1)   # by id within the group
    gone = below | (group & (through <= cut))
    return gone & (top_p < 1.0) & ~_top_tokens(pkey, min_tokens_to_keep)


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys whose order is the order of the float32 values x (-0.0 taken as 0.0; no NaN)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest(holds, rows: int) -> jax.Array:
    """Per row, the largest uint32 t [rows, 1] for which `holds(t)` ([rows, 1] bool) is true, for a `holds`
    that is true from 0 up to some point and false after it: built bit by bit from the top, 32 steps."""
    def bit(i, t):
        trial = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(trial), trial, t)
    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows, 1), jnp.uint32))


def _top_tokens(key: jax.Array, m: int) -> jax.Array:
    """The last m tokens of each row in ascending (key, id) order: [B, V] bool."""
    if m == 1:      # the largest key's last token
        ids = jnp.arange(key.shape[-1])
        last = jnp.max(jnp.where(key == jnp.max(key, axis=-1, keepdims=True), ids, -1), axis=-1, keepdims=True)
        return ids == last
    mth = _largest(lambda t: jnp.sum(key >= t, axis=-1, keepdims=True) >= m, key.shape[0])
    above = key > mth
    room = m - jnp.sum(above, axis=-1, keepdims=True)
    tied = key == mth
    from_top = jnp.cumsum(tied[:, ::-1], axis=-1)[:, ::-1]      # rank by id, highest id first
    return above | (tied & (from_top <= room))


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           *, min_tokens_to_keep: int = 1, method: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row. `keys`: one key per row (see `row_keys`).

    Returns `(tokens [B] int32, logprobs [B] float32)`, the log-probability of each chosen token under the
    row's *processed* distribution (0 for greedy rows). The raw model log-probability is
    `token_logprobs(logits, tokens)`.
    """
    processed = process_logits(logits, temperature, top_k, top_p, min_tokens_to_keep=min_tokens_to_keep,
                               method=method)
    if jnp.shape(keys)[0] != logits.shape[0]:
        raise ValueError(f"need one key per row: {logits.shape[0]} rows, keys of shape {jnp.shape(keys)}")
    drawn = jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)
    tokens = jnp.where(jnp.asarray(temperature) == 0, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
    return tokens, token_logprobs(processed, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[b, tokens[b]] in float32, [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
