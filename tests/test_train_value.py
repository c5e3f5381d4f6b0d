"""Value training: image-grouped packing equals states run alone, TD targets from the packed pass, a sharded
train step equal to one device, and the end-to-end `train_value.py` command (metrics, checkpoints, value
statistics, an HF value directory that `load_value` reads)."""

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import max_rel_err
from tests.test_rollouts import make_policy_dir
from vimar_jax import sharding as shd
from vimar_jax import td, trainer
from vimar_jax.convert import io as ckpt_io
from vimar_jax.data import packing, sources
from vimar_jax.data import scenes as S
from vimar_jax.models.value import ValueModel

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
GAMMA = 0.9


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_policy_dir(tmp_path_factory.mktemp("policy") / "p", seed=1)


@functools.cache
def value_model(policy: str) -> ValueModel:
    module, _ = ckpt_io.load_module(policy)
    model = ValueModel.from_policy(module, value_layer=-2, rng=4)
    model.value_head.kernel[...] = jax.random.normal(jax.random.key(5), model.value_head.kernel.shape) * 0.2
    model.value_head.bias[...] = jnp.asarray([0.3])
    return model


def scene_groups(template, *, seeds=((11, 0), (11, 1)), rewards_seed=0):
    """Two image groups: per scene, its true caption's sentences as one trajectory, a shuffled copy as a
    second and the first two sentences as a third; random rewards."""
    rng = np.random.default_rng(rewards_seed)
    groups = []
    for seed, i in seeds:
        scene = S.scene_at(seed, i)
        sents = S.caption_sentences(scene, np.random.default_rng([seed, i]), "detail")
        trajs = [sents, list(rng.permutation(sents)), sents[:2]]
        img = S.render(scene)
        groups.append(packing.Group(f"{seed}/{i}", f"tiny:{seed}:{i}", (img.height, img.width), [
            packing.Trajectory(t, template.suffix_ids(s), rng.normal(size=len(s)).astype(np.float32))
            for t, s in enumerate(trajs)]))
    return groups


def build_batch(groups, template, *, seq_len, max_states, batch_rows=None):
    rows, stats = packing.plan_rows(groups, template, seq_len=seq_len, max_states=max_states)
    builder = packing.RowBuilder(groups, template, sources.open_image, seq_len=seq_len, max_states=max_states,
                                 gamma=GAMMA)
    batch = packing.collate([builder(r) for r in rows], batch_rows, builder.empty)
    return rows, stats, batch


def alone_values(model, template, groups, length: int) -> dict:
    """{(group, traj): values [n]}: every state run alone as a plain causal sequence [prefix, suffix]
    (right-padded to `length`, which a causal model ignores), valued at its last token; one jitted call
    per image."""
    fn = nnx.jit(lambda m, ids, pv, gi, q: m.values(ids, pv, None, gi, query_index=q))
    cfg = template.processor.image_config
    out = {}
    for gi, g in enumerate(groups):
        arrays = packing.image_arrays(sources.open_image(g.image), template.processor.image_config)
        states = [(t, s) for t, traj in enumerate(g.trajectories) for s in traj.suffixes]
        ids = np.zeros((len(states), length), np.int32)
        last = np.zeros((len(states), 1), np.int32)
        for k, (_, s) in enumerate(states):
            x = np.concatenate([template.prefix_ids(g.image_hw), s])
            ids[k, :len(x)], last[k, 0] = x, len(x) - 1
        n = len(states)
        v = np.asarray(fn(model, jnp.asarray(ids), jnp.asarray(np.repeat(arrays["pixel_values"][None], n, 0)),
                          packing.batch_gather_index(jnp.asarray(np.repeat(arrays["gather_index"][None], n, 0)),
                                                     cfg.max_num_patches, cfg.tokens_per_view),
                          jnp.asarray(last)))[:, 0]
        for t in range(len(g.trajectories)):
            out[gi, t] = v[[k for k, (tt, _) in enumerate(states) if tt == t]]
    return out


def packed_and_alone(rows, values, alone) -> tuple[list, list]:
    """(packed values, the same states' values run alone) of every kept state, in row order."""
    got, want = [], []
    for b, plan in enumerate(rows):
        q = 0
        for t, kept in plan.trajs:
            got += list(values[b, q:q + kept])
            want += list(alone[plan.group, t][:kept])
            q += kept
    return got, want


