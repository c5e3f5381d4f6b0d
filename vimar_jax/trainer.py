"""A model-agnostic, sharded, resumable trainer.

The trainer knows a model only through a loss function `loss_fn(model, batch, rng) -> (loss, aux)`:
`model` is the NNX module (params merged in, compute dtype applied), `batch` one micro-batch (a pytree of
arrays with a leading batch dim), `rng` a PRNG key; `aux` a dict of scalar metrics. If `aux` has a
`"weight"` (e.g. the number of valid samples), micro-batches are combined weighted by it, so gradient
accumulation gives the same result as one big batch for a masked mean loss.

Pieces, usable on their own:
- `default_config()`: every option (ml_collections ConfigDict); `fit` fills missing keys from it.
- `create_train_state(model, tx, mesh=...)`: `TrainState` (graphdef + trainable params + the rest of the
  model + optimizer state + step + RNG) born sharded: `nnx.eval_shape` → logical axes → NamedShardings →
  `jax.jit(init, out_shardings=...)`. `model` is a callable `rngs -> Module` (random init) or a Module
  (e.g. loaded weights; placed onto its shardings).
- `make_optimizer(cfg)`: global-norm clipping + AdamW with linear warm-up and linear decay.
- `make_train_step(...)`: one jitted step (donated state); gradient accumulation is a `lax.scan` over
  micro-batches inside the step; fp32 master weights, optional bf16 compute.
- `fit(...)`: the loop: metrics.jsonl + TensorBoard, orbax checkpoints with the data-iterator state,
  exact resume from an existing workdir, refusal of a workdir made with a different config, stop on a
  non-finite loss without saving the bad state. `load_state(...)` reads a run's checkpoint back.

`python -m vimar_jax.trainer --workdir DIR [--config.KEY=VALUE]` trains a tiny demo regressor (used by
the resume tests).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vimar_jax import checkpoint as ckpt
from vimar_jax import sharding as shd

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

# Config keys that may differ when resuming a workdir (they do not change the numbers of past steps).
RESUME_OVERRIDABLE = ("total_steps", "checkpoint_every", "log_every", "eval_every", "keep_checkpoints",
                      "async_checkpointing")


def default_config() -> ml_collections.ConfigDict:
    """All trainer options with their defaults (the published ViMaR optimisation where it applies)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 0            # global batch per optimizer step; 0 = do not check the data's batch size
    c.grad_accum = 1            # micro-batches per step (scanned inside the jitted step)
    c.lr = 5e-5
    c.end_lr = 0.0
    c.warmup_ratio = 0.03       # of the schedule length; warmup_steps >= 0 overrides it
    c.warmup_steps = -1
    c.decay_steps = 0           # schedule length; 0 = total_steps
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0        # applied to params with >= 2 dims only
    c.max_grad_norm = 1.0       # 0 = no clipping
    c.compute_dtype = "float32"  # or "bfloat16": params are cast for the forward/backward pass
    c.master_dtype = "float32"  # dtype of the trainable params and optimizer state
    c.fp32_params = ()          # path patterns kept in float32 even with bf16 compute (e.g. "value_head")
    c.trainable = "all"         # "all" | "head[:NAME]" | "freeze:PREFIX[,PREFIX...]"
    c.save_frozen = True        # also checkpoint the non-trainable part of the model
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.checkpoint_every = 100    # <= 0: only at the end (log_every/eval_every alike)
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.log_every = 10
    c.eval_every = 0            # 0 = never (needs eval_fn)
    return c


