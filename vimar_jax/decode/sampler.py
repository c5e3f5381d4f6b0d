"""The jit-compiled batched sampler: one prompt prefill, then one `lax.while_loop` of single-token steps.

Model-agnostic: the model is reached only through a **step function**

    step_fn(params, tokens [B, T] int32, positions [B, T] int32, cache, cache_index, prefix)
        -> (logits [B, T, V] float32, cache)

that runs T new tokens per row against `cache` (written at slots `[cache_index, cache_index + T)`; a
position of -1 marks a padding token whose slot stays empty) and, when `prefix` is given, a batch-1 cache
every row attends to without copying it (`docs/CONTRACTS.md`, "Decoder"). `params` is a pytree passed
through `jit` as an argument (never baked in as constants). Writing an adapter for a model = writing that
function; for an NNX module split it once, `graphdef, params = nnx.split(model)`, and merge inside:
`decoder_step_fn(graphdef)` below does this for `models.decoder.Decoder`. A model whose prompt is not plain
tokens (LLaVA-NeXT: image features) prefills with its own code and hands the sampler a `Start`.

**Shared prompt (the main efficiency point).** Prefill the prompt once with batch 1 into a cache, then
decode B rows with `prefix=` that cache and an own cache of `buffer_size` slots per row, after
`start.broadcast(B)`: every step reads the prompt's keys once for all rows instead of B copies.
A per-row prompt cache (right-padded prompts of different lengths in one bucket, no left padding) is
the other mode: prefill `[B, P]` into a cache of `P + buffer_size` slots and decode from it.

Each loop step samples one token per running row (`sampling.sample`, per-row keys
`fold_in(fold_in(rng, row_id), step)`, so a row's draws do not depend on its batch neighbours), records it,
applies the stopping rules, then runs the model on it. So every kept token is in the cache and the final
state's `start` holds each row's next-token logits, position and slot: a finished state can be resumed
(`decode(params, state.start, state.cache, ...)`). Rows stop:
- at EOS (`eos_ids`; the EOS token is recorded, counted in `lengths`, and written to the cache),
- at their n-th sentence end when `stop_after_sentences[b] = n > 0`; with a look-ahead rule the token that
  revealed the end (the first token of the next sentence) is dropped: not recorded, not counted, not
  written to the cache, so the row ends exactly at its sentence end and resumes there,
- at their token budget `max_new_tokens[b]` (traced: changing it does not recompile; clamped to the
  static `buffer_size`),
- when the own cache has no slot for another token (`Finish.CACHE_FULL`, also `state.cache_full`):
  never a silent overwrite. The slot index is one scalar for the batch and advances every step while any
  row runs, so a cache of `cache_index + buffer_size` slots always suffices for one call, and resuming
  needs slots beyond the returned `start.cache_index`.

**Compaction** (`decode(..., compact=True)`, for long runs on a CPU). A loop step costs about its rows on a
CPU, and a batch of candidates runs until its longest row stops. With `compact`, the loop stops once at
most half of the rows are still going; those rows (and finished ones to fill) move to a batch of half the
size, and so on down to `COMPACT_MIN_ROWS` (`compaction_sizes`); the results are put back in the full
batch. Each row keeps its random stream and its step count, so it samples what it would have sampled (up
to float rounding across batch sizes). The price: every size is another copy of the loop in the compiled
program (about 3.5 s of compiling each for the tiny world's policy), so it pays off over many calls of the
same shapes, not over a few. On a GPU a step costs about the same for any number of rows: leave it off.

Sentence boundaries are recorded for every row in every mode: `boundaries[b, i]` is the exclusive end
(a count of generated tokens) of sentence i, `num_sentences[b]` how many there are (it may exceed the
array's width `max_sentences`; later ends are then not stored). Ends come from a `SentenceRule`, either
- `SentenceRule.inclusive(fn)` for a plain `fn(prev_token [B], token [B]) -> bool [B]`: `token` ends a
  sentence, inclusive (prev of the first generated token is the last prompt token), or
- `SentenceRule.from_table(table)` for `vimar_jax.text.SentenceEndTable`: a carried segmentation state,
  an end known one token late (the sentence is the tokens before the token that revealed it), so
  decimals, abbreviations and initials do not end sentences.
EOS closes a non-empty trailing sentence (its end excludes the EOS token); empty sentences are never
recorded. A sentence still open when a row stops at its budget or a full cache is not recorded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vimar_jax.decode.sampling import sample, token_logprobs

StepFn = Callable[..., tuple[jax.Array, Any]]
# (params, tokens [B,T], positions [B,T], cache, cache_index, prefix, last_index [B]) -> (logits [B,V], cache)
PrefillFn = Callable[..., tuple[jax.Array, Any]]
BoundaryFn = Callable[[jax.Array, jax.Array], jax.Array]   # (prev_tokens [B], tokens [B]) -> ends [B]
MAX_EOS = 8   # eos_ids are padded to this width (with -1) so sets of different sizes share a compile
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"   # jax.monitoring event, per XLA compile


class Finish(enum.IntEnum):
    """Why a row stopped (`DecodeState.reason`)."""
    RUNNING = 0      # inside the loop only: every row of a returned state has a reason
    EOS = 1
    SENTENCE = 2
    BUDGET = 3
    CACHE_FULL = 4


@dataclasses.dataclass(frozen=True)
class SentenceRule:
    """How the decode loop finds sentence ends token by token (static: part of the compiled program)."""
    init: Callable[[jax.Array], Any]                       # last prompt token [B] -> state ([B]-leading leaves)
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]]  # (state, tok [B]) -> (state, ended [B] bool)
    lookahead: bool                                        # ended[b]: the sentence ended *before* tok

    @staticmethod
    def inclusive(fn: BoundaryFn) -> "SentenceRule":
        """`fn(prev [B], tok [B]) -> bool [B]`: tok ends a sentence (and belongs to it)."""
        return SentenceRule(init=lambda last: last, step=lambda prev, tok: (tok, fn(prev, tok)), lookahead=False)

    @staticmethod
    def from_table(table) -> "SentenceRule":
        """`vimar_jax.text.sentence_boundary` over a `SentenceEndTable` (fresh state at the decode start)."""
        from vimar_jax import text

        return SentenceRule(init=lambda last: text.init_sentence_state(last.shape[0], jnp),
                            step=lambda state, tok: text.sentence_boundary(table, state, tok), lookahead=True)


@flax.struct.dataclass
class Start:
    """Where decoding begins, per row: next-token logits, next position, previous token, next cache slot."""
    logits: jax.Array        # [B, V] float32
    positions: jax.Array     # [B] int32, position of the first generated token
    last_token: jax.Array    # [B] int32, the token before it (for the boundary function)
    cache_index: jax.Array   # scalar int32, the first free slot of the (own) cache

    def broadcast(self, batch: int) -> "Start":
        """The start of a batch-1 prompt for `batch` rows sharing it as a prefix (own cache from slot 0)."""
        if self.logits.shape[0] != 1:
            raise ValueError(f"broadcast needs a batch-1 start, got batch {self.logits.shape[0]}")
        rep = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])  # noqa: E731
        return Start(rep(self.logits), rep(self.positions), rep(self.last_token), jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class Settings:
    """Per-row sampling and stopping parameters (all traced: new values never recompile)."""
    temperature: jax.Array            # [B] float32, 0 = greedy
    top_k: jax.Array                  # [B] int32, 0 = off
    top_p: jax.Array                  # [B] float32, 1 = off
    max_new_tokens: jax.Array         # [B] int32
    stop_after_sentences: jax.Array   # [B] int32, 0 = do not stop at sentence ends
    eos_ids: jax.Array                # [MAX_EOS] int32, -1 = unused

    @staticmethod
    def make(batch: int, *, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens, stop_after_sentences=0,
             eos_ids=()) -> "Settings":
        """Broadcast scalars or per-row sequences to [batch] arrays; `eos_ids` is a set of token ids."""
        def row(name, x, dtype):
            arr = np.asarray(x, dtype)
            if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != batch):
                raise ValueError(f"{name} must be a scalar or have {batch} entries, got shape {arr.shape}")
            return jnp.asarray(np.broadcast_to(arr, (batch,)))
        eos = np.asarray(sorted({int(e) for e in np.asarray(eos_ids, np.int64).reshape(-1)}), np.int32)
        if eos.size > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} eos_ids, got {eos.size}")
        if (eos < 0).any():
            raise ValueError(f"eos_ids must be token ids >= 0, got {eos.tolist()}")
        temperature, top_k, top_p = (row("temperature", temperature, np.float32), row("top_k", top_k, np.int32),
                                     row("top_p", top_p, np.float32))
        if (np.asarray(temperature) < 0).any():
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {np.asarray(temperature).tolist()}")
        if (np.asarray(top_k) < 0).any():
            raise ValueError(f"top_k must be >= 0 (0 = off), got {np.asarray(top_k).tolist()}")
        if ((np.asarray(top_p) < 0) | (np.asarray(top_p) > 1)).any():
            raise ValueError(f"top_p must be in [0, 1] (1 = off), got {np.asarray(top_p).tolist()}")
        return Settings(temperature, top_k, top_p,
                        row("max_new_tokens", max_new_tokens, np.int32),
                        row("stop_after_sentences", stop_after_sentences, np.int32),
                        jnp.asarray(np.pad(eos, (0, MAX_EOS - eos.size), constant_values=-1)))

    def take(self, rows: jax.Array) -> "Settings":
        """The settings of rows `rows [R]` (the EOS set is shared)."""
        t = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
        return Settings(t(self.temperature), t(self.top_k), t(self.top_p), t(self.max_new_tokens),
                        t(self.stop_after_sentences), self.eos_ids)


@flax.struct.dataclass
class DecodeState:
    """The loop state, and the result. Generated tokens only (no prompt); `tokens[b, lengths[b]:]` = pad."""
    step: jax.Array            # scalar int32
    done: jax.Array            # [B] bool
    reason: jax.Array          # [B] int32 (`Finish`)
    tokens: jax.Array          # [B, N] int32
    lengths: jax.Array         # [B] int32
    logprobs: jax.Array        # [B, N] float32: chosen token under the processed distribution (0 if greedy)
    raw_logprobs: jax.Array    # [B, N] float32: chosen token under the model's softmax
    boundaries: jax.Array      # [B, M] int32: exclusive sentence ends
    num_sentences: jax.Array   # [B] int32
    sentence_state: Any        # the SentenceRule's state (None without a rule)
    rng: jax.Array             # the base key
    start: Start               # where a resumed decode would continue (next logits, positions, slot)
    cache: Any

    @property
    def cache_full(self) -> jax.Array:
        return self.reason == Finish.CACHE_FULL

    def take_rows(self, rows: jax.Array) -> "DecodeState":
        """The state of rows `rows [R]` (the cache through its `take_rows`)."""
        t = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
        return self.replace(
            done=t(self.done), reason=t(self.reason), tokens=t(self.tokens), lengths=t(self.lengths),
            logprobs=t(self.logprobs), raw_logprobs=t(self.raw_logprobs), boundaries=t(self.boundaries),
            num_sentences=t(self.num_sentences), sentence_state=jax.tree.map(t, self.sentence_state),
            start=self.start.replace(logits=t(self.start.logits), positions=t(self.start.positions),
                                     last_token=t(self.start.last_token)),
            cache=self.cache.take_rows(rows))

    def put_rows(self, rows: jax.Array, part: "DecodeState") -> "DecodeState":
        """This state with rows `rows [R]` replaced by `part`'s (batch R), at `part`'s step and slot."""
        p = lambda full, x: full.at[rows].set(x)  # noqa: E731
        return part.replace(
            done=p(self.done, part.done), reason=p(self.reason, part.reason), tokens=p(self.tokens, part.tokens),
            lengths=p(self.lengths, part.lengths), logprobs=p(self.logprobs, part.logprobs),
            raw_logprobs=p(self.raw_logprobs, part.raw_logprobs), boundaries=p(self.boundaries, part.boundaries),
            num_sentences=p(self.num_sentences, part.num_sentences),
            sentence_state=jax.tree.map(p, self.sentence_state, part.sentence_state),
            start=part.start.replace(logits=p(self.start.logits, part.start.logits),
                                     positions=p(self.start.positions, part.start.positions),
                                     last_token=p(self.start.last_token, part.start.last_token)),
            cache=self.cache.put_rows(rows, part.cache))


class Sampler:
    """Jitted prefill and decode around one model step function (see the module docstring).

    `boundary_fn`: a `SentenceRule`, or a jit-friendly `fn(prev [B], tok [B]) -> bool [B]` (taken as
    `SentenceRule.inclusive(fn)`); None: no sentence ends. `prefill_fn` (optional) is `step_fn` that
    returns only each row's logits at `last_index [B]`; the default computes all and gathers.
    """

    def __init__(self, step_fn: StepFn, *, prefill_fn: PrefillFn | None = None,
                 boundary_fn: SentenceRule | BoundaryFn | None = None, max_sentences: int = 32,
                 min_tokens_to_keep: int = 1, pad_id: int = 0):
        self.step_fn = step_fn
        self.prefill_fn = prefill_fn or _prefill_from_step(step_fn)
        if boundary_fn is not None and not isinstance(boundary_fn, SentenceRule):
            if not callable(boundary_fn):
                raise TypeError(f"boundary_fn must be a SentenceRule or a callable, got {type(boundary_fn).__name__}")
            boundary_fn = SentenceRule.inclusive(boundary_fn)
        self.rule: SentenceRule | None = boundary_fn
        self.max_sentences = max_sentences
        self.min_tokens_to_keep = min_tokens_to_keep
        self.pad_id = pad_id
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("buffer_size", "sizes"), donate_argnames=("cache",))

    # -------------------------------------------------------------------------------------- prefill
    def prefill(self, params, tokens, lengths, cache, *, cache_index=0, start_positions=0, prefix=None
                ) -> tuple[Start, Any]:
        """Run right-padded prompts `tokens [B, P]` (row b's real tokens are `[:lengths[b]]`, >= 1) into
        `cache` at slots `[cache_index, cache_index + P)`, positions `start_positions + i` (pass the prefix
        length when continuing after a `prefix`). Returns the decode `Start` and the cache (donated)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"prompt tokens must be [B, P], got shape {tokens.shape}")
        lengths = jnp.asarray(lengths, jnp.int32)
        if lengths.shape != tokens.shape[:1]:
            raise ValueError(f"lengths must have shape ({tokens.shape[0]},), got {lengths.shape}")
        concrete = _concrete(lengths)
        if concrete is not None:
            bad = np.flatnonzero((concrete < 1) | (concrete > tokens.shape[1]))
            if bad.size:
                raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}]; rows {bad.tolist()} are not")
        starts = jnp.broadcast_to(jnp.asarray(start_positions, jnp.int32), lengths.shape)
        return self._prefill(params, tokens, lengths, cache, jnp.asarray(cache_index, jnp.int32), starts, prefix)

    def _prefill_impl(self, params, tokens, lengths, cache, cache_index, starts, prefix):
        iota = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        positions = jnp.where(iota < lengths[:, None], starts[:, None] + iota, -1)
        logits, cache = self.prefill_fn(params, tokens, positions, cache, cache_index, prefix, lengths - 1)
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        start = Start(logits.astype(jnp.float32), starts + lengths, last, cache_index + tokens.shape[1])
        return start, cache

    # --------------------------------------------------------------------------------------- decode
    def decode(self, params, start: Start, cache, settings: Settings, rng: jax.Array, *, buffer_size: int,
               prefix=None, row_ids=None, sentence_state=None, compact: bool = False) -> DecodeState:
        """Generate up to `buffer_size` tokens per row (static: the result's width). `cache` is the rows'
        own cache (donated: do not reuse the argument), `prefix` an optional shared batch-1 cache,
        `row_ids [B]` the ids folded into `rng` per row (default 0..B-1), `sentence_state` the rule's
        state to continue from (default: the rule's fresh state). `compact`: run the rows still going in
        halved batches once at most half of them are (see "Compaction" in the module docstring; the cache
        needs `take_rows`/`put_rows`)."""
        batch = start.logits.shape[0]
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if compact and not (hasattr(cache, "take_rows") and hasattr(cache, "put_rows")):
            raise TypeError(f"compact=True needs a cache with take_rows and put_rows; a {type(cache).__name__} "
                            "has not")
        sizes = compaction_sizes(batch) if compact else ()
        for name, x in (("positions", start.positions), ("last_token", start.last_token),
                        ("temperature", settings.temperature), ("max_new_tokens", settings.max_new_tokens)):
            if jnp.shape(x) != (batch,):
                raise ValueError(f"{name} must have shape ({batch},) to match the logits' batch, "
                                 f"got {jnp.shape(x)}")
        concrete = _concrete(settings.max_new_tokens)
        if concrete is not None:
            over = concrete.max(initial=0)
            if over > buffer_size:
                raise ValueError(f"max_new_tokens {over} exceeds buffer_size {buffer_size}")
        row_ids = jnp.arange(batch, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
        if sentence_state is None and self.rule is not None:   # outside jit: one pytree structure, one compile
            sentence_state = self.rule.init(start.last_token)
        return self._decode(params, start, cache, settings, rng, row_ids, prefix, sentence_state,
                            buffer_size=buffer_size, sizes=sizes)

    def _decode_impl(self, params, start, cache, settings, rng, row_ids, prefix, sentence_state, *, buffer_size,
                     sizes=()):
        batch = start.logits.shape[0]
        budget = jnp.minimum(settings.max_new_tokens, buffer_size)
        no_room = start.cache_index >= _cache_len(cache)
        reason = jnp.where(budget <= 0, Finish.BUDGET, jnp.where(no_room, Finish.CACHE_FULL, Finish.RUNNING))
        state = DecodeState(
            step=jnp.zeros((), jnp.int32), done=reason > 0, reason=reason.astype(jnp.int32),
            tokens=jnp.full((batch, buffer_size), self.pad_id, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            logprobs=jnp.zeros((batch, buffer_size), jnp.float32),
            raw_logprobs=jnp.zeros((batch, buffer_size), jnp.float32),
            boundaries=jnp.zeros((batch, self.max_sentences), jnp.int32),
            num_sentences=jnp.zeros((batch,), jnp.int32),
            sentence_state=sentence_state,
            rng=rng, start=start.replace(logits=start.logits.astype(jnp.float32)), cache=cache)

        def run(s, settings, row_ids, budget, more_than=None):
            def cond(s):
                going = (s.step < buffer_size) & ~jnp.all(s.done)
                return going if more_than is None else going & (jnp.sum(~s.done) > more_than)

            return jax.lax.while_loop(cond, lambda s: self._step(params, s, settings, row_ids, prefix, budget), s)

        if not sizes:
            return run(state, settings, row_ids, budget)
        # Compaction: each phase runs until at most `size` rows are going, then carries those rows (running
        # ones first, then finished ones to fill) into a batch of `size`; `rows` maps them to the full batch.
        out, rows, s = None, jnp.arange(batch), state
        for size in sizes:
            s = run(s, settings, row_ids, budget, size)
            out = s if out is None else out.put_rows(rows, s)
            pick = jnp.argsort(s.done.astype(jnp.int32), stable=True)[:size]
            s, rows = s.take_rows(pick), rows[pick]
            settings, row_ids, budget = settings.take(pick), row_ids[pick], budget[pick]
        return out.put_rows(rows, run(s, settings, row_ids, budget))

    def _step(self, params, s: DecodeState, settings: Settings, row_ids, prefix, budget) -> DecodeState:
        t, active = s.step, ~s.done
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(s.rng, r), t))(row_ids)
        tok, logp = sample(s.start.logits, keys, settings.temperature, settings.top_k, settings.top_p,
                           min_tokens_to_keep=self.min_tokens_to_keep)
        raw = token_logprobs(s.start.logits, tok)

        # Sentence ends (EOS closes the open sentence; empty sentences are not recorded).
        eos = active & jnp.any(tok[:, None] == settings.eos_ids[None, :], axis=-1)
        ended, rule_state = jnp.zeros_like(active), s.sentence_state
        if self.rule is not None:
            rule_state, ended = self.rule.step(s.sentence_state, tok)
            ended = active & ~eos & jnp.asarray(ended, bool)
        end = jnp.where(eos | self._lookahead, t, t + 1)
        prev_end = jnp.take_along_axis(s.boundaries, jnp.maximum(s.num_sentences - 1, 0)[:, None], axis=1)[:, 0]
        closes = (ended | eos) & (end > jnp.where(s.num_sentences > 0, prev_end, 0))
        slot = jnp.where(closes & (s.num_sentences < self.max_sentences), s.num_sentences, self.max_sentences)
        boundaries = s.boundaries.at[jnp.arange(tok.shape[0]), slot].set(end, mode="drop")
        num_sentences = s.num_sentences + closes
        sentence_stop = ended & closes & (settings.stop_after_sentences > 0) & (
            num_sentences >= settings.stop_after_sentences)

        # Rows that keep this token: a look-ahead sentence stop drops the token that revealed the end.
        keep = active & ~(sentence_stop & self._lookahead)
        tok = jnp.where(keep, tok, self.pad_id)
        lengths = s.lengths + keep
        reason = jnp.where(eos, Finish.EOS, jnp.where(sentence_stop, Finish.SENTENCE, jnp.where(
            keep & (lengths >= budget), Finish.BUDGET, s.reason)))
        rule_state = jax.tree.map(lambda new, old: jnp.where(_rows(keep, new), new, old), rule_state,
                                  s.sentence_state)

        # Run the model on the kept tokens (other rows: position -1, their slot stays empty).
        logits, cache = self.step_fn(params, tok[:, None], jnp.where(keep, s.start.positions, -1)[:, None],
                                     s.cache, s.start.cache_index, prefix)
        next_index = s.start.cache_index + 1
        reason = jnp.where((reason == Finish.RUNNING) & (next_index >= _cache_len(cache)), Finish.CACHE_FULL, reason)
        start = Start(jnp.where(keep[:, None], logits[:, -1].astype(jnp.float32), s.start.logits),
                      s.start.positions + keep, jnp.where(keep, tok, s.start.last_token), next_index)
        column = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, t))  # noqa: E731
        return DecodeState(step=t + 1, done=reason > 0, reason=reason.astype(jnp.int32),
                           tokens=column(s.tokens, tok), lengths=lengths,
                           logprobs=column(s.logprobs, jnp.where(keep, logp, 0.0)),
                           raw_logprobs=column(s.raw_logprobs, jnp.where(keep, raw, 0.0)),
                           boundaries=boundaries, num_sentences=num_sentences, sentence_state=rule_state,
                           rng=s.rng, start=start, cache=cache)

    @property
    def _lookahead(self) -> bool:
        return self.rule is not None and self.rule.lookahead


