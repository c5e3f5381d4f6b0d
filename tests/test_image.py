"""Anyres preprocessing, token counts and the feature gather index against Hugging Face's own code paths."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessorPil, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextModel,
                          LlavaNextProcessor, PreTrainedTokenizerFast)

from tests.helpers import max_rel_err
from vimar_jax import image as vi

REAL_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96], [64, 96], [96, 64]]

# name -> (vision image_size, patch_size, pinpoints, strategy, has_cls)
CONFIGS = {
    "real": (336, 14, REAL_PINS, "default", True),
    "tiny": (32, 8, TINY_PINS, "default", True),
    "tiny_full_nocls": (32, 8, TINY_PINS, "full", False),
}


def our_cfg(name):
    s, p, pins, strategy, has_cls = CONFIGS[name]
    return vi.ImageConfig(image_size=s, patch_size=p, pinpoints=tuple(map(tuple, pins)), strategy=strategy,
                          has_cls=has_cls, size=(("shortest_edge", s),), crop_size=(s, s))


def hf_image_processor(name):
    s, _, pins, _, _ = CONFIGS[name]
    return LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                      image_grid_pinpoints=pins)


def hf_processor(name):
    _, p, _, strategy, has_cls = CONFIGS[name]
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "describe": 2, "it": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    hft = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    return LlavaNextProcessor(image_processor=hf_image_processor(name), tokenizer=hft, patch_size=p,
                              vision_feature_select_strategy=strategy, num_additional_image_tokens=int(has_cls))


def random_sizes(rng, n, max_side):
    """Random (h, w) sizes plus the extremes: slivers, tiny images, odd and exact-pinpoint sizes."""
    fixed = [(1, 1), (1, 2), (2, 1), (1, 2000), (2000, 1), (3000, 7), (7, 3000), (3, 5), (13, 17),
             (336, 672), (672, 336), (337, 673), (335, 671), (480, 640), (640, 640), (1000, 999),
             (32, 64), (64, 32), (31, 63), (96, 96), (5000, 4999)]
    out = list(fixed)
    while len(out) < n:
        kind = rng.integers(4)
        if kind == 0:  # anything
            out.append((int(rng.integers(1, max_side)), int(rng.integers(1, max_side))))
        elif kind == 1:  # extreme aspect ratios
            a, b = int(rng.integers(1, 12)), int(rng.integers(200, 4 * max_side))
            out.append((a, b) if rng.integers(2) else (b, a))
        elif kind == 2:  # tiny
            out.append((int(rng.integers(1, 40)), int(rng.integers(1, 40))))
        else:  # near a 4:3 / 16:9 photo
            w = int(rng.integers(100, max_side))
            out.append((int(w * rng.choice([0.75, 0.5625, 1.333, 1.0])) + int(rng.integers(-2, 3)), w))
    return [(max(h, 1), max(w, 1)) for h, w in out]


def random_image(rng, h, w, mode="RGB"):
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(arr[..., :3])
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    return Image.fromarray(arr[..., 0], "L")


# ---------------------------------------------------------------------------------------------------------
# Geometry and counts
# ---------------------------------------------------------------------------------------------------------


def test_select_best_resolution_matches_hf(rng):
    from transformers.image_processing_utils import select_best_resolution as hf_select

    for hw in random_sizes(rng, 300, 3000):
        for pins in (REAL_PINS, TINY_PINS):
            assert vi.select_best_resolution(hw, pins) == tuple(hf_select(hw, pins)), (hw, pins)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_num_image_tokens_matches_hf_processor(name, rng):
    """>= 250 sizes per config against HF's own count (the function its text path calls per image)."""
    s, p, pins, strategy, has_cls = CONFIGS[name]
    proc = hf_processor(name)
    sizes = random_sizes(rng, 250, 3000 if s > 100 else 400)
    ref = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    ours = [vi.num_image_tokens(hw, image_size=s, patch_size=p, pinpoints=pins, strategy=strategy, has_cls=has_cls)
            for hw in sizes]
    bad = [(hw, a, b) for hw, a, b in zip(sizes, ours, ref) if a != b]
    assert not bad, bad[:10]
    # The values are not trivial: many distinct counts, and the documented COCO numbers for the real config.
    assert len(set(ref)) > (40 if s > 100 else 10)
    if name == "real":
        assert vi.num_image_tokens((480, 640), image_size=336, patch_size=14, pinpoints=REAL_PINS,
                                   strategy="default") == 2340
        assert our_cfg(name).num_image_tokens((640, 640)) == 2928
    # The static bound holds.
    assert max(ours) <= our_cfg(name).max_image_tokens