def make_config(overrides: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`default_config()` updated with `overrides`; an unknown key is an error naming it."""
    cfg = default_config()
    if overrides is None:
        return cfg
    given = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides)
    known = _flatten(cfg.to_dict())
    unknown = sorted(k for k in _flatten(given) if k not in known and k.split(".")[0] != "mesh")
    if unknown:
        raise ValueError(f"unknown trainer config keys {unknown}")
    for k, v in given.items():
        if k == "mesh":
            unknown_mesh = sorted(set(dict(v)) - set(shd.MESH_AXES))
            if unknown_mesh:
                raise ValueError(f"unknown mesh config keys {unknown_mesh}; expected {shd.MESH_AXES}")
            for a, n in dict(v).items():
                cfg.mesh[a] = int(n)
        else:
            cfg[k] = v
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Parameter selection and dtypes

def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        out.append(str(k))
    return tuple(out)


def _contains(names: Sequence[str], pattern: str) -> bool:
    """Whether the dotted `pattern` appears as consecutive components of the path `names`."""
    pat = tuple(p for p in pattern.split(".") if p)
    return any(tuple(names[i:i + len(pat)]) == pat for i in range(len(names) - len(pat) + 1))


def _startswith(names: Sequence[str], prefix: str) -> bool:
    pat = tuple(p for p in prefix.split(".") if p)
    return tuple(names[:len(pat)]) == pat


def trainable_filter(spec: str):
    """NNX filter of the trainable params. `"all"`: every `nnx.Param`; `"head[:NAME]"`: only params whose
    path contains NAME (dotted components; default `value_head`); `"freeze:P1,P2"`: all params except those
    under the dotted prefixes P1, P2 (e.g. `backbone.vision`)."""
    spec = spec.strip()
    if spec == "all":
        return nnx.Param
    kind, _, arg = spec.partition(":")
    if kind == "head":
        name = arg.strip() or "value_head"
        return nnx.All(nnx.Param, lambda path, _: _contains(_path_names(path), name))
    if kind == "freeze":
        prefixes = [p.strip() for p in arg.split(",") if p.strip()]
        if not prefixes:
            raise ValueError(f"trainable={spec!r}: give the frozen prefixes, e.g. 'freeze:backbone.vision'")
        return nnx.All(nnx.Param, lambda path, _: not any(_startswith(_path_names(path), p) for p in prefixes))
    raise ValueError(f"trainable={spec!r}: expected 'all', 'head[:NAME]' or 'freeze:PREFIX[,PREFIX]'")


def _check_selection(spec: str, all_params: nnx.State, trainable: nnx.State) -> None:
    paths = [".".join(_path_names(p)) for p, _ in nnx.to_flat_state(all_params)]
    n_train = len(nnx.to_flat_state(trainable))
    if n_train == 0:
        raise ValueError(f"trainable={spec!r} selects no parameter; parameter paths look like {paths[:6]}")
    if spec.startswith("freeze:"):
        for p in (q.strip() for q in spec[7:].split(",") if q.strip()):
            if not any(_startswith(tuple(x.split(".")), p) for x in paths):
                raise ValueError(f"trainable={spec!r}: prefix {p!r} matches no parameter; paths look like "
                                 f"{paths[:6]}")


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def cast_floating(tree, dtype, keep: Sequence[str] = ()):
    """Cast the floating arrays of `tree` to `dtype`, except those whose path contains a `keep` pattern."""
    dtype = jnp.dtype(dtype)

    def one(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        names = _path_names(path)
        if any(_contains(names, k) for k in keep):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------------------------------------
# State

@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # int32 []: optimizer updates done
    params: nnx.State               # trainable parameters (master dtype)
    rest: nnx.State                 # the rest of the model: frozen params, other variables
    opt_state: Any
    rng: jax.Array                  # uint32 [2]: raw PRNG key of the training loop
    graphdef: Any = flax.struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        """The NNX module with the current parameters (e.g. for evaluation)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def arrays(self, *, with_rest: bool = True) -> dict:
        """What a checkpoint holds."""
        d = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        if with_rest:
            d["rest"] = self.rest
        return d

    def with_arrays(self, d: Mapping) -> "TrainState":
        return self.replace(**{k: d[k] for k in ("step", "params", "opt_state", "rng", "rest") if k in d})


def make_schedule(cfg) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then linear decay to `end_lr` at `decay_steps` (or `total_steps`)."""
    length = int(cfg.decay_steps or cfg.total_steps)
    warm = int(cfg.warmup_steps) if cfg.warmup_steps >= 0 else int(round(cfg.warmup_ratio * length))
    warm = min(max(warm, 0), length)
    decay = optax.linear_schedule(cfg.lr, cfg.end_lr, max(length - warm, 1))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule): clip_by_global_norm(max_grad_norm) then AdamW; weight decay on >= 2-D params only."""
    schedule = make_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params))
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    return optax.chain(*parts, adamw), schedule


