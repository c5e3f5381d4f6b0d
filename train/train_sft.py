"""Supervised fine-tuning of a LLaVA-NeXT captioning policy.

    python train/train_sft.py --config configs/NAME.py --workdir DIR [--clip DIR | --init DIR] [--config.KEY=VALUE ...]

Two uses:
- **tiny world, from scratch** (`configs/tiny_policy.py`, `configs/tiny_policy_qwen.py`): a new LLaVA-NeXT
  whose vision tower is the tiny CLIP's (`--clip DIR`, an HF CLIP directory), frozen; projector and decoder
  random; trained on true scene captions under detail prompts.
- **self-training** (`configs/sft_llava_next_mistral_7b.py`): `--init DIR` (an HF LLaVA-NeXT directory or a
  `vimar convert` output) fine-tuned on its own captions, `--config.data.captions=FILE` (the JSON lines of
  `vimar caption --json`).

The loss is next-token cross-entropy on the caption tokens and EOS only (mean over those tokens); token
accuracy is logged. Training runs in `vimar_jax.trainer.fit` (resumable from DIR). Output:
- `DIR/hf`: the policy as an HF LLaVA-NeXT directory (config.json, model.safetensors written from our
  parameters through `llava_next_rules`, no torch; tokenizer with chat template; preprocessor_config.json /
  processor_config.json), loadable by `LlavaNextForConditionalGeneration` / `LlavaNextProcessor`;
- `DIR/metrics.jsonl` (training curve), `DIR/summary.json` (wall times, data counts, held-out CHAIR of
  greedy captions for the tiny world, sample captions).
"""

from __future__ import annotations

import dataclasses
import json
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
from flax import nnx

from vimar_jax import sharding as shd
from vimar_jax import trainer
from vimar_jax.convert import io as ckpt_io
from vimar_jax.data import scenes as S
from vimar_jax.data import sft_data
from vimar_jax.data import tiny_tokenizer
from vimar_jax.models import clip as clip_lib
from vimar_jax.models import llava_next as ln
from vimar_jax.processor import Processor

RECIPE_KEYS = ("init", "clip", "save_dtype", "max_shard_bytes", "model", "data", "eval")
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "preprocessor_config.json", "processor_config.json", "generation_config.json")


# ------------------------------------------------------------------------------------------ from scratch

def parse_pinpoints(spec: str, image_size: int) -> list[list[int]]:
    """"1x2,2x1,2x2" (tiles high x tiles wide) -> [[S, 2S], [2S, S], [2S, 2S]] for vision image size S."""
    out = []
    for part in str(spec).split(","):
        try:
            h, w = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"model.pinpoints={spec!r}: expected comma-separated 'HxW' tile counts, e.g. "
                             "'1x2,2x1,2x2'") from None
        if h < 1 or w < 1:
            raise ValueError(f"model.pinpoints={spec!r}: tile counts must be >= 1")
        out.append([h * image_size, w * image_size])
    return out


def image_processor_dict(image_size: int, pinpoints) -> dict:
    """HF `LlavaNextImageProcessor` fields: CLIP resize/crop/normalisation at the tower's size, anyres."""
    s = int(image_size)
    return {"image_processor_type": "LlavaNextImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "do_pad": True, "do_convert_rgb": True,
            "image_grid_pinpoints": [list(p) for p in pinpoints]}


