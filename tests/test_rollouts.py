"""Rollout generation (train/gen_rollouts.py): tiny random policy + tiny random CLIP over tiny-world scenes, an
image folder with a corrupt and a missing image, and a JSON-lines file with ground truth; transition records
read back through grain; resume skips finished shards and rewrites a partial one; rewards from δ and τ."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
S = 28                      # vision image size of the tiny models (patch 14: 2 x 2 patches per view)
PINPOINTS = "1x2,2x1,2x2"


# ---------------------------------------------------------------------------------------- tiny models

def make_policy_dir(path, *, seed: int = 0, layers: int = 2, hidden: int = 64, period_logit: float = 25.0) -> str:
    """A random tiny LLaVA-NeXT policy as an HF directory (save_pretrained) with the tiny tokenizer "a",
    its chat template and LLaVA-NeXT image processor files.

    So that a random model still writes sentences, hidden dimension 0 of the residual stream is a constant
    (set by the embeddings and the projector bias, never written by a layer) and the LM head reads it into
    the logits of '.' (`period_logit`) and EOS (half of it)."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    sys.path.insert(0, str(ROOT / "train"))
    import train_sft  # noqa: E402  (write_assets / parse_pinpoints: the policy directory layout)

    path = str(path)
    os.makedirs(path, exist_ok=True)
    train_sft.write_assets(path, variant="a", image_size=S, patch_size=14,
                           pinpoints=train_sft.parse_pinpoints(PINPOINTS, S))
    from vimar_jax.processor import Processor

    tok = Processor.from_dir(path).tokenizer
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, image_size=S, patch_size=14, projection_dim=16, hidden_act="quick_gelu")
    text = dict(model_type="mistral", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, vocab_size=tok.vocab_size,
                sliding_window=None, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                          image_grid_pinpoints=train_sft.parse_pinpoints(PINPOINTS, S), vision_feature_layer=-2,
                          tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_scale else 0.3 * noise)
        lm = model.model.language_model
        lm.embed_tokens.weight[:, 0] = 1.0
        model.model.multi_modal_projector.linear_2.weight[0] = 0.0
        model.model.multi_modal_projector.linear_2.bias[0] = 1.0
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.token_to_id("."), 0] = period_logit
        model.lm_head.weight[tok.eos_token_id, 0] = period_logit / 2
    model.save_pretrained(path)
    return path