def create_train_state(model: nnx.Module | Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, *,
                       mesh, rules: shd.Rules = shd.DEFAULT_RULES, seed: int = 0, trainable: str = "all",
                       master_dtype="float32") -> tuple[TrainState, TrainState]:
    """(state, shardings): a sharded TrainState and the matching pytree of NamedShardings.

    `model` is either `rngs -> Module` (initialised inside one jit, each array created on its shardings,
    never materialised whole on one device) or a Module whose state is placed onto the shardings."""
    filt = trainable_filter(trainable)
    master = _dtype(master_dtype)
    model_key, train_key = jax.random.split(jax.random.PRNGKey(seed))

    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, filt, ...)
        _check_selection(trainable, nnx.state(model, nnx.Param), params)

        def build(params, rest):
            params = cast_floating(params, master)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                              rng=train_key, graphdef=graphdef)

        args = (params, rest)
        abstract = jax.eval_shape(build, *args)
        shardings = shd.state_shardings(abstract, mesh, rules)
        args = jax.device_put(args, (shardings.params, shardings.rest))
    else:
        with shd.use_rules(mesh, rules):
            abs_model = nnx.eval_shape(lambda: model(nnx.Rngs(0)))
        graphdef, abs_params, _ = nnx.split(abs_model, filt, ...)
        _check_selection(trainable, nnx.state(abs_model, nnx.Param), abs_params)

        def build(key):
            _, params, rest = nnx.split(model(nnx.Rngs(key)), filt, ...)
            params = cast_floating(params, master)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                              rng=train_key, graphdef=graphdef)

        args = (model_key,)
        abstract = jax.eval_shape(build, *args)
        shardings = shd.state_shardings(abstract, mesh, rules)
    with shd.use_rules(mesh, rules):
        state = jax.jit(build, out_shardings=shardings)(*args)
    return state, shardings


# ----------------------------------------------------------------------------------------------------------
# The step

def _split_micro(batch, n: int, mesh, rules):
    """[B, ...] -> [n, B/n, ...]; micro-batch k takes rows k, k+n, ... so that every micro-batch stays
    spread over the devices holding the batch (each device's rows are contiguous)."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={n}")
        m = x.shape[0] // n
        y = jnp.swapaxes(x.reshape(m, n, *x.shape[1:]), 0, 1)
        if mesh is not None and m % shd.batch_shard_count(mesh, rules) == 0:
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, shd.batch_axes(rules) or None)))
        return y
    return jax.tree.map(one, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: TrainState,
                    *, mesh, rules: shd.Rules = shd.DEFAULT_RULES, grad_accum: int = 1, compute_dtype="float32",
                    fp32_params: Sequence[str] = (), donate: bool = True):
    """`step(state, batch) -> (state, metrics)`, jitted with state/batch shardings and the state donated.
    metrics: loss, grad_norm (before clipping), lr (of this update) and the loss_fn's aux scalars."""
    compute = _dtype(compute_dtype)
    keep = tuple(fp32_params)
    graphdef = shardings.graphdef

    def micro_loss(params, rest, mb, key):
        model = nnx.merge(graphdef, cast_floating(params, compute, keep), cast_floating(rest, compute, keep))
        with shd.use_rules(mesh, rules):
            loss, aux = loss_fn(model, mb, key)
        aux = dict(aux)
        weight = jax.lax.stop_gradient(jnp.asarray(aux.pop("weight", 1.0), jnp.float32))
        return loss.astype(jnp.float32), (aux, weight)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        rng, step_key = jax.random.split(state.rng)
        if grad_accum == 1:
            (loss, (aux, weight)), grads = grad_fn(state.params, state.rest, batch, step_key)
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        else:
            micro = _split_micro(batch, grad_accum, mesh, rules)

            def body(carry, xs):
                mb, k = xs
                (l, (a, w)), g = grad_fn(state.params, state.rest, mb, jax.random.fold_in(step_key, k))
                gs, ls, as_, ws = carry
                gs = jax.tree.map(lambda s, x: s + w * x.astype(jnp.float32), gs, g)
                as_ = {name: as_[name] + w * jnp.asarray(a[name], jnp.float32) for name in as_}
                return (gs, ls + w * l, as_, ws + w), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_names = jax.eval_shape(micro_loss, state.params, state.rest, first, step_key)[1][0]
            aux0 = {k: jnp.zeros((), jnp.float32) for k in aux_names}
            init = (zeros, jnp.zeros((), jnp.float32), aux0, jnp.zeros((), jnp.float32))
            (gsum, lsum, asum, weight), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
            denom = jnp.maximum(weight, 1e-12)
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), gsum, state.params)
            loss = lsum / denom
            aux = {k: v / denom for k, v in asum.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "weight": weight}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new, metrics

    replicated = NamedSharding(mesh, P())
    batch_sh = shd.batch_sharding(mesh, 1, rules)
    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                   donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------------------
