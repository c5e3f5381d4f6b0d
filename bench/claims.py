"""The paper's claims, measured in the tiny world (issue 6): hallucination, speed, ablations, cross-model,
self-training. Recipe: configs/claims.py (presets full / quick / smoke; held-out scenes of seed 1003).

    python bench/claims.py [--quick | --preset full|quick|smoke] [--models DIR] [--out DIR]
                           [--parts methods,ablations,cross_model,self_training,report]

Parts (each writes OUT/<part>.json and is skipped when that file exists, so a long run resumes; the work
inside a part (rollouts, value models, fine-tuned policies, each method's evaluation) lives in OUT/work and
is reused when made with the same settings and inputs):

1. `methods`: greedy, best-of-N by CLIP, best-of-N by value, CLIP-PRM step search, VisVM step search and
   ViMaR, all at the recipe's N temperatures x K samples, on held-out scenes: CHAIR_I, CHAIR_S, attribute
   CHAIR, recall, sentences / caption, seconds / caption, tokens decoded / caption (`vimar_jax.eval.tiny_eval`).
2. `ablations` (ViMaR): τ and the reward variants (each a value model trained by train/train_value.py at the
   recipe's settings on the SAME rollouts of policy a, re-rewarded from the stored δ), the value state
   (sentence / prefix), Stage 2 (off / append_only / replace_append) and N·K.
3. `cross_model`: policy_b (Qwen2-style, its own tokenizer) alone and guided by policy a's value model.
4. `self_training`: policy a fine-tuned (train/train_sft.py) on its own captions of training scenes made by
   greedy, VisVM and ViMaR; each fine-tuned policy's greedy CHAIR on held-out scenes.
5. `report`: OUT/claims.json (everything), OUT/claims.md (tables, acceptance checks met/missed with the
   numbers), OUT/chair_vs_seconds.png and OUT/chair_vs_tau.png.

`--models DIR` holds clip/, policy/, value/, policy_b/ (default: the shipped vimar_jax/assets/tiny_world).
A part's JSON records the recipe and models it was made with; resuming with another recipe is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository (vimar_jax, train, configs) importable
    sys.path.insert(0, ROOT)

from train.tiny_world import write_json  # noqa: E402  (atomic JSON write)

PARTS = ("methods", "ablations", "cross_model", "self_training", "report")
MODEL_DIRS = ("clip", "policy", "value", "policy_b")
DEFAULT_OUT = os.path.join(ROOT, "bench", "claims_out")
METRICS = ("chair_i", "chair_s", "attr_chair_i", "recall", "sentences", "seconds_per_caption",
           "tokens_per_caption", "words_per_caption", "sentences_scored_per_caption", "n_captions",
           "n_mentions", "n_hallucinated", "attr_chair_s", "attr_recall", "pos_chair_i")
COLUMNS = (  # (key, header, percent)
    ("chair_i", "CHAIR_I %", True), ("chair_s", "CHAIR_S %", True), ("attr_chair_i", "attr CHAIR_I %", True),
    ("recall", "recall %", True), ("sentences", "sent/cap", False), ("seconds_per_caption", "s/cap", False),
    ("tokens_per_caption", "tok/cap", False),
)
METHOD_LABELS = {"greedy": "greedy", "bon-clip": "best-of-N (CLIP)", "bon-value": "best-of-N (value)",
                 "clip-search": "CLIP-PRM search", "visvm": "VisVM search", "vimar": "ViMaR"}
# Part of the cache key of every eval that uses the value model: bumped when the engine's value scoring changes
# what such an eval measures, so that an earlier engine's cached result (its timings) is not reused.
# 2: a scoring call runs the rows its packed states fill, not one row per candidate (session 9).
VALUE_ENGINE = 2
EPS = 1e-9                                   # goals at their bound count as met (float rounding)
TAU_REFERENCE = {"tau": 0.16, "p90": 0.27}   # CLIP-L/336 on COCO (SPEC §2): τ and the P90 of δ


# ------------------------------------------------------------------------------------------------ context

def search_config(s, **overrides):
    """The `SearchConfig` of a recipe's `search` section, with `overrides`."""
    from vimar_jax.decode.search import SearchConfig

    kw = dict(temperatures=tuple(float(t) for t in s.temperatures),
              samples_per_temperature=int(s.samples_per_temperature), top_p=float(s.top_p),
              max_new_tokens=int(s.max_new_tokens), sentence_max_tokens=int(s.sentence_max_tokens),
              max_sentences=int(s.max_sentences), stage2=str(s.stage2), seed=int(s.seed))
    kw.update(overrides)
    return SearchConfig(**kw)


def load_config(preset: str | None, overrides: Sequence[str] = ()):
    """The recipe's preset with `KEY=VALUE` overrides (dotted keys of existing entries; a value is read as a
    Python literal, else kept as a string). An unknown key is an error that names it."""
    import ast

    from configs import claims as recipe

    config = recipe.get_config(preset)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents + [leaf]):
            if not hasattr(node, "keys") or name not in node.keys():
                raise ValueError(f"--set {item}: configs/claims.py has no key {'.'.join((parents + [leaf])[:i + 1])!r}")
            if i < len(parents):
                node = node[name]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            node[leaf] = value
        except TypeError:
            raise ValueError(f"--set {item}: {key} must be {type(node[leaf]).__name__} (configs/claims.py), got "
                             f"{value!r}") from None
    return config


def _plain(x):
    """A ConfigDict / tuple tree as JSON-comparable plain data (tuples become lists)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    return json.loads(json.dumps(x, default=float))


def _weights_stamp(path: str) -> list:
    """(name, size, mtime) of a model directory's weight files: a retrained model is another model."""
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    return [[f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))] for f in names]


