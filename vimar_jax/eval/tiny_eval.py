"""Tiny-world evaluation of the searches: caption held-out scenes with each method, exact CHAIR, cost.

`evaluate(engine, methods, n=..., seed=...)` draws scenes `0..n-1` of the stream `seed` (use a seed no
training stage used: configs/tiny_world.py reserves seeds >= 1000), captions every scene with every
method through one `vimar_jax.decode.search.Engine`, and returns per method

    {chair_i, chair_s, recall, sentences, seconds_per_caption, tokens_per_caption, attr_chair_i,
     attr_chair_s, attr_recall, pos_chair_i, words_per_caption, sentences_scored_per_caption, n_captions, ...}

(rates are fractions in [0, 1]; `sentences` is sentences per caption). Each method first captions one
warm-up scene (the last of the stream's first n+1; not counted), so `seconds_per_caption` measures
steady-state work, not compilation.

Methods are the engine's (`greedy`, `bon`, `clip-search`, `visvm`, `vimar`) plus `bon-clip` and
`bon-value`: best-of-N with the scorer named, whatever the engine's `bon_scorer`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from vimar_jax.data import scenes as S
from vimar_jax.decode.search import METHODS, Engine

DEFAULT_PROMPT = "Describe this image in detail."
EXTRA_METHODS = {"bon-clip": ("bon", "clip"), "bon-value": ("bon", "value")}
ALL_METHODS = METHODS + tuple(EXTRA_METHODS)
TABLE_COLUMNS = (  # (key, header, percent)
    ("chair_i", "CHAIR_I %", True), ("chair_s", "CHAIR_S %", True), ("recall", "recall %", True),
    ("attr_chair_i", "attrCHAIR_I %", True), ("sentences", "sent/cap", False),
    ("seconds_per_caption", "s/cap", False), ("tokens_per_caption", "tok/cap", False),
)


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """"greedy,vimar" -> ["greedy", "vimar"]; an unknown method is an error listing the known ones."""
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else [str(m).strip() for m in spec]
    names = [m for m in names if m]
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise ValueError(f"unknown method(s) {bad or spec!r}; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def needs(methods: Iterable[str], bon_scorer: str = "clip") -> tuple[bool, bool]:
    """(needs the value model, needs CLIP) for a list of methods."""
    value = clip = False
    for m in methods:
        base, scorer = EXTRA_METHODS.get(m, (m, bon_scorer if m == "bon" else None))
        value |= base in ("visvm", "vimar") or scorer == "value"
        clip |= base == "clip-search" or scorer == "clip"
    return value, clip


def engine_for(engine: Engine, method: str) -> tuple[Engine, str]:
    """(engine, engine method) running `method`: `bon-clip`/`bon-value` get a copy of the engine whose
    best-of-N scorer is the one named (same models, same settings otherwise)."""
    if method not in EXTRA_METHODS:
        return engine, method
    base, scorer = EXTRA_METHODS[method]
    if engine.cfg.bon_scorer == scorer:
        return engine, base
    cfg = dataclasses.replace(engine.cfg, bon_scorer=scorer)
    return Engine(engine.policy, cfg, value=engine.value, clip=engine.clip, theta=engine.theta), base


@dataclasses.dataclass
class Captioned:
    """One caption of one scene by one method."""
    index: int
    scene: S.Scene
    method: str
    result: object             # vimar_jax.decode.search.CaptionResult


def caption_scenes(engine: Engine, scenes: Sequence[S.Scene], method: str, *, prompt: str = DEFAULT_PROMPT,
                   warmup: S.Scene | None = None, progress: Callable[[int], None] | None = None) -> list[Captioned]:
    """Caption `scenes` with `method` (after one uncounted warm-up caption of `warmup`, if given)."""
    eng, base = engine_for(engine, method)
    if warmup is not None:
        eng.run(S.render(warmup), prompt, base)
    out = []
    for i, scene in enumerate(scenes):
        out.append(Captioned(i, scene, method, eng.run(S.render(scene), prompt, base)))
        if progress is not None:
            progress(i + 1)
    return out


def summarize(captioned: Sequence[Captioned]) -> dict:
    """CHAIR (tiny world, exact) and cost of one method's captions."""
    from vimar_jax.eval.chair import tiny_chair

    if not captioned:
        raise ValueError("no captions to summarize")
    chair = tiny_chair((c.result.caption, c.scene) for c in captioned)
    n = len(captioned)
    return {
        "chair_i": chair["chair_i"], "chair_s": chair["chair_s"], "recall": chair["recall"],
        "sentences": chair["sentences_per_caption"],
        "seconds_per_caption": float(sum(c.result.seconds for c in captioned) / n),
        "tokens_per_caption": float(sum(c.result.tokens_decoded for c in captioned) / n),
        "sentences_scored_per_caption": float(sum(c.result.sentences_scored for c in captioned) / n),
        **{k: chair[k] for k in ("attr_chair_i", "attr_chair_s", "attr_recall", "pos_chair_i", "pos_chair_s",
                                 "count_error_rate", "words_per_caption", "n_captions", "n_mentions",
                                 "n_hallucinated", "attr_n_hallucinated", "n_objects")},
    }


def evaluate(engine: Engine, methods: Sequence[str], *, n: int, seed: int, prompt: str = DEFAULT_PROMPT,
             warmup: bool = True, show_progress: bool = True, keep: bool = False) -> dict:
    """{method: summary} over scenes 0..n-1 of stream `seed` (see the module docstring). With `keep`, the
    captions are returned too, under the key "_captions" ({method: [Captioned]})."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    methods = parse_methods(methods)
    scenes = S.scenes(seed, n)
    warm = S.scene_at(seed, n) if warmup else None
    out: dict = {}
    kept = {}
    for method in methods:
        t0 = time.perf_counter()
        bar = None
        if show_progress:
            from tqdm import tqdm
            bar = tqdm(total=n, desc=f"eval {method}", unit="cap", file=sys.stderr, leave=False)
        caps = caption_scenes(engine, scenes, method, prompt=prompt, warmup=warm,
                              progress=(lambda k: bar.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        out[method] = {**summarize(caps), "wall_seconds": time.perf_counter() - t0}
        if keep:
            kept[method] = caps
    if keep:
        out["_captions"] = kept
    return out


def format_table(results: dict, columns=TABLE_COLUMNS) -> str:
    """A fixed-width text table of `evaluate` results (rates in percent)."""
    methods = [m for m in results if not m.startswith("_")]
    head = ["method"] + [h for _, h, _ in columns]
    rows = [[m] + [(f"{100 * results[m][k]:.1f}" if pct else f"{results[m][k]:.2f}") for k, _, pct in columns]
            for m in methods]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def caption_values(engine: Engine, image, result, method: str, prompt: str = DEFAULT_PROMPT
                   ) -> list[float | None]:
    """Per-sentence value-model values of a caption by `method` (answering `prompt`), for display: the
    search's own scores when they are values (VisVM, ViMaR, best-of-N by value), else one batched call of the
    engine's value model in its own value state (None without a value model)."""
    scorer = EXTRA_METHODS.get(method, (method, engine.cfg.bon_scorer if method == "bon" else None))[1]
    if method in ("visvm", "vimar") or scorer == "value":
        return [s.value for s in result.sentences]
    texts = [s.text for s in result.sentences]
    if engine.value is None or not texts:
        return [None] * len(texts)
    ctx = engine.value.begin(image, prompt)
    return [float(v) for v in np.asarray(engine.value.score(ctx, texts, [texts[:i] for i in range(len(texts))]))]
