"""The tiny world end to end: the `--quick` rebuild, the shipped models in HF PyTorch, `vimar demo` and
`vimar eval` on held-out scenes.

The shipped-model tests skip while `vimar_jax/assets/tiny_world/` has not been built yet. To run them against a
rebuilt directory before shipping it: `TINY_WORLD_DIR=DIR python -m pytest tests/test_tiny_world.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import max_rel_err
from vimar_jax.data import scenes as S

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = Path(os.environ.get("TINY_WORLD_DIR") or ROOT / "vimar_jax" / "assets" / "tiny_world").resolve()
PROMPT = "Describe this image in detail."
HELD_OUT = 1000                 # configs/tiny_world.py: seeds >= 1000 are never trained on

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _models_from_shipped(monkeypatch):
    """The commands' default models are the ones under test (the shipped ones unless TINY_WORLD_DIR is set)."""
    from vimar_jax import pipeline

    monkeypatch.setattr(pipeline, "TINY_WORLD", SHIPPED)


def _shipped(*names):
    missing = [n for n in names if not (SHIPPED / n / "config.json").is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"shipped tiny world not built yet ({missing} missing)")


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ config

def test_seed_plan_keeps_held_out_seeds_out_of_training():
    sys.path.insert(0, str(ROOT))
    from configs import tiny_world

    for preset in ("full", "quick"):
        c = tiny_world.get_config(preset)
        s = c.seeds
        train = {s.clip_train, s.policy_train, s.policy_b_train}
        assert len(train) == 3 and s.validation not in train
        assert min(s.eval, s.demo, s.heldout) >= 1000 and max(train | {s.validation}) < 1000
    with pytest.raises(ValueError, match="unknown preset"):
        tiny_world.get_config("huge")


def test_overrides_name_an_unknown_key():
    import ml_collections

    from train import tiny_world as TW

    base = ml_collections.ConfigDict({"a": 1, "sub": {"b": 2}})
    TW.apply_overrides(base, {"a": 5, "sub": {"b": 7}}, "clip")
    assert (base.a, base.sub.b) == (5, 7)
    with pytest.raises(ValueError, match=r"clip\.sub\.nope"):
        TW.apply_overrides(base, {"sub": {"nope": 1}}, "clip")


def test_ground_truth_reward_from_the_rollouts_deciles():
    from train import tiny_world as TW

    stats = {"count": 10, "p10": 0.1, "p90": 0.42}
    assert TW.resolve_gt_reward("p90", stats) == 0.42 and TW.resolve_gt_reward(0.27, stats) == 0.27
    with pytest.raises(ValueError, match="no p95"):
        TW.resolve_gt_reward("p95", stats)
    with pytest.raises(ValueError, match="expected a number"):
        TW.resolve_gt_reward("high", stats)


def _provenance_with(value: float) -> dict:
    from train import tiny_world as TW

    prov: dict = {"complete": True}
    for path, _ in TW.HEADLINE:
        node = prov
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return prov


