"""`vimar eval`: evaluation verbs.

    vimar eval chair CAPTIONS.jsonl (--annotations instances.json | --scenes scenes.jsonl) [--json OUT]
    vimar eval --n N [--seed 1000] [--methods greedy,bon,clip-search,visvm,vimar] [--json OUT]
               [--policy DIR --value DIR --clip DIR] [search flags]
    vimar eval tiny --n N ...          (the same tiny-world run, spelled as a sub-verb)

The tiny-world run captions held-out scenes with each method (the shipped tiny models unless directories
are given) and writes `{method: {chair_i, chair_s, recall, sentences, seconds_per_caption,
tokens_per_caption, attr_chair_i, ...}}` (`vimar_jax.eval.tiny_eval`).
"""

from __future__ import annotations

import argparse
import json
import sys

from vimar_jax.caption_cli import add_model_arguments, add_search_arguments, build_engine_for

_ROWS = (  # (key, label, is a rate)
    ("chair_s", "CHAIR_S (%)", True),
    ("chair_i", "CHAIR_I (%)", True),
    ("recall", "recall (%)", True),
    ("attr_chair_s", "attribute CHAIR_S (%)", True),
    ("attr_chair_i", "attribute CHAIR_I (%)", True),
    ("attr_recall", "attribute recall (%)", True),
    ("pos_chair_s", "position CHAIR_S (%)", True),
    ("pos_chair_i", "position CHAIR_I (%)", True),
    ("count_error_rate", "count errors (%)", True),
    ("sentences_per_caption", "sentences / caption", False),
    ("words_per_caption", "words / caption", False),
    ("n_captions", "captions", False),
    ("n_mentions", "object mentions", False),
    ("n_hallucinated", "hallucinated mentions", False),
    ("n_objects", "ground-truth objects", False),
    ("n_unknown_images", "skipped (unknown image id)", False),
)
DEFAULT_SEED = 1000            # held out (configs/tiny_world.py: seeds >= 1000 are never trained on)
DEFAULT_METHODS = "greedy,bon,clip-search,visvm,vimar"


# ------------------------------------------------------------------------------------------- arguments

def _add_tiny_arguments(p: argparse.ArgumentParser, *, n_required: bool) -> None:
    p.add_argument("--n", type=int, required=n_required, default=None, help="number of held-out scenes")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"scene stream (default {DEFAULT_SEED}; never a training seed)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated (default {DEFAULT_METHODS}; also bon-clip, bon-value)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write {method: metrics} here")
    p.add_argument("--no-warmup", action="store_true", help="count the first (compiling) caption in the timings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(p)
    add_search_arguments(p, seed_flag="--search-seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Tiny world: `vimar eval --n N ...` (or `vimar eval tiny --n N ...`)."
    _add_tiny_arguments(parser, n_required=False)
    sub = parser.add_subparsers(dest="eval_verb", metavar="METRIC")
    p = sub.add_parser("chair", help="CHAIR_S / CHAIR_I / recall of captions (COCO or tiny world)",
                       description="CHAIR of a captions JSONL file ({\"image_id\": ..., \"caption\": ...} or "
                                   "{\"image\": \"path/000000123.jpg\", \"caption\": ...} per line).")
    p.add_argument("captions", help="captions JSONL file")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--annotations", help="COCO instances JSON (images, annotations, categories)")
    gt.add_argument("--scenes", help="tiny-world ground truth: JSONL of scenes (vimar_jax.data.scenes.save_scenes)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the metrics to this JSON file")
    t = sub.add_parser("tiny", help="caption held-out tiny-world scenes with each search; CHAIR and cost",
                       description="Caption held-out tiny-world scenes with each method; CHAIR, recall, cost.")
    _add_tiny_arguments(t, n_required=True)


# ------------------------------------------------------------------------------------------------- chair

def format_table(result: dict) -> str:
    lines = [f"CHAIR ({result.get('setting', '?')})"]
    rows = [(label, f"{100 * result[k]:.2f}" if rate else
             (f"{result[k]:.2f}" if isinstance(result[k], float) else str(result[k])))
            for k, label, rate in _ROWS if k in result]
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}}  {value:>9}" for label, value in rows]
    return "\n".join(lines)


def run_chair(args: argparse.Namespace) -> int:
    from vimar_jax.eval import chair

    try:
        result = chair.evaluate_file(args.captions, annotations=args.annotations, scenes=args.scenes)
    except (FileNotFoundError, ValueError) as e:
        print(f"vimar eval chair: error: {e}", file=sys.stderr)
        return 2
    if result["n_unknown_images"]:
        first = ", ".join(f"line {line}: id {i}" for line, i in result["unknown_images"][:3])
        print(f"vimar eval chair: warning: skipped {result['n_unknown_images']} caption(s) whose image id is not in "
              f"the ground truth ({first})", file=sys.stderr)
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


# -------------------------------------------------------------------------------------------------- tiny

def run_tiny(args: argparse.Namespace) -> int:
    from vimar_jax.eval import tiny_eval

    try:
        methods = tiny_eval.parse_methods(args.methods)
        if args.n is None or args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        engine = build_engine_for(args, methods)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimar eval: error: {e}", file=sys.stderr)
        return 2
    results = tiny_eval.evaluate(engine, methods, n=args.n, seed=args.seed,
                                 prompt=args.prompt or tiny_eval.DEFAULT_PROMPT, warmup=not args.no_warmup,
                                 show_progress=not args.quiet)
    print(f"tiny world: {args.n} scenes of seed {args.seed}")
    print(tiny_eval.format_table(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    verb = getattr(args, "eval_verb", None)
    if verb == "chair":
        return run_chair(args)
    if verb == "tiny" or (verb is None and args.n is not None):
        return run_tiny(args)
    print("vimar eval: give a metric (`vimar eval chair CAPTIONS.jsonl ...`) or a tiny-world run "
          "(`vimar eval --n N ...`)", file=sys.stderr)
    return 2
