"""Peak host memory of `vimar convert` relative to the checkpoint size (goal: <= 1.3).

Writes a synthetic LLaVA-NeXT checkpoint (Mistral-7B-wide decoder with few layers, a 2-layer CLIP-L-wide
vision tower, random bf16 values, sharded with an index as `save_pretrained` does; no torch), converts it
in a subprocess (`python -m vimar_jax.cli convert`), then converts it back (`--to-hf`) and checks the round
trip is byte-equal. Prints, per direction, peak RSS of the converter / checkpoint bytes, seconds and GB/s;
and, for reference, the peak RSS of `load_module` (bf16 on CPU: the loaded model itself lives in host memory).

    python bench/convert_memory.py --size-gb 2
    python bench/convert_memory.py --size-gb 0.05 --scale 8     # a quick smoke run
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vimar_jax.convert import io  # noqa: E402


def llava_config(num_layers: int, scale: int) -> dict:
    """A llava-v1.6-mistral-7b-shaped config (widths divided by `scale`) with `num_layers` decoder layers."""
    s = lambda n, lo=8: max(n // scale, lo)  # noqa: E731
    text = dict(model_type="mistral", vocab_size=s(32064), hidden_size=s(4096), intermediate_size=s(14336),
                num_hidden_layers=num_layers, num_attention_heads=s(32, 1), num_key_value_heads=s(8, 1), head_dim=128,
                max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=s(1024), intermediate_size=s(4096),
                  num_hidden_layers=2, num_attention_heads=s(16, 1), image_size=336, patch_size=14,
                  projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"], text_config=text,
                vision_config=vision, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]],
                image_token_index=32000 // scale, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a `language_model.model.*` / `vision_tower.vision_model.*` checkpoint."""
    t, v = c["text_config"], c["vision_config"]
    E, M, V, D = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["head_dim"]
    H, K = t["num_attention_heads"], t["num_key_value_heads"]
    out = {"image_newline": (E,), "language_model.lm_head.weight": (V, E),
           "language_model.model.embed_tokens.weight": (V, E), "language_model.model.norm.weight": (E,)}
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        out |= {p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,),
                p + "self_attn.q_proj.weight": (H * D, E), p + "self_attn.k_proj.weight": (K * D, E),
                p + "self_attn.v_proj.weight": (K * D, E), p + "self_attn.o_proj.weight": (E, H * D),
                p + "mlp.gate_proj.weight": (M, E), p + "mlp.up_proj.weight": (M, E),
                p + "mlp.down_proj.weight": (E, M)}
    Ev, Mv, P = v["hidden_size"], v["intermediate_size"], (v["image_size"] // v["patch_size"]) ** 2 + 1
    vp = "vision_tower.vision_model."
    out |= {vp + "embeddings.class_embedding": (Ev,),
            vp + "embeddings.patch_embedding.weight": (Ev, 3, v["patch_size"], v["patch_size"]),
            vp + "embeddings.position_embedding.weight": (P, Ev),
            vp + "pre_layrnorm.weight": (Ev,), vp + "pre_layrnorm.bias": (Ev,),
            vp + "post_layernorm.weight": (Ev,), vp + "post_layernorm.bias": (Ev,),
            "multi_modal_projector.linear_1.weight": (E, Ev), "multi_modal_projector.linear_1.bias": (E,),
            "multi_modal_projector.linear_2.weight": (E, E), "multi_modal_projector.linear_2.bias": (E,)}
    for i in range(v["num_hidden_layers"]):
        p = f"{vp}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {p + f"self_attn.{n}.weight": (Ev, Ev), p + f"self_attn.{n}.bias": (Ev,)}
        out |= {p + "layer_norm1.weight": (Ev,), p + "layer_norm1.bias": (Ev,), p + "layer_norm2.weight": (Ev,),
                p + "layer_norm2.bias": (Ev,), p + "mlp.fc1.weight": (Mv, Ev), p + "mlp.fc1.bias": (Mv,),
                p + "mlp.fc2.weight": (Ev, Mv), p + "mlp.fc2.bias": (Ev,)}
    return dict(sorted(out.items()))


def random_bf16(shape, rng) -> np.ndarray:
    """Finite random bf16 values in (-2, 2), generated as raw bits (fast)."""
    bits = rng.integers(0, 1 << 16, size=math.prod(shape), dtype=np.uint16) & 0xBFFF
    return bits.view(io.DTYPES["BF16"]).reshape(shape)


def write_checkpoint(path: Path, size_gb: float, scale: int, shard_gb: float) -> int:
    """The synthetic HF checkpoint; returns its tensor bytes."""
    per_layer = sum(math.prod(s) for k, s in hf_shapes(llava_config(2, scale)).items() if k.startswith("language_model.model.layers.1.")) * 2
    fixed = sum(math.prod(s) for s in hf_shapes(llava_config(0, scale)).values()) * 2
    layers = max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))
    config = llava_config(layers, scale)
    shapes = hf_shapes(config)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)
    tensors = [io.OutTensor(k, "BF16", s, lambda s=s: random_bf16(s, rng)) for k, s in shapes.items()]
    groups = io.plan_shards([t.nbytes for t in tensors], int(shard_gb * 1e9))
    names = io.shard_names(len(groups))
    total = 0
    for name, g in zip(names, groups):
        total += io.write_safetensors(path / name, [tensors[i] for i in g], {"format": "pt"})
    if len(names) > 1:
        weight_map = {tensors[i].key: n for n, g in zip(names, groups) for i in g}
        (path / io.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2, sort_keys=True) + "\n")
    print(f"synthetic llava_next checkpoint: {layers} decoder layers (scale 1/{scale}), {len(shapes)} tensors, "
          f"{total / 1e9:.3f} GB in {len(names)} file(s)", flush=True)
    return total