COMPACT_MIN_ROWS = 4   # compaction halves a batch down to this many rows (CPU: a step's cost ~ its rows)


def compaction_sizes(batch: int, min_rows: int = COMPACT_MIN_ROWS) -> tuple[int, ...]:
    """The batch sizes a compacted decode of `batch` rows moves through after the first: halves >= min_rows."""
    sizes, size = [], batch // 2
    while size >= min_rows:
        sizes.append(size)
        size //= 2
    return tuple(sizes)


def _rows(mask, x):
    """A [B] mask shaped to broadcast against x [B, ...]."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _concrete(x) -> np.ndarray | None:
    """x as numpy when it has a value (outside a trace), else None."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _cache_len(cache) -> int:
    """Slots of a cache: the `max_len` attribute, else axis -1 of a `pos` [B, S] leaf (KVCache layout)."""
    if hasattr(cache, "max_len"):
        return cache.max_len
    if hasattr(cache, "pos"):
        return cache.pos.shape[-1]
    raise TypeError(f"cannot tell the number of slots of a {type(cache).__name__}: give it a max_len")


def _prefill_from_step(step_fn: StepFn) -> PrefillFn:
    """A prefill function from a step function: all logits, then each row's `last_index` one."""
    def prefill(params, tokens, positions, cache, cache_index, prefix, last_index):
        logits, cache = step_fn(params, tokens, positions, cache, cache_index, prefix)
        return jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0], cache
    return prefill


