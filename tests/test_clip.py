"""CLIP port: parity with HF torch `CLIPModel`/`CLIPVisionModel`, rules, and the `load_clip` API."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModel as HFVisionModel

from tests.helpers import max_rel_err
from vimar_jax import sharding
from vimar_jax.convert import spec
from vimar_jax.models import clip as C

TOL = 1e-5

# Two tiny configs: OpenAI-style (quick_gelu, legacy eos_token_id == 2 pooling) and a gelu one with a
# different image/patch size, eps and the first-EOS pooling rule.
CONFIGS = {
    "quick_gelu": dict(
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0,
                  pad_token_id=1),
        vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16),
    "gelu": dict(
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=20, hidden_act="gelu", layer_norm_eps=1e-6, eos_token_id=98,
                  bos_token_id=97, pad_token_id=0),
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                    image_size=48, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=24),
}


def _hf_clip(name, seed=0):
    c = CONFIGS[name]
    torch.manual_seed(seed)
    model = HFCLIPModel(HFCLIPConfig(text_config=c["text"], vision_config=c["vision"],
                                     projection_dim=c["projection_dim"], logit_scale_init_value=2.0))
    # Non-trivial norms and biases (HF initialises them to 1 / 0).
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k.endswith("bias") or "layer_norm" in k or "layrnorm" in k or "layernorm" in k:
                v.add_(0.1 * torch.randn_like(v))
    return model.eval()


def _abstract(cls, cfg):
    """A module without initialised values (eager random init compiles one op per shape: slow on CPU)."""
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def _ours(hf_model):
    cfg = C.CLIPConfig.from_hf(hf_model.config.to_dict())
    model = _abstract(C.CLIPModel, cfg)
    spec.from_torch_state_dict(model, C.clip_rules(cfg), hf_model.state_dict())
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = _hf_clip(request.param)
    return request.param, hf, _ours(hf)


def _pixels(cfg, n=3, seed=0):
    v = cfg["vision"]
    return np.random.default_rng(seed).normal(size=(n, 3, v["image_size"], v["image_size"])).astype(np.float32)


def _text_batch(cfg, seed=0):
    """Right-padded batch: BOS, random tokens, EOS, then padding (lengths differ per row)."""
    t = cfg["text"]
    rng = np.random.default_rng(seed)
    lengths = [5, 12, 3, 9]
    T = max(lengths)
    ids = np.full((len(lengths), T), t["pad_token_id"], np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0] = t["bos_token_id"]
        ids[i, 1:n - 1] = rng.integers(3, 90, size=n - 2)
        ids[i, n - 1] = t["eos_token_id"] if t["eos_token_id"] != 2 else 98   # legacy rule: argmax(ids)
        mask[i, :n] = 1
    return ids, mask


@nnx.jit
def _vision_all(model, px):
    """One compile for every vision output the parity test checks."""
    hs = model.vision.hidden_states
    return dict(call=model.vision(px), single={k: hs(px, k) for k in (0, 1, -2, -1)}, multi=hs(px, (-2, 0, 1)))


@nnx.jit
def _text_call(model, ids, mask):
    return model.text(ids, mask)


@nnx.jit
def _embeds(model, px, ids, mask):
    return model.image_embeds(px), model.text_embeds(ids, mask)


# ------------------------------------------------------------------------------------------------ parity


def test_vision_parity(pair):
    name, hf, ours = pair
    px = _pixels(CONFIGS[name])
    with torch.no_grad():
        ref = hf.vision_model(torch.from_numpy(px), output_hidden_states=True)
    out = _vision_all(ours, jnp.asarray(px))
    last, pooled = out["call"]
    assert max_rel_err(pooled, ref.pooler_output.numpy()) <= TOL
    assert max_rel_err(last, ref.last_hidden_state.numpy()) <= TOL
    hs = [h.numpy() for h in ref.hidden_states]
    assert len(hs) == ours.config.vision.num_layers + 1
    for k, got in out["single"].items():
        assert max_rel_err(got, hs[k]) <= TOL, k
    assert max_rel_err(out["multi"], np.concatenate([hs[-2], hs[0], hs[1]], axis=-1)) <= TOL


def test_text_parity_with_padding(pair):
    name, hf, ours = pair
    ids, mask = _text_batch(CONFIGS[name])
    with torch.no_grad():
        ref = hf.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    last, pooled = _text_call(ours, jnp.asarray(ids), jnp.asarray(mask))
    assert max_rel_err(pooled, ref.pooler_output.numpy()) <= TOL
    valid = mask.astype(bool)   # padded positions are garbage in both; compare real tokens
    assert max_rel_err(np.asarray(last)[valid], ref.last_hidden_state.numpy()[valid]) <= TOL
    # Padding must not change a row's result: each row alone, unpadded.
    for i in range(len(ids)):
        n = int(mask[i].sum())
        _, alone = _text_call(ours, jnp.asarray(ids[i:i + 1, :n]), jnp.asarray(mask[i:i + 1, :n]))
        assert max_rel_err(alone[0], ref.pooler_output.numpy()[i]) <= TOL


def test_model_embeddings_and_cosine(pair):
    name, hf, ours = pair
    cfg = CONFIGS[name]
    px = _pixels(cfg, n=4, seed=1)
    ids, mask = _text_batch(cfg, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(px))
    img, txt = _embeds(ours, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
    assert max_rel_err(img, ref.image_embeds.numpy()) <= TOL
    assert max_rel_err(txt, ref.text_embeds.numpy()) <= TOL
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, rtol=1e-6)
    cos_ref = (ref.logits_per_image / hf.logit_scale.exp()).detach().numpy()   # [N_img, N_txt] cosine
    assert max_rel_err(C.cosine_similarity(img, txt, matrix=True), cos_ref) <= TOL
    assert max_rel_err(C.cosine_similarity(img, txt), np.diag(cos_ref)) <= TOL


def test_standalone_vision_model_from_llava_style_config():
    # A LLaVA `vision_config` omits defaults (hidden_act, layer_norm_eps): HF class defaults apply.
    vc = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16, vocab_size=32000)
    torch.manual_seed(3)
    hf = HFVisionModel(HFVisionConfig(**vc)).eval()
    cfg = C.CLIPVisionConfig.from_hf(vc)
    assert cfg.hidden_act == "quick_gelu" and cfg.layer_norm_eps == 1e-5
    ours = _abstract(C.CLIPVision, cfg)
    sd = hf.state_dict()
    rules = C.clip_vision_rules(cfg, hf_prefix="", our_prefix=())
    assert {r.hf_key for r in rules} == set(sd)   # post_layernorm included
    spec.from_torch_state_dict(ours, rules, sd)
    px = _pixels(dict(vision=vc), n=2, seed=4)
    with torch.no_grad():
        ref = hf(torch.from_numpy(px), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m.hidden_states(x, -2))(ours, jnp.asarray(px))
    assert max_rel_err(got, ref.hidden_states[-2].numpy()) <= TOL


# ------------------------------------------------------------------------------------------------ rules


def test_rules_exact_round_trip(pair):
    _, hf, ours = pair
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    rules = C.clip_rules(ours.config)
    shapes = spec.param_shapes(ours)
    spec.check_rules(rules, shapes)
    assert sorted(r.hf_key for r in rules) == sorted(sd)
    flat = spec.assemble(rules, shapes, sd.__getitem__)
    back = spec.disassemble(rules, flat)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # The module loaded through the same rules holds exactly the assembled arrays.
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        assert np.array_equal(np.asarray(var.get_value()), flat[tuple(str(x) for x in path)]), path


def test_rules_with_prefix_and_checkpoint_spec():
    hf = _hf_clip("gelu")
    cfg_dict = hf.config.to_dict()
    keys = set(hf.state_dict())
    s = C.checkpoint_spec(cfg_dict, keys)
    assert s.kind == "clip" and s.layout == {"hf_prefix": "", "buffer_keys": []}
    model = nnx.eval_shape(lambda: s.make_module(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    spec.check_rules(s.rules, spec.param_shapes(model))
    # A prefixed layout (e.g. nested in a bigger checkpoint) with old position_ids buffers.
    pre = {"clip." + k for k in keys} | {"clip.text_model.embeddings.position_ids",
                                         "clip.vision_model.embeddings.position_ids"}
    s2 = C.checkpoint_spec(cfg_dict, pre)
    assert s2.layout["hf_prefix"] == "clip."
    assert s2.layout["buffer_keys"] == ["clip.text_model.embeddings.position_ids",
                                        "clip.vision_model.embeddings.position_ids"]
    assert {r.hf_key for r in s2.rules} == {"clip." + k for k in keys}
    with pytest.raises(spec.ConversionError, match="visual_projection.weight"):
        C.checkpoint_spec(cfg_dict, keys - {"visual_projection.weight"})
    with pytest.raises(spec.ConversionError, match="surprise.weight"):
        C.checkpoint_spec(cfg_dict, keys | {"surprise.weight"})
    # A wrongly shaped tensor is named when assembling.
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    sd["text_projection.weight"] = sd["text_projection.weight"][:, :-1]
    with pytest.raises(spec.ConversionError, match="text_projection.weight"):
        spec.assemble(s.rules, spec.param_shapes(model), sd.__getitem__)


# ------------------------------------------------------------------------------------------- config/misc


def test_config_errors_and_bad_shapes(pair):
    name, hf, ours = pair
    d = hf.config.to_dict()
    bad = dict(d, vision_config=dict(d["vision_config"], hidden_act="mish_tanh"))
    with pytest.raises(ValueError, match="hidden_act"):
        C.CLIPConfig.from_hf(bad)
    with pytest.raises(ValueError, match="eos_token_id"):
        C.CLIPConfig.from_hf(dict(d, text_config=dict(d["text_config"], eos_token_id=[2, 3])))
    s = CONFIGS[name]["vision"]["image_size"]
    with pytest.raises(ValueError, match=r"pixel_values .*got shape \(1, 3, %d, %d\)" % (s + 1, s)):
        ours.vision(jnp.zeros((1, 3, s + 1, s)))
    T = CONFIGS[name]["text"]["max_position_embeddings"] + 1
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.text(jnp.ones((1, T), jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        ours.vision.hidden_states(jnp.zeros((1, 3, s, s)), 99)


def test_remat_gradients_match():
    cfg = C.CLIPVisionConfig.from_hf(CONFIGS["gelu"]["vision"])
    px = jnp.asarray(_pixels(CONFIGS["gelu"], n=2))
    rng = np.random.default_rng(0)
    flat = {p: rng.normal(size=shape).astype(dt) * 0.2
            for p, (shape, dt) in spec.param_shapes(_abstract(C.CLIPVision, cfg)).items()}
    grads = []
    for remat in ("none", "full", "dots"):
        model = _abstract(C.CLIPVision, dataclasses.replace(cfg, remat=remat))
        spec.load_into(model, flat)
        g = nnx.grad(lambda m: jnp.sum(m(px)[1] * jnp.arange(cfg.hidden_size)))(model)
        grads.append(np.asarray(g.layers.fc1.get_value()))
    assert np.abs(grads[0]).max() > 0
    assert max_rel_err(grads[1], grads[0]) <= TOL and max_rel_err(grads[2], grads[0]) <= TOL


def test_sharded_params_and_activations(pair):
    name, hf, ours = pair
    # data=2 x fsdp=2 x tensor=2 hits an XLA CPU SPMD miscompile (batch on (data, fsdp) with a weight
    # sharded (tensor, fsdp)): wrong numbers from a plain matmul, see the report; this mesh avoids it.
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    state = nnx.state(ours, nnx.Param)
    shardings = sharding.state_shardings(state, mesh)
    sharded = jax.device_put(state, shardings)
    # q_proj [L, E, H, D]: embed on fsdp, heads on tensor.
    assert sharded["vision"]["layers"]["q_proj"].get_value().sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    model = nnx.merge(nnx.graphdef(ours), sharded)
    ids, mask = _text_batch(CONFIGS[name])
    px = _pixels(CONFIGS[name], n=4)
    with sharding.use_rules(mesh):
        img, txt = _embeds(model, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
    img0, txt0 = _embeds(ours, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
    assert max_rel_err(img, img0) <= TOL and max_rel_err(txt, txt0) <= TOL


# ------------------------------------------------------------------------------------------- load_clip


def _clip_tokenizer(out_dir):
    """A tiny CLIP-style byte-level BPE `tokenizer.json` (CLIP's normaliser, splitter, `</w>` suffix and
    BOS/EOS post-processor), trained on a few words; loadable by HF `CLIPTokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token="<|endoftext|>", continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                                   r"[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    words = "a photo of red blue green cat dog circle square triangle on the left right big small two".split()
    trainer = BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                         end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 5, trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", eos), ("<|startoftext|>", bos),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")))
    return tok.get_vocab_size(), bos, eos


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny HF CLIP directory written by `save_pretrained` (model + CLIPProcessor) and the HF objects."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab, bos, eos = _clip_tokenizer(d)
    c = CONFIGS["quick_gelu"]
    text = dict(c["text"], vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(7)
    hf = HFCLIPModel(HFCLIPConfig(text_config=text, vision_config=c["vision"], projection_dim=16)).eval()
    hf.save_pretrained(d)
    s = c["vision"]["image_size"]
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
                              AutoTokenizer.from_pretrained(d))
    processor.save_pretrained(d)
    return d, hf, CLIPProcessor.from_pretrained(d)


def _images():
    rng = np.random.default_rng(3)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (45, 33), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (20, 70, 4), dtype=np.uint8), mode="RGBA")
    return [rgb(40, 50), rgb(64, 32), rgb(17, 90), gray, rgba]


TEXTS = ["A photo of a red cat.", "two big blue squares on the left!", "dog",
         " ".join(["a small green triangle"] * 30),   # ~120 tokens: truncated to 77, never dropped
         "Circle?"]


def test_load_clip_matches_hf_processor_and_model(clip_dir):
    from vimar_jax.clip import load_clip

    d, hf, processor = clip_dir
    clip = load_clip(d, batch_size=4)   # 5 rows -> chunks of 4 and 1
    images = _images()
    ref_in = processor(text=TEXTS, images=images, return_tensors="pt", padding=True, truncation=True,
                       max_length=77)
    ids, mask = clip.tokenize(TEXTS)
    np.testing.assert_array_equal(ids, ref_in["input_ids"].numpy())
    np.testing.assert_array_equal(mask, ref_in["attention_mask"].numpy())
    assert ids.shape[1] == 77 and mask[3].sum() == 77 and ids[3, -1] == clip.tokenizer.eos_token_id
    px = clip.pixel_values(images)
    assert np.abs(px - ref_in["pixel_values"].numpy()).max() <= 1e-6
    with torch.no_grad():
        ref = hf(**ref_in)
    img = clip.embed_images(images)
    txt = clip.embed_texts(TEXTS)
    assert max_rel_err(img, ref.image_embeds.numpy()) <= TOL
    assert max_rel_err(txt, ref.text_embeds.numpy()) <= TOL
    cos = (ref.logits_per_image / hf.logit_scale.exp()).detach().numpy()
    assert max_rel_err(clip.similarity(images, TEXTS), np.diag(cos)) <= TOL
    assert max_rel_err(clip.similarity(images, TEXTS, matrix=True), cos) <= TOL
    # Cached image embeddings: one image against every text, and a preprocessed pixel batch.
    assert max_rel_err(clip.similarity_from_embeds(img[2], txt), cos[2]) <= TOL
    assert max_rel_err(clip.embed_images(px), img) <= TOL
    # The order of rows in a batch (and so the padding/chunking) does not matter.
    assert max_rel_err(clip.embed_texts(TEXTS[::-1])[::-1], txt) <= TOL


def test_load_clip_bad_input(clip_dir, tmp_path):
    from vimar_jax.clip import load_clip

    d, _, _ = clip_dir
    clip = load_clip(d)
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        clip.embed_images([missing])
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        clip.embed_images([str(fake)])
    with pytest.raises(TypeError, match="image 1"):
        clip.embed_images([_images()[0], 3.5])
    with pytest.raises(TypeError, match="text 0"):
        clip.embed_texts([None])
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 32, 32\]"):
        clip.embed_pixels(np.zeros((1, 3, 30, 32), np.float32))
    with pytest.raises(ValueError, match="matrix=True"):
        clip.similarity_from_embeds(np.ones((2, 16)), np.ones((3, 16)))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_clip(tmp_path / "no_such_dir")
    assert clip.embed_texts([]).shape == (0, 16) and clip.embed_images([]).shape == (0, 16)
    # A real image file on disk works like the PIL image.
    good = tmp_path / "ok.png"
    _images()[1].save(good)
    np.testing.assert_array_equal(clip.embed_images([good]), clip.embed_images([_images()[1]]))


def test_load_clip_from_converted_dir(clip_dir, tmp_path):
    from vimar_jax.clip import load_clip
    from vimar_jax.convert import io

    d, _, _ = clip_dir
    out = tmp_path / "converted"
    io.convert_to_vimar(d, out)
    a = load_clip(d).embed_texts(TEXTS[:2])
    b = load_clip(out).embed_texts(TEXTS[:2])
    np.testing.assert_array_equal(a, b)
    # bfloat16 compute: float32 unit-norm embeddings close to the float32 ones.
    c = load_clip(out, dtype=jnp.bfloat16).embed_texts(TEXTS[:2])
    assert c.dtype == np.float32 and max_rel_err(c, a) <= 5e-2
    np.testing.assert_allclose(np.linalg.norm(c, axis=-1), 1.0, rtol=1e-5)
