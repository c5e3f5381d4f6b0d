"""Orbax checkpoints of a training run: array state, data-iterator state and the run config.

Layout (`CheckpointStore(directory)`, an absolute path):

    directory/<step>/state/      the array pytree (params, optimizer state, step, RNG, ...), orbax format
    directory/<step>/data/       process_<i>-of-<n>.json: each host's data-iterator state
    directory/<step>/config/     the run config as JSON

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once every
item is written (plus a `commit_success.txt`), so a process killed during a save leaves the previous
checkpoints restorable; the unfinished temporary directory is ignored and removed by the next store.
Restores place every array straight onto the sharding given in its abstract target.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"


# ----------------------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process.

def encode_iterator_state(state: Any) -> dict:
    """Iterator state -> JSON-able dict. grain's `DataLoader` iterator returns bytes (JSON text), grain
    `MapDataset`/`DatasetIterator` a dict; other iterators anything JSON-serialisable."""
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "data": base64.b64encode(bytes(state)).decode("ascii")}
    try:
        json.dumps(state)
    except TypeError as e:
        raise TypeError(f"data iterator state is not JSON-serialisable ({e}); get_state() must return bytes "
                        f"or JSON-compatible data") from None
    return {"kind": "json", "data": state}


def decode_iterator_state(blob: Mapping) -> Any:
    if blob.get("kind") == "bytes":
        return base64.b64decode(blob["data"])
    if blob.get("kind") == "json":
        return blob["data"]
    raise ValueError(f"unrecognised data-iterator state record (kind={blob.get('kind')!r})")


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class IteratorStateHandler(ocp.CheckpointHandler):
    """Orbax handler writing this process's iterator state (already encoded, a dict) as JSON."""

    def save(self, directory: epath.Path, args: "IteratorStateSave"):
        _process_file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "IteratorStateRestore" | None = None):
        f = _process_file(directory)
        if not f.exists():
            raise FileNotFoundError(f"no data-iterator state {f} (checkpoint written by a different number "
                                    f"of processes?)")
        return json.loads(f.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------------------

def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), with `shardings` (a matching pytree of
    Shardings) attached when given: the restore target that places each array on its sharding."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Restored:
    step: int
    state: Any                 # the array pytree, on the target shardings
    data_state: Any | None     # decoded iterator state of this process (None if not saved)
    config: dict | None


class CheckpointStore:
    """Keeps the last `keep` checkpoints of a run in `directory` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 temporary_path_class: type | None = None):
        directory = os.fspath(directory)
        if not os.path.isabs(directory):
            raise ValueError(f"checkpoint directory must be absolute, got {directory!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            temporary_path_class=temporary_path_class,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(STATE, DATA, CONFIG))

    # -- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- save / restore
    def save(self, step: int, state, *, data_state: Any = None, config: Mapping | None = None) -> None:
        """Save the array pytree `state` (+ the raw iterator state, + config) as `step`. Asynchronous when the
        store is: arrays are copied off the device before this returns, so `state` may be donated after."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA] = IteratorStateSave(encode_iterator_state(data_state))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(dict(config))
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, target, *, with_data: bool = True) -> Restored:
        """Restore `step` (latest when None) onto `target`: a pytree of ShapeDtypeStructs with shardings
        (see `abstract_like`), same structure as what was saved. `target=None` restores the saved tree as
        it was written (nested dicts of arrays; for inspection)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {STATE: ocp.args.StandardRestore(target) if target is not None else ocp.args.PyTreeRestore()}
        step_dir = os.path.join(os.fspath(self.directory), str(step))
        has_data = os.path.isdir(os.path.join(step_dir, DATA))
        has_config = os.path.isdir(os.path.join(step_dir, CONFIG))
        if with_data and has_data:
            items[DATA] = IteratorStateRestore()
        if has_config:
            items[CONFIG] = ocp.args.JsonRestore()
        out = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        data = decode_iterator_state(out[DATA]) if DATA in items else None
        return Restored(step=int(step), state=out[STATE], data_state=data,
                        config=out[CONFIG] if CONFIG in items else None)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_arrays(directory: str | os.PathLike, target, step: int | None = None):
    """One-shot: the array state of `step` (latest by default) of a run's checkpoint directory onto `target`."""
    with CheckpointStore(directory, async_save=False) as store:
        return store.restore(step, target, with_data=False).state


def tree_equal(a, b) -> bool:
    """Exact equality of two array pytrees (structure, shapes, dtypes and values)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(la, lb))
