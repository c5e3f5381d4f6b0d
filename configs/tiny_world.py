"""The tiny world rebuild: every shipped model, trained by the project's own stage scripts.

`python train/tiny_world.py --out DIR [--quick] [--stages clip,policy,rollouts,value,policy_b]
[--config configs/tiny_world.py[:quick]] [--config.KEY=VALUE ...]`.

Each stage section holds overrides of that stage's own recipe (`clip` -> configs/tiny_clip.py, `policy` ->
configs/tiny_policy.py, `policy_b` -> configs/tiny_policy_qwen.py, `value` -> configs/tiny_value.py) or, for
`rollouts`, the options of train/gen_rollouts.py. An empty section keeps the recipe as it is.

Seed plan (scene streams; `vimar_jax.data.scenes.scene_at(seed, i)`):

| seed  | use                                                                                   |
|-------|---------------------------------------------------------------------------------------|
| 1     | CLIP training scenes                                                                   |
| 2     | policy "a" training scenes; the value model's rollouts are drawn on these scenes       |
| 3     | policy "b" training scenes                                                             |
| 100   | validation: the stages' own evaluations (CLIP retrieval/δ, policy greedy CHAIR); recipe |
|       | choices (sizes, steps) are made on it                                                 |
| 1000  | held out: `vimar eval` figures (README)                                                |
| 1001  | held out: `vimar demo` default                                                         |
| 1002  | held out: greedy CHAIR of both policies in provenance.json                             |

No seed >= 1000 is used in training or for any choice of the recipe.
"""

import ml_collections

SEEDS = dict(clip_train=1, policy_train=2, policy_b_train=3, validation=100, eval=1000, demo=1001, heldout=1002)


def _full() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seeds = ml_collections.ConfigDict(SEEDS)
    c.clip = ml_collections.ConfigDict()       # configs/tiny_clip.py as it is
    c.policy = ml_collections.ConfigDict()     # configs/tiny_policy.py as it is
    c.policy_b = ml_collections.ConfigDict()   # configs/tiny_policy_qwen.py as it is
    c.rollouts = ml_collections.ConfigDict(dict(
        num_scenes=800,             # (image, prompt) pairs: scenes 0..N-1 of the policy's training stream
        temperatures="0,0.2,0.4,0.6,0.8",
        top_p=0.9,
        max_new_tokens=128,
        tau="p17",                  # margin as a percentile of δ over the rollouts (SPEC §2, ours)
        shards=4,
        seed=0,
        counterfactuals=0,          # gen_rollouts --counterfactuals (ours; 0 = the paper's data)
    ))
    # Constant reward of the ground-truth caption's sentences (the rollouts' extra trajectory): a number or
    # a decile of the rollouts' δ; "p90" as 0.27 is about P90 of δ for CLIP-L/336 on COCO (SPEC §2).
    c.gt_reward = "p90"
    c.value = ml_collections.ConfigDict(dict(
        num_epochs=3,
        batch_size=8,
        eval=dict(batch_size=8),
    ))
    # Greedy CHAIR of both policies on held-out scenes (seeds.heldout), for provenance.json.
    c.heldout = ml_collections.ConfigDict(dict(num_scenes=100, batch_size=25, max_new_tokens=128))
    return c


def _quick() -> ml_collections.ConfigDict:
    """The CI smoke version: tiny models, a few steps, a few scenes (minutes on 2 cores)."""
    c = _full()
    c.clip = ml_collections.ConfigDict(dict(
        total_steps=12, batch_size=16, warmup_steps=2, log_every=1, checkpoint_every=1000,
        model=dict(image_size=24, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                   text_hidden=32, text_layers=2, text_heads=2, text_mlp=64, projection_dim=16),
        data=dict(num_train_scenes=32),
        eval=dict(num_scenes=8, batch_size=16),
    ))
    small_policy = dict(
        total_steps=4, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=1000,
        model=dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64),
        data=dict(num_scenes=16, variants=1, length_buckets=(128, 192)),
        eval=dict(num_scenes=2, batch_size=2, max_new_tokens=24),
    )
    c.policy = ml_collections.ConfigDict(small_policy)
    c.policy_b = ml_collections.ConfigDict(small_policy)
    # tau as a number: a few-step policy may end no sentence, leaving no δ for a percentile.
    c.rollouts.update(dict(num_scenes=3, temperatures="0,0.6", max_new_tokens=24, shards=1, tau="0.1"))
    c.gt_reward = "0.27"
    c.value = ml_collections.ConfigDict(dict(
        total_steps=2, batch_size=2, warmup_steps=0, log_every=1, checkpoint_every=1000, eval_every=0,
        data=dict(seq_len=256, max_states=8, val_fraction=0.34),
        eval=dict(batch_size=2),
    ))
    c.heldout = ml_collections.ConfigDict(dict(num_scenes=2, batch_size=2, max_new_tokens=24))
    return c


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """preset: None/"full" (the shipped models) or "quick" (the CI smoke rebuild)."""
    if preset in (None, "", "full"):
        return _full()
    if preset == "quick":
        return _quick()
    raise ValueError(f"configs/tiny_world.py: unknown preset {preset!r}; expected 'full' or 'quick'")