@pytest.fixture(scope="module")
def packed(policy_dir):
    template = packing.StateTemplate.from_dir(policy_dir, max_suffix_tokens=24)
    groups = scene_groups(template)
    # Room for about two trajectories per row, and at most 4 states: the long trajectories are cut.
    P = max(len(template.prefix_ids(g.image_hw)) for g in groups)
    rows, stats, batch = build_batch(groups, template, seq_len=P + 60, max_states=4)
    model = value_model(policy_dir)
    values = np.asarray(nnx.jit(packing.packed_values)(model, batch))
    alone = alone_values(model, template, groups, P + 24)
    return template, groups, rows, stats, batch, values, alone


def test_state_template_renders_image_then_sentence(policy_dir):
    template = packing.StateTemplate.from_dir(policy_dir, max_suffix_tokens=12)
    tok = template.tokenizer
    hw = (40, 90)
    ids = template.state_ids(hw, "There is a large red circle in the top left.")
    n_img = template.processor.num_image_tokens(hw)
    # The rendered user turn "[INST] <image>\n{sentence} [/INST]", tokenized as one text.
    full = template.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "There is a large red circle."}]}])
    want = tok.encode(template.processor.expand_image_tokens([full], [hw])[0])
    assert template.state_ids(hw, "There is a large red circle.").tolist() == want
    assert (ids == template.image_token_id).sum() == n_img
    # Cut to 12 suffix tokens, the closing "▁ [/INST]" kept.
    suffix = ids[len(template.prefix_ids(hw)):]
    assert len(suffix) == 12 and [tok.id_to_token(t) for t in suffix[-2:]] == ["▁", "[/INST]"]
    with pytest.raises(ValueError, match="empty"):
        template.suffix_ids(["  "])


def test_plan_keeps_trajectories_whole_within_capacity(packed):
    template, groups, rows, stats, batch, _, _ = packed
    T, Q = batch["input_ids"].shape[1], batch["query_index"].shape[1]
    assert stats.rows == len(rows) > len(groups)          # some image needs two rows
    assert stats.truncated_trajectories == 2 and stats.dropped_states > 0   # 5- and 6-sentence captions cut to 4
    seen = set()
    for b, plan in enumerate(rows):
        g = groups[plan.group]
        P = len(template.prefix_ids(g.image_hw))
        assert np.array_equal(batch["input_ids"][b, :P], template.prefix_ids(g.image_hw))
        assert (batch["segment_ids"][b, :P] == 0).all()
        n = int(batch["state_mask"][b].sum())
        assert n == sum(k for _, k in plan.trajs) <= Q
        used = P + sum(len(g.trajectories[t].suffixes[i]) for t, k in plan.trajs for i in range(k))
        assert (batch["segment_ids"][b] >= 0).sum() == used <= T
        seen |= {(plan.group, t) for t, _ in plan.trajs}
    assert seen == {(gi, t) for gi, g in enumerate(groups) for t in range(len(g.trajectories))}


def test_packed_values_equal_states_run_alone(policy_dir, packed):
    """Acceptance: the value of every state of a packed batch equals that (image, sentence) state run alone
    through ValueModel."""
    template, groups, rows, _, batch, values, alone = packed
    got, want = packed_and_alone(rows, values, alone)
    assert len(got) == int(batch["state_mask"].sum())
    assert max_rel_err(got, want) <= TOL


