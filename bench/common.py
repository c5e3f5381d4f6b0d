"""Timing helpers shared by the benchmarks: warm-up, blocking, interleaved medians, one table format.

Benchmarks print **ratios measured side by side in one run** (ours vs the alternative, same inputs, same
machine, the contenders taking turns so that load changes hit both alike), never absolute pass/fail times.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def block(x: Any) -> Any:
    """Wait for every jax array in the pytree x (torch and numpy values pass through)."""
    import jax

    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, blocking on jax results before the clock stops."""
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def median_times(fns: Sequence[Callable[[], Any]], *, repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function over `repeats` rounds, after `warmup` untimed rounds (compilation).
    The functions take turns within a round, so a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            block(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn)[0])
    return [statistics.median(ts) for ts in times]


def ratio(a: float | None, b: float | None) -> str:
    """a / b as text ('-' when undefined)."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


class Table:
    """Rows of (figure, ours, other, ratio, note), printed with aligned columns."""

    def __init__(self, title: str, columns: Sequence[str] = ("figure", "ours", "other", "ratio", "note")):
        self.title, self.columns = title, list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        row = ["-" if c is None else str(c) for c in cells]
        if len(row) != len(self.columns):
            raise ValueError(f"row has {len(row)} cells, the table has {len(self.columns)} columns")
        self.rows.append(row)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns] + self.rows) for i in range(len(self.columns))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out = [self.title, line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(out + [line(r) for r in self.rows])

    def print(self) -> None:
        print(self.render(), flush=True)


def machine_line() -> str:
    """One line naming the software and the machine (put it above every table)."""
    import jax

    parts = [f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}",
             f"{os.cpu_count()} CPUs", platform.machine()]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        parts.append("load avg {:.1f}".format(os.getloadavg()[0]))
    return ", ".join(parts)


# ------------------------------------------------------------------------------------- tiny-world models

def tiny_world_hf(vocab: int, image_token: int) -> dict:
    """An HF LLaVA-NeXT config dict with the tiny world's shapes (configs/tiny_policy.py, tiny_clip.py)."""
    S = 48
    return {"model_type": "llava_next", "image_token_index": image_token, "vision_feature_layer": -2,
            "image_grid_pinpoints": [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]],
            "vision_config": dict(model_type="clip_vision_model", hidden_size=96, intermediate_size=384,
                                  num_hidden_layers=4, num_attention_heads=4, image_size=S, patch_size=8,
                                  projection_dim=64, hidden_act="quick_gelu"),
            "text_config": dict(model_type="mistral", vocab_size=vocab, hidden_size=128, intermediate_size=384,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None,
                                max_position_embeddings=1024)}


def shipped_tiny_world() -> dict[str, str]:
    """Shipped tiny-world checkpoints under vimar_jax/assets/tiny_world/ by role ("policy", "value", "clip"),
    recognised by their config.json (empty if none are shipped)."""
    import json

    found: dict[str, str] = {}
    root = ROOT / "vimar_jax" / "assets" / "tiny_world"
    for cfg_path in sorted(root.glob("**/config.json")) if root.is_dir() else []:
        d = json.loads(cfg_path.read_text())
        role = {"llava_next": "value" if "vimar_value" in d else "policy", "clip": "clip"}.get(d.get("model_type"))
        if role and role not in found:
            found[role] = str(cfg_path.parent)
    return found


def tiny_world_models(roles: Sequence[str], prefix: str = "vimar_bench_"):
    """(checkpoint directories by role, what they are, a `TemporaryDirectory` to clean up or None): the shipped
    tiny world's when it has every role in `roles`, else random models of its shapes in a temporary directory."""
    import tempfile

    found = shipped_tiny_world()
    if all(r in found for r in roles):
        names = {"policy": "policy", "value": "value model", "clip": "CLIP"}
        return found, "the shipped tiny-world " + " and ".join(names[r] for r in roles), None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return random_tiny_world(tmp.name, roles=tuple(roles)), "random models of the tiny world's shapes", tmp


