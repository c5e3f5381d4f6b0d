"""Rebuild the tiny world's shipped models with the project's own stage scripts, deterministically.

    python train/tiny_world.py --out DIR [--quick] [--stages clip,policy,rollouts,value,policy_b]
        [--workdir WORK] [--resume] [--config configs/tiny_world.py[:quick]] [--config.KEY=VALUE ...]
        [--compare REFERENCE [--compare_only]]

Stages, in order (each with the fixed seeds of configs/tiny_world.py):
1. `clip`: train the tiny CLIP (train/train_clip.py)                                   -> DIR/clip
2. `policy`: train policy "a" (Mistral-style, tokenizer a) around the CLIP's frozen vision tower
   (train/train_sft.py, configs/tiny_policy.py)                                        -> DIR/policy
3. `rollouts`: sample policy a on its training scenes, δ from the CLIP (train/gen_rollouts.py) -> WORK/rollouts
4. `value`: TD-train the value model from policy a on those rollouts (train/train_value.py) -> DIR/value
5. `policy_b`: train the cross-model policy "b" (Qwen2-style, tokenizer b; configs/tiny_policy_qwen.py)
                                                                                       -> DIR/policy_b
then greedy CHAIR of both policies on held-out scenes, and DIR/provenance.json: per stage its full config,
seeds, wall time and final metrics; the git commit; the held-out CHAIR; the CLIP δ statistics and τ; sizes.

A later stage uses the earlier stages' outputs in DIR, so `--stages value` retrains only the value model
from the shipped policy and CLIP. Stage work directories (trainer checkpoints, rollouts) live in WORK
(default: a temporary directory, removed at the end); they are cleared before a stage runs unless
`--resume` is given, in which case an interrupted rebuild continues where it stopped (trainers resume
exactly; finished rollout shards are kept). `--quick` is the CI smoke version (tiny models, a few steps).
`--compare vimar_jax/assets/tiny_world` checks that the rebuild reproduces the shipped headline metrics
(`HEADLINE`, `TOLERANCE`) and exits 1 if not.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository (vimar_jax, train, configs) importable
    sys.path.insert(0, ROOT)

import ml_collections  # noqa: E402

STAGES = ("clip", "policy", "rollouts", "value", "policy_b")
MODEL_DIRS = ("clip", "policy", "value", "policy_b")      # what DIR ships
PROVENANCE = "provenance.json"
SIZE_LIMIT_BYTES = 20 * 10**6
# Files of a stage output that are not part of the shipped model (they go into provenance.json instead).
_NOT_SHIPPED = ("metrics.json", "summary.json")


# ------------------------------------------------------------------------------------------------ config

def apply_overrides(base: ml_collections.ConfigDict, overrides, where: str) -> None:
    """Set `overrides` (nested mapping) into `base`; a key the recipe does not have is an error naming it."""
    items = overrides.items() if hasattr(overrides, "items") else ()
    for key, value in items:
        if key not in base:
            raise ValueError(f"{where}.{key}: not a key of the stage recipe (known: {sorted(base.keys())})")
        if isinstance(base[key], ml_collections.ConfigDict):
            if not hasattr(value, "items"):
                raise ValueError(f"{where}.{key}: expected a section (mapping), got {value!r}")
            apply_overrides(base[key], value, f"{where}.{key}")
        else:
            with base.ignore_type():
                base[key] = tuple(value) if isinstance(value, list) else value


def clip_config(cfg, out: str, work: str) -> ml_collections.ConfigDict:
    from configs import tiny_clip

    c = tiny_clip.get_config()
    apply_overrides(c, cfg.clip, "clip")
    c.data.train_seed = int(cfg.seeds.clip_train)
    c.eval.seed = int(cfg.seeds.validation)
    c.out = os.path.join(work, "clip", "hf")
    c.workdir = os.path.join(work, "clip", "train")
    return c


def policy_config(cfg, name: str, out: str) -> ml_collections.ConfigDict:
    from configs import tiny_policy, tiny_policy_qwen

    c = (tiny_policy if name == "policy" else tiny_policy_qwen).get_config()
    apply_overrides(c, cfg[name], name)
    c.data.train_seed = int(cfg.seeds.policy_train if name == "policy" else cfg.seeds.policy_b_train)
    c.eval.seed = int(cfg.seeds.validation)
    c.clip = os.path.join(out, "clip")
    return c


def rollouts_argv(cfg, out: str, work: str) -> list[str]:
    r = cfg.rollouts
    return ["--policy", os.path.join(out, "policy"), "--clip", os.path.join(out, "clip"),
            "--source", f"tiny:{int(cfg.seeds.policy_train)}:{int(r.num_scenes)}",
            "--out", os.path.join(work, "rollouts"), "--shards", str(int(r.shards)),
            "--temperatures", str(r.temperatures), "--top-p", str(float(r.top_p)),
            "--max-new-tokens", str(int(r.max_new_tokens)), "--tau", str(r.tau), "--seed", str(int(r.seed)),
            "--counterfactuals", str(int(r.get("counterfactuals", 0))), "--progress", "off"]


def value_config(cfg, out: str, work: str) -> ml_collections.ConfigDict:
    from configs import tiny_value

    c = tiny_value.get_config()
    apply_overrides(c, cfg.value, "value")
    c.init = os.path.join(out, "policy")
    c.rollouts = os.path.join(work, "rollouts")
    with open(os.path.join(c.rollouts, "manifest.json"), encoding="utf-8") as f:
        delta_stats = json.load(f)["delta_stats"]
    c.data.ground_truth_reward = str(resolve_gt_reward(cfg.gt_reward, delta_stats))
    return c


def resolve_gt_reward(spec, delta_stats: dict) -> float:
    """The constant reward of ground-truth sentences: a number, or a percentile of the rollouts' δ ("p90";
    the manifest holds the deciles), as 0.27 is about P90 of δ for CLIP-L/336 on COCO (SPEC §2)."""
    s = str(spec).strip()
    if s.startswith("p"):
        if s not in delta_stats:
            raise ValueError(f"gt_reward={spec!r}: the rollouts' δ statistics have no {s} (they have "
                             f"{sorted(k for k in delta_stats if k.startswith('p'))})")
        return float(delta_stats[s])
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"gt_reward={spec!r}: expected a number or a decile like 'p90'") from None


# ------------------------------------------------------------------------------------------------ stages

def _fresh(path: str, resume: bool) -> str:
    if not resume and os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def ship(src: str, dst: str) -> None:
    """Copy a stage's HF directory into DIR (config, weights, tokenizer and processor files only)."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src}: the stage wrote no config.json")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in sorted(os.listdir(src)):
        if name not in _NOT_SHIPPED and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _last(curve: list) -> dict:
    return dict(curve[-1]) if curve else {}


