"""train/train_sft.py and vimar_jax/data/sft_data.py on a tiny config.

One from-scratch run (around a random HF CLIP) on a fixed batch is shared by most tests: its loss must fall,
its vision tower must equal the CLIP's, its HF export must load in transformers with equal logits. Labels
and the loss are checked against HF's own tokenization and a hand computation from full logits; the
self-training path runs through the CLI on a `vimar caption --json` file with a missing and a corrupt image.
"""

import json
import os
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import CLIPConfig, CLIPModel, LlavaNextForConditionalGeneration, LlavaNextProcessor

from configs import tiny_policy
from tests.helpers import max_rel_err
from train import train_sft as T
from vimar_jax.data import scenes as S
from vimar_jax.data import sft_data
from vimar_jax.processor import Processor
from vimar_jax.vlm import VLM

TOL = 1e-5
BUCKET = 160
MAX_LABELS = 48


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random HF CLIP with a 32 px / patch 8 vision tower (16 patch tokens + CLS per view)."""
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16)
    model = CLIPModel(cfg)
    with torch.no_grad():  # non-trivial values everywhere
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(d)
    return str(d)


def small_config(**data):
    c = tiny_policy.get_config()
    c.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                   pinpoints="1x2,2x1,2x2")
    # num_scenes == batch_size: every batch holds the same four records (a fixed batch, reshuffled).
    c.data.update(dict(num_scenes=4, variants=1, caption_styles="short:1", length_buckets=(BUCKET,),
                       max_label_tokens=MAX_LABELS), **data)
    c.update(dict(total_steps=6, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=100,
                  async_checkpointing=False))
    c.mesh.data = 1
    c.eval.enabled = False
    return c


@pytest.fixture(scope="module")
def trained(clip_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sft")
    cfg = small_config()
    cfg.clip = clip_dir
    state, summary = T.train_sft(cfg, str(wd))
    return types.SimpleNamespace(state=state, summary=summary, hf=str(wd / "hf"), workdir=str(wd))


def scene_images(seed, n):
    return [S.render(s) for s in S.scenes(seed, n)]


def user(prompt):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# ------------------------------------------------------------------------------------------ training run

def test_loss_falls_on_a_fixed_batch(trained):
    curve = [r["loss"] for r in trained.summary["train"]["curve"]]
    assert len(curve) == 6 and all(np.isfinite(curve))
    assert all(b < a for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < 0.85 * curve[0], curve
    acc = [r["token_acc"] for r in trained.summary["train"]["curve"]]
    assert acc[-1] > acc[0]


def test_vision_tower_is_frozen_and_exported_unchanged(trained, clip_dir):
    clip = load_file(os.path.join(clip_dir, "model.safetensors"))
    ours = load_file(os.path.join(trained.hf, "model.safetensors"))
    # The tower is kept up to the feature layer (-2): the CLIP's last layer never reaches the policy.
    with open(os.path.join(clip_dir, "config.json")) as f:
        n_clip = json.load(f)["vision_config"]["num_hidden_layers"]
    with open(os.path.join(trained.hf, "config.json")) as f:
        hf = json.load(f)
    assert hf["vision_config"]["num_hidden_layers"] == n_clip - 1 and hf["vision_feature_layer"] == -1
    dropped = f"encoder.layers.{n_clip - 1}."
    vision = {k[len("vision_model."):]: v for k, v in clip.items()
              if k.startswith("vision_model.") and dropped not in k}
    exported = {k[len("vision_tower.vision_model."):]: v for k, v in ours.items()
                if k.startswith("vision_tower.vision_model.")}
    assert vision.keys() == exported.keys() and len(vision) > 10
    for k in vision:
        np.testing.assert_array_equal(exported[k], vision[k], err_msg=k)
    # ... while the trained parts moved away from their initialisation (norm scales start at exactly 1)
    norm = ours["language_model.model.norm.weight"]
    assert np.abs(norm - 1).max() > 1e-3


def test_export_loads_in_hf_with_equal_logits(trained):
    proc = LlavaNextProcessor.from_pretrained(trained.hf)
    hf, info = LlavaNextForConditionalGeneration.from_pretrained(trained.hf, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    images = scene_images(7, 3)
    assert len({im.size for im in images}) == 3
    prompts = ["Describe this image in detail.", "Write a detailed caption for this image.",
               "Tell me everything you see in the image."]
    texts = [proc.apply_chat_template([user(p)], add_generation_prompt=True) for p in prompts]
    texts[1] = proc.apply_chat_template([user(prompts[1]), assistant("There is a red circle.")])
    inputs = proc(images=images, text=texts, padding=True, return_tensors="np")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # padded rows
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    ours = VLM(trained.state.model(), json.load(open(os.path.join(trained.hf, "config.json"))))
    got = np.asarray(ours.logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                 inputs["attention_mask"]))
    mask = inputs["attention_mask"].astype(bool)
    assert max_rel_err(got[mask], ref[mask]) <= TOL


# ------------------------------------------------------------------------------------------ labels, loss

def test_labels_match_hf_tokenization_and_loss_is_hand_computed(trained):
    hf_proc = LlavaNextProcessor.from_pretrained(trained.hf)
    enc = sft_data.Encoder(Processor.from_dir(trained.hf), max_length=BUCKET, max_label_tokens=MAX_LABELS)
    images = scene_images(11, 2)
    prompts = ["Describe this image in detail.", "What do you see in this image? Describe it in detail."]
    captions = ["There is a small red circle in the center. The image contains one shape.",
                "A large blue star is at the top left."]
    items = [enc(sft_data.Example(im, p, c)) for im, p, c in zip(images, prompts, captions)]
    batch = sft_data.collate(items, length_buckets=(BUCKET,), max_label_tokens=MAX_LABELS, pad_id=enc.pad_id,
                             image_config=enc.processor.image_config, image_token_id=enc.processor.image_token_id)
    eos = hf_proc.tokenizer.eos_token_id
    spans = []
    for b, (im, p, c) in enumerate(zip(images, prompts, captions)):
        full = hf_proc.apply_chat_template([user(p), assistant(c)])
        head = hf_proc.apply_chat_template([user(p)], add_generation_prompt=True)
        ref_ids = hf_proc(images=[im], text=[full], return_tensors="np")["input_ids"][0]
        n_prompt = len(hf_proc(images=[im], text=[head], return_tensors="np")["input_ids"][0])
        np.testing.assert_array_equal(items[b]["input_ids"], ref_ids)
        assert ref_ids[-1] == eos and items[b]["label_start"] == n_prompt
        n_lab = len(ref_ids) - n_prompt
        np.testing.assert_array_equal(batch["label_ids"][b, :n_lab], ref_ids[n_prompt:])
        assert batch["label_mask"][b].sum() == n_lab and (batch["label_mask"][b, n_lab:] == 0).all()
        assert hf_proc.tokenizer.decode(ref_ids[n_prompt:-1]).strip() == c
        spans.append((n_prompt, len(ref_ids)))

    model = trained.state.model()
    loss, aux = jax.jit(T.sft_loss)(model, batch)
    hidden, _ = model(batch["input_ids"], batch["pixel_values"], None, sft_data.model_gather_index(model, batch))
    logits = np.asarray(model.logits(hidden), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ids = batch["input_ids"]
    nll, hits = [], []
    for b, (start, end) in enumerate(spans):
        for t in range(start, end):  # caption tokens and EOS, each predicted from the previous position
            nll.append(-logp[b, t - 1, ids[b, t]])
            hits.append(np.argmax(logits[b, t - 1]) == ids[b, t])
    assert abs(float(loss) - np.mean(nll)) <= TOL * np.mean(nll)
    assert abs(float(aux["token_acc"]) - np.mean(hits)) <= 1e-6
    assert float(aux["weight"]) == len(nll)
    # the prompt/image positions' own loss is different: including them would have changed the value
    prompt_nll = np.mean([-logp[0, t - 1, ids[0, t]] for t in range(1, spans[0][0])])
    assert abs(prompt_nll - np.mean(nll)) > 1e-3
    # Each row alone (a micro-batch of gradient accumulation, or one host's share) gives that row's loss:
    # the gather index is row-local, so a slice of the batch still reads its own image's features.
    for b in range(len(captions)):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        row_loss, row_aux = jax.jit(T.sft_loss)(model, row)
        n_b = spans[b][1] - spans[b][0]
        row_nll = nll[sum(s[1] - s[0] for s in spans[:b]):][:n_b]
        assert float(row_aux["weight"]) == n_b
        assert abs(float(row_loss) - np.mean(row_nll)) <= TOL * np.mean(row_nll)


def test_long_captions_are_truncated_and_bad_templates_rejected(trained):
    proc = Processor.from_dir(trained.hf)
    enc = sft_data.Encoder(proc, max_length=BUCKET, max_label_tokens=5)
    item = enc(sft_data.Example(scene_images(3, 1)[0], "Describe this image in detail.",
                                "There is a small red circle in the center."))
    assert item["truncated"] and len(item["input_ids"]) - item["label_start"] == 5
    proc.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="caption once"):
        sft_data.Encoder(proc, max_length=BUCKET, max_label_tokens=5).token_ids("Hi.", "There is.", (40, 40))
    with pytest.raises(ValueError, match="exceeds the largest length bucket 160"):
        sft_data.bucket_for(161, (96, 160))


# ------------------------------------------------------------------------------------------------ data

def test_dataset_resumes_exactly_and_reshuffles_by_seed(trained):
    enc = sft_data.Encoder(Processor.from_dir(trained.hf), max_length=BUCKET, max_label_tokens=MAX_LABELS)
    src = sft_data.SceneCaptions(5, 6, styles=(("short", 1.0),))
    ds = sft_data.dataset(src, enc, batch_size=2, seed=3, length_buckets=(BUCKET,))
    it = iter(ds)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]   # crosses the epoch boundary (6 records, batches of 2)
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(rest, [next(it2) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ident = lambda bs: [tuple(b["label_ids"][i]) for b in bs for i in range(2)]  # noqa: E731
    epoch1, epoch2 = ident(first + rest[:1]), ident(rest[1:])
    assert len(set(epoch1)) == 6                                  # an epoch holds each record once
    assert epoch2 != epoch1[:4]                                   # and the next one is reshuffled
    it4 = iter(sft_data.dataset(src, enc, batch_size=2, seed=4, length_buckets=(BUCKET,)))
    assert ident([next(it4) for _ in range(3)]) != epoch1          # another seed, another order


def test_self_training_from_caption_file(trained, tmp_path, capsys):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    names = []
    for i, im in enumerate(scene_images(21, 3)):
        im.save(img_dir / f"scene{i}.png")
        names.append(f"imgs/scene{i}.png")
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [{"image": names[0], "method": "vimar", "caption": "There is a small red circle.", "seconds": 0.1},
             {"image": str(tmp_path / names[1]), "method": "vimar", "caption": "A blue star is on the left."},
             {"image": "imgs/missing.png", "method": "vimar", "caption": "There is a square."},
             {"image": "imgs/corrupt.png", "method": "vimar", "caption": "There is a heart."},
             {"image": "imgs/unread.png", "method": "vimar", "error": "cannot read image: boom"},
             {"image": names[2], "method": "vimar", "caption": "The image contains two shapes.",
              "prompt": "Write a detailed caption for this image."}]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"image": "torn')
    wd = tmp_path / "st"
    argv = ["train_sft.py", "--config", "configs/tiny_policy.py", "--workdir", str(wd), "--init", trained.hf,
            "--config.data.source=captions", f"--config.data.captions={path}", "--config.total_steps=1",
            "--config.batch_size=3", "--config.lr=1e-6", "--config.warmup_steps=0", "--config.mesh.data=1",
            f"--config.data.length_buckets=({BUCKET},)", f"--config.data.max_label_tokens={MAX_LABELS}",
            "--config.trainable=all", "--config.async_checkpointing=False"]
    assert T.main(argv) == 0
    err = capsys.readouterr().err
    for bad in ("imgs/missing.png", "imgs/corrupt.png", "imgs/unread.png", "line 7"):
        assert bad in err, bad
    summary = json.load(open(wd / "summary.json"))
    assert summary["train"]["records"] == 3
    skipped = {s["name"]: s["reason"] for s in summary["train"]["skipped"]}
    assert set(skipped) == {"imgs/missing.png", "imgs/corrupt.png", "imgs/unread.png", "line 7"}
    assert "not found" in skipped["imgs/missing.png"] and "cannot read image" in skipped["imgs/corrupt.png"]
    # a full fine-tune at lr 1e-6 moves every tensor a little, the vision tower included
    before = load_file(os.path.join(trained.hf, "model.safetensors"))
    after = load_file(os.path.join(wd, "hf", "model.safetensors"))
    assert before.keys() == after.keys()
    k = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert 0 < np.abs(after[k] - before[k]).max() < 1e-4
    # the tokenizer and processor files came along
    assert Processor.from_dir(wd / "hf").image_token_id == Processor.from_dir(trained.hf).image_token_id


def test_caption_file_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "nowhere.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="no usable records"):
        sft_data.CaptionFile(path, quiet=True)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        sft_data.CaptionFile(tmp_path / "absent.jsonl")


def test_init_requires_exactly_one_source(tmp_path, clip_dir):
    cfg = small_config()
    with pytest.raises(ValueError, match="exactly one of init"):
        T.train_sft(cfg, str(tmp_path / "w"))
    cfg.clip, cfg.init = clip_dir, clip_dir
    with pytest.raises(ValueError, match="exactly one of init"):
        T.train_sft(cfg, str(tmp_path / "w"))


def test_qwen_policy_from_scratch_exports_to_hf(clip_dir, tmp_path):
    """Policy "b": Qwen2 decoder (q/k/v biases) and the ChatML tokenizer, straight from initialisation."""
    from configs import tiny_policy_qwen

    cfg = tiny_policy_qwen.get_config()
    cfg.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     pinpoints="1x2,2x1,2x2")
    cfg.clip = clip_dir
    assets = tmp_path / "assets"
    assets.mkdir()
    factory, hf_config = T.init_from_scratch(cfg, str(assets))
    model = nnx.jit(lambda: factory(nnx.Rngs(0)))()
    assert hf_config["text_config"]["model_type"] == "qwen2"
    layers = model.decoder.layers  # biases start at zero: give them values so that the check covers them
    layers.q_bias.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(1), layers.q_bias.shape))
    layers.k_bias.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(2), layers.k_bias.shape))
    out = tmp_path / "hf"
    T.save_hf(model, hf_config, str(assets), str(out))

    proc = LlavaNextProcessor.from_pretrained(out)
    hf = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    im = scene_images(31, 1)[0]
    caption = "There is a large green hexagon on the right."
    text = proc.apply_chat_template([user("Describe this image in detail."), assistant(caption)])
    inputs = proc(images=[im], text=[text], return_tensors="np")
    enc = sft_data.Encoder(Processor.from_dir(out), max_length=BUCKET, max_label_tokens=MAX_LABELS)
    item = enc(sft_data.Example(im, "Describe this image in detail.", caption))
    ids = inputs["input_ids"][0]
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = len(item["input_ids"])
    # ChatML: labels end at <|im_end|>; the newline the template writes after it is not kept
    np.testing.assert_array_equal(item["input_ids"], ids[:n])
    assert ids[n - 1] == eos and n < len(ids) and proc.tokenizer.bos_token is None
    assert proc.tokenizer.decode(ids[item["label_start"]:n - 1]) == caption
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    got = np.asarray(VLM(model, hf_config).logits(inputs["input_ids"], inputs["pixel_values"],
                                                   inputs["image_sizes"], inputs["attention_mask"]))
    assert max_rel_err(got, ref) <= TOL


def test_greedy_eval_captions_equal_hf_generate(trained):
    """The held-out evaluation's captions are HF's greedy `generate` on the exported directory."""
    cfg = tiny_policy.get_config().eval
    cfg.update(seed=1002, num_scenes=3, batch_size=2, max_new_tokens=6)
    out = T.evaluate_scenes(trained.state.model(), trained.hf, cfg)
    assert out["chair"]["n_captions"] == 3 and set(out["chair"]) >= {"chair_i", "chair_s", "recall"}
    proc = LlavaNextProcessor.from_pretrained(trained.hf)
    hf = LlavaNextForConditionalGeneration.from_pretrained(trained.hf).eval()
    text = proc.apply_chat_template([user(cfg.prompt)], add_generation_prompt=True)
    for sample, im in zip(out["samples"], scene_images(1002, 3)):
        inputs = proc(images=[im], text=[text], return_tensors="pt")
        with torch.no_grad():
            gen = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
        ref = proc.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert sample["caption"] == ref and ref