def random_tiny_world(directory: str, *, seed: int = 0, roles=("policy", "value", "clip")) -> dict[str, str]:
    """Random checkpoints of the tiny world's shapes, in HF format under `directory`: a policy (tiny
    tokenizer "a", chat template, processor), a value model (the policy's weights + a random float32 head,
    `vimar_value` config) and a CLIP. The policy's random weights lean towards words, "." and EOS (a rank-one
    prior through a shared embedding direction), so captions have sentences and end; nothing else is
    trained."""
    import json
    import os

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, PreTrainedTokenizerFast)

    from vimar_jax.data import tiny_tokenizer

    out = {}
    policy = os.path.join(directory, "policy")
    tiny_tokenizer.save_tokenizer(policy, "a")
    tok = tiny_tokenizer.build_tokenizer("a")
    sp = tiny_tokenizer.special_tokens("a")
    ids = {k: tok.token_to_id(sp[k]) for k in ("bos", "eos", "pad")}
    hf = tiny_world_hf(tok.get_vocab_size(), tok.token_to_id(sp["image"]))
    S = hf["vision_config"]["image_size"]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                                   image_grid_pinpoints=hf["image_grid_pinpoints"]),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(policy), patch_size=hf["vision_config"]["patch_size"],
        num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=tiny_tokenizer.CHAT_TEMPLATE_A)
    processor.save_pretrained(policy)
    text = {**hf["text_config"], **{f"{k}_token_id": v for k, v in ids.items()}}
    cfg = LlavaNextConfig(vision_config=hf["vision_config"], text_config=text,
                          image_token_index=hf["image_token_index"], image_grid_pinpoints=hf["image_grid_pinpoints"],
                          vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        E = emb.shape[1]
        direction = torch.randn(E, generator=g)
        direction /= direction.norm()
        prior = torch.full((emb.shape[0],), -4.0)
        for token, i in tok.get_vocab().items():
            if token.startswith("\u2581") and len(token) > 1:
                prior[i] = 0.0
        prior[tok.token_to_id(".")] = 0.7     # tuned by eye: sentences of ~5-30 tokens, most captions end
        prior[ids["eos"]] = 0.1
        emb += 8.0 * direction
        head += prior[:, None] * direction[None, :] * (3.0 / E ** 0.5)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["eos"], ids["pad"]
    model.save_pretrained(policy)
    with open(os.path.join(policy, "generation_config.json"), "w") as f:
        json.dump({f"{k}_token_id": v for k, v in ids.items()}, f)
    out["policy"] = policy

    if "value" in roles:
        value = os.path.join(directory, "value")
        os.makedirs(value, exist_ok=True)
        for name in os.listdir(policy):
            if name != "model.safetensors":
                with open(os.path.join(policy, name), "rb") as src, open(os.path.join(value, name), "wb") as dst:
                    dst.write(src.read())
        tensors = load_file(os.path.join(policy, "model.safetensors"))
        rng = np.random.default_rng(seed + 2)
        tensors["value_head.weight"] = torch.tensor(rng.normal(0, 0.05, (1, E)), dtype=torch.float32)
        tensors["value_head.bias"] = torch.zeros(1, dtype=torch.float32)
        save_file(tensors, os.path.join(value, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(value, "config.json")) as f:
            config = json.load(f)
        config["vimar_value"] = {"value_layer": -2, "state": "sentence"}
        with open(os.path.join(value, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        out["value"] = value

    if "clip" in roles:
        import importlib.util

        from flax import nnx

        from vimar_jax import clip as clip_lib

        def load(path, name):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

        train_clip = load(ROOT / "train" / "train_clip.py", "_bench_train_clip")
        config = train_clip.hf_config(load(ROOT / "configs" / "tiny_clip.py", "_bench_tiny_clip").get_config().model)
        out["clip"] = os.path.join(directory, "clip")
        train_clip.save_hf(clip_lib.CLIPModel(clip_lib.CLIPConfig.from_hf(config), rngs=nnx.Rngs(seed)), config,
                           out["clip"])
    return out


def missing_model_dirs(models: str, names: Sequence[str]) -> list[str]:
    """The tiny-world model directories among `names` (clip, policy, value, policy_b) that `models` lacks (no
    config.json)."""
    return [n for n in names if not os.path.isfile(os.path.join(models, n, "config.json"))]


__all__ = ["ROOT", "block", "timed", "median_times", "ratio", "fmt", "Table", "machine_line", "tiny_world_hf",
           "shipped_tiny_world", "random_tiny_world", "missing_model_dirs"]
