"""LLaVA-NeXT parity with HF PyTorch `LlavaNextForConditionalGeneration` on tiny random fp32 configs.

Inputs are HF `LlavaNextProcessor` arrays for batches of images of different sizes and aspect ratios (so
different tile counts and padded patches); both models see the same arrays.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import (LlavaNextConfig as HFLlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast)

from tests.helpers import max_rel_err
from vimar_jax.convert import spec
from vimar_jax.models import llava_next
from vimar_jax.models.decoder import KVCache
from vimar_jax.models.llava_next import KeyLayout, LlavaNextConfig, checkpoint_spec, detect_layout
from vimar_jax import vlm as vlm_lib
from vimar_jax.vlm import VLM, bucket_length, load_vlm

TOL = 1e-5
VOCAB = 100
IMAGE_TOKEN = VOCAB - 1
S = 28  # vision image_size; patch 14 -> 2 x 2 patches (+ CLS) per view
PINS_A = [[28, 56], [56, 28], [56, 56]]
PINS_B = [[28, 28], [28, 84], [84, 28], [56, 56], [28, 112]]
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, image_size=S, patch_size=14, projection_dim=16, hidden_act="quick_gelu")


def mistral(**kw):
    return {**dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, sliding_window=None), **kw}


def qwen2(**kw):
    return {**dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB), **kw}


CONFIGS = {
    # GQA 2, theta 1e4, penultimate vision layer, pinpoints A, right padding.
    "mistral_gqa2": dict(text=mistral(), vision_feature_layer=-2, pins=PINS_A, side="right"),
    # GQA 4 (MQA), theta 1e6, a sliding window shorter than the prompts, last vision layer, pinpoints B
    # (single-tile images too), left padding.
    "mistral_mqa_window": dict(text=mistral(num_key_value_heads=1, sliding_window=8,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                               vision_feature_layer=-1, pins=PINS_B, side="left"),
    # Several vision layers concatenated, GQA 1.
    "mistral_layer_list": dict(text=mistral(num_key_value_heads=4), vision_feature_layer=[-3, -1], pins=PINS_A,
                               side="left"),
    # Qwen2 decoder (qkv biases), tied LM head, tanh-GELU projector without biases, theta 1e6.
    "qwen2": dict(text=qwen2(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), vision_feature_layer=-2,
                  pins=PINS_B, side="right", tie_word_embeddings=True, projector_hidden_act="gelu_pytorch_tanh",
                  multimodal_projector_bias=False),
}
IMAGE_HW = [(30, 50), (60, 20), (40, 40), (17, 90), (100, 33), (28, 28)]


def hf_config(name: str) -> HFLlavaNextConfig:
    c = dict(CONFIGS[name])
    text, pins, _ = c.pop("text"), c.pop("pins"), c.pop("side")
    return HFLlavaNextConfig(vision_config=VISION, text_config=text, image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=pins, **c)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm scales around 1, biases and newline non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_scale else 0.2 * noise)


@functools.cache
def hf_model(name: str) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(hf_config(name)).eval()
    randomize(model, sum(map(ord, name)))
    return model


def load_ours(model, **kw) -> llava_next.LlavaNext:
    """Our module, with HF's in-memory weights mapped through `checkpoint_spec` (layout detected)."""
    sd = model.state_dict()
    cs = checkpoint_spec(model.config.to_dict(), set(sd))
    ours = nnx.eval_shape(lambda: cs.make_module(rngs=nnx.Rngs(0), **kw))  # no random init: it is overwritten
    spec.from_torch_state_dict(ours, cs.rules, sd)
    return ours


@functools.cache
def ours_vlm(name: str) -> VLM:
    model = hf_model(name)
    return VLM(load_ours(model), model.config.to_dict())


def make_processor(pins, side: str) -> LlavaNextProcessor:
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 5)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    hf_tok.padding_side = side
    ip = LlavaNextImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                 image_grid_pinpoints=pins)
    return LlavaNextProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default")