def run_clip(cfg, out: str, work: str, resume: bool) -> dict:
    from train import train_clip

    _fresh(os.path.join(work, "clip"), resume)
    c = clip_config(cfg, out, work)
    metrics = train_clip.train_clip(c)
    ship(c.out, os.path.join(out, "clip"))
    h = metrics["heldout"]
    return {"config": c.to_dict(), "seeds": {"train_scenes": int(c.data.train_seed), "init": int(c.seed),
                                             "validation_scenes": int(c.eval.seed)},
            "metrics": {"validation": {k: h[k] for k in ("seed", "num_scenes", "retrieval", "pairwise_acc",
                                                         "separated_frac", "delta", "best_split")},
                        "train_final": _last(metrics["train"]["curve"])},
            "wall_time_s": metrics["wall_time_s"]}


def run_policy(cfg, name: str, out: str, work: str, resume: bool) -> dict:
    from train import train_sft

    wd = _fresh(os.path.join(work, name), resume)
    c = policy_config(cfg, name, out)
    state, summary = train_sft.train_sft(c, wd)
    del state
    ship(os.path.join(wd, "hf"), os.path.join(out, name))
    metrics: dict[str, Any] = {"train_final": _last(summary["train"]["curve"]), "records": summary["train"]["records"]}
    if "heldout" in summary:
        v = summary["heldout"]
        metrics["validation"] = {"seed": v["seed"], "prompt": v["prompt"], "chair": v["chair"],
                                 "eos_fraction": v["eos_fraction"], "samples": v["samples"][:4]}
    return {"config": c.to_dict(), "seeds": {"train_scenes": int(c.data.train_seed), "init": int(c.seed),
                                             "validation_scenes": int(c.eval.seed)},
            "metrics": metrics, "wall_time_s": summary["wall_time_s"]}


