"""The published ViMaR value model recipe (SPEC §3) on LLaVA-NeXT-Mistral-7B, for a TPU pod slice.

    python train/gen_rollouts.py --policy llava-v1.6-mistral-7b-hf --clip clip-vit-large-patch14-336 \\
        --source coco:TFDS_DIR:train:23240 --out ROLLOUTS --shards 256 --worker K/N --tau 0.16
    python train/train_value.py --config configs/value_llava_next_mistral_7b.py --workdir gs://.../run \\
        --config.init=llava-v1.6-mistral-7b-hf --config.rollouts=ROLLOUTS

Published optimisation: AdamW lr 5e-5, betas (0.9, 0.999), eps 1e-8, linear decay after a 3% warm-up,
4 epochs, global batch 1,024 transitions, mixed precision, gradient checkpointing, full fine-tune.

How the batch maps onto packed rows. A row is one COCO image prefix (2,340 image tokens for 640x480, 2,928
for 640x640) followed by the sentence states of that image's trajectories: 5 rollouts + the ground truth,
~34 states of ~25 tokens, ~850 suffix tokens, so one row of 4,096 tokens usually holds a whole image.
`batch_size` counts rows: 32 rows ~ 1,090 transitions per step ~ the published 1,024, and 4 epochs of the
~21.5K training rows are ~2,700 steps (published: 732K x 4 / 1,024 = 2,860).

Mesh. `batch_size` must be a multiple of data x fsdp (rows are split over both) and is cut into `grad_accum`
micro-batches. The default is 32 chips, one row per chip per step, parameters + AdamW state (16 bytes per
parameter: ~120 GB) sharded 16 ways over fsdp (~7.5 GB per chip), activations rematerialised:
- v4-64 / v5p-64 (32 chips): data=2, fsdp=16, tensor=1, batch_size=32, grad_accum=1 (default);
- 128 chips, data=8, fsdp=16: batch_size must be 128 rows (~4.4K transitions); to keep the published batch
  use 32 chips of it, or accept the larger batch and scale lr (e.g. 1e-4) — note it in the run;
- 8 chips (v5p-16 / v4-16): data=1, fsdp=8, batch_size=32, grad_accum=4 (one row per chip per micro-batch);
- tensor > 1 shards heads/MLP for long rows or small chips (Mistral: 32 heads, 8 KV heads, MLP 14336).
Multi-host: every host runs the same command (`jax.distributed.initialize()` is automatic on TPU VMs);
each reads its share of every batch; checkpoints go to a path all hosts see (e.g. gs://).
"""

import ml_collections

from configs import tiny_value


def get_config() -> ml_collections.ConfigDict:
    c = tiny_value.get_config()
    c.seed = 0
    c.total_steps = 0               # 4 epochs of training rows
    c.num_epochs = 4
    c.batch_size = 32               # rows (~34 transitions each): ~1,090 transitions per step
    c.grad_accum = 1
    c.lr = 5e-5
    c.end_lr = 0.0
    c.warmup_ratio = 0.03
    c.warmup_steps = -1
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.compute_dtype = "bfloat16"     # mixed precision: bf16 forward/backward, fp32 master weights and AdamW state
    c.master_dtype = "float32"
    c.fp32_params = ("value_head",)  # the head stays float32
    c.trainable = "all"              # full fine-tune (head only: "head"; frozen tower: "freeze:backbone.vision")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 16, 1
    c.log_every = 10
    c.checkpoint_every = 250
    c.keep_checkpoints = 3
    c.eval_every = 250
    c.async_checkpointing = True

    c.save_dtype = "bfloat16"
    c.max_shard_bytes = 5 * 10**9

    c.value.value_layer = -2         # penultimate decoder layer (paper)
    c.value.state = "sentence"
    c.value.remat = "full"           # gradient checkpointing of every decoder / vision layer

    c.data.val_rollouts = ""
    c.data.val_fraction = 0.075      # ~60K of 792K transitions held out, by image (paper: 732K / 60K)
    c.data.seq_len = 4096            # one image prefix (<= 2,928 tokens) + its sentence states
    c.data.max_states = 64
    c.data.max_suffix_tokens = 96    # a sentence state: sentence + "[/INST]"
    c.data.tau = "manifest"          # τ = 0.16 from gen_rollouts --tau 0.16 (or e.g. "p17")

    c.td.gamma = 0.9
    c.td.ema_decay = 0.0             # the published recipe has no target network

    c.eval.batch_size = 32
    c.eval.max_rows = 512            # rows evaluated every eval_every steps; the final evaluation uses all
    return c
