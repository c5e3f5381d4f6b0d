"""bench/claims.py: the acceptance evaluator, τ scaling, and a smoke run of every part on the tiny world.

The smoke run needs the tiny-world models (clip, policy, value, policy_b): the shipped ones, or a rebuilt
directory given by TINY_WORLD_DIR (`TINY_WORLD_DIR=DIR python -m pytest tests/test_claims.py`); it skips
while neither exists."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import claims
from vimar_jax.data import scenes as S
from vimar_jax.eval.chair import tiny_chair

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("TINY_WORLD_DIR") or ROOT / "vimar_jax" / "assets" / "tiny_world").resolve()
_MISSING = [n for n in claims.MODEL_DIRS if not (MODELS / n / "config.json").is_file()]
needs_models = pytest.mark.skipif(bool(_MISSING), reason=f"tiny-world models not built yet ({MODELS}: {_MISSING} "
                                                         f"missing; set TINY_WORLD_DIR to a rebuilt directory)")


def _m(chair_i, recall=0.5, seconds=1.0):
    return {"metrics": {"chair_i": chair_i, "recall": recall, "seconds_per_caption": seconds}}


def _parts(greedy=(0.50, 0.40, 1.0), vimar=(0.30, 0.37, 2.0), visvm=(0.33, 0.40, 3.0), b=(0.6, 0.5),
           st=(0.5, 0.45, 0.40)):
    return {
        "methods": {"preset": "full", "results": {"greedy": _m(*greedy), "vimar": _m(*vimar), "visvm": _m(*visvm)}},
        "cross_model": {"results": {"greedy": _m(b[0]), "vimar": _m(b[1])}},
        "self_training": {"results": {"base": _m(st[0]), "greedy": _m(st[1]), "vimar": _m(st[2])}},
    }


def _met(parts):
    return {c["id"]: c["met"] for c in claims.acceptance(parts)}


def test_acceptance_marks_made_up_results_met_and_missed():
    assert _met(_parts()) == {"vimar_chair_i": True, "vimar_recall": True, "vimar_vs_visvm_chair": True,
                              "vimar_faster": True, "cross_model": True, "self_training": True}
    # 0.50 -> 0.36 is 28% lower: missed; recall 6 points lower: missed; slower and worse than VisVM: missed
    got = _met(_parts(vimar=(0.36, 0.34, 4.0), visvm=(0.35, 0.40, 3.0)))
    assert not got["vimar_chair_i"] and not got["vimar_recall"]
    assert not got["vimar_vs_visvm_chair"] and not got["vimar_faster"]
    # exactly 30% lower and exactly 5 points lower recall still meet the goals
    got = _met(_parts(greedy=(0.5, 0.40, 1.0), vimar=(0.35, 0.35, 2.0)))
    assert got["vimar_chair_i"] and got["vimar_recall"]
    got = _met(_parts(b=(0.6, 0.6), st=(0.5, 0.40, 0.42)))
    assert got["cross_model"] is False and got["self_training"] is False
    checks = {c["id"]: c for c in claims.acceptance(_parts(st=(0.5, 0.45, 0.40)))}
    assert checks["self_training"]["numbers"]["lowered_by_vimar"] == pytest.approx(0.10)
    assert checks["vimar_chair_i"]["numbers"]["reduction"] == pytest.approx(0.40)
    # parts not run: not measured (None), never met
    assert set(_met({}).values()) == {None}
    # the quick preset's time goal, over the four measuring parts
    quick = {p: {"preset": "quick", "wall_time_s": 100.0, "loadavg_start": [2.0, 2.0, 2.0], "results": {}}
             for p in ("methods", "ablations", "cross_model", "self_training")}
    assert _met(quick)["quick_time"] is True
    quick["ablations"]["wall_time_s"] = 400.0
    assert _met(quick)["quick_time"] is False


def test_acceptance_bootstrap_intervals_from_the_kept_captions():
    """With the captions kept, each CHAIR comparison gets a paired bootstrap interval over the scenes: clearly
    separated caption sets are outside noise, equal ones within it; the interval brackets the measured
    difference."""
    n, seed = 40, 100
    scenes = [S.scene_at(seed, i) for i in range(n)]
    rng = np.random.default_rng(0)
    true_caps = [S.caption(sc, rng) for sc in scenes]
    false_caps = [" ".join([S.false_sentence(sc, rng, "absent"), S.caption(sc, rng)]) for sc in scenes]

    def res(caps):
        return {"metrics": {"chair_i": tiny_chair(zip(caps, scenes))["chair_i"], "recall": 0.5,
                            "seconds_per_caption": 1.0}, "captions": caps}

    parts = {"cross_model": {"seed": seed, "results": {"greedy": res(false_caps), "vimar": res(true_caps)}},
             "self_training": {"seed": seed, "results": {"base": res(false_caps), "greedy": res(true_caps),
                                                         "vimar": res(false_caps)}}}
    checks = {c["id"]: c for c in claims.acceptance(parts)}
    cross, st = checks["cross_model"], checks["self_training"]
    assert cross["met"] is True and cross["significant"] is True
    diff = parts["cross_model"]["results"]["vimar"]["metrics"]["chair_i"] - \
        parts["cross_model"]["results"]["greedy"]["metrics"]["chair_i"]
    assert cross["ci95"][0] <= diff <= cross["ci95"][1] < 0
    assert st["met"] is False and st["significant"] is True and st["ci95"][0] > 0
    assert "outside noise" in cross["detail"]
    # the same captions on both sides: not lowered, and the interval is [0, 0]: no evidence either way
    parts["cross_model"]["results"]["vimar"] = res(false_caps)
    cross = {c["id"]: c for c in claims.acceptance(parts)}["cross_model"]
    assert cross["met"] is False and cross["ci95"] == [0.0, 0.0] and cross["significant"] is False
    assert "within noise" in cross["detail"]
    # without captions (or with sets of different lengths) there is no interval
    assert claims.paired_bootstrap(lambda a, b: b - a, None, np.ones((3, 2))) is None
    assert claims.paired_bootstrap(lambda a, b: b - a, np.ones((3, 2)), np.ones((4, 2))) is None
    assert {c["ci95"] for c in claims.acceptance(_parts()) if c["id"] != "quick_time"} == {None}


def test_tau_specs_from_the_rollouts_deltas():
    d = np.random.default_rng(0).normal(0.5, 0.07, size=1000)
    assert claims.resolve_tau_spec("0", d) == 0.0
    assert claims.resolve_tau_spec("p17", d) == pytest.approx(np.percentile(d, 17))
    assert claims.resolve_tau_spec("scaled:0.16", d) == pytest.approx(0.16 * np.percentile(d, 90) / 0.27)


def test_full_recipe_covers_the_issue_grid(tmp_path):
    cfg = claims.load_config("full")
    assert cfg.seed == 1003 and cfg.train_seed < 1000 and cfg.warmup.seed < 1000
    assert cfg.methods.n >= 500 and set(cfg.methods.names) == set(claims.METHOD_LABELS)
    assert set(cfg.ablations.taus) == {"0", "scaled:0.16", "p17"}
    assert set(cfg.ablations.variants) == {"zero_below", "clip_at_tau"}
    ctx = claims.Context(cfg, str(tmp_path), str(tmp_path / "out"))
    taus = {"0": 0.0, "scaled:0.16": 0.35, "p17": 0.47}
    models = {**{f"tau_{t}": {"dir": f"v_{t}"} for t in taus},
              **{f"variant_{v}": {"dir": f"v_{v}"} for v in cfg.ablations.variants},
              "state_sentence": {"dir": "v_p17"}, "state_prefix": {"dir": "v_prefix"}}
    rows = claims.ablation_rows(ctx, taus, models)
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    assert [r["tau"] for r in by_group["tau"]] == [0.0, 0.35, 0.47]
    assert {r["value"] for r in by_group["tau"] + by_group["reward"]} == {"v_0", "v_scaled:0.16", "v_p17",
                                                                          "v_zero_below", "v_clip_at_tau"}
    assert all(r["tau"] == 0.47 for r in by_group["reward"])
    # the value-state rows: models trained alike (τ = p17) on each state, each searching with its own state
    assert [(r["state"], r["value"], r["tau"]) for r in by_group["state"]] == [("sentence", "v_p17", 0.47),
                                                                             ("prefix", "v_prefix", 0.47)]
    assert {r["stage2"] for r in by_group["stage2"]} == {"off", "append_only", "replace_append"}
    assert sorted(len(r["temperatures"]) * r["k"] for r in by_group["nk"]) == [6, 12, 30]
    # rows equal to a baseline share one configuration: τ = p17 with the sentence-state row, and the shipped
    # model's replace-and-append with its N·K = 30
    keys = {(r["value"], r["state"], tuple(r["temperatures"]), r["k"], r["stage2"]) for r in rows}
    assert len(keys) == len(rows) - 2
    # every other row is the methods part's ViMaR setting (N·K = 30, replace-and-append)
    assert ctx.search_config().num_candidates == 30
    for r in by_group["state"] + by_group["stage2"]:
        assert len(r["temperatures"]) * r["k"] == 30


def test_missing_models_are_a_clear_error(tmp_path, capsys):
    assert claims.main(["--models", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "clip" in err and "policy_b" in err


def test_set_overrides_recipe_entries_and_names_unknown_keys(tmp_path, capsys):
    c = claims.load_config("smoke", ["self_training.num_scenes=7", "prompt=Describe it.", "search.top_p=0.8"])
    assert c.self_training.num_scenes == 7 and c.prompt == "Describe it." and c.search.top_p == 0.8
    assert claims.load_config("smoke").self_training.num_scenes == 2
    for bad, named in (("self_training.num_scene=7", "self_training.num_scene"), ("nope.n=1", "nope"),
                       ("methods.n", "KEY=VALUE"), ("methods.n=abc", "methods.n must be int")):
        with pytest.raises(ValueError, match=named):
            claims.load_config("smoke", [bad])
    assert claims.main(["--out", str(tmp_path), "--preset", "smoke", "--set", "methods.m=1"]) == 2
    assert "methods.m" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ smoke run

def _run(out: Path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device, as a user runs it
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--models", str(MODELS), "--out",
                           str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if _MISSING:
        pytest.skip(f"tiny-world models not built yet ({_MISSING} missing)")
    out = tmp_path_factory.mktemp("claims")
    proc, seconds = _run(out, "--preset", "smoke")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.splitlines()[-1]), seconds


def _captions_chair(captions, seed):
    return tiny_chair(zip(captions, S.scenes(seed, len(captions))))


def _same_as_tiny_eval(entry, seed):
    m = entry["metrics"]
    ref = _captions_chair(entry["captions"], seed)
    for key, ref_key in (("chair_i", "chair_i"), ("chair_s", "chair_s"), ("recall", "recall"),
                         ("attr_chair_i", "attr_chair_i"), ("sentences", "sentences_per_caption")):
        assert m[key] == pytest.approx(ref[ref_key]), key
    for key in ("chair_i", "chair_s", "attr_chair_i", "recall"):
        assert 0.0 <= m[key] <= 1.0
    assert m["seconds_per_caption"] > 0 and m["tokens_per_caption"] > 0


@needs_models
def test_smoke_every_part(smoke):
    out, status, _ = smoke
    assert status["parts"] == {p: "ran" for p in claims.PARTS}
    cfg = claims.load_config("smoke")
    seed = cfg.seed
    assert seed == 1003
    report = json.loads((out / "claims.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"methods", "ablations", "cross_model", "self_training"}

    methods = parts["methods"]
    assert list(methods["results"]) == list(cfg.methods.names)
    for entry in methods["results"].values():
        assert len(entry["captions"]) == cfg.methods.n
        _same_as_tiny_eval(entry, seed)
    # greedy decodes one caption; best-of-N decodes N·K of them
    res = methods["results"]
    assert res["bon-clip"]["metrics"]["tokens_per_caption"] > res["greedy"]["metrics"]["tokens_per_caption"]

    abl = parts["ablations"]
    trained = {k: v for k, v in abl["value_models"].items()}
    assert set(trained) == {"tau_p17", "variant_zero_below", "state_sentence", "state_prefix"}
    # the sentence-state model is τ = p17's (trained once); the prefix-state one is its own
    assert trained["state_sentence"]["dir"] == trained["tau_p17"]["dir"]
    assert len({v["dir"] for v in trained.values()}) == 3
    for v in trained.values():   # each model was trained on the re-rewarded rollouts with its own reward
        assert v["reward"]["tau"] == pytest.approx(v["tau"]) and v["reward"]["variant"] == v["variant"]
        vv = json.loads((Path(v["dir"]) / "config.json").read_text())["vimar_value"]
        assert vv["state"] == v["state"]
    assert trained["state_prefix"]["state"] == "prefix" and trained["state_prefix"]["packing"]["train"]["states"] > 0
    deltas = claims.rollout_deltas(str(out / "work" / "rollouts"))
    assert abl["taus"]["p17"] == pytest.approx(np.percentile(deltas, 17))
    groups = [r["group"] for r in abl["rows"]]
    assert groups.count("tau") == 1 and groups.count("reward") == 1 and groups.count("state") == 2
    for row in abl["rows"]:
        _same_as_tiny_eval(row, seed)
    # configurations shared between groups are evaluated once: τ = p17 with the sentence-state row
    by = {(r["group"], r["label"]): r for r in abl["rows"]}
    tau_row = next(r for r in abl["rows"] if r["group"] == "tau")
    assert by[("state", "sentence states (τ=p17)")]["captions"] == tau_row["captions"]
    assert by[("state", "prefix states (τ=p17)")]["value"] == trained["state_prefix"]["dir"]

    cross = parts["cross_model"]
    assert cross["policy"].endswith("policy_b")
    for entry in cross["results"].values():
        _same_as_tiny_eval(entry, seed)

    st = parts["self_training"]
    assert set(st["results"]) == {"base", *cfg.self_training.sources}
    assert st["results"]["base"]["captions"] == methods["results"]["greedy"]["captions"]
    for method, src in st["sources"].items():
        lines = [json.loads(x) for x in Path(src["file"]).read_text().splitlines()]
        assert len(lines) == cfg.self_training.num_scenes and all(x["method"] == method for x in lines)
        # the captions are of TRAINING scenes (train_seed), and their recorded CHAIR is theirs
        assert src["training_chair"]["chair_i"] == pytest.approx(
            _captions_chair([x["caption"] for x in lines], cfg.train_seed)["chair_i"])
        assert src["sft"]["records"] == len(lines) and src["sft"]["steps"] == cfg.self_training.sft.total_steps
        _same_as_tiny_eval(st["results"][method], seed)

    # the report: acceptance recomputed from the parts, the table, the two PNGs
    assert report["acceptance"] == claims.acceptance(parts)
    md = (out / "claims.md").read_text()
    for label in ("ViMaR", "VisVM search", "best-of-N (CLIP)", "Acceptance", "policy_b greedy", "fine-tuned on"):
        assert label in md
    for c in report["acceptance"]:
        assert c["met"] in (True, False) and c["goal"] in md
    # the ablations' greedy reference: greedy CHAIR_I on the same scenes, from the methods part's captions
    g = claims.greedy_on_ablation_scenes(parts)
    assert g == pytest.approx(_captions_chair(methods["results"]["greedy"]["captions"][:abl["n"]], seed)["chair_i"])
    assert f"Greedy on the same {abl['n']} scenes (the methods part's captions): CHAIR_I {100 * g:.1f}%." in md
    # each ablation row against it: CHAIR_I difference (tiny_eval's figure minus greedy's) and an interval
    vs = report["ablation_vs_greedy"]
    assert len(vs) == len(abl["rows"])
    for r, d in zip(abl["rows"], vs):
        assert d["diff"] == pytest.approx(r["metrics"]["chair_i"] - g)
        assert d["ci95"][0] <= d["diff"] + 1e-12 and d["diff"] - 1e-12 <= d["ci95"][1]
        assert f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" in md
    for name in ("chair_vs_seconds.png", "chair_vs_tau.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_models
def test_resume_skips_finished_parts_and_refuses_another_recipe(smoke):
    out, _, first_seconds = smoke
    stamps = {p: (out / f"{p}.json").stat().st_mtime_ns for p in ("methods", "ablations", "cross_model",
                                                                   "self_training")}
    proc, seconds = _run(out, "--preset", "smoke")
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout.splitlines()[-1])
    assert status["parts"] == {**{p: "skipped" for p in stamps}, "report": "ran"}
    assert {p: (out / f"{p}.json").stat().st_mtime_ns for p in stamps} == stamps
    assert seconds < first_seconds
    # a part redone reuses the evaluations kept in OUT/work/evals: the same captions and figures
    before = json.loads((out / "methods.json").read_text())["results"]
    (out / "methods.json").unlink()
    proc, _ = _run(out, "--preset", "smoke", "--parts", "methods")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "methods.json").read_text())["results"] == before
    proc, _ = _run(out, "--quick", "--parts", "methods")
    assert proc.returncode == 2 and "another recipe" in proc.stderr
    # a part depends on the shared entries and its own section only
    proc, _ = _run(out, "--preset", "smoke", "--parts", "methods", "--set", "self_training.n=3")
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["parts"] == {"methods": "skipped"}
    proc, _ = _run(out, "--preset", "smoke", "--parts", "methods", "--set", "search.top_p=0.8")
    assert proc.returncode == 2 and "another recipe" in proc.stderr
    # the same models in another place (byte-identical files) are the same models; one changed file is not
    import shutil

    copy = out.parent / f"{out.name}_models"
    shutil.copytree(MODELS, copy)
    proc, _ = _run(out, "--preset", "smoke", "--parts", "methods", "--models", str(copy))
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["parts"] == {"methods": "skipped"}
    with open(copy / "value" / "config.json", "a", encoding="utf-8") as f:
        f.write("\n")
    proc, _ = _run(out, "--preset", "smoke", "--parts", "methods", "--models", str(copy))
    assert proc.returncode == 2 and "other models" in proc.stderr
