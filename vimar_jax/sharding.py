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
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical names used by the models. Parameters: vocab, embed, heads, kv_heads, head_dim, mlp, layers,
# norm, patch, pos, proj, value. Activations: activation_*.
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
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
