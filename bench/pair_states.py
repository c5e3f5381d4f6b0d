"""Minimal-pair value states: the diagnostic training data of the README's value-model table.

    python bench/pair_states.py --out DIR [--scenes 3000] [--seed 2] [--clip DIR]
    python train/train_value.py --config configs/tiny_value.py --workdir W --config.rollouts=DIR \
        --config.data.tau=0.0 [--config.init=POLICY] [--config.num_epochs=8]

For each object of the first `--scenes` scenes of the training stream `--seed` (default 2): its true sentence
and one false sentence per kind (`bench/pairwise.py`'s minimal pairs, worded alike), each written as a
one-sentence terminal trajectory in the transitions format that `train/gen_rollouts.py` writes. Its δ is the
label (1 true, 0 false), or with `--clip DIR` that CLIP's δ (no label used). With τ = 0 the TD target of a
terminal state is its reward, so `train_value.py` regresses the value on δ: what a value model learns from a
direct per-sentence signal, without rollouts. Validation uses other scenes (`bench/pairwise.py`, seed 100).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository: vimar_jax, bench
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))


def write_pair_states(out: str, scenes: int, seed: int = 2, clip=None, progress: bool = False) -> dict:
    """Write the records and manifest to `out` (a directory without a manifest); returns the manifest.
    `clip`: a `ClipScorer` whose δ replaces the labels."""
    import gen_rollouts
    from pairwise import KINDS, minimal_pairs
    from tqdm import tqdm

    from vimar_jax.data import scenes as S
    from vimar_jax.data import sources

    source = sources.tiny_source(seed, scenes)

    def states():
        for i in tqdm(range(scenes), desc="pair states", disable=not progress):
            item = source.items[i]
            image = item.load()
            trues, falses = minimal_pairs(S.scene_at(seed, i), i, seed)
            texts = trues + [f for k in KINDS for f in falses[k]]
            values = [1.0] * len(trues) + [0.0] * (len(texts) - len(trues))
            if clip is not None:
                values = [float(v) for v in clip.score(clip.begin(image), texts)]
            for text, delta in zip(texts, values):
                yield item, [image.height, image.width], str(i), text, delta

    settings = {"pair_states": {"seed": seed, "scenes": scenes, "delta": "clip" if clip is not None else "label"}}
    return gen_rollouts.write_terminal_states(out, source, states(), settings, {"images": scenes})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (transitions; must not hold a manifest)")
    p.add_argument("--scenes", type=int, default=3000, help="training scenes")
    p.add_argument("--seed", type=int, default=2, help="scene stream (default 2, the training scenes)")
    p.add_argument("--clip", default=None, help="CLIP directory: its δ instead of the labels")
    args = p.parse_args(argv)
    if args.scenes < 1:
        p.error(f"--scenes must be >= 1, got {args.scenes}")
    from vimar_jax.data.scenes import check_training_seed

    try:
        check_training_seed(args.seed)
    except ValueError as e:
        p.error(str(e))
    clip = None
    if args.clip is not None:
        if not os.path.isfile(os.path.join(args.clip, "config.json")):
            print(f"bench/pair_states.py: error: {args.clip} has no config.json", file=sys.stderr)
            return 2
        from vimar_jax import pipeline

        clip = pipeline.load_clip_scorer(args.clip)
    try:
        manifest = write_pair_states(os.path.abspath(args.out), args.scenes, args.seed, clip, progress=True)
    except FileExistsError as e:
        print(f"bench/pair_states.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['counts']['records']} states of {args.scenes} scenes, mean δ "
          f"{manifest['delta_stats']['mean']:.3f}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
