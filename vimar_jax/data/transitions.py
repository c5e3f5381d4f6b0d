"""Transition records: the value model's training data, as array_record shards with a manifest.

A rollout directory (written by `train/gen_rollouts.py`) holds

    transitions-00000-of-00004.array_record   one record per sentence of every trajectory, in order
    transitions-00000-of-00004.json           the shard's index: groups (image, prompt) with their
                                              trajectories' record ranges, counts, δ, skipped images
    manifest.json                             written once every shard is done: totals, δ statistics,
                                              τ resolved, the generation settings

A record is the JSON object (UTF-8 bytes) of one transition (s_i, r_i, s_{i+1}, done_i) of trajectory
`traj` of image group `group`:

| field          | type        |                                                                      |
|----------------|-------------|----------------------------------------------------------------------|
| image          | str         | image reference (`vimar_jax.data.sources.open_image(ref, root)`)     |
| image_hw       | [int, int]  | the image's (height, width)                                          |
| prompt         | str         | the prompt the trajectory answered                                   |
| group          | str         | id of the (image, prompt) pair, unique in the directory              |
| traj           | int         | trajectory number within the group (0 = greedy, ..., last = GT)      |
| temperature    | float       | sampling temperature of the trajectory (0 = greedy; -1 = ground truth)|
| gt             | bool        | the trajectory is the ground-truth caption                           |
| index          | int         | sentence index i in the trajectory                                   |
| num_sentences  | int         | sentences in the trajectory                                          |
| text           | str         | the sentence                                                         |
| span           | [int, int]  | its token span [start, end) in the trajectory's policy tokens        |
| delta          | float       | CLIP δ = cos(image, sentence)                                        |
| done           | bool        | i is the trajectory's last sentence (terminal transition)            |

**Rewards are not stored; they are computed when records are read** (`TransitionSource`, `rewards`) from δ
and the reward settings: r = margin(δ, τ) (SPEC §2), or the constant ground-truth reward for `gt`
trajectories. τ given as a percentile (`"p17"`) needs δ of *all* rollouts, known only once every shard is
written, so the manifest stores the resolved τ (`manifest["reward"]["tau"]`) and training reads it (or
overrides it). s_{i+1} is the next record of the same trajectory (absent when `done`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vimar_jax import reward as reward_lib

FIELDS: dict[str, type | tuple[type, ...]] = {
    "image": str, "image_hw": list, "prompt": str, "group": str, "traj": int, "temperature": (int, float),
    "gt": bool, "index": int, "num_sentences": int, "text": str, "span": list, "delta": (int, float),
    "done": bool,
}
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^transitions-(\d{5})-of-(\d{5})\.array_record$")
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


class RecordError(ValueError):
    """A transition record that does not follow the schema (the message names the field and the file)."""


# ------------------------------------------------------------------------------------------------ records

def validate(rec: Mapping[str, Any], where: str = "record") -> dict:
    """`rec` as a dict if it has every field with the right type; `RecordError` naming the field otherwise."""
    if not isinstance(rec, Mapping):
        raise RecordError(f"{where}: a transition record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}")
    for k, t in FIELDS.items():
        v = rec[k]
        ok = isinstance(v, t) and not (t in (int, (int, float)) and isinstance(v, bool))
        if not ok:
            raise RecordError(f"{where}: field {k!r} must be {getattr(t, '__name__', t)}, got {type(v).__name__}")
    for k in ("image_hw", "span"):
        if len(rec[k]) != 2 or not all(isinstance(x, int) for x in rec[k]):
            raise RecordError(f"{where}: field {k!r} must be two ints, got {rec[k]!r}")
    if not 0 <= rec["index"] < rec["num_sentences"]:
        raise RecordError(f"{where}: index {rec['index']} outside [0, num_sentences={rec['num_sentences']})")
    if rec["done"] != (rec["index"] == rec["num_sentences"] - 1):
        raise RecordError(f"{where}: done must be true exactly for the last sentence (index {rec['index']} of "
                          f"{rec['num_sentences']})")
    if not np.isfinite(rec["delta"]):
        raise RecordError(f"{where}: delta is not finite")
    return dict(rec)


def encode(rec: Mapping[str, Any]) -> bytes:
    return json.dumps(validate(rec), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode(data: bytes, where: str = "record") -> dict:
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{where}: not a JSON transition record ({e})") from None
    return validate(rec, where)


def trajectory_records(*, image: str, image_hw: Sequence[int], prompt: str, group: str, traj: int,
                       temperature: float, gt: bool, sentences: Sequence[str], spans: Sequence[Sequence[int]],
                       deltas: Sequence[float]) -> list[dict]:
    """The records of one trajectory's sentences (validated)."""
    n = len(sentences)
    if not (len(spans) == len(deltas) == n):
        raise ValueError(f"trajectory {group}/{traj}: {n} sentences, {len(spans)} spans, {len(deltas)} deltas")
    return [validate({"image": image, "image_hw": [int(x) for x in image_hw], "prompt": prompt, "group": group,
                      "traj": int(traj), "temperature": float(temperature), "gt": bool(gt), "index": i,
                      "num_sentences": n, "text": s, "span": [int(x) for x in spans[i]], "delta": float(deltas[i]),
                      "done": i == n - 1}, f"{group}/{traj}/{i}")
            for i, s in enumerate(sentences)]


