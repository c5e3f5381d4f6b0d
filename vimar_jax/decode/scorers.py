"""Scorers for the search engine (`vimar_jax.decode.search.Scorer`): the value model and CLIP.

**Value states (SPEC §1).** A state is rendered with the value checkpoint's chat template exactly as the value
trainer renders it (`vimar_jax.data.packing.StateTemplate`), and valued at its last token:

- `state="sentence"` (default): one user turn `[image, sentence]`, no generation prompt, the template's
  closing tokens included; a sentence longer than the checkpoint's `vimar_value.max_suffix_tokens` keeps
  its first tokens and the closing tokens, as in training;
- `state="prefix"`: a user turn `[image, prompt]` and an assistant turn holding the caption so far and the
  sentence (joined by spaces), closing tokens included.

`render_state` gives that text (one image placeholder).

**One image prefix per image.** `ValueScorer.begin` prefills the tokens up to and including the image tokens
once (batch 1): that boundary is the same for every state of the image, whatever follows. `score` tokenizes
each *whole* state (with one `<image>` token: special tokens split tokenization, so this equals tokenizing
the expanded text), checks that the tokens before the image are the cached ones, and values all states in
one batched forward of their suffixes (every token after the image) against the cached prefix, each distinct
suffix once (candidates often repeat a sentence). Suffixes are
packed several to a row as the value trainer packs them (`vimar_jax.data.packing.pack_row`): segment ids
1..m within a row (-1 = padding), each suffix's positions restarting at the prefix length, its value read at
its last token. The decoder's attention with a `prefix=` cache (and no per-row cache) takes `segment_ids`:
a suffix sees the prefix by position and only its own segment's earlier tokens. Rows hold `min_width` tokens
(a power of two, more only when one suffix is longer) and their count is a power of two, so calls reuse
compilations. Because the suffix is cut from the whole state's tokens, a template whose
text before the sentence merges with the sentence under tokenization still gives the state's exact tokens.
The first state scored per image is also tokenized with the image expanded and compared, so a tokenizer for
which the one-token shortcut would be wrong fails loudly instead of giving different values.

**CLIP.** `ClipScorer` caches the image embedding; a sentence's score is the cosine similarity δ of the
L2-normalised projected embeddings (no logit scale).

**θ.** `theta_default(value)` reads the statistics the value trainer stores in `config.json["vimar_value"]`
(see its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimar_jax.data.packing import STATES, StateTemplate, state_frame, state_text
from vimar_jax.decode.generate import pow2_bucket
from vimar_jax.models.decoder import KVCache

DEFAULT_PROMPT = "Describe this image in detail."
DEFAULT_THETA_PERCENTILE = 30


# ------------------------------------------------------------------------------------------ rendering

def render_state(processor, sentence: str, *, state: str = "sentence", prompt: str = DEFAULT_PROMPT,
                 previous: Sequence[str] = ()) -> str:
    """The text of a value state (one image placeholder, not expanded); see the module docstring."""
    head, tail = state_frame(processor, state, prompt)
    return head + state_text(sentence, state, previous) + tail


# ------------------------------------------------------------------------------------------ value

@functools.partial(jax.jit, static_argnums=(0, 6))
def _value_prefill(graphdef, state, ids, pixel_values, gather_index, positions, cache_len):
    """The image prefix [1, P] (positions -1 = padding) into a cache of `cache_len` slots (the layers the
    value needs)."""
    m = nnx.merge(graphdef, state)
    return m.prefill(ids, pixel_values, None, gather_index, positions, max_len=cache_len)


@functools.partial(jax.jit, static_argnums=0)
def _value_score(graphdef, state, tokens, positions, segment_ids, prefix, last_index):
    """Values [R, Q] at token indices `last_index [R, Q]` of the packed suffixes `tokens [R, W]` (segments
    1..m per row, -1 = padding) after the cached prefix."""
    m = nnx.merge(graphdef, state)
    return m.values(tokens, None, None, None, positions, segment_ids, prefix=prefix, query_index=last_index)


@dataclasses.dataclass
class ValueContext:
    """One image: its prefix (tokens through the last image token) prefilled into `cache` (batch 1)."""
    cache: KVCache
    length: int                  # prefix tokens
    image_tokens: int            # image tokens the placeholder expands to
    before: list[int]            # tokens before the image placeholder
    prompt: str
    image_size: tuple[int, int]
    checked: bool = False        # the expanded-tokenization check was done


class ValueScorer:
    """The value model as a `Scorer`. `value`: a `vimar_jax.vlm.Value` loaded from a directory.

    `state`: "sentence" | "prefix" (default: the checkpoint's `vimar_value.state`); `prompt`: the detail
    prompt of prefix states (`begin(image, prompt=...)` overrides it per image). States are packed
    first-fit (longest first) into rows of `min_width` tokens (the next power of two >= the longest suffix
    when that is more), as many rows as the states fill, rounded up by `row_bucket` (a power of two >=
    `min_rows` up to 8, then a multiple of 8): so the N·K candidates of a search step (about 12 tokens each
    in the tiny world) are one call of 4 rows, and ViMaR's Stage 1 (~200 states) one of 16 or 24 rather than
    32. States whose tokens are identical (the same sentence in several candidates, for sentence states) are
    valued once: a call costs about its rows times the row width on a CPU, padding included."""

    def __init__(self, value, *, state: str | None = None, prompt: str = DEFAULT_PROMPT, min_rows: int = 4,
                 min_width: int = 128):
        if getattr(value, "path", None) is None:
            raise ValueError("ValueScorer needs a value model loaded from a directory (tokenizer, processor)")
        self.value = value
        self.processor = value.processor
        self.tokenizer = self.processor.tokenizer
        self.state = state or value.config.state
        if self.state not in STATES:
            raise ValueError(f"state={self.state!r}: expected one of {STATES}")
        self.prompt = prompt
        extra = getattr(value.config, "extra", {}) or {}
        limit = extra.get("max_suffix_tokens")
        # Sentence states are cut as training cut them: the trainer's StateTemplate says where and how.
        self._cutter = None
        if limit is not None and self.state == "sentence":
            try:
                self._cutter = StateTemplate(self.processor, max_suffix_tokens=int(limit))
            except ValueError as e:
                raise ValueError(f"{value.path}/config.json: vimar_value.{e}") from None
        self.min_rows, self.min_width = int(min_rows), int(min_width)
        self.graphdef, self.params = nnx.split(value.module)
        self.shapes: dict[str, set] = {"prefill": set(), "score": set()}

    def _encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def begin(self, image, prompt: str | None = None) -> ValueContext:
        prompt = self.prompt if prompt is None else prompt
        head, _ = state_frame(self.processor, self.state, prompt)
        image_id = self.processor.image_token_id
        ids = self._encode(head)
        before = ids[:ids.index(image_id)]
        inputs = self.processor(images=[image], texts=[self.processor.image_token], add_special_tokens=False)
        hw = tuple(int(v) for v in inputs["image_sizes"][0])
        n_img = self.processor.num_image_tokens(hw)
        prefix = np.asarray(before + [image_id] * n_img, np.int32)
        prep = self.value.prepare(prefix[None], inputs["pixel_values"], inputs["image_sizes"])
        positions = np.where(prep["valid"], np.arange(prep["valid"].shape[1])[None], -1).astype(np.int32)
        bucket = prep["input_ids"].shape[1]
        cache = _value_prefill(self.graphdef, self.params, jnp.asarray(prep["input_ids"]),
                               jnp.asarray(prep["pixel_values"]), jnp.asarray(prep["gather_index"]),
                               jnp.asarray(positions), bucket)
        self.shapes["prefill"].add(bucket)
        return ValueContext(cache, len(prefix), n_img, before, prompt, hw)

    def suffix(self, ctx: ValueContext, sentence: str, previous: Sequence[str] = ()) -> list[int]:
        """The tokens of a state after the image placeholder (checked against the cached prefix)."""
        if not sentence.strip():
            raise ValueError("an empty sentence is not a state")
        text = render_state(self.processor, sentence, state=self.state, prompt=ctx.prompt, previous=previous)
        ids = self._encode(text)
        image_id = self.processor.image_token_id
        if ids.count(image_id) != 1:
            raise ValueError(f"a value state must hold one {self.processor.image_token} token: {text[:200]!r}")
        i = ids.index(image_id)
        if ids[:i] != ctx.before:
            raise ValueError(f"tokenizing the state changes the tokens before the image ({ids[:i]} vs the cached "
                             f"{ctx.before}): {text[:200]!r}")
        if not ctx.checked:
            expanded = self.processor.expand_image_tokens([text], [ctx.image_size])[0]
            if self._encode(expanded) != ids[:i] + [image_id] * ctx.image_tokens + ids[i + 1:]:
                raise ValueError("tokenizing the state with the image expanded differs from the prefix + suffix "
                                 f"tokens: this tokenizer merges across the image tokens ({text[:200]!r})")
            ctx.checked = True
        return self._truncate(ids, i)

    def _truncate(self, ids: list[int], i: int) -> list[int]:
        """The tokens after the image; a sentence state's part after the template head keeps at most
        `max_suffix_tokens` (its first tokens and the closing ones), as `packing.StateTemplate` does."""
        if self._cutter is None:
            return ids[i + 1:]
        head = self._cutter.head_ids
        n = len(head) if ids[:len(head)] == head else i + 1
        return ids[i + 1:n] + self._cutter.cut(ids[n:])

    def score(self, ctx: ValueContext, sentences: Sequence[str],
              previous: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Values [n] float32 of the states of `sentences` (with `previous[j]`, the caption before sentence j,
        for prefix states), in one batched pass against the cached image prefix; states with the same tokens
        are valued once and share that value."""
        n = len(sentences)
        if n == 0:
            return np.zeros((0,), np.float32)
        if previous is not None and len(previous) != n:
            raise ValueError(f"previous has {len(previous)} entries for {n} sentences")
        unique: dict[tuple[int, ...], int] = {}       # a state's tokens -> its index among the distinct ones
        owner = np.asarray([unique.setdefault(tuple(self.suffix(ctx, s, () if previous is None else previous[j])),
                                              len(unique)) for j, s in enumerate(sentences)], np.int64)
        suffixes = list(unique)
        n = len(suffixes)
        width = pow2_bucket(max(len(s) for s in suffixes), self.min_width)
        packed = _pack_first_fit([len(s) for s in suffixes], width)
        rows = row_bucket(len(packed), self.min_rows)
        tokens = np.full((rows, width), int(self.value.pad_token_id), np.int32)
        positions = np.full((rows, width), ctx.length, np.int32)
        segments = np.full((rows, width), -1, np.int32)
        last = np.zeros((rows, width), np.int32)          # query slots: at most one state per token
        where = np.zeros((n, 2), np.int64)                # (row, query slot) of each state
        for r, members in enumerate(packed):
            t = 0
            for q, j in enumerate(members):
                s = suffixes[j]
                tokens[r, t:t + len(s)] = s
                positions[r, t:t + len(s)] = ctx.length + np.arange(len(s))
                segments[r, t:t + len(s)] = q + 1
                t += len(s)
                last[r, q] = t - 1
                where[j] = (r, q)
        self.shapes["score"].add((rows, width, ctx.cache.max_len))
        out = _value_score(self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                           jnp.asarray(segments), ctx.cache, jnp.asarray(last))
        return np.asarray(out, np.float32)[where[:, 0], where[:, 1]][owner]


def row_bucket(n: int, minimum: int = 1) -> int:
    """Rows of a value-scoring call for n packed rows: a power of two >= max(n, minimum) up to 8, then the
    next multiple of 8 (a call's cost grows with its rows, and multiples of 8 keep the shapes few)."""
    n = max(int(n), int(minimum), 1)
    return pow2_bucket(n) if n <= 8 else -(-n // 8) * 8


def _pack_first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` packed into rows of `width` tokens: longest first, each into the first row with
    room (states keep their original order within a row)."""
    order = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    rows: list[list[int]] = []
    used: list[int] = []
    for j in order:
        if lengths[j] > width:
            raise ValueError(f"a value state of {lengths[j]} suffix tokens exceeds the row width {width}")
        for r, u in enumerate(used):
            if u + lengths[j] <= width:
                rows[r].append(j)
                used[r] += lengths[j]
                break
        else:
            rows.append([j])
            used.append(lengths[j])
    return [sorted(r) for r in rows]


# ------------------------------------------------------------------------------------------ theta

def theta_default(value, percentile: float | None = None) -> float:
    """θ from the sentence-value statistics of a value checkpoint, `config.json["vimar_value"]["stats"]` as
    `train/train_value.py` writes them (percentiles of the validation sentence values):

        {"p10": .., "p20": .., ..., "p90": .., "mean": .., "std": .., "count": ..,
         "theta": 1.9,              # optional: an explicit threshold wins
         "theta_percentile": 30}    # optional: which percentile is θ (default DEFAULT_THETA_PERCENTILE)

    `percentile` overrides both. Raises ValueError (asking for --theta) when the statistics are missing."""
    extra: Mapping[str, Any] = getattr(value.config, "extra", {}) or {}
    stats = extra.get("stats", extra.get("value_stats"))
    where = f"{getattr(value, 'path', None) or 'the value checkpoint'}/config.json"
    if not isinstance(stats, Mapping):
        raise ValueError(f"{where} has no vimar_value.stats (validation sentence-value statistics) to default θ "
                         "from: pass --theta (SearchConfig.theta)")
    if percentile is None and stats.get("theta") is not None:
        return float(stats["theta"])
    q = float(percentile if percentile is not None else stats.get("theta_percentile", DEFAULT_THETA_PERCENTILE))
    key = f"p{q:g}"
    if key not in stats:
        have = sorted(k for k in stats if k.startswith("p") and k[1:].replace(".", "").isdigit())
        raise ValueError(f"{where}: vimar_value.stats has no {key} (has {have}): pass --theta")
    return float(stats[key])


# ------------------------------------------------------------------------------------------ CLIP

class ClipScorer:
    """CLIP cosine similarity δ as a `Scorer`. `clip`: a `vimar_jax.clip.CLIP` (`load_clip`), or anything with
    `embed_images(list[PIL]) -> [N, P]` and `embed_texts(list[str]) -> [N, P]`."""

    def __init__(self, clip, *, min_rows: int = 8):
        for name in ("embed_images", "embed_texts"):
            if not callable(getattr(clip, name, None)):
                raise TypeError(f"ClipScorer needs an object with {name}(...), got {type(clip).__name__}")
        self.clip = clip
        self.min_rows = int(min_rows)

    def begin(self, image, prompt: str | None = None) -> np.ndarray:
        del prompt   # a CLIP score does not depend on the prompt
        emb = np.asarray(self.clip.embed_images([image]), np.float32)
        if emb.ndim != 2 or emb.shape[0] != 1:
            raise ValueError(f"embed_images of one image returned shape {emb.shape}")
        return _unit(emb[0])

    def score(self, ctx: np.ndarray, sentences: Sequence[str], previous=None) -> np.ndarray:
        if len(sentences) == 0:
            return np.zeros((0,), np.float32)
        n = len(sentences)
        # Pad the batch to a power of two of rows (repeating a sentence): fewer shapes to compile.
        padded = list(sentences) + [sentences[0]] * (pow2_bucket(n, self.min_rows) - n)
        emb = np.asarray(self.clip.embed_texts(padded), np.float32)[:n]
        if emb.shape != (n, ctx.shape[0]):
            raise ValueError(f"embed_texts returned shape {emb.shape} for {len(sentences)} sentences")
        return (_unit(emb) @ ctx).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


__all__ = ["ValueScorer", "ValueContext", "ClipScorer", "render_state", "theta_default", "row_bucket", "STATES",
           "DEFAULT_PROMPT", "DEFAULT_THETA_PERCENTILE"]
