"""The searches on real (tiny, random) models: `LlavaPolicy`, `ValueScorer`, `ClipScorer` behind the engine.

A Mistral-style policy with the tiny-world tokenizer "a", a value model with a *different* tokenizer and
template (the Qwen-style "b": sentences travel as text, as in cross-model guidance) and a tiny CLIP, all
saved as HF directories. Every method captions 20+ images of different sizes under several prompts; each
jitted function compiles at most once per shape bucket; value scores of the cached-prefix batched path
equal the value model run on each whole state alone.

`tiny_model_dirs` is also used by tests/test_caption_cli.py.
"""

import atexit
import dataclasses
import functools
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from tests.helpers import max_rel_err
from tests.test_generate import images, make_policy_dir
from vimar_jax.data import clip_data
from vimar_jax.data.packing import StateTemplate
from vimar_jax.decode.generate import pow2_bucket
from vimar_jax.decode.policy import MIN_EXTENSION, LlavaPolicy
from vimar_jax.decode.sampler import count_compiles
from vimar_jax.decode.scorers import ValueScorer, _pack_first_fit, render_state, row_bucket, theta_default
from vimar_jax.decode.search import METHODS, SearchConfig
from vimar_jax.pipeline import build_engine
from vimar_jax.vlm import load_value, load_vlm

STATS = {f"p{q}": 0.1 * q - 5.0 for q in (10, 20, 30, 40, 50, 60, 70, 80, 90)}
HW = [(30, 50), (60, 20), (40, 40), (17, 90), (100, 33), (28, 28), (45, 70), (33, 33), (80, 26), (26, 80),
      (50, 50), (64, 32), (32, 64), (90, 40), (40, 90), (29, 57), (57, 29), (70, 70), (24, 48), (48, 24),
      (36, 90)]
PROMPTS = ["Describe this image in detail.", "What is in the image?", "Describe the image."]
CFG = SearchConfig(temperatures=(0.5, 1.0), samples_per_temperature=2, top_p=0.9, max_new_tokens=32,
                   sentence_max_tokens=16, max_sentences=4, max_refine=2, max_append=2)


def make_value_dir(path, *, text="qwen2", seed=1, head_seed=2, max_suffix_tokens=None):
    """A value checkpoint: a tiny LLaVA-NeXT + `value_head.*` + `vimar_value` (stats for θ)."""
    model, _ = make_policy_dir(path, text, seed=seed, lean=False)
    E = model.config.text_config.hidden_size
    g = np.random.default_rng(head_seed)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors.update({"value_head.weight": (0.3 * g.normal(size=(1, E))).astype(np.float32),
                    "value_head.bias": np.array([0.5], np.float32)})
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["vimar_value"] = {"value_layer": -2, "state": "sentence", "stats": {**STATS, "count": 100}}
    if max_suffix_tokens is not None:
        cfg["vimar_value"]["max_suffix_tokens"] = max_suffix_tokens
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def make_clip_dir(path, seed=3):
    ids = clip_data.special_token_ids()
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(clip_data.clip_vocab()), max_position_embeddings=77,
                                      bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                                      **common),
                     vision_config=dict(image_size=28, patch_size=14, **common), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "logit_scale" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    clip_data.save_clip_tokenizer(str(path))
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(clip_data.image_processor_config(28), f)


