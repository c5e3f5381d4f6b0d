"""TD training of the value model on rollout transitions (SPEC §1, §3).

    python train/train_value.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

- **Model**: `init` is a policy directory (LLaVA-NeXT: the value model is its copy plus a fresh float32 head
  on decoder layer `value.value_layer`) or a value directory (trained further). Full fine-tune, head only or
  a frozen vision tower through the trainer's `trainable` filter ("all", "head", "freeze:backbone.vision").
- **Data**: the transitions of `rollouts` (train/gen_rollouts.py output), grouped BY IMAGE: each packed row
  is one image prefix followed by the state suffixes of that image's trajectories (`vimar_jax.data.packing`),
  static shapes `data.seq_len` x `data.max_states`. `value.state`: "sentence" (image + one sentence, the
  paper's) or "prefix" (image + the record's prompt + the caption so far + the sentence, as the search's
  `ValueScorer` renders it; suffixes grow with the caption, so give it a longer `data.seq_len`). Rewards come from δ and τ
  (the manifest's τ, or `data.tau`). Held out: `data.val_rollouts`, else a `data.val_fraction` of the
  image groups.
- **Loss**: semi-gradient TD(0), y_i = r_i + γ (1 − done_i) stopgrad(V(s_{i+1})), γ = `td.gamma`; V(s_{i+1}) of
  the same trajectory is in the same packed pass. Optionally an EMA target network (`td.ema_decay` > 0)
  gives V(s_{i+1}) from a second forward with the target parameters.
- **Trainer** (`vimar_jax.trainer.fit`): sharded state, AdamW with warm-up and linear decay, gradient
  accumulation, clipping, bf16 compute, remat (`value.remat`), orbax checkpoints with the data position,
  exact resume, metrics.jsonl + TensorBoard. `total_steps = 0` trains `num_epochs` epochs of rows.
- **Validation**: TD loss and the Pearson correlation of values with the discounted future returns on the
  held-out transitions (every `eval_every` steps and at the end).
- **Output**: `WORKDIR/hf`, an HF-format value directory (LLaVA-NeXT tensors + `value_head.weight/bias` +
  `config.json["vimar_value"]`) whose `vimar_value.stats` holds the sentence-value statistics on the
  validation transitions (P10..P90, mean, std): ViMaR's θ default. `WORKDIR/summary.json` has the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vimar_jax import sharding as shd
from vimar_jax import trainer
from vimar_jax.convert import io as ckpt_io
from vimar_jax.data import packing
from vimar_jax.data import sources as src_lib
from vimar_jax.data import transitions as tr
from vimar_jax.models import llava_next as ln
from vimar_jax.models.value import ValueConfig, ValueModel, value_rules
from vimar_jax.processor import Processor

STATS_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ASSET_PREFIXES = ("tokenizer", "chat_template", "special_tokens_map", "added_tokens", "preprocessor_config",
                  "processor_config", "generation_config")


# ------------------------------------------------------------------------------------------------ model

def _with_remat(model: ValueModel, remat: str) -> ValueModel:
    """The same parameters in a graph whose layers are rematerialised (`remat` in none/full/dots)."""
    if remat == "none":
        return model
    c = model.config
    llava = dataclasses.replace(c.llava, text=dataclasses.replace(c.llava.text, remat=remat),
                                vision=dataclasses.replace(c.llava.vision, remat=remat))
    cfg = dataclasses.replace(c, llava=llava)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ValueModel(cfg, dtype=model.dtype, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def load_value_model(config, mesh) -> tuple[ValueModel, dict]:
    """(value model, HF LLaVA-NeXT config without `vimar_value`) from `config.init`: a policy (fresh head on
    `value.value_layer`) or a value checkpoint (its own value layer, which must agree with the config)."""
    if not config.init:
        raise ValueError("config.init is required: a policy (LLaVA-NeXT) or value checkpoint directory")
    module, hf = ckpt_io.load_module(config.init, mesh=mesh)
    v = config.value
    if isinstance(module, ValueModel):
        if module.config.value_layer != int(v.value_layer) or module.config.state != v.state:
            raise ValueError(f"{config.init} is a value model with value_layer={module.config.value_layer}, "
                             f"state={module.config.state!r}; the config asks for value.value_layer={v.value_layer}, "
                             f"value.state={v.state!r}")
        model = module
    elif isinstance(module, ln.LlavaNext):
        # The trainer places every array (the fresh head included) onto its sharding.
        model = ValueModel.from_policy(module, value_layer=int(v.value_layer), rng=int(config.seed), state=v.state)
    else:
        raise ValueError(f"{config.init}: config.json model_type {hf.get('model_type')!r} is neither a LLaVA-NeXT "
                         f"policy nor a value model")
    hf = {k: val for k, val in hf.items() if k != "vimar_value"}
    return _with_remat(model, v.remat), hf


# ------------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data:
    template: packing.StateTemplate
    train: list[packing.Group]
    val: list[packing.Group]
    train_rows: list[packing.RowPlan]
    val_rows: list[packing.RowPlan]
    reward: Any
    info: dict


def _read_groups(directory: str, template, overrides: dict):
    manifest = tr.read_manifest(directory)
    paths = tr.shard_paths(directory)
    records = [rec for p in paths for rec in tr.read_shard(p)]
    # τ as a percentile describes the policy's own sentences: not the ground truth, not the counterfactuals.
    counterfactual = {(g["group"], t["traj"]) for p in paths for g in tr.read_shard_index(p).get("groups", ())
                      for t in g.get("trajectories", ()) if t.get("counterfactual")}
    deltas = np.asarray([r["delta"] for r in records if not r["gt"] and (r["group"], r["traj"]) not in counterfactual],
                        np.float64)
    cfg = tr.resolve_reward_config(manifest, overrides, deltas if deltas.size else None)
    rewards = tr.rewards([r["delta"] for r in records], [r["gt"] for r in records], cfg)
    return packing.groups_from_records(records, template, rewards), cfg, manifest, len(records)


def _number_or_manifest(name: str, v):
    if v in (None, "", "manifest"):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r}: expected a number or 'manifest'") from None


def load_data(config, template: packing.StateTemplate) -> Data:
    d = config.data
    if not config.rollouts:
        raise ValueError("config.rollouts is required: a gen_rollouts output directory")
    overrides = {"tau": d.tau, "alpha": _number_or_manifest("data.alpha", d.alpha), "variant": d.variant,
                 "ground_truth_reward": _number_or_manifest("data.ground_truth_reward", d.ground_truth_reward)}
    groups, reward_cfg, manifest, n_records = _read_groups(config.rollouts, template, overrides)
    if d.val_rollouts:
        train = groups
        val, _, _, _ = _read_groups(d.val_rollouts, template, {**overrides, "tau": reward_cfg.tau})
    else:
        train, val = packing.split_groups(groups, float(d.val_fraction), int(d.split_seed))
    if not train:
        raise ValueError(f"no training groups in {config.rollouts} (val_fraction={d.val_fraction})")
    kw = dict(seq_len=int(d.seq_len), max_states=int(d.max_states))
    train_rows, train_stats = packing.plan_rows(train, template, **kw)
    val_rows, val_stats = packing.plan_rows(val, template, **kw) if val else ([], packing.PackStats())
    info = {"records": n_records, "train_groups": len(train), "val_groups": len(val),
            "train_states": sum(g.num_states for g in train), "val_states": sum(g.num_states for g in val),
            "packing": {"train": train_stats.to_dict(), "val": val_stats.to_dict()},
            "reward": dataclasses.asdict(reward_cfg), "source": manifest.get("source")}
    return Data(template, train, val, train_rows, val_rows, reward_cfg, info)


def image_opener(config, directory: str):
    """ref -> PIL image for the records of a rollout directory (its source root, or `data.image_root`)."""
    root = config.data.image_root or (tr.read_manifest(directory).get("source") or {}).get("root")
    return lambda ref: src_lib.open_image(ref, root)


def train_dataset(data: Data, builder: packing.RowBuilder, *, batch_size: int, seed: int):
    """Infinite grain MapDataset of this host's share of each global batch of rows, reshuffled by seed."""
    import grain

    n_proc = jax.process_count()
    if batch_size % n_proc:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {n_proc} processes")
    ds = grain.MapDataset.source(data.train_rows).shuffle(seed=seed).repeat()
    if n_proc > 1:
        ds = ds[jax.process_index()::n_proc]
    return ds.map(builder).batch(batch_size // n_proc, drop_remainder=True, batch_fn=packing.collate)


# ------------------------------------------------------------------------------------------------- loss

def make_loss_fn(gamma: float, ema: bool):
    """`loss_fn(model, batch, rng)` for the trainer. With `ema`, `model` is an `EMAValueModel` and V(s_{i+1})
    comes from its target parameters."""
    def loss_fn(model, batch, rng):
        del rng
        if ema:
            loss, metrics, _ = packing.td_loss(model.online, batch, gamma=gamma, target_model=model.target)
        else:
            loss, metrics, _ = packing.td_loss(model, batch, gamma=gamma)
        return loss, metrics
    return loss_fn


class EMAValueModel(nnx.Module):
    """The online value model and its EMA target copy (both trainable from the trainer's point of view; the
    target's gradients are zero and `ema_optimizer` moves it towards the online parameters)."""

    def __init__(self, online: ValueModel):
        self.online = online
        self.target = nnx.clone(online)


def ema_trainable(spec: str) -> str:
    """The trainer's `trainable` filter of a value model, for its `EMAValueModel` wrapper: frozen prefixes
    apply to both copies (`head` and `all` match both already)."""
    kind, _, arg = spec.strip().partition(":")
    if kind != "freeze":
        return spec
    prefixes = [p.strip() for p in arg.split(",") if p.strip()]
    return "freeze:" + ",".join(f"{side}.{p}" for p in prefixes for side in ("online", "target"))


def ema_optimizer(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """Wrap the optimizer of the online parameters of an `EMAValueModel`: after each update,
    target <- decay * target + (1 - decay) * online_new (SPEC §3's optional target network)."""
    def init(params):
        return inner.init(params["online"])

    def update(grads, state, params):
        upd, state = inner.update(grads["online"], state, params["online"])
        new_online = optax.apply_updates(params["online"], upd)
        target_upd = jax.tree.map(lambda t, o: ((1.0 - decay) * (o - t)).astype(t.dtype), params["target"],
                                  new_online)
        out = jax.tree.map(lambda x: x, params)
        out["online"], out["target"] = upd, target_upd
        return out, state

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------- evaluation

def _host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
    """Values of the validation rows with a train state; TD loss, correlation with returns, value stats."""

    def __init__(self, data: Data, builder: packing.RowBuilder, *, batch_size: int, gamma: float, mesh, rules,
                 compute_dtype: str, fp32_params: Sequence[str], ema: bool):
        self.rows, self.builder, self.batch_size, self.gamma = data.val_rows, builder, int(batch_size), float(gamma)
        if self.batch_size % shd.batch_shard_count(mesh):
            raise ValueError(f"eval.batch_size={batch_size} is not divisible by data*fsdp="
                             f"{shd.batch_shard_count(mesh)}")
        self.mesh, self.rules, self.ema = mesh, rules, ema
        self.compute, self.keep = jnp.dtype(compute_dtype), tuple(fp32_params)
        self._fn = None
        self._batches: list[dict] | None = None

    def _values_fn(self, graphdef):
        if self._fn is None:
            mesh, rules, compute, keep, ema = self.mesh, self.rules, self.compute, self.keep, self.ema

            def fn(params, rest, batch):
                model = nnx.merge(graphdef, trainer.cast_floating(params, compute, keep),
                                  trainer.cast_floating(rest, compute, keep))
                with shd.use_rules(mesh, rules):
                    return packing.packed_values(model.online if ema else model, batch)
            self._fn = jax.jit(fn)
        return self._fn

    def batches(self, limit: int = 0):
        rows = self.rows if not limit else self.rows[:limit]
        n_proc, me = jax.process_count(), jax.process_index()
        local = self.batch_size // n_proc
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            mine = chunk[me * local:(me + 1) * local]
            yield packing.collate([self.builder(r) for r in mine], local, self.builder.empty)

    def values(self, state: trainer.TrainState, limit: int = 0) -> dict[str, np.ndarray]:
        """Per valid state: value, reward, done, next value (NaN if none), return."""
        fn = self._values_fn(state.graphdef)
        cols: dict[str, list] = {k: [] for k in ("value", "reward", "done", "next", "returns", "loss_mask")}
        for local in self.batches(limit):
            batch = shd.host_local_batch_to_global(local, self.mesh)
            v = _host(fn(state.params, state.rest, batch))
            full = {k: _host(batch[k]) for k in ("state_mask", "next_slot", "reward", "done", "returns", "loss_mask")}
            ok = full["state_mask"] > 0
            nxt = np.where(full["next_slot"] >= 0,
                           np.take_along_axis(v, np.maximum(full["next_slot"], 0), axis=1), np.nan)
            for k, x in (("value", v), ("reward", full["reward"]), ("done", full["done"]), ("next", nxt),
                         ("returns", full["returns"]), ("loss_mask", full["loss_mask"])):
                cols[k].append(x[ok])
        return {k: np.concatenate(x) if x else np.zeros((0,), np.float32) for k, x in cols.items()}

    def metrics(self, state: trainer.TrainState, limit: int = 0) -> dict[str, float]:
        c = self.values(state, limit)
        return metrics_of(c, self.gamma)


def metrics_of(c: dict[str, np.ndarray], gamma: float) -> dict[str, float]:
    """TD loss (masked mean of squared TD errors), value mean, correlation of values with returns."""
    m = c["loss_mask"] > 0
    if not m.any():
        return {"td_loss": float("nan"), "value_corr": float("nan"), "num_states": 0}
    target = c["reward"] + gamma * np.where(c["done"] > 0, 0.0, np.nan_to_num(c["next"]))
    err = (c["value"] - target)[m]
    v, g = c["value"], c["returns"]
    corr = float(np.corrcoef(v, g)[0, 1]) if v.size > 1 and v.std() > 0 and g.std() > 0 else float("nan")
    return {"td_loss": float(np.mean(err ** 2)), "td_abs_err": float(np.mean(np.abs(err))),
            "value_mean": float(v.mean()), "return_mean": float(g.mean()), "value_corr": corr,
            "num_states": int(v.size)}


def value_stats(values: np.ndarray) -> dict:
    """Sentence-value statistics stored with a value checkpoint (ViMaR's θ default is one of them)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no sentence values to take statistics of")
    out = {f"p{q}": float(np.percentile(v, q)) for q in STATS_PERCENTILES}
    out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()), count=int(v.size))
    return out


# ------------------------------------------------------------------------------------------------ saving

def save_value_hf(model: ValueModel, hf_config: dict, vimar_value: dict, assets: str, out: str, *,
                  dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> None:
    """Write `out` as an HF value directory: LLaVA-NeXT tensors in the llava-hf layout plus `value_head.weight
    [1, E]`, `value_head.bias [1]`, config.json with `vimar_value`, and the tokenizer/processor files of
    `assets`. Appears complete or not at all; process 0 writes (the others take part in the gathers)."""
    cast = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype)
    if cast is None:
        raise ValueError(f"save_dtype={dtype!r}: expected float32, bfloat16 or float16")
    want = ckpt_io.DTYPES[cast]
    cfg = ValueConfig(ln.LlavaNextConfig.from_hf(hf_config), value_layer=model.config.value_layer,
                      state=model.config.state)
    params = {tuple(str(p) for p in path): v.get_value()
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rules = value_rules(cfg, ln.KeyLayout())

    def producer(r):
        def f():
            x = params[r.path] if r.index is None else params[r.path][r.index]
            # The head stays float32 whatever the save dtype.
            dt = np.float32 if r.path[0] == "value_head" else want
            return np.ascontiguousarray(r.to_hf(_host(x)).astype(dt))
        return f

    tensors = sorted((ckpt_io.OutTensor(r.hf_key, "F32" if r.path[0] == "value_head" else cast, tuple(r.hf_shape),
                                        producer(r)) for r in rules), key=lambda t: t.key)
    if jax.process_index() != 0:
        for t in tensors:
            t.produce()
        return
    groups = ckpt_io.plan_shards([t.nbytes for t in tensors], int(max_shard_bytes))
    names = ckpt_io.shard_names(len(groups))
    config = {**hf_config, "dtype": dtype, "vimar_value": {**cfg.hf_entry(), **vimar_value}}
    with ckpt_io.atomic_dir(out, overwrite=True) as tmp:
        for name, group in zip(names, groups):
            ckpt_io.write_safetensors(tmp / name, [tensors[i] for i in group], {"format": "pt"})
        if len(groups) > 1:
            weight_map = {tensors[i].key: name for name, g in zip(names, groups) for i in g}
            _write_json(tmp / ckpt_io.INDEX_FILE, {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                                                    "weight_map": weight_map})
        _write_json(tmp / ckpt_io.CONFIG_JSON, config)
        for name in sorted(os.listdir(assets)):
            src = os.path.join(assets, name)
            if os.path.isfile(src) and name.startswith(ASSET_PREFIXES):
                shutil.copy2(src, tmp / name)


# ------------------------------------------------------------------------------------------------- train

def trainer_config(config, num_train_rows: int) -> ml_collections.ConfigDict:
    """The trainer's keys of the recipe; `total_steps = 0` becomes `num_epochs` epochs of training rows."""
    known = trainer.default_config().keys()
    tcfg = trainer.make_config({k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
                                    else config[k]) for k in known if k in config})
    if tcfg.total_steps <= 0:
        if tcfg.batch_size <= 0:
            raise ValueError("total_steps=0 (train num_epochs) needs batch_size > 0 (rows per step)")
        tcfg.total_steps = max(1, math.ceil(float(config.num_epochs) * num_train_rows / tcfg.batch_size))
    return tcfg


def train_value(config, workdir: str) -> tuple[trainer.TrainState, dict]:
    """Train, evaluate, save `workdir/hf`; returns the final state and the summary (`workdir/summary.json`)."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if not config.init:
        raise ValueError("config.init is required: a policy (LLaVA-NeXT) or value checkpoint directory")
    template = packing.StateTemplate(Processor.from_dir(config.init),
                                     max_suffix_tokens=int(config.data.max_suffix_tokens), state=config.value.state)
    data = load_data(config, template)
    tcfg = trainer_config(config, len(data.train_rows))
    mesh = shd.mesh_from_config(tcfg.mesh)
    rules = shd.DEFAULT_RULES
    gamma, ema_decay = float(config.td.gamma), float(config.td.ema_decay)
    ema = ema_decay > 0
    t0 = time.perf_counter()
    model, hf = load_value_model(config, mesh)
    t_init = time.perf_counter() - t0

    kw = dict(seq_len=int(config.data.seq_len), max_states=int(config.data.max_states), gamma=gamma)
    builder = packing.RowBuilder(data.train, template, image_opener(config, config.rollouts), **kw)
    val_dir = config.data.val_rollouts or config.rollouts
    val_builder = packing.RowBuilder(data.val, template, image_opener(config, val_dir), **kw)
    dataset = train_dataset(data, builder, batch_size=int(tcfg.batch_size), seed=int(config.seed))
    evaluator = Evaluator(data, val_builder, batch_size=int(config.eval.batch_size), gamma=gamma, mesh=mesh,
                          rules=rules, compute_dtype=tcfg.compute_dtype, fp32_params=tuple(tcfg.fp32_params), ema=ema)
    eval_fn = (lambda state: evaluator.metrics(state, int(config.eval.max_rows))) if data.val_rows else None

    fit_kw = {}
    if ema:
        model = EMAValueModel(model)
        tcfg.trainable = ema_trainable(tcfg.trainable)
        tx, schedule = trainer.make_optimizer(tcfg)
        fit_kw["tx"] = (ema_optimizer(tx, ema_decay), schedule)

    history: list[dict] = []
    log_every = max(int(tcfg.log_every), 1)

    def hook(step, m):
        if step % log_every == 0 or step == 1:
            history.append({"step": step, **{k: float(m[k]) for k in ("loss", "grad_norm", "lr", "value_mean",
                                                                      "target_mean") if k in m}})

    run_config = config.to_dict()
    t0 = time.perf_counter()
    state = trainer.fit(tcfg, workdir=workdir, model=model, loss_fn=make_loss_fn(gamma, ema),
                        train_data=iter(dataset), eval_fn=eval_fn, mesh=mesh, rules=rules, run_config=run_config,
                        hooks=[hook], **fit_kw)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    if data.val_rows:
        cols = evaluator.values(state)
        where = "validation"
    else:   # no held-out groups: statistics over the training states instead (said so in the summary)
        cols = Evaluator(dataclasses.replace(data, val_rows=data.train_rows), builder,
                         batch_size=int(config.eval.batch_size), gamma=gamma, mesh=mesh, rules=rules,
                         compute_dtype=tcfg.compute_dtype, fp32_params=tuple(tcfg.fp32_params), ema=ema).values(state)
        where = "train"
    final = metrics_of(cols, gamma)
    stats = value_stats(cols["value"])
    t_eval = time.perf_counter() - t0

    trained = state.model()
    value_model = trained.online if ema else trained
    vimar_value = {"stats": {**stats, "transitions": where}, "gamma": gamma,
                   "max_suffix_tokens": template.max_suffix_tokens,
                   "reward": {k: v for k, v in data.info["reward"].items()}}
    t0 = time.perf_counter()
    save_value_hf(value_model, hf, vimar_value, config.init, os.path.join(workdir, "hf"), dtype=config.save_dtype,
                  max_shard_bytes=int(config.max_shard_bytes))
    t_save = time.perf_counter() - t0
    summary = {"data": data.info, "train": {"steps": int(tcfg.total_steps), "batch_rows": int(tcfg.batch_size),
                                            "trainable": tcfg.trainable, "curve": history},
               "final_eval": {**final, "transitions": where}, "value_stats": stats,
               "wall_time_s": {"init": t_init, "train": t_train, "eval": t_eval, "save": t_save,
                               "total": time.perf_counter() - t_start},
               "config": run_config}
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return state, summary


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=float)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fl = flags.FlagValues()
    # `sys_argv`: config_flags finds the --config.KEY overrides there (default: the process's sys.argv).
    config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/tiny_value.py", flag_values=fl,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (resumable); the value model goes to WORKDIR/hf",
                        flag_values=fl)
    try:
        fl(argv)
    except KeyError as e:   # ml_collections: an override of a key the recipe does not have
        print(f"error: --config override of a key that does not exist: {e.args[0] if e.args else e}",
              file=sys.stderr)
        return 2
    except (flags.Error, AttributeError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if fl.config is None:
        print("error: --config is required (e.g. --config configs/tiny_value.py)", file=sys.stderr)
        return 2
    if not fl.workdir:
        print("error: --workdir is required", file=sys.stderr)
        return 2
    shd.initialize_distributed()
    try:
        _, summary = train_value(fl.config, fl.workdir)
    except (trainer.WorkdirConfigError, trainer.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    brief = {"final_eval": summary["final_eval"], "value_stats": summary["value_stats"],
             "wall_time_s": summary["wall_time_s"], "last": summary["train"]["curve"][-1:]}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
