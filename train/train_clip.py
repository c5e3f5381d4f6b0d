"""Train the tiny world's CLIP and save it as a Hugging Face CLIP directory.

    python train/train_clip.py --config configs/tiny_clip.py --out DIR [--config.KEY=VALUE ...]

Objective: symmetric InfoNCE over (image, one true sentence) pairs of a batch, where the image->text logits
also hold each image's own hard negatives (wrong colour, wrong shape, absent object, wrong position), plus
a hinge on cosines, max(0, margin - (delta(true) - delta(false))), so that the reward delta ranks a true
sentence above a false one about the same image. Training-only linear probes (`Probes`, never saved) add
cross-entropy against the generator's ground truth: each patch token of the LLaVA feature layer predicts
its grid cell's object, the pooled image predicts all 9 cells, the pooled text predicts the object its
sentence mentions. Contrastive learning alone does not get past chance on shapes and positions within a
CPU budget of minutes; the probes give both towers that structure early. Deterministic from the seeds.

DIR gets config.json (HF `CLIPModel`), model.safetensors (written from our parameters through
`clip_rules` + `spec.disassemble`, no torch), tokenizer files, preprocessor_config.json and metrics.json
(held-out retrieval, pairwise accuracy per negative kind, delta distributions, the training curve).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
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

from vimar_jax import trainer
from vimar_jax.convert import io as ckpt_io
from vimar_jax.convert import spec
from vimar_jax.data import clip_data
from vimar_jax.models import clip as clip_lib

PERCENTILES = (10, 17, 50, 90)
PROBES = ("patch", "scene_tokens", "scene", "text")


# ------------------------------------------------------------------------------------------------ model

def hf_config(model_cfg) -> dict:
    """The HF `CLIPConfig` dict (config.json) of the recipe's `model` section and the tiny tokenizer."""
    m = model_cfg
    ids = clip_data.special_token_ids()
    common = dict(hidden_act=m.hidden_act, layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
                  initializer_factor=1.0, projection_dim=m.projection_dim)
    text = dict(model_type="clip_text_model", vocab_size=len(clip_data.clip_vocab()), hidden_size=m.text_hidden,
                intermediate_size=m.text_mlp, num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
                max_position_embeddings=clip_data.MAX_LENGTH, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                pad_token_id=ids["pad"], **common)
    vision = dict(model_type="clip_vision_model", hidden_size=m.vision_hidden, intermediate_size=m.vision_mlp,
                  num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads, num_channels=3,
                  image_size=m.image_size, patch_size=m.patch_size, **common)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": m.projection_dim,
            "logit_scale_init_value": m.logit_scale_init, "initializer_factor": 1.0, "dtype": "float32",
            "text_config": text, "vision_config": vision}


def flat_params(model: nnx.Module) -> dict[spec.Path, np.ndarray]:
    """Our parameters as host arrays keyed by path."""
    return {tuple(str(p) for p in path): np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_hf(model: clip_lib.CLIPModel, config: dict, out: str, *, metrics: dict | None = None,
            overwrite: bool = True) -> None:
    """Write an HF CLIP directory: config.json, model.safetensors, tokenizer, preprocessor_config.json
    (and metrics.json). The directory appears complete or not at all."""
    cfg = clip_lib.CLIPConfig.from_hf(config)
    tensors = spec.disassemble(clip_lib.clip_rules(cfg), flat_params(model))
    out_tensors = [ckpt_io.OutTensor(k, ckpt_io.dtype_name(v.dtype), tuple(v.shape), (lambda v=v: v))
                   for k, v in sorted(tensors.items())]
    with ckpt_io.atomic_dir(out, overwrite=overwrite) as tmp:
        ckpt_io.write_safetensors(tmp / ckpt_io.SINGLE_FILE, out_tensors, {"format": "pt"})
        _write_json(tmp / ckpt_io.CONFIG_JSON, config)
        _write_json(tmp / "preprocessor_config.json",
                    clip_data.image_processor_config(config["vision_config"]["image_size"]))
        clip_data.save_clip_tokenizer(str(tmp))
        if metrics is not None:
            _write_json(tmp / "metrics.json", metrics)


# ------------------------------------------------------------------------------------------------- loss

class LinearHeads(nnx.Module):
    """One linear map whose outputs are split into classification heads of the given sizes."""

    def __init__(self, hidden: int, sizes: Sequence[int], *, rngs: nnx.Rngs):
        self.sizes = tuple(int(n) for n in sizes)
        n = sum(self.sizes)
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (hidden, n)), axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((n,)), axes=(None,))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        logits = x.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
        return jnp.split(logits, np.cumsum(self.sizes)[:-1].tolist(), axis=-1)


