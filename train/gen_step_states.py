"""Search-candidate value states (ours): the sentences a step search compares, each valued by CLIP against
the others of its step.

    python train/gen_step_states.py --policy DIR --clip DIR --source tiny:2:2000 --out STATES
    python train/train_value.py --config configs/tiny_value.py --workdir W --config.init=POLICY \\
        --config.rollouts=STATES --config.data.tau=0.0 [--config.num_epochs=5]

For every (image, prompt) pair of the source, CLIP-PRM step search runs with the search's candidate settings
(N temperatures × K samples, `--temperatures`, `-k`, `--top-p`), and every step's distinct candidate sentences
are kept with their CLIP δ. Each becomes a one-sentence terminal trajectory (group `ITEM/STEP`) whose stored
δ is its **advantage** within the step: (δ − the mean δ of the step's distinct candidates) · scale, with one
scale for the whole output that makes the advantages' standard deviation `--target-std`. A step whose
candidates are all one sentence ranks nothing and is skipped. With τ = 0 the TD target of a terminal state is
its reward, so `train_value.py` regresses the value on CLIP's ranking of the candidates a step search (VisVM,
ViMaR's Stage 2) compares, without the spread of δ across sentences and images that TD on rollouts fits first.

This is not the paper's recipe (TD(0) over the policy's rollouts, `train/gen_rollouts.py`); the README's
issue-6 section says why it exists and what it measures. Written once: an output directory that already holds
a manifest is refused, and a failure leaves no finished shard behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

SCRIPT = "train/gen_step_states.py"


class RecordingScorer:
    """A `Scorer` that passes through to `scorer` and keeps every `score` call's (sentences, scores)."""

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, []

    def begin(self, image, prompt=None):
        return self.scorer.begin(image, prompt)

    def score(self, ctx, sentences, previous=None):
        s = self.scorer.score(ctx, sentences, previous)
        self.calls.append((list(sentences), [float(x) for x in s]))
        return s


def step_groups(calls: Sequence[tuple[list[str], list[float]]]) -> list[tuple[int, list[str], np.ndarray]]:
    """(step, distinct sentences in first-seen order, their δ) of each recorded step with two or more."""
    out = []
    for step, (texts, deltas) in enumerate(calls):
        seen: dict[str, float] = {}
        for t, d in zip(texts, deltas):
            seen.setdefault(t, d)
        if len(seen) >= 2:
            out.append((step, list(seen), np.asarray(list(seen.values()), np.float64)))
    return out


def write_step_states(out: str, engine, source, *, target_std: float = 0.5, progress: bool = False) -> dict:
    """Run the step search over `source` with `engine` (its CLIP scorer recorded) and write the states to `out`
    (a directory without a manifest); returns the manifest."""
    from tqdm import tqdm

    import gen_rollouts
    from vimar_jax.decode.search import Engine

    gen_rollouts.refuse_written(out)           # before the search, not after it
    recorder = RecordingScorer(engine.clip)
    search = Engine(engine.policy, engine.cfg, clip=recorder)
    items = []                                 # (item, image_hw, [(step, texts, δ)])
    for item in tqdm(source.items, desc="step states", disable=not progress):
        image = item.load()
        recorder.calls = []
        search.run(image, item.prompt, "clip-search")
        items.append((item, [image.height, image.width], step_groups(recorder.calls)))
    advantages = [d - d.mean() for _, _, groups in items for _, _, d in groups]
    if not advantages:
        raise ValueError(f"{source.describe()}: no step had two distinct candidates; nothing to write")
    spread = float(np.concatenate(advantages).std())
    if spread == 0.0:
        raise ValueError(f"{source.describe()}: every candidate of every step has the same δ; nothing to rank")
    scale = target_std / spread
    states = ((item, hw, f"{item.index}/{step}", text, a)
              for item, hw, groups in items for step, texts, d in groups
              for text, a in zip(texts, (d - d.mean()) * scale))
    cfg = engine.cfg
    settings = {"step_states": {"source": source.describe(), "temperatures": list(cfg.temperatures),
                                "samples_per_temperature": cfg.samples_per_temperature, "top_p": cfg.top_p,
                                "target_std": target_std, "scale": scale, "delta_advantage_std": spread}}
    return gen_rollouts.write_terminal_states(out, source, states, settings,
                                              {"images": len(source.items),
                                               "steps": sum(len(g) for _, _, g in items)})


def main(argv: Sequence[str] | None = None) -> int:
    from vimar_jax.decode.config import SearchConfig

    d = SearchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy directory (the one the value model will guide)")
    p.add_argument("--clip", required=True, help="CLIP directory (the reward model)")
    p.add_argument("--source", required=True, help="folder:PATH | jsonl:PATH | coco:DIR[:SPLIT[:N]] | tiny:SEED:N")
    p.add_argument("--out", required=True, help="output directory (must not hold a manifest)")
    p.add_argument("--prompt", default=None, help="a prompt or prompt set; default: the source's")
    p.add_argument("--image-root", default=None, help="jsonl source: directory of relative image paths")
    p.add_argument("--temperatures", default=",".join(f"{t:g}" for t in d.temperatures),
                   help="candidate temperatures (N), comma-separated")
    p.add_argument("-k", "--samples-per-temperature", type=int, default=d.samples_per_temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--target-std", type=float, default=0.5, help="standard deviation of the stored advantages")
    args = p.parse_args(argv)
    try:
        temps = tuple(float(t) for t in args.temperatures.split(",") if t.strip())
    except ValueError:
        p.error(f"--temperatures {args.temperatures!r}: expected comma-separated numbers")
    if not args.target_std > 0:
        p.error(f"--target-std must be > 0, got {args.target_std}")
    for role in ("policy", "clip"):
        path = getattr(args, role)
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"{SCRIPT}: error: --{role} {path} has no config.json", file=sys.stderr)
            return 2
    from vimar_jax import pipeline
    from vimar_jax.data import scenes as S
    from vimar_jax.data import sources

    try:
        config = SearchConfig(temperatures=temps, samples_per_temperature=args.samples_per_temperature,
                              top_p=args.top_p)
        source = sources.parse_source(args.source, prompts=args.prompt, image_root=args.image_root)
        if source.kind == "tiny":
            S.check_training_seed(int(args.source.split(":")[1]), "--source tiny seed")
    except ValueError as e:
        p.error(str(e))
    engine = pipeline.build_engine(policy=args.policy, value=False, clip=args.clip, config=config)
    try:
        manifest = write_step_states(os.path.abspath(args.out), engine, source, target_std=args.target_std,
                                     progress=True)
    except (FileExistsError, ValueError) as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"{c['records']} candidate states of {c['steps']} steps of {c['images']} images "
          f"(advantage scale {manifest['settings']['step_states']['scale']:.2f}): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
