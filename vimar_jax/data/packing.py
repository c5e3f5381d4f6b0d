"""Value states grouped by image and packed behind one shared image prefix (SPEC §1), for TD training.

**The state.** A sentence state (`state = "sentence"`) is the image and one sentence, rendered with the value
model's chat template as one user turn `[image, sentence]` (no prompt, no generation prompt; the image comes
first so that every state of an image starts with the same tokens). `StateTemplate` splits the rendered
tokens into a **prefix** (everything up to the sentence: BOS, turn header, the expanded `<image>` tokens)
that depends only on the image size, and a **suffix** (the sentence's tokens and the end of the turn)
that depends only on the sentence. The value of a state is read at its last token. The inference-time value
scorer must render states with the same `StateTemplate` (prefix prefilled once per image, suffixes valued
against it), so that training and search see identical token sequences.

A **prefix state** (`state = "prefix"`, the value-state ablation) is a user turn `[image, prompt]` and an
assistant turn holding the caption so far and the sentence. Its prefix ends with the image tokens; its
suffix (the prompt, the caption so far + the sentence, the end of the turn) is never cut, and a trajectory of
n sentences costs about n²/2 sentences of tokens: give it a longer `seq_len`.

**Packing.** One row of a batch is `[prefix, suffix_1, ..., suffix_m, padding]` with segment ids 0 for the
prefix, k for suffix k and -1 for padding; positions of every suffix continue after the prefix, so each
suffix attends to the prefix and causally to itself exactly as if the state ran alone (the decoder's
segment mask, docs/CONTRACTS.md). Rows have static shapes: `seq_len` tokens and `max_states` value queries.
Every trajectory sits whole in one row, so V(s_{i+1}) is in the same row as V(s_i) and the TD target uses it
through a row-local index (`next_slot`), which survives any split of the batch over devices, hosts or
gradient-accumulation micro-batches. The rows of an image hold the prefix once each: an image whose
trajectories do not fit one row takes several. A trajectory longer than a whole row is cut to the states
that fit (counted); its last kept state, if not terminal, has no next value and is left out of the loss.

Row arrays (`[B, ...]` after batching): input_ids / positions / segment_ids [T]; query_index, next_slot,
reward, done, loss_mask, state_mask, returns [Q] (returns = discounted future reward of the state over its
whole trajectory, for validation); pixel_values [max_patches, 3, S, S]; image_size [2]; gather_index
[max_image_tokens] (row-local: `batch_gather_index` turns it into the batch's flat feature index).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vimar_jax import image as image_lib

_SLOT = "\u2063STATE\u2063"   # stands for the state's text while the template is rendered
STATES = ("sentence", "prefix")


def state_frame(processor, state: str, prompt: str | None = "") -> tuple[str, str]:
    """(head, tail): a value state renders as head + text + tail with the model's chat template, the head
    holding the one image placeholder. `state="sentence"`: one user turn `[image, text]` (the prompt is not
    used); `state="prefix"`: a user turn `[image, prompt]` and an assistant turn holding the text."""
    if state not in STATES:
        raise ValueError(f"state={state!r}: expected one of {STATES}")
    return _frame(processor, state, prompt if state == "prefix" else "")


@functools.lru_cache(maxsize=64)
def _frame(processor, state: str, prompt: str) -> tuple[str, str]:
    image = {"type": "image"}
    if state == "sentence":
        conv = [{"role": "user", "content": [image, {"type": "text", "text": _SLOT}]}]
    else:
        conv = [{"role": "user", "content": [image, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": _SLOT}]}]
    full = processor.apply_chat_template(conv, add_generation_prompt=False)
    if full.count(_SLOT) != 1:
        raise ValueError(f"the value model's chat template must render the state's text once, got {full!r}")
    head, tail = full.split(_SLOT)
    if head.count(processor.image_token) != 1 or processor.image_token in tail:
        raise ValueError(f"the chat template must put exactly one {processor.image_token} before the state's text: "
                         f"{full!r}")
    return head, tail


def state_text(sentence: str, state: str = "sentence", previous: Sequence[str] = ()) -> str:
    """The text a state holds: the sentence, or (prefix states) the caption so far and the sentence joined by
    spaces."""
    if state == "sentence":
        return sentence.strip()
    return " ".join(t.strip() for t in [*previous, sentence] if t.strip())


class StateTemplate:
    """Token ids of value states: `prefix_ids(image_hw)` + `suffix_ids(sentences, previous, prompt)` (see the
    module docstring). `processor` is our `vimar_jax.processor.Processor` of the value model.
    `state="sentence"`: the prefix is the template's head (through the image), the suffix the sentence and
    the end of the turn; suffixes longer than `max_suffix_tokens` keep their first tokens and the template's
    closing tokens. `state="prefix"`: the prefix ends with the image tokens, the suffix is the rest of the
    state (prompt, assistant header, caption so far + sentence, closing tokens), never cut: the split
    `vimar_jax.decode.scorers.ValueScorer` uses, which holds whatever way the template's text after the image
    merges with the state's text under tokenization."""

    def __init__(self, processor, *, max_suffix_tokens: int = 64, state: str = "sentence"):
        if state not in STATES:
            raise ValueError(f"state={state!r}: expected one of {STATES}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = processor.image_token_id
        self.max_suffix_tokens = int(max_suffix_tokens)
        self.state = state
        head, _ = state_frame(processor, state, "")
        bos = self.tokenizer.bos_token
        # HF's chat path: a rendered template that writes the BOS itself is tokenized without special tokens.
        self._add_special = not (bos and head.startswith(bos))
        head_ids = self._encode([head])[0]
        # The shared prefix: sentence states, the whole head; prefix states, the tokens through the image.
        self.head_ids = head_ids if state == "sentence" else head_ids[:head_ids.index(self.image_token_id) + 1]
        self.num_tail = len(self._suffixes([""], None)[0]) if state == "sentence" else 0
        if state == "sentence" and self.max_suffix_tokens <= self.num_tail:
            raise ValueError(f"max_suffix_tokens={max_suffix_tokens} leaves no room for a sentence (the template "
                             f"closes a state with {self.num_tail} tokens)")

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kw) -> "StateTemplate":
        from vimar_jax.processor import Processor

        return cls(Processor.from_dir(path), **kw)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=self._add_special)

    def _suffixes(self, texts: Sequence[str], prompt: str | None) -> list[list[int]]:
        if self.state == "prefix" and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"prefix states need the prompt the caption answered, got {prompt!r}")
        head, tail = state_frame(self.processor, self.state, prompt)
        n = len(self.head_ids)
        out = []
        for text, ids in zip(texts, self._encode([head + t + tail for t in texts])):
            if ids[:n] != self.head_ids:
                raise ValueError(f"tokenizing a state changes its image prefix (text {text[:60]!r}); the chat "
                                 f"template must separate the image from the state's text")
            out.append(ids[n:])
        return out

    def suffix_ids(self, sentences: Sequence[str], previous: Sequence[Sequence[str]] | None = None,
                   prompt: str | None = None) -> list[np.ndarray]:
        """The suffix token ids [n_i] int32 of each sentence's state (prefix states: `previous[i]` is the
        caption before sentence i, `prompt` the prompt it answered; sentence states are cut to
        `max_suffix_tokens`)."""
        for i, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"sentence {i} is empty: empty fragments are not states")
        if previous is not None and len(previous) != len(sentences):
            raise ValueError(f"previous has {len(previous)} entries for {len(sentences)} sentences")
        prev = previous if previous is not None else [()] * len(sentences)
        texts = [state_text(s, self.state, p) for s, p in zip(sentences, prev)]
        out = []
        for ids in self._suffixes(texts, prompt):
            if self.state == "sentence":
                ids = self.cut(ids)
            out.append(np.asarray(ids, np.int32))
        return out

    def cut(self, body: Sequence[int]) -> list[int]:
        """A sentence state's tokens after the template head (the sentence and the closing tokens), cut to
        `max_suffix_tokens`: its first tokens and the template's closing ones."""
        body = list(body)
        if len(body) <= self.max_suffix_tokens:
            return body
        keep = self.max_suffix_tokens - self.num_tail
        return body[:keep] + body[len(body) - self.num_tail:]

    def prefix_ids(self, image_hw: Sequence[int]) -> np.ndarray:
        """The prefix token ids [P] int32 of an image of size (h, w), `<image>` expanded."""
        n = self.processor.num_image_tokens(tuple(int(x) for x in image_hw))
        out = []
        for t in self.head_ids:
            out += [t] * n if t == self.image_token_id else [t]
        return np.asarray(out, np.int32)

    def state_ids(self, image_hw: Sequence[int], sentence: str, previous: Sequence[str] = (),
                  prompt: str | None = None) -> np.ndarray:
        """One whole state (prefix + suffix) as a plain sequence."""
        return np.concatenate([self.prefix_ids(image_hw), self.suffix_ids([sentence], [previous], prompt)[0]])


