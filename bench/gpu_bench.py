"""GPU benchmark: our jitted decode, ViMaR search and TD step on 7B shapes vs HF `generate`, one table.

    bash bench/gpu.sh                      # everything (about 5-8 minutes on one H100/H200, compiles included)
    bash bench/gpu.sh --only td            # one section (repeatable, or comma-separated)
    python bench/gpu_bench.py --smoke      # the whole script on CPU with tiny shapes (what the tests run)

Models have LLaVA-NeXT-Mistral-7B's text shapes (SPEC §1: 32 layers, 4096 wide, 32/8 heads of 128,
MLP 14336, vocab 32064, RoPE θ 1e6, no sliding window) with random bf16 weights made **on the device**
(jitted `jax.random` init, never on the host). Random weights say nothing about quality: parity with HF is
established on CPU by the tests; this script measures speed only.

Sections (`--only`):
- `hf` (runs first, in a child process so that PyTorch and JAX never hold the GPU at once): HF
  transformers `MistralForCausalLM` (bf16, sdpa, random weights) on the same prompt length: prefill,
  `generate` greedy batch 1 (default dynamic cache) and `generate(do_sample=True, top_p=0.9,
  num_return_sequences=C)`; and HF's CLIP-L/336 tower + LLaVA projector on the tiles.
- `prefill`: one 2,400-token prompt into a batch-1 KV cache (`Sampler.prefill`). The prompt is token ids
  fed to the decoder (image features would take the place of 2,340 of them: same decoder cost; the vision
  tower is timed on its own in `clip`).
- `greedy`: batch-1 greedy, 128 new tokens, end to end (prefill + decode), twice: with the prompt cache as a
  shared `prefix` (the candidates' path with one row) and as the row's own cache (`generate`'s path for
  one candidate).
- `candidates`: C=30 rows (ViMaR's temperatures 0.1..0.9 x 6, top-p 0.9), 128 tokens each, one prompt
  prefill shared by all rows through the decoder's `prefix=` (never copied per row).
- `vimar`: seconds per caption of ViMaR's compute with fixed lengths (no text, no tokenizer): policy prompt
  prefill; Stage 1 = the 30 x 128 candidates; the value model (7B-shaped LLaVA-NeXT + float32 head, value
  at layer -2 = 31 decoder layers) prefills a 2,340-token image prefix once and values every Stage-1
  sentence (30 captions x `sentences` sentences of 32 tokens + template tail, batches of 32 states) as
  suffixes against that cached prefix; Stage 2 = `refine_steps` steps (default 3: two weak-sentence
  replacements and one append), each: copy the prompt cache, prefill the refined caption prefix (one
  128-slot bucket) after it, sample 30 candidate sentences of 32 tokens against it, value them. Host
  round trips (argmax of the scores) are included; text decoding and sentence splitting are not.
  Beside it, in the same section, VisVM's step search over the same models and lengths: `sentences` steps
  (4 x 32 = the Stage-1 caption's 128 tokens), each sampling 30 candidate sentences after the caption so far
  and valuing them in one call; the table gives VisVM / ViMaR, the speed claim on the paper's kind of device.
- `td`: one TD training step of a 7B-shaped value model on one GPU: packed rows of `td_seq` tokens
  ([2,340-token image prefix, 36-token sentence states...], segment mask), value at layer L-1 as
  `ValueModel(value_layer=-2)`, semi-gradient TD(0) loss, bf16 parameters, AdamW with bf16 moments (the
  trainer's float32 master weights need 16 bytes per parameter: 7B fits only sharded over several GPUs),
  full rematerialisation. MFU = 6 N tokens / time / peak (N = parameters of the layers run; attention
  FLOPs not counted; peak bf16 dense by card name: H100 SXM / H200 989 TFLOP/s). If the full depth does not
  fit, the layer count is halved until it does, and the table says so.
- `clip`: CLIP-L/336 tower (to layer -2) + projector on 5 tiles (one 672x672 anyres image), ours vs HF.

Every figure is the median of `--repeats` timed runs after one untimed warm-up (compilation). A section that
fails is reported and the others still run; sections not started by `--deadline` seconds are skipped; the
table is printed either way. `--json` writes all numbers (after every section, so a killed run keeps them).
`--dump-hlo DIR` writes the optimized HLO of the candidates' decode loop, the value scoring call and the TD
step (taken from the compilation cache: no extra compile) and prints their large copies, transposes, slices
and pads (what to look at when a figure is far from its floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("hf", "prefill", "greedy", "candidates", "vimar", "td", "clip")
TEMPERATURES = (0.1, 0.3, 0.5, 0.7, 0.9)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
GOALS = {"greedy": 240.0, "candidates": 4000.0, "vimar": 3.0, "mfu": 0.40}


@dataclasses.dataclass(frozen=True)
class Shapes:
    layers: int = 32
    hidden: int = 4096
    mlp: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 32064
    rope_theta: float = 1e6
    prompt: int = 2400            # policy prompt (image tokens + text)
    new_tokens: int = 128         # per candidate; also the room after the prompt for a refined caption
    candidates: int = 30          # N x K
    sentence_tokens: int = 32     # one candidate sentence
    sentences: int = 4            # sentences per Stage-1 caption (4 x 32 = 128 tokens)
    refine_steps: int = 3         # Stage-2 steps
    value_prefix: int = 2340      # value model's image prefix (the state template's head)
    state_tail: int = 4           # template tokens closing a sentence state
    score_rows: int = 32          # states valued per call
    td_seq: int = 4096            # packed TD row
    td_rows: int = 1              # rows per TD step
    clip_layers: int = 24
    clip_hidden: int = 1024
    clip_mlp: int = 4096
    clip_heads: int = 16
    clip_image: int = 336
    tiles: int = 5

    @property
    def suffix(self) -> int:
        return self.sentence_tokens + self.state_tail


SMOKE = Shapes(layers=2, hidden=64, mlp=128, heads=4, kv_heads=2, head_dim=16, vocab=512, prompt=48, new_tokens=8,
               candidates=4, sentence_tokens=4, sentences=2, refine_steps=1, value_prefix=40, state_tail=2,
               score_rows=8, td_seq=96, td_rows=2, clip_layers=2, clip_hidden=32, clip_mlp=64, clip_heads=4,
               clip_image=28, tiles=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median_time(fn, repeats: int, sync, check=None) -> float:
    """Median seconds of `fn()` over `repeats` runs after one untimed warm-up; `sync(result)` blocks;
    `check(result)` (optional) validates the warm-up's result."""
    first = fn()
    sync(first)
    if check is not None:
        check(first)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ============================================================================================ HF (torch)