@pytest.mark.parametrize("name", ["real", "tiny"])
def test_image_tokens_in_hf_input_ids(name, rng):
    """End to end through HF's text path: the <image> tokens it inserts for real images."""
    proc = hf_processor(name)
    cfg = our_cfg(name)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    sizes = [(1, 300), (300, 2), (37, 41), (480, 640), (700, 333), (5, 5)]
    images = [random_image(rng, h, w) for h, w in sizes]
    out = proc(images=images, text=["describe <image> it"] * len(images), padding=True, return_tensors="np")
    counts = (out["input_ids"] == image_id).sum(1)
    assert list(counts) == [cfg.num_image_tokens(hw) for hw in sizes]


# ---------------------------------------------------------------------------------------------------------
# Feature gather against HF pack_image_features / get_image_features
# ---------------------------------------------------------------------------------------------------------


def tiny_llava(name):
    s, p, pins, strategy, _ = CONFIGS[name]
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=s, patch_size=p)
    text = dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins,
                             vision_feature_select_strategy=strategy, image_token_index=63)
    torch.manual_seed(0)
    return LlavaNextModel(config).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_feature_gather_index_matches_hf_pack(name, rng):
    cfg = our_cfg(name)
    model = tiny_llava(name)
    s = cfg.image_size
    sizes = [(1, 300), (300, 2), (480, 640), (640, 480), (17, 900), (s, 2 * s), (2 * s + 1, s), (999, 1000),
             (3, 3), (1000, 7)]
    sizes += random_sizes(rng, 30, 2000)[21:]
    E = 3
    n_views = [cfg.num_patches(hw) for hw in sizes]
    NP = max(n_views) + 1  # padded further than the batch needs, as a static-shape caller would
    P = cfg.tokens_per_view
    feats = rng.standard_normal((len(sizes), NP, P, E)).astype(np.float32)
    newline = rng.standard_normal((E,)).astype(np.float32)

    # HF: drop CLS under "default" (get_image_features does `[:, 1:]`), unpad and pack per image.
    sel = feats[:, :, 1:] if cfg.strategy == "default" else feats
    hf_list = [torch.from_numpy(sel[b, :n]) for b, n in enumerate(n_views)]
    with torch.no_grad():
        packed, lens = model.pack_image_features(hf_list, torch.tensor(sizes), cfg.strategy,
                                                 image_newline=torch.from_numpy(newline))

    index, n_tokens = vi.feature_gather_index(sizes, NP, cfg)
    assert index.dtype == np.int32 and index.shape == (len(sizes), cfg.max_image_tokens)
    flat = np.concatenate([feats.reshape(-1, E), newline[None]])
    assert list(n_tokens) == lens.tolist()
    for b in range(len(sizes)):
        np.testing.assert_array_equal(flat[index[b, :n_tokens[b]]], packed[b].numpy())
        # padding slots read the (harmless) newline row
        assert np.all(index[b, n_tokens[b]:] == flat.shape[0] - 1)
        assert n_tokens[b] == cfg.num_image_tokens(sizes[b])