def images(hws):
    """Random images, each one's pixels a function of its size only (so a sub-batch sees the same images)."""
    return [Image.fromarray(np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in hws]


TEXTS = ["w1 <image> w2 w3", "w4 <image> w5 w6 w7 w8 w9", "<image> w10", "w11 w12 <image> w13 w14 w15 w16",
         "w17 <image> w18", "w19 w20 w21 <image> w22"]


def batch(name: str, hws=IMAGE_HW, texts=TEXTS):
    c = CONFIGS[name]
    proc = make_processor(c["pins"], c["side"])
    return dict(proc(images=images(hws), text=list(texts[:len(hws)]), return_tensors="np", padding=True))


def hf_logits(model, inputs) -> np.ndarray:
    """HF logits with positions from the attention mask (as HF generation does), so left padding works."""
    mask = torch.tensor(inputs["attention_mask"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(inputs["input_ids"]), attention_mask=mask, position_ids=positions,
                    pixel_values=torch.tensor(inputs["pixel_values"]), image_sizes=torch.tensor(inputs["image_sizes"]))
    return out.logits.numpy()


def valid_err(ours, ref, mask) -> float:
    m = np.asarray(mask, bool)
    return max_rel_err(np.asarray(ours)[m], ref[m])


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(name):
    inputs = batch(name)
    sizes = inputs["pixel_values"].shape[1]
    assert (inputs["pixel_values"][:, -1] == 0).all(axis=(1, 2, 3)).any(), "want some padded patches"
    assert len(set((inputs["input_ids"] == IMAGE_TOKEN).sum(1))) > 3 and sizes > 2
    vlm = ours_vlm(name)
    ours = vlm.logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    ref = hf_logits(hf_model(name), inputs)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    assert valid_err(ours, ref, inputs["attention_mask"]) <= TOL


def test_padding_side_and_batch_invariance():
    """Each row of a left-padded batch equals the same prompt run alone (no padding) through HF."""
    name = "mistral_layer_list"
    inputs = batch(name)  # the batch of test_logits_match_hf (shared compilation)
    ours = np.asarray(ours_vlm(name).logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                            inputs["attention_mask"]))
    for b in range(3):
        alone = batch(name, IMAGE_HW[b:b + 1], TEXTS[b:b + 1])
        ref = hf_logits(hf_model(name), alone)[0]
        m = inputs["attention_mask"][b].astype(bool)
        assert max_rel_err(ours[b][m], ref) <= TOL


def test_full_strategy_rejected_like_hf():
    """'full' keeps CLS, which HF's anyres packing cannot lay out: HF fails, we refuse with a clear error."""
    cfg = hf_config("mistral_gqa2")
    cfg.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    inputs = batch("mistral_gqa2", IMAGE_HW[:1], TEXTS[:1])
    with pytest.raises(Exception):
        with torch.no_grad():
            model.model.get_image_features(torch.tensor(inputs["pixel_values"]), torch.tensor(inputs["image_sizes"]))
    with pytest.raises(ValueError, match="full"):
        LlavaNextConfig.from_hf(cfg.to_dict())


def test_config_errors_and_defaults():
    d = hf_config("mistral_gqa2").to_dict()
    with pytest.raises(ValueError, match="text_config.model_type"):
        LlavaNextConfig.from_hf({**d, "text_config": {**d["text_config"], "model_type": "gemma"}})
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaNextConfig.from_hf({**d, "image_grid_pinpoints": [[30, 56]]})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        LlavaNextConfig.from_hf({**d, "vision_feature_layer": -9})
    # A llava-hf style partial text_config falls back to MistralConfig's class defaults.
    partial = LlavaNextConfig.from_hf({"model_type": "llava_next", "text_config": {
        "model_type": "mistral", "vocab_size": 32064, "rope_theta": 1e6, "sliding_window": None}})
    t = partial.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (4096, 32, 32, 8, 14336)
    assert t.sliding_window is None and t.rope_theta == 1e6 and partial.vision.hidden_size == 1024
    assert partial.max_patches == 5 and partial.image_token_id == 32000


def test_length_buckets_reuse_compilation():
    name = "mistral_gqa2"
    vlm = VLM(load_ours(hf_model(name)), hf_model(name).config.to_dict(), length_bucket=64)
    assert bucket_length(20, 64) == 64 and bucket_length(65, 64) == 128 and bucket_length(20) == 32
    a = batch(name, IMAGE_HW[:2], TEXTS[:2])
    b = batch(name, IMAGE_HW[2:4], TEXTS[2:4])
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    before = vlm_lib._logits_fn._cache_size()
    for inputs in (a, b):
        ours = vlm.logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
        assert valid_err(ours, hf_logits(hf_model(name), inputs), inputs["attention_mask"]) <= TOL
    assert vlm_lib._logits_fn._cache_size() == before + 1


def test_token_count_mismatch_is_a_clear_error():
    name = "mistral_gqa2"
    inputs = batch(name, IMAGE_HW[:2], TEXTS[:2])
    ids = inputs["input_ids"].copy()
    row = np.nonzero(ids[1] == IMAGE_TOKEN)[0]
    ids[1, row[0]] = 5
    with pytest.raises(ValueError, match="row 1 has"):
        ours_vlm(name).logits(ids, inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])


