"""Mesh from config, batch sharding, host-local -> global batches, distributed init gating."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vimar_jax import sharding as shd


def test_mesh_from_config_fills_minus_one():
    mesh = shd.mesh_from_config({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = shd.mesh_from_config((1, -1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(shd.mesh_from_config({"tensor": 4, "data": 2}).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        shd.mesh_from_config({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="not divisible by 3"):
        shd.mesh_from_config({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="unknown mesh config keys"):
        shd.mesh_from_config({"dp": 2})
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.mesh_from_config({"data": 16})


def test_batch_sharding_and_global_batch():
    mesh = shd.make_mesh(2, 2, 2)
    assert shd.batch_sharding(mesh, 3).spec == P(("fsdp", "data"), None, None)
    assert shd.batch_shard_count(mesh) == 4
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8, dtype=np.int32)}
    g = shd.host_local_batch_to_global(local, mesh)
    np.testing.assert_array_equal(np.asarray(g["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(g["ids"]), local["ids"])
    # each device holds the 2 rows of its batch shard (replicated over 'tensor')
    shards = {s.device.id: s for s in g["x"].addressable_shards}
    assert len(shards) == 8
    for s in g["x"].addressable_shards:
        assert s.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(s.data), local["x"][s.index])
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        shd.host_local_batch_to_global({"x": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match="leading batch dim"):
        shd.host_local_batch_to_global({"x": np.float32(1)}, mesh)


def test_initialize_distributed_only_when_multiprocess(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(shd, "_DISTRIBUTED_DONE", False)
    for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert shd.initialize_distributed() is False and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert shd.initialize_distributed() is False and calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert shd.initialize_distributed() is True and calls == [1]
    assert shd.initialize_distributed() is True and calls == [1]      # idempotent


def test_existing_api_unchanged():
    mesh = shd.make_mesh(2, 2, 2)
    assert shd.logical_to_spec(("embed", "mlp"), mesh=mesh) == P("fsdp", "tensor")
    assert shd.sharding_for((6, 4), ("embed", "mlp"), mesh).spec == P("fsdp", "tensor")
    assert shd.sharding_for((5, 4), ("embed", "mlp"), mesh).spec == P(None, "tensor")


def test_default_rules_compute_exactly_on_a_3d_mesh(rules=shd.DEFAULT_RULES):
    """Guard against the XLA SPMD miscompile that the data-major batch order hit (see DEFAULT_RULES): a
    two-block residual MLP with every weight layout the rules produce, activations constrained by the rules,
    value and gradients on a (2, 2, 2) mesh equal the unsharded ones."""
    mesh = shd.make_mesh(2, 2, 2)
    r = np.random.default_rng(0)
    h0 = r.normal(size=(16, 16)).astype(np.float32)
    up = (r.normal(size=(16, 32)) / 4).astype(np.float32)
    down = (r.normal(size=(32, 16)) / 6).astype(np.float32)

    def loss(u, d, h):
        act = ("activation_batch", "activation_embed")
        h = shd.constrain(h, act)
        for _ in range(2):
            z = shd.constrain(jax.nn.gelu(h @ u), ("activation_batch", "activation_mlp"))
            h = shd.constrain(h + z @ d, act)
        return jnp.sum(h * h0)

    ref_l, ref_g = jax.value_and_grad(loss, argnums=(0, 1))(up, down, h0)
    # the rule layouts, and replicated weights (as when a dim is not divisible by its mesh axis)
    up_axes = [("embed", "mlp"), (None, None)]
    down_axes = [("mlp", "embed"), (None, None)]
    with shd.use_rules(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        for ua, da in itertools.product(up_axes, down_axes):
            args = (jax.device_put(up, shd.sharding_for(up.shape, ua, mesh)),
                    jax.device_put(down, shd.sharding_for(down.shape, da, mesh)),
                    jax.device_put(h0, shd.batch_sharding(mesh, 2, rules)))
            l, g = step(*args)
            assert abs(float(l) - float(ref_l)) <= 1e-5 * abs(float(ref_l)), (ua, da)
            for a, b in zip(g, ref_g):
                err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
                assert err <= 1e-5, (ua, da, err)
