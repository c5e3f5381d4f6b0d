"""`generate` on tiny random LLaVA-NeXT checkpoints (Mistral and Qwen2 text) against HF
`LlavaNextForConditionalGeneration.generate`: greedy tokens, per-row EOS, shared-prefix candidates equal to
copied prompts, sentence stops, compile counts.

`make_policy_dir` is also used by tests/test_searches.py and tests/test_caption_cli.py: a saved HF
LLaVA-NeXT directory with the tiny-world tokenizer, its chat template and processor files, random weights
whose next-token distribution leans towards words, "." and EOS (so captions have sentences and end).
"""

import atexit
import functools
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                          LlavaNextProcessor, PreTrainedTokenizerFast)

from vimar_jax import text as vtext
from vimar_jax.data import tiny_tokenizer
from vimar_jax.decode.generate import generate
from vimar_jax.decode.sampler import Finish, count_compiles
from vimar_jax.vlm import load_vlm

S = 28                     # vision image size; patch 14 -> 2 x 2 patches (+ CLS) per view
PINS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84]]
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, image_size=S, patch_size=14, projection_dim=16, hidden_act="quick_gelu")
TEXT = {"mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
        "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})}
VARIANT = {"mistral": "a", "qwen2": "b"}
LEAN_DOT, LEAN_EOS = 3.0, 1.4     # logit offsets of "." and EOS over spaced words
IMAGE_HW = [(30, 50), (60, 20), (40, 40), (17, 90), (100, 33), (28, 28), (45, 70)]
USER_TEXTS = ["Describe this image in detail.", "What is in the image?", "Describe the image."]


# ------------------------------------------------------------------------------------------ fixtures

def images(hws, seed=0):
    return [Image.fromarray(np.random.default_rng(seed * 7919 + h * 1000 + w).integers(0, 256, (h, w, 3),
                                                                                       dtype=np.uint8))
            for h, w in hws]


def _lean(model: LlavaNextForConditionalGeneration, tok, seed: int) -> None:
    """Random weights (std 0.2, norms ~1), plus an LM-head prior through a constant "bias channel": hidden
    coordinate 0 is K in every token embedding and image feature, no layer reads or writes it, and the LM
    head's column 0 turns it into per-token logit offsets (spaced words 0, "." LEAN_DOT, EOS LEAN_EOS, special
    and bare tokens -8). Context moves the rest of the distribution, so captions have sentences and end."""
    K = 6.0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_scale else 0.2 * noise)
            if "language_model" in name and ("o_proj.weight" in name or "down_proj.weight" in name):
                p[0, :] = 0                                  # no layer writes the channel
            elif "language_model" in name and ("input_layernorm" in name or "post_attention_layernorm" in name):
                p[0] = 0                                     # nor reads it
            elif "multi_modal_projector.linear_2.weight" in name:
                p[0, :] = 0
            elif "multi_modal_projector.linear_2.bias" in name or name.endswith("image_newline"):
                p[0] = K
        model.get_input_embeddings().weight[:, 0] = K
        prior = torch.full((model.config.text_config.vocab_size,), -8.0)
        for t, i in tok.get_vocab().items():
            if t[:1] in ("\u2581", "\u0120") and len(t) > 1:
                prior[i] = 0.0
        prior[tok.token_to_id(".")] = LEAN_DOT
        prior[tok.token_to_id("</s>") or tok.token_to_id("<|im_end|>")] = LEAN_EOS
        hidden = model(input_ids=torch.tensor([[tok.token_to_id(".")] * 4]), output_hidden_states=True).hidden_states
        model.get_output_embeddings().weight[:, 0] = prior / hidden[-1][0, :, 0].mean()