def _classes(attributes) -> tuple[int, ...]:
    return tuple(len(values) + 1 for _, values in attributes)


class Probes(nnx.Module):
    """Training-only linear probes (never saved) that give both towers the tiny world's structure early:
    `patch`: each patch token of the vision feature layer -> (colour, shape, size) of its grid cell's object;
    `scene_tokens`: the mean of those patch tokens -> the (colour, shape, size) of all 9 cells (so that the
    tokens carry where-and-what codes, which a near-uniform attention of the CLS token collects as is);
    `scene`: the pooled image output -> all 9 cells;
    `text`: the pooled text output -> (colour, shape, cell) of the object the sentence mentions."""

    def __init__(self, config: clip_lib.CLIPConfig, *, rngs: nnx.Rngs):
        cells = _classes(clip_data.CELL_ATTRIBUTES)
        e = config.vision.hidden_size
        self.patch = LinearHeads(e, cells, rngs=rngs)
        self.scene_tokens = LinearHeads(e, (9 * sum(cells),), rngs=rngs)  # split per cell by the loss
        self.scene = LinearHeads(e, (9 * sum(cells),), rngs=rngs)
        self.text = LinearHeads(config.text.hidden_size, _classes(clip_data.SENTENCE_ATTRIBUTES), rngs=rngs)


def clip_init(model: clip_lib.CLIPModel, key: jax.Array, *, vision_pos_std: float = 0.02) -> None:
    """Re-initialise `model` in place with CLIP's own scheme (OpenAI's, as HF `CLIPModel._init_weights`):
    for width E and L layers, q/k/v and fc2 ~ N(0, (E^-0.5 (2L)^-0.5)^2), out_proj ~ N(0, 1/E), fc1 ~
    N(0, 1/(2E)), class embedding and projections ~ N(0, 1/width), other embeddings N(0, 0.02^2); norms 1/0,
    biases 0. For narrow towers these are several times larger than a flat 0.02, which lets image content
    reach the CLS token from the first steps. `vision_pos_std`: std of the vision position embeddings
    (about 1 makes a patch's position as salient as its content after the pre-norm)."""
    keys = iter(jax.random.split(key, 64))

    def normal(param, std):
        param.set_value((std * jax.random.normal(next(keys), param.get_value().shape)).astype(param.get_value().dtype))

    for tower in (model.vision, model.text):
        c, layers = tower.config, tower.layers
        e, n = c.hidden_size, c.num_layers
        in_std = e ** -0.5 * (2 * n) ** -0.5
        for name, std in (("q_proj", in_std), ("k_proj", in_std), ("v_proj", in_std), ("out_proj", e ** -0.5),
                          ("fc1", (2 * e) ** -0.5), ("fc2", in_std)):
            normal(getattr(layers, name), std)
        normal(tower.position_embedding, vision_pos_std if tower is model.vision else 0.02)
    normal(model.vision.class_embedding, model.config.vision.hidden_size ** -0.5)
    normal(model.vision.patch_embedding, 0.02)
    normal(model.text.token_embedding, 0.02)
    normal(model.visual_projection, model.config.vision.hidden_size ** -0.5)
    normal(model.text_projection, model.config.text.hidden_size ** -0.5)


