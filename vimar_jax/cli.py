"""The `vimar` command: one argparse subcommand per verb.

Each verb is a module with `add_arguments(parser)` and `run(args) -> int`, registered with a one-line help
in `VERBS`. Verb modules keep heavy imports (jax, models) inside `run`, so `vimar --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("vimar_jax.convert.cli", "convert a Hugging Face checkpoint to vimar's layout (or back)"),
    "caption": ("vimar_jax.caption_cli", "caption images with greedy, best-of-N, step search or ViMaR"),
    "eval": ("vimar_jax.eval.cli", "evaluation: CHAIR of caption files; tiny-world runs of every search (--n N)"),
    "demo": ("vimar_jax.demo", "caption a few tiny-world scenes with greedy, VisVM and ViMaR: values, CHAIR, HTML"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vimar", description="ViMaR in JAX: value-guided captioning tools.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