def make_clip_dir(path, *, seed: int = 0) -> str:
    """A random tiny CLIP as an HF directory with the tiny CLIP tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from vimar_jax.data import clip_data

    path = str(path)
    ids = clip_data.special_token_ids()
    text = dict(vocab_size=len(clip_data.clip_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=clip_data.MAX_LENGTH, bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"], hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=S,
                  patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    clip_data.save_clip_tokenizer(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(clip_data.image_processor_config(S), f)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_policy_dir(root / "policy"), make_clip_dir(root / "clip")


# ------------------------------------------------------------------------------------------------ helpers

def run_rollouts(models, out, source, *extra):
    sys.path.insert(0, str(ROOT / "train"))
    import gen_rollouts

    policy, clip = models
    argv = ["--policy", policy, "--clip", clip, "--source", source, "--out", str(out), "--max-new-tokens", "32",
            "--progress", "off", *extra]
    assert gen_rollouts.main(argv) == 0


def records_by_grain(out):
    """Every record of a rollout directory read through a grain MapDataset over `TransitionSource`."""
    import grain

    from vimar_jax.data.transitions import TransitionSource

    src = TransitionSource(str(out))
    return list(grain.MapDataset.source(src)), src


def shard_files(out):
    return sorted(p for p in os.listdir(out) if p.startswith("transitions-"))


@pytest.fixture(scope="module")
def tiny_rollouts(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_rollouts") / "out"
    run_rollouts(models, out, "tiny:7:3", "--shards", "2", "--tau", "p17", "--seed", "3")
    return out


# -------------------------------------------------------------------------------------------------- tests

def test_tiny_rollouts_records_and_rewards(models, tiny_rollouts):
    """Records read back through grain: every group has the greedy + 4 sampled trajectories (those with a
    sentence) and the ground-truth one; δ equals CLIP cosine computed here; τ = P17 of all rollout δ;
    rewards are the margin reward (0.27 for ground truth)."""
    from vimar_jax import text as text_lib
    from vimar_jax.clip import load_clip
    from vimar_jax.data import scenes as S
    from vimar_jax.data import sources, transitions as tr

    recs, src = records_by_grain(tiny_rollouts)
    manifest = tr.read_manifest(str(tiny_rollouts))
    c = manifest["counts"]
    assert len(recs) == c["records"] == c["sentences"] > 0
    assert c["images"] == 3 and c["skipped_images"] == 0 and c["groups"] == 3
    assert set(shard_files(tiny_rollouts)) == {"transitions-00000-of-00002.array_record",
                                               "transitions-00000-of-00002.json",
                                               "transitions-00001-of-00002.array_record",
                                               "transitions-00001-of-00002.json"}
    # Ground truth: the scene's true caption, split into sentences, reward 0.27, temperature -1.
    for i in range(3):
        gt = [r for r in recs if r["group"] == str(i) and r["gt"]]
        caption = S.caption(S.scene_at(7, i), np.random.default_rng([7, i, 53]), "detail")
        assert [r["text"] for r in gt] == text_lib.split_sentences(caption)
        assert all(r["reward"] == pytest.approx(0.27) and r["temperature"] == -1.0 and r["traj"] == 5 for r in gt)
        assert [r["done"] for r in gt] == [False] * (len(gt) - 1) + [True]
        assert all(r["image"] == f"tiny:7:{i}" for r in recs if r["group"] == str(i))
    sampled = [r for r in recs if not r["gt"]]
    assert sampled, "the tiny random policy wrote no sentence"
    assert {r["temperature"] for r in sampled} <= {0.0, 0.2, 0.4, 0.6, 0.8}
    # δ: recomputed with CLIP from the image reference and the sentence text.
    clip = load_clip(models[1])
    for r in recs[:12]:
        img = sources.open_image(r["image"])
        want = float(clip.embed_images([img])[0] @ clip.embed_texts([r["text"]])[0])
        assert r["delta"] == pytest.approx(want, abs=2e-5)
    # τ resolved over all rollout δ (ground truth excluded), rewards = margin(δ, τ).
    tau = float(np.percentile([r["delta"] for r in sampled], 17))
    assert manifest["reward"]["tau"] == pytest.approx(tau, abs=1e-6) and manifest["reward"]["tau_spec"] == "p17"
    for r in sampled:
        want = r["delta"] if r["delta"] >= tau else r["delta"] - tau
        assert r["reward"] == pytest.approx(want, abs=1e-6)
    assert manifest["delta_stats"]["count"] == len(sampled)
    assert manifest["delta_stats"]["mean"] == pytest.approx(np.mean([r["delta"] for r in sampled]), abs=1e-6)


def test_rollouts_equal_one_generate_call(models, tiny_rollouts):
    """The sampled trajectories of an image are the sentences of one batched `generate` call (5 candidates,
    one prompt prefill) with the image's seed; spans index its tokens."""
    from vimar_jax.data import sources
    from vimar_jax.decode.generate import generate
    from vimar_jax.vlm import load_vlm

    recs, _ = records_by_grain(tiny_rollouts)
    item = sources.tiny_source(7, 3).items[1]
    vlm = load_vlm(models[0])
    proc = vlm.processor
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": item.prompt}]}],
                                    add_generation_prompt=True)
    enc = proc(images=[item.load()], texts=[text])   # BOS added: the template does not write it
    gen = generate(vlm, enc["input_ids"], enc["pixel_values"], enc["image_sizes"], enc["attention_mask"],
                   max_new_tokens=32, temperature=[0, 0.2, 0.4, 0.6, 0.8], top_p=0.9, num_candidates=5,
                   seed=(3 * 1_000_003 + 1) % (2**31 - 1))
    for r in range(5):
        ids = gen.tokens[r, :gen.lengths[r]]
        want = [proc.tokenizer.decode(ids[a:b]).strip() for a, b in gen.sentence_spans(r)]
        got = [x for x in recs if x["group"] == "1" and x["traj"] == r]
        assert [x["text"] for x in got] == [w for w in want if w]
        for x in got:
            assert proc.tokenizer.decode(ids[x["span"][0]:x["span"][1]]).strip() == x["text"]


