"""`vimar eval`: evaluation sub-verbs (`vimar eval chair CAPTIONS.jsonl --annotations instances.json`)."""

from __future__ import annotations

import argparse
import json
import sys

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_verb", metavar="METRIC", required=True)
    p = sub.add_parser("chair", help="CHAIR_S / CHAIR_I / recall of captions (COCO or tiny world)",
                       description="CHAIR of a captions JSONL file ({\"image_id\": ..., \"caption\": ...} or "
                                   "{\"image\": \"path/000000123.jpg\", \"caption\": ...} per line).")
    p.add_argument("captions", help="captions JSONL file")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--annotations", help="COCO instances JSON (images, annotations, categories)")
    gt.add_argument("--scenes", help="tiny-world ground truth: JSONL of scenes (vimar_jax.data.scenes.save_scenes)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the metrics to this JSON file")


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


def run(args: argparse.Namespace) -> int:
    if args.eval_verb == "chair":
        return run_chair(args)
    raise ValueError(f"unknown eval metric {args.eval_verb!r}")
