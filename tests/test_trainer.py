"""Trainer: a sharded step equals the single-device step (demo model and a tiny Decoder value model with the
TD loss), parameter filters, bf16 compute, schedule; resume after SIGKILL (also in the middle of a
checkpoint save), NaN stop, refusal of a workdir made with another config."""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import max_rel_err
from vimar_jax import checkpoint as ck
from vimar_jax import sharding as shd
from vimar_jax import td
from vimar_jax import trainer as T

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(state) -> dict:
    """{dotted path: host array}; the `.value` of NNX Variables is left out of the path."""
    out = {}
    for p, v in jax.tree_util.tree_leaves_with_path(state):
        names = T._path_names(p)
        out[".".join(names[:-1] if names[-1] == "value" else names)] = np.asarray(v)
    return out


def run_one_step(mesh, model_fn, loss_fn, batch, **overrides):
    """(initial params, params after one step, metrics, state shardings) as host arrays."""
    cfg = T.make_config({"warmup_steps": 0, "lr": 1e-2, "total_steps": 10, **overrides})
    tx, schedule = T.make_optimizer(cfg)
    state, shardings = T.create_train_state(model_fn, tx, mesh=mesh, seed=cfg.seed, trainable=cfg.trainable)
    init = flat(jax.device_get(state.params))
    step = T.make_train_step(loss_fn, tx, schedule, shardings, mesh=mesh, grad_accum=cfg.grad_accum,
                             compute_dtype=cfg.compute_dtype, fp32_params=tuple(cfg.fp32_params))
    new, metrics = step(state, shd.host_local_batch_to_global(batch, mesh))
    return init, flat(jax.device_get(new.params)), jax.device_get(metrics), new


def demo_model(rngs):
    return T.DemoRegressor(rngs=rngs)


def demo_batch(n=16):
    return T.demo_dataset(n, seed=3)[0]


@pytest.fixture(scope="module")
def single_device_demo_step():
    return run_one_step(shd.make_mesh(1, 1, 1), demo_model, T.demo_loss, demo_batch())


def assert_step_matches(ref, got, what):
    init_r, new_r, m_r, _ = ref
    init_g, new_g, m_g, _ = got
    assert init_r.keys() == new_g.keys()
    for k in init_r:
        np.testing.assert_array_equal(init_g[k], init_r[k], err_msg=f"{what}: initial {k}")
    assert abs(float(m_g["loss"]) - float(m_r["loss"])) <= TOL * abs(float(m_r["loss"])), what
    assert abs(float(m_g["grad_norm"]) - float(m_r["grad_norm"])) <= TOL * float(m_r["grad_norm"]), what
    moved = max(float(np.max(np.abs(new_r[k] - init_r[k]))) for k in new_r)
    assert moved > 1e-3, f"{what}: the step barely moved the params ({moved}); the comparison is vacuous"
    for k in new_r:
        err = max_rel_err(new_g[k], new_r[k])
        assert err <= TOL, f"{what}: param {k} max rel err {err}"


def test_sharded_step_with_accumulation_equals_single_device(single_device_demo_step):
    mesh = shd.make_mesh(2, 2, 2)
    got = run_one_step(mesh, demo_model, T.demo_loss, demo_batch(), grad_accum=2)
    # the params really are split over the mesh
    up = got[3].params["up"].get_value()
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 8, 16)
    # masked loss with different valid counts per micro-batch: weights make accumulation exact
    assert float(got[2]["weight"]) == float(single_device_demo_step[2]["weight"]) < 16
    assert_step_matches(single_device_demo_step, got, "mesh (2,2,2) + accumulation 2")


