"""Sharding as data: logical axis names on parameters and activations, mapped to mesh axes by rules.

Every `nnx.Param` carries its logical axes as metadata (`nnx.Param(x, axes=("embed", "mlp"))`). A rule
table maps each logical name to a mesh axis (or a tuple of mesh axes, or None = replicated). Models call
`constrain(x, ("activation_batch", "activation_length", "activation_embed"))` on activations; it is a no-op
unless a mesh and rules are active (`with use_rules(mesh, rules): ...`), so the same model code runs on one
CPU and on a pod slice.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch dim is split over 'fsdp' then 'data' (fsdp-major). With the data-major order ('data', 'fsdp') on
# a mesh where data, fsdp and tensor are all > 1, XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD alike)
# miscompiles the standard MLP pattern `h + f(h @ up) @ down` (down [mlp->tensor, embed->fsdp], activations
# [batch, embed->tensor]): it swaps row blocks between devices and silently returns wrong values. The
# fsdp-major order computes the same thing and is exact (tests/test_sharding.py guards this).
BATCH_AXES = ("fsdp", "data")

# Logical names used by the models. Parameters: vocab, embed, heads, kv_heads, head_dim, mlp, layers,
# norm, patch, pos, proj, value. Activations: activation_*.
DEFAULT_RULES: Rules = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("pos", None),
    ("proj", None),
    ("value", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("vimar_rules", default=None)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over the first data*fsdp*tensor devices."""
    n = data * fsdp * tensor
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices, "
                         f"only {len(devices)} available")
    arr = np.asarray(devices[:n], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axes; a mesh axis is used at most once, size-1 mesh axes are dropped."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(a for a in names if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*out)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names when rules are active; identity otherwise."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(axes, rules, mesh)
    # Drop partitioning of dims the mesh does not divide (tiny test shapes), rather than fail.
    spec = P(*[s if s is None or x.shape[i] % _size(mesh, s) == 0 else None for i, s in enumerate(spec)])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _size(mesh: Mesh, s) -> int:
    names = (s,) if isinstance(s, str) else s
    return int(np.prod([mesh.shape[a] for a in names]))


def sharding_for(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of one array; dims not divisible by their mesh axes stay replicated."""
    spec = logical_to_spec(axes, rules, mesh)
    spec = P(*[s if s is None or shape[i] % _size(mesh, s) == 0 else None for i, s in enumerate(spec)])
    return NamedSharding(mesh, spec)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """For an NNX State (abstract or concrete): a matching pytree of NamedShardings from `axes` metadata."""
    from flax import nnx

    def one(var):
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            axes = var.get_metadata().get("axes")
            return var.replace(sharding_for(value.shape, axes, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------------------
# Mesh from config, batch sharding, multi-host helpers.

def mesh_from_config(cfg, devices: Sequence | None = None) -> Mesh:
    """Mesh from a mapping/ConfigDict with `data`, `fsdp`, `tensor` (or a 3-tuple). At most one may be -1:
    it takes all remaining devices. Missing keys default to 1."""
    if isinstance(cfg, (tuple, list)):
        if len(cfg) != 3:
            raise ValueError(f"mesh shape must be (data, fsdp, tensor), got {cfg}")
        shape = dict(zip(MESH_AXES, cfg))
    else:
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
        unknown = sorted(set(getattr(cfg, "keys", lambda: [])()) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh config keys {unknown}; expected {MESH_AXES}")
        shape = {a: get(a, 1) for a in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    shape = {a: int(v) for a, v in shape.items()}
    fill = [a for a, v in shape.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    if any(v < 1 for a, v in shape.items() if a not in fill):
        raise ValueError(f"mesh {shape}: axis sizes must be >= 1 (or -1 for 'the rest')")
    if fill:
        rest = int(np.prod([v for a, v in shape.items() if a not in fill]))
        if len(devices) % rest:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {rest}")
        shape[fill[0]] = len(devices) // rest
    return make_mesh(shape["data"], shape["fsdp"], shape["tensor"], devices=devices)


def batch_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the batch dim is split over: the rules' `activation_batch` entry."""
    target = dict(rules).get("activation_batch")
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def batch_spec(ndim: int = 1, rules: Rules = DEFAULT_RULES) -> P:
    """Leading (batch) dim over `batch_axes(rules)` (fsdp × data by default), the rest replicated."""
    axes = batch_axes(rules)
    return P(axes or None, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of a batch array: leading dim split over `batch_axes(rules)`, others replicated."""
    return NamedSharding(mesh, batch_spec(ndim, rules))


def batch_shard_count(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch dim is split (data × fsdp by default): a global batch must be a multiple."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules)]))


def _multiprocess_env() -> bool:
    """True when the environment describes a multi-process JAX job."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")  # TPU pod slices list every worker here
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


_DISTRIBUTED_DONE = False


def initialize_distributed(force: bool = False) -> bool:
    """Call `jax.distributed.initialize()` (arguments auto-detected from the cluster environment) when the
    environment says this is one process of several, or when `force`. Call before any other JAX use.
    Idempotent; returns whether it initialized (now or before)."""
    global _DISTRIBUTED_DONE
    if _DISTRIBUTED_DONE:
        return True
    if not (force or _multiprocess_env()):
        return False
    jax.distributed.initialize()
    _DISTRIBUTED_DONE = True
    return True


def host_local_batch_to_global(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Per-host numpy batch (pytree, leading dim = this host's share) -> global jax Arrays sharded over
    `batch_axes(rules)` on dim 0 (`jax.make_array_from_process_local_data`: the host's rows are its devices' row blocks
    in global order, contiguous or not). Single host: local = global."""
    n = batch_shard_count(mesh, rules)

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch leaves need a leading batch dim; got a scalar")
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % n:
            raise ValueError(f"global batch {global_rows} (local {x.shape[0]} x {jax.process_count()} "
                             f"processes) is not divisible by the {n} batch shards {batch_axes(rules)}")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

    return jax.tree.map(one, batch)
