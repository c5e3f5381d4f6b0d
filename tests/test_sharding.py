"""Mesh from config, batch sharding, host-local -> global batches, distributed init gating."""

import jax
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
    assert shd.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert shd.batch_shard_count(mesh) == 4
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8, dtype=np.int32)}
    g = shd.host_local_batch_to_global(local, mesh)
    np.testing.assert_array_equal(np.asarray(g["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(g["ids"]), local["ids"])
    # rows 2k, 2k+1 live on the devices of batch shard k (replicated over 'tensor')
    shards = {s.device.id: s for s in g["x"].addressable_shards}
    assert len(shards) == 8
    for s in g["x"].addressable_shards:
        assert s.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(s.data), local["x"][s.index])
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
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