def test_trainable_filters(single_device_demo_step):
    mesh = shd.make_mesh(1, 1, 1)
    init, new, _, state = run_one_step(mesh, demo_model, T.demo_loss, demo_batch(), trainable="head:head")
    assert set(flat(state.params)) == {"head"}
    mu = state.opt_state[1][0].mu
    assert set(flat(mu)) == {"head"}                      # no optimizer state for frozen params
    assert not np.array_equal(new["head"], init["head"])
    full = state.model()
    np.testing.assert_array_equal(np.asarray(full.up[...]), single_device_demo_step[0]["up"])  # frozen = init

    init, new, _, state = run_one_step(mesh, demo_model, T.demo_loss, demo_batch(), trainable="freeze:up,down")
    assert set(flat(state.params)) == {"proj", "norm", "head", "head_bias"}
    rest = flat(state.rest)
    np.testing.assert_array_equal(rest["up"], single_device_demo_step[0]["up"])
    np.testing.assert_array_equal(rest["down"], single_device_demo_step[0]["down"])
    assert not np.array_equal(new["proj"], init["proj"])

    tx, _ = T.make_optimizer(T.make_config({}))
    with pytest.raises(ValueError, match="selects no parameter"):
        T.create_train_state(demo_model, tx, mesh=mesh, trainable="head:value_head")
    with pytest.raises(ValueError, match="prefix 'vision' matches no parameter"):
        T.create_train_state(demo_model, tx, mesh=mesh, trainable="freeze:vision")
    with pytest.raises(ValueError, match="expected 'all'"):
        T.trainable_filter("heads_only")


def test_bf16_compute_keeps_fp32_master(single_device_demo_step):
    mesh = shd.make_mesh(1, 1, 1)
    init, new, m, state = run_one_step(mesh, demo_model, T.demo_loss, demo_batch(), compute_dtype="bfloat16")
    assert all(v.dtype == np.float32 for v in new.values())
    assert all(v.dtype == np.float32 for v in flat(state.opt_state).values() if v.dtype.kind == "f")
    ref_loss = float(single_device_demo_step[2]["loss"])
    assert float(m["loss"]) != ref_loss                    # computed in bf16 ...
    assert abs(float(m["loss"]) - ref_loss) < 2e-2 * ref_loss   # ... and close to fp32


def test_schedule_warmup_and_linear_decay():
    cfg = T.make_config({"lr": 1.0, "end_lr": 0.0, "warmup_steps": 10, "total_steps": 110})
    s = T.make_schedule(cfg)
    for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.5), (110, 0.0)]:
        assert float(s(step)) == pytest.approx(want, abs=1e-6), step
    cfg = T.make_config({"lr": 2.0, "warmup_ratio": 0.1, "total_steps": 100})   # 3% default -> 10% here
    assert float(T.make_schedule(cfg)(5)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown trainer config keys"):
        T.make_config({"learning_rate": 1.0})


# ---------------------------------------------------------------------------------------------------------
# A tiny Decoder + value head trained with the TD loss

def _tiny_value_model(rngs):
    from vimar_jax.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)

    class TinyValue(nnx.Module):
        def __init__(self, rngs):
            self.decoder = Decoder(cfg, rngs=rngs)
            self.value_head = nnx.Param(0.2 * jax.random.normal(rngs.params(), (cfg.hidden_size, 1)),
                                        axes=("embed", "value"))

        def values(self, ids, last):
            b, t = ids.shape
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            h, _ = self.decoder(self.decoder.embed(ids), positions=pos, num_layers=cfg.num_layers - 1)
            return (h[jnp.arange(b), last] @ self.value_head[...])[:, 0]

    return TinyValue(rngs)


def _td_loss(model, batch, rng):
    v = model.values(batch["ids"], batch["last"])
    v_next = model.values(batch["next_ids"], batch["next_last"])
    return td.td_loss_and_metrics(v, v_next, batch["reward"], batch["done"], batch["mask"])