def test_rebuild_comparison_applies_the_stated_tolerances(tmp_path, capsys):
    from train import tiny_world as TW

    ref = _provenance_with(0.5)
    ok, rows = TW.compare(ref, _provenance_with(0.5))
    assert ok and len(rows) == len(TW.HEADLINE)
    near = _provenance_with(0.5)
    near["heldout"]["policy"]["chair"]["chair_i"] = 0.515            # rate: 0.015 <= 0.02 absolute
    near["stages"]["value"]["metrics"]["final_eval"]["td_loss"] = 0.509   # scalar: 1.8% <= 2% relative
    assert TW.compare(ref, near)[0]
    for path, value in (("heldout.policy.chair.chair_i", 0.525), ("stages.rollouts.metrics.reward.tau", 0.515)):
        far = json.loads(json.dumps(ref))
        node = far
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
        ok, rows = TW.compare(ref, far)
        assert not ok and [r["metric"] for r in rows if not r["within"]] == [path]
    missing = json.loads(json.dumps(ref))
    del missing["heldout"]["policy_b"]
    ok, rows = TW.compare(ref, missing)
    assert not ok and {r["metric"] for r in rows if not r["within"]} == {"heldout.policy_b.chair.chair_i",
                                                                          "heldout.policy_b.chair.recall"}
    # The command: --compare_only reads DIR's record; an unfinished record or a missing one is an error.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "provenance.json").write_text(json.dumps({**near, "sizes": {"total_bytes": 1},
                                                                "wall_time_s": 1, "cpu_time_s": 1}))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    args = ["tiny_world.py", "--out", str(tmp_path / "a"), "--compare_only"]
    assert TW.main(args + ["--compare", str(tmp_path / "ref.json")]) == 0
    assert "reproduced within tolerance" in capsys.readouterr().out
    (tmp_path / "ref.json").write_text(json.dumps({**ref, "complete": False}))
    assert TW.main(args + ["--compare", str(tmp_path / "ref.json")]) == 2
    assert "did not complete" in capsys.readouterr().err
    assert TW.main(args + ["--compare", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no provenance record" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- quick rebuild

@pytest.mark.slow
def test_quick_rebuild_end_to_end(tmp_path):
    """`train/tiny_world.py --quick` runs every stage (CLIP, policy a, rollouts, value, policy b) through the
    project's own scripts and writes loadable HF directories and a provenance record."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device, as a user runs it
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "tiny_world.py"), "--out", str(out), "--quick",
                           "--workdir", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["complete"] and prov["stages_run"] == ["clip", "policy", "rollouts", "value", "policy_b"]
    assert set(prov["stages"]) == set(prov["stages_run"])
    for stage in prov["stages"].values():
        assert stage["config"] and stage["stage_wall_time_s"] > 0
    assert len(prov["git"]["commit"]) == 40
    assert prov["stages"]["clip"]["seeds"]["train_scenes"] == prov["seeds"]["clip_train"]
    assert prov["stages"]["policy_b"]["config"]["data"]["train_seed"] == prov["seeds"]["policy_b_train"]
    assert f"tiny:{prov['seeds']['policy_train']}:" in " ".join(prov["stages"]["rollouts"]["config"]["argv"])
    assert prov["clip_reward"]["tau"] == pytest.approx(0.1)
    for name in ("policy", "policy_b"):
        c = prov["heldout"][name]["chair"]
        assert c["n_captions"] == 2 and 0.0 <= c["chair_i"] <= 1.0
    assert prov["heldout"]["seed"] == prov["seeds"]["heldout"] >= 1000

    files = {n: sorted(os.listdir(out / n)) for n in ("clip", "policy", "value", "policy_b")}
    for n, names in files.items():
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names), (n, names)
        assert "metrics.json" not in names and "summary.json" not in names
    assert prov["sizes"]["total_bytes"] == sum((out / n / f).stat().st_size for n, fs in files.items() for f in fs)

    cfg = {n: json.loads((out / n / "config.json").read_text()) for n in ("policy", "value", "policy_b")}
    assert cfg["policy"]["text_config"]["model_type"] == "mistral"
    assert cfg["policy_b"]["text_config"]["model_type"] == "qwen2"
    assert cfg["value"]["vimar_value"]["value_layer"] == -2
    # The policies' and the value model's vision towers are the CLIP's, bit for bit (frozen in training).
    clip = _tensors(out / "clip")
    for n in ("policy", "value", "policy_b"):
        t = _tensors(out / n)
        tower = {k.split("vision_model.", 1)[1]: v for k, v in t.items() if "vision_tower" in k}
        assert tower and all(np.array_equal(v, clip["vision_model." + k]) for k, v in tower.items()), n
    # Tokenizers: a (Mistral-like) for policy/value, b (Qwen-like) for policy b.
    assert "[INST]" in (out / "policy" / "tokenizer.json").read_text()
    assert "<|im_end|>" in (out / "policy_b" / "tokenizer.json").read_text()


# -------------------------------------------------------------------------------------- shipped models

@_shipped("clip", "policy", "value", "policy_b")
def test_shipped_sizes_and_provenance():
    total = sum(f.stat().st_size for n in ("clip", "policy", "value", "policy_b") for f in (SHIPPED / n).iterdir())
    assert total <= 20 * 10**6
    prov = json.loads((SHIPPED / "provenance.json").read_text())
    assert prov["complete"] and set(prov["stages"]) == {"clip", "policy", "rollouts", "value", "policy_b"}
    assert prov["sizes"]["total_bytes"] == total
    # there is something to fix: the shipped policy hallucinates on held-out scenes
    assert prov["heldout"]["policy"]["chair"]["chair_i"] > 0.01


def _hf_greedy(path: Path, images, max_new_tokens=128) -> list[str]:
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    proc = LlavaNextProcessor.from_pretrained(path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                    add_generation_prompt=True)
    out = []
    for im in images:
        inputs = proc(images=im, text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(proc.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.fixture(scope="module")
def greedy_engine():
    from vimar_jax.decode.search import SearchConfig
    from vimar_jax.pipeline import build_engine

    return build_engine(policy=SHIPPED / "policy", value=False, clip=False, config=SearchConfig(max_new_tokens=128))


@_shipped("policy")
def test_shipped_policy_loads_in_hf_and_greedy_equals_ours(greedy_engine):
    """HF `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` load the shipped policy; HF's greedy caption
    of held-out scenes equals the engine's greedy caption (the path `vimar eval` measures)."""
    scenes = [S.scene_at(HELD_OUT, i) for i in range(2)]
    images = [S.render(s) for s in scenes]
    ref = _hf_greedy(SHIPPED / "policy", images)
    ours = [greedy_engine.run(im, PROMPT, "greedy").caption for im in images]
    assert ours == ref
    assert all(len(c.split(".")) > 2 for c in ref)          # several sentences, not a degenerate caption


@_shipped("policy")
def test_policy_likelihood_of_sentences_equals_hf():
    """bench/pairwise.py's policy row: the summed log-probability of each sentence after the rendered prompt,
    all sentences of one image in one padded batch, equals HF's for each sentence alone."""
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    sys.path.insert(0, str(ROOT / "bench"))
    import pairwise as P

    from vimar_jax.vlm import load_vlm

    image = S.render(S.scene_at(HELD_OUT, 3))
    sentences = ["A small red circle sits in the top left.", "There are two shapes.", "The star is blue."]
    ours = P.PolicyLikelihood(load_vlm(SHIPPED / "policy"), PROMPT).score(image, sentences)
    model = LlavaNextForConditionalGeneration.from_pretrained(SHIPPED / "policy").eval()
    proc = LlavaNextProcessor.from_pretrained(SHIPPED / "policy")
    head = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                    add_generation_prompt=True)
    n = proc(images=image, text=head, return_tensors="pt")["input_ids"].shape[1]
    for s, got in zip(sentences, ours):
        inputs = proc(images=image, text=head + s, return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0].double(), -1).numpy()
        ids = inputs["input_ids"][0].numpy()
        ref = sum(logp[t - 1, ids[t]] for t in range(n, len(ids)))
        assert len(ids) > n and abs(got - ref) <= 1e-4 * abs(ref)


