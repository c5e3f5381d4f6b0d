"""CPU benchmark: our jitted LLaVA-NeXT generation vs HF `generate`, same tiny random model, same prompt.

    python bench/decode_cpu.py [--new-tokens 64] [--candidates 30] [--repeats 5] [--smoke]

One random LLaVA-NeXT (CLIP tower + Mistral decoder, fp32) is built in PyTorch and its weights are loaded
into ours, so both sides run the same function on the same image and prompt:

- batch-1 greedy: `vimar_jax.decode.generate.generate(temperature=0)` vs HF `generate(do_sample=False)`;
  tokens per second end to end (host preparation, vision tower, prefill, decode), and whether the greedy
  tokens agree (they should: same weights, fp32);
- candidates: `num_candidates=C` rows sampled with top-p 0.9 (ours: one prompt prefill shared by all rows
  through the decoder's `prefix=`; HF: `num_return_sequences=C`, which copies the prompt C times), total
  tokens per second over all rows. Both sides use one temperature (0.7) for every row (HF has no per-row
  temperatures; ours would cost the same with ViMaR's spread).

EOS never stops a row (ours: `eos_token_id=()`, HF: `eos_token_id=None`), so every call decodes exactly
`new_tokens` per row. Warm-up (compilation) is excluded; the contenders take turns and the median of
`--repeats` rounds is reported. Ratios > 1 mean ours is faster.
"""

from __future__ import annotations

import argparse

from common import Table, fmt, machine_line, median_times, ratio  # noqa: F401  (sets sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration  # noqa: E402

from vimar_jax.convert import spec  # noqa: E402
from vimar_jax.decode.generate import generate  # noqa: E402
from vimar_jax.models.llava_next import checkpoint_spec  # noqa: E402
from vimar_jax.vlm import VLM  # noqa: E402

IMAGE_TOKEN = 999
PAD = 0


def tiny_llava(hidden: int, layers: int, vocab: int, image_size: int, seed: int = 0):
    """A random HF LLaVA-NeXT (fp32, eval) and our `VLM` holding the same weights."""
    S = image_size
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=S, patch_size=14, projection_dim=32)
    text = dict(model_type="mistral", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=max(2, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                vocab_size=vocab, sliding_window=None, pad_token_id=PAD)
    pins = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                          image_grid_pinpoints=pins, vision_feature_layer=-2)
    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    sd = hf.state_dict()
    cs = checkpoint_spec(hf.config.to_dict(), set(sd))
    module = nnx.eval_shape(lambda: cs.make_module(rngs=nnx.Rngs(0)))
    spec.from_torch_state_dict(module, cs.rules, sd)
    return hf, VLM(module, hf.config.to_dict(), pad_token_id=PAD)


def prompt_arrays(vlm: VLM, image_hw, text_tokens: int, seed: int = 0) -> dict:
    """Processor-style arrays for one image and `text_tokens` text tokens around its `<image>` run."""
    cfg = vlm.config.image_config()
    S = cfg.image_size
    rng = np.random.default_rng(seed)
    n_img, n_views = cfg.num_image_tokens(image_hw), cfg.num_patches(image_hw)
    text = rng.integers(1, IMAGE_TOKEN, text_tokens)
    ids = np.concatenate([text[:4], np.full(n_img, IMAGE_TOKEN), text[4:]])[None].astype(np.int64)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), image_sizes=np.asarray([image_hw], np.int64),
                pixel_values=rng.normal(size=(1, n_views, 3, S, S)).astype(np.float32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=56, help="vision tile size (pixels)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.new_tokens, args.candidates, args.hidden, args.layers, args.repeats = 8, 4, 64, 2, 1

    hf, vlm = tiny_llava(args.hidden, args.layers, args.vocab, args.image_size)
    inputs = prompt_arrays(vlm, (480, 640), args.text_tokens)
    t_in = {k: torch.tensor(v) for k, v in inputs.items()}
    N, C = args.new_tokens, args.candidates
    common = dict(max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=PAD)

    def hf_greedy():
        with torch.inference_mode():
            return hf.generate(**t_in, do_sample=False, **common)[:, -N:].numpy()

    def hf_sample():
        with torch.inference_mode():
            return hf.generate(**t_in, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                               num_return_sequences=C, **common)

    seeds = iter(range(10 ** 6))

    def ours_greedy():
        return generate(vlm, inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                        inputs["attention_mask"], max_new_tokens=N, temperature=0.0, eos_token_id=())

    def ours_sample():
        return generate(vlm, inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                        inputs["attention_mask"], max_new_tokens=N, temperature=0.7, top_p=0.9,
                        num_candidates=C, seed=next(seeds), eos_token_id=())

    ref = hf_greedy()[0]
    got = ours_greedy()
    assert got.lengths.tolist() == [N], f"ours decoded {got.lengths.tolist()} tokens, expected {N}"
    agree = int((got.tokens[0] == ref).sum())
    first_diff = int(np.argmax(got.tokens[0] != ref)) if agree < N else None
    sampled = ours_sample()
    assert (sampled.lengths == N).all() and sampled.tokens.shape == (C, N)

    t_hf_g, t_ours_g, t_hf_s, t_ours_s = median_times([hf_greedy, ours_greedy, hf_sample, ours_sample],
                                                      repeats=args.repeats, warmup=1)
    prompt_len = inputs["input_ids"].shape[1]
    print(f"decode_cpu: tiny random LLaVA-NeXT (text {args.layers} layers x {args.hidden}, vocab {args.vocab}; "
          f"CLIP tile {args.image_size}px), prompt {prompt_len} tokens, {N} new tokens per row, fp32")
    print(machine_line())
    t = Table(f"median of {args.repeats} rounds (ratio = ours / HF in tok/s: > 1 means ours is faster)",
              ("figure", "ours tok/s", "HF tok/s", "ratio", "note"))
    t.add("batch-1 greedy", fmt(N / t_ours_g), fmt(N / t_hf_g), ratio(t_hf_g, t_ours_g),
          f"greedy tokens agree {agree}/{N}" + ("" if first_diff is None else f" (first diff at {first_diff})"))
    t.add(f"{C} candidates, top-p 0.9", fmt(C * N / t_ours_s), fmt(C * N / t_hf_s), ratio(t_hf_s, t_ours_s),
          "ours: shared prompt prefill; HF: num_return_sequences")
    t.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