def test_decoder_value_model_td_step_sharded_equals_single_device():
    pytest.importorskip("vimar_jax.models.decoder")
    r = np.random.default_rng(0)
    b, t = 8, 6
    batch = {"ids": r.integers(0, 64, (b, t), dtype=np.int32), "last": r.integers(2, t, (b,), dtype=np.int32),
             "next_ids": r.integers(0, 64, (b, t), dtype=np.int32),
             "next_last": r.integers(2, t, (b,), dtype=np.int32),
             "reward": r.normal(0.2, 0.1, (b,)).astype(np.float32), "done": (r.random(b) < 0.3).astype(np.float32),
             "mask": np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)}
    # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a gradient entry near zero turns fp
    # reduction-order noise into an O(lr) change; a larger eps keeps the comparison about the computation.
    ref = run_one_step(shd.make_mesh(1, 1, 1), _tiny_value_model, _td_loss, batch, eps=1e-3)
    got = run_one_step(shd.make_mesh(2, 2, 2), _tiny_value_model, _td_loss, batch, eps=1e-3, grad_accum=2)
    assert got[3].params["decoder"]["layers"]["q_proj"].get_value().sharding.spec != jax.sharding.PartitionSpec()
    assert_step_matches(ref, got, "decoder value model, mesh (2,2,2) + accumulation 2")


# ---------------------------------------------------------------------------------------------------------
# The loop, run as `python -m vimar_jax.trainer` (demo: 12 steps, a checkpoint every 4)

