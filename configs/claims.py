"""The recipe of `bench/claims.py`: the paper's claims measured in the tiny world (issue 6).

    python bench/claims.py [--quick | --preset smoke] [--models DIR] [--out DIR] [--parts methods,...]

Presets: `full` (the published figures: n = 500 held-out scenes), `quick` (every part in minutes on 2 cores:
a few scenes, small N·K, value/SFT trainings of a handful of steps: a check that everything runs, not a
measurement) and `smoke` (the CI test's, smaller still).

Seeds (scene streams, `vimar_jax.data.scenes.scene_at`; see configs/tiny_world.py for the plan):
- **1003: the claims' held-out scenes.** Every figure of every part is measured on scenes 0..n-1 of stream
  1003, which no training stage and no recipe choice used (1000 = `vimar eval`, 1001 = demo, 1002 = the
  provenance's held-out CHAIR). Nothing here was tuned on it.
- 100: validation scenes, only as uncounted warm-up captions before each timed evaluation (`warmup`).
- 2: policy a's training scenes: the ablations' value models are trained on rollouts of scenes 0..R-1 of it
  (as the shipped value model), and self-training captions scenes 0..S-1 of it.

Search settings (`search`) are `vimar_jax.decode.search.SearchConfig` fields shared by every method and part:
all methods see the same N temperatures, K samples per temperature and budgets.

τ ablation (`ablations.taus`): "0", "scaled:0.16" and "p17". SPEC's 0.16 is τ for CLIP-L/336 on COCO, where
the ground-truth reward 0.27 is P90 of δ; "scaled:0.16" keeps the ratio τ / P90(δ): τ = 0.16 · P90(δ) / 0.27
with P90 over the ablation rollouts' δ (a multiplicative rescale, unlike "p17", which keeps the percentile).
"""

import ml_collections

HELDOUT_SEED = 1003   # the claims' held-out scene stream (never trained on, never tuned on)
TRAIN_SEED = 2        # policy a's training scenes (rollouts, self-training captions)


def _full() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "full"
    c.seed = HELDOUT_SEED
    c.train_seed = TRAIN_SEED
    c.prompt = "Describe this image in detail."
    # Before each evaluation, every method captions these validation scenes uncounted, so that compiling
    # the shapes it meets is not timed (tiny_eval also warms up on one scene of the evaluated stream).
    c.warmup = ml_collections.ConfigDict(dict(seed=100, scenes=3))
    c.search = ml_collections.ConfigDict(dict(
        temperatures=(0.1, 0.3, 0.5, 0.7, 0.9),   # N = 5
        samples_per_temperature=6,                 # K = 6: N·K = 30 (the paper's best-of-30)
        top_p=0.9,
        max_new_tokens=128,                        # the tiny policies' caption budget (their training length)
        sentence_max_tokens=48,
        max_sentences=12,
        stage2="replace_append",
        seed=0,
    ))
    c.methods = ml_collections.ConfigDict(dict(
        n=500,
        names=("greedy", "bon-clip", "bon-value", "clip-search", "visvm", "vimar"),
    ))
    c.ablations = ml_collections.ConfigDict(dict(
        n=200,
        taus=("0", "scaled:0.16", "p17"),          # margin reward, one value model each
        variants=("zero_below", "clip_at_tau"),    # reward variants at τ = p17, one value model each
        states=("sentence", "prefix"),
        stage2=("off", "append_only", "replace_append"),
        # N·K in {6, 12, 30}: (temperatures, K)
        nk=(((0.3, 0.6, 0.9), 2), ((0.3, 0.6, 0.9), 4), ((0.1, 0.3, 0.5, 0.7, 0.9), 6)),
        # rollouts of policy a on its training scenes (configs/tiny_world.py's rollout recipe)
        rollouts=dict(num_scenes=800, temperatures="0,0.2,0.4,0.6,0.8", top_p=0.9, max_new_tokens=128,
                      shards=4, seed=0),
        gt_reward="p90",                           # as configs/tiny_world.py
        # train/train_value.py overrides of configs/tiny_value.py (configs/tiny_world.py's value section)
        value=dict(num_epochs=3, batch_size=8, eval=dict(batch_size=8)),
        # ... and on top of them for the prefix-state model: its states grow with the caption (about 4x the
        # tokens of sentence states on these rollouts), 1,024-token rows hold every trajectory whole
        prefix_value=dict(data=dict(seq_len=1024)),
    ))
    c.cross_model = ml_collections.ConfigDict(dict(
        n=500,
        names=("greedy", "visvm", "vimar"),        # policy_b's searches, guided by policy a's value model
    ))
    c.self_training = ml_collections.ConfigDict(dict(
        num_scenes=1000,                           # training scenes 0..S-1 of train_seed, captioned per method
        sources=("greedy", "visvm", "vimar"),
        n=500,                                     # held-out scenes of the fine-tuned policies' greedy CHAIR
        # train/train_sft.py overrides of configs/tiny_policy.py (fine-tune from policy a)
        sft=dict(total_steps=250, batch_size=8, lr=1e-4, end_lr=1e-5, warmup_steps=10, log_every=10,
                 checkpoint_every=1000, trainable="freeze:vision"),
    ))
    return c


