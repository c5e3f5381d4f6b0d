"""Processor.from_dir against HF LlavaNextProcessor loaded from the same directory."""

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken
from transformers import (LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor,
                          PreTrainedTokenizerFast)

from tests.helpers import max_rel_err
from tests.test_text import TEMPLATE, metaspace_bpe
from vimar_jax import image as vi
from vimar_jax.processor import Processor

CONFIGS = {  # name -> (image_size, patch_size, pinpoints)
    "tiny": (32, 8, [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]),
    "real": (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
}


def make_checkpoint(path, name, padding_side):
    s, p, pins = CONFIGS[name]
    backend = metaspace_bpe()
    backend.add_special_tokens([AddedToken("<image>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side=padding_side, add_bos_token=True)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                    image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=p,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=TEMPLATE)
    proc.save_pretrained(path)
    config = LlavaNextConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=s, patch_size=p),
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=320),
        image_grid_pinpoints=pins, image_token_index=backend.token_to_id("<image>"))
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return LlavaNextProcessor.from_pretrained(path)


def image(rng, h, w, mode="RGB"):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


@pytest.mark.parametrize("name,padding_side", [("tiny", "right"), ("tiny", "left"), ("real", "left")])
def test_processor_matches_hf(tmp_path, rng, name, padding_side):
    hf = make_checkpoint(tmp_path, name, padding_side)
    ours = Processor.from_dir(tmp_path)
    s = CONFIGS[name][0]
    images = [image(rng, s + 7, 3 * s - 1), image(rng, 5, 4 * s, "L"), image(rng, 2 * s, 2 * s, "RGBA"),
              image(rng, 41, 29)]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it in detail."}]}]
    prompt = hf.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == prompt
    texts = ["<image>\nWhat is this? It is a cat.", "Compare <image> with <image>, e.g. colours.",
             prompt.removeprefix("<s>")]
    ref = hf(images=images[:4], text=texts, padding=True, return_tensors="np")
    got = ours(images[:4], texts)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(got["image_sizes"], ref["image_sizes"])
    assert got["input_ids"].dtype == np.int32 and got["image_sizes"].dtype == np.int32
    assert got["pixel_values"].dtype == np.float32 and got["pixel_values"].shape == ref["pixel_values"].shape
    assert max_rel_err(got["pixel_values"], ref["pixel_values"]) <= 1e-6
    # padding really happened on the configured side, and the placeholders were expanded
    lengths = got["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3
    col = 0 if padding_side == "left" else -1
    assert (got["attention_mask"][:, col] == 0).any()
    n_img = (got["input_ids"] == ours.image_token_id).sum(1)
    sizes = [im.size[::-1] for im in images]
    assert n_img.tolist() == [ours.num_image_tokens(sizes[0]),
                              ours.num_image_tokens(sizes[1]) + ours.num_image_tokens(sizes[2]),
                              ours.num_image_tokens(sizes[3])]


def test_processor_text_only_and_static_padding(tmp_path, rng):
    hf = make_checkpoint(tmp_path, "tiny", "right")
    ours = Processor.from_dir(tmp_path)
    texts = ["A cat sat.", "Two dogs ran away quickly!"]
    ref = hf(text=texts, padding=True, return_tensors="np")
    got = ours(texts=texts)
    assert set(got) == {"input_ids", "attention_mask"}
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    # pixel views padded to the static maximum; the extra views are zeros
    cfg = ours.image_config
    out = ours([image(rng, 20, 20)], ["<image> hi"], pad_patches_to=cfg.max_num_patches)
    assert out["pixel_values"].shape == (1, cfg.max_num_patches, 3, 32, 32)
    n = cfg.num_patches((20, 20))
    assert not out["pixel_values"][0, n:].any() and out["pixel_values"][0, :n].any()
    index, n_tokens = ours.feature_gather_index(out["image_sizes"], cfg.max_num_patches)
    assert n_tokens[0] == (out["input_ids"] == ours.image_token_id).sum()


def test_processor_errors(tmp_path, rng):
    make_checkpoint(tmp_path, "tiny", "right")
    ours = Processor.from_dir(tmp_path)
    with pytest.raises(ValueError, match="placeholders"):
        ours([image(rng, 10, 10)], ["no image here"])
    with pytest.raises(ValueError, match="placeholders"):
        ours(None, ["<image>"])
    with pytest.raises(ValueError, match="texts"):
        ours([image(rng, 10, 10)])
    with pytest.raises(ValueError, match="pad_to"):
        ours([image(rng, 10, 30)], ["<image>"], pad_patches_to=1)
    with pytest.raises(ValueError, match="image token"):
        Processor(ours.tokenizer, ours.image_config, image_token="<img>")
    assert isinstance(ours.image_config, vi.ImageConfig)