KEYS = ("loss", "lr", "grad_norm", "pred_mean", "weight")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update({"PYTHONPATH": REPO + os.pathsep + e.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
              # compiled programs are shared between the runs of this module (cuts seconds per run)
              "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return e


def demo(env, workdir, *args, expect=0):
    p = subprocess.run([sys.executable, "-m", "vimar_jax.trainer", f"--workdir={workdir}", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == expect, f"rc={p.returncode}\n{p.stderr[-3000:]}"
    return p


def metrics(workdir):
    """{step: train metrics (+ eval/loss at eval steps)}."""
    out = {}
    for r in T.read_metrics(str(workdir)):
        rec = out.setdefault(r["step"], {})
        rec.update({k: r[k] for k in (*KEYS, "eval/loss") if k in r})
    return out


def final_arrays(workdir, step=None):
    with ck.CheckpointStore(os.path.join(workdir, "checkpoints"), async_save=False) as store:
        return store.restore(step, None)


def assert_clean_checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    assert not [n for n in os.listdir(d) if "tmp" in n], os.listdir(d)
    with ck.CheckpointStore(d, async_save=False) as store:
        for s in store.all_steps():
            r = store.restore(s, None)
            assert int(r.state["step"]) == s and r.data_state == {"next_index": s}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref")
    demo(env, wd)
    m = metrics(wd)
    assert sorted(m) == list(range(1, 13))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(wd / "tensorboard"))
    assert m[12]["loss"] < m[1]["loss"]          # it trains
    assert [s for s in m if "eval/loss" in m[s]] == [4, 8, 12] and m[12]["eval/loss"] < m[4]["eval/loss"]
    return wd, m


def test_resume_after_sigkill_equals_uninterrupted_run(env, reference, tmp_path):
    ref_wd, ref = reference
    kill_at = random.Random().randrange(5, 12)      # after the first checkpoint (step 4)
    demo(env, tmp_path, f"--debug_kill_at_step={kill_at}", expect=-9)
    with ck.CheckpointStore(str(tmp_path / "checkpoints")) as store:
        assert store.latest_step() is not None and store.latest_step() >= 4, (kill_at, store.all_steps())
    assert max(metrics(tmp_path)) == kill_at
    demo(env, tmp_path)
    got = metrics(tmp_path)
    assert got == ref, f"killed at {kill_at}: metrics differ from the uninterrupted run"
    assert ck.tree_equal(final_arrays(tmp_path).state, final_arrays(ref_wd).state), kill_at
    assert_clean_checkpoints(tmp_path)


def test_kill_during_checkpoint_save_resumes_from_previous(env, reference, tmp_path):
    ref_wd, ref = reference
    demo(env, tmp_path, "--debug_kill_in_save=8", expect=-9)
    names = os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith("8.") and "tmp" in n for n in names), names    # killed mid-save, uncommitted
    with ck.CheckpointStore(str(tmp_path / "checkpoints")) as store:
        assert store.all_steps() == [4]
    demo(env, tmp_path)
    assert metrics(tmp_path) == ref
    assert_clean_checkpoints(tmp_path)
    # load_state: the final TrainState, restored onto its shardings, equals the reference run's checkpoint
    state = T.load_state(T.demo_config(), workdir=tmp_path, model=demo_model)
    assert int(state.step) == 12
    got, want = flat(jax.device_get(state.arrays())), flat(final_arrays(ref_wd).state)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_nan_loss_stops_without_saving_bad_state(env, reference, tmp_path):
    ref_wd, ref = reference
    p = demo(env, tmp_path, "--debug_nan_at_step=7", expect=2)
    assert "non-finite loss nan" in p.stderr and "at step 7" in p.stderr and "checkpoint: step 4" in p.stderr
    with ck.CheckpointStore(str(tmp_path / "checkpoints")) as store:
        assert store.all_steps() == [4]
    assert ck.tree_equal(final_arrays(tmp_path, 4).state, final_arrays(ref_wd, 4).state)
    got = metrics(tmp_path)
    assert max(got) == 6 and all(got[s] == ref[s] for s in got)


def test_workdir_of_another_config_is_refused(env, reference, tmp_path):
    import shutil

    ref_wd, ref = reference
    wd = tmp_path / "wd"
    shutil.copytree(ref_wd, wd)
    p = demo(env, wd, "--config.lr=0.01", "--config.mesh.tensor=1", expect=2)
    assert "differing keys ['lr', 'mesh.tensor']" in p.stderr
    # total_steps may change: the run continues from its last checkpoint
    demo(env, wd, "--config.total_steps=14")
    got = metrics(wd)
    assert sorted(got) == list(range(1, 15)) and all(got[s] == ref[s] for s in ref)


def test_check_workdir_config(tmp_path):
    base = {"lr": 1e-3, "total_steps": 10, "mesh": {"data": 2, "tensor": 1}, "model": {"layers": 2}}
    T.check_workdir_config(str(tmp_path), base)
    assert json.loads((tmp_path / "config.json").read_text()) == base
    T.check_workdir_config(str(tmp_path), {**base, "total_steps": 20, "checkpoint_every": 5})
    with pytest.raises(T.WorkdirConfigError, match=r"differing keys \['mesh.tensor', 'model.layers'\]"):
        T.check_workdir_config(str(tmp_path), {**base, "mesh": {"data": 2, "tensor": 2}, "model": {"layers": 3}})
    with pytest.raises(T.WorkdirConfigError, match=r"\['model.dropout'\]"):
        T.check_workdir_config(str(tmp_path), {**base, "model": {"layers": 2, "dropout": 0.1}})


def test_fit_with_custom_optimizer(tmp_path):
    """`fit(tx=(optimizer, schedule))` replaces the config's AdamW: here an optimizer that never moves the
    params, so the final params equal the initial ones and the logged lr is the given schedule's."""
    import optax

    mesh = shd.make_mesh(1, 1, 1)
    cfg = {"total_steps": 2, "checkpoint_every": 0, "log_every": 1, "async_checkpointing": False, "lr": 1.0}
    tx = (optax.set_to_zero(), optax.constant_schedule(0.25))
    state = T.fit(cfg, workdir=str(tmp_path), model=demo_model, loss_fn=T.demo_loss,
                  train_data=iter(T.demo_dataset(16, seed=3)), mesh=mesh, tx=tx)
    init, _ = T.create_train_state(demo_model, tx[0], mesh=mesh)
    got, want = flat(jax.device_get(state.params)), flat(jax.device_get(init.params))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    recs = T.read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2] and all(r["lr"] == 0.25 for r in recs)
    assert np.isfinite(recs[0]["loss"]) and recs[0]["examples_per_sec"] > 0
    with ck.CheckpointStore(str(tmp_path / "checkpoints")) as store:
        assert store.all_steps() == [2]                    # checkpoint_every=0: only the final step
