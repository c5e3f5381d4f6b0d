"""ViMaR self-training of LLaVA-NeXT-Mistral-7B (SPEC §5): a full fine-tune of the policy on its own ViMaR
captions of the training images, lr 1e-6.

    vimar caption IMAGES... --method vimar --json > captions.jsonl
    python train/train_sft.py --config configs/sft_llava_next_mistral_7b.py --workdir DIR \
        --init /path/to/llava-v1.6-mistral-7b-hf --config.data.captions=captions.jsonl

The paper gives the learning rate and "full fine-tune"; the rest is ours: one epoch over the 23,240 captions
at a global batch of 128 (182 steps), 3% warm-up then linear decay, bf16 compute over fp32 master weights,
rematerialised layers, parameters and optimizer state sharded over all chips (fsdp). A COCO image expands
to at most 2,928 image tokens, so prompts + captions fit the 3,584-token bucket.
"""

import ml_collections

from vimar_jax import trainer
from vimar_jax.data.sft_data import DEFAULT_PROMPT


def get_config() -> ml_collections.ConfigDict:
    c = trainer.default_config()
    c.seed = 0
    c.total_steps = 182
    c.batch_size = 128
    c.grad_accum = 8
    c.lr = 1e-6
    c.end_lr = 0.0
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.compute_dtype = "bfloat16"
    c.master_dtype = "float32"
    c.trainable = "all"            # full fine-tune, vision tower included
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.log_every = 1
    c.checkpoint_every = 50
    c.keep_checkpoints = 1

    c.init = ""                    # the policy to fine-tune (--init DIR): HF dir or `vimar convert` output
    c.clip = ""
    c.save_dtype = "bfloat16"
    c.max_shard_bytes = 5 * 10**9

    c.model = ml_collections.ConfigDict(dict(remat="full"))   # the architecture comes from --init
    c.data = ml_collections.ConfigDict(dict(
        source="captions",
        captions="",               # JSON lines of `vimar caption --json`
        prompt=DEFAULT_PROMPT,     # used for lines without a `prompt`
        image_root="",             # relative image paths: this dir ("" = as written, then the file's dir)
        length_buckets=(2560, 3072, 3584),
        max_label_tokens=512,
        train_seed=0, num_scenes=0, variants=1, caption_styles="detail:1",   # source="scenes" only
    ))
    c.eval = ml_collections.ConfigDict(dict(enabled=False, seed=1002, num_scenes=0, batch_size=1,
                                            max_new_tokens=0, prompt=DEFAULT_PROMPT))
    return c