def test_td_targets_from_packed_pass_equal_hand_computed(policy_dir, packed):
    """y_i = r_i + γ V(s_{i+1}) with V from states run alone, y = r at terminal states; a cut trajectory's
    last kept state has no target (masked out); the packed loss is the mean over the rest."""
    template, groups, rows, _, batch, values, alone_all = packed
    model = value_model(policy_dir)
    nv = np.asarray(packing.next_values(jnp.asarray(values), jnp.asarray(batch["next_slot"])))
    targets = np.asarray(td.td_targets(batch["reward"].reshape(-1), nv.reshape(-1), batch["done"].reshape(-1),
                                       GAMMA)).reshape(values.shape)
    got, want, errs, masked = [], [], [], 0
    for b, plan in enumerate(rows):
        q = 0
        for t, kept in plan.trajs:
            traj = groups[plan.group].trajectories[t]
            alone = alone_all[plan.group, t]
            for i in range(kept):
                if i + 1 < len(traj) and i + 1 >= kept:      # cut here: no next state in the row
                    assert batch["loss_mask"][b, q + i] == 0
                    masked += 1
                    continue
                assert batch["loss_mask"][b, q + i] == 1
                y = traj.rewards[i] + (GAMMA * alone[i + 1] if i + 1 < len(traj) else 0.0)
                got.append(targets[b, q + i])
                want.append(y)
                errs.append((alone[i] - y) ** 2)
            q += kept
    assert masked == 2
    assert max_rel_err(got, want) <= TOL
    loss, metrics, _ = packing.td_loss(model, batch, gamma=GAMMA)
    assert float(metrics["weight"]) == len(errs)
    assert abs(float(loss) - np.mean(errs)) <= TOL * np.mean(errs)


def prefix_records(prompts=((0, "Describe the image."), (0, "What is in the picture?"), (1, "Describe it."))):
    """Transition records of tiny-world captions: one trajectory per (scene of seed 11, prompt)."""
    from vimar_jax.data import transitions as tr

    records = []
    for t, (i, prompt) in enumerate(prompts):
        scene = S.scene_at(11, i)
        img = S.render(scene)
        sents = S.caption_sentences(scene, np.random.default_rng([11, i, t]), "detail")
        records += tr.trajectory_records(image=f"tiny:11:{i}", image_hw=[img.height, img.width], prompt=prompt,
                                         group=str(i), traj=t, temperature=0.0, gt=False, sentences=sents,
                                         spans=[[0, 1]] * len(sents), deltas=np.zeros(len(sents)))
    return records


def test_prefix_states_from_records_pack_and_value_as_run_alone(policy_dir):
    """Prefix states (image + the record's prompt + the caption so far + the sentence): grouped by image
    whatever the prompt, each state's tokens are the rendered conversation's, packed values equal the states
    run alone, and V(s_{i+1}) in the TD target is the next prefix state's."""
    from vimar_jax.decode.scorers import render_state

    template = packing.StateTemplate.from_dir(policy_dir, state="prefix")
    records = prefix_records()
    rewards = np.random.default_rng(3).normal(size=len(records)).astype(np.float32)
    groups = packing.groups_from_records(records, template, rewards)
    assert [len(g.trajectories) for g in groups] == [2, 1]          # two prompts of scene 0 in one group
    proc = template.processor
    for g in groups:
        for traj in g.trajectories:
            recs = [r for r in records if r["traj"] == traj.traj]
            texts = [r["text"] for r in recs]
            for i, suffix in enumerate(traj.suffixes):
                text = render_state(proc, texts[i], state="prefix", prompt=recs[0]["prompt"], previous=texts[:i])
                want = proc.tokenizer.encode(proc.expand_image_tokens([text], [g.image_hw])[0])
                assert np.concatenate([template.prefix_ids(g.image_hw), suffix]).tolist() == want
    P = max(len(template.prefix_ids(g.image_hw)) for g in groups)
    longest = max(t.num_tokens for g in groups for t in g.trajectories)
    rows, stats, batch = build_batch(groups, template, seq_len=P + longest, max_states=16)
    assert stats.truncated_trajectories == 0 and stats.states == len(records)
    model = value_model(policy_dir)
    values = np.asarray(nnx.jit(packing.packed_values)(model, batch))
    alone = alone_values(model, template, groups, P + max(len(s) for g in groups for t in g.trajectories
                                                          for s in t.suffixes))
    got, want = packed_and_alone(rows, values, alone)
    assert len(got) == len(records) and max_rel_err(got, want) <= TOL
    nv = np.asarray(packing.next_values(jnp.asarray(values), jnp.asarray(batch["next_slot"])))
    plan = rows[0]
    t0, kept = plan.trajs[0]
    assert max_rel_err(nv[0, :kept - 1], alone[plan.group, t0][1:kept]) <= TOL

    bad = [dict(r, prompt="") if r["traj"] == 2 else r for r in records]
    with pytest.raises(ValueError, match="trajectory 2: prefix states need the record's 'prompt'"):
        packing.groups_from_records(bad, template, rewards)