LOAD = ("import sys, jax.numpy as jnp; from vimar_jax.convert.io import load_module; "
        "m, _ = load_module(sys.argv[1], dtype=jnp.bfloat16)")


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """Run a command in a subprocess -> (its peak RSS in bytes, wall seconds, CPU seconds)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return usage.ru_maxrss * 1024, seconds, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size to synthesise (default 2)")
    ap.add_argument("--scale", type=int, default=1, help="divide the model widths by this (quick runs)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="HF shard size of the synthetic checkpoint")
    ap.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vimar_convert_bench_", dir=args.dir))
    try:
        hf, ours, back = tmp / "hf", tmp / "ours", tmp / "back"
        size = write_checkpoint(hf, args.size_gb, args.scale, args.shard_gb)
        results = {}
        convert = [sys.executable, "-m", "vimar_jax.cli", "convert", "--no-progress"]
        for what, cmd in (("hf -> vimar", convert + [str(hf), str(ours)]),
                          ("vimar -> hf", convert + ["--to-hf", str(ours), str(back)]),
                          ("load_module(bf16, CPU)", [sys.executable, "-c", LOAD, str(ours)])):
            rss, secs, cpu = measure(cmd)
            if what.startswith("load"):  # a loaded model is one full copy by definition: not a goal here
                print(f"{what}: peak RSS {rss / 1e9:.3f} GB = {rss / size:.3f} x checkpoint, {secs:.1f} s wall",
                      flush=True)
                continue
            results[what] = rss / size
            print(f"{what}: peak RSS {rss / 1e9:.3f} GB = {rss / size:.3f} x checkpoint, {secs:.1f} s wall "
                  f"({cpu:.1f} s CPU), {size / 1e9 / secs:.2f} GB/s", flush=True)
        same = all(filecmp.cmp(p, back / p.name, shallow=False) for p in hf.iterdir())
        print(f"round trip byte-equal: {same}")
        worst = max(results.values())
        print(f"worst peak RSS / checkpoint size: {worst:.3f} (goal <= 1.3): {'OK' if worst <= 1.3 else 'OVER'}")
        if not same:
            raise SystemExit(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