class CLIPTrainModel(nnx.Module):
    """What the trainer optimises: the CLIP model (`clip_init`) and its probes."""

    def __init__(self, config: clip_lib.CLIPConfig, *, vision_pos_std: float = 0.02, rngs: nnx.Rngs):
        self.clip = clip_lib.CLIPModel(config, rngs=rngs)
        clip_init(self.clip, rngs.params(), vision_pos_std=vision_pos_std)
        self.probes = Probes(config, rngs=rngs)


def _l2(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _probe_loss(heads: Sequence[jax.Array], targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of heads [..., n_j] against targets [..., j] (target < 0: ignored)."""
    losses, hits, count = 0.0, 0.0, 0.0
    for j, h in enumerate(heads):
        t = targets[..., j]
        w = (t >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(h, jnp.maximum(t, 0))
        losses += jnp.sum(w * ce)
        hits += jnp.sum(w * (jnp.argmax(h, -1) == t))
        count += jnp.sum(w)
    count = jnp.maximum(count, 1.0)
    return losses / count, hits / count


def image_embeds_and_tokens(model: clip_lib.CLIPModel, pixel_values: jax.Array, layer: int):
    """(L2-normalised image embeddings [N, Pr], pooled output [N, E], patch tokens [N, P, E] of HF
    `hidden_states[layer]`), with one pass through the vision tower."""
    vision = model.vision
    e = vision.config.hidden_size
    states = vision.hidden_states(pixel_values, (layer, -1))
    tokens, last = states[..., :e], states[..., e:]
    pooled = vision.post_layernorm(last[:, 0])
    return _l2(pooled @ model.visual_projection[...].astype(last.dtype)), pooled, tokens[:, 1:]


def text_embeds_and_pooled(model: clip_lib.CLIPModel, input_ids: jax.Array, attention_mask: jax.Array):
    """(L2-normalised text embeddings [N, Pr], pooled output [N, E])."""
    _, pooled = model.text(input_ids, attention_mask)
    return _l2(pooled @ model.text_projection[...].astype(pooled.dtype)), pooled


def make_loss_fn(loss_cfg, grid: int):
    """`loss_fn(model, batch, rng) -> (loss, aux)` for the trainer (see the module docstring); `grid` is
    the vision tower's patch grid side (for the patch probe's cell labels)."""
    margin, margin_weight = float(loss_cfg.margin), float(loss_cfg.margin_weight)
    max_log_scale = math.log(float(loss_cfg.max_logit_scale))
    hard_in_softmax = bool(loss_cfg.hard_negatives_in_softmax)
    weights = {name: float(loss_cfg[f"{name}_probe_weight"]) for name in PROBES}
    probe_layer = int(loss_cfg.patch_probe_layer)
    cells = jnp.asarray(clip_data.patch_cells(grid))

    def loss_fn(train_model: CLIPTrainModel, batch, rng):
        del rng
        model, probes = train_model.clip, train_model.probes
        b, k, t = batch["neg_input_ids"].shape
        img, img_pooled, tokens = image_embeds_and_tokens(model, batch["pixel_values"], probe_layer)
        pos_txt, pos_pooled = text_embeds_and_pooled(model, batch["input_ids"], batch["attention_mask"])
        neg_txt, neg_pooled = text_embeds_and_pooled(model, batch["neg_input_ids"].reshape(b * k, t),
                                                     batch["neg_attention_mask"].reshape(b * k, t))
        neg_txt = neg_txt.reshape(b, k, -1)
        sim = img @ pos_txt.T                                   # [B, B] cosines
        sim_neg = jnp.einsum("bp,bkp->bk", img, neg_txt)         # [B, K]
        scale = jnp.exp(jnp.minimum(model.logit_scale[...].astype(jnp.float32), max_log_scale))
        labels = jnp.arange(b)
        i2t = jnp.concatenate([sim, sim_neg], axis=1) if hard_in_softmax else sim
        loss_i2t = optax.softmax_cross_entropy_with_integer_labels(scale * i2t, labels).mean()
        loss_t2i = optax.softmax_cross_entropy_with_integer_labels(scale * sim.T, labels).mean()
        pos = jnp.diagonal(sim)
        gap = pos[:, None] - sim_neg
        hinge = jax.nn.relu(margin - gap).mean()
        loss = 0.5 * (loss_i2t + loss_t2i) + margin_weight * hinge
        aux = {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "hinge": hinge, "logit_scale": scale,
               "acc_i2t": jnp.mean(jnp.argmax(sim, axis=1) == labels), "pair_acc": jnp.mean(gap > 0),
               "delta_true": pos.mean(), "delta_false": sim_neg.mean()}
        per_cell = lambda logits: jnp.split(logits.reshape(b, 9, -1),  # noqa: E731
                                            np.cumsum(probes.patch.sizes)[:-1].tolist(), axis=-1)
        text_targets = jnp.concatenate([batch["labels"], batch["neg_labels"].reshape(b * k, -1)])
        for name, (heads, targets) in {
                "patch": (probes.patch(tokens), batch["cell_labels"][:, cells]),
                "scene_tokens": (per_cell(probes.scene_tokens(tokens.mean(1))[0]), batch["cell_labels"]),
                "scene": (per_cell(probes.scene(img_pooled)[0]), batch["cell_labels"]),
                "text": ([jnp.concatenate(h) for h in zip(probes.text(pos_pooled), probes.text(neg_pooled))],
                         text_targets)}.items():
            if weights[name]:
                ce, acc = _probe_loss(heads, targets)
                loss = loss + weights[name] * ce
                aux[f"{name}_probe"], aux[f"{name}_probe_acc"] = ce, acc
        return loss, aux

    return loss_fn


# ------------------------------------------------------------------------------------------------- eval

def run_batched(fn, state, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """`fn(state, *chunks)` over fixed-size chunks of `arrays` (the last one zero-padded, so a jitted `fn`
    compiles once), concatenated without the padding rows."""
    n, bs, out = len(arrays[0]), batch_size, []
    for s in range(0, n, bs):
        chunk = [a[s:s + bs] for a in arrays]
        m = len(chunk[0])
        chunk = [np.concatenate([c, np.zeros((bs - m,) + c.shape[1:], c.dtype)]) for c in chunk]
        out.append(np.asarray(fn(state, *chunk))[:m])
    return np.concatenate(out)


class Embedder:
    """Jitted, fixed-batch image and text embedding of one CLIPModel (no recompiles across calls)."""

    def __init__(self, model: clip_lib.CLIPModel, batch_size: int, text_len: int = clip_data.MAX_LENGTH):
        graphdef, state = nnx.split(model)
        self.state, self.batch_size, self.text_len = state, batch_size, text_len
        self._img = jax.jit(lambda s, x: nnx.merge(graphdef, s).image_embeds(x))
        self._txt = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).text_embeds(i, m))
        self.tok = clip_data.build_clip_tokenizer()

    def _batched(self, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return run_batched(fn, self.state, arrays, self.batch_size)

    def images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._batched(self._img, [np.asarray(pixel_values, np.float32)])

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = clip_data.tokenize(self.tok, texts, self.text_len)
        return self._batched(self._txt, [ids, mask])


def patch_probe_accuracy(train_model: CLIPTrainModel, pool: clip_data.ScenePool, *, layer: int,
                         batch_size: int) -> dict:
    """How well the trained linear patch probe reads each grid cell's object from the vision feature layer
    on held-out scenes: accuracy per attribute over patches of occupied cells, and over all patches."""
    graphdef, state = nnx.split(train_model)

    @jax.jit
    def predict(state, px):
        m = nnx.merge(graphdef, state)
        _, _, tokens = image_embeds_and_tokens(m.clip, px, layer)
        return jnp.stack([jnp.argmax(h, -1) for h in m.probes.patch(tokens)], -1)

    pred = run_batched(predict, state, [pool.pixels], batch_size)             # [N, P, 3]
    grid = train_model.clip.config.vision.grid
    target = pool.labels[:, clip_data.patch_cells(grid)]                      # [N, P, 3]
    occupied = target[..., 0] > 0
    out = {"all_patches": float(np.mean(pred == target))}
    for j, (name, _) in enumerate(clip_data.CELL_ATTRIBUTES):
        out[f"{name}_occupied"] = float(np.mean(pred[..., j][occupied] == target[..., j][occupied]))
    return out


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
            **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES},
            "min": float(x.min()), "max": float(x.max())}


def _best_split(true: np.ndarray, false: np.ndarray) -> tuple[float, float]:
    """Threshold tau maximising balanced accuracy of `delta >= tau` (true) vs `< tau` (false)."""
    cands = np.unique(np.concatenate([true, false]))
    t_sorted, f_sorted = np.sort(true), np.sort(false)
    tpr = 1.0 - np.searchsorted(t_sorted, cands, side="left") / len(true)
    tnr = np.searchsorted(f_sorted, cands, side="left") / len(false)
    bal = 0.5 * (tpr + tnr)
    i = int(np.argmax(bal))
    return float(cands[i]), float(bal[i])


def evaluate(model: clip_lib.CLIPModel, pool: clip_data.ScenePool, items: Sequence[clip_data.EvalItem],
             *, batch_size: int, kinds: Sequence[str]) -> dict:
    """Held-out metrics: retrieval with one sentence naming every object of each scene (R@1 among all
    scenes, both directions), per-image pairwise accuracy delta(true object sentence) > delta(false sentence)
    per negative kind (and the fraction of images whose every true object sentence beats every false one),
    delta distributions of true and false sentences, and the threshold that best separates them."""
    emb = Embedder(model, batch_size)
    img = emb.images(pool.pixels)
    n = len(items)
    # One flat list of sentences; remember the slices of each item.
    texts, where = [], []
    for it in items:
        entry = {}
        for name, group in (("true", it.true), ("objects", it.objects), ("listing", (it.listing,)),
                            *((f"false_{k}", it.false[k]) for k in kinds)):
            entry[name] = slice(len(texts), len(texts) + len(group))
            texts.extend(group)
        where.append(entry)
    txt = emb.texts(texts)
    delta = lambda i, name: txt[where[i][name]] @ img[i]  # noqa: E731

    listing = np.stack([txt[w["listing"]][0] for w in where])
    sim = img @ listing.T
    out: dict[str, Any] = {"num_scenes": n, "retrieval": {
        "num_candidates": n,
        "i2t_top1": float(np.mean(np.argmax(sim, 1) == np.arange(n))),
        "t2i_top1": float(np.mean(np.argmax(sim, 0) == np.arange(n)))}}

    pair, separated = {}, {}
    false_by_kind: dict[str, list] = {k: [] for k in kinds}
    for i in range(n):
        d_obj = delta(i, "objects")
        for k in kinds:
            d_f = delta(i, f"false_{k}")
            false_by_kind[k].append(d_f)
            pair.setdefault(k, []).append(np.mean(d_obj[:, None] > d_f[None, :]))
            separated.setdefault(k, []).append(d_obj.min() > d_f.max())
    out["pairwise_acc"] = {k: float(np.mean(v)) for k, v in pair.items()}
    out["pairwise_acc"]["all"] = float(np.mean([np.mean(v) for v in pair.values()]))
    out["separated_frac"] = {k: float(np.mean(v)) for k, v in separated.items()}

    d_true = np.concatenate([delta(i, "true") for i in range(n)])
    d_obj = np.concatenate([delta(i, "objects") for i in range(n)])
    d_false = np.concatenate([np.concatenate(v) for v in false_by_kind.values()])
    out["delta"] = {"true": _stats(d_true), "true_objects": _stats(d_obj), "false": _stats(d_false),
                    **{f"false_{k}": _stats(np.concatenate(v)) for k, v in false_by_kind.items()}}
    tau, bal = _best_split(d_true, d_false)
    out["best_split"] = {"tau": tau, "balanced_acc": bal}
    return out


# ------------------------------------------------------------------------------------------------ train

def model_config(config) -> clip_lib.CLIPConfig:
    return clip_lib.CLIPConfig.from_hf(hf_config(config.model))


def _kinds(config) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in str(config.data.negative_kinds).split(",") if k.strip())
    bad = [k for k in kinds if k not in clip_data.NEGATIVE_KINDS]
    if bad or not kinds:
        raise ValueError(f"data.negative_kinds={config.data.negative_kinds!r}: unknown kind(s) {bad}; "
                         f"choose from {clip_data.NEGATIVE_KINDS}")
    return kinds


def _check(config) -> None:
    if config.eval.seed == config.data.train_seed:
        raise ValueError(f"eval.seed ({config.eval.seed}) must differ from data.train_seed: the held-out "
                         "scenes would be training scenes")
    for key in ("text_len", "neg_text_len"):
        if not 3 <= config.data[key] <= clip_data.MAX_LENGTH:
            raise ValueError(f"data.{key} must be in [3, {clip_data.MAX_LENGTH}], got {config.data[key]}")
    if config.model.image_size % config.model.patch_size:
        raise ValueError(f"model.image_size {config.model.image_size} is not a multiple of model.patch_size "
                         f"{config.model.patch_size}")


def trainer_config(config) -> ml_collections.ConfigDict:
    """The trainer's keys of the recipe (everything but out/workdir/model/data/loss/eval)."""
    known = trainer.default_config().keys()
    return trainer.make_config({k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
                                    else config[k]) for k in known if k in config})