def test_counterfactual_trajectories(models, tiny_rollouts, tmp_path):
    """`--counterfactuals 2`: the sampled and ground-truth trajectories are those of the same run without
    them; each counterfactual trajectory is one of those (ground truth included) from a sentence on, that
    sentence with one colour, shape or position phrase replaced; it is not ground truth and its δ is the
    CLIP's; τ and the δ statistics ignore it, also when train_value resolves τ as a percentile itself."""
    sys.path.insert(0, str(ROOT / "train"))
    import train_value

    from vimar_jax.clip import load_clip
    from vimar_jax.data import scenes as S
    from vimar_jax.data import sources, transitions as tr
    from vimar_jax.data.packing import StateTemplate

    out = tmp_path / "cf"
    run_rollouts(models, out, "tiny:7:3", "--shards", "2", "--tau", "p17", "--seed", "3", "--counterfactuals", "2")
    base, _ = records_by_grain(tiny_rollouts)
    recs, _ = records_by_grain(out)
    cf_ids = {(g["group"], t["traj"]) for p in tr.shard_paths(str(out)) for g in tr.read_shard_index(p)["groups"]
              for t in g["trajectories"] if t.get("counterfactual")}
    own = [r for r in recs if (r["group"], r["traj"]) not in cf_ids]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("delta", "reward")}   # noqa: E731
    assert [drop(r) for r in own] == [drop(r) for r in base]   # δ: the text batch is larger, so ~1e-7 apart
    np.testing.assert_allclose([r["delta"] for r in own], [r["delta"] for r in base], atol=1e-5)
    m0, m1 = tr.read_manifest(str(tiny_rollouts)), tr.read_manifest(str(out))
    assert m1["reward"]["tau"] == pytest.approx(m0["reward"]["tau"], abs=1e-5)
    assert m1["delta_stats"]["count"] == m0["delta_stats"]["count"]
    assert m1["counts"]["counterfactual_trajectories"] == len(cf_ids) > 0
    assert m1["settings"]["counterfactuals"] == 2

    def trajectories(rs):
        t: dict = {}
        for r in rs:
            t.setdefault((r["group"], r["traj"]), []).append(r)
        return t

    by = trajectories(recs)
    sampled = {k: v for k, v in by.items() if k not in cf_ids}
    per_source = {}
    lexicon = set(S.COLORS) | set(S.SHAPES) | set(S.PLURALS.values())
    clip = load_clip(models[1])
    for key in sorted(cf_ids):
        cf = [r["text"] for r in by[key]]
        assert not by[key][0]["gt"] and by[key][-1]["done"]
        hits = [(k, len(v) - len(cf)) for k, v in sampled.items() if k[0] == key[0] and len(v) >= len(cf)
                and [r["text"] for r in v[len(v) - len(cf) + 1:]] == cf[1:]
                and by[key][0]["temperature"] == v[0]["temperature"]]
        assert hits, cf
        src, i = hits[0]
        original = sampled[src][i]["text"]
        per_source[src] = per_source.get(src, 0) + 1
        a, b = original.split(), cf[0].split()
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert cf[0] != original
        if len(a) == len(b) and len(changed) <= 2:   # a colour (and its article) or a shape
            assert any(x.lower().strip(".,") in lexicon for x, _ in changed), (original, cf[0])
        img = sources.open_image(by[key][0]["image"])
        want = float(clip.embed_images([img])[0] @ clip.embed_texts([cf[0]])[0])
        assert by[key][0]["delta"] == pytest.approx(want, abs=2e-5)
    assert max(per_source.values()) <= 2
    assert any(sampled[k][0]["gt"] for k in per_source) and any(not sampled[k][0]["gt"] for k in per_source)
    template = StateTemplate.from_dir(models[0])
    _, cfg, _, _ = train_value._read_groups(str(out), template, {"tau": "p17", "alpha": None, "variant": "manifest",
                                                                  "ground_truth_reward": None})
    assert cfg.tau == pytest.approx(m1["reward"]["tau"], abs=1e-6)