def test_sharded_train_step_equals_one_device(policy_dir):
    """One TD train step on a packed batch on a (data=2, fsdp=2, tensor=2) mesh equals the same step on one
    device (loss, gradient norm and updated parameters)."""
    template = packing.StateTemplate.from_dir(policy_dir, max_suffix_tokens=24)
    groups = scene_groups(template, seeds=((11, 0), (11, 1), (11, 2)), rewards_seed=1)
    P = max(len(template.prefix_ids(g.image_hw)) for g in groups)
    rows, _, batch = build_batch(groups, template, seq_len=P + 100, max_states=8)
    batch = packing.collate([{k: v[b] for k, v in batch.items()} for b in range(min(len(rows), 4))], 4,
                            lambda: packing.empty_row(template, seq_len=P + 100, max_states=8))
    # Plain SGD: the update is the gradient itself (Adam's first step, ~lr * sign(g), would amplify
    # float rounding in near-zero gradient entries).
    import optax

    tx, schedule = optax.sgd(0.01), optax.constant_schedule(0.01)
    loss_fn = lambda m, b, rng: packing.td_loss(m, b, gamma=GAMMA)[:2]  # noqa: E731
    flat = lambda tree: {"/".join(map(str, p)): np.asarray(v.get_value())  # noqa: E731
                         for p, v in nnx.to_flat_state(tree)}
    results = []
    for mesh in (shd.make_mesh(1, 1, 1), shd.make_mesh(2, 2, 2)):
        state, shardings = trainer.create_train_state(value_model(policy_dir), tx, mesh=mesh,
                                                      trainable="freeze:backbone.vision")
        before = flat(state.params)
        step = trainer.make_train_step(loss_fn, tx, schedule, shardings, mesh=mesh)
        state, metrics = step(state, shd.host_local_batch_to_global(batch, mesh))
        after = flat(state.params)
        results.append((metrics, after, {k: before[k] - after[k] for k in before}))
    (m1, p1, d1), (m8, p8, d8) = results
    assert float(m1["weight"]) > 10 and float(m1["grad_norm"]) > 0
    for k in ("loss", "grad_norm", "value_mean", "target_mean"):
        assert max_rel_err(m8[k], m1[k]) <= TOL, k
    assert p1.keys() == p8.keys() and not any(k.startswith("backbone/vision") for k in p1)
    assert max(max_rel_err(p8[k], p1[k]) for k in p1) <= TOL
    # The updates (lr x gradient) themselves agree too, over all parameters.
    g1 = np.concatenate([d1[k].ravel() for k in sorted(d1)])
    g8 = np.concatenate([d8[k].ravel() for k in sorted(d8)])
    assert max_rel_err(g8, g1) <= TOL


# ------------------------------------------------------------------------------------------ end to end

def run_train_value(workdir, *overrides):
    sys.path.insert(0, str(ROOT / "train"))
    import train_value

    argv = ["train_value.py", "--config", str(ROOT / "configs" / "tiny_value.py"), "--workdir", str(workdir),
            *overrides]
    return train_value.main(argv)


def write_rollouts(out, seed: int, n: int, shards: int = 2) -> None:
    """A rollout directory in gen_rollouts' format without running the policy (test_rollouts covers that):
    per tiny-world scene, its true caption, two rearrangements of it and the ground truth, random δ; the
    manifest written by gen_rollouts' own `finalize` (τ = P17 of δ)."""
    sys.path.insert(0, str(ROOT / "train"))
    import gen_rollouts

    from vimar_jax.data import transitions as tr

    src = sources.tiny_source(seed, n)
    rng = np.random.default_rng(seed)
    for k, items in enumerate(gen_rollouts.shard_ranges(n, shards)):
        w = tr.ShardWriter(str(out), k, shards)
        deltas = []
        for i in items:
            it = src.items[i]
            img = it.load()
            sents = S.caption_sentences(S.scene_at(seed, i), np.random.default_rng([seed, i, 1]), "detail")
            trajs = [sents, list(rng.permutation(sents)), sents[::-1][:3], S.caption_sentences(
                S.scene_at(seed, i), np.random.default_rng([seed, i, 53]), "detail")]
            for t, ss in enumerate(trajs):
                d = rng.uniform(-0.1, 0.4, len(ss))
                deltas += list(d) if t < 3 else []
                for rec in tr.trajectory_records(image=it.ref, image_hw=[img.height, img.width], prompt=it.prompt,
                                                 group=str(i), traj=t, temperature=[0.0, 0.4, 0.8, -1.0][t],
                                                 gt=t == 3, sentences=ss, spans=[[0, 1]] * len(ss), deltas=d):
                    w.write(rec)
        w.commit({"shard": k, "groups": [], "skipped": [], "deltas": deltas, "counts": {"images": len(items)}})
    settings = {"reward": {"tau": "p17", "alpha": 1.0, "variant": "margin", "ground_truth_reward": 0.27}}
    assert gen_rollouts.finalize(str(out), shards, settings, src) is not None