# Workdir: config check, metrics

class WorkdirConfigError(ValueError):
    """The workdir holds a run made with a different config."""


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the bad state was not saved."""


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _jsonable(config) -> dict:
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(d, default=str))


def check_workdir_config(workdir: str, config: Mapping, overridable: Sequence[str] = RESUME_OVERRIDABLE) -> None:
    """Store `config` as workdir/config.json, or, if one is there, refuse a config that differs in any key
    other than `overridable` (matched on the last key component). Rewrites the file with the new values."""
    path = os.path.join(workdir, "config.json")
    new = _jsonable(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        fo, fn = _flatten(old), _flatten(new)
        diff = sorted(k for k in set(fo) | set(fn)
                      if fo.get(k, "<absent>") != fn.get(k, "<absent>") and k.split(".")[-1] not in overridable)
        if diff:
            detail = ", ".join(f"{k}: {fo.get(k, '<absent>')!r} -> {fn.get(k, '<absent>')!r}" for k in diff[:10])
            raise WorkdirConfigError(f"workdir {workdir} holds a run with a different config; differing keys "
                                     f"{diff} ({detail}). Use a new workdir, or the stored config "
                                     f"(only {list(overridable)} may change on resume).")
    if jax.process_index() == 0:
        _atomic_write(path, json.dumps(new, indent=2, sort_keys=True))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    """The records of workdir/metrics.jsonl (train lines have `loss`, eval lines `eval/...` keys)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died before its next checkpoint); a torn
    last line from a kill mid-write is dropped too."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= last_step:
                keep.append(json.dumps(rec))
    _atomic_write(path, "".join(k + "\n" for k in keep))


def _summary_writer_cls():
    """tensorboardX's SummaryWriter, imported without dragging in torch (tensorboardX imports it when present
    only to accept torch tensors, which we never log; importing torch costs seconds at start-up)."""
    block = "tensorboardX" not in sys.modules and "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError during the import below
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class _Logger:
    """metrics.jsonl + TensorBoard, process 0 only."""

    def __init__(self, workdir: str, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = _summary_writer_cls()(os.path.join(workdir, "tensorboard"),
                                purge_step=start_step + 1 if start_step > 0 else None, flush_secs=30)

    def write(self, step: int, record: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: (float(v) if not isinstance(v, str) else v) for k, v in record.items()}}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------
# The loop

def _every(step: int, n: int) -> bool:
    """Whether `step` is a multiple of `n` (n <= 0: never)."""
    return n > 0 and step % n == 0