def _quick() -> ml_collections.ConfigDict:
    """Every part in minutes on 2 cores: it runs everything, it measures nothing reliably."""
    c = _full()
    c.preset = "quick"
    c.warmup.scenes = 2
    c.search.update(dict(temperatures=(0.3, 0.6, 0.9), samples_per_temperature=2))   # N·K = 6
    c.methods.n = 24
    c.ablations.n = 12
    c.ablations.nk = (((0.3, 0.6, 0.9), 2), ((0.3, 0.6, 0.9), 4))
    c.ablations.rollouts = dict(num_scenes=24, temperatures="0,0.4,0.8", top_p=0.9, max_new_tokens=128,
                                shards=1, seed=0)
    c.ablations.value = dict(total_steps=6, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=1000,
                             eval_every=0, eval=dict(batch_size=4))
    c.cross_model.n = 24
    c.self_training.num_scenes = 24
    c.self_training.n = 24
    c.self_training.sft = dict(total_steps=6, batch_size=4, lr=1e-4, end_lr=1e-5, warmup_steps=1, log_every=1,
                               checkpoint_every=1000, trainable="freeze:vision")
    return c


def _smoke() -> ml_collections.ConfigDict:
    """The CI smoke (tests/test_claims.py): every part, two scenes, one or two training steps."""
    c = _quick()
    c.preset = "smoke"
    c.warmup.scenes = 0
    c.search.update(dict(temperatures=(0.5, 0.9), samples_per_temperature=1, max_new_tokens=64,
                         max_sentences=4))
    c.methods.n = 2
    c.ablations.n = 2
    c.ablations.taus = ("p17",)
    c.ablations.variants = ("zero_below",)
    c.ablations.states = ("sentence", "prefix")
    c.ablations.stage2 = ("off", "replace_append")
    c.ablations.nk = (((0.5, 0.9), 1),)
    c.ablations.rollouts = dict(num_scenes=3, temperatures="0,0.8", top_p=0.9, max_new_tokens=64, shards=1, seed=0)
    c.ablations.value = dict(total_steps=1, batch_size=2, warmup_steps=0, log_every=1, checkpoint_every=1000,
                             eval_every=0, data=dict(seq_len=512, max_states=16, val_fraction=0.34),
                             eval=dict(batch_size=2))
    c.ablations.prefix_value = dict(data=dict(seq_len=512))
    c.cross_model.n = 2
    c.cross_model.names = ("greedy", "vimar")
    c.self_training.num_scenes = 2
    c.self_training.sources = ("greedy", "vimar")
    c.self_training.n = 2
    c.self_training.sft = dict(total_steps=1, batch_size=2, lr=1e-4, end_lr=1e-5, warmup_steps=0, log_every=1,
                               checkpoint_every=1000, trainable="freeze:vision")
    return c


PRESETS = {"full": _full, "quick": _quick, "smoke": _smoke}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """preset: None/"full", "quick" or "smoke"."""
    key = preset or "full"
    if key not in PRESETS:
        raise ValueError(f"configs/claims.py: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]()
