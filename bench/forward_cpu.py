"""CPU benchmark: our jitted LLaVA-NeXT forward vs HF PyTorch's, on one tiny random config, same inputs.

    python bench/forward_cpu.py [--batch 4] [--repeats 20] [--seq-text 32]

Both models get identical weights and identical processor-style arrays (a batch of images of different sizes
and aspect ratios, right-padded prompts). Warm-up (compilation) is excluded; each side is timed `--repeats`
times, taking turns, and the median is reported, with the ratio HF / ours (> 1: ours is faster) and the
logits' max relative error as a sanity check. Ours is timed end to end (`VLM.logits`: host-side gather index, positions, bucketing,
transfer, jitted forward) and the jitted forward alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration  # noqa: E402

from vimar_jax import image  # noqa: E402
from vimar_jax.convert import spec  # noqa: E402
from vimar_jax.models.llava_next import checkpoint_spec  # noqa: E402
from vimar_jax.vlm import VLM, _forward_args, _logits_fn  # noqa: E402

IMAGE_TOKEN = 999
S = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
IMAGE_HW = [(300, 500), (480, 640), (640, 300), (333, 333), (100, 900), (720, 1280), (512, 512), (90, 60)]


def tiny_model() -> LlavaNextForConditionalGeneration:
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, image_size=S, patch_size=14, projection_dim=32)
    text = dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, sliding_window=None)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(cfg).eval()


def make_inputs(batch: int, seq_text: int, image_cfg: image.ImageConfig, rng: np.random.Generator) -> dict:
    """Processor-style arrays: `seq_text` text tokens around each image's `<image>` run, right-padded."""
    hws = [IMAGE_HW[i % len(IMAGE_HW)] for i in range(batch)]
    n_img = [image_cfg.num_image_tokens(hw) for hw in hws]
    n_views = [image_cfg.num_patches(hw) for hw in hws]
    T = max(n_img) + seq_text
    ids = np.zeros((batch, T), np.int64)
    mask = np.zeros((batch, T), np.int64)
    for b, n in enumerate(n_img):
        text = rng.integers(1, IMAGE_TOKEN, seq_text)
        ids[b, :n + seq_text] = np.concatenate([text[:4], np.full(n, IMAGE_TOKEN), text[4:]])
        mask[b, :n + seq_text] = 1
    pv = np.zeros((batch, max(n_views), 3, S, S), np.float32)
    for b, v in enumerate(n_views):
        pv[b, :v] = rng.normal(size=(v, 3, S, S))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=np.array(hws, np.int64))


def median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function; the functions take turns, so load changes hit them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-text", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    hf = tiny_model()
    sd = hf.state_dict()
    cs = checkpoint_spec(hf.config.to_dict(), set(sd))
    module = nnx.eval_shape(lambda: cs.make_module(rngs=nnx.Rngs(0)))
    spec.from_torch_state_dict(module, cs.rules, sd)
    vlm = VLM(module, hf.config.to_dict())
    inputs = make_inputs(args.batch, args.seq_text, module.config.image_config(), np.random.default_rng(0))
    torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
    arrays = (inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    prep = vlm.prepare(*arrays)
    device_args = _forward_args(prep)

    def run_ours():
        vlm.logits(*arrays).block_until_ready()

    def run_ours_jit():
        _logits_fn(vlm._graphdef, None, vlm._state, *device_args).block_until_ready()

    def run_hf():
        with torch.inference_mode():
            return hf(**torch_inputs).logits

    for _ in range(args.warmup):
        run_ours()
        run_ours_jit()
        run_hf()
    ours = np.asarray(vlm.logits(*arrays))
    ref = run_hf().numpy()
    m = inputs["attention_mask"].astype(bool)
    err = float(np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max())

    t_hf, t_ours, t_jit = median_times([run_hf, run_ours, run_ours_jit], args.repeats)
    print(f"tiny LLaVA-NeXT forward, batch {args.batch}, prompt {inputs['input_ids'].shape[1]} tokens "
          f"(bucket {prep['input_ids'].shape[1]}), {inputs['pixel_values'].shape[1]} views/image padded to "
          f"{prep['pixel_values'].shape[1]}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"x{jax.device_count()}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    print(f"  HF PyTorch forward      : {t_hf * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"  ours, VLM.logits        : {t_ours * 1e3:8.2f} ms   ratio HF/ours = {t_hf / t_ours:.2f}")
    print(f"  ours, jitted forward    : {t_jit * 1e3:8.2f} ms   ratio HF/ours = {t_hf / t_jit:.2f}")
    print(f"  logits max relative error vs HF: {err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
