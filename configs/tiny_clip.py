"""The tiny world's CLIP: reward model of the tiny world and frozen vision tower of its tiny LLaVA-NeXT.

`python train/train_clip.py --config configs/tiny_clip.py --out DIR [--config.KEY=VALUE ...]`.
Top-level keys are the trainer's (`vimar_jax.trainer.default_config()`); `model`, `data`, `loss` and `eval`
are this recipe's. Quick run: `--config.total_steps=30 --config.data.num_train_scenes=256`.
Shipped run (tiny world rebuild at 642e79b, 985 s of CPU time): on 256 validation scenes (seed 100), pairwise
accuracy true vs false sentence 0.89 colour, 0.73 shape, 0.91 absent object, 0.996 position; retrieval top-1
0.89 image->text, 0.85 text->image.
"""

import ml_collections

from vimar_jax import trainer


def get_config() -> ml_collections.ConfigDict:
    c = trainer.default_config()
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 128
    c.lr = 2e-3
    c.end_lr = 0.0
    c.warmup_steps = 60
    c.weight_decay = 0.05
    c.max_grad_norm = 1.0
    c.log_every = 25
    c.checkpoint_every = 400
    c.keep_checkpoints = 1

    c.out = ""          # HF CLIP directory to write (the script's --out)
    c.workdir = ""      # trainer run directory (checkpoints, metrics.jsonl); "" = a temporary one

    c.model = ml_collections.ConfigDict(dict(
        image_size=48, patch_size=16,    # one patch per grid cell of the scene
        vision_hidden=96, vision_layers=4, vision_heads=4, vision_mlp=384,
        text_hidden=64, text_layers=3, text_heads=4, text_mlp=256,
        projection_dim=64, hidden_act="quick_gelu", logit_scale_init=2.6592,
        vision_pos_init_std=1.0,    # position as salient as content after the vision pre-norm
    ))
    c.data = ml_collections.ConfigDict(dict(
        train_seed=1,               # scene stream of the training pool
        num_train_scenes=6000,
        text_len=32,                # true sentences are padded/truncated to this many tokens
        neg_text_len=16,            # false sentences (single objects, at most 15 tokens) to this many
        negative_kinds="color,shape,absent,position",
    ))
    c.loss = ml_collections.ConfigDict(dict(
        hard_negatives_in_softmax=True,   # image->text logits also hold the image's own false sentences
        margin=0.1,                       # hinge on cosines: delta(true) >= delta(false) + margin
        margin_weight=1.0,
        max_logit_scale=100.0,
        # Training-only linear probes (not saved; 0 = off), cross-entropy against the generator's ground
        # truth: patch tokens of HF hidden_states[patch_probe_layer] (the LLaVA feature layer) -> what lies
        # in their grid cell (patch-level features for the policy); the mean of those tokens, and the
        # pooled image, -> all 9 cells; pooled text -> the colour, shape and cell of the object a sentence
        # mentions.
        patch_probe_weight=0.5,
        patch_probe_layer=-2,
        scene_tokens_probe_weight=0.5,
        scene_probe_weight=0.5,
        text_probe_weight=0.5,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        seed=1001,                  # held-out scene stream (never a training seed)
        num_scenes=256,
        false_per_kind=2,
        batch_size=256,
    ))
    return c