def fit(config, *, workdir: str, model, loss_fn: LossFn, train_data: Iterable,
        eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None, mesh=None,
        rules: shd.Rules = shd.DEFAULT_RULES, run_config: Mapping | None = None,
        store: ckpt.CheckpointStore | None = None,
        hooks: Sequence[Callable[[int, Mapping[str, float]], None]] = (),
        tx: tuple[optax.GradientTransformation, optax.Schedule] | None = None) -> TrainState:
    """Train to `config.total_steps`, resuming from the latest checkpoint in `workdir` if there is one.

    `train_data` yields this host's batches (numpy pytrees, leading dim = global batch / processes); it must
    have `get_state()`/`set_state()` (grain iterators do) for checkpoints to record the data position.
    `run_config` (default: the trainer config) is what is stored in the workdir and compared on resume.
    `hooks(step, metrics)` run after each step (after any checkpoint save). `tx=(optimizer, schedule)`
    replaces `make_optimizer(config)` (e.g. a wrapper that also moves an EMA target network; the schedule is
    what is logged as `lr`). Returns the final state."""
    cfg = make_config(config)
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    stored = _jsonable(run_config if run_config is not None else cfg)
    check_workdir_config(workdir, stored)

    mesh = mesh if mesh is not None else shd.mesh_from_config(cfg.mesh)
    tx, schedule = tx if tx is not None else make_optimizer(cfg)
    state, shardings = create_train_state(model, tx, mesh=mesh, rules=rules, seed=cfg.seed,
                                          trainable=cfg.trainable, master_dtype=cfg.master_dtype)
    step_fn = make_train_step(loss_fn, tx, schedule, shardings, mesh=mesh, rules=rules, grad_accum=cfg.grad_accum,
                              compute_dtype=cfg.compute_dtype, fp32_params=tuple(cfg.fp32_params))
    it = train_data if hasattr(train_data, "__next__") else iter(train_data)
    resumable = hasattr(it, "get_state") and hasattr(it, "set_state")
    own_store = store is None
    if own_store:
        store = ckpt.CheckpointStore(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                                     async_save=cfg.async_checkpointing)
    with_rest = bool(cfg.save_frozen)

    start = 0
    latest = store.latest_step()
    if latest is not None:
        target = ckpt.abstract_like(state.arrays(with_rest=with_rest), shardings.arrays(with_rest=with_rest))
        restored = store.restore(latest, target)
        state = state.with_arrays(restored.state)
        start = int(restored.step)
        if restored.data_state is not None:
            if not resumable:
                raise TypeError("the checkpoint holds a data-iterator state but train_data has no set_state(): "
                                "resuming would replay data from the start")
            it.set_state(restored.data_state)
        print(f"[trainer] resumed {workdir} at step {start}", file=sys.stderr, flush=True)
    elif not resumable:
        print("[trainer] warning: train_data has no get_state()/set_state(); checkpoints will not record the "
              "data position", file=sys.stderr, flush=True)
    _truncate_metrics(workdir, start)
    logger = _Logger(workdir, start)

    total = int(cfg.total_steps)
    n_shards = shd.batch_shard_count(mesh, rules)
    t_last, steps_since, rows_since = time.perf_counter(), 0, 0
    try:
        for step in range(start + 1, total + 1):
            local = next(it)
            rows = int(jax.tree.leaves(local)[0].shape[0]) * jax.process_count()
            if cfg.batch_size and rows != cfg.batch_size:
                raise ValueError(f"data gave a global batch of {rows} rows, config batch_size={cfg.batch_size}")
            if rows % n_shards:
                raise ValueError(f"global batch {rows} is not divisible by the {n_shards} batch shards")
            batch = shd.host_local_batch_to_global(local, mesh, rules)
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            steps_since, rows_since = steps_since + 1, rows_since + rows
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                store.wait()
                last = store.latest_step()
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']} / grad_norm {metrics['grad_norm']} at step {step}; stopped "
                    f"without saving this state. Last good checkpoint: "
                    f"{'none' if last is None else f'step {last}'} in {store.directory}")
            if _every(step, cfg.log_every) or step == total:
                dt = time.perf_counter() - t_last
                logger.write(step, {**metrics, "steps_per_sec": steps_since / dt, "examples_per_sec": rows_since / dt})
                t_last, steps_since, rows_since = time.perf_counter(), 0, 0
            if eval_fn is not None and _every(step, cfg.eval_every):
                logger.write(step, {f"eval/{k}": float(v) for k, v in eval_fn(state).items()})
            if _every(step, cfg.checkpoint_every) or step == total:
                store.save(step, state.arrays(with_rest=with_rest),
                           data_state=it.get_state() if resumable else None, config=stored)
            for hook in hooks:
                hook(step, metrics)
        store.wait()
    finally:
        logger.close()
        if own_store:
            store.close()
    return state