def make_policy_dir(path, text: str = "mistral", seed: int = 0, lean: bool = True):
    """Write a tiny random LLaVA-NeXT checkpoint with a tiny-world tokenizer to `path` (weights leaning towards
    words, "." and EOS unless `lean=False`); returns (HF model, HF processor)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    variant = VARIANT[text]
    tiny_tokenizer.save_tokenizer(path, variant)
    sp = tiny_tokenizer.special_tokens(variant)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok = tiny_tokenizer.build_tokenizer(variant)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                    image_grid_pinpoints=PINS)
    template = tiny_tokenizer.CHAT_TEMPLATE_A if variant == "a" else tiny_tokenizer.CHAT_TEMPLATE_B
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=template)
    proc.save_pretrained(path)
    ids = {k: tok.token_to_id(sp[k]) for k in ("bos", "eos", "pad") if k in sp}
    cfg = LlavaNextConfig(vision_config=VISION, text_config={**TEXT[text], "vocab_size": tok.get_vocab_size(),
                                                             **{f"{k}_token_id": v for k, v in ids.items()}},
                          image_token_index=tok.token_to_id(sp["image"]), image_grid_pinpoints=PINS,
                          vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    if lean:
        _lean(model, tok, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                is_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
                p.copy_(1 + 0.1 * noise if is_scale else 0.2 * noise)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({f"{k}_token_id": v for k, v in ids.items()}, f)
    return model, LlavaNextProcessor.from_pretrained(path)


@functools.cache
def world(text: str):
    """(HF model, HF processor, our VLM) of a policy saved once per session."""
    path = tempfile.mkdtemp(prefix=f"vimar_gen_{text}_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    model, proc = make_policy_dir(path, text)
    return model, proc, load_vlm(path)


def prompt_text(proc, user: str) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
    return proc.apply_chat_template(conv, add_generation_prompt=True)


def batch(text: str, hws, users, padding_side="left"):
    _, proc, _ = world(text)
    proc.tokenizer.padding_side = padding_side
    texts = [prompt_text(proc, u) for u in users]
    add = not texts[0].startswith(proc.tokenizer.bos_token or "\0")
    out = dict(proc(images=images(hws), text=texts, return_tensors="np", padding=True, add_special_tokens=add))
    return out


def hf_generate(text: str, inputs, n: int, eos=None):
    model, proc, _ = world(text)
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, do_sample=False, max_new_tokens=n,
                             eos_token_id=eos, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    seqs = out.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()
    return seqs, logp


def ours(text: str, inputs, **kw):
    """`VLM.generate` (the thin method over `decode.generate.generate`) on processor arrays."""
    return world(text)[2].generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                   inputs["attention_mask"], **kw)


def hf_token_logprobs(text: str, inputs, tokens, num_candidates: int):
    """HF log-softmax of each generated token given its prompt (row r = prompt r // num_candidates) and the
    tokens before it, teacher-forced in one forward over left-padded prompt + tokens."""
    model = world(text)[0]
    rep = {k: np.repeat(v, num_candidates, axis=0) for k, v in inputs.items()}
    ids = np.concatenate([rep["input_ids"], tokens], axis=1)
    mask = np.concatenate([rep["attention_mask"], np.ones(tokens.shape, rep["attention_mask"].dtype)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions), pixel_values=torch.tensor(rep["pixel_values"]),
                       image_sizes=torch.tensor(rep["image_sizes"])).logits
    T, n = rep["input_ids"].shape[1], tokens.shape[1]
    logp = torch.log_softmax(logits[:, T - 1:T - 1 + n].float(), -1).numpy()
    return np.take_along_axis(logp, tokens[..., None].astype(np.int64), -1)[..., 0]


# ------------------------------------------------------------------------------------------ tests

N = 16


@pytest.mark.parametrize("text", ["mistral", "qwen2"])
def test_greedy_equals_hf_generate(text):
    """Batch of 3 images of different sizes and prompts of different lengths, HF left padding."""
    inputs = batch(text, IMAGE_HW[:3], USER_TEXTS)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths)) == 3 and (inputs["attention_mask"][:, 0] == 0).any()   # really left-padded
    ref, ref_logp = hf_generate(text, inputs, N, eos=None)
    out = ours(text, inputs, max_new_tokens=N, eos_token_id=())
    assert len({tuple(r) for r in ref}) == 3 and len(np.unique(ref)) >= 6    # non-trivial rows
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(out.lengths, [N] * 3)
    assert out.reason_names() == ["budget"] * 3
    want = np.take_along_axis(ref_logp, ref[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.raw_logprobs, want, atol=1e-4)
    np.testing.assert_array_equal(out.logprobs, 0.0)


def test_greedy_right_padding_and_eos_per_row():
    """Right-padded inputs give the same tokens; an EOS stops exactly the rows that produce it, as in HF."""
    text = "mistral"
    left = batch(text, IMAGE_HW[3:6], USER_TEXTS)
    right = batch(text, IMAGE_HW[3:6], USER_TEXTS, padding_side="right")
    assert (right["attention_mask"][:, -1] == 0).any()
    free, _ = hf_generate(text, left, N, eos=None)
    # An EOS that row 0 emits first at step t > 1 and some other row never emits.
    t, eos = next((t, int(free[0, t])) for t in range(2, N)
                  if free[0, t] not in free[0, :t] and any(free[0, t] not in free[r] for r in (1, 2)))
    ref, _ = hf_generate(text, left, N, eos=eos)
    for inputs in (left, right):
        out = ours(text, inputs, max_new_tokens=N, eos_token_id=eos)
        pad = world(text)[1].tokenizer.pad_token_id
        got = np.where(np.arange(N)[None] < out.lengths[:, None], out.tokens, pad)
        np.testing.assert_array_equal(got, ref)
        assert out.lengths[0] == t + 1 and out.reason[0] == Finish.EOS
        for r in range(3):
            hit = np.flatnonzero(free[r] == eos)
            assert out.lengths[r] == (hit[0] + 1 if hit.size else N)


def test_shared_prefix_candidates_equal_copied_prompts():
    """One prompt x 3 candidates (per-candidate temperature / top-k / top-p) decoding against one shared
    prefill equal the same rows with the prompt copied per row (a plain batch, no prefix); with 2 prompts the
    prompts run one after the other with the same draws per row id."""
    text = "mistral"
    inputs = batch(text, IMAGE_HW[:2], USER_TEXTS[:2])
    first = {k: v[:1] for k, v in inputs.items()}
    kw = dict(max_new_tokens=N, temperature=[0.0, 0.8, 1.3], top_k=[0, 0, 20], top_p=[1.0, 0.9, 1.0], seed=5,
              eos_token_id=())
    shared = ours(text, first, num_candidates=3, **kw)
    copied = ours(text, {k: np.repeat(v, 3, axis=0) for k, v in first.items()}, num_candidates=1, **kw)
    np.testing.assert_array_equal(shared.tokens, copied.tokens)
    np.testing.assert_allclose(shared.logprobs, copied.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared.raw_logprobs, copied.raw_logprobs, rtol=1e-5, atol=1e-5)
    ref, _ = hf_generate(text, inputs, N, eos=None)
    np.testing.assert_array_equal(shared.tokens[0], ref[0])            # the temperature-0 row is greedy
    assert len({tuple(r) for r in shared.tokens}) == 3                 # the other rows really sample
    assert (shared.logprobs[1:] < -1e-3).any()
    both = ours(text, inputs, num_candidates=3, **kw)
    np.testing.assert_array_equal(both.tokens[:3], shared.tokens)
    np.testing.assert_array_equal(both.tokens[3], ref[1])
    assert not np.array_equal(both.tokens[4:], both.tokens[1:3])
    # Another seed changes the sampled rows, not the greedy one.
    other = ours(text, first, num_candidates=3, **{**kw, "seed": 6})
    np.testing.assert_array_equal(other.tokens[0], ref[0])
    assert not np.array_equal(other.tokens[1:], shared.tokens[1:])


def test_vlm_generate_candidates_are_seeded_samples_of_their_prompt():
    """`VLM.generate(..., num_candidates=4, seed=...)` on 2 prompts (different image sizes and lengths): the same
    seed gives the same rows; another seed changes every sampled row and no greedy one; candidate 0
    (temperature 0) of prompt b is HF's greedy continuation of prompt b; every token's log-prob is HF's
    teacher-forced log-prob under its own prompt (at temperature 1 the processed distribution is the model's)."""
    text, C = "mistral", 4
    inputs = batch(text, IMAGE_HW[:2], USER_TEXTS[:2])
    assert len(set(inputs["attention_mask"].sum(1))) == 2
    kw = dict(max_new_tokens=N, temperature=[0.0, 1.0, 1.0, 1.0], num_candidates=C, eos_token_id=())
    a = ours(text, inputs, seed=11, **kw)
    again = ours(text, inputs, seed=11, **kw)
    other = ours(text, inputs, seed=12, **kw)
    assert a.tokens.shape == (2 * C, N) and a.num_candidates == C
    np.testing.assert_array_equal(again.tokens, a.tokens)
    np.testing.assert_array_equal(again.logprobs, a.logprobs)
    greedy, _ = hf_generate(text, inputs, N, eos=None)
    sampled = [r for r in range(2 * C) if r % C]
    for b in range(2):
        np.testing.assert_array_equal(a.tokens[b * C], greedy[b])
        np.testing.assert_array_equal(other.tokens[b * C], greedy[b])
        assert len({tuple(a.tokens[r]) for r in range(b * C, (b + 1) * C)}) == C      # candidates differ
    for r in sampled:
        assert not np.array_equal(other.tokens[r], a.tokens[r])
    np.testing.assert_allclose(a.raw_logprobs, hf_token_logprobs(text, inputs, a.tokens, C), atol=1e-4)
    np.testing.assert_allclose(a.logprobs[sampled], a.raw_logprobs[sampled], atol=1e-5)
    np.testing.assert_array_equal(a.logprobs[::C], 0.0)
    assert (a.logprobs[sampled] < -1e-3).any()


def test_sentence_stop_is_the_first_sentence_of_the_eos_run():
    """stop='sentence' ends each row exactly at the first sentence end the EOS run records (same draws), and
    that span decodes to the first sentence of the text."""
    text = "mistral"
    vlm = world(text)[2]
    inputs = batch(text, IMAGE_HW[1:3], USER_TEXTS[1:3])
    tok = vlm.processor.tokenizer
    checked = 0
    for seed in range(4):                       # the same compilations for every seed
        kw = dict(max_new_tokens=N, temperature=[0.5, 1.0, 1.0], seed=seed, num_candidates=3)
        full = ours(text, inputs, stop="eos", **kw)
        first = ours(text, inputs, stop="sentence", **kw)
        for r in range(6):
            n = full.num_sentences[r]
            if n == 0 or (n == 1 and full.reason[r] == Finish.EOS):
                assert first.reason[r] != Finish.SENTENCE
                continue
            end = full.boundaries[r, 0]
            assert first.reason[r] == Finish.SENTENCE and first.lengths[r] == end
            np.testing.assert_array_equal(first.tokens[r, :end], full.tokens[r, :end])
            sents = vtext.split_sentences(tok.decode(full.tokens[r, :full.lengths[r]].tolist()))
            assert len(sents) >= 2 and tok.decode(first.tokens[r, :end].tolist()).strip() == sents[0]
            checked += 1
    assert checked >= 4


def test_compiles_once_per_bucket():
    text = "mistral"
    vlm = world(text)[2]
    a = batch(text, IMAGE_HW[:3], USER_TEXTS)
    ours(text, a, max_new_tokens=N, temperature=0.0)
    ours(text, a, max_new_tokens=N, temperature=0.7, num_candidates=3)
    b = batch(text, [IMAGE_HW[2], IMAGE_HW[6], IMAGE_HW[4]], [USER_TEXTS[i] for i in (0, 2, 1)])   # other lengths
    assert b["input_ids"].shape != a["input_ids"].shape

    def bucketed(x):
        return vlm.prepare(x["input_ids"], x["pixel_values"], x["image_sizes"], x["attention_mask"])["input_ids"].shape

    for x, y in ((a, b), ({k: v[:1] for k, v in a.items()}, {k: v[2:] for k, v in b.items()})):
        assert bucketed(x) == bucketed(y)                               # the same prompt buckets
    with count_compiles() as counts:
        ours(text, b, max_new_tokens=N - 3, temperature=[0.0, 1.0, 0.5], top_p=0.8, seed=4, eos_token_id=[7, 9])
        ours(text, b, max_new_tokens=N - 5, temperature=[0.3, 1.0, 0.0], top_k=4, num_candidates=3, stop="sentence")
    assert counts["_prefill_prompt"] == 0 and counts["_decode_impl"] == 0, counts


def test_bad_arguments_raise():
    text = "mistral"
    a = batch(text, IMAGE_HW[:2], USER_TEXTS[:2])
    with pytest.raises(ValueError, match="stop"):
        ours(text, a, stop="paragraph")
    with pytest.raises(ValueError, match="temperature"):
        ours(text, a, temperature=[0.1, 0.2, 0.3], num_candidates=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours(text, a, max_new_tokens=0)
    with pytest.raises(ValueError, match="pixel_values"):
        generate(world(text)[2], a["input_ids"], None, None, a["attention_mask"])