# ---------------------------------------------------------------------------------------- cached decoding

def test_prefill_then_cached_decode_matches_full_forward():
    """Right-padded prompts of different lengths prefilled into one cache, then 3 decode steps, each step's
    logits equal to HF's full forward over the row's prompt + decoded tokens."""
    name = "mistral_mqa_window"
    model = hf_model(name)
    ours = ours_vlm(name).module
    c = dict(CONFIGS[name], side="right")
    proc = make_processor(c["pins"], "right")
    hws, texts = IMAGE_HW[:3], TEXTS[:3]
    inputs = dict(proc(images=images(hws), text=texts, return_tensors="np", padding=True))
    mask = inputs["attention_mask"].astype(bool)
    lengths = mask.sum(1)
    B, T = mask.shape
    steps = np.array([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    prep = ours_vlm(name).prepare(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                  inputs["attention_mask"])
    positions = np.where(mask, np.arange(T), -1).astype(np.int32)

    @jax.jit
    def prefill(ids, pv, gidx, pos, cache):
        h, cache = ours(ids, pv, None, gidx, pos, cache=cache, cache_index=0)
        return ours.logits(h), cache

    @jax.jit
    def step(ids, pos, cache, index):
        h, cache = ours(ids, positions=pos, cache=cache, cache_index=index)
        return ours.logits(h), cache

    cache = KVCache.init(ours.config.text, B, T + steps.shape[1], jnp.float32)
    logits, cache = prefill(jnp.asarray(inputs["input_ids"], jnp.int32), jnp.asarray(prep["pixel_values"]),
                            jnp.asarray(prep["gather_index"]), jnp.asarray(positions), cache)
    got = [np.asarray(logits)[np.arange(B), lengths - 1]]
    for t in range(steps.shape[1]):
        logits, cache = step(jnp.asarray(steps[:, t:t + 1], jnp.int32),
                             jnp.asarray((lengths + t)[:, None], jnp.int32), cache, T + t)
        got.append(np.asarray(logits)[:, 0])
    for b in range(B):
        ids = np.concatenate([inputs["input_ids"][b][mask[b]], steps[b]])[None]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(inputs["pixel_values"][b:b + 1]),
                        image_sizes=torch.tensor(inputs["image_sizes"][b:b + 1])).logits[0].numpy()
        want = ref[lengths[b] - 1:]
        assert max_rel_err(np.stack([g[b] for g in got]), want) <= TOL


# -------------------------------------------------------------------------------------------- key layouts

def _rename(key: str, layout: KeyLayout) -> str:
    """A transformers-5 `save_pretrained` key (`language_model.model.*`, `vision_tower.*`) in `layout`."""
    for old, new in (("language_model.model.", layout.text_prefix),
                     ("language_model.lm_head.weight", layout.lm_head_key),
                     ("vision_tower.", layout.vision_prefix),
                     ("multi_modal_projector.", layout.projector_prefix),
                     ("image_newline", layout.newline_key)):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """The HF model saved by `save_pretrained`, and copies with its tensors renamed into the other layouts."""
    name = "mistral_gqa2"
    root = tmp_path_factory.mktemp("llava")
    base = root / "saved"
    hf_model(name).save_pretrained(base)
    tensors = load_file(base / "model.safetensors")
    dirs = {"saved": base}
    for layout in (KeyLayout(False, True), KeyLayout(False, False), KeyLayout(True, True), KeyLayout(True, False)):
        d = root / layout.name.replace("+", "_")
        d.mkdir()
        (d / "config.json").write_text((base / "config.json").read_text())
        save_file({_rename(k, layout): v for k, v in tensors.items()}, d / "model.safetensors",
                  metadata={"format": "pt"})
        dirs[layout] = d
    return dirs


def test_save_pretrained_layout_detected(saved_dirs):
    keys = set(load_file(saved_dirs["saved"] / "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in keys and "vision_tower.embeddings.class_embedding" in keys
    assert detect_layout(keys) == KeyLayout(nested=False, vision_model=False)
    with pytest.raises(spec.ConversionError, match="embed_tokens"):
        detect_layout({"model.embed_tokens.weight"})


@pytest.mark.parametrize("layout", [KeyLayout(False, True), KeyLayout(False, False), KeyLayout(True, True),
                                    KeyLayout(True, False)], ids=lambda k: k.name)
def test_both_key_layouts_load(saved_dirs, layout):
    name = "mistral_gqa2"
    d = saved_dirs[layout]
    vlm = load_vlm(d)
    assert detect_layout(load_file(d / "model.safetensors").keys()) == layout
    inputs = batch(name)  # the batch shape of test_logits_match_hf: the compilation is shared
    ours = vlm.logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    ref = hf_logits(hf_model(name), inputs)
    assert valid_err(ours, ref, inputs["attention_mask"]) <= TOL
    # HF reads the renamed checkpoint too (the layout is a real one) and gives the same logits.
    if layout == KeyLayout(False, True):
        again = LlavaNextForConditionalGeneration.from_pretrained(d).eval()
        assert valid_err(hf_logits(again, inputs), ref, inputs["attention_mask"]) == 0.0


def test_missing_tensor_names_the_key(saved_dirs, tmp_path):
    tensors = load_file(saved_dirs["saved"] / "model.safetensors")
    del tensors["multi_modal_projector.linear_2.bias"]
    (tmp_path / "config.json").write_text((saved_dirs["saved"] / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(spec.ConversionError, match="multi_modal_projector.linear_2.bias"):
        load_vlm(tmp_path)
    cfg = json.loads((saved_dirs["saved"] / "config.json").read_text())
    keys = set(load_file(saved_dirs["saved"] / "model.safetensors"))
    with pytest.raises(spec.ConversionError, match="lm_head"):
        checkpoint_spec(cfg, keys - {"language_model.lm_head.weight"})


def test_greedy_generate_matches_hf_generate():
    """`VLM.generate` (prefill with images, then the shared sampler) equals HF greedy `generate` on a
    left-padded batch of 3 images of different sizes and prompts of different lengths; a row stops at its
    first EOS, exactly as in HF."""
    name = "mistral_mqa_window"
    model = hf_model(name)
    inputs = batch(name, IMAGE_HW[:3], TEXTS[:3])
    assert len(set(inputs["attention_mask"].sum(1))) == 3
    T, new = inputs["input_ids"].shape[1], 6
    with torch.no_grad():
        ref = model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, do_sample=False,
                             max_new_tokens=new, eos_token_id=2, pad_token_id=3).numpy()[:, T:]
    res = ours_vlm(name).generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                  inputs["attention_mask"], max_new_tokens=new, eos_token_id=2)
    assert res.tokens.shape == (3, new) and res.num_candidates == 1
    for b in range(3):
        n = res.lengths[b]
        assert 1 <= n <= new and np.array_equal(res.tokens[b, :n], ref[b, :n])
        assert n == new or ref[b, n - 1] == 2
        assert (ref[b, n:] == 3).all()                     # HF pads after the EOS: nothing was cut short


def test_sharded_load_and_forward(saved_dirs):
    """On a (data 2, fsdp 2, tensor 2) mesh of CPU devices: parameters placed by their logical axes,
    activations constrained, same logits."""
    from vimar_jax.sharding import make_mesh

    name = "mistral_gqa2"
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    vlm = load_vlm(saved_dirs["saved"], mesh=mesh)
    kernel = vlm.module.decoder.layers.q_proj[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    inputs = batch(name, IMAGE_HW[:4], TEXTS[:4])
    ours = vlm.logits(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    assert valid_err(ours, hf_logits(hf_model(name), inputs), inputs["attention_mask"]) <= TOL


def test_own_processor_feeds_vlm(saved_dirs, tmp_path):
    """`VLM.processor` (ours, from the directory's tokenizer/preprocessor files) gives the same arrays as HF's
    processor, hence the same logits."""
    import shutil

    name = "mistral_gqa2"
    d = tmp_path / "with_processor"
    shutil.copytree(saved_dirs["saved"], d)
    proc = make_processor(CONFIGS[name]["pins"], CONFIGS[name]["side"])
    proc.save_pretrained(d)
    proc.image_processor.save_pretrained(d)
    vlm = load_vlm(d)
    ims, texts = images(IMAGE_HW), TEXTS[:len(IMAGE_HW)]
    ours_in = vlm.processor(ims, texts)
    ref_in = batch(name)
    for k in ("input_ids", "attention_mask", "image_sizes"):
        assert np.array_equal(ours_in[k], ref_in[k]), k
    assert max_rel_err(ours_in["pixel_values"], ref_in["pixel_values"]) <= 1e-6
    ours = vlm.logits(ours_in["input_ids"], ours_in["pixel_values"], ours_in["image_sizes"], ours_in["attention_mask"])
    assert valid_err(ours, hf_logits(hf_model(name), ref_in), ref_in["attention_mask"]) <= TOL