def test_rerun_skips_finished_shards_and_rewrites_partial(models, tiny_rollouts, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_rollouts, out)
    before = {f: (out / f).read_bytes() for f in shard_files(out)}
    # Shard 1 "died": no index, no records, only a stale partial file.
    for f in ("transitions-00001-of-00002.json", "transitions-00001-of-00002.array_record", "manifest.json"):
        os.remove(out / f)
    (out / "transitions-00001-of-00002.array_record.partial").write_bytes(b"torn")
    mtime0 = os.stat(out / "transitions-00000-of-00002.array_record").st_mtime_ns
    capsys.readouterr()
    run_rollouts(models, out, "tiny:7:3", "--shards", "2", "--tau", "p17", "--seed", "3")
    err = capsys.readouterr().err
    assert "1 finished shard(s) skipped" in err
    assert os.stat(out / "transitions-00000-of-00002.array_record").st_mtime_ns == mtime0
    assert not (out / "transitions-00001-of-00002.array_record.partial").exists()
    after = {f: (out / f).read_bytes() for f in shard_files(out)}
    assert after["transitions-00001-of-00002.array_record"] == before["transitions-00001-of-00002.array_record"]
    # A complete directory: everything skipped, nothing regenerated.
    capsys.readouterr()
    run_rollouts(models, out, "tiny:7:3", "--shards", "2", "--tau", "p17", "--seed", "3")
    assert "2 finished shard(s) skipped" in capsys.readouterr().err
    # Other settings on the same directory are refused, naming the setting.
    with pytest.raises(SystemExit, match="temperatures"):
        run_rollouts(models, out, "tiny:7:3", "--shards", "2", "--tau", "p17", "--seed", "3",
                     "--temperatures", "0,0.5")