def run_rollouts(cfg, out: str, work: str, resume: bool) -> dict:
    from train import gen_rollouts

    _fresh(os.path.join(work, "rollouts"), resume)
    argv = rollouts_argv(cfg, out, work)
    t0 = time.perf_counter()
    rc = gen_rollouts.main(argv)
    if rc:
        raise RuntimeError(f"train/gen_rollouts.py {' '.join(argv)} exited with {rc}")
    with open(os.path.join(work, "rollouts", "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return {"config": {"argv": argv}, "seeds": {"scenes": int(cfg.seeds.policy_train), "sampling": int(cfg.rollouts.seed)},
            "metrics": {"counts": manifest["counts"], "delta_stats": manifest["delta_stats"],
                        "reward": manifest["reward"]},
            "wall_time_s": {"total": time.perf_counter() - t0}}


def run_value(cfg, out: str, work: str, resume: bool) -> dict:
    from train import train_value

    if not os.path.isfile(os.path.join(work, "rollouts", "manifest.json")):
        raise FileNotFoundError(f"the value stage needs the rollouts of this run in {work}/rollouts: run the "
                                "'rollouts' stage first (with the same --workdir)")
    wd = _fresh(os.path.join(work, "value"), resume)
    c = value_config(cfg, out, work)
    state, summary = train_value.train_value(c, wd)
    del state
    ship(os.path.join(wd, "hf"), os.path.join(out, "value"))
    return {"config": c.to_dict(), "seeds": {"init": int(c.seed), "split": int(c.data.split_seed)},
            "metrics": {"final_eval": summary["final_eval"], "value_stats": summary["value_stats"],
                        "train_final": _last(summary["train"]["curve"]), "data": summary["data"]},
            "wall_time_s": summary["wall_time_s"]}


def heldout_chair(cfg, out: str) -> dict:
    """Greedy captions of held-out scenes (seeds.heldout) by each shipped policy, tiny-world CHAIR."""
    from train import train_sft
    from vimar_jax.data import scenes as S
    from vimar_jax.data.sft_data import DEFAULT_PROMPT
    from vimar_jax.eval.chair import tiny_chair
    from vimar_jax.vlm import load_vlm

    h, seed = cfg.heldout, int(cfg.seeds.heldout)
    scenes = S.scenes(seed, int(h.num_scenes))
    images = [S.render(s) for s in scenes]
    result = {"seed": seed, "num_scenes": len(scenes), "prompt": DEFAULT_PROMPT}
    for name in ("policy", "policy_b"):
        path = os.path.join(out, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            continue
        t0 = time.perf_counter()
        caps, ended = train_sft.greedy_captions(load_vlm(path), images, DEFAULT_PROMPT,
                                                batch_size=int(h.batch_size), max_new_tokens=int(h.max_new_tokens))
        result[name] = {"chair": tiny_chair(zip(caps, scenes)), "eos_fraction": sum(ended) / len(ended),
                        "seconds": time.perf_counter() - t0, "samples": caps[:3]}
    return result


# ------------------------------------------------------------------------------------------- provenance

def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f))) if os.path.isdir(path) else 0


def sizes(out: str) -> dict:
    per = {name: dir_bytes(os.path.join(out, name)) for name in MODEL_DIRS}
    return {"bytes": per, "total_bytes": sum(per.values()), "limit_bytes": SIZE_LIMIT_BYTES}


def clip_reward_summary(stages: dict) -> dict:
    """The CLIP δ statistics (validation true/false sentences; policy rollouts) and the resolved τ."""
    out: dict[str, Any] = {}
    clip = stages.get("clip", {}).get("metrics", {}).get("validation")
    if clip:
        out["validation_delta"] = {k: clip["delta"][k] for k in ("true", "false")}
        out["best_split"] = clip["best_split"]
    roll = stages.get("rollouts", {}).get("metrics")
    if roll:
        out["rollout_delta"] = roll["delta_stats"]
        out["tau"] = roll["reward"]["tau"]
        out["tau_spec"] = roll["reward"]["tau_spec"]
    return out


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=float)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- run

