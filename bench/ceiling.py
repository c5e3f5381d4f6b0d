"""How far the search engine goes when the value model is replaced by CLIP or by the truth (tiny world).

    python bench/ceiling.py [--models DIR] [--n 100] [--seed 100] [--percentiles 30,50,70] [--json OUT]
                            [--preset full|quick|smoke] [--theta-scenes 40]

On the scenes of stream `seed` (default 100, validation), with the models of `--models` (clip/, policy/;
default the shipped tiny world) and `vimar eval`'s search settings (N·K = 30; `--preset` takes those of a
`configs/claims.py` preset instead), it runs

- greedy and CLIP-PRM step search (the references);
- ViMaR with CLIP's δ as its sentence scorer, θ at each of `--percentiles` of δ over the greedy captions'
  sentences of `--theta-scenes` training scenes (seed 2): what ViMaR does with a value model that ranks as CLIP ranks;
- VisVM and ViMaR with **the truth** as the scorer: a sentence's correct object mentions minus twice its
  hallucinated ones (the tiny world's exact CHAIR parser), θ = 0.5, so that a sentence with a hallucination
  or without a correct mention is weak: what the engine does with a perfect value model.

and prints CHAIR_I, CHAIR_S, recall, sentences and seconds per caption for each. The value model's own rows
are `vimar eval`'s; this says which part of a gap is the value model's and which the search's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository: vimar_jax, bench

class TruthScorer:
    """Scores sentences against the scene set in `scene` (the engine's image is not enough to know it)."""

    scene = None

    def begin(self, image, prompt=None):
        if self.scene is None:
            raise ValueError("TruthScorer.scene is not set: assign the scene before each caption")
        return self.scene

    def score(self, scene, sentences, previous=None) -> np.ndarray:
        from vimar_jax.eval.chair import score_caption

        out = []
        for s in sentences:
            c = score_caption(s, scene)
            out.append((len(c.mentions) - len(c.hallucinated)) - 2.0 * len(c.hallucinated))
        return np.asarray(out, np.float32)


def clip_thetas(engine, prompt: str, percentiles, scenes: int) -> dict[float, float]:
    """{q: P_q of CLIP δ over the greedy sentences of the first `scenes` training scenes (seed 2)}."""
    from vimar_jax.data import scenes as S

    deltas = []
    for scene in S.scenes(2, scenes):
        image = S.render(scene)
        res = engine.run(image, prompt, "greedy")
        deltas += list(engine.clip.score(engine.clip.begin(image), [s.text for s in res.sentences]))
    return {q: float(np.percentile(deltas, q)) for q in percentiles}


def run(models: str, n: int, seed: int, percentiles, *, preset: str | None = None, theta_scenes: int = 40,
        progress: bool = False) -> dict:
    from tqdm import tqdm

    from bench.claims import load_config, search_config
    from vimar_jax import pipeline
    from vimar_jax.data import scenes as S
    from vimar_jax.decode.scorers import DEFAULT_PROMPT
    from vimar_jax.decode.search import Engine, SearchConfig
    from vimar_jax.eval.chair import tiny_chair

    if preset is None:
        config, prompt = SearchConfig(), DEFAULT_PROMPT
    else:
        recipe = load_config(preset)
        config, prompt = search_config(recipe.search), recipe.prompt
    base = pipeline.build_engine(policy=os.path.join(models, "policy"), value=False,
                                 clip=os.path.join(models, "clip"), config=config)
    truth = TruthScorer()
    thetas = clip_thetas(base, prompt, percentiles, theta_scenes)
    rows = [("greedy", Engine(base.policy, config), "greedy"),
            ("CLIP-PRM step search", Engine(base.policy, config, clip=base.clip), "clip-search")]
    rows += [(f"ViMaR, CLIP as scorer, θ = P{q:g} ({t:.3f})", Engine(base.policy, config, value=base.clip, theta=t),
              "vimar") for q, t in thetas.items()]
    rows += [("VisVM, truth as scorer", Engine(base.policy, config, value=truth), "visvm"),
             ("ViMaR, truth as scorer (θ = 0.5)", Engine(base.policy, config, value=truth, theta=0.5), "vimar")]
    scenes = S.scenes(seed, n)
    out = {"n": n, "seed": seed, "models": os.path.abspath(models), "preset": preset, "clip_thetas": thetas,
           "rows": {}, "captions": {}}
    warm = S.scene_at(seed, n)                 # one uncounted caption per row: compiling is not timed
    for name, engine, method in rows:
        truth.scene = warm
        engine.run(S.render(warm), prompt, method)
        caps, secs = [], []
        for scene in tqdm(scenes, desc=name, disable=not progress, leave=False):
            truth.scene = scene
            t0 = time.perf_counter()
            caps.append((engine.run(S.render(scene), prompt, method).caption, scene))
            secs.append(time.perf_counter() - t0)
        chair = tiny_chair(caps)
        out["rows"][name] = {"chair_i": chair["chair_i"], "chair_s": chair["chair_s"], "recall": chair["recall"],
                             "sentences": chair["sentences_per_caption"], "seconds_per_caption": float(np.mean(secs))}
        out["captions"][name] = [c for c, _ in caps]
    return out


def table(result: dict) -> str:
    lines = [f"{result['n']} scenes of seed {result['seed']}, models {result['models']}",
             "| search | CHAIR_I % | CHAIR_S % | recall % | sentences | s / caption |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in result["rows"].items():
        lines.append(f"| {name} | {100 * m['chair_i']:.1f} | {100 * m['chair_s']:.1f} | {100 * m['recall']:.1f} | "
                     f"{m['sentences']:.2f} | {m['seconds_per_caption']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.common import missing_model_dirs

    from vimar_jax import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(pipeline.TINY_WORLD), help="directory with clip/ and policy/")
    p.add_argument("--n", type=int, default=100, help="scenes")
    p.add_argument("--seed", type=int, default=100, help="scene stream (default: validation)")
    p.add_argument("--percentiles", default="30,50,70", help="θ percentiles of CLIP δ for ViMaR with CLIP")
    p.add_argument("--json", default=None, help="also write the figures and captions here")
    p.add_argument("--preset", default=None, choices=("full", "quick", "smoke"),
                   help="the search settings of this configs/claims.py preset (default: vimar eval's)")
    p.add_argument("--theta-scenes", type=int, default=40, help="training scenes behind CLIP's θ percentiles")
    args = p.parse_args(argv)
    if args.n < 1 or args.theta_scenes < 1:
        p.error(f"--n and --theta-scenes must be >= 1, got {args.n} and {args.theta_scenes}")
    try:
        percentiles = [float(q) for q in args.percentiles.split(",") if q.strip()]
    except ValueError:
        p.error(f"--percentiles {args.percentiles!r}: expected comma-separated numbers")
    if not percentiles or not all(0 <= q <= 100 for q in percentiles):
        p.error(f"--percentiles {args.percentiles!r}: expected numbers in [0, 100]")
    missing = missing_model_dirs(args.models, ("clip", "policy"))
    if missing:
        print(f"bench/ceiling.py: error: {args.models} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    result = run(args.models, args.n, args.seed, percentiles, preset=args.preset, theta_scenes=args.theta_scenes,
                 progress=True)
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