def run_hf(sh: Shapes, repeats: int, dtype_name: str) -> dict:
    """HF transformers on the same shapes; runs in its own process (see `main`)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    out: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    cfg = MistralConfig(vocab_size=sh.vocab, hidden_size=sh.hidden, intermediate_size=sh.mlp,
                        num_hidden_layers=sh.layers, num_attention_heads=sh.heads, num_key_value_heads=sh.kv_heads,
                        head_dim=sh.head_dim, rope_theta=sh.rope_theta, sliding_window=None,
                        max_position_embeddings=32768, attn_implementation="sdpa")
    log(f"hf: building MistralForCausalLM ({sh.layers} layers) on {dev}")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = MistralForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    out["params"] = sum(p.numel() for p in model.parameters())
    out.update(_hf_decode(model, sh, repeats, dev, sync))
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()

    vcfg = CLIPVisionConfig(hidden_size=sh.clip_hidden, intermediate_size=sh.clip_mlp,
                            num_hidden_layers=sh.clip_layers, num_attention_heads=sh.clip_heads,
                            image_size=sh.clip_image, patch_size=14, hidden_act="quick_gelu",
                            attn_implementation="sdpa")
    g = torch.Generator(device=dev).manual_seed(1)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            tower = CLIPVisionModel(vcfg).eval()
            proj = torch.nn.Sequential(torch.nn.Linear(sh.clip_hidden, sh.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(sh.hidden, sh.hidden))
            pixels = torch.randn(sh.tiles, 3, sh.clip_image, sh.clip_image, generator=g, device=dev)
    finally:
        torch.set_default_dtype(default)

    def features():   # what LlavaNextForConditionalGeneration.get_image_features runs
        return proj(tower(pixels, output_hidden_states=True).hidden_states[-2])

    with torch.inference_mode():
        out["clip_ms"] = 1e3 * median_time(features, repeats, sync)
    log(f"hf: CLIP tower + projector on {sh.tiles} tiles {out['clip_ms']:.1f} ms")
    return out


def _hf_decode(model, sh: Shapes, repeats: int, dev: str, sync) -> dict:
    """Prefill, greedy and sampled-candidates figures of an HF causal LM on a random prompt."""
    import torch

    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(1, sh.vocab, (1, sh.prompt), device=dev, generator=g)
    N, C = sh.new_tokens, sh.candidates
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, eos_token_id=None,
                  pad_token_id=0)

    def check(shape):
        def f(gen):
            assert tuple(gen.shape) == shape, (tuple(gen.shape), shape)
        return f

    with torch.inference_mode():
        t = median_time(lambda: model(ids, logits_to_keep=1).logits, repeats, sync)
        out["prefill_ms"] = 1e3 * t
        log(f"hf: prefill {out['prefill_ms']:.1f} ms")
        t = median_time(lambda: model.generate(ids, do_sample=False, **common), repeats, sync,
                        check((1, sh.prompt + N)))
        out["greedy_tok_s"] = N / t
        log(f"hf: greedy {out['greedy_tok_s']:.1f} tok/s")
        t = median_time(lambda: model.generate(ids, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                                               num_return_sequences=C, **common), max(1, repeats - 1), sync,
                        check((C, sh.prompt + N)))
        out["candidates_tok_s"] = C * N / t
        log(f"hf: {C} candidates {out['candidates_tok_s']:.1f} tok/s")
    return out


def hf_in_child(args, sh: Shapes) -> dict:
    """Run `run_hf` in a fresh interpreter (PyTorch gets the GPU to itself, then gives it back)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--hf-child", path, "--repeats", str(args.repeats),
               "--dtype", args.dtype] + (["--smoke"] if args.smoke else [])
        env = dict(os.environ, CUDA_MODULE_LOADING="LAZY")
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.hf_timeout)
        except subprocess.TimeoutExpired:
            log(f"hf: child process still running after {args.hf_timeout:.0f} s: stopped; the HF column stays empty")
            return {}
        if proc.returncode != 0 or not os.path.exists(path):
            log(f"hf: child process failed (exit {proc.returncode}); the HF column stays empty")
            return {}
        with open(path) as f:
            return json.load(f)