def load_state(config, *, workdir: str, model, mesh=None, rules: shd.Rules = shd.DEFAULT_RULES,
               step: int | None = None,
               tx: tuple[optax.GradientTransformation, optax.Schedule] | None = None) -> TrainState:
    """The TrainState of checkpoint `step` (latest by default) of a `fit` run in `workdir`, restored onto its
    shardings (e.g. to export the trained model: `load_state(...).model()`). `config`/`model` as given to
    `fit` (and the same `tx`); a model part that was not checkpointed (`save_frozen=False`) comes from
    `model`."""
    cfg = make_config(config)
    mesh = mesh if mesh is not None else shd.mesh_from_config(cfg.mesh)
    tx, _ = tx if tx is not None else make_optimizer(cfg)
    state, shardings = create_train_state(model, tx, mesh=mesh, rules=rules, seed=cfg.seed, trainable=cfg.trainable,
                                          master_dtype=cfg.master_dtype)
    with_rest = bool(cfg.save_frozen)
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    with ckpt.CheckpointStore(directory, async_save=False) as store:
        target = ckpt.abstract_like(state.arrays(with_rest=with_rest), shardings.arrays(with_rest=with_rest))
        restored = store.restore(step, target, with_data=False)
    return state.with_arrays(restored.state)


# ----------------------------------------------------------------------------------------------------------
# Demo: a tiny stacked-layer regressor on synthetic data (smoke test and resume tests).

