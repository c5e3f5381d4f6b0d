"""Does a scorer rank a true sentence above a false one about the same image? Value model vs CLIP.

    python bench/pairwise.py [--models DIR] [--n 100] [--seed 100] [--json]

For each scene of the stream `seed` (default 100, the validation scenes), every object's true sentence is
scored against one false sentence of each kind (wrong colour, wrong shape, absent object, wrong position;
`vimar_jax.data.scenes.false_sentence`) by the value model (image + sentence state) and by CLIP (δ). Prints
the fraction of (true, false) pairs each scorer orders correctly (0.5 = chance). A value model that guides
search away from hallucination must order them; CLIP's row is what its reward could teach.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("color", "shape", "absent", "position")


def pairwise(scorers: dict, n: int, seed: int) -> dict:
    """{scorer: {kind: accuracy, "pairs": count}} over scenes 0..n-1 of `seed`."""
    from vimar_jax.data import scenes as S

    rng = np.random.default_rng(0)
    wins = {name: {k: [] for k in KINDS} for name in scorers}
    for i in range(n):
        scene = S.scene_at(seed, i)
        image = S.render(scene)
        trues = [S.object_sentence(o, rng) for o in scene.objects]
        falses = [S.false_sentence(scene, rng, k) for k in KINDS]
        for name, scorer in scorers.items():
            s = scorer.score(scorer.begin(image), trues + falses)
            for j, k in enumerate(KINDS):
                wins[name][k] += list(s[:len(trues)] > s[len(trues) + j])
    return {name: {**{k: float(np.mean(v)) for k, v in w.items()}, "pairs": len(w[KINDS[0]])}
            for name, w in wins.items()}


def main(argv=None) -> int:
    from vimar_jax import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(pipeline.TINY_WORLD), help="directory with value/ and clip/")
    p.add_argument("--n", type=int, default=100, help="scenes")
    p.add_argument("--seed", type=int, default=100, help="scene stream (default: validation)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    for d in ("value", "clip"):
        if not os.path.isfile(os.path.join(args.models, d, "config.json")):
            print(f"bench/pairwise.py: error: {args.models} has no {d}/config.json", file=sys.stderr)
            return 2
    scorers = {"value": pipeline.load_value_scorer(os.path.join(args.models, "value")),
               "clip": pipeline.load_clip_scorer(os.path.join(args.models, "clip"))}
    out = pairwise(scorers, args.n, args.seed)
    if args.json:
        print(json.dumps({"models": args.models, "seed": args.seed, "n": args.n, "accuracy": out}))
        return 0
    print(f"true above false, {args.n} scenes of seed {args.seed} ({out['value']['pairs']} pairs per kind)")
    print("| scorer | " + " | ".join(KINDS) + " |")
    print("|---|" + "---:|" * len(KINDS))
    for name, acc in out.items():
        print(f"| {name} | " + " | ".join(f"{acc[k]:.3f}" for k in KINDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