def train_clip(config) -> dict:
    """Train, evaluate on held-out scenes, and (if `config.out`) write the HF directory. Returns metrics."""
    t_start, c_start = time.perf_counter(), time.process_time()
    _check(config)
    kinds = _kinds(config)
    hf = hf_config(config.model)
    cfg = clip_lib.CLIPConfig.from_hf(hf)
    icfg = clip_data.image_config(config.model.image_size, config.model.patch_size)
    tok = clip_data.build_clip_tokenizer()

    t0 = time.perf_counter()
    pool = clip_data.ScenePool.build(config.data.train_seed, config.data.num_train_scenes, icfg)
    data = clip_data.ContrastiveBatches(pool, tok, seed=config.seed, batch_size=config.batch_size,
                                        text_len=config.data.text_len, neg_text_len=config.data.neg_text_len,
                                        kinds=kinds)
    t_data = time.perf_counter() - t0

    history: list[tuple[int, dict]] = []
    log_every = max(int(config.log_every), 1)
    hook = lambda step, m: history.append((step, m)) if step % log_every == 0 or step == 1 else None  # noqa: E731
    run_config = {k: v for k, v in config.to_dict().items() if k not in ("out", "workdir")}
    tmp = None if config.workdir else tempfile.TemporaryDirectory(prefix="train_clip_")
    workdir = config.workdir or tmp.name
    t0 = time.perf_counter()
    try:
        state = trainer.fit(trainer_config(config), workdir=workdir,
                            model=lambda rngs: CLIPTrainModel(
                                cfg, vision_pos_std=config.model.vision_pos_init_std, rngs=rngs),
                            loss_fn=make_loss_fn(config.loss, cfg.vision.grid), train_data=data,
                            run_config=run_config,
                            hooks=[hook])
    finally:
        if tmp is not None:
            tmp.cleanup()
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_model = state.model()
    model = train_model.clip
    held = clip_data.ScenePool.build(config.eval.seed, config.eval.num_scenes, icfg)
    items = clip_data.eval_items(held, seed=config.eval.seed, per_kind=config.eval.false_per_kind, kinds=kinds)
    heldout = evaluate(model, held, items, batch_size=config.eval.batch_size, kinds=kinds)
    heldout["patch_probe"] = patch_probe_accuracy(train_model, held, layer=config.loss.patch_probe_layer,
                                                  batch_size=config.eval.batch_size)
    t_eval = time.perf_counter() - t0

    keys = ("loss", "loss_i2t", "loss_t2i", "hinge", "acc_i2t", "pair_acc", "logit_scale", "delta_true",
            "delta_false", *(f"{n}_probe{a}" for n in PROBES for a in ("", "_acc")))
    metrics = {
        "heldout": {"seed": int(config.eval.seed), **heldout},
        "train": {"steps": int(config.total_steps), "batch_size": int(config.batch_size),
                  "train_scenes": len(pool), "train_seed": int(config.data.train_seed),
                  "curve": [{"step": s, **{k: float(m[k]) for k in keys if k in m}} for s, m in history]},
        "wall_time_s": {"data": t_data, "train": t_train, "eval": t_eval},
        "config": run_config,
    }
    if config.out:
        t0 = time.perf_counter()
        save_hf(model, hf, config.out, metrics=None)
        metrics["wall_time_s"]["save"] = time.perf_counter() - t0
    metrics["wall_time_s"]["total"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a shared machine, wall time overstates the cost.
    metrics["cpu_time_s"] = time.process_time() - c_start
    if config.out:
        _write_json(os.path.join(config.out, "metrics.json"), metrics)
    return metrics


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _unknown_overrides(argv: Sequence[str]) -> list[str]:
    """The `--config.KEY=VALUE` keys of argv that the recipe file given by `--config` does not have."""
    import runpy

    path = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                 if a in ("--config", "-config") or a.startswith(("--config=", "-config="))), None)
    if path is None:
        return []
    config = runpy.run_path(path.split(":", 1)[0])["get_config"]()
    bad = []
    for a in argv:
        if a.lstrip("-").startswith("config."):
            key = a.lstrip("-").split("=", 1)[0][len("config."):]
            node = config
            for part in key.split("."):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    bad.append(key)
                    break
                node = node[part]
    return bad