# ------------------------------------------------------------------------------------------------- shards

def shard_name(index: int, count: int) -> str:
    return f"transitions-{index:05d}-of-{count:05d}.array_record"


def index_name(index: int, count: int) -> str:
    return shard_name(index, count).replace(".array_record", ".json")


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard: records go to a temporary array_record file; `commit(index)` closes it, renames it
    into place and then writes the shard's index JSON (whose presence marks the shard finished). A shard
    that was not committed leaves only its temporary file, which the next writer replaces."""

    def __init__(self, directory: str, index: int, count: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.path.join(directory, shard_name(index, count))
        self.index_path = os.path.join(directory, index_name(index, count))
        self.tmp = self.path + ".partial"
        for stale in (self.tmp, self.path, self.index_path):
            if os.path.exists(stale):
                os.remove(stale)
        self._writer = ArrayRecordWriter(self.tmp, "group_size:1")
        self.count = 0

    def write(self, rec: Mapping[str, Any]) -> int:
        """Append one record; returns its index in the shard."""
        self._writer.write(encode(rec))
        self.count += 1
        return self.count - 1

    def commit(self, index: Mapping[str, Any]) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)
        _atomic_json(self.index_path, {**index, "num_records": self.count})

    def abort(self) -> None:
        self._writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def shard_done(directory: str, index: int, count: int) -> bool:
    """A shard is finished when both its records and its index file exist."""
    return (os.path.isfile(os.path.join(directory, index_name(index, count)))
            and os.path.isfile(os.path.join(directory, shard_name(index, count))))


def shard_paths(directory: str) -> list[str]:
    """The shard files of a rollout directory, in order; all must belong to one `-of-N` set and be complete."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"rollout directory {directory} does not exist")
    found = sorted(f for f in os.listdir(directory) if _SHARD.match(f))
    if not found:
        raise FileNotFoundError(f"{directory} holds no transitions-*-of-*.array_record shards")
    counts = {int(_SHARD.match(f).group(2)) for f in found}
    if len(counts) != 1:
        raise ValueError(f"{directory} mixes shard sets of sizes {sorted(counts)}")
    n = counts.pop()
    missing = [shard_name(i, n) for i in range(n) if not shard_done(directory, i, n)]
    if missing:
        raise ValueError(f"{directory}: shards not finished: {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                         f"(rerun gen_rollouts to complete them)")
    return [os.path.join(directory, shard_name(i, n)) for i in range(n)]


def read_shard_index(shard_path: str) -> dict:
    with open(shard_path.replace(".array_record", ".json"), encoding="utf-8") as f:
        return json.load(f)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the rollouts are unfinished (rerun gen_rollouts)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    _atomic_json(os.path.join(directory, MANIFEST), dict(manifest))


def read_shard(path: str) -> list[dict]:
    """All records of one shard, decoded and validated."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        n = reader.num_records()
        return [decode(b, f"{os.path.basename(path)}#{i}") for i, b in enumerate(reader.read(list(range(n))))] \
            if n else []
    finally:
        reader.close()


def delta_stats(deltas: Iterable[float]) -> dict:
    """count, mean, std, min, max and P10..P90 of δ."""
    d = np.asarray(list(deltas), np.float64)
    if d.size == 0:
        return {"count": 0}
    out = {"count": int(d.size), "mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()),
           "max": float(d.max())}
    out.update({f"p{q}": float(np.percentile(d, q)) for q in PERCENTILES})
    return out


# ------------------------------------------------------------------------------------------------ reading

def resolve_reward_config(manifest: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                          deltas: Sequence[float] | np.ndarray | None = None) -> reward_lib.RewardConfig:
    """The reward settings of a rollout directory (`manifest["reward"]`, τ resolved there) updated by
    `overrides` (keys of `RewardConfig`; None, "" or "manifest" keep the manifest's value). A percentile τ
    ("p17") is taken over `deltas` (the rollouts' δ, ground truth excluded) when given, else from the
    manifest's δ percentiles P10..P90."""
    base = dict(manifest.get("reward") or {})
    cfg = {k: base[k] for k in ("tau", "alpha", "variant", "ground_truth_reward") if k in base}
    for k, v in (overrides or {}).items():
        if v is None or v == "" or v == "manifest":
            continue
        cfg[k] = v
    tau = cfg.get("tau", reward_lib.DEFAULT_TAU)
    if isinstance(tau, str):
        try:
            tau = float(tau)
        except ValueError:
            if deltas is not None:
                tau = reward_lib.resolve_tau(tau, deltas)
            else:
                key = tau.strip()
                stats = manifest.get("delta_stats", {})
                if key not in stats:
                    raise ValueError(f"reward tau={tau!r}: without the δ values only the manifest's percentiles "
                                     f"{[f'p{q}' for q in PERCENTILES]} are known; give a float or one of those") \
                        from None
                tau = float(stats[key])
    cfg["tau"] = float(tau)
    return reward_lib.RewardConfig.from_mapping(cfg)


def rewards(deltas, gt, cfg: reward_lib.RewardConfig) -> np.ndarray:
    """Rewards of transitions from their δ and ground-truth flags (float32)."""
    d = np.asarray(deltas, np.float32)
    shaped = np.asarray(reward_lib.shape_reward(d, float(cfg.tau), cfg.variant, cfg.alpha), np.float32)
    return np.where(np.asarray(gt, bool), np.float32(cfg.ground_truth_reward), shaped).astype(np.float32)


class TransitionSource:
    """grain random-access source over the records of a rollout directory (all shards in order); each item
    is the record with its `reward` filled in from δ and the reward settings."""

    def __init__(self, directory: str, reward: reward_lib.RewardConfig | Mapping[str, Any] | None = None):
        import grain

        self.directory = directory
        self.paths = shard_paths(directory)
        self.manifest = read_manifest(directory)
        self.reward = reward if isinstance(reward, reward_lib.RewardConfig) else \
            resolve_reward_config(self.manifest, reward)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        rec = decode(self._source[int(i)], f"{self.directory} record {int(i)}")
        rec["reward"] = float(rewards([rec["delta"]], [rec["gt"]], self.reward)[0])
        return rec

    def __repr__(self) -> str:
        return f"TransitionSource({self.directory!r}, {len(self)} records)"