@functools.cache
def tiny_model_dirs() -> dict[str, str]:
    """{policy, value, clip} directories, built once per session."""
    root = tempfile.mkdtemp(prefix="vimar_search_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    dirs = {k: os.path.join(root, k) for k in ("policy", "value", "clip")}
    make_policy_dir(dirs["policy"], "mistral", seed=0)
    make_value_dir(dirs["value"])
    make_clip_dir(dirs["clip"])
    return dirs


@functools.cache
def engine():
    d = tiny_model_dirs()
    # Int length buckets: every prompt of these images falls in one prefill bucket.
    return build_engine(policy=load_vlm(d["policy"], length_bucket=64), value=load_value(d["value"], length_bucket=64),
                        clip=d["clip"], config=CFG)


# ------------------------------------------------------------------------------------------ value scoring

SENTENCES = ["There is a red circle.", "A blue square sits in the top left corner.", "Two", "Stars.",
             "The image shows a green triangle and a yellow star in the middle."]


def alone(value, image, text_ids):
    """ValueModel on one whole state (the value at its last token), through the `Value` API."""
    inputs = value.processor(images=[image], texts=[value.processor.image_token])
    return float(np.asarray(value.values(np.asarray(text_ids)[None], inputs["pixel_values"],
                                          inputs["image_sizes"]))[0])


def test_value_scores_equal_whole_states_alone():
    eng = engine()
    scorer, value = eng.value, eng.value.value
    template = StateTemplate(value.processor)          # the value trainer's rendering of a state
    for hw in HW[:3]:
        image = images([hw])[0]
        ctx = scorer.begin(image)
        got = scorer.score(ctx, SENTENCES)
        want = [alone(value, image, template.state_ids(hw, s)) for s in SENTENCES]
        assert max_rel_err(got, want) <= 1e-5
        assert np.std(want) > 1e-3                               # the sentences get different values
        # Batch-invariant: alone, in another order, or among more rows (other padding buckets).
        tol = 1e-5 * np.abs(want).max()
        for j in (0, 4):
            np.testing.assert_allclose(scorer.score(ctx, [SENTENCES[j]]), [want[j]], rtol=0, atol=tol)
        np.testing.assert_allclose(scorer.score(ctx, SENTENCES[::-1] * 3)[:5], want[::-1], rtol=0, atol=tol)
        # Packed several states to a row (the 15 states share a few rows), and with rows just wide enough.
        lengths = [len(scorer.suffix(ctx, s)) for s in SENTENCES * 3]
        assert len(_pack_first_fit(lengths, scorer.min_width)) < len(lengths) // 3
        narrow = ValueScorer(value, min_width=8)
        np.testing.assert_allclose(narrow.score(narrow.begin(image), SENTENCES * 3),
                                   np.tile(want, 3), rtol=0, atol=tol)


def test_engine_scores_a_steps_candidates_in_the_rows_they_fill(monkeypatch):
    """The engine's value scorer packs a step's N·K candidate states several to a row, values each distinct
    state once, and runs as many rows as they fill (`row_bucket`), not one row per candidate: 32 rows for 30
    short states made every value-guided step several times the work (and VisVM's timings with it). The
    values do not depend on the rows, and a repeated state gets its one value."""
    from vimar_jax.decode import scorers

    small = engine()
    eng = build_engine(policy=small.policy, value=small.value.value, clip=False, config=SearchConfig())
    scorer = eng.value
    assert eng.cfg.num_candidates == 30
    ctx = scorer.begin(images([HW[1]])[0])
    texts = SENTENCES * 6                                      # N·K = 30 states, 5 distinct
    seen = []
    real = scorers._value_score
    monkeypatch.setattr(scorers, "_value_score", lambda g, p, tokens, *a: seen.append(tokens.shape) or
                        real(g, p, tokens, *a))
    got = scorer.score(ctx, texts)
    filled = len(_pack_first_fit([len(scorer.suffix(ctx, t)) for t in SENTENCES], scorer.min_width))
    assert seen == [(row_bucket(filled, 4), scorer.min_width)] and row_bucket(filled, 4) == 4, (seen, filled)
    assert (got.reshape(6, len(SENTENCES)) == got[:len(SENTENCES)]).all()
    wide = ValueScorer(scorer.value, min_rows=32)              # the old padding: the same values
    np.testing.assert_allclose(wide.score(wide.begin(images([HW[1]])[0]), texts), got, rtol=0,
                               atol=1e-5 * np.abs(got).max())
    # 40 distinct states (one word each, many to a row) against each valued alone.
    many = [f"{w} {k}." for k in range(8) for w in ("Red", "Blue", "Two", "Stars", "Left")]
    seen.clear()
    one_by_one = np.concatenate([scorer.score(ctx, [t]) for t in many])
    np.testing.assert_allclose(scorer.score(ctx, many + many[::-1]), np.r_[one_by_one, one_by_one[::-1]],
                               rtol=0, atol=1e-5 * np.abs(one_by_one).max())
    assert seen[-1][0] == row_bucket(len(_pack_first_fit([len(scorer.suffix(ctx, t)) for t in many],
                                                         scorer.min_width)), 4)


def test_row_bucket_powers_of_two_then_multiples_of_eight():
    assert [row_bucket(n, 4) for n in (1, 4, 5, 8, 9, 16, 17, 24, 25, 33)] == [4, 4, 8, 8, 16, 16, 24, 24, 32, 40]
    assert [row_bucket(n) for n in (0, 1, 2, 3)] == [1, 1, 2, 4]


def test_pack_first_fit_longest_first_into_the_first_row_with_room():
    assert _pack_first_fit([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    assert _pack_first_fit([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="9 suffix tokens exceeds the row width 8"):
        _pack_first_fit([2, 9], 8)


def test_value_prefix_state_and_truncation(tmp_path):
    """The prefix state (image + prompt + caption so far + sentence) and the trainer's suffix truncation."""
    make_value_dir(tmp_path, text="mistral", max_suffix_tokens=8)
    value = load_value(tmp_path)
    image = images([HW[3]])[0]
    long_sentence = "The image shows a green triangle and a yellow star in the middle."
    template = StateTemplate(value.processor, max_suffix_tokens=8)
    cut = ValueScorer(value)
    ctx = cut.begin(image)
    want = alone(value, image, template.state_ids(HW[3], long_sentence))
    assert len(template.suffix_ids([long_sentence])[0]) == 8
    assert max_rel_err(cut.score(ctx, [long_sentence, "Stars."]),
                       [want, alone(value, image, template.state_ids(HW[3], "Stars."))]) <= 1e-5

    prefix = ValueScorer(value, state="prefix", prompt="What is in the image?")
    ctx = prefix.begin(image)
    previous = [[], ["There is a red circle."], ["There is a red circle.", "Two"]]
    got = prefix.score(ctx, SENTENCES[1:4], previous)
    text = [render_state(value.processor, s, state="prefix", prompt="What is in the image?", previous=p)
            for s, p in zip(SENTENCES[1:4], previous)]
    assert text[2].index("There is a red circle. Two Stars.") > text[2].index("What is in the image?")
    inputs = value.processor(images=[image] * 3, texts=text)
    ref = value.values(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    assert max_rel_err(got, ref) <= 1e-5
    # The value trainer's prefix states (packing.StateTemplate) are the same token sequences.
    trained = StateTemplate(value.processor, state="prefix")
    states = [trained.state_ids(HW[3], s, p, "What is in the image?") for s, p in zip(SENTENCES[1:4], previous)]
    assert [x.tolist() for x in states] == [
        value.processor.tokenizer.encode(value.processor.expand_image_tokens([t], [HW[3]])[0]) for t in text]
    assert max_rel_err(got, [alone(value, image, x) for x in states]) <= 1e-5
    with pytest.raises(ValueError, match="prefix states need the prompt"):
        trained.suffix_ids(["Stars."], [[]])
    # A stored cut that leaves no room for a sentence is an error naming the checkpoint's key.
    make_value_dir(tmp_path, text="mistral", max_suffix_tokens=template.num_tail)
    with pytest.raises(ValueError, match=r"config\.json: vimar_value\.max_suffix_tokens=\d+ leaves no room"):
        ValueScorer(load_value(tmp_path))


def test_theta_default_from_stored_statistics(tmp_path):
    eng = engine()
    assert eng.theta == pytest.approx(STATS["p30"])
    assert theta_default(eng.value.value, 70) == pytest.approx(STATS["p70"])
    make_value_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["vimar_value"]["stats"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--theta"):
        theta_default(load_value(tmp_path))
    # SearchConfig.theta_percentile (`--theta-percentile`) picks another stored percentile; without stored
    # statistics it is an error, not a silent fallback.
    small = engine()
    at70 = build_engine(policy=small.policy, value=small.value, clip=False,
                        config=SearchConfig(theta_percentile=70))
    assert at70.theta == pytest.approx(STATS["p70"]) and at70.theta != pytest.approx(eng.theta)
    with pytest.raises(ValueError, match="--theta"):
        build_engine(policy=small.policy, value=load_value(tmp_path), clip=False,
                     config=SearchConfig(theta_percentile=70))
    with pytest.raises(ValueError, match="not both"):
        SearchConfig(theta=0.1, theta_percentile=70)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        SearchConfig(theta_percentile=130)


# ------------------------------------------------------------------------------------------ policy

def test_policy_greedy_and_prefix_continuation_equal_hf():
    """The policy path (prompt minus its last token prefilled, extension by [last token] + prefix) gives HF's
    greedy caption, and continuing from any prefix of it gives the rest of it."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    d = tiny_model_dirs()["policy"]
    hf = LlavaNextForConditionalGeneration.from_pretrained(d).eval()
    proc = LlavaNextProcessor.from_pretrained(d)
    policy = engine().policy
    for hw, prompt in ((HW[0], PROMPTS[0]), (HW[4], PROMPTS[1])):
        image = images([hw])[0]
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        inputs = proc(images=[image], text=[proc.apply_chat_template(conv, add_generation_prompt=True)],
                      return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**inputs, do_sample=False, max_new_tokens=24, eos_token_id=None,
                              pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
        ctx = policy.begin(image, prompt)
        assert ctx.prompt_ids == inputs["input_ids"][0].tolist()
        got = policy.sample(ctx, [], [0.0], max_new_tokens=24, seed=0)
        eos = ref.index(2) if 2 in ref else None                 # "</s>" stops ours; HF went on
        assert got.tokens[0] == ref[:eos] and got.ended[0] == (eos is not None)
        for k in (1, 5):
            if eos is None or k < eos:
                more = policy.sample(ctx, ref[:k], [0.0, 0.0, 0.0], max_new_tokens=16, seed=1)
                want = ref[k:(k + 16 if eos is None else min(eos, k + 16))]
                assert all(t == want for t in more.tokens)


def test_policy_row_and_extension_buckets_do_not_change_samples():
    """Each call's own row count and extension size (the default) samples what a fixed 8-row, 128-slot
    policy samples: a row's draws do not depend on its neighbours, and empty slots are masked out."""
    sized = engine().policy
    fixed = LlavaPolicy(sized.vlm, slots=8, caption_slots=128)
    image = images([HW[3]])[0]
    a, b = sized.begin(image, PROMPTS[0]), fixed.begin(image, PROMPTS[0])
    caption = sized.sample(a, [], [0.0], max_new_tokens=32, seed=0).tokens[0]
    checked = 0
    for prefix in ([], caption[:3], caption[:20]):
        for temps, stop in (([0.0], "eos"), ([0.5, 1.0, 1.0, 0.7], "sentence"), ([1.0] * 3, "eos")):
            for seed in (0, 1):
                x = sized.sample(a, prefix, temps, stop=stop, max_new_tokens=24, seed=seed, top_p=0.9)
                y = fixed.sample(b, prefix, temps, stop=stop, max_new_tokens=24, seed=seed, top_p=0.9)
                assert (x.tokens, x.ended, x.decoded) == (y.tokens, y.ended, y.decoded), (prefix, temps, seed)
                checked += sum(map(len, x.tokens)) > 0
    assert checked >= 12
    assert {(r, e) for r, _, e in sized.shapes["decode"]} == {(1, 64 + 32), (4, 64 + 32)}, sized.shapes
    assert {(r, e) for r, _, e in fixed.shapes["decode"]} == {(8, 64 + 128)}, fixed.shapes
    for bad in (dict(slots=0), dict(caption_slots=-4)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LlavaPolicy(sized.vlm, **bad)


def test_policy_sentence_samples_are_first_sentences():
    """stop="sentence" rows are the first sentence of the stop="eos" rows with the same draws."""
    policy = engine().policy
    ctx = policy.begin(images([HW[2]])[0], PROMPTS[2])
    temps = [0.5, 1.0, 1.0, 1.0]
    checked = 0
    for seed in range(8):
        one = policy.sample(ctx, [], temps, stop="sentence", max_new_tokens=16, seed=seed, top_p=0.9)
        full = policy.sample(ctx, [], temps, stop="eos", max_new_tokens=32, seed=seed, top_p=0.9)
        for toks, ended, whole, whole_ended in zip(one.tokens, one.ended, full.tokens, full.ended):
            spans = policy.split(whole)
            assert sum(spans, []) == whole                      # split covers the caption exactly
            assert len(policy.split(toks)) <= 1
            if len(spans) >= 2 and len(spans[0]) <= 16:
                assert toks == spans[0] and not ended
                checked += 1
            elif whole_ended and len(whole) <= 16:
                assert toks == whole and ended
    assert checked >= 4


# ------------------------------------------------------------------------------------------ searches

def test_every_method_on_many_images_compiles_once_per_bucket():
    eng = engine()
    policy, scorer = eng.policy, eng.value
    pics = images(HW)
    results = {}
    with count_compiles() as counts:
        for i, (hw, im) in enumerate(zip(HW, pics)):
            for method in METHODS:
                results[(i, method)] = eng.run(im, PROMPTS[i % len(PROMPTS)], method)
    for name, kind, owner in (("_prefill_prompt", "prefill", policy), ("_extend_prompt", "extend", policy),
                              ("_decode_impl", "decode", policy), ("_value_prefill", "prefill", scorer),
                              ("_value_score", "score", scorer)):
        assert 1 <= len(owner.shapes[kind]) and counts[name] <= len(owner.shapes[kind]), (name, counts)
    # Few buckets: one prompt bucket; each call extends it by a power of two >= MIN_EXTENSION that holds the
    # caption prefix, and decodes its rows as a power of two (1 for greedy, 4 for the N.K = 4 candidates)
    # with one of two token buffers (caption, sentence) against the prompt + that extension.
    (bucket,) = policy.shapes["prefill"]
    sizes = {slots for _, _, slots in policy.shapes["extend"]}
    assert all(s >= MIN_EXTENSION and s == pow2_bucket(s) for s in sizes) and len(sizes) <= 3, policy.shapes
    assert {w <= s for _, w, s in policy.shapes["extend"]} == {True}, policy.shapes
    assert {rows for rows, _, _ in policy.shapes["decode"]} == {1, 4}, policy.shapes
    assert {length - bucket for _, _, length in policy.shapes["decode"]} <= sizes, policy.shapes
    assert len(policy.shapes["decode"]) <= 2 * 2 * len(sizes) and len(policy.shapes["extend"]) <= 6, policy.shapes
    assert len(scorer.shapes["prefill"]) == 1 and len(scorer.shapes["score"]) <= 6, scorer.shapes

    # More images: no new compilation except for shape buckets not seen before.
    before = {k: set(v) for k, v in {**{f"p.{k}": v for k, v in policy.shapes.items()},
                                      **{f"v.{k}": v for k, v in scorer.shapes.items()}}.items()}
    with count_compiles() as counts:
        for i, im in enumerate(images(HW[:4], seed=1)):
            for method in METHODS:
                eng.run(im, PROMPTS[(i + 1) % len(PROMPTS)], method)
    assert counts["_prefill_prompt"] == counts["_decode_impl"] == 0, counts
    assert counts["_extend_prompt"] == len(policy.shapes["extend"] - before["p.extend"]), counts
    assert counts["_value_score"] == len(scorer.shapes["score"] - before["v.score"]), counts

    # The results: captions for (nearly) all images, values consistent with scoring a sentence alone.
    for method in METHODS:
        caps = [results[(i, method)].caption for i in range(len(HW))]
        assert sum(bool(c) for c in caps) >= len(HW) // 2, (method, caps)
    # (Relative to the image's largest value: a state packed among others sums in another order, and a
    # value near zero is a cancellation whose own relative error is larger.)
    checked = 0
    for i in range(0, len(HW), 5):
        ctx = scorer.begin(pics[i])
        alone_values, search_values = [], []
        for method in ("visvm", "vimar"):
            for s in results[(i, method)].sentences:
                assert s.value is not None
                alone_values.append(float(scorer.score(ctx, [s.text])[0]))
                search_values.append(s.value)
                checked += 1
        if alone_values:
            assert max_rel_err(search_values, alone_values) <= 1e-5
        for s in results[(i, "clip-search")].sentences:
            assert s.value == pytest.approx(float(eng.clip.score(eng.clip.begin(pics[i]), [s.text])[0]), abs=1e-5)
    assert checked >= 5
    refined = [s for r in results.values() if r.method == "vimar" for s in r.sentences if s.refined]
    assert refined, "Stage 2 never replaced or appended a sentence"
    assert all(results[(i, "greedy")].tokens_decoded > 0 for i in range(len(HW)))


def test_search_config_compact_decode_reaches_the_policys_decode(monkeypatch):
    """`SearchConfig(compact_decode=True)` makes the engine's policy decode with `compact=True` (what that
    does is the sampler's test); the default does not."""
    small = engine()
    packed = build_engine(policy=small.policy.vlm, value=False, clip=False,
                          config=dataclasses.replace(CFG, compact_decode=True)).policy
    assert packed.compact and not small.policy.compact and packed.rt.sampler is small.policy.rt.sampler
    seen = []
    real = packed.rt.sampler.decode
    monkeypatch.setattr(packed.rt.sampler, "decode", lambda *a, **k: seen.append(k["compact"]) or real(*a, **k))
    image = images([HW[0]])[0]
    for policy in (packed, small.policy):
        policy.sample(policy.begin(image, PROMPTS[0]), [], [0.0], max_new_tokens=8)
    assert seen == [True, False]