def parse_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The recipe from `argv` (`--config FILE --out DIR [--workdir DIR] [--config.KEY=VALUE ...]`, argv[0]
    being the program name); an unknown KEY is a ValueError naming it."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    fl = flags.FlagValues()
    # sys_argv: config_flags reads the --config.KEY overrides from it (default: the process's sys.argv).
    config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/tiny_clip.py", flag_values=fl,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("out", None, "HF CLIP directory to write", flag_values=fl)
    flags.DEFINE_string("workdir", None, "trainer run directory (resumable); default: a temporary one",
                        flag_values=fl)
    try:
        fl(argv)
    except (AttributeError, KeyError) as e:  # config_flags' message for an unknown key is a bare KeyError
        raise ValueError(f"unknown config key(s) {_unknown_overrides(argv)} ({e!r})") from None
    if fl.config is None:
        raise ValueError("--config is required (e.g. --config configs/tiny_clip.py)")
    config = fl.config
    with config.unlocked():
        if fl.out:
            config.out = fl.out
        if fl.workdir:
            config.workdir = fl.workdir
    if not config.out:
        raise ValueError("--out DIR is required")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    metrics = train_clip(parse_config(sys.argv if argv is None else argv))
    h = metrics["heldout"]
    print(json.dumps({"retrieval": h["retrieval"], "pairwise_acc": h["pairwise_acc"],
                      "delta_true": h["delta"]["true"], "delta_false": h["delta"]["false"],
                      "best_split": h["best_split"], "wall_time_s": metrics["wall_time_s"],
                      "cpu_time_s": metrics["cpu_time_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