def write_assets(out: str, *, variant: str, image_size: int, patch_size: int, pinpoints) -> None:
    """Tokenizer (tiny `variant`, chat template also as chat_template.jinja), image processor and processor
    files of a tiny-world policy: everything of its HF directory except config.json and the weights."""
    tok = tiny_tokenizer.save_tokenizer(out, variant)
    sp = tiny_tokenizer.special_tokens(variant)
    template = tiny_tokenizer.CHAT_TEMPLATE_A if variant == "a" else tiny_tokenizer.CHAT_TEMPLATE_B
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    ip = image_processor_dict(image_size, pinpoints)
    _write_json(os.path.join(out, "preprocessor_config.json"), {**ip, "processor_class": "LlavaNextProcessor"})
    _write_json(os.path.join(out, "processor_config.json"), {
        "processor_class": "LlavaNextProcessor", "image_processor": ip, "image_token": sp["image"],
        "patch_size": int(patch_size), "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1})
    ids = {k: tok.token_to_id(sp[k]) for k in ("bos", "eos", "pad") if k in sp}
    _write_json(os.path.join(out, "generation_config.json"), {f"{k}_token_id": v for k, v in ids.items()})


def vision_layers_used(num_layers: int, feature_layer: int) -> int:
    """How many CLIP encoder layers LLaVA's `vision_feature_layer` (HF `hidden_states` indexing: 0 is the
    embeddings, -1 the last layer) actually runs."""
    n = clip_lib.hidden_state_index(feature_layer, num_layers)
    if n == 0:
        raise ValueError(f"vision_feature_layer={feature_layer} selects the embeddings of the CLIP tower, not a layer")
    return n


def scratch_hf_config(model_cfg, clip_config: dict, processor: Processor) -> dict:
    """The HF `LlavaNextConfig` dict of a new policy: the CLIP's vision config, the recipe's decoder, the
    tokenizer's vocabulary and special ids."""
    m, tok = model_cfg, processor.tokenizer
    if m.text_type not in ("mistral", "qwen2"):
        raise ValueError(f"model.text_type={m.text_type!r}: expected 'mistral' or 'qwen2'")
    vision = dict(clip_config.get("vision_config") or {})
    if not vision:
        raise ValueError("the CLIP config.json has no vision_config")
    vision["model_type"] = "clip_vision_model"
    S_ = int(vision["image_size"])
    feature_layer = int(m.vision_feature_layer)
    used = vision_layers_used(int(vision["num_hidden_layers"]), feature_layer)
    if used < int(vision["num_hidden_layers"]):
        # The layers after the feature layer never reach the policy: keep the tower up to it (HF
        # hidden_states[-1] of the shortened tower is hidden_states[feature_layer] of the whole one).
        vision["num_hidden_layers"], feature_layer = used, -1
    text = {"model_type": m.text_type, "vocab_size": tok.vocab_size, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
            "hidden_act": "silu", "max_position_embeddings": m.max_position_embeddings,
            "rms_norm_eps": m.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "sliding_window": None, "tie_word_embeddings": False, "attention_dropout": 0.0,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if m.text_type == "qwen2":
        text.update(use_sliding_window=False, max_window_layers=m.num_layers)
    grid = S_ // int(vision["patch_size"])
    return {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
            "vision_config": vision, "text_config": text,
            "image_grid_pinpoints": parse_pinpoints(m.pinpoints, S_),
            "vision_feature_layer": feature_layer, "vision_feature_select_strategy": "default",
            "image_token_index": processor.image_token_id, "projector_hidden_act": m.projector_hidden_act,
            "multimodal_projector_bias": True, "tie_word_embeddings": False, "image_seq_length": grid * grid,
            "dtype": "float32"}


def init_from_scratch(config, assets: str):
    """(factory, HF config) of a new policy: `factory(rngs)` builds it with a random projector and decoder and
    the vision tower of the CLIP at `config.clip` (jit-friendly: the trainer initialises it in one compiled
    call). Writes the tokenizer/processor files into `assets`."""
    if not config.clip:
        raise ValueError("training from scratch needs the CLIP directory (--clip DIR or --config.clip=DIR)")
    clip, clip_hf = ckpt_io.load_module(config.clip)
    if not hasattr(clip, "vision") or clip_hf.get("model_type") != "clip":
        raise ValueError(f"{config.clip}: config.json model_type {clip_hf.get('model_type')!r} is not an HF CLIP model")
    vc = clip_hf["vision_config"]
    S_ = int(vc["image_size"])
    write_assets(assets, variant=config.model.tokenizer, image_size=S_, patch_size=int(vc["patch_size"]),
                 pinpoints=parse_pinpoints(config.model.pinpoints, S_))
    hf = scratch_hf_config(config.model, clip_hf, Processor.from_dir(assets))
    cfg = ln.LlavaNextConfig.from_hf(hf, remat=config.model.remat)
    used = int(hf["vision_config"]["num_hidden_layers"])
    tower = nnx.to_pure_dict(nnx.state(clip.vision, nnx.Param))
    tower["layers"] = {k: v[:used] for k, v in tower["layers"].items()}   # stacked [L, ...]: the layers it runs

    def factory(rngs: nnx.Rngs) -> ln.LlavaNext:
        model = ln.LlavaNext(cfg, rngs=rngs)
        state = nnx.state(model.vision, nnx.Param)
        nnx.replace_by_pure_dict(state, tower)
        nnx.update(model.vision, state)
        return model
    return factory, hf


def init_from_checkpoint(config, mesh) -> tuple[ln.LlavaNext, dict]:
    """(policy, HF config) of the LLaVA-NeXT directory `config.init`, each parameter placed on its sharding."""
    module, hf = ckpt_io.load_module(config.init, mesh=mesh)
    if not isinstance(module, ln.LlavaNext):
        what = "a value model" if "vimar_value" in hf else f"model_type {hf.get('model_type')!r}"
        raise ValueError(f"{config.init}: config.json describes {what}, not a LLaVA-NeXT policy")
    remat = config.model.remat
    if remat != "none":  # same parameters, a graph with rematerialised layers
        c = module.config
        cfg = dataclasses.replace(c, text=dataclasses.replace(c.text, remat=remat),
                                  vision=dataclasses.replace(c.vision, remat=remat))
        graphdef = nnx.split(nnx.eval_shape(lambda: ln.LlavaNext(cfg, rngs=nnx.Rngs(0))))[0]
        module = nnx.merge(graphdef, nnx.state(module))
    return module, hf


# -------------------------------------------------------------------------------------------------- loss

def sft_loss(model: ln.LlavaNext, batch, rng=None):
    """(loss, aux): mean next-token cross-entropy over the label tokens (`label_mask`), the logit at
    `label_pos` predicting `label_ids`; aux has `token_acc` and the label count as `weight`."""
    del rng
    hidden, _ = model(batch["input_ids"], batch["pixel_values"], None, sft_data.model_gather_index(model, batch))
    h = jnp.take_along_axis(hidden, batch["label_pos"][..., None], axis=1)           # [B, L, E]
    logits = model.logits(h)                                                          # [B, L, V] f32
    logp = jax.nn.log_softmax(logits, axis=-1)
    ll = jnp.take_along_axis(logp, batch["label_ids"][..., None], axis=-1)[..., 0]
    mask = batch["label_mask"].astype(jnp.float32)
    n = jnp.sum(mask)
    denom = jnp.maximum(n, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == batch["label_ids"]).astype(jnp.float32)
    return -jnp.sum(ll * mask) / denom, {"token_acc": jnp.sum(correct * mask) / denom, "weight": n}


# ------------------------------------------------------------------------------------------------ saving

def _host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(model: ln.LlavaNext, hf_config: dict, assets: str, out: str, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 10**9) -> None:
    """Write `out` as an HF LLaVA-NeXT directory: config.json, model.safetensors (or shards + index) in the
    llava-hf key layout from our parameters (one tensor at a time), the files of `assets` (tokenizer,
    processor, chat template, generation config). Appears complete or not at all; process 0 writes."""
    cast = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype)
    if cast is None:
        raise ValueError(f"save_dtype={dtype!r}: expected float32, bfloat16 or float16")
    want = ckpt_io.DTYPES[cast]
    cfg = ln.LlavaNextConfig.from_hf(hf_config)
    params = {tuple(str(p) for p in path): v.get_value()
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rules = ln.llava_next_rules(cfg, ln.KeyLayout())

    def producer(r):
        def f():
            x = params[r.path] if r.index is None else params[r.path][r.index]
            return np.ascontiguousarray(r.to_hf(_host(x)).astype(want))
        return f

    tensors = sorted((ckpt_io.OutTensor(r.hf_key, cast, tuple(r.hf_shape), producer(r)) for r in rules),
                     key=lambda t: t.key)
    groups = ckpt_io.plan_shards([t.nbytes for t in tensors], int(max_shard_bytes))
    names = ckpt_io.shard_names(len(groups))
    config = {**hf_config, "dtype": dtype}
    if "torch_dtype" in config:  # transformers 4.x name of the field
        config["torch_dtype"] = dtype
    if jax.process_index() != 0:  # the others only take part in the gathers, in the same order
        for t in tensors:
            t.produce()
        return
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
            if os.path.isfile(src) and (name in ASSET_FILES or name.startswith("tokenizer")
                                        or name.startswith("chat_template") or name == "added_tokens.json"):
                shutil.copy2(src, tmp / name)


# ------------------------------------------------------------------------------------------- captioning

def greedy_captions(vlm, images: Sequence, prompt: str, *, batch_size: int, max_new_tokens: int
                    ) -> tuple[list[str], list[bool]]:
    """Greedy captions of `images` under one detail prompt with `vimar_jax.vlm.VLM.generate` (the shared
    sampler), and whether each ended with EOS; batches are padded to `batch_size` rows so that calls reuse
    the compilations."""
    from vimar_jax.decode.sampler import Finish

    proc = vlm.processor
    head = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                    add_generation_prompt=True)
    bos = proc.tokenizer.bos_token
    add_special = not (bos and head.startswith(bos))
    eos = proc.tokenizer.eos_token_id
    out: list[str] = []
    ended: list[bool] = []
    for s in range(0, len(images), batch_size):
        chunk = list(images[s:s + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        inputs = proc(chunk, [head] * len(chunk), add_special_tokens=add_special)
        res = vlm.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                           inputs["attention_mask"], max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos)
        toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
        out += [proc.decode(toks[b, :lens[b]]).strip() for b in range(n)]
        ended += [bool(r == Finish.EOS) for r in np.asarray(res.reason)[:n]]
    return out, ended


def evaluate_scenes(policy: ln.LlavaNext, hf_dir: str, eval_cfg) -> dict:
    """Greedy captions of held-out scenes (stream `eval_cfg.seed`) under `eval_cfg.prompt`; tiny-world CHAIR."""
    from vimar_jax.eval.chair import tiny_chair
    from vimar_jax.vlm import VLM

    t0 = time.perf_counter()
    scenes = S.scenes(int(eval_cfg.seed), int(eval_cfg.num_scenes))
    with open(os.path.join(hf_dir, ckpt_io.CONFIG_JSON), encoding="utf-8") as f:
        vlm = VLM(policy, json.load(f), hf_dir)
    caps, ended = greedy_captions(vlm, [S.render(s) for s in scenes], eval_cfg.prompt,
                           batch_size=int(eval_cfg.batch_size), max_new_tokens=int(eval_cfg.max_new_tokens))
    chair = tiny_chair(zip(caps, scenes))
    return {"seed": int(eval_cfg.seed), "prompt": eval_cfg.prompt, "chair": chair,
            "eos_fraction": sum(ended) / max(len(ended), 1),
            "seconds": time.perf_counter() - t0,
            "samples": [{"scene": i, "objects": [f"{o.size} {o.color} {o.shape} @ {o.position}" for o in sc.objects],
                         "caption": c} for i, (sc, c) in enumerate(zip(scenes[:8], caps[:8]))]}


# ------------------------------------------------------------------------------------------------- train

def trainer_config(config) -> ml_collections.ConfigDict:
    """The trainer's keys of the recipe."""
    known = trainer.default_config().keys()
    return trainer.make_config({k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
                                    else config[k]) for k in known if k in config})


def parse_styles(spec: str) -> tuple[tuple[str, float], ...]:
    """"detail:0.8,short:0.2" -> (("detail", 0.8), ("short", 0.2))."""
    out = []
    for part in str(spec).split(","):
        name, _, w = part.strip().partition(":")
        try:
            out.append((name.strip(), float(w) if w else 1.0))
        except ValueError:
            raise ValueError(f"data.caption_styles={spec!r}: expected 'style:weight,...'") from None
    return tuple(out)


def make_source(config):
    d = config.data
    if d.source == "scenes":
        if config.eval.enabled and int(config.eval.seed) == int(d.train_seed):
            raise ValueError(f"eval.seed ({config.eval.seed}) must differ from data.train_seed: the held-out "
                             "scenes would be training scenes")
        return sft_data.SceneCaptions(int(d.train_seed), int(d.num_scenes), variants=int(d.variants),
                                      styles=parse_styles(d.caption_styles))
    if d.source == "captions":
        if not d.captions:
            raise ValueError("data.source='captions' needs data.captions=FILE (JSON lines of vimar caption --json)")
        return sft_data.CaptionFile(d.captions, prompt=d.prompt, image_root=d.image_root or None)
    raise ValueError(f"data.source={d.source!r}: expected 'scenes' or 'captions'")


def train_sft(config, workdir: str) -> tuple[trainer.TrainState, dict]:
    """Train, save `workdir/hf`, evaluate (tiny world). Returns the final train state and the summary (also
    written to `workdir/summary.json`)."""
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tcfg = trainer_config(config)
    mesh = shd.mesh_from_config(tcfg.mesh)
    if bool(config.init) == bool(config.clip):
        raise ValueError("give exactly one of init (a LLaVA-NeXT directory to fine-tune) and clip (an HF CLIP "
                         "directory to build a new policy around)")
    t0 = time.perf_counter()
    if config.init:
        model, hf = init_from_checkpoint(config, mesh)
        assets = config.init
    else:
        assets = os.path.join(workdir, "assets")
        os.makedirs(assets, exist_ok=True)
        model, hf = init_from_scratch(config, assets)   # a factory: initialised inside the trainer's jit
    processor = Processor.from_dir(assets)
    d = config.data
    buckets = tuple(int(b) for b in d.length_buckets)
    encoder = sft_data.Encoder(processor, max_length=max(buckets), max_label_tokens=int(d.max_label_tokens))
    source = make_source(config)
    n_proc = jax.process_count()
    if tcfg.batch_size % n_proc:
        raise ValueError(f"batch_size {tcfg.batch_size} is not divisible by the {n_proc} processes")
    data = sft_data.dataset(source, encoder, batch_size=tcfg.batch_size // n_proc, seed=int(config.seed),
                            length_buckets=buckets, shard_index=jax.process_index(), shard_count=n_proc)
    t_init = time.perf_counter() - t0

    history: list[dict] = []
    log_every = max(int(tcfg.log_every), 1)

    def hook(step, m):
        if step % log_every == 0 or step == 1:
            history.append({"step": step, **{k: float(m[k]) for k in ("loss", "token_acc", "grad_norm", "lr")}})

    run_config = config.to_dict()
    t0 = time.perf_counter()
    state = trainer.fit(tcfg, workdir=workdir, model=model, loss_fn=sft_loss, train_data=iter(data), mesh=mesh,
                        run_config=run_config, hooks=[hook])
    t_train = time.perf_counter() - t0
    del model
    policy = state.model()

    summary: dict[str, Any] = {
        "train": {"steps": int(tcfg.total_steps), "batch_size": int(tcfg.batch_size), "records": len(source),
                  "source": d.source, "trainable": tcfg.trainable, "curve": history},
        "wall_time_s": {"init": t_init, "train": t_train},
        "config": run_config,
    }
    if isinstance(source, sft_data.CaptionFile):
        summary["train"]["skipped"] = [{"name": n, "reason": r} for n, r in source.skipped]
    t0 = time.perf_counter()
    save_hf(policy, hf, assets, os.path.join(workdir, "hf"), dtype=config.save_dtype,
            max_shard_bytes=int(config.max_shard_bytes))
    summary["wall_time_s"]["save"] = time.perf_counter() - t0
    if config.eval.enabled and d.source == "scenes":
        summary["heldout"] = evaluate_scenes(policy, os.path.join(workdir, "hf"), config.eval)
        summary["wall_time_s"]["eval"] = summary["heldout"]["seconds"]
    summary["wall_time_s"]["total"] = time.perf_counter() - t_start
    summary["cpu_time_s"] = time.process_time()   # all threads of this process: comparable on a busy machine
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return state, summary


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fl = flags.FlagValues()
    # `sys_argv`: config_flags finds the --config.KEY overrides there (default: the process's sys.argv).
    config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/tiny_policy.py", flag_values=fl,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (resumable); the policy goes to WORKDIR/hf", flag_values=fl)
    flags.DEFINE_string("clip", None, "HF CLIP directory (from scratch): the frozen vision tower", flag_values=fl)
    flags.DEFINE_string("init", None, "LLaVA-NeXT directory to fine-tune", flag_values=fl)
    fl(argv)
    if fl.config is None:
        raise SystemExit("--config is required (e.g. --config configs/tiny_policy.py)")
    if not fl.workdir:
        raise SystemExit("--workdir is required")
    config = fl.config
    with config.unlocked():
        if fl.clip:
            config.clip = fl.clip
        if fl.init:
            config.init = fl.init
    shd.initialize_distributed()
    try:
        _, summary = train_sft(config, fl.workdir)
    except (trainer.WorkdirConfigError, trainer.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    brief = {"wall_time_s": summary["wall_time_s"], "cpu_time_s": summary["cpu_time_s"],
             "final": summary["train"]["curve"][-1:]}
    if "heldout" in summary:
        c = summary["heldout"]["chair"]
        brief["heldout"] = {k: c[k] for k in ("n_captions", "chair_i", "chair_s", "attr_chair_i", "recall",
                                              "words_per_caption")}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