# ============================================================================================ ours (JAX)

class Ours:
    """Our models and jitted pieces on the device, built lazily and freed between sections."""

    def __init__(self, sh: Shapes, dtype_name: str, repeats: int, hlo_dir: str | None = None):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.sh, self.repeats, self.hlo_dir = sh, repeats, hlo_dir
        self.dtype = getattr(jnp, dtype_name)
        self.device = jax.devices()[0]
        self.results: dict = {}
        self._policy = None
        self._value = None

    # -- helpers ------------------------------------------------------------------------------------
    def sync(self, x):
        return self.jax.block_until_ready(x)

    def time(self, fn, repeats=None) -> float:
        return median_time(fn, self.repeats if repeats is None else repeats, self.sync)

    def peak_gib(self) -> float | None:
        stats = getattr(self.device, "memory_stats", lambda: None)()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        return stats["peak_bytes_in_use"] / 2 ** 30

    def decoder_config(self, layers: int | None = None, **kw):
        from vimar_jax.models.decoder import DecoderConfig

        s = self.sh
        return DecoderConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.mlp,
                             num_layers=layers or s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                             head_dim=s.head_dim, rope_theta=s.rope_theta, rms_norm_eps=1e-5, **kw)

    def on_device(self, make):
        """(graphdef, state) of the module `make()` builds, its weights drawn by a jitted init on the device."""
        from flax import nnx

        graphdef = nnx.graphdef(nnx.eval_shape(make))
        state = self.jax.jit(lambda: nnx.state(make()))()
        return graphdef, self.sync(state)

    def free(self, tree) -> None:
        for leaf in self.jax.tree.leaves(tree):
            if hasattr(leaf, "delete") and not leaf.is_deleted():
                leaf.delete()

    # -- the policy (decoder + sampler) -------------------------------------------------------------
    def policy(self):
        if self._policy is None:
            from flax import nnx

            from vimar_jax.decode.sampler import Sampler, decoder_prefill_fn, decoder_step_fn
            from vimar_jax.models.decoder import Decoder

            cfg = self.decoder_config()
            log(f"ours: policy decoder {cfg.num_layers} layers x {cfg.hidden_size}, {self.dtype.__name__}, "
                f"init on {self.device.platform}")
            graphdef, params = self.on_device(lambda: Decoder(cfg, dtype=self.dtype, param_dtype=self.dtype,
                                                              rngs=nnx.Rngs(0)))
            sampler = Sampler(decoder_step_fn(graphdef), prefill_fn=decoder_prefill_fn(graphdef), pad_id=0)
            prompt = self.jax.random.randint(self.jax.random.key(1), (1, self.sh.prompt), 1, self.sh.vocab,
                                             self.jnp.int32)
            self._policy = dict(cfg=cfg, params=params, sampler=sampler, prompt=prompt)
            self.results["policy_params"] = sum(x.size for x in self.jax.tree.leaves(params))
        return self._policy

    def prompt_cache(self):
        """Prefill the prompt into a batch-1 cache with `new_tokens` free slots after it -> (start, cache)."""
        from vimar_jax.models.decoder import KVCache

        p, s = self.policy(), self.sh
        cache = KVCache.init(p["cfg"], 1, s.prompt + s.new_tokens, self.dtype)
        return p["sampler"].prefill(p["params"], p["prompt"], self.jnp.asarray([s.prompt]), cache)

    def settings(self, batch: int, *, greedy: bool, max_new_tokens: int):
        import numpy as np

        from vimar_jax.decode.sampler import Settings

        if greedy:
            return Settings.make(batch, temperature=0.0, max_new_tokens=max_new_tokens)
        temps = np.resize(np.repeat(np.asarray(TEMPERATURES, np.float32), -(-batch // len(TEMPERATURES))), batch)
        return Settings.make(batch, temperature=np.sort(temps), top_p=0.9, max_new_tokens=max_new_tokens)

    def decode_shared(self, start, prefix, batch: int, settings, seed: int):
        """`batch` rows decoding against the batch-1 `prefix` with own caches of `new_tokens` slots."""
        from vimar_jax.models.decoder import KVCache

        p, s = self.policy(), self.sh
        own = KVCache.init(p["cfg"], batch, s.new_tokens, self.dtype)
        return p["sampler"].decode(p["params"], start.broadcast(batch), own, settings, self.jax.random.key(seed),
                                   buffer_size=s.new_tokens, prefix=prefix)

    # -- sections -----------------------------------------------------------------------------------
    def run_prefill(self):
        t = self.time(lambda: self.prompt_cache()[0].logits)
        self.results["prefill_ms"] = 1e3 * t
        log(f"ours: prefill {1e3 * t:.1f} ms")

    def run_greedy(self):
        s = self.sh
        N = s.new_tokens
        settings = self.settings(1, greedy=True, max_new_tokens=N)
        sampler, params = self.policy()["sampler"], self.policy()["params"]

        def shared():
            start, prefix = self.prompt_cache()
            return self.decode_shared(start, prefix, 1, settings, 0)

        def own():
            start, cache = self.prompt_cache()   # the prompt's cache has N free slots: the row's own cache
            return sampler.decode(params, start, cache, settings, self.jax.random.key(0), buffer_size=N)

        for name, fn in (("greedy_shared", shared), ("greedy_own", own)):
            state = fn()
            assert int(state.lengths[0]) == N, f"{name}: decoded {int(state.lengths[0])} of {N} tokens"
            t = self.time(fn)
            self.results[f"{name}_tok_s"] = N / t
            self.results[f"{name}_decode_tok_s"] = N / max(t - self.results.get("prefill_ms", 0) / 1e3, 1e-9)
            log(f"ours: {name} {N / t:.1f} tok/s end to end")
        self.results["greedy_tokens_equal"] = bool((shared().tokens == own().tokens).all())

    def run_candidates(self):
        s = self.sh
        C, N = s.candidates, s.new_tokens
        settings = self.settings(C, greedy=False, max_new_tokens=N)

        def run():
            start, prefix = self.prompt_cache()
            return self.decode_shared(start, prefix, C, settings, 1)

        state = run()
        assert (state.lengths == N).all(), f"candidates decoded {state.lengths} tokens, expected {N} each"
        t = self.time(run)
        self.results["candidates_tok_s"] = C * N / t
        self.results["candidates_decode_tok_s"] = C * N / max(t - self.results.get("prefill_ms", 0) / 1e3, 1e-9)
        log(f"ours: {C} candidates {C * N / t:.1f} tok/s end to end")
        if self.hlo_dir:
            from vimar_jax.models.decoder import KVCache

            p = self.policy()
            start, prefix = self.prompt_cache()
            own = KVCache.init(p["cfg"], C, N, self.dtype)
            self.dump("decode_candidates", p["sampler"]._decode, p["params"], start.broadcast(C), own, settings,
                      self.jax.random.key(0), self.jnp.arange(C, dtype=self.jnp.int32), prefix, None, buffer_size=N)

    def dump(self, name: str, jitted, *args, **kwargs) -> None:
        """With `--dump-hlo DIR`: the optimized HLO of `jitted` at these arguments to DIR/NAME.hlo.txt (the
        executable the timed calls used, taken from the compilation cache) and its large data movements."""
        if not self.hlo_dir:
            return
        text = jitted.lower(*args, **kwargs).compile().as_text()
        os.makedirs(self.hlo_dir, exist_ok=True)
        path = os.path.join(self.hlo_dir, f"{name}.hlo.txt")
        with open(path, "w") as f:
            f.write(text)
        s = self.sh
        moves = large_moves(text, min_bytes=s.prompt * s.kv_heads * s.head_dim // 2)
        self.results[f"hlo_moves_{name}"] = moves
        log(f"ours: wrote {path}; its largest copy / transpose / slice / pad / dynamic-update-slice results:")
        for m in moves[:10]:
            print(f"    {m['op']:<22} {m['shape']:<40} {m['mib']:10.2f} MiB  x{m['count']}", flush=True)

    def value_model(self):
        if self._value is None:
            from flax import nnx

            from vimar_jax.models.llava_next import LlavaNextConfig
            from vimar_jax.models.value import ValueConfig, ValueModel

            s = self.sh
            llava = LlavaNextConfig.from_hf({
                "model_type": "llava_next", "image_token_index": s.vocab - 64, "vision_feature_layer": -2,
                "vision_config": dict(model_type="clip_vision_model", hidden_size=s.clip_hidden,
                                      intermediate_size=s.clip_mlp, num_hidden_layers=s.clip_layers,
                                      num_attention_heads=s.clip_heads, image_size=s.clip_image, patch_size=14,
                                      projection_dim=768, hidden_act="quick_gelu"),
                "text_config": dict(model_type="mistral", vocab_size=s.vocab, hidden_size=s.hidden,
                                    intermediate_size=s.mlp, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                    num_key_value_heads=s.kv_heads, head_dim=s.head_dim, rope_theta=s.rope_theta,
                                    sliding_window=None, rms_norm_eps=1e-5)})
            cfg = ValueConfig(llava, value_layer=-2)
            log(f"ours: value model (LLaVA-NeXT, value at layer -2 = {cfg.num_layers} decoder layers), init on device")
            graphdef, state = self.on_device(lambda: ValueModel(cfg, dtype=self.dtype, param_dtype=self.dtype,
                                                                rngs=nnx.Rngs(2)))

            def prefill(state, ids):
                return nnx.merge(graphdef, state).prefill(ids)

            def score(state, ids, prefix):
                m = nnx.merge(graphdef, state)
                B, T = ids.shape
                pos = self.jnp.broadcast_to(s.value_prefix + self.jnp.arange(T, dtype=self.jnp.int32), (B, T))
                q = self.jnp.full((B, 1), T - 1, self.jnp.int32)
                return m.values(ids, positions=pos, prefix=prefix, query_index=q)[:, 0]

            def features(state, pixels):
                return nnx.merge(graphdef, state).backbone.image_features(pixels)

            self._value = dict(cfg=cfg, state=state, prefill=self.jax.jit(prefill), score=self.jax.jit(score),
                               features=self.jax.jit(features))
        return self._value

    def run_vimar(self):
        import numpy as np

        jnp, s = self.jnp, self.sh
        C, N, L = s.candidates, s.new_tokens, s.sentence_tokens
        p, v = self.policy(), self.value_model()
        key = self.jax.random.key(3)
        image_prefix = self.jax.random.randint(key, (1, s.value_prefix), 1, s.vocab, jnp.int32)
        stage1 = self.settings(C, greedy=False, max_new_tokens=N)
        stage2 = self.settings(C, greedy=False, max_new_tokens=L)
        states = self.jax.random.randint(key, (s.score_rows, s.suffix), 1, s.vocab, jnp.int32)
        n_stage1 = C * s.sentences
        stage1_calls = -(-n_stage1 // s.score_rows)

        def sentence_step(start, prompt, tokens, n, seed, vprefix):
            """C candidate sentences after the first n caption tokens (prefilled after a copy of the prompt
            cache; n = 0: straight after the prompt), valued in one call; the best one's tokens (host round
            trip included)."""
            st, cache = start, prompt
            if n:
                ext = np.zeros((1, N), np.int32)
                ext[0, :n] = tokens[:n]
                st, cache = p["sampler"].prefill(p["params"], jnp.asarray(ext), jnp.asarray([n]),
                                                 self.jax.tree.map(jnp.copy, prompt), cache_index=s.prompt,
                                                 start_positions=s.prompt)
            sents = self.decode_shared(st, cache, C, stage2, seed)
            sc = v["score"](v["state"], states, vprefix)
            best = int(np.argmax(np.asarray(sc)[:C]))
            assert int(sents.lengths[0]) == L
            return np.asarray(sents.tokens[best])[:L]

        def caption():
            start, prompt = self.prompt_cache()
            cands = self.decode_shared(start, prompt, C, stage1, 10)            # Stage 1: C full captions
            vprefix = v["prefill"](v["state"], image_prefix)                     # the image prefix, once
            scores = [v["score"](v["state"], states, vprefix) for _ in range(stage1_calls)]
            best = int(np.argmax(np.concatenate([np.asarray(x) for x in scores])[:n_stage1]) // s.sentences)
            tokens = np.asarray(cands.tokens[best])
            for step in range(s.refine_steps):                                   # Stage 2
                sentence_step(start, prompt, tokens, min(N, (step + 1) * L), 20 + step, vprefix)
            return vprefix

        def visvm_caption():
            """VisVM's step search over the same models and lengths: `sentences` steps of C candidate
            sentences, each valued and the best appended (the first step decodes from the prompt itself)."""
            start, prompt = self.prompt_cache()
            vprefix = v["prefill"](v["state"], image_prefix)
            tokens = np.zeros((N,), np.int32)
            for step in range(s.sentences):
                tokens[step * L:(step + 1) * L] = sentence_step(start, prompt, tokens, step * L, 30 + step, vprefix)
            return vprefix

        vprefix = self.sync(caption())
        self.dump("value_score", v["score"], v["state"], states, vprefix)
        del vprefix
        t = self.time(caption, max(1, self.repeats - 1))
        self.results["vimar_s"] = t
        self.results["vimar_model"] = dict(candidates=C, candidate_tokens=N, stage1_states=n_stage1,
                                           refine_steps=s.refine_steps, sentence_tokens=L,
                                           value_prefix=s.value_prefix, prompt=s.prompt)
        log(f"ours: ViMaR {t:.2f} s per caption")
        self.sync(visvm_caption())
        t = self.time(visvm_caption, max(1, self.repeats - 1))
        self.results["visvm_s"] = t
        log(f"ours: VisVM {t:.2f} s per caption ({s.sentences} steps of {C} x {L}-token candidates)")

    def run_clip(self):
        v = self.value_model()
        s = self.sh
        pixels = self.jax.random.normal(self.jax.random.key(4), (1, s.tiles, 3, s.clip_image, s.clip_image),
                                        self.dtype)
        t = self.time(lambda: v["features"](v["state"], pixels))
        self.results["clip_ms"] = 1e3 * t
        log(f"ours: CLIP tower + projector on {s.tiles} tiles {1e3 * t:.1f} ms")

    def release_inference(self):
        for m in (self._policy, self._value):
            if m is not None:
                self.free(m.get("params", m.get("state")))
        self._policy = self._value = None

    def run_td(self, remat: str):
        layers = self.sh.layers
        while True:
            try:
                self._td(layers, remat)
                return
            except Exception as e:   # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED)
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower() or layers <= 2:
                    raise
                log(f"ours: TD step with {layers} layers does not fit ({str(e).splitlines()[0][:120]}); "
                    f"trying {layers // 2}")
            layers //= 2                 # outside the handler: the failed attempt's arrays can be freed now
            gc.collect()
            self.jax.clear_caches()

    def _td(self, layers: int, remat: str):
        import numpy as np
        import optax
        from flax import nnx

        from vimar_jax import td
        from vimar_jax.data.packing import next_values
        from vimar_jax.models.decoder import Decoder

        jax, jnp, s = self.jax, self.jnp, self.sh
        cfg = self.decoder_config(layers, tie_word_embeddings=True, remat=remat)
        n_run = layers - 1                                   # value at layer -2, as ValueModel(value_layer=-2)
        log(f"ours: TD step, {layers}-layer value model (runs {n_run}), {s.td_rows} x {s.td_seq} tokens, "
            f"remat={remat}")
        graphdef, dec_state = self.on_device(lambda: Decoder(cfg, dtype=self.dtype, param_dtype=self.dtype,
                                                             rngs=nnx.Rngs(5)))
        params = {"decoder": dec_state,
                  "head": (1e-3 * jax.random.normal(jax.random.key(6), (s.hidden,), jnp.float32), jnp.zeros(()))}
        tx = optax.adamw(1e-5, mu_dtype=self.dtype)
        opt = jax.jit(tx.init)(params)

        # Packed rows: [image prefix (segment 0), sentence states of `suffix` tokens (segments 1..Q), padding].
        T, P, Ls = s.td_seq, s.value_prefix, s.suffix
        Q = (T - P) // Ls
        seg = np.full((T,), -1, np.int32)
        pos = np.zeros((T,), np.int32)
        seg[:P], pos[:P] = 0, np.arange(P)
        for q in range(Q):
            sl = slice(P + q * Ls, P + (q + 1) * Ls)
            seg[sl], pos[sl] = q + 1, P + np.arange(Ls)
        query = P + (np.arange(Q) + 1) * Ls - 1
        traj = 4                                             # states per trajectory (sentences per caption)
        last = (np.arange(Q) % traj == traj - 1) | (np.arange(Q) == Q - 1)
        rng = np.random.default_rng(0)
        R = s.td_rows
        batch = {k: jnp.asarray(np.broadcast_to(a, (R,) + a.shape)) for k, a in dict(
            input_ids=rng.integers(1, s.vocab, T).astype(np.int32), positions=pos, segment_ids=seg,
            query_index=query.astype(np.int32), next_slot=np.where(last, -1, np.arange(Q) + 1).astype(np.int32),
            reward=rng.normal(size=Q).astype(np.float32), done=last.astype(np.float32),
            loss_mask=np.ones(Q, np.float32)).items()}

        def loss_fn(params, b):
            dec = nnx.merge(graphdef, params["decoder"])
            h, _ = dec(dec.embed(b["input_ids"]), positions=b["positions"], segment_ids=b["segment_ids"],
                       num_layers=n_run)
            picked = jnp.take_along_axis(h, b["query_index"][..., None], axis=1).astype(jnp.float32)
            w, bias = params["head"]
            values = picked @ w + bias
            nv = next_values(values, b["next_slot"])
            loss, _ = td.td_loss_and_metrics(values.reshape(-1), nv.reshape(-1), b["reward"].reshape(-1),
                                             b["done"].reshape(-1), b["loss_mask"].reshape(-1))
            return loss

        def step(params, opt, b):
            loss, grads = jax.value_and_grad(loss_fn)(params, b)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        step = jax.jit(step, donate_argnums=(0, 1))
        state = [params, opt]
        del params, opt

        def run():
            state[0], state[1], loss = step(state[0], state[1], batch)
            return loss

        try:
            loss0 = float(run())
            assert np.isfinite(loss0), loss0
            self.dump("td_step", step, state[0], state[1], batch)
            t = self.time(run)
        finally:
            self.free(state)
        n_params = n_run * layer_params(s)
        tokens = R * T
        flops = 6 * n_params * tokens
        peak = peak_flops(self.device.device_kind)
        self.results.update(td_layers=layers, td_layers_run=n_run, td_tokens=tokens, td_step_s=t,
                            td_tokens_s=tokens / t, td_tflops=flops / t / 1e12, td_params=n_params,
                            td_mfu=None if peak is None else flops / t / peak, td_remat=remat,
                            td_peak_gib=self.peak_gib())
        log(f"ours: TD step {t:.3f} s, {tokens / t:,.0f} tokens/s, {flops / t / 1e12:.1f} TFLOP/s"
            + ("" if peak is None else f", MFU {100 * flops / t / peak:.1f}%"))


def layer_params(s: Shapes) -> int:
    """Matmul parameters of one decoder layer."""
    return s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden + 3 * s.hidden * s.mlp


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak
    return None


_INSTR = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* (copy|transpose|slice|pad|dynamic-update-slice)\(")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def large_moves(hlo_text: str, min_bytes: int) -> list[dict]:
    """copy / transpose / slice / pad / dynamic-update-slice instructions (fused or not) producing >= min_bytes,
    grouped by op and shape, largest first. In a decode loop, a copy the size of a cache or a slice the size
    of the weights is a pass over memory that the bandwidth floor does not count."""
    groups: dict = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        dims = [int(d) for d in m.group(2).split(",") if d]
        size = _BYTES.get(m.group(1), 4)
        for d in dims:
            size *= d
        if size >= min_bytes:
            k = (m.group(3), f"{m.group(1)}[{m.group(2)}]")
            groups[k] = (size, groups.get(k, (size, 0))[1] + 1)
    return sorted(({"op": op, "shape": shape, "mib": size / 2 ** 20, "count": n}
                   for (op, shape), (size, n) in groups.items()), key=lambda d: -d["mib"])


# ============================================================================================ table

def table(ours: dict, hf: dict, sh: Shapes) -> str:
    from common import Table, fmt

    def r(a, b):
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

    def met(x, goal, higher=True):
        if x is None:
            return "-"
        return "yes" if (x >= goal if higher else x <= goal) else "NO"

    t = Table("ratio > 1: ours is faster; goals are for 7B shapes on one H100/H200",
              ("figure", "ours", "HF", "ratio", "goal", "met"))
    o, h = ours.get, hf.get
    t.add(f"prefill 1 x {sh.prompt} tokens (ms)", fmt(o("prefill_ms")), fmt(h("prefill_ms")), r(h("prefill_ms"), o("prefill_ms")),
          "-", "-")
    for key, label in (("greedy_shared", "batch-1 greedy tok/s (prompt as shared prefix)"),
                       ("greedy_own", "batch-1 greedy tok/s (prompt in own cache)")):
        x = o(f"{key}_tok_s")
        t.add(label, fmt(x), fmt(h("greedy_tok_s")), r(x, h("greedy_tok_s")), ">= 240", met(x, GOALS["greedy"]))
    x = o("candidates_tok_s")
    t.add(f"{sh.candidates} candidates top-p 0.9, total tok/s", fmt(x), fmt(h("candidates_tok_s")), r(x, h("candidates_tok_s")),
          ">= 4,000", met(x, GOALS["candidates"]))
    t.add("ViMaR s/caption (fixed lengths)", fmt(o("vimar_s"), 2), "-", "-", "<= 3", met(o("vimar_s"), 3.0, False))
    t.add("VisVM s/caption, same lengths (ratio: VisVM / ViMaR)", fmt(o("visvm_s"), 2), "-",
          r(o("visvm_s"), o("vimar_s")), "-", "-")
    mfu = o("td_mfu")
    layers = o("td_layers")
    label = "TD step MFU" + ("" if layers is None else f" ({layers}-layer model)")
    t.add(label, "-" if mfu is None else f"{100 * mfu:.1f}%", "-", "-", ">= 40%", met(mfu, GOALS["mfu"]))
    t.add("TD step tokens/s", fmt(o("td_tokens_s")), "-", "-", "-", "-")
    t.add(f"CLIP tower + projector, {sh.tiles} tiles (ms)", fmt(o("clip_ms")), fmt(h("clip_ms")), r(h("clip_ms"), o("clip_ms")),
          "-", "-")
    return t.render()


# ============================================================================================ main

def parse_sections(values) -> list[str]:
    chosen = []
    for v in values or []:
        for name in v.split(","):
            name = name.strip()
            if name not in SECTIONS:
                raise SystemExit(f"--only {name!r}: expected one of {', '.join(SECTIONS)}")
            chosen.append(name)
    return chosen or list(SECTIONS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", action="append", help=f"sections to run (repeatable or comma-separated): {SECTIONS}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (CPU): checks the script")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--td-remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--td-rows", type=int, default=None, help="packed rows per TD step")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--dump-hlo", default=None, help="write optimized HLO of decode / value / TD programs here")
    p.add_argument("--deadline", type=float, default=480.0,
                   help="seconds after which remaining sections are skipped (the table is still printed)")
    p.add_argument("--hf-timeout", type=float, default=240.0, help="seconds allowed for the HF child process")
    p.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sh = SMOKE if args.smoke else Shapes()
    if args.td_rows:
        sh = dataclasses.replace(sh, td_rows=args.td_rows)
    if args.smoke:
        args.repeats = 1

    if args.hf_child:                                # inside the child process: HF only
        result = run_hf(sh, args.repeats, args.dtype)
        with open(args.hf_child, "w") as f:
            json.dump(result, f)
        return 0

    sections = parse_sections(args.only)
    t_start = time.perf_counter()
    hf = hf_in_child(args, sh) if "hf" in sections else {}   # before JAX touches the GPU

    import jax

    ours = Ours(sh, args.dtype, args.repeats, args.dump_hlo)
    log(f"jax {jax.__version__} on {ours.device.device_kind} ({ours.device.platform}); shapes "
        f"{'smoke' if args.smoke else '7B'}")
    errors: dict[str, str] = {}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ours": ours.results, "hf": hf, "shapes": dataclasses.asdict(sh), "smoke": args.smoke,
                           "errors": errors, "seconds": time.perf_counter() - t_start}, f, indent=1, default=str)

    def peak_inference():
        ours.results["inference_peak_gib"] = ours.peak_gib()
        ours.release_inference()

    steps = [("prefill", ours.run_prefill, bool({"prefill", "greedy", "candidates", "vimar"} & set(sections))),
             ("greedy", ours.run_greedy, "greedy" in sections),
             ("candidates", ours.run_candidates, "candidates" in sections),
             ("vimar", ours.run_vimar, "vimar" in sections),
             ("clip", ours.run_clip, "clip" in sections),
             ("release", peak_inference, True),
             ("td", lambda: ours.run_td(args.td_remat), "td" in sections)]
    for name, fn, wanted in steps:
        if not wanted:
            continue
        if name != "release" and time.perf_counter() - t_start > args.deadline:
            log(f"skipping {name}: past the --deadline of {args.deadline:.0f} s")
            errors[name] = "skipped (deadline)"
            continue
        try:
            fn()
        except Exception as e:   # noqa: BLE001  one section's failure must not lose the others' numbers
            if args.smoke:
                raise
            import traceback

            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"section {name} failed: {errors[name]}")
        save()

    elapsed = time.perf_counter() - t_start
    print()
    print(f"gpu_bench: ours = jax {jax.__version__} on {ours.device.device_kind}; HF = transformers "
          f"{hf.get('transformers', '-')} + torch {hf.get('torch', '-')} on {hf.get('device', '-')}; "
          f"{'SMOKE shapes' if args.smoke else '7B shapes'}, {sh.prompt}-token prompt, {sh.new_tokens} new tokens, "
          f"{args.dtype}; total {elapsed:.0f} s")
    if ours.results.get("inference_peak_gib") is not None:
        print(f"peak device memory: {ours.results['inference_peak_gib']:.1f} GiB through the inference sections, "
              f"{fmt_opt(ours.results.get('td_peak_gib'))} GiB at the end of the TD section")
    for name, err in errors.items():
        print(f"section {name}: {err}")
    print(table(ours.results, hf, sh))
    save()
    return 1 if errors and not all(e.startswith("skipped") for e in errors.values()) else 0


def fmt_opt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