def rebuild(cfg, out: str, *, stages: Sequence[str] = STAGES, workdir: str | None = None, resume: bool = False,
            argv: Sequence[str] = ()) -> dict:
    """Run `stages` in order into `out`; returns (and writes) the provenance."""
    import jax
    import flax

    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
    stages = [s for s in STAGES if s in stages]   # always in pipeline order
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    prov_path = os.path.join(out, PROVENANCE)
    prov: dict[str, Any] = {}
    if os.path.isfile(prov_path):   # stages not rerun keep their record
        with open(prov_path, encoding="utf-8") as f:
            prov = json.load(f)
    prov.setdefault("stages", {})
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiny_world_")
        workdir = tmp.name
    work = os.path.abspath(workdir)
    t_start, c_start = time.perf_counter(), time.process_time()
    git = git_state()   # the code this run imported, not what the checkout holds when it ends
    try:
        for stage in stages:
            print(f"[tiny_world] stage {stage} ...", file=sys.stderr, flush=True)
            t0, c0 = time.perf_counter(), time.process_time()
            if stage == "clip":
                rec = run_clip(cfg, out, work, resume)
            elif stage in ("policy", "policy_b"):
                rec = run_policy(cfg, stage, out, work, resume)
            elif stage == "rollouts":
                rec = run_rollouts(cfg, out, work, resume)
            else:
                rec = run_value(cfg, out, work, resume)
            rec["stage_wall_time_s"] = time.perf_counter() - t0
            rec["stage_cpu_time_s"] = time.process_time() - c0   # all threads: the work, whatever the load
            prov["stages"][stage] = rec
            print(f"[tiny_world] stage {stage} done in {rec['stage_wall_time_s']:.0f} s", file=sys.stderr, flush=True)
            write_json(prov_path, {**prov, "complete": False})
        t0, c0 = time.perf_counter(), time.process_time()
        prov["heldout"] = heldout_chair(cfg, out)
        prov["heldout"].update(wall_time_s=time.perf_counter() - t0, cpu_time_s=time.process_time() - c0)
    finally:
        if tmp is not None:
            tmp.cleanup()
    prov.update({
        "format": "vimar-tiny-world/1",
        "command": " ".join(["python", "train/tiny_world.py", *argv]),
        "stages_run": list(stages),
        "seeds": cfg.seeds.to_dict(),
        "tiny_world_config": cfg.to_dict(),
        "git": git,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "platform": platform.platform(), "cpus": os.cpu_count()},
        "clip_reward": clip_reward_summary(prov["stages"]),
        "sizes": sizes(out),
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - c_start,
        "complete": True,
    })
    write_json(prov_path, prov)
    return prov


def brief(prov: dict) -> dict:
    """The headline numbers of a provenance record."""
    out: dict[str, Any] = {"wall_time_s": round(prov["wall_time_s"], 1), "cpu_time_s": round(prov["cpu_time_s"], 1),
                           "stage_wall_time_s": {k: round(v["stage_wall_time_s"], 1) for k, v in prov["stages"].items()
                                                 if k in prov.get("stages_run", ())},
                           "total_mb": round(prov["sizes"]["total_bytes"] / 1e6, 2)}
    for name in ("policy", "policy_b"):
        c = prov.get("heldout", {}).get(name, {}).get("chair")
        if c:
            out[f"{name}_heldout_greedy"] = {k: round(c[k], 4) for k in ("chair_i", "chair_s", "attr_chair_i", "recall",
                                                                        "sentences_per_caption") if k in c}
    if "tau" in prov.get("clip_reward", {}):
        out["tau"] = prov["clip_reward"]["tau"]
    return out


# Headline metrics a rebuild must reproduce: (path in provenance.json, kind). Tolerances: "rate"
# (accuracies, CHAIR, recall, correlations) within 0.02 absolute; "scalar" (losses, τ, δ) within 2% relative.
# On one machine and software stack the pipeline is deterministic and the figures are expected to be equal;
# the tolerance is for another CPU or XLA version.
HEADLINE = (
    ("stages.clip.metrics.validation.retrieval.i2t_top1", "rate"),
    ("stages.clip.metrics.validation.retrieval.t2i_top1", "rate"),
    ("stages.clip.metrics.validation.pairwise_acc.all", "rate"),
    ("stages.clip.metrics.validation.delta.true.mean", "scalar"),
    ("stages.policy.metrics.train_final.loss", "scalar"),
    ("stages.policy.metrics.validation.chair.chair_i", "rate"),
    ("stages.policy.metrics.validation.chair.recall", "rate"),
    ("stages.rollouts.metrics.reward.tau", "scalar"),
    ("stages.value.metrics.final_eval.td_loss", "scalar"),
    ("stages.value.metrics.final_eval.value_corr", "rate"),
    ("stages.policy_b.metrics.train_final.loss", "scalar"),
    ("heldout.policy.chair.chair_i", "rate"),
    ("heldout.policy.chair.chair_s", "rate"),
    ("heldout.policy.chair.recall", "rate"),
    ("heldout.policy_b.chair.chair_i", "rate"),
    ("heldout.policy_b.chair.recall", "rate"),
)
TOLERANCE = {"rate": ("abs", 0.02), "scalar": ("rel", 0.02)}


