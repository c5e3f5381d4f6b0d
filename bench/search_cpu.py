"""CPU benchmark: ViMaR vs VisVM step search, same engine, same N and K, same models and images.

    python bench/search_cpu.py [--images 3] [--n 5] [--k 6] [--smoke]

Both searches run through one `vimar_jax.decode.search.Engine` over `LlavaPolicy` and `ValueScorer`
(the value model valuing each sentence against its once-prefilled image prefix), with the shipped
tiny-world policy and value model (`vimar_jax/assets/tiny_world/`) when they exist, else random models of
the tiny world's shapes written to a temporary directory (their weights lean towards words, "." and EOS so
captions have sentences). N temperatures x K samples per step for both; VisVM samples N.K candidate
sentences at every step until EOS or `max_sentences`; ViMaR samples N.K full captions once, values their
sentences, then refines (weak sentences below θ) and appends. θ is the 25th percentile of the values of a
calibration image's Stage-1 sentences (so Stage 2 has work to do).

Every image runs both methods (taking turns) after `--warmup` untimed images (compilations); compilations
that still happen in the timed runs (a caption meeting a new shape bucket) are counted and printed. Reported per caption:
seconds, tokens decoded (all candidate rows), sentences valued; ratio = VisVM / ViMaR (> 1: ViMaR is
cheaper). The paper reports 4.3x in seconds on LLaVA-NeXT-7B.
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import statistics
import time

from common import Table, fmt, machine_line, ratio, tiny_world_models

import numpy as np  # noqa: E402

from vimar_jax.data import sources  # noqa: E402
from vimar_jax.decode.policy import LlavaPolicy  # noqa: E402
from vimar_jax.decode.sampler import count_compiles  # noqa: E402
from vimar_jax.decode.scorers import ValueScorer  # noqa: E402
from vimar_jax.decode.search import Engine, SearchConfig  # noqa: E402
from vimar_jax.vlm import load_value, load_vlm  # noqa: E402

PROMPT = "Describe this image in detail."
METHODS = ("vimar", "visvm")


class Stopwatch:
    """Wall time spent inside chosen methods of an object (wraps them on the instance)."""

    def __init__(self, obj, names):
        self.seconds = collections.Counter()
        for name in names:
            setattr(obj, name, self._wrap(getattr(obj, name), name))

    def _wrap(self, fn, name):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def calibrate_theta(policy, value, config: SearchConfig, image, percentile: float = 25.0) -> float:
    """θ: a percentile of the values of one image's Stage-1 sentences (what Stage 2 compares against)."""
    ctx, vctx = policy.begin(image, PROMPT), value.begin(image)
    s = policy.sample(ctx, [], config.candidate_temperatures(), top_p=config.top_p, top_k=config.top_k, stop="eos",
                      max_new_tokens=config.max_new_tokens, seed=12345)
    texts = [t for caption in s.tokens for t in (policy.decode(x).strip() for x in policy.split(caption)) if t]
    if not texts:
        raise RuntimeError("the calibration image's candidates have no sentences")
    return float(np.percentile(value.score(vctx, texts), percentile))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--n", type=int, default=5, help="temperatures (N)")
    p.add_argument("--k", type=int, default=6, help="samples per temperature (K)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget of one full caption")
    p.add_argument("--sentence-max-tokens", type=int, default=32)
    p.add_argument("--max-sentences", type=int, default=8, help="step-search cap")
    p.add_argument("--warmup", type=int, default=2, help="untimed images first (compilations)")
    p.add_argument("--seed", type=int, default=7, help="tiny-world scene stream")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.n, args.k, args.max_new_tokens, args.sentence_max_tokens, args.max_sentences = \
            1, 2, 2, 32, 16, 3
        args.warmup = 1

    found, origin, tmp = tiny_world_models(("policy", "value"), prefix="vimar_search_")
    policy = LlavaPolicy(load_vlm(found["policy"]))
    value = ValueScorer(load_value(found["value"]))
    temps = tuple(float(t) for t in np.linspace(0.1, 0.9, args.n)) if args.n > 1 else (0.5,)
    base = SearchConfig(temperatures=temps, samples_per_temperature=args.k, top_p=0.9,
                        max_new_tokens=args.max_new_tokens, sentence_max_tokens=args.sentence_max_tokens,
                        max_sentences=args.max_sentences, seed=0)
    items = sources.tiny_source(args.seed, 1 + args.warmup + args.images).items
    images = [item.load() for item in items]
    theta = calibrate_theta(policy, value, base, images[0])
    engine = Engine(policy, dataclasses.replace(base, theta=theta), value=value)

    for image in images[1:1 + args.warmup]:         # warm-up: compile the shapes the searches use
        for method in METHODS:
            engine.run(image, PROMPT, method)
    results = {m: [] for m in METHODS}
    compiles = {m: collections.Counter() for m in METHODS}
    spent = {m: collections.Counter() for m in METHODS}
    watch_policy, watch_value = Stopwatch(policy, ("begin", "sample")), Stopwatch(value, ("begin", "score"))
    for image in images[1 + args.warmup:]:
        for method in METHODS:
            watch_policy.seconds.clear()
            watch_value.seconds.clear()
            with count_compiles() as counts:
                results[method].append(engine.run(image, PROMPT, method))
            compiles[method].update(counts)
            spent[method]["policy"] += sum(watch_policy.seconds.values())
            spent[method]["value"] += sum(watch_value.seconds.values())
    if tmp is not None:
        tmp.cleanup()

    def mean(method, field):
        return statistics.mean(getattr(r, field) for r in results[method])

    print(f"search_cpu: ViMaR vs VisVM on {origin}; {args.images} tiny-world images after {args.warmup} warm-up "
          f"images; "
          f"N={args.n} temperatures {[round(t, 2) for t in temps]} x K={args.k} = {base.num_candidates} candidates, "
          f"top-p 0.9, caption budget {args.max_new_tokens}, sentence budget {args.sentence_max_tokens}, "
          f"step cap {args.max_sentences}, theta={theta:.4f} (25th percentile of calibration values)")
    print(machine_line())
    sentences = {m: statistics.mean(len(r.sentences) for r in results[m]) for m in METHODS}
    t = Table("per caption, mean over images (ratio = VisVM / ViMaR: > 1 means ViMaR is cheaper)",
              ("figure", "ViMaR", "VisVM", "ratio", "note"))
    t.add("seconds per caption", fmt(mean("vimar", "seconds"), 2), fmt(mean("visvm", "seconds"), 2),
          ratio(mean("visvm", "seconds"), mean("vimar", "seconds")), "paper (7B, A6000): 108 s vs 462 s = 4.3x")
    t.add("tokens decoded per caption", fmt(mean("vimar", "tokens_decoded")), fmt(mean("visvm", "tokens_decoded")),
          ratio(mean("visvm", "tokens_decoded"), mean("vimar", "tokens_decoded")), "all candidate rows")
    t.add("sentences valued per caption", fmt(mean("vimar", "sentences_scored")),
          fmt(mean("visvm", "sentences_scored")), ratio(mean("visvm", "sentences_scored"),
                                                        mean("vimar", "sentences_scored")), "-")
    n = len(images) - 1 - args.warmup
    for part, label in (("policy", "policy prefill + sampling"), ("value", "value prefill + scoring")):
        a, b = spent["vimar"][part] / n, spent["visvm"][part] / n
        t.add(f"  seconds in {label}", fmt(a, 2), fmt(b, 2), ratio(b, a), "-")
    t.add("sentences in the caption", fmt(sentences["vimar"]), fmt(sentences["visvm"]), "-", "-")
    t.add("compilations in the timed runs", str(sum(compiles["vimar"].values())),
          str(sum(compiles["visvm"].values())), "-", "new shapes met after the warm-up (included above)")
    t.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