# ------------------------------------------------------------------------------------- Decoder adapter

def decoder_step_fn(graphdef) -> StepFn:
    """Step function for `models.decoder.Decoder`: `params` is the `nnx.State` of `nnx.split(decoder)`."""
    from flax import nnx

    def step(params, tokens, positions, cache, cache_index, prefix):
        model = nnx.merge(graphdef, params)
        hidden, cache = model(model.embed(tokens), positions=positions, cache=cache, cache_index=cache_index,
                              prefix=prefix)
        return model.logits(hidden), cache
    return step


def decoder_prefill_fn(graphdef) -> PrefillFn:
    """Prefill for `Decoder` that applies the LM head only at each row's last prompt token."""
    from flax import nnx

    def prefill(params, tokens, positions, cache, cache_index, prefix, last_index):
        model = nnx.merge(graphdef, params)
        hidden, cache = model(model.embed(tokens), positions=positions, cache=cache, cache_index=cache_index,
                              prefix=prefix)
        last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)
        return model.logits(last)[:, 0], cache
    return prefill


def decoder_sampler(decoder, **kwargs) -> tuple[Sampler, Any]:
    """`(Sampler, params)` for a `Decoder` module; kwargs go to `Sampler` (boundary_fn, pad_id, ...)."""
    from flax import nnx

    graphdef, params = nnx.split(decoder)
    return Sampler(decoder_step_fn(graphdef), prefill_fn=decoder_prefill_fn(graphdef), **kwargs), params


# ------------------------------------------------------------------------------------- compile counting

@contextlib.contextmanager
def count_compiles() -> Iterator[collections.Counter]:
    """Count XLA compilations inside the block by function name, `jit(f)` reported as `f` (a `Sampler`
    compiles `_prefill_impl` and `_decode_impl`). Calls served from the jit cache are not counted."""
    counts: collections.Counter = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            name = str(kwargs.get("fun_name", "?"))
            counts[name[4:-1] if name.startswith("jit(") and name.endswith(")") else name] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


__all__ = ["Finish", "SentenceRule", "Start", "Settings", "DecodeState", "Sampler", "decoder_step_fn",
           "decoder_prefill_fn", "decoder_sampler", "count_compiles", "compaction_sizes", "MAX_EOS", "COMPACT_MIN_ROWS"]