def models_digest(path: str) -> str | None:
    """SHA-1 over the files of the model directories (`MODEL_DIRS`) under `path`: relative names and contents,
    so that byte-identical models in two places are the same models. None if `path` is not a directory."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha1()
    for name in MODEL_DIRS:
        root = os.path.join(path, name)
        for d, dirs, files in sorted(os.walk(root, followlinks=True)):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(d, f)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                with open(full, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                h.update(b"\0")
    return h.hexdigest()


class Context:
    """The run: recipe, models, output directory, and the models loaded so far (shared across parts)."""

    def __init__(self, cfg, models: str, out: str, *, quiet: bool = True):
        self.cfg, self.quiet = cfg, quiet
        self.models = os.path.abspath(models)
        self.out = os.path.abspath(out)
        self.work = os.path.join(self.out, "work")
        os.makedirs(self.work, exist_ok=True)
        self._vlms: dict[str, Any] = {}
        self._values: dict[str, Any] = {}
        self._clip = None

    def model_dir(self, name: str) -> str:
        return os.path.join(self.models, name)

    def search_config(self, **overrides):
        return search_config(self.cfg.search, **overrides)

    def vlm(self, path: str):
        from vimar_jax.vlm import load_vlm

        if path not in self._vlms:
            self._vlms[path] = load_vlm(path)
        return self._vlms[path]

    def value(self, path: str):
        from vimar_jax.vlm import load_value

        if path not in self._values:
            self._values[path] = load_value(path)
        return self._values[path]

    def clip(self):
        from vimar_jax.clip import load_clip

        if self._clip is None:
            self._clip = load_clip(self.model_dir("clip"))
        return self._clip

    def engine(self, methods: Sequence[str], *, policy: str | None = None, value: str | None = None,
               state: str | None = None, config=None):
        """The search engine of `methods` over policy (default policy a), value model (default the shipped
        one; `state` overrides its value state) and CLIP, loading each model once per run."""
        from vimar_jax import pipeline
        from vimar_jax.decode.scorers import ValueScorer
        from vimar_jax.eval.tiny_eval import needs

        config = config or self.search_config()
        need_value, need_clip = needs(methods, config.bon_scorer)
        scorer = False
        if need_value:   # θ: the value model's stored default (build_engine reads it)
            scorer = ValueScorer(self.value(value or self.model_dir("value")), state=state)
        return pipeline.build_engine(policy=self.vlm(policy or self.model_dir("policy")), value=scorer,
                                     clip=self.clip() if need_clip else False, config=config,
                                     require_theta="vimar" in methods)

    def evaluate(self, methods: Sequence[str], *, n: int, seed: int | None = None, policy: str | None = None,
                 value: str | None = None, state: str | None = None, search: dict | None = None) -> dict:
        """{method: {"metrics", "captions" (caption of scene i), "theta" (value-guided methods)}} on scenes
        0..n-1 of `seed` (default the held-out one), through `engine(...)` with the recipe's search settings
        updated by `search`. Each method's result is kept in OUT/work/evals, keyed by everything it depends
        on (models and their weight files, settings, scenes, prompt), so an interrupted part resumes there."""
        from vimar_jax.eval import tiny_eval

        seed = int(self.cfg.seed if seed is None else seed)
        config = self.search_config(**(search or {}))
        paths = {"policy": os.path.abspath(policy or self.model_dir("policy")),
                 "value": os.path.abspath(value or self.model_dir("value")), "clip": self.model_dir("clip")}
        out, engine = {}, None
        for m in methods:
            need_value, need_clip = tiny_eval.needs([m], config.bon_scorer)
            used = {"policy": True, "value": need_value, "clip": need_clip}
            key = {"method": m, "n": int(n), "seed": seed, "prompt": self.cfg.prompt,
                   "warmup": _plain(self.cfg.warmup), "search": _plain(dataclasses.asdict(config)),
                   "state": state if need_value else None,
                   "models": {r: [p, _weights_stamp(p)] for r, p in paths.items() if used[r]}}
            if need_value:
                key["value_engine"] = VALUE_ENGINE
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            cache = os.path.join(self.work, "evals", f"{m}-{digest}.json")
            if os.path.isfile(cache):
                with open(cache, encoding="utf-8") as f:
                    out[m] = json.load(f)["result"]
                continue
            if engine is None:
                engine = self.engine(methods, policy=paths["policy"], value=paths["value"], state=state,
                                     config=config)
            w = self.cfg.warmup
            if int(w.scenes) > 0:   # compile the shapes the method meets on a few validation scenes, uncounted
                from vimar_jax.data import scenes as S

                tiny_eval.caption_scenes(engine, S.scenes(int(w.seed), int(w.scenes)), m, prompt=self.cfg.prompt)
            res = tiny_eval.evaluate(engine, [m], n=int(n), seed=seed, prompt=self.cfg.prompt,
                                     show_progress=not self.quiet, keep=True)
            out[m] = {"metrics": {k: res[m][k] for k in (*METRICS, "wall_seconds") if k in res[m]},
                      "captions": [c.result.caption for c in res["_captions"][m]],
                      "theta": float(engine.theta) if need_value and engine.theta is not None else None}
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            write_json(cache, {"key": key, "result": out[m]})
        return out

    # -- part files --------------------------------------------------------------------------------
    def part_path(self, part: str) -> str:
        return os.path.join(self.out, f"{part}.json")

    @functools.cached_property
    def digest(self) -> str | None:
        return models_digest(self.models)

    def stamp(self) -> dict:
        return {"preset": self.cfg.preset, "recipe": _plain(self.cfg), "models": self.models,
                "models_digest": self.digest}

    def same_models(self, data: dict) -> bool:
        """Whether a part was made with these models: the same directory, or byte-identical files (the part's
        recorded digest, or, for a part that has none, its directory as it is now)."""
        theirs = data.get("models")
        if theirs == self.models:
            return True
        digest = data.get("models_digest") or (models_digest(theirs) if isinstance(theirs, str) else None)
        return digest is not None and digest == self.digest

    def load_part(self, part: str) -> dict | None:
        path = self.part_path(part)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        mine, theirs = _plain(self.cfg), data.get("recipe") or {}
        keys = (*SHARED_RECIPE_KEYS, part)
        if any(theirs.get(k) != mine.get(k) for k in keys) or not self.same_models(data):
            raise ValueError(f"{path} was made with another recipe (its {', '.join(keys)} entries) or other "
                             f"models (preset "
                             f"{data.get('preset')!r}, models {data.get('models')!r}); use another --out, or "
                             f"delete it to redo the part")
        return data


# The recipe entries every part depends on; each part also depends on its own section (and on no other part's).
SHARED_RECIPE_KEYS = ("seed", "train_seed", "prompt", "warmup", "search")


def _log(msg: str) -> None:
    print(f"[claims] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- 1. methods

def run_methods(ctx: Context) -> dict:
    c = ctx.cfg.methods
    names = list(c.names)
    res = ctx.evaluate(names, n=int(c.n))
    return {"n": int(c.n), "seed": int(ctx.cfg.seed), "search": _search_info(ctx.search_config()),
            "results": res}


def _search_info(sc) -> dict:
    return {"temperatures": list(sc.temperatures), "samples_per_temperature": sc.samples_per_temperature,
            "num_candidates": sc.num_candidates, "stage2": sc.stage2, "top_p": sc.top_p,
            "max_new_tokens": sc.max_new_tokens, "sentence_max_tokens": sc.sentence_max_tokens,
            "max_sentences": sc.max_sentences, "seed": sc.seed}


# ------------------------------------------------------------------------------------------- 2. ablations

def resolve_tau_spec(spec: str, deltas) -> float:
    """τ of an ablation row from the rollouts' δ: a number, a percentile "pQ", or "scaled:X" = X · P90(δ) / 0.27
    (SPEC's τ for CLIP-L/336 on COCO rescaled by the ratio of this CLIP's P90 of δ to that CLIP's)."""
    import numpy as np
    from vimar_jax import reward as reward_lib

    s = str(spec).strip()
    if s.startswith("scaled:"):
        p90 = float(np.percentile(np.asarray(deltas, np.float64), 90))
        return float(s.split(":", 1)[1]) * p90 / TAU_REFERENCE["p90"]
    return reward_lib.resolve_tau(s, deltas)


def rollout_deltas(directory: str):
    """δ of every rollout sentence (ground truth excluded), from the shard index files gen_rollouts writes."""
    import glob

    import numpy as np

    files = sorted(glob.glob(os.path.join(directory, "transitions-*.json")))
    if not files:
        raise FileNotFoundError(f"{directory} holds no transitions-*.json shard index (not a gen_rollouts output)")
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            out += json.load(f)["deltas"]
    return np.asarray(out, np.float64)


def make_rollouts(ctx: Context) -> dict:
    """Rollouts of policy a on its training scenes (train/gen_rollouts.py, as train/tiny_world.py runs it);
    reused when OUT/work/rollouts is complete. Returns the manifest."""
    import ml_collections
    from train import gen_rollouts, tiny_world

    path = os.path.join(ctx.work, "rollouts", "manifest.json")
    if not os.path.isfile(path):
        r = ctx.cfg.ablations.rollouts
        cfg = ml_collections.ConfigDict(dict(seeds=dict(policy_train=int(ctx.cfg.train_seed)),
                                             rollouts=dict(r.to_dict() if hasattr(r, "to_dict") else r, tau="p17")))
        argv = tiny_world.rollouts_argv(cfg, ctx.models, ctx.work)
        _log(f"rollouts: gen_rollouts {' '.join(argv)}")
        rc = gen_rollouts.main(argv)
        if rc:
            raise RuntimeError(f"train/gen_rollouts.py {' '.join(argv)} exited with {rc}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _reused(done: str, key: dict) -> dict | None:
    """The record of a finished training in `done` when it was made with `key` (its config and inputs);
    None when there is none; an error naming the directory when it was made otherwise."""
    if not os.path.isfile(done):
        return None
    with open(done, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("key") != _plain(key):
        raise ValueError(f"{os.path.dirname(done)} was trained with another config or inputs than this recipe "
                         f"asks for; remove it (or use another --out) to retrain")
    return info


def train_value_model(ctx: Context, name: str, tau: float, variant: str, state: str = "sentence") -> dict:
    """A value model from policy a on the ablation rollouts with reward (τ, variant) and value `state`, at the
    recipe's train_value settings (configs/tiny_value.py + ablations.value, + ablations.prefix_value for
    prefix states); reused when already trained."""
    import ml_collections
    from train import tiny_world, train_value

    wd = os.path.join(ctx.work, f"value_{name}")
    done = os.path.join(wd, "claims_done.json")
    a = ctx.cfg.ablations
    cfg = ml_collections.ConfigDict(dict(value=_plain(a.value), gt_reward=str(a.gt_reward)))
    c = tiny_world.value_config(cfg, ctx.models, ctx.work)
    c.data.tau = repr(float(tau))
    c.data.variant = variant
    if state != "sentence":
        c.value.state = state
        tiny_world.apply_overrides(c, a.prefix_value, "ablations.prefix_value")
    key = {"config": c.to_dict(), "init": _weights_stamp(c.init)}
    if (info := _reused(done, key)) is not None:
        return info
    _log(f"value model {name}: τ={tau:.4f} variant={variant} state={state}")
    t0 = time.perf_counter()
    trained, summary = train_value.train_value(c, wd)
    del trained
    info = {"name": name, "dir": os.path.join(wd, "hf"), "tau": float(tau), "variant": variant, "state": state,
            "packing": summary.get("data", {}).get("packing"),
            "reward": summary.get("data", {}).get("reward"), "final_eval": summary.get("final_eval"),
            "value_stats": summary.get("value_stats"), "steps": int(summary.get("train", {}).get("steps", 0) or 0),
            "wall_time_s": time.perf_counter() - t0, "key": _plain(key)}
    write_json(done, info)
    return info


def ablation_rows(ctx: Context, taus: dict[str, float], models: dict[str, dict]) -> list[dict]:
    """The ablation rows (one ViMaR evaluation each): what varies and with which value model. The value-state
    rows compare models trained alike (τ = P17, margin) on sentence and on prefix states, each searching with
    its own state; the other rows value sentence states."""
    a = ctx.cfg.ablations
    base = ctx.search_config()
    shipped = ctx.model_dir("value")
    rows = []
    for spec in a.taus:
        rows.append(dict(group="tau", label=f"τ={spec} ({taus[spec]:.3f})", tau=taus[spec], tau_spec=spec,
                         variant="margin", value=models[f"tau_{spec}"]["dir"], state="sentence",
                         temperatures=list(base.temperatures), k=base.samples_per_temperature, stage2=base.stage2))
    for variant in a.variants:
        rows.append(dict(group="reward", label=f"{variant} (τ=p17)", tau=taus["p17"], tau_spec="p17",
                         variant=variant, value=models[f"variant_{variant}"]["dir"], state="sentence",
                         temperatures=list(base.temperatures), k=base.samples_per_temperature, stage2=base.stage2))
    for state in a.states:
        rows.append(dict(group="state", label=f"{state} states (τ=p17)", tau=taus["p17"], tau_spec="p17",
                         variant="margin", value=models[f"state_{state}"]["dir"], state=state,
                         temperatures=list(base.temperatures), k=base.samples_per_temperature, stage2=base.stage2))
    for mode in a.stage2:
        rows.append(dict(group="stage2", label=mode, value=shipped, state="sentence",
                         temperatures=list(base.temperatures), k=base.samples_per_temperature, stage2=mode))
    for temps, k in a.nk:
        temps = [float(t) for t in temps]
        rows.append(dict(group="nk", label=f"N·K={len(temps) * int(k)} ({len(temps)}x{int(k)})", value=shipped,
                         state="sentence", temperatures=temps, k=int(k), stage2=base.stage2))
    return rows


def run_ablations(ctx: Context) -> dict:
    a = ctx.cfg.ablations
    manifest = make_rollouts(ctx)
    stats = manifest["delta_stats"]
    deltas = rollout_deltas(os.path.join(ctx.work, "rollouts"))
    taus = {spec: resolve_tau_spec(spec, deltas) for spec in (*a.taus, "p17")}
    models: dict[str, dict] = {}
    for spec in a.taus:
        models[f"tau_{spec}"] = train_value_model(ctx, f"tau_{spec.replace(':', '_')}", taus[spec], "margin")
    for variant in a.variants:
        models[f"variant_{variant}"] = train_value_model(ctx, f"variant_{variant}", taus["p17"], variant)
    for state in a.states:   # the sentence-state model is τ = p17's (same name and settings: trained once)
        models[f"state_{state}"] = train_value_model(ctx, "tau_p17" if state == "sentence" else f"state_{state}",
                                                     taus["p17"], "margin", state)
    rows = ablation_rows(ctx, taus, models)
    done: dict[tuple, dict] = {}
    for row in rows:
        key = (row["value"], row["state"], tuple(row["temperatures"]), row["k"], row["stage2"])
        if key not in done:
            search = dict(temperatures=tuple(row["temperatures"]), samples_per_temperature=row["k"],
                          stage2=row["stage2"])
            _log(f"ablation {row['group']}: {row['label']}")
            done[key] = ctx.evaluate(["vimar"], n=int(a.n), value=row["value"], state=row["state"],
                                     search=search)["vimar"]
        row.update(done[key])
        row["nk"] = len(row["temperatures"]) * row["k"]
    return {"n": int(a.n), "seed": int(ctx.cfg.seed), "rollouts": {"counts": manifest["counts"],
                                                                    "delta_stats": stats,
                                                                    "source": manifest.get("source")},
            "taus": taus, "tau_scaling": "scaled:X = X * P90(δ of the rollouts) / 0.27 (0.27 = P90 of δ for "
                                          "CLIP-L/336 on COCO, where τ = 0.16)",
            "value_models": models, "rows": rows,
            "notes": ["The value-state rows: two value models trained alike (τ = P17 of δ, margin reward, the same "
                      "rollouts, the same number of epochs) on sentence states (image + sentence) and on prefix "
                      "states (image + prompt + caption so far + sentence), each searching with its own state."]}


# ----------------------------------------------------------------------------------------- 3. cross-model

def run_cross_model(ctx: Context) -> dict:
    c = ctx.cfg.cross_model
    names = list(c.names)
    return {"n": int(c.n), "seed": int(ctx.cfg.seed), "policy": ctx.model_dir("policy_b"),
            "value": ctx.model_dir("value"), "search": _search_info(ctx.search_config()),
            "results": ctx.evaluate(names, n=int(c.n), policy=ctx.model_dir("policy_b"))}


# --------------------------------------------------------------------------------------- 4. self-training

def caption_training_scenes(ctx: Context, method: str, directory: str) -> dict:
    """Policy a's captions of training scenes 0..S-1 (train_seed) by `method`, as a `vimar caption --json`
    file (images written as PNG next to it). Returns the file and the captions' CHAIR."""
    from vimar_jax.data import scenes as S

    path = os.path.join(directory, f"captions_{method}.jsonl")
    st = ctx.cfg.self_training
    n = int(st.num_scenes)
    img_dir = os.path.join(directory, "images")
    os.makedirs(img_dir, exist_ok=True)
    scenes = S.scenes(int(ctx.cfg.train_seed), n)
    for i, scene in enumerate(scenes):
        p = os.path.join(img_dir, f"scene{i:05d}.png")
        if not os.path.isfile(p):
            S.render(scene).save(p)
    _log(f"self-training: captioning {n} training scenes with {method}")
    res = ctx.evaluate([method], n=n, seed=int(ctx.cfg.train_seed))[method]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i, cap in enumerate(res["captions"]):
            f.write(json.dumps({"image": f"images/scene{i:05d}.png", "method": method, "caption": cap,
                                "prompt": ctx.cfg.prompt}) + "\n")
    os.replace(path + ".tmp", path)
    return {"file": path, "training_chair": res["metrics"]}


def fine_tune(ctx: Context, method: str, captions: str, directory: str) -> dict:
    """train/train_sft.py: policy a fine-tuned on `captions` (configs/tiny_policy.py + self_training.sft)."""
    from configs import tiny_policy
    from train import tiny_world, train_sft

    wd = os.path.join(directory, f"sft_{method}")
    done = os.path.join(wd, "claims_done.json")
    c = tiny_policy.get_config()
    tiny_world.apply_overrides(c, _plain(ctx.cfg.self_training.sft), "self_training.sft")
    c.init = ctx.model_dir("policy")
    c.data.source = "captions"
    c.data.captions = captions
    c.eval.enabled = False
    with open(captions, "rb") as f:
        key = {"config": c.to_dict(), "init": _weights_stamp(c.init), "captions": hashlib.sha1(f.read()).hexdigest()}
    if (info := _reused(done, key)) is not None:
        return info
    _log(f"self-training: fine-tuning on {method} captions")
    state, summary = train_sft.train_sft(c, wd)
    del state
    info = {"dir": os.path.join(wd, "hf"), "records": summary["train"]["records"],
            "steps": summary["train"]["steps"], "final": summary["train"]["curve"][-1:],
            "wall_time_s": summary["wall_time_s"], "key": _plain(key)}
    write_json(done, info)
    return info


def run_self_training(ctx: Context) -> dict:
    st = ctx.cfg.self_training
    directory = os.path.join(ctx.work, "self_training")
    os.makedirs(directory, exist_ok=True)
    sources, results = {}, {}
    base = ctx.evaluate(["greedy"], n=int(st.n))["greedy"]
    results["base"] = base
    for method in st.sources:
        caps = caption_training_scenes(ctx, method, directory)
        ft = fine_tune(ctx, method, caps["file"], directory)
        sources[method] = {**caps, "sft": ft}
        results[method] = ctx.evaluate(["greedy"], n=int(st.n), policy=ft["dir"])["greedy"]
    return {"n": int(st.n), "seed": int(ctx.cfg.seed), "train_seed": int(ctx.cfg.train_seed),
            "num_train_scenes": int(st.num_scenes), "sources": sources, "results": results}


# ----------------------------------------------------------------------------------------------- 5. report

def _metric(parts: dict, part: str, *keys):
    """parts[part]["results"][k1]...["metrics"] or None when a part / key is missing."""
    node = parts.get(part)
    if node is None:
        return None
    node = node.get("results", {})
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node.get("metrics") if isinstance(node, dict) else None


BOOTSTRAP_SAMPLES = 2000


def caption_chair_counts(captions: Sequence[str], seed: int):
    """[n, 2] int array of (hallucinated mentions, mentions) of caption i of scene i of `seed`."""
    import numpy as np

    from vimar_jax.data import scenes as S
    from vimar_jax.eval.chair import score_caption

    rows = []
    for i, caption in enumerate(captions):
        sc = score_caption(caption, S.scene_at(int(seed), i))
        rows.append((len(sc.hallucinated), len(sc.mentions)))
    return np.asarray(rows, np.int64).reshape(-1, 2)


def chair_counts(part: dict | None, method: str):
    """[n, 2] int array of (hallucinated mentions, mentions) of each held-out scene's caption of `method` in a
    part's results (captions are of scenes 0..n-1 of the part's seed), or None when the part did not keep them."""
    res = (part or {}).get("results", {}).get(method)
    if not isinstance(res, dict) or not res.get("captions") or "seed" not in part:
        return None
    return caption_chair_counts(res["captions"], part["seed"])


def _greedy_ablation_counts(parts: dict):
    """Greedy's CHAIR counts on the ablations' scenes (the first n of the methods part's captions, same
    seed), or None when the parts do not allow it."""
    abl, methods = parts.get("ablations"), parts.get("methods")
    c = chair_counts(methods, "greedy")
    if not abl or c is None or methods.get("seed") != abl.get("seed") or len(c) < int(abl["n"]):
        return None
    return c[:int(abl["n"])]


def greedy_on_ablation_scenes(parts: dict) -> float | None:
    """Greedy CHAIR_I on the ablations' scenes, the reference the ablation rows are read against; None when
    the parts do not allow it."""
    c = _greedy_ablation_counts(parts)
    return None if c is None else float(c[:, 0].sum() / max(c[:, 1].sum(), 1))


def ablation_vs_greedy(parts: dict) -> list[dict | None]:
    """Per ablation row: its CHAIR_I minus greedy's on the same scenes ("diff") with a paired bootstrap 95%
    interval over the scenes ("ci95"); None for a row without captions or without the greedy reference."""
    def rate(x):
        return x[:, 0].sum() / max(x[:, 1].sum(), 1)

    g = _greedy_ablation_counts(parts)
    abl = parts.get("ablations") or {}
    out = []
    for r in abl.get("rows", ()):
        c = caption_chair_counts(r["captions"], abl["seed"]) if r.get("captions") and g is not None else None
        if c is None or len(c) != len(g):
            out.append(None)
            continue
        ci = paired_bootstrap(lambda a, b: b - a, g, c)
        out.append({"diff": float(rate(c) - rate(g)), "ci95": list(ci)})
    return out


def paired_bootstrap(stat, *counts, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of `stat(rate_1, rate_2, ...)` (CHAIR_I of each caption set as the ratio of
    summed counts) over `samples` resamples of the scenes, the same scenes for every set (paired: each set
    captions the same scenes). None when a set is missing or the sets differ in length."""
    import numpy as np

    if any(c is None for c in counts) or len({len(c) for c in counts}) != 1 or len(counts[0]) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(counts[0]), (samples, len(counts[0])))
    rates = []
    for c in counts:
        sums = c[idx].sum(axis=1)                              # [samples, 2]
        rates.append(sums[:, 0] / np.maximum(sums[:, 1], 1))
    vals = stat(*rates)
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _noise(ci, met, bound: float = 0.0, met_when: str = "below") -> dict:
    """{"ci95", "significant"}: whether the interval lies wholly on the verdict's side of `bound`, for a goal
    met when the quantity is below `bound` ("below") or at least `bound` ("above")."""
    if ci is None or met is None:
        return {"ci95": None, "significant": None}
    lo, hi = ci
    if met_when == "below":
        sig = hi < bound if met else lo > bound
    else:
        sig = lo >= bound if met else hi < bound
    return {"ci95": [lo, hi], "significant": bool(sig)}


def _ci_text(ci: dict, what: str, scale: float = 100.0, unit: str = " points") -> str:
    if ci["ci95"] is None:
        return ""
    lo, hi = (scale * x for x in ci["ci95"])
    verdict = "outside noise" if ci["significant"] else "within noise"
    return f"; 95% bootstrap interval over scenes of {what}: [{lo:+.1f}, {hi:+.1f}]{unit} ({verdict})"


def acceptance(parts: dict) -> list[dict]:
    """Issue 6's acceptance goals evaluated on the part results: each {id, goal, met (True / False / None =
    not measured), numbers, detail, ci95, significant}. `met` is the goal read literally on the measured
    rates; where the parts kept their captions, `ci95` is a paired bootstrap interval over the held-out scenes
    of the compared quantity and `significant` says whether it lies wholly on the verdict's side of the goal's
    bound (False: the verdict is within noise)."""
    out = []

    def goal(gid, text, met, numbers, detail, ci=None):
        ci = ci or {"ci95": None, "significant": None}
        out.append({"id": gid, "goal": text, "met": met, "numbers": numbers, "detail": detail, **ci})

    def counts(part, method):
        return chair_counts(parts.get(part), method)

    import numpy as np

    g, v, vs = (_metric(parts, "methods", m) for m in ("greedy", "vimar", "visvm"))
    if g and v:
        rel = 1 - v["chair_i"] / g["chair_i"] if g["chair_i"] > 0 else 0.0
        met = rel >= 0.30 - EPS
        cg, cv = counts("methods", "greedy"), counts("methods", "vimar")
        ci = _noise(paired_bootstrap(lambda a, b: 1 - b / np.maximum(a, 1e-12), cg, cv), met, 0.30, "above")
        goal("vimar_chair_i", "ViMaR CHAIR_I at least 30% lower than greedy's", met,
             {"greedy": g["chair_i"], "vimar": v["chair_i"], "reduction": rel},
             f"greedy {100 * g['chair_i']:.1f}%, ViMaR {100 * v['chair_i']:.1f}% (relative change {-100 * rel:+.0f}%; "
             f"the goal is -30% or lower)" + _ci_text(ci, "the relative reduction", unit="%"), ci)
        drop = g["recall"] - v["recall"]
        goal("vimar_recall", "ViMaR recall no more than 5 points below greedy's", drop <= 0.05 + EPS,
             {"greedy": g["recall"], "vimar": v["recall"], "drop": drop},
             f"recall: greedy {100 * g['recall']:.1f}%, ViMaR {100 * v['recall']:.1f}% ({-100 * drop:+.1f} points; "
             f"the goal is -5 or more)")
    else:
        for gid, text in (("vimar_chair_i", "ViMaR CHAIR_I at least 30% lower than greedy's"),
                          ("vimar_recall", "ViMaR recall no more than 5 points below greedy's")):
            goal(gid, text, None, {}, "not measured (the methods part has not run)")
    if v and vs:
        met = v["chair_i"] <= vs["chair_i"]
        ci = _noise(paired_bootstrap(lambda a, b: b - a, counts("methods", "visvm"), counts("methods", "vimar")),
                    met)
        goal("vimar_vs_visvm_chair", "ViMaR CHAIR_I no higher than VisVM's", met,
             {"visvm": vs["chair_i"], "vimar": v["chair_i"]},
             f"VisVM {100 * vs['chair_i']:.1f}%, ViMaR {100 * v['chair_i']:.1f}%"
             + _ci_text(ci, "ViMaR minus VisVM"), ci)
        goal("vimar_faster", "ViMaR faster per caption than VisVM at the same N and K",
             v["seconds_per_caption"] < vs["seconds_per_caption"],
             {"visvm": vs["seconds_per_caption"], "vimar": v["seconds_per_caption"]},
             f"VisVM {vs['seconds_per_caption']:.3f} s, ViMaR {v['seconds_per_caption']:.3f} s per caption")
    else:
        goal("vimar_vs_visvm_chair", "ViMaR CHAIR_I no higher than VisVM's", None, {}, "not measured")
        goal("vimar_faster", "ViMaR faster per caption than VisVM at the same N and K", None, {}, "not measured")
    bg, bv = _metric(parts, "cross_model", "greedy"), _metric(parts, "cross_model", "vimar")
    if bg and bv:
        met = bv["chair_i"] < bg["chair_i"]
        ci = _noise(paired_bootstrap(lambda a, b: b - a, counts("cross_model", "greedy"),
                                     counts("cross_model", "vimar")), met)
        goal("cross_model", "guidance by policy a's value model lowers policy_b's CHAIR_I",
             met, {"greedy": bg["chair_i"], "vimar": bv["chair_i"]},
             f"policy_b greedy {100 * bg['chair_i']:.1f}%, guided (ViMaR) {100 * bv['chair_i']:.1f}%"
             + _ci_text(ci, "guided minus greedy"), ci)
    else:
        goal("cross_model", "guidance by policy a's value model lowers policy_b's CHAIR_I", None, {}, "not measured")
    sb, sg, sv = (_metric(parts, "self_training", m) for m in ("base", "greedy", "vimar"))
    if sb and sg and sv:
        dg, dv = sb["chair_i"] - sg["chair_i"], sb["chair_i"] - sv["chair_i"]
        met = dv > dg
        ci = _noise(paired_bootstrap(lambda a, b: b - a, counts("self_training", "greedy"),
                                     counts("self_training", "vimar")), met)
        goal("self_training", "self-training on ViMaR captions lowers greedy CHAIR_I more than on greedy captions",
             met, {"base": sb["chair_i"], "sft_greedy": sg["chair_i"], "sft_vimar": sv["chair_i"],
                   "lowered_by_greedy": dg, "lowered_by_vimar": dv},
             f"base {100 * sb['chair_i']:.1f}%; fine-tuned on greedy captions {100 * sg['chair_i']:.1f}% "
             f"({-100 * dg:+.1f} points), on ViMaR captions {100 * sv['chair_i']:.1f}% ({-100 * dv:+.1f} points)"
             + _ci_text(ci, "ViMaR-tuned minus greedy-tuned"), ci)
    else:
        goal("self_training", "self-training on ViMaR captions lowers greedy CHAIR_I more than on greedy captions",
             None, {}, "not measured")
    preset = next((p.get("preset") for p in parts.values() if isinstance(p, dict) and "preset" in p), None)
    if preset == "quick":
        parts_run = [p for p in PARTS[:-1] if p in parts]
        total = sum(parts[p]["wall_time_s"] for p in parts_run)
        goal("quick_time", "bench/claims.py --quick finishes in under 10 minutes on 2 cores",
             total < 600 if len(parts_run) == 4 else None, {"wall_time_s": total, "parts": parts_run},
             f"{total:.0f} s over the parts {', '.join(parts_run)} (load average "
             f"{max(parts[p]['loadavg_start'][0] for p in parts_run):.1f} at the busiest part's start)")
    return out


def _fmt(m: dict, key: str, pct: bool) -> str:
    return f"{100 * m[key]:.1f}" if pct else f"{m[key]:.2f}"


def md_table(rows: list[tuple[str, dict]], first: str = "method", extra: Sequence[tuple[str, Any]] = ()) -> str:
    """A markdown table: one row per (label, metrics), the COLUMNS (rates in percent) and `extra` columns
    ((header, function of metrics))."""
    head = [first] + [h for _, h, _ in COLUMNS] + [h for h, _ in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows:
        cells = [label] + [_fmt(m, k, p) for k, _, p in COLUMNS] + [fn(m) for _, fn in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(parts: dict, checks: list[dict], command: str, vs_greedy: list | None = None) -> str:
    """claims.md; `vs_greedy`: `ablation_vs_greedy(parts)` when the caller has it already."""
    cfg = next((p for p in parts.values() if isinstance(p, dict) and "recipe" in p), {})
    seed = cfg.get("recipe", {}).get("seed")
    commands = list(dict.fromkeys([p["command"] for p in parts.values() if p.get("command")] + [command]))
    out = [f"# ViMaR's claims in the tiny world (preset `{cfg.get('preset')}`)", "",
           f"Held-out scenes: seed {seed} (never trained or tuned on). Rates in percent. Made by: "
           + "; ".join(f"`{c}`" for c in commands) + ".", ""]
    if "methods" in parts:
        p = parts["methods"]
        s = p["search"]
        out += [f"## Methods ({p['n']} scenes; N={len(s['temperatures'])} temperatures {s['temperatures']}, "
                f"K={s['samples_per_temperature']}, N·K={s['num_candidates']})", "",
                md_table([(METHOD_LABELS.get(m, m), r["metrics"]) for m, r in p["results"].items()]), "",
                "![CHAIR_I vs seconds per caption](chair_vs_seconds.png)", ""]
    if "ablations" in parts:
        p = parts["ablations"]
        out += [f"## ViMaR ablations ({p['n']} scenes)", "",
                "τ values: " + ", ".join(f"{k} = {v:.4f}" for k, v in p["taus"].items())
                + f"; {p['tau_scaling']}. Rollouts: {p['rollouts']['counts'].get('images')} training scenes, "
                f"{p['rollouts']['counts'].get('records')} sentence transitions.", ""]
        g = greedy_on_ablation_scenes(parts)
        if g is not None:
            out += [f"Greedy on the same {p['n']} scenes (the methods part's captions): CHAIR_I {100 * g:.1f}%.", ""]
        vs = ablation_vs_greedy(parts) if vs_greedy is None else vs_greedy
        extra = [("θ", lambda m: "" if m.get("theta") is None else f"{m['theta']:.3f}")]
        if any(vs):
            extra.append(("CHAIR_I − greedy [95% CI]", lambda m: "" if m["vs"] is None else
                          f"{100 * m['vs']['diff']:+.1f} [{100 * m['vs']['ci95'][0]:+.1f}, "
                          f"{100 * m['vs']['ci95'][1]:+.1f}]"))
        out.append(md_table([(f"{r['group']}: {r['label']}", {**r["metrics"], "theta": r.get("theta"), "vs": d})
                             for r, d in zip(p["rows"], vs or [None] * len(p["rows"]))], first="ablation",
                            extra=extra))
        out += ["", *[f"- {n}" for n in p.get("notes", ())], "", "![CHAIR_I vs tau](chair_vs_tau.png)", ""]
    if "cross_model" in parts:
        p = parts["cross_model"]
        out += [f"## Cross-model: policy_b guided by policy a's value model ({p['n']} scenes)", "",
                md_table([(f"policy_b {METHOD_LABELS.get(m, m)}", r["metrics"]) for m, r in p["results"].items()]), ""]
    if "self_training" in parts:
        p = parts["self_training"]
        rows = [("policy a (not fine-tuned)", p["results"]["base"]["metrics"])]
        rows += [(f"fine-tuned on {METHOD_LABELS.get(m, m)} captions", p["results"][m]["metrics"])
                 for m in p["sources"]]
        out += [f"## Self-training ({p['num_train_scenes']} training scenes of seed {p['train_seed']} captioned "
                f"per method; greedy CHAIR on {p['n']} held-out scenes)", "", md_table(rows, first="policy"), ""]
    out += ["## Acceptance (issue 6)", ""]
    for c in checks:
        state = {True: "**met**", False: "**missed**", None: "not measured"}[c["met"]]
        if c.get("significant") is False:
            state += " (within noise)"
        out.append(f"- {state}: {c['goal']} — {c['detail']}")
    out.append("")
    return "\n".join(out)


def _finish_plot(fig, ax, xlabel: str, ylabel: str, n: int, path: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"tiny world, {n} held-out scenes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(parts: dict, out: str) -> list[str]:
    """CHAIR_I vs seconds per caption (methods) and CHAIR_I vs τ (ablations) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "methods" in parts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, r in parts["methods"]["results"].items():
            x, y = r["metrics"]["seconds_per_caption"], 100 * r["metrics"]["chair_i"]
            ax.scatter([x], [y], s=40)
            ax.annotate(METHOD_LABELS.get(m, m), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
        written.append(_finish_plot(fig, ax, "seconds per caption", "CHAIR_I (%)", parts["methods"]["n"],
                                    os.path.join(out, "chair_vs_seconds.png")))
    if "ablations" in parts:
        rows = sorted((r for r in parts["ablations"]["rows"] if r["group"] == "tau"), key=lambda r: r["tau"])
        if rows:
            fig, ax = plt.subplots(figsize=(6, 4))
            xs = [r["tau"] for r in rows]
            ys = [100 * r["metrics"]["chair_i"] for r in rows]
            ax.plot(xs, ys, marker="o", color="C0", label="margin reward")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(r["tau_spec"], (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
            variants = [r for r in parts["ablations"]["rows"] if r["group"] == "reward"]
            for i, r in enumerate(variants):
                ax.scatter([r["tau"]], [100 * r["metrics"]["chair_i"]], marker="x", color=f"C{i + 1}",
                           label=f"{r['variant']} reward")
                ax.annotate(r["variant"], (r["tau"], 100 * r["metrics"]["chair_i"]), textcoords="offset points",
                            xytext=(5, -10 - 10 * i), fontsize=8)
            g = greedy_on_ablation_scenes(parts)
            if g is not None:
                ax.axhline(100 * g, color="0.5", linestyle="--", linewidth=1, label="greedy, same scenes")
            ax.legend(fontsize=8)
            written.append(_finish_plot(fig, ax, "τ (margin of the reward the value model was trained on)",
                                        "ViMaR CHAIR_I (%)", parts["ablations"]["n"],
                                        os.path.join(out, "chair_vs_tau.png")))
    return written


def run_report(ctx: Context, command: str) -> dict:
    parts = {p: d for p in PARTS[:-1] if (d := ctx.load_part(p)) is not None}
    checks = acceptance(parts)
    images = plots(parts, ctx.out)
    vs_greedy = ablation_vs_greedy(parts)
    md = markdown(parts, checks, command, vs_greedy)
    with open(os.path.join(ctx.out, "claims.md"), "w", encoding="utf-8") as f:
        f.write(md)
    import jax

    report = {"format": "vimar-claims/1", "command": command, "acceptance": checks,
              "ablation_vs_greedy": vs_greedy, "parts": parts,
              "plots": [os.path.basename(p) for p in images],
              "machine": {"python": platform.python_version(), "jax": jax.__version__,
                          "platform": platform.platform(), "cpus": os.cpu_count()}}
    write_json(os.path.join(ctx.out, "claims.json"), report)
    return report


# ------------------------------------------------------------------------------------------------- driver

RUNNERS = {"methods": run_methods, "ablations": run_ablations, "cross_model": run_cross_model,
           "self_training": run_self_training}


@contextlib.contextmanager
def compile_cache(directory: str | None):
    """JAX's persistent compilation cache in `directory` while the block runs (the value models and the
    fine-tuned policies of a run compile the same programs), the previous settings restored after."""
    import jax

    if not directory:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    os.makedirs(directory, exist_ok=True)
    for k, v in zip(keys, (directory, 0.0, 0)):
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)


def run(ctx: Context, parts: Sequence[str], command: str) -> dict:
    """Run `parts` in order (skipping those already in OUT); returns {part: "ran" | "skipped"}."""
    with compile_cache(os.path.join(ctx.work, "jax_cache")):
        return _run(ctx, parts, command)


def _run(ctx: Context, parts: Sequence[str], command: str) -> dict:
    status = {}
    for part in PARTS:
        if part not in parts:
            continue
        if part == "report":
            run_report(ctx, command)
            status[part] = "ran"
            continue
        if ctx.load_part(part) is not None:
            _log(f"{part}: {ctx.part_path(part)} exists, skipped")
            status[part] = "skipped"
            continue
        _log(f"{part} ...")
        load0, t0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
        data = RUNNERS[part](ctx)
        data.update(ctx.stamp(), part=part, command=command, wall_time_s=time.perf_counter() - t0,
                    cpu_time_s=time.process_time() - c0, loadavg_start=list(load0), loadavg_end=list(os.getloadavg()))
        write_json(ctx.part_path(part), data)
        _log(f"{part} done in {data['wall_time_s']:.0f} s")
        status[part] = "ran"
    return status


def check_models(models: str) -> None:
    from bench.common import missing_model_dirs

    missing = missing_model_dirs(models, MODEL_DIRS)
    if missing:
        raise FileNotFoundError(f"models directory {models} lacks {', '.join(missing)} (each a directory with "
                                f"config.json); build it with `python train/tiny_world.py --out {models}` or pass "
                                f"--models DIR")


def main(argv: Sequence[str] | None = None) -> int:
    from vimar_jax import pipeline

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--models", default=str(pipeline.TINY_WORLD),
                   help="directory with clip/, policy/, value/, policy_b/ (default: the shipped tiny world)")
    p.add_argument("--preset", choices=("full", "quick", "smoke"), default=None,
                   help="recipe preset (configs/claims.py; default full)")
    p.add_argument("--quick", action="store_true", help="the quick preset (every part in minutes)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set self_training.num_scenes=300 (repeatable)")
    args = p.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        p.error("--quick and --preset disagree")
    preset = "quick" if args.quick else args.preset
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"unknown part(s) {bad}; choose from {','.join(PARTS)}")
    try:
        check_models(args.models)
        ctx = Context(load_config(preset, args.set), args.models, args.out, quiet=not args.progress)
        command = " ".join(["python bench/claims.py", *argv])
        t0 = time.perf_counter()
        status = run(ctx, parts, command)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench/claims.py: error: {e}", file=sys.stderr)
        return 2
    if "report" in parts:
        with open(os.path.join(ctx.out, "claims.md"), encoding="utf-8") as f:
            print(f.read())
    # the last line of stdout: what ran (the stage scripts print their own lines before it)
    print(json.dumps({"out": ctx.out, "parts": status, "wall_time_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