# ------------------------------------------------------------------------------------------- trajectories

@dataclasses.dataclass
class Trajectory:
    """The sentence states of one caption: suffix ids and per-sentence rewards; the last one is terminal."""
    traj: int
    suffixes: list[np.ndarray]
    rewards: np.ndarray            # [n] float32
    gt: bool = False

    def __len__(self) -> int:
        return len(self.suffixes)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s) for s in self.suffixes))

    def returns(self, gamma: float) -> np.ndarray:
        """Discounted future reward G_i = r_i + γ G_{i+1} of each state (G after the last = 0)."""
        g, out = 0.0, np.zeros(len(self), np.float32)
        for i in range(len(self) - 1, -1, -1):
            g = float(self.rewards[i]) + gamma * g
            out[i] = g
        return out


@dataclasses.dataclass
class Group:
    """All trajectories of one image."""
    key: str
    image: str                     # image reference (sources.open_image)
    image_hw: tuple[int, int]
    trajectories: list[Trajectory]

    @property
    def num_states(self) -> int:
        return sum(len(t) for t in self.trajectories)


def groups_from_records(records: Iterable[Mapping[str, Any]], template: StateTemplate, rewards: Sequence[float]
                        ) -> list[Group]:
    """Image groups from transition records in file order (`rewards[k]` is record k's reward): every
    trajectory of an image, whatever prompt it answered (a prefix state holds its record's `prompt` in its
    suffix), in one group keyed by the image reference. Records of a trajectory must be consecutive with
    indices 0..n-1 (as gen_rollouts writes them)."""
    groups: dict[str, Group] = {}
    pending: dict[tuple[str, int], list] = {}
    order: list[tuple[str, int]] = []
    for k, rec in enumerate(records):
        key = (rec["group"], rec["traj"])
        items = pending.setdefault(key, [])
        if not items:
            order.append(key)
        if rec["index"] != len(items):
            raise ValueError(f"group {rec['group']!r} trajectory {rec['traj']}: record {k} has sentence index "
                             f"{rec['index']}, expected {len(items)} (records of a trajectory must be consecutive)")
        items.append((rec["text"], float(rewards[k]), rec))
    for key in order:
        items = pending[key]
        first = items[0][2]
        if len(items) != first["num_sentences"] or not items[-1][2]["done"]:
            raise ValueError(f"group {key[0]!r} trajectory {key[1]}: {len(items)} records for "
                             f"{first['num_sentences']} sentences")
        prompt = first.get("prompt")
        if template.state == "prefix" and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"group {key[0]!r} trajectory {key[1]}: prefix states need the record's 'prompt', "
                             f"got {prompt!r}")
        g = groups.get(first["image"])
        if g is None:
            g = groups[first["image"]] = Group(first["image"], first["image"], tuple(first["image_hw"]), [])
        elif g.image_hw != tuple(first["image_hw"]):
            raise ValueError(f"image {first['image']!r} has sizes {list(g.image_hw)} and {first['image_hw']} in "
                             f"different records")
        texts = [t for t, _, _ in items]
        suffixes = template.suffix_ids(texts, [texts[:i] for i in range(len(texts))], prompt)
        g.trajectories.append(Trajectory(first["traj"], suffixes,
                                         np.asarray([r for _, r, _ in items], np.float32), bool(first["gt"])))
    return list(groups.values())


