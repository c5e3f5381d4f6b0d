"""`vimar caption IMAGE... --method {greedy,bon,clip-search,visvm,vimar}`: caption images with one search.

Without --policy/--value/--clip the shipped tiny-world models are used (`vimar_jax.pipeline`). `--json` prints
one JSON object per captioned image on stdout (`image`, `method`, `caption`, `sentences` [{text, value,
refined}], `seconds`); otherwise one `IMAGE: caption` line each. `--html REPORT` writes a self-contained
report (`vimar_jax.report`). An image that cannot be read is reported on stderr by name and the others are
still captioned; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from vimar_jax.decode.config import CAPTION_SCORES, METHODS, STAGE2_MODES, SearchConfig

DEFAULT_PROMPT = "Describe this image in detail."


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags shared by `vimar caption`, `vimar eval` and `vimar demo`."""
    p.add_argument("--policy", help="policy checkpoint dir (HF or converted); default: the shipped tiny policy")
    p.add_argument("--value", help="value model dir; default: the shipped tiny value model")
    p.add_argument("--clip", help="CLIP dir; default: the shipped tiny CLIP")
    p.add_argument("--prompt", default=None, help=f"detail prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_search_arguments(p: argparse.ArgumentParser, *, seed_flag: str = "--seed") -> None:
    """The search flags shared by `vimar caption`, `vimar eval` and `vimar demo` (defaults: `SearchConfig`'s).
    The sampling seed is `seed_flag` (`--search-seed` where `--seed` names the scene stream); it is stored as
    `args.search_seed`."""
    g = p.add_argument_group("search")
    g.add_argument("--temperatures", default=None, help="comma-separated, e.g. 0.1,0.3,0.5,0.7,0.9 (N)")
    g.add_argument("--samples-per-temperature", "-k", type=int, default=None, help="K samples per temperature")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--theta", type=float, default=None, help="weak-sentence threshold (default: stored stats)")
    g.add_argument("--theta-percentile", type=float, default=None,
                   help="θ = this percentile of the value model's stored sentence values (default: theirs, P30)")
    g.add_argument("--max-refine", type=int, default=None, help="weak sentences Stage 2 re-samples, at most")
    g.add_argument("--max-append", type=int, default=None, help="sentences Stage 2 appends, at most (0: none)")
    g.add_argument("--drop-below", type=float, default=None,
                   help="drop a weak sentence no candidate beats when its value is below this")
    g.add_argument("--stage2", choices=STAGE2_MODES, default=None)
    g.add_argument("--caption-score", choices=CAPTION_SCORES, default=None)
    g.add_argument("--bon-scorer", choices=("clip", "value"), default=None, help="best-of-N scorer of 'bon'")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--sentence-max-tokens", type=int, default=None, help="budget of one candidate sentence")
    g.add_argument("--max-sentences", type=int, default=None, help="cap of step search")
    g.add_argument(seed_flag, dest="search_seed", type=int, default=0, help="sampling seed of the searches")
    g.add_argument("--compact-decode", action="store_true",
                   help="shrink candidate batches as their rows stop: faster steps on a CPU, longer compiles "
                        "(for runs over many images)")


def search_config(args) -> SearchConfig:
    """`SearchConfig` from the search flags (unset flags keep the defaults)."""
    kw = {"seed": args.search_seed, "compact_decode": bool(getattr(args, "compact_decode", False))}
    if args.temperatures:
        try:
            kw["temperatures"] = tuple(float(t) for t in args.temperatures.split(",") if t.strip())
        except ValueError:
            raise ValueError(f"--temperatures {args.temperatures!r}: expected comma-separated numbers") from None
    for name in ("samples_per_temperature", "top_p", "theta", "theta_percentile", "max_refine", "max_append",
                 "drop_below", "stage2", "caption_score", "bon_scorer", "max_new_tokens", "sentence_max_tokens",
                 "max_sentences"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return SearchConfig(**kw)


def build_engine_for(args, methods, *, require_theta: bool = False):
    """The search engine of the model and search flags, loading only the models `methods` need (the shipped
    tiny models where no directory is given). With `require_theta`, running ViMaR Stage 2 without a θ (flag
    or stored value statistics) is an error."""
    from vimar_jax import pipeline
    from vimar_jax.eval.tiny_eval import needs

    cfg = search_config(args)
    need_value, need_clip = needs(methods, cfg.bon_scorer)
    return pipeline.build_engine(policy=args.policy, value=args.value if need_value else False,
                                 clip=args.clip if need_clip else False, config=cfg, dtype=args.dtype,
                                 require_theta=require_theta and "vimar" in methods and cfg.stage2 != "off")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--method", choices=METHODS, default="vimar")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--html", metavar="REPORT", help="write an HTML report here")
    add_model_arguments(p)
    add_search_arguments(p)


def _read_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def run(args) -> int:
    from tqdm import tqdm

    try:
        engine = build_engine_for(args, [args.method], require_theta=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = args.prompt or DEFAULT_PROMPT
    rows, failures = [], []
    for path in tqdm(args.images, desc=f"caption ({args.method})", unit="img", file=sys.stderr, disable=None):
        try:
            image = _read_image(path)
        except Exception as e:  # noqa: BLE001 - any unreadable image is reported, the others go on
            failures.append(path)
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            rows.append({"image": None, "image_name": path, "method": args.method, "error": f"cannot read image: {e}"})
            continue
        res = engine.run(image, prompt, args.method)
        full = res.to_json()
        if args.json:
            out = {"image": path, "method": res.method, "caption": res.caption,
                   "sentences": [{k: s[k] for k in ("text", "value", "refined")} for s in full["sentences"]],
                   "seconds": res.seconds}
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            print(f"{path}: {res.caption}", flush=True)
        rows.append({**full, "image": image, "image_name": path})
    if args.html:
        from vimar_jax.report import render

        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render(rows, title=f"vimar caption --method {args.method}", theta=engine.theta))
        print(f"wrote {args.html}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(args.images)} images could not be read: {', '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["add_arguments", "add_model_arguments", "add_search_arguments", "build_engine_for", "run", "search_config",
           "DEFAULT_PROMPT"]