def test_train_value_end_to_end(policy_dir, tmp_path, capsys):
    """`train_value.py` for a few steps on a rollout directory: metrics.jsonl, checkpoints, value statistics
    in the HF value directory equal to the values `load_value` gives the validation states run alone; an
    unknown config key is an error naming it."""
    from vimar_jax.data import transitions as tr
    from vimar_jax.vlm import load_value

    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    write_rollouts(rollouts, 21, 5)
    wd = tmp_path / "wd"
    common = [f"--config.init={policy_dir}", f"--config.rollouts={rollouts}", "--config.batch_size=4",
              "--config.eval.batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
              "--config.data.val_fraction=0.34", "--config.data.seq_len=320", "--config.data.max_states=16",
              "--config.log_every=1", "--config.eval_every=2", "--config.checkpoint_every=2"]
    assert run_train_value(wd, *common, "--config.total_steps=3") == 0
    metrics = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["weight"] > 0 for m in train_lines)
    evals = [m for m in metrics if "eval/td_loss" in m]
    assert [m["step"] for m in evals] == [2] and np.isfinite(evals[0]["eval/value_corr"])
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "3"]

    # The HF value directory: load_value reads it; its stats are those of the validation states run alone.
    hf = wd / "hf"
    config = json.loads((hf / "config.json").read_text())
    vv = config["vimar_value"]
    assert vv["value_layer"] == -2 and vv["state"] == "sentence" and vv["stats"]["transitions"] == "validation"
    value = load_value(str(hf))
    template = packing.StateTemplate.from_dir(str(hf), max_suffix_tokens=vv["max_suffix_tokens"])
    records = [r for p in tr.shard_paths(str(rollouts)) for r in tr.read_shard(p)]
    groups = packing.groups_from_records(records, template, np.zeros(len(records)))
    _, val = packing.split_groups(groups, 0.34, 0)
    assert val
    ids, pixels, sizes = [], [], []
    for g in val:
        arrays = packing.image_arrays(sources.open_image(g.image), template.processor.image_config)
        for t in g.trajectories:
            for s in t.suffixes:
                ids.append(np.concatenate([template.prefix_ids(g.image_hw), s]))
                pixels.append(arrays["pixel_values"])
                sizes.append(arrays["image_size"])
    batch = np.zeros((len(ids), max(map(len, ids))), np.int32)
    mask = np.zeros_like(batch)
    for i, x in enumerate(ids):
        batch[i, :len(x)], mask[i, :len(x)] = x, 1
    got = np.asarray(value.values(batch, np.stack(pixels), np.stack(sizes), mask))   # one state per row
    stats = vv["stats"]
    assert stats["count"] == len(got)
    for q in (10, 50, 90):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(got, q), abs=1e-4)
    assert stats["mean"] == pytest.approx(np.mean(got), abs=1e-4)
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["final_eval"]["num_states"] == len(got)

    # With an EMA target network (td.ema_decay): trains through the trainer's tx, exports the online model.
    wd_ema = tmp_path / "wd_ema"
    assert run_train_value(wd_ema, *common, "--config.total_steps=2", "--config.td.ema_decay=0.9") == 0
    assert [m["step"] for m in map(json.loads, (wd_ema / "metrics.jsonl").read_text().splitlines())
            if "loss" in m] == [1, 2]
    ema_value = load_value(str(wd_ema / "hf"))
    assert json.loads((wd_ema / "hf" / "config.json").read_text())["vimar_value"]["stats"]["count"] == len(got)
    assert ema_value.config.value_layer == -2

    # Prefix states (value.state=prefix): the exported model says so and the search values prefix states.
    wd_prefix = tmp_path / "wd_prefix"
    assert run_train_value(wd_prefix, *common, "--config.total_steps=1", "--config.value.state=prefix",
                           "--config.data.seq_len=768") == 0
    vp = json.loads((wd_prefix / "hf" / "config.json").read_text())["vimar_value"]
    assert vp["state"] == "prefix" and vp["stats"]["count"] == len(got)
    assert load_value(str(wd_prefix / "hf")).config.state == "prefix"

    # A key that does not exist is an error naming it.
    capsys.readouterr()
    assert run_train_value(tmp_path / "wd2", *common, "--config.data.no_such_key=1") == 2
    assert "no_such_key" in capsys.readouterr().err


