"""CPU benchmark: the TD step with packed image prefixes vs one sequence per state, and rollout throughput.

    python bench/train_cpu.py [--images 4] [--repeats 3] [--skip-rollouts] [--smoke]

**TD step.** One random value model of the tiny world's size (`configs/tiny_policy.py` / `tiny_clip.py`:
a 4-layer 128-wide Mistral decoder behind a 4-layer CLIP tower on 48-pixel tiles, anyres; value at layer
-2) and one set of transitions: `--images` images of different sizes, 6 trajectories each (5 rollouts + the
ground truth), 3-6 sentence states per trajectory, 8-16 word tokens per sentence plus the template's
closing tokens. The same transitions are trained on in two layouts, each by one jitted
`value_and_grad` + AdamW step over all of them:

- **packed** (ours, `vimar_jax.data.packing`): rows of `seq_len` tokens `[image prefix, state suffixes...]`
  planned by `plan_rows`, filled by `pack_row`, valued in one pass by `packing.td_loss` (segment mask,
  V(s') read from the same row);
- **unpacked** (the released code's way): one row per state, `[image prefix, one sentence]` padded to the
  longest, the image encoded again by the vision tower for every row, V(s) with gradient and V(s') in a
  second forward without it (terminal states have none).

Reported: transitions per second and state tokens per second (the tokens of the states as separate
sequences, the same numerator for both layouts), tokens actually computed per step, and the ratio.

**Rollouts.** Images/s and generated tokens/s of `train/gen_rollouts.py`'s `Roller` (one `generate` call
with one shared prompt prefill for the 5 trajectories, sentence splitting, CLIP δ of every sentence) on the
shipped tiny-world policy and CLIP (`vimar_jax/assets/tiny_world/`) when they exist, else on random models
of the same shapes written to a temporary directory.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import time

from common import ROOT, Table, fmt, machine_line, median_times, ratio, tiny_world_hf, tiny_world_models

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from vimar_jax import td  # noqa: E402
from vimar_jax.data import packing  # noqa: E402
from vimar_jax.models.llava_next import LlavaNextConfig  # noqa: E402
from vimar_jax.models.value import ValueConfig, ValueModel  # noqa: E402

VOCAB = 400
IMAGE_TOKEN = VOCAB - 1
HEAD = [1, 5, 6]            # BOS and turn header before the image tokens
AFTER_IMAGE = [7]           # the newline after the image run
TAIL = [8, 9, 2]            # closing tokens of a state (end of turn)
IMAGE_HW = [(96, 96), (60, 120), (120, 50), (80, 80), (48, 144), (100, 70), (144, 60), (90, 110)]
GAMMA = 0.9


class Template:
    """The part of `packing.StateTemplate` that row planning uses: the prefix of an image size."""

    def __init__(self, image_config):
        self.image_config = image_config

    def prefix_ids(self, hw) -> np.ndarray:
        n = self.image_config.num_image_tokens(hw)
        return np.asarray(HEAD + [IMAGE_TOKEN] * n + AFTER_IMAGE, np.int32)


def make_groups(n_images: int, trajectories: int, rng: np.random.Generator) -> list[packing.Group]:
    groups = []
    for g in range(n_images):
        trajs = []
        for t in range(trajectories):
            n = int(rng.integers(3, 7))
            suffixes = [np.concatenate([rng.integers(10, IMAGE_TOKEN, int(rng.integers(8, 17))), TAIL]).astype(np.int32)
                        for _ in range(n)]
            trajs.append(packing.Trajectory(t, suffixes, rng.normal(size=n).astype(np.float32), gt=t == trajectories - 1))
        groups.append(packing.Group(str(g), f"img{g}", IMAGE_HW[g % len(IMAGE_HW)], trajs))
    return groups


def random_image(hw, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8))


def packed_batch(groups, template, image_config, *, seq_len: int, max_states: int) -> tuple[dict, dict]:
    plans, stats = packing.plan_rows(groups, template, seq_len=seq_len, max_states=max_states)
    if stats.truncated_trajectories:
        raise ValueError(f"seq_len={seq_len} cuts {stats.truncated_trajectories} trajectories: raise it")
    rows = []
    for plan in plans:
        g = groups[plan.group]
        row = packing.pack_row(template.prefix_ids(g.image_hw), [(g.trajectories[t], k) for t, k in plan.trajs],
                               seq_len=seq_len, max_states=max_states, gamma=GAMMA)
        rows.append({**row, **packing.image_arrays(random_image(g.image_hw, plan.group), image_config)})
    return packing.collate(rows), stats.to_dict()


def unpacked_batch(groups, template, image_config) -> dict:
    """One row per state (prefix + its sentence, right-padded), the image arrays repeated per row; the next
    state of every non-terminal transition as a row of its own."""
    states, nxt, reward, done = [], [], [], []
    for gi, g in enumerate(groups):
        prefix = template.prefix_ids(g.image_hw)
        for t in g.trajectories:
            for i, s in enumerate(t.suffixes):
                states.append((gi, np.concatenate([prefix, s])))
                reward.append(float(t.rewards[i]))
                terminal = i == len(t) - 1
                done.append(float(terminal))
                if not terminal:
                    nxt.append((len(states) - 1, gi, np.concatenate([prefix, t.suffixes[i + 1]])))
    width = -(-max(len(x) for _, x in states) // 16) * 16
    images = {gi: packing.image_arrays(random_image(g.image_hw, gi), image_config) for gi, g in enumerate(groups)}

    def rows(items):
        ids = np.zeros((len(items), width), np.int32)
        seg = np.full((len(items), width), -1, np.int32)
        for r, (_, x) in enumerate(items):
            ids[r, :len(x)], seg[r, :len(x)] = x, 0
        pos = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape).copy()
        last = np.asarray([[len(x) - 1] for _, x in items], np.int32)
        img = [images[gi] for gi, _ in items]
        return dict(input_ids=ids, positions=pos, segment_ids=seg, query_index=last,
                    pixel_values=np.stack([a["pixel_values"] for a in img]),
                    gather_index=np.stack([a["gather_index"] for a in img]))

    return dict(states=rows(states), next=rows([(gi, x) for _, gi, x in nxt]),
                next_of=np.asarray([i for i, _, _ in nxt], np.int32), reward=np.asarray(reward, np.float32),
                done=np.asarray(done, np.float32))


def row_values(model, b):
    cfg = model.backbone.config.image_config()
    gi = packing.batch_gather_index(b["gather_index"], b["pixel_values"].shape[1], cfg.tokens_per_view)
    return model.values(b["input_ids"], b["pixel_values"], None, gi, b["positions"], b["segment_ids"],
                        query_index=b["query_index"])[:, 0]


def unpacked_loss(model, b):
    values = row_values(model, b["states"])
    nv = jnp.zeros_like(values).at[b["next_of"]].set(jax.lax.stop_gradient(row_values(model, b["next"])))
    loss, _ = td.td_loss_and_metrics(values, nv, b["reward"], b["done"], gamma=GAMMA)
    return loss


def packed_loss(model, b):
    return packing.td_loss(model, b, gamma=GAMMA)[0]


def make_step(graphdef, tx, loss):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, batch):
        value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), batch))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value
    return step


def bench_td(args) -> Table:
    rng = np.random.default_rng(0)
    cfg = ValueConfig(LlavaNextConfig.from_hf(tiny_world_hf(VOCAB, IMAGE_TOKEN)), value_layer=-2)
    model = ValueModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    image_config = cfg.llava.image_config()
    template = Template(image_config)
    groups = make_groups(args.images, args.trajectories, rng)
    packed, stats = packed_batch(groups, template, image_config, seq_len=args.seq_len, max_states=args.max_states)
    unpacked = unpacked_batch(groups, template, image_config)
    n_trans = sum(g.num_states for g in groups)
    assert int(packed["state_mask"].sum()) == n_trans == len(unpacked["reward"])
    state_tokens = sum(len(template.prefix_ids(g.image_hw)) * g.num_states + sum(t.num_tokens for t in g.trajectories)
                       for g in groups)
    computed = {"packed": packed["input_ids"].size,
                "unpacked": unpacked["states"]["input_ids"].size + unpacked["next"]["input_ids"].size}
    views = {"packed": packed["pixel_values"].shape[0],
             "unpacked": unpacked["states"]["pixel_values"].shape[0] + unpacked["next"]["pixel_values"].shape[0]}

    tx = optax.adamw(1e-4)
    runs = {}
    for name, loss, batch in (("packed", packed_loss, packed), ("unpacked", unpacked_loss, unpacked)):
        state = [jax.tree.map(jnp.copy, params), None]
        state[1] = tx.init(state[0])
        step = make_step(graphdef, tx, loss)
        batch = jax.tree.map(jnp.asarray, batch)

        def run(step=step, state=state, batch=batch):
            state[0], state[1], value = step(state[0], state[1], batch)
            return value
        runs[name] = run
    # Same loss before any update: both layouts compute the same TD loss on the same transitions.
    first = {name: float(run()) for name, run in runs.items()}
    t_packed, t_unpacked = median_times([runs["packed"], runs["unpacked"]], repeats=args.repeats, warmup=0)

    print(f"TD step: tiny-world-sized value model ({cfg.llava.text.num_layers}-layer decoder x "
          f"{cfg.llava.text.hidden_size}, {cfg.llava.vision.num_layers}-layer CLIP on {image_config.image_size}px "
          f"tiles, value at layer {cfg.value_layer}), {len(groups)} images, {n_trans} transitions, "
          f"{state_tokens:,} state tokens; packed: {stats['rows']} rows x {args.seq_len} (fill {stats['fill']:.0%}); "
          f"unpacked: {views['unpacked']} rows x {unpacked['states']['input_ids'].shape[1]}; first-step loss "
          f"packed {first['packed']:.6f} / unpacked {first['unpacked']:.6f}")
    t = Table(f"TD step, median of {args.repeats} (ratio = packed speed / unpacked speed)",
              ("figure", "packed (ours)", "unpacked (released)", "ratio", "note"))
    t.add("step time (s)", fmt(t_packed, 3), fmt(t_unpacked, 3), ratio(t_unpacked, t_packed), "-")
    t.add("transitions/s", fmt(n_trans / t_packed), fmt(n_trans / t_unpacked), ratio(t_unpacked, t_packed), "-")
    t.add("state tokens/s", fmt(state_tokens / t_packed), fmt(state_tokens / t_unpacked), ratio(t_unpacked, t_packed),
          "tokens of the states as separate sequences")
    t.add("tokens computed per step", f"{computed['packed']:,}", f"{computed['unpacked']:,}",
          ratio(computed["unpacked"], computed["packed"]), "padding included")
    t.add("images through the tower per step", str(views["packed"]), str(views["unpacked"]),
          ratio(views["unpacked"], views["packed"]), "anyres views: x{}".format(packed["pixel_values"].shape[1]))
    return t


# ------------------------------------------------------------------------------------------ rollouts

def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "train" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_rollouts(args) -> Table:
    from vimar_jax.data import sources

    gen_rollouts = _load_script("gen_rollouts")
    found, origin, tmp = tiny_world_models(("policy", "clip"))
    policy, clip = found["policy"], found["clip"]
    opts = gen_rollouts.parse_args(["--policy", policy, "--clip", clip, "--source", f"tiny:0:{args.rollout_images}",
                                    "--out", "unused", "--max-new-tokens", str(args.rollout_tokens)])
    roller = gen_rollouts.Roller(opts)
    source = sources.parse_source(opts.source, prompts=opts.prompt)
    items = source.items[:args.rollout_images]
    images = [item.load() for item in items]
    roller(items[0], images[0], 0)                               # compile
    t0 = time.perf_counter()
    tokens = sentences = 0
    for k, (item, image) in enumerate(zip(items, images)):
        _, counts = roller(item, image, k + 1)
        tokens += counts["tokens"]
        sentences += counts["sentences"]
    dt = time.perf_counter() - t0
    if tmp is not None:
        tmp.cleanup()
    print(f"rollouts: gen_rollouts.Roller on {origin}, {len(items)} tiny-world images, "
          f"{len(roller.temperatures)} trajectories each (temperatures {roller.temperatures}), "
          f"max {args.rollout_tokens} new tokens, {opts.dtype}")
    t = Table("rollouts (one pass over the images after a warm-up image)", ("figure", "value", "note"))
    t.add("images/s", fmt(len(items) / dt, 2), f"{dt:.2f} s for {len(items)} images")
    t.add("generated tokens/s", fmt(tokens / dt), f"{tokens} tokens")
    t.add("sentences/s", fmt(sentences / dt), f"{sentences} sentences with CLIP δ")
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--trajectories", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-states", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rollout-images", type=int, default=8)
    p.add_argument("--rollout-tokens", type=int, default=96)
    p.add_argument("--skip-rollouts", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.trajectories, args.repeats, args.rollout_images, args.rollout_tokens = 1, 2, 1, 1, 8

    print(f"train_cpu: {machine_line()}")
    bench_td(args).print()
    if not args.skip_rollouts:
        bench_rollouts(args).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