class DemoRegressor(nnx.Module):
    """x [B, F] -> y [B]: input projection, `layers` stacked residual MLP blocks (scanned), scalar head.
    Every param has logical axes, so it shards like the real models."""

    def __init__(self, features: int = 8, width: int = 16, hidden: int = 32, layers: int = 2, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.proj = nnx.Param(init(rngs.params(), (features, width)), axes=(None, "embed"))
        self.norm = nnx.Param(jnp.ones((layers, width)), axes=("layers", "norm"))
        self.up = nnx.Param(jax.vmap(lambda k: init(k, (width, hidden)))(jax.random.split(rngs.params(), layers)),
                            axes=("layers", "embed", "mlp"))
        self.down = nnx.Param(jax.vmap(lambda k: init(k, (hidden, width)))(jax.random.split(rngs.params(), layers)),
                              axes=("layers", "mlp", "embed"))
        self.head = nnx.Param(init(rngs.params(), (width, 1)), axes=("embed", "value"))
        self.head_bias = nnx.Param(jnp.zeros((1,)), axes=("value",))

    def __call__(self, x):
        h = shd.constrain(x @ self.proj[...], ("activation_batch", "activation_embed"))

        def block(h, p):
            g, up, down = p
            n = h * jax.lax.rsqrt(jnp.mean(jnp.square(h.astype(jnp.float32)), -1, keepdims=True) + 1e-6).astype(h.dtype)
            u = shd.constrain(jax.nn.gelu((n * g) @ up), ("activation_batch", "activation_mlp"))
            return h + u @ down, None

        h, _ = jax.lax.scan(block, h, (self.norm[...], self.up[...], self.down[...]))
        return (h @ self.head[...])[:, 0].astype(jnp.float32) + self.head_bias[...][0]


def demo_loss(model: nnx.Module, batch, rng) -> tuple[jax.Array, dict]:
    """Masked MSE regression (exercises the `weight` path of gradient accumulation)."""
    pred = model(batch["x"])
    mask = batch["mask"].astype(jnp.float32)
    err = jnp.square(pred - batch["y"])
    n = jnp.sum(mask)
    return jnp.sum(mask * err) / jnp.maximum(n, 1.0), {"weight": n, "pred_mean": jnp.mean(pred)}


def demo_dataset(batch_size: int, *, features: int = 8, seed: int = 0, nan_at_step: int = 0):
    """Infinite grain MapDataset of batches {x [B, F], y [B], mask [B]}; record i depends only on (seed, i).
    `nan_at_step=k` puts NaN into the inputs of the k-th batch (1-based)."""
    import grain

    w = np.random.default_rng(seed).normal(size=(features,)).astype(np.float32)

    def record(i):
        r = np.random.default_rng([seed, int(i)])
        x = r.normal(size=(features,)).astype(np.float32)
        if nan_at_step and i // batch_size == nan_at_step - 1:
            x[:] = np.nan
        return {"x": x, "y": np.float32(np.sin(x @ w)), "mask": np.float32(r.random() < 0.8)}

    return grain.MapDataset.range(1 << 40).map(record).batch(batch_size, drop_remainder=True)


def demo_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.total_steps = 12
    c.batch_size = 16
    c.grad_accum = 2
    c.lr = 3e-3
    c.warmup_steps = 2
    c.checkpoint_every = 4
    c.log_every = 1
    c.eval_every = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    return c


def _kill_in_finalize(step: int):
    """A TemporaryPath class that SIGKILLs the process after a save's files are written, before the commit
    rename of checkpoint `step`: a crash at the worst moment of a save (test hook of the demo)."""
    import orbax.checkpoint as ocp

    class KillBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return await super().finalize(*args, **kwargs)

    return KillBeforeCommit


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    fl = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", demo_config(), flag_values=fl)
    flags.DEFINE_string("workdir", None, "run directory (created; resumed if it holds a checkpoint)", flag_values=fl)
    flags.DEFINE_integer("debug_kill_at_step", 0, "SIGKILL this process right after step N (once the checkpoint "
                         "writes in flight have committed)", flag_values=fl)
    flags.DEFINE_integer("debug_kill_in_save", 0, "SIGKILL during the save of checkpoint N, before its commit",
                         flag_values=fl)
    flags.DEFINE_integer("debug_nan_at_step", 0, "feed NaN inputs at step N", flag_values=fl)
    fl(sys.argv if argv is None else argv)
    if not fl.workdir:
        raise SystemExit("--workdir is required")
    shd.initialize_distributed()
    cfg = fl.config
    local_batch = cfg.batch_size // jax.process_count()
    data = demo_dataset(local_batch, seed=cfg.seed + 1000 * jax.process_index(), nan_at_step=fl.debug_nan_at_step)
    workdir = os.path.abspath(fl.workdir)
    kill_in_save = _kill_in_finalize(fl.debug_kill_in_save) if fl.debug_kill_in_save else None
    store = ckpt.CheckpointStore(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpointing, temporary_path_class=kill_in_save)
    val = demo_dataset(32, seed=cfg.seed + 7)[0]
    eval_loss = jax.jit(lambda state: demo_loss(state.model(), val, None)[0])
    hooks = []
    if fl.debug_kill_at_step:
        kill_at = fl.debug_kill_at_step

        def kill(step, _):
            if step == kill_at:
                store.wait()  # let the previous checkpoint commit, so the kill tests a resume from it
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.append(kill)
    try:
        fit(cfg, workdir=workdir, model=lambda rngs: DemoRegressor(rngs=rngs), loss_fn=demo_loss,
            train_data=iter(data), eval_fn=lambda state: {"loss": eval_loss(state)}, run_config=cfg, store=store,
            hooks=hooks)
    except (WorkdirConfigError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