def test_ema_target_network_step(policy_dir):
    """With an EMA target network, V(s_{i+1}) comes from the target parameters (a second forward), the
    online parameters take the optimizer step and the target moves to decay * target + (1 - decay) * online."""
    import optax

    sys.path.insert(0, str(ROOT / "train"))
    import train_value

    template = packing.StateTemplate.from_dir(policy_dir, max_suffix_tokens=24)
    groups = scene_groups(template, seeds=((11, 3),), rewards_seed=2)
    P = len(template.prefix_ids(groups[0].image_hw))
    _, _, batch = build_batch(groups, template, seq_len=P + 120, max_states=12)
    online = value_model(policy_dir)
    model = train_value.EMAValueModel(online)
    # A target that differs from the online model: its head is shifted.
    model.target.value_head.bias[...] = model.target.value_head.bias[...] + 1.0
    want_loss, _, _ = packing.td_loss(online, batch, gamma=GAMMA, target_model=model.target)
    plain_loss, _, _ = packing.td_loss(online, batch, gamma=GAMMA)
    assert abs(float(want_loss) - float(plain_loss)) > 1e-3

    decay, lr = 0.75, 0.01
    tx, schedule = train_value.ema_optimizer(optax.sgd(lr), decay), optax.constant_schedule(lr)
    mesh = shd.make_mesh(1, 1, 1)
    spec = train_value.ema_trainable("freeze:backbone.vision")
    assert spec == "freeze:online.backbone.vision,target.backbone.vision"
    state, shardings = trainer.create_train_state(model, tx, mesh=mesh, trainable=spec)
    flat = lambda tree: {"/".join(map(str, p)): np.asarray(v.get_value())  # noqa: E731
                         for p, v in nnx.to_flat_state(tree)}
    before = flat(state.params)
    step = trainer.make_train_step(train_value.make_loss_fn(GAMMA, ema=True), tx, schedule, shardings, mesh=mesh)
    state, metrics = step(state, shd.host_local_batch_to_global(batch, mesh))
    after = flat(state.params)
    assert abs(float(metrics["loss"]) - float(want_loss)) <= TOL * abs(float(want_loss))
    assert not any("vision" in k for k in after)
    moved = 0
    for k in after:
        if not k.startswith("online/"):
            continue
        t = "target/" + k[len("online/"):]
        assert max_rel_err(after[t], decay * before[t] + (1 - decay) * after[k]) <= TOL, t
        moved += int(not np.array_equal(after[k], before[k]))
    assert moved > 0


def test_published_recipe_config():
    """configs/value_llava_next_mistral_7b.py: the published optimisation, a batch the mesh divides."""
    sys.path.insert(0, str(ROOT))
    from configs import value_llava_next_mistral_7b as recipe

    c = recipe.get_config()
    assert (c.lr, c.b1, c.b2, c.eps, c.warmup_ratio, c.end_lr, c.num_epochs) == (5e-5, 0.9, 0.999, 1e-8, 0.03, 0.0, 4)
    assert c.trainable == "all" and c.compute_dtype == "bfloat16" and c.value.remat == "full"
    assert c.batch_size % (c.mesh.data * c.mesh.fsdp) == 0 and c.batch_size % c.grad_accum == 0
    assert c.eval.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
    assert c.td.gamma == 0.9 and c.value.value_layer == -2
    tcfg = trainer.make_config({k: (c[k].to_dict() if hasattr(c[k], "to_dict") else c[k])
                                for k in trainer.default_config().keys()})
    assert tcfg.fp32_params == ("value_head",)