def test_feature_gather_matches_hf_get_image_features(rng):
    """Through HF's whole vision path (tower, layer -2, CLS drop, projector, pack) on real pixel values."""
    name = "tiny"
    cfg = our_cfg(name)
    model = tiny_llava(name)
    sizes = [(40, 100), (90, 20), (33, 33)]
    images = [random_image(rng, h, w) for h, w in sizes]
    pixel_values, image_sizes = vi.batch_pixel_values(images, cfg)
    pv = torch.from_numpy(pixel_values)
    with torch.no_grad():
        ref = model.get_image_features(pv, torch.from_numpy(image_sizes.astype(np.int64)),
                                       vision_feature_layer=-2, vision_feature_select_strategy="default")
        ref = ref.pooler_output
        # Ours: every view's tokens (CLS included) projected, then one gather.
        B, NP = pv.shape[:2]
        hidden = model.vision_tower(pv.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
        feats = model.multi_modal_projector(hidden).reshape(B, NP, cfg.tokens_per_view, -1).numpy()
        newline = model.image_newline.numpy()
    index, n_tokens = vi.feature_gather_index(image_sizes, NP, cfg)
    flat = np.concatenate([feats.reshape(-1, feats.shape[-1]), newline[None]])
    for b in range(B):
        assert max_rel_err(flat[index[b, :n_tokens[b]]], ref[b].numpy()) <= 1e-6


def test_feature_gather_errors():
    cfg = our_cfg("tiny")
    with pytest.raises(ValueError, match="views"):
        vi.feature_gather_index([(32, 96)], 2, cfg)
    with pytest.raises(ValueError, match="CLS"):
        vi.feature_gather_index([(32, 96)], 5, vi.ImageConfig(image_size=32, patch_size=8, strategy="full",
                                                              pinpoints=((32, 64),)))
    with pytest.raises(ValueError, match="pinpoints"):
        vi.ImageConfig(image_size=32, patch_size=8, pinpoints=((30, 64),))
    with pytest.raises(ValueError, match="strategy"):
        vi.ImageConfig(strategy="cls")


# ---------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["real", "tiny"])
def test_pixel_values_match_hf(name, rng):
    cfg = our_cfg(name)
    ip = hf_image_processor(name)
    s = cfg.image_size
    cases = [(s * 2 - 5, s + 3, "RGB"), (7, 3 * s + 11, "RGB"), (s // 2, s // 3, "L"), (2 * s, 2 * s, "RGBA"),
             (3 * s + 1, 29, "RGB"), (1, 1, "RGB")]
    images = [random_image(rng, h, w, mode) for h, w, mode in cases]
    ref = ip(images, return_tensors="np")
    ours, sizes = vi.batch_pixel_values(images, cfg)
    assert ours.shape == ref["pixel_values"].shape and ours.dtype == np.float32
    np.testing.assert_array_equal(sizes, ref["image_sizes"])
    err = np.abs(ours - ref["pixel_values"]).max()
    assert err <= 1e-6 and max_rel_err(ours, ref["pixel_values"]) <= 1e-6, err
    # numpy HWC input goes through the same path
    arr = np.asarray(images[0])
    np.testing.assert_array_equal(vi.preprocess_anyres(arr, cfg), ours[0, :cfg.num_patches(arr.shape[:2])])


@pytest.mark.parametrize("size,crop", [({"shortest_edge": 336}, 336), ({"shortest_edge": 224}, 200),
                                       ({"height": 64, "width": 48}, 48), ({"shortest_edge": 40}, 64)])
def test_clip_preprocess_matches_hf(size, crop, rng):
    ip = CLIPImageProcessorPil(size=size, crop_size={"height": crop, "width": crop})
    cfg = vi.ImageConfig.from_hf({"model_type": "clip", "vision_config": {"image_size": crop, "patch_size": 8}},
                                 ip.to_dict())
    for h, w, mode in [(480, 640, "RGB"), (37, 1000, "RGB"), (300, 299, "RGBA"), (20, 30, "L")]:
        img = random_image(rng, h, w, mode)
        ref = ip(img, return_tensors="np")["pixel_values"][0]
        ours = vi.clip_preprocess(img, cfg)
        assert ours.shape == ref.shape == (3, crop, crop) and ours.dtype == np.float32
        assert max_rel_err(ours, ref) <= 1e-6


def test_image_config_from_hf_files(tmp_path):
    import json

    model_config = LlavaNextConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
        image_grid_pinpoints=TINY_PINS).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(model_config))
    hf_image_processor("tiny").save_pretrained(tmp_path)
    cfg = vi.ImageConfig.from_dir(tmp_path)
    assert (cfg.image_size, cfg.patch_size, cfg.strategy, cfg.has_cls) == (32, 8, "default", True)
    assert cfg.pinpoints == tuple(map(tuple, TINY_PINS)) and cfg.crop_size == (32, 32)
    assert cfg.tokens_per_view == 17 and cfg.max_num_patches == 7
    # A processor_config.json that would make HF insert one token too few is refused.
    (tmp_path / "processor_config.json").write_text(json.dumps({"num_additional_image_tokens": 0}))
    with pytest.raises(ValueError, match="num_additional_image_tokens"):
        vi.ImageConfig.from_dir(tmp_path)
