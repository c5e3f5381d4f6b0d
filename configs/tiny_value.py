"""The tiny world's value model: TD training on the tiny policy's rollouts, scored by the tiny CLIP.

    python train/gen_rollouts.py --policy POLICY --clip CLIP --source tiny:3:2000 --out ROLLOUTS --shards 4 --tau p17
    python train/train_value.py --config configs/tiny_value.py --workdir DIR \\
        --config.init=POLICY --config.rollouts=ROLLOUTS [--config.KEY=VALUE ...]

Top-level keys are the trainer's (`vimar_jax.trainer.default_config()`) plus the recipe's: `init` (policy or
value directory), `rollouts`, `num_epochs`, `value`, `data`, `td`, `eval`. `batch_size` counts packed rows
(one image prefix + its trajectories' sentence states each), not transitions.
"""

import ml_collections

from vimar_jax import trainer


def get_config() -> ml_collections.ConfigDict:
    c = trainer.default_config()
    c.seed = 0
    c.total_steps = 0               # 0: num_epochs epochs of training rows
    c.num_epochs = 4
    c.batch_size = 8                # packed rows per optimizer step
    c.grad_accum = 1
    c.lr = 5e-4
    c.end_lr = 0.0
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.trainable = "freeze:backbone.vision"   # the tiny CLIP tower stays frozen, as in the policy
    c.fp32_params = ("value_head",)
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.eval_every = 100

    c.init = ""                     # policy (fresh head) or value directory
    c.rollouts = ""                 # gen_rollouts output directory
    c.save_dtype = "float32"        # dtype of WORKDIR/hf weights (the head is always float32)
    c.max_shard_bytes = 5 * 10**9

    c.value = ml_collections.ConfigDict(dict(
        value_layer=-2,             # HF hidden_states index: the penultimate decoder layer (paper)
        state="sentence",           # (image, one sentence) states; "prefix": (image, prompt, caption so far + sentence)
        remat="none",               # "none" | "full" | "dots"
    ))
    c.data = ml_collections.ConfigDict(dict(
        val_rollouts="",            # a separate held-out rollout directory ("" = split the groups)
        val_fraction=0.1,           # of the image groups, when val_rollouts is ""
        split_seed=0,
        seq_len=512,                # tokens per packed row (image prefix + sentence suffixes)
        max_states=32,              # sentence states (value queries) per row
        max_suffix_tokens=48,       # a longer sentence state is cut (its end-of-turn tokens kept)
        image_root="",              # where relative image references live ("" = the rollouts' source root)
        tau="manifest",             # margin τ: "manifest" (as resolved by gen_rollouts), a float, or "p17"
        alpha="manifest",
        variant="manifest",
        ground_truth_reward="manifest",
    ))
    c.td = ml_collections.ConfigDict(dict(
        gamma=0.9,
        ema_decay=0.0,              # > 0: V(s') from an EMA target network with this decay
    ))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=8,               # rows; a multiple of data * fsdp
        max_rows=0,                 # rows evaluated during training (0 = all); the final evaluation uses all
    ))
    return c
