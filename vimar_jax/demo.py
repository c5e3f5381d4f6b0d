"""`vimar demo`: the whole method on a CPU in minutes, with the shipped tiny-world models.

Draws a few held-out tiny-world scenes (seed 1001 by default: configs/tiny_world.py never trains on seeds
>= 1000), captions each with greedy decoding, VisVM step search and ViMaR, prints every caption with the
value of each sentence (and the scene's true objects), then a table of CHAIR_I, CHAIR_S, recall,
sentences and seconds per caption, and writes an HTML report (sentence values as colour, Stage-2
replacements and appends marked).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_METHODS = "greedy,visvm,vimar"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vimar_jax.caption_cli import add_model_arguments, add_search_arguments

    p.add_argument("--n", type=int, default=4, help="number of scenes (default 4)")
    p.add_argument("--seed", type=int, default=1001, help="held-out scene stream (default 1001)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--html", default="demo.html", help="HTML report to write (default demo.html; '' = none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(p)
    add_search_arguments(p, seed_flag="--search-seed")


def _objects(scene) -> str:
    return ", ".join(f"{o.size} {o.color} {o.shape} ({o.position})" for o in scene.objects)


def _sentence_line(text: str, value, origin: str) -> str:
    v = "   --  " if value is None else f"{value:+.3f}"
    mark = {"replaced": " [replaced]", "appended": " [appended]"}.get(origin, "")
    return f"    {v}  {text}{mark}"


def run(args: argparse.Namespace) -> int:
    from vimar_jax.data import scenes as S
    from vimar_jax.eval import tiny_eval
    from vimar_jax.caption_cli import build_engine_for

    try:
        methods = tiny_eval.parse_methods(args.methods)
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        engine = build_engine_for(args, methods)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimar demo: error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt or tiny_eval.DEFAULT_PROMPT
    print(f"vimar demo: {args.n} held-out tiny-world scenes (seed {args.seed}), methods {', '.join(methods)}; "
          f"prompt {prompt!r}", flush=True)
    results = tiny_eval.evaluate(engine, methods, n=args.n, seed=args.seed, prompt=prompt, keep=True,
                                 show_progress=not args.quiet)
    captions = results.pop("_captions")
    rows = []
    for i in range(args.n):
        scene = captions[methods[0]][i].scene
        image = S.render(scene)
        print(f"\nscene {i} ({scene.width}x{scene.height}): {_objects(scene)}")
        for m in methods:
            res = captions[m][i].result
            values = tiny_eval.caption_values(engine, image, res, m, prompt)
            print(f"  {m} ({res.seconds:.2f} s):")
            for s, v in zip(res.sentences, values):
                print(_sentence_line(s.text, v, s.origin))
            rows.append({"image": image, "image_name": f"seed {args.seed} scene {i}: {_objects(scene)}",
                         "method": m, "caption": res.caption, "seconds": res.seconds,
                         "sentences": [{"text": s.text, "value": v, "refined": s.refined, "origin": s.origin}
                                       for s, v in zip(res.sentences, values)]})
    print()
    print(tiny_eval.format_table(results))
    if args.html:
        from vimar_jax.report import render

        cols = {k: h for k, h, _ in tiny_eval.TABLE_COLUMNS}
        summary = {m: {cols[k]: (100 * r[k] if pct else r[k]) for k, _, pct in tiny_eval.TABLE_COLUMNS}
                   for m, r in results.items()}
        page = render(rows, title=f"vimar demo: tiny world, seed {args.seed}", theta=engine.theta, summary=summary)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"\nwrote {args.html}")
    return 0
