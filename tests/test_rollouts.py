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