def _lookup(record: dict, path: str):
    node: Any = record
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def compare(reference: dict, rebuilt: dict) -> tuple[bool, list[dict]]:
    """Compare the headline metrics of two provenance records -> (all within tolerance, rows)."""
    rows, ok = [], True
    for path, kind in HEADLINE:
        a, b = (None if v is None else float(v) for v in (_lookup(reference, path), _lookup(rebuilt, path)))
        mode, tol = TOLERANCE[kind]
        diff = None if a is None or b is None else abs(b - a)
        within = diff is not None and diff <= (tol if mode == "abs" else tol * max(abs(a), 1e-12))
        rows.append({"metric": path, "reference": a, "rebuilt": b, "diff": diff, "tolerance": f"{mode} {tol}",
                     "within": within})
        ok &= within
    return ok, rows


def format_comparison(rows: list[dict]) -> str:
    lines = [f"{'metric':58s} {'reference':>11s} {'rebuilt':>11s} {'|diff|':>9s}  tolerance  ok"]
    for r in rows:
        f = lambda v: "missing" if v is None else f"{v:.5g}"  # noqa: E731
        lines.append(f"{r['metric']:58s} {f(r['reference']):>11s} {f(r['rebuilt']):>11s} {f(r['diff']):>9s}  "
                     f"{r['tolerance']:9s}  {'yes' if r['within'] else 'NO'}")
    return "\n".join(lines)


def _read_provenance(path: str) -> dict:
    path = os.path.join(path, PROVENANCE) if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            prov = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no provenance record") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not prov.get("complete"):
        raise ValueError(f"{path}: the rebuild it records did not complete")
    return prov


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    default = os.path.join(ROOT, "configs", "tiny_world.py")
    if "--quick" in argv and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [argv[0], f"--config={default}:quick", *argv[1:]]
    fl = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default, "rebuild recipe (configs/tiny_world.py[:quick])",
                                    flag_values=fl, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("out", None, "directory of the rebuilt models (clip, policy, value, policy_b)", flag_values=fl)
    flags.DEFINE_string("workdir", None, "stage work directories (default: a temporary one)", flag_values=fl)
    flags.DEFINE_string("stages", ",".join(STAGES), "comma-separated subset of " + ",".join(STAGES), flag_values=fl)
    flags.DEFINE_bool("quick", False, "the CI smoke version (configs/tiny_world.py:quick)", flag_values=fl)
    flags.DEFINE_bool("resume", False, "keep existing stage work directories (continue an interrupted rebuild)",
                      flag_values=fl)
    flags.DEFINE_string("compare", None, "after the rebuild, compare its headline metrics with this provenance.json "
                        "(or model directory); exit 1 when one is outside its tolerance", flag_values=fl)
    flags.DEFINE_bool("compare_only", False, "do not rebuild: compare DIR's existing provenance with --compare",
                      flag_values=fl)
    try:
        fl(argv)
    except (flags.Error, KeyError, AttributeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not fl.out:
        print("error: --out DIR is required", file=sys.stderr)
        return 2
    stages = [s.strip() for s in fl.stages.split(",") if s.strip()]
    if fl.compare_only and not fl.compare:
        print("error: --compare_only needs --compare REFERENCE", file=sys.stderr)
        return 2
    try:
        reference = _read_provenance(fl.compare) if fl.compare else None
        if fl.compare_only:
            prov = _read_provenance(fl.out)
        else:
            prov = rebuild(fl.config, fl.out, stages=stages, workdir=fl.workdir, resume=fl.resume, argv=argv[1:])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(brief(prov), indent=1))
    if prov["sizes"]["total_bytes"] > SIZE_LIMIT_BYTES:
        print(f"warning: the models total {prov['sizes']['total_bytes'] / 1e6:.1f} MB, over the "
              f"{SIZE_LIMIT_BYTES / 1e6:.0f} MB limit of the shipped tiny world", file=sys.stderr)
    if reference is not None:
        ok, rows = compare(reference, prov)
        print(format_comparison(rows))
        print("reproduced within tolerance" if ok else "NOT reproduced: see the rows marked NO", flush=True)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