def split_groups(groups: Sequence[Group], val_fraction: float, seed: int = 0) -> tuple[list[Group], list[Group]]:
    """(train, validation) by image: a group is held out when a stable hash of (seed, key) falls below the
    fraction, so the split does not depend on the order or number of shards, and no image is in both."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for g in groups:
        u = zlib.crc32(f"{seed}:{g.key}".encode()) / 2**32
        (val if u < val_fraction else train).append(g)
    return train, val


# ------------------------------------------------------------------------------------------------ packing

@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One packed row: group `group`, its trajectories `trajs` with how many states of each are kept."""
    group: int
    trajs: tuple[tuple[int, int], ...]


@dataclasses.dataclass
class PackStats:
    rows: int = 0
    states: int = 0
    truncated_trajectories: int = 0
    dropped_states: int = 0
    tokens: int = 0                 # real tokens (prefixes + suffixes)
    capacity: int = 0               # rows * seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fill"] = self.tokens / self.capacity if self.capacity else 0.0
        return d


def plan_rows(groups: Sequence[Group], template: StateTemplate, *, seq_len: int, max_states: int
              ) -> tuple[list[RowPlan], PackStats]:
    """Pack each group's trajectories first-fit into rows of `seq_len` tokens and `max_states` states."""
    rows: list[RowPlan] = []
    stats = PackStats()
    for gi, g in enumerate(groups):
        P = len(template.prefix_ids(g.image_hw))
        cap = seq_len - P
        if cap <= 0:
            raise ValueError(f"seq_len={seq_len} leaves no room after the {P}-token image prefix of {g.image} "
                             f"(size {list(g.image_hw)})")
        open_rows: list[list] = []   # [tokens used, states used, [(traj, kept)]]
        for ti, t in enumerate(g.trajectories):
            lens = [len(s) for s in t.suffixes]
            kept, used = 0, 0
            while kept < len(lens) and kept < max_states and used + lens[kept] <= cap:
                used += lens[kept]
                kept += 1
            if kept == 0:
                raise ValueError(f"seq_len={seq_len}: the first state of {g.key}/{t.traj} ({lens[0]} tokens) does "
                                 f"not fit after the {P}-token image prefix")
            if kept < len(lens):
                stats.truncated_trajectories += 1
                stats.dropped_states += len(lens) - kept
            for r in open_rows:
                if r[0] + used <= cap and r[1] + kept <= max_states:
                    break
            else:
                r = [0, 0, []]
                open_rows.append(r)
            r[0] += used
            r[1] += kept
            r[2].append((ti, kept))
        for used, n, trajs in open_rows:
            rows.append(RowPlan(gi, tuple(trajs)))
            stats.rows += 1
            stats.states += n
            stats.tokens += P + used
            stats.capacity += seq_len
    return rows, stats


