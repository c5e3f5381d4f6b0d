"""CPU benchmark: the search engine's decoding shapes, side by side on the same models and images.

    python bench/engine_cpu.py [--images 10] [--warmup 10] [--methods greedy,visvm,vimar] [--smoke]

Three `LlavaPolicy` configurations over one policy checkpoint, one value scorer and one search config:

- `fixed`: every call decodes N·K rows (a power of two) against the prompt plus a `max_new_tokens`
  reservation (`LlavaPolicy(slots=N·K, caption_slots=max_new_tokens)`, the engine's shapes before
  5fc0ba8): one decode shape per token buffer for a whole search, so greedy decodes 32 rows for one and
  every step attends to the empty reservation;
- `per-call` (the default): each call decodes its rows as a power of two against the prompt plus a
  power-of-two extension that just holds the caption prefix;
- `compact`: `per-call` with `compact=True` (a candidate batch halves as its rows stop, down to 4).

Every configuration first captions `--warmup` untimed images with every method (so the timed runs meet
compiled shapes: compaction compiles a loop per batch size), then the timed images run in blocks in the
order fixed, per-call, compact, compact, per-call, fixed (drift on a shared machine cancels); a timed run
that still compiled (a shape the warm-up missed) is run again and the second time counts. Printed per
method: seconds per caption of each configuration, the ratios to `fixed`, and how many captions equal the
`fixed` ones (a row's draws do not depend on its batch; rounding across batch shapes may flip a near tie).
Uses the shipped tiny world when present, else random models of its shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from common import Table, fmt, machine_line, ratio, tiny_world_models
from search_cpu import calibrate_theta

from vimar_jax.data import sources  # noqa: E402
from vimar_jax.decode.policy import LlavaPolicy  # noqa: E402
from vimar_jax.decode.sampler import count_compiles  # noqa: E402
from vimar_jax.decode.scorers import ValueScorer, theta_default  # noqa: E402
from vimar_jax.decode.search import METHODS, Engine, SearchConfig  # noqa: E402
from vimar_jax.vlm import load_value, load_vlm  # noqa: E402

PROMPT = "Describe this image in detail."
CONFIGS = ("fixed", "per-call", "compact")
ORDER = ("fixed", "per-call", "compact", "compact", "per-call", "fixed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10, help="timed images (each runs in two blocks per config)")
    p.add_argument("--warmup", type=int, default=10, help="untimed images per configuration first")
    p.add_argument("--methods", default="greedy,visvm,vimar", help=f"comma-separated, from {METHODS}")
    p.add_argument("--n", type=int, default=5, help="temperatures (N)")
    p.add_argument("--k", type=int, default=6, help="samples per temperature (K)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget of one full caption")
    p.add_argument("--sentence-max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=100, help="tiny-world scene stream (validation by default)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS or m in ("bon", "clip-search")]
    if bad or not methods:
        p.error(f"--methods: {bad or 'none'}: choose from greedy, visvm, vimar")
    if args.smoke:
        args.images, args.warmup, args.n, args.k, args.max_new_tokens, args.sentence_max_tokens = 1, 1, 2, 4, 32, 16
        methods = [m for m in methods if m != "visvm"] or methods

    found, origin, tmp = tiny_world_models(("policy", "value"), prefix="vimar_engine_")
    vlm = load_vlm(found["policy"])
    value = ValueScorer(load_value(found["value"]))
    temps = tuple(round(t, 4) for t in (0.1 + 0.8 * i / max(args.n - 1, 1) for i in range(args.n)))
    config = SearchConfig(temperatures=temps, samples_per_temperature=args.k, top_p=0.9,
                          max_new_tokens=args.max_new_tokens, sentence_max_tokens=args.sentence_max_tokens, seed=0)
    images = [item.load() for item in sources.tiny_source(args.seed, 1 + args.warmup + args.images).items]
    policies = {"fixed": LlavaPolicy(vlm, slots=config.num_candidates, caption_slots=args.max_new_tokens),
                "per-call": LlavaPolicy(vlm), "compact": LlavaPolicy(vlm, compact=True)}
    try:
        theta, theta_note = theta_default(value.value), "the value model's stored default"
    except ValueError:
        theta = calibrate_theta(policies["per-call"], value, config, images[0])
        theta_note = "25th percentile of a calibration image's values"
    config = dataclasses.replace(config, theta=theta)
    engines = {c: Engine(pol, config, value=value) for c, pol in policies.items()}

    for c in CONFIGS:                                   # warm-up: compile every shape the searches meet
        for image in images[1:1 + args.warmup]:
            for m in methods:
                engines[c].run(image, PROMPT, m)
    timed = images[1 + args.warmup:]
    seconds = {(c, m): [] for c in CONFIGS for m in methods}
    captions = {(c, m): [] for c in CONFIGS for m in methods}
    compiles = {c: 0 for c in CONFIGS}
    for block, c in enumerate(ORDER):
        for image in timed:
            for m in methods:
                with count_compiles() as counts:
                    r = engines[c].run(image, PROMPT, m)
                if sum(counts.values()):                # a shape the warm-up missed: time it again, compiled
                    compiles[c] += sum(counts.values())
                    r = engines[c].run(image, PROMPT, m)
                seconds[(c, m)].append(r.seconds)
                if block < len(CONFIGS):
                    captions[(c, m)].append(r.caption)
    if tmp is not None:
        tmp.cleanup()

    print(f"engine_cpu: decoding shapes of the search engine on {origin}; {len(timed)} timed tiny-world images "
          f"(seed {args.seed}) x 2 blocks per configuration after {args.warmup} warm-up images each; "
          f"N={args.n} x K={args.k} = {config.num_candidates} candidates, top-p 0.9, caption budget "
          f"{args.max_new_tokens}, sentence budget {args.sentence_max_tokens}, theta={theta:.4f} ({theta_note})")
    print(machine_line())
    t = Table("seconds per caption (ratio = fixed / this: > 1 means faster than the fixed shapes)",
              ("method", "fixed", "per-call", "compact", "per-call ratio", "compact ratio", "captions = fixed"))
    for m in methods:
        s = {c: statistics.mean(seconds[(c, m)]) for c in CONFIGS}
        same = [sum(a == b for a, b in zip(captions[("fixed", m)], captions[(c, m)])) for c in CONFIGS[1:]]
        t.add(m, fmt(s["fixed"], 3), fmt(s["per-call"], 3), fmt(s["compact"], 3), ratio(s["fixed"], s["per-call"]),
              ratio(s["fixed"], s["compact"]), f"{same[0]}/{len(timed)}, {same[1]}/{len(timed)}")
    t.add("compilations in the timed runs", str(compiles["fixed"]), str(compiles["per-call"]),
          str(compiles["compact"]), "-", "-", "(such a run was timed again)")
    t.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