def test_folder_and_jsonl_with_bad_images(models, tmp_path, capsys):
    """A corrupt file and a dangling link in an image folder, a missing file in a JSON-lines source: each is
    reported by name, skipped and counted; the good images are rolled out (the jsonl one with its caption)."""
    from vimar_jax.data import scenes as S
    from vimar_jax.data import transitions as tr

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    S.render(S.scene_at(9, 0)).save(folder / "a.png")
    S.render(S.scene_at(9, 1)).save(folder / "sub" / "b.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    os.symlink(folder / "gone.png", folder / "missing.png")
    capsys.readouterr()
    out = tmp_path / "out_folder"
    run_rollouts(models, out, f"folder:{folder}", "--shards", "3")
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "missing.png" in err
    m = tr.read_manifest(str(out))
    assert m["counts"]["images"] == 2 and m["counts"]["skipped_images"] == 2
    assert sorted(os.path.basename(s["name"]) for s in m["skipped"]) == ["corrupt.jpg", "missing.png"]
    recs, _ = records_by_grain(out)
    assert {r["image"] for r in recs} <= {"a.png", os.path.join("sub", "b.jpg")}
    assert not any(r["gt"] for r in recs)

    lines = [{"image": str(folder / "a.png"), "caption": "There is a red star. It is large."},
             {"image": "nowhere.png", "prompt": "Describe the shapes in this picture and where they are."}]
    jl = tmp_path / "items.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out2 = tmp_path / "out_jsonl"
    capsys.readouterr()
    run_rollouts(models, out2, f"jsonl:{jl}")
    assert "nowhere.png" in capsys.readouterr().err
    m2 = tr.read_manifest(str(out2))
    assert m2["counts"]["images"] == 1 and m2["counts"]["skipped_images"] == 1
    recs2, _ = records_by_grain(out2)
    assert [r["text"] for r in recs2 if r["gt"]] == ["There is a red star.", "It is large."]


def test_record_schema_errors_name_the_field(tmp_path):
    from vimar_jax.data import transitions as tr

    good = tr.trajectory_records(image="x.png", image_hw=[10, 20], prompt="p", group="0", traj=0, temperature=0.0,
                                 gt=False, sentences=["A b.", "C d."], spans=[[0, 3], [3, 6]], deltas=[0.1, 0.2])
    assert [r["done"] for r in good] == [False, True]
    bad = dict(good[0])
    del bad["delta"]
    with pytest.raises(tr.RecordError, match="delta"):
        tr.encode(bad)
    with pytest.raises(tr.RecordError, match="span"):
        tr.encode({**good[0], "span": [1]})
    with pytest.raises(tr.RecordError, match="done"):
        tr.encode({**good[0], "done": True})
    with pytest.raises(FileNotFoundError, match="no transitions"):
        tr.shard_paths(str(tmp_path))
    w = tr.ShardWriter(str(tmp_path), 0, 2)
    w.write(good[0])
    w.commit({"groups": []})
    with pytest.raises(ValueError, match="not finished"):
        tr.shard_paths(str(tmp_path))


def test_coco_source_from_a_tfds_style_data_source():
    """COCO records as `tfds.data_source` returns them: decoded uint8 image, reference captions as bytes."""
    from vimar_jax.data import sources

    rng = np.random.default_rng(0)
    recs = [{"image": rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "image/filename": b"0001.jpg",
             "captions": {"id": np.array([1, 2]), "text": np.array([b"A cat on a mat", b"  a sleeping cat. "])}},
            {"image": np.zeros((5, 5, 4), np.uint8), "image/filename": b"bad.jpg", "captions": {"text": []}}]
    src = sources.coco_source("/unused", "val", data_source=recs, prompts="Describe.")
    assert [it.ref for it in src.items] == ["coco:val:0", "coco:val:1"]
    assert src.items[0].ground_truth() == "A cat on a mat. a sleeping cat."
    assert np.array_equal(np.asarray(src.items[0].load()), recs[0]["image"])
    with pytest.raises(sources.ImageError, match="coco:val:1"):
        src.items[1].load()
    assert np.array_equal(np.asarray(sources.open_image("coco:val:0", coco_source=recs)), recs[0]["image"])
    with pytest.raises(ValueError, match="unknown kind"):
        sources.parse_source("ftp:somewhere")


def test_step_states_are_clip_advantages_of_the_step_search_candidates(tmp_path, capsys):
    """train/gen_step_states.py with the shipped tiny policy and CLIP: each step's distinct candidates, δ stored
    as (CLIP δ − the step's mean) · one scale that gives the advantages the target spread; the step search's
    caption takes, at each step, the candidate with the highest stored advantage; bad inputs are clear errors."""
    sys.path.insert(0, str(ROOT / "train"))
    import gen_step_states

    from vimar_jax import pipeline
    from vimar_jax.data import scenes as sc
    from vimar_jax.data import transitions as tr
    from vimar_jax.decode.search import SearchConfig

    policy, clip = str(pipeline.default_dir("policy")), str(pipeline.default_dir("clip"))
    out = tmp_path / "steps"
    argv = ["--policy", policy, "--clip", clip, "--source", "tiny:2:2", "--out", str(out),
            "--temperatures", "0.5,1.0", "-k", "3", "--target-std", "0.4"]
    assert gen_step_states.main(argv) == 0
    records = [r for path in tr.shard_paths(str(out)) for r in tr.read_shard(path)]
    manifest = tr.read_manifest(str(out))
    scale = manifest["settings"]["step_states"]["scale"]
    assert manifest["counts"]["records"] == len(records) > 0
    assert all(r["done"] and r["num_sentences"] == 1 for r in records)
    assert len({r["traj"] for r in records}) == len(records)
    assert np.std([r["delta"] for r in records]) == pytest.approx(0.4, rel=1e-6)

    engine = pipeline.build_engine(policy=policy, value=False, clip=clip,
                                   config=SearchConfig(temperatures=(0.5, 1.0), samples_per_temperature=3))
    steps: dict[str, list[dict]] = {}
    for r in records:
        steps.setdefault(r["group"], []).append(r)
    for i in range(2):
        image = sc.render(sc.scene_at(2, i))
        ctx = engine.clip.begin(image)
        caption = engine.run(image, records[0]["prompt"], "clip-search").sentences
        mine = sorted((g for g in steps if g.startswith(f"{i}/")), key=lambda g: int(g.split("/")[1]))
        assert mine, f"no step of image {i} was kept"
        for g in mine:
            texts = [r["text"] for r in steps[g]]
            assert len(set(texts)) == len(texts) >= 2
            delta = np.asarray(engine.clip.score(ctx, texts), np.float64)
            np.testing.assert_allclose([r["delta"] for r in steps[g]], (delta - delta.mean()) * scale, atol=1e-4)
            step = int(g.split("/")[1])
            best = max(steps[g], key=lambda r: r["delta"])["text"]
            assert caption[step].text == best

    capsys.readouterr()
    assert gen_step_states.main(argv) == 2
    assert "already holds transitions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen_step_states.main([*argv[:5], "tiny:1003:2", "--out", str(tmp_path / "x")])
    assert "tiny seed 1003 is the claims' held-out stream, kept for evaluation" in capsys.readouterr().err
    assert gen_step_states.main(["--policy", policy, "--clip", "/nonexistent-clip", "--source", "tiny:2:1",
                                 "--out", str(tmp_path / "y")]) == 2
    assert "--clip /nonexistent-clip has no config.json" in capsys.readouterr().err