def pack_row(prefix: np.ndarray, trajectories: Sequence[tuple[Trajectory, int]], *, seq_len: int, max_states: int,
             gamma: float, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The token and state arrays of one row: `prefix` then the first `kept` states of each trajectory."""
    ids = np.full((seq_len,), pad_id, np.int32)
    positions = np.zeros((seq_len,), np.int32)
    segments = np.full((seq_len,), -1, np.int32)
    Q = max_states
    out = {k: np.zeros((Q,), np.float32) for k in ("reward", "loss_mask", "state_mask", "returns")}
    out["done"] = np.ones((Q,), np.float32)
    query = np.zeros((Q,), np.int32)
    next_slot = np.full((Q,), -1, np.int32)
    P = len(prefix)
    ids[:P] = prefix
    positions[:P] = np.arange(P)
    segments[:P] = 0
    t, q = P, 0
    for traj, kept in trajectories:
        G = traj.returns(gamma)
        for i in range(kept):
            s = traj.suffixes[i]
            if t + len(s) > seq_len or q >= Q:
                raise ValueError(f"row overflow: {seq_len} tokens / {Q} states are not enough (plan the rows first)")
            ids[t:t + len(s)] = s
            positions[t:t + len(s)] = P + np.arange(len(s))
            segments[t:t + len(s)] = q + 1
            t += len(s)
            query[q] = t - 1
            terminal = i == len(traj) - 1
            out["reward"][q] = traj.rewards[i]
            out["done"][q] = float(terminal)
            out["state_mask"][q] = 1.0
            out["returns"][q] = G[i]
            if i + 1 < kept:
                next_slot[q] = q + 1
            out["loss_mask"][q] = 1.0 if (terminal or i + 1 < kept) else 0.0
            q += 1
    return {"input_ids": ids, "positions": positions, "segment_ids": segments, "query_index": query,
            "next_slot": next_slot, **out}


def image_arrays(image, image_config: image_lib.ImageConfig) -> dict[str, np.ndarray]:
    """pixel_values [max_patches, 3, S, S], image_size [2] and the row-local gather_index [max_image_tokens]
    of one PIL image."""
    views = image_lib.preprocess_anyres(image, image_config).astype(np.float32)
    n_max = image_config.max_num_patches
    pv = np.zeros((n_max,) + views.shape[1:], np.float32)
    pv[:views.shape[0]] = views
    hw = image_lib.image_size_hw(image)
    index, _ = image_lib.feature_gather_index(np.asarray([hw]), n_max, image_config)
    return {"pixel_values": pv, "image_size": np.asarray(hw, np.int32), "gather_index": index[0]}


def empty_row(template: StateTemplate, *, seq_len: int, max_states: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A padding row (no tokens, no states), e.g. to fill the last validation batch."""
    cfg = template.processor.image_config
    S = cfg.image_size
    n_max = cfg.max_num_patches
    index, _ = image_lib.feature_gather_index(np.asarray([[S, S]]), n_max, cfg)
    row = pack_row(np.zeros((0,), np.int32), [], seq_len=seq_len, max_states=max_states, gamma=0.0, pad_id=pad_id)
    return {**row, "pixel_values": np.zeros((n_max, 3, S, S), np.float32), "image_size": np.asarray([S, S], np.int32),
            "gather_index": index[0]}


class RowBuilder:
    """Plan -> row arrays, loading images by reference. `open_image(ref) -> PIL` is given by the caller."""

    def __init__(self, groups: Sequence[Group], template: StateTemplate, open_image: Callable[[str], Any], *,
                 seq_len: int, max_states: int, gamma: float):
        self.groups, self.template, self.open_image = groups, template, open_image
        self.seq_len, self.max_states, self.gamma = int(seq_len), int(max_states), float(gamma)
        tok = template.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def __call__(self, plan: RowPlan) -> dict[str, np.ndarray]:
        g = self.groups[plan.group]
        img = self.open_image(g.image)
        arrays = image_arrays(img, self.template.processor.image_config)
        if tuple(int(x) for x in arrays["image_size"]) != tuple(g.image_hw):
            raise ValueError(f"image {g.image} is {list(arrays['image_size'])}, its transitions say {list(g.image_hw)}")
        row = pack_row(self.template.prefix_ids(g.image_hw), [(g.trajectories[t], k) for t, k in plan.trajs],
                       seq_len=self.seq_len, max_states=self.max_states, gamma=self.gamma, pad_id=self.pad_id)
        return {**row, **arrays}

    def empty(self) -> dict[str, np.ndarray]:
        return empty_row(self.template, seq_len=self.seq_len, max_states=self.max_states, pad_id=self.pad_id)


def collate(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int | None = None,
            empty: Callable[[], Mapping[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Stack rows into a batch, padded with `empty()` rows up to `batch_size` when given."""
    rows = list(rows)
    if batch_size is not None and len(rows) < batch_size:
        if empty is None:
            raise ValueError(f"{len(rows)} rows for a batch of {batch_size} and no empty-row factory")
        rows += [empty() for _ in range(batch_size - len(rows))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------ model side

def batch_gather_index(local_index, num_patches: int, tokens_per_view: int):
    """Row-local gather indices [B, N] (each computed as for a batch of one image: features of row 0, the
    newline at `num_patches * tokens_per_view`) -> indices into the batch's flat feature array."""
    import jax.numpy as jnp

    B = local_index.shape[0]
    per_row = num_patches * tokens_per_view
    rows = jnp.arange(B, dtype=jnp.int32)[:, None]
    return jnp.where(local_index >= per_row, B * per_row, local_index + rows * per_row).astype(jnp.int32)


def packed_values(model, batch: Mapping[str, Any]):
    """Values [B, Q] float32 of every state slot of a packed batch (garbage where `state_mask` is 0)."""
    cfg = model.backbone.config.image_config()
    gi = batch_gather_index(batch["gather_index"], batch["pixel_values"].shape[1], cfg.tokens_per_view)
    return model.values(batch["input_ids"], batch["pixel_values"], None, gi, batch["positions"],
                        batch["segment_ids"], query_index=batch["query_index"])


def next_values(values, next_slot):
    """V(s_{i+1}) [B, Q] from the same row's values at `next_slot` (0 where there is none)."""
    import jax.numpy as jnp

    nv = jnp.take_along_axis(values, jnp.maximum(next_slot, 0), axis=1)
    return jnp.where(next_slot >= 0, nv, 0.0)


def td_loss(model, batch: Mapping[str, Any], *, gamma: float, target_model=None):
    """(loss, metrics, values) of semi-gradient TD(0) on a packed batch: y_i = r_i + γ (1 − done_i)
    stopgrad(V(s_{i+1})), V(s_{i+1}) from the same packed pass (or from `target_model`, e.g. EMA params)."""
    import jax

    from vimar_jax import td

    values = packed_values(model, batch)
    source = values if target_model is None else jax.lax.stop_gradient(packed_values(target_model, batch))
    nv = next_values(source, batch["next_slot"])
    loss, metrics = td.td_loss_and_metrics(values.reshape(-1), nv.reshape(-1), batch["reward"].reshape(-1),
                                           batch["done"].reshape(-1), batch["loss_mask"].reshape(-1), gamma)
    return loss, metrics, values