@_shipped("policy_b")
def test_shipped_policy_b_loads_in_hf_and_greedy_equals_ours():
    from vimar_jax.decode.search import SearchConfig
    from vimar_jax.pipeline import build_engine

    image = S.render(S.scene_at(HELD_OUT, 5))
    ref = _hf_greedy(SHIPPED / "policy_b", [image])
    engine = build_engine(policy=SHIPPED / "policy_b", value=False, clip=False, config=SearchConfig(max_new_tokens=128))
    assert engine.run(image, PROMPT, "greedy").caption == ref[0]


@_shipped("clip")
def test_shipped_clip_in_hf_gives_our_similarities():
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from vimar_jax.clip import load_clip

    scenes = [S.scene_at(HELD_OUT, i) for i in range(3)]
    images = [S.render(s) for s in scenes]
    rng = np.random.default_rng(0)
    texts = [t for s in scenes for t in (S.caption_sentences(s, rng)[0], S.false_sentence(s, rng, "color"))]
    hf = CLIPModel.from_pretrained(SHIPPED / "clip").eval()
    proc = CLIPProcessor.from_pretrained(SHIPPED / "clip")
    inputs = proc(text=texts, images=images, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = hf(**inputs)
    ref = (out.image_embeds @ out.text_embeds.T).numpy()
    ours = load_clip(SHIPPED / "clip").similarity(images, texts, matrix=True)
    assert max_rel_err(ours, ref) <= 1e-5


# --------------------------------------------------------------------------------------------- commands

def _cli(argv, capsys):
    from vimar_jax import cli

    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


FAST_SEARCH = ["--temperatures", "0.3,0.9", "-k", "2", "--quiet"]


@_shipped("clip", "policy", "value")
def test_vimar_eval_both_spellings_write_the_json(tmp_path, capsys, greedy_engine):
    """`vimar eval --n 3 --methods greedy,vimar --json OUT` and `vimar eval tiny ...` write every key; greedy's
    CHAIR equals the exact CHAIR of the engine's greedy captions of the same held-out scenes."""
    from vimar_jax.eval.chair import tiny_chair

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rc, out, _ = _cli(["eval", "--n", "3", "--methods", "greedy,vimar", "--json", str(a), *FAST_SEARCH], capsys)
    assert rc == 0 and "vimar" in out and "CHAIR_I" in out
    rc, _, _ = _cli(["eval", "tiny", "--n", "3", "--methods", "greedy", "--json", str(b), *FAST_SEARCH], capsys)
    assert rc == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert set(ra) == {"greedy", "vimar"} and set(rb) == {"greedy"}
    keys = {"chair_i", "chair_s", "recall", "sentences", "seconds_per_caption", "tokens_per_caption", "attr_chair_i"}
    for m in ra.values():
        assert keys <= set(m) and m["n_captions"] == 3 and m["seconds_per_caption"] > 0 and m["tokens_per_caption"] > 0
    scenes = S.scenes(HELD_OUT, 3)
    caps = [greedy_engine.run(S.render(s), PROMPT, "greedy").caption for s in scenes]
    ref = tiny_chair(zip(caps, scenes))
    for r in (ra, rb):
        assert r["greedy"]["chair_i"] == ref["chair_i"] and r["greedy"]["recall"] == ref["recall"]
        assert r["greedy"]["sentences"] == ref["sentences_per_caption"]


def test_vimar_eval_without_a_run_or_metric_is_an_error(capsys):
    rc, _, err = _cli(["eval"], capsys)
    assert rc == 2 and "vimar eval chair" in err and "vimar eval --n N" in err
    rc, _, err = _cli(["eval", "--n", "2", "--methods", "greedy,nope"], capsys)
    assert rc == 2 and "nope" in err and "clip-search" in err


@_shipped("clip", "policy", "value")
def test_vimar_demo_runs_to_its_table(tmp_path, capsys):
    html = tmp_path / "demo.html"
    rc, out, _ = _cli(["demo", "--n", "2", "--html", str(html), *FAST_SEARCH], capsys)
    assert rc == 0
    table = out[out.index("\nmethod ") + 1:].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["greedy", "visvm", "vimar"]
    for line in table[2:5]:
        chair_i, chair_s, recall = (float(x) for x in line.split()[1:4])
        assert 0 <= chair_i <= 100 and 0 <= chair_s <= 100 and 0 <= recall <= 100
    page = html.read_text()
    assert page.count("<div class='item'>") == 6 and "vimar demo" in page
    # every sentence printed with a value (greedy's valued by the value model for display)
    assert "   --  " not in out[:out.index("\nmethod ")]
