"""Generate the value model's training data: policy rollouts, sentence splits and CLIP δ (SPEC §2, §3).

    python train/gen_rollouts.py --policy DIR --clip DIR --source SPEC --out DIR [--shards N] [--tau 0.16|p17]

For every (image, prompt) pair of the source (`folder:PATH`, `jsonl:PATH`, `coco:DIR[:SPLIT[:N]]`,
`tiny:SEED:N`; see `vimar_jax.data.sources`):

1. one batched `generate` call samples all trajectories from **one prefill of the prompt**: greedy plus
   T in {0.2, 0.4, 0.6, 0.8} with top-p 0.9 by default (`--temperatures`, 0 = greedy, `--top-p`);
2. each trajectory is split into sentences at the sampler's sentence boundaries (SPEC §2 segmentation;
   a sentence left open at the token budget is dropped);
3. δ = cos(CLIP image, CLIP sentence) for every sentence, the image embedded once and all sentences of the
   image in one text batch;
4. the ground-truth caption, when the source has one (`--ground-truth auto`), is one more trajectory
   (temperature -1, `gt`), whose sentences later get the constant reward 0.27;
5. `--counterfactuals K` (ours, default 0) adds K counterfactual trajectories per trajectory (sampled or
   ground truth): a sentence of it with one colour, shape or position phrase replaced
   (`scenes.counterfactual_sentence`, the tiny world's lexicon), followed by the trajectory's remaining
   sentences, all scored by the CLIP like any rollout.
   Such a pair of states differs in one grounded word and has the same future, so the TD targets of the two
   differ by exactly the reward difference the CLIP sees. Their δ count in the rewards but not in τ's
   percentile or the δ statistics (which describe the policy's own sentences).

Records (`vimar_jax.data.transitions`) store δ, not the reward: **rewards are computed at training time from δ
and τ** — τ given as a percentile (`--tau p17`) is resolved over the δ of all rollouts (ground truth
excluded) once every shard is written, and stored in `manifest.json` with δ statistics and counts.

Resumable: items are split into `--shards` contiguous shards; a finished shard (records + index file) is
skipped on a rerun, an unfinished one is rewritten from scratch (its records go to a temporary file that is
renamed only when the shard completes). `--worker K/N` lets N processes (hosts) share the shards; whichever
sees all shards finished writes the manifest. A missing or corrupt image is reported by name, skipped and
counted. Progress (tqdm) and a throughput line (images/s, sentences/s, tokens/s) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from vimar_jax import reward as reward_lib
from vimar_jax.data import sources as src_lib
from vimar_jax.data import transitions as tr

SETTINGS = "settings.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policy", required=True, help="policy checkpoint directory (HF LLaVA-NeXT or vimar convert)")
    p.add_argument("--clip", required=True, help="CLIP reward model directory")
    p.add_argument("--source", required=True, help="folder:PATH | jsonl:PATH | coco:DIR[:SPLIT[:N]] | tiny:SEED:N")
    p.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    p.add_argument("--shards", type=int, default=1, help="number of array_record shards")
    p.add_argument("--worker", default="0/1", help="K/N: this process handles the shards k with k %% N == K")
    p.add_argument("--prompt", default=None,
                   help="a prompt, or a prompt set (llava_detail, tiny_detail); default: the source's")
    p.add_argument("--image-root", default=None, help="jsonl source: directory of relative image paths")
    p.add_argument("--temperatures", default="0,0.2,0.4,0.6,0.8",
                   help="one trajectory per entry, 0 = greedy (comma-separated)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--ground-truth", choices=("auto", "off"), default="auto",
                   help="add the source's reference caption as a trajectory (auto: when it has one)")
    p.add_argument("--tau", default=str(reward_lib.DEFAULT_TAU), help="margin: a float, or a percentile like p17")
    p.add_argument("--alpha", type=float, default=reward_lib.DEFAULT_ALPHA)
    p.add_argument("--reward-variant", default="margin", choices=reward_lib.REWARD_VARIANTS)
    p.add_argument("--gt-reward", type=float, default=reward_lib.GROUND_TRUTH_REWARD)
    p.add_argument("--counterfactuals", type=int, default=0,
                   help="counterfactual trajectories per trajectory, ground truth included (one colour, shape or "
                        "position replaced; CLIP-scored; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    if args.shards < 1:
        p.error("--shards must be >= 1")
    if args.counterfactuals < 0:
        p.error("--counterfactuals must be >= 0")
    try:
        k, n = (int(x) for x in args.worker.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        p.error(f"--worker {args.worker!r}: expected K/N with 0 <= K < N")
    args.worker_index, args.worker_count = k, n
    try:
        args.temperature_list = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        p.error(f"--temperatures {args.temperatures!r}: expected comma-separated numbers")
    if not args.temperature_list or any(t < 0 for t in args.temperature_list):
        p.error("--temperatures needs at least one temperature >= 0")
    try:
        reward_lib.resolve_tau(args.tau, [0.0])   # a float, or a percentile in [0, 100]
    except (TypeError, ValueError) as e:
        p.error(f"--tau: {e}")
    return args


def settings_of(args) -> dict:
    """What determines the records (stored in OUT/settings.json and checked on a rerun)."""
    return {"policy": os.path.abspath(args.policy), "clip": os.path.abspath(args.clip), "source": args.source,
            "shards": args.shards, "prompt": args.prompt, "image_root": args.image_root,
            "temperatures": args.temperature_list, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "ground_truth": args.ground_truth, "seed": args.seed,
            "dtype": args.dtype, "counterfactuals": args.counterfactuals,
            "reward": {"tau": args.tau, "alpha": args.alpha, "variant": args.reward_variant,
                       "ground_truth_reward": args.gt_reward}}


def check_settings(out: str, settings: dict) -> None:
    path = os.path.join(out, SETTINGS)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise SystemExit(f"error: {out} holds rollouts made with different settings ({detail}); use a new --out")
    else:
        tr._atomic_json(path, settings)


# ------------------------------------------------------------------------------------------- one image

class Roller:
    """Policy + CLIP: all trajectories of one (image, prompt) pair with their sentences and δ."""

    def __init__(self, args):
        import jax.numpy as jnp

        from vimar_jax.clip import load_clip
        from vimar_jax.decode.generate import decoding
        from vimar_jax.vlm import load_vlm

        self.args = args
        self.vlm = load_vlm(args.policy, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
        self.clip = load_clip(args.clip)
        self.processor = self.vlm.processor
        self.tok = self.processor.tokenizer
        self.table = decoding(self.vlm).table
        self.temperatures = list(args.temperature_list)
        self._prompts: dict[str, str] = {}

    def _prompt_text(self, prompt: str) -> str:
        hit = self._prompts.get(prompt)
        if hit is None:
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            hit = self._prompts[prompt] = self.processor.apply_chat_template([user], add_generation_prompt=True)
        return hit

    def sentences(self, ids: Sequence[int], spans) -> tuple[list[str], list[list[int]]]:
        """Non-empty sentence texts of token spans, with their spans."""
        texts, kept = [], []
        for a, b in spans:
            t = self.tok.decode(ids[a:b]).strip()
            if t:
                texts.append(t)
                kept.append([int(a), int(b)])
        return texts, kept

    def counterfactuals(self, trajs: list, seed: int) -> list:
        """`args.counterfactuals` counterfactual trajectories per trajectory of `trajs`, the ground truth's
        included (see the module docstring, step 5), numbered after the others; a trajectory without a
        replaceable word gives none. They are not ground truth: every sentence of one gets its CLIP reward."""
        from vimar_jax.data import scenes

        K = self.args.counterfactuals
        if K <= 0:
            return []
        rng = np.random.default_rng([int(seed), 7])
        out, number = [], max((t[0] for t in trajs), default=-1) + 1
        for traj, temp, is_gt, texts, spans in trajs:
            for _ in range(K):
                order = rng.permutation(len(texts))
                for i in order:
                    swapped = scenes.counterfactual_sentence(texts[i], rng)
                    if swapped is not None:
                        out.append((number, temp, False, [swapped[0], *texts[i + 1:]], spans[i:]))
                        number += 1
                        break
        return out

    def __call__(self, item: src_lib.Item, image, seed: int) -> tuple[list[dict], dict]:
        """(records, counts) of one item."""
        from vimar_jax import text as text_lib
        from vimar_jax.decode.generate import generate
        from vimar_jax.decode.sampler import Finish

        a = self.args
        text = self._prompt_text(item.prompt)
        bos = self.tok.bos_token
        enc = self.processor(images=[image], texts=[text], add_special_tokens=not (bos and text.startswith(bos)))
        C = len(self.temperatures)
        gen = generate(self.vlm, enc["input_ids"], enc["pixel_values"], enc["image_sizes"], enc["attention_mask"],
                       max_new_tokens=a.max_new_tokens, temperature=self.temperatures, top_p=a.top_p, top_k=a.top_k,
                       num_candidates=C, seed=seed)
        trajs = []   # (traj, temperature, gt, sentences, spans)
        tokens = int(gen.lengths.sum())
        budget = 0
        for r in range(C):
            ids = gen.tokens[r, :gen.lengths[r]].tolist()
            texts, spans = self.sentences(ids, gen.sentence_spans(r))
            budget += int(int(gen.reason[r]) in (Finish.BUDGET, Finish.CACHE_FULL))
            if texts:
                trajs.append((r, self.temperatures[r], False, texts, spans))
        gt = item.ground_truth() if a.ground_truth == "auto" else None
        if gt:
            ids = self.tok.encode(gt, add_special_tokens=False)
            texts, spans = self.sentences(ids, text_lib.token_sentence_spans(ids, self.table))
            if texts:
                trajs.append((C, -1.0, True, texts, spans))
        counterfactual = self.counterfactuals(trajs, seed)
        scored = trajs + counterfactual
        img_embed = self.clip.embed_images([image])[0]
        all_sentences = [s for t in scored for s in t[3]]
        deltas = reward_lib.sentence_deltas(self.clip, img_embed, all_sentences)
        hw = [int(enc["image_sizes"][0][0]), int(enc["image_sizes"][0][1])]
        records, k = [], 0
        for traj, temp, is_gt, texts, spans in scored:
            records += tr.trajectory_records(image=item.ref, image_hw=hw, prompt=item.prompt, group=str(item.index),
                                             traj=traj, temperature=temp, gt=is_gt, sentences=texts, spans=spans,
                                             deltas=deltas[k:k + len(texts)])
            k += len(texts)
        counts = {"trajectories": len(scored), "counterfactual": [t[0] for t in counterfactual],
                  "empty_trajectories": C - sum(1 for t in trajs if not t[2]),
                  "budget_stops": budget, "tokens": tokens, "sentences": len(records)}
        return records, counts


# ---------------------------------------------------------------------------------------------- shards

def shard_ranges(n_items: int, n_shards: int) -> list[range]:
    bounds = np.linspace(0, n_items, n_shards + 1).round().astype(int)
    return [range(int(bounds[i]), int(bounds[i + 1])) for i in range(n_shards)]


def run_shard(roller: Roller, source: src_lib.Source, out: str, shard: int, n_shards: int, items: range,
              progress, totals: dict) -> dict:
    """Generate one shard; returns its index (also written next to it)."""
    writer = tr.ShardWriter(out, shard, n_shards)
    index = {"shard": shard, "items": [items.start, items.stop], "groups": [], "skipped": [], "deltas": [],
             "counts": {"images": 0, "skipped_images": 0, "trajectories": 0, "empty_trajectories": 0,
                        "budget_stops": 0, "tokens": 0, "sentences": 0, "gt_sentences": 0,
                        "counterfactual_trajectories": 0, "counterfactual_sentences": 0}}
    t0 = time.perf_counter()
    try:
        for i in items:
            item = source.items[i]
            try:
                image = item.load()
            except src_lib.ImageError as e:
                print(f"warning: skipping image {item.name}: {e}", file=sys.stderr, flush=True)
                index["skipped"].append({"name": item.name, "reason": str(e)})
                index["counts"]["skipped_images"] += 1
                progress.update(1)
                continue
            seed = (roller.args.seed * 1_000_003 + item.index) % (2**31 - 1)
            records, counts = roller(item, image, seed)
            start = writer.count
            trajs: dict[int, dict] = {}
            cf = set(counts["counterfactual"])
            for rec in records:
                writer.write(rec)
                t = trajs.setdefault(rec["traj"], {"traj": rec["traj"], "temperature": rec["temperature"],
                                                   "gt": rec["gt"], "sentences": 0})
                t["sentences"] += 1
                if rec["traj"] in cf:
                    t["counterfactual"] = True
                    index["counts"]["counterfactual_sentences"] += 1
                elif rec["gt"]:
                    index["counts"]["gt_sentences"] += 1
                else:
                    index["deltas"].append(round(rec["delta"], 7))
            index["groups"].append({"group": str(item.index), "name": item.name, "image": item.ref,
                                    "prompt": item.prompt, "first_record": start, "num_records": len(records),
                                    "trajectories": list(trajs.values())})
            c = index["counts"]
            c["images"] += 1
            c["counterfactual_trajectories"] += len(cf)
            for k in ("trajectories", "empty_trajectories", "budget_stops", "tokens", "sentences"):
                c[k] += counts[k]
            totals["images"] += 1
            totals["sentences"] += counts["sentences"]
            totals["tokens"] += counts["tokens"]
            progress.update(1)
            dt = max(time.perf_counter() - totals["t0"], 1e-9)
            progress.set_postfix_str(f"{totals['images'] / dt:.2f} img/s {totals['sentences'] / dt:.1f} sent/s "
                                     f"{totals['tokens'] / dt:.0f} tok/s", refresh=False)
    except BaseException:
        writer.abort()
        raise
    index["seconds"] = time.perf_counter() - t0
    writer.commit(index)
    return index


def finalize(out: str, n_shards: int, settings: dict, source: src_lib.Source) -> dict | None:
    """Write manifest.json once every shard is finished (None while some are not)."""
    if not all(tr.shard_done(out, k, n_shards) for k in range(n_shards)):
        return None
    indexes = [tr.read_shard_index(os.path.join(out, tr.shard_name(k, n_shards))) for k in range(n_shards)]
    deltas = np.asarray([d for ix in indexes for d in ix["deltas"]], np.float64)
    counts: dict = {}
    for ix in indexes:
        for k, v in ix["counts"].items():
            counts[k] = counts.get(k, 0) + v
    counts["groups"] = sum(len(ix["groups"]) for ix in indexes)
    counts["records"] = sum(ix["num_records"] for ix in indexes)
    r = settings["reward"]
    if deltas.size == 0 and isinstance(r["tau"], str) and r["tau"].strip().startswith("p"):
        raise SystemExit(f"error: τ={r['tau']} is a percentile of δ but the rollouts hold no sentences")
    tau = reward_lib.resolve_tau(r["tau"], deltas if deltas.size else None)
    manifest = {
        "format": "vimar-transitions/1",
        "source": source.describe(),
        "settings": settings,
        "shards": [tr.shard_name(k, n_shards) for k in range(n_shards)],
        "counts": counts,
        "skipped": [s for ix in indexes for s in ix["skipped"]],
        "delta_stats": tr.delta_stats(deltas),
        "reward": {"tau": tau, "tau_spec": r["tau"], "alpha": r["alpha"], "variant": r["variant"],
                   "ground_truth_reward": r["ground_truth_reward"]},
        "seconds": sum(ix.get("seconds", 0.0) for ix in indexes),
    }
    tr.write_manifest(out, manifest)
    return manifest


def refuse_written(out: str) -> None:
    """FileExistsError when `out` already holds a finished transitions directory (a manifest)."""
    if os.path.exists(os.path.join(out, tr.MANIFEST)):
        raise FileExistsError(f"{out} already holds transitions ({tr.MANIFEST}): choose another --out")


def write_terminal_states(out: str, source: src_lib.Source, states, settings: dict, counts: dict) -> dict:
    """Write `states`, an iterable of (item, image_hw, group, text, δ), each as a one-sentence terminal trajectory
    (τ = 0 rewards: the TD target of such a state is its δ), into one shard of `out` and its manifest, whose
    settings are `settings` beside the reward's; returns the manifest. `out` must not hold a manifest; a failure
    aborts the shard. `counts`: the shard's counts beside "sentences" (the number of states)."""
    refuse_written(out)
    os.makedirs(out, exist_ok=True)
    writer = tr.ShardWriter(out, 0, 1)
    deltas: list[float] = []
    try:
        for item, hw, group, text, delta in states:
            for rec in tr.trajectory_records(image=item.ref, image_hw=hw, prompt=item.prompt, group=group,
                                             traj=len(deltas), temperature=0.0, gt=False, sentences=[text],
                                             spans=[[0, 1]], deltas=[float(delta)]):
                writer.write(rec)
            deltas.append(float(delta))
    except BaseException:
        writer.abort()
        raise
    writer.commit({"shard": 0, "items": [0, len(source.items)], "groups": [], "skipped": [], "deltas": deltas,
                   "counts": {**counts, "sentences": len(deltas)}})
    reward = {"tau": 0.0, "alpha": 1.0, "variant": "margin", "ground_truth_reward": 1.0}
    return finalize(out, 1, {"reward": reward, **settings}, source)


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    settings = settings_of(args)
    check_settings(out, settings)
    source = src_lib.parse_source(args.source, prompts=args.prompt, seed=args.seed, image_root=args.image_root)
    ranges = shard_ranges(len(source.items), args.shards)
    mine = [k for k in range(args.shards) if k % args.worker_count == args.worker_index]
    todo = [k for k in mine if not tr.shard_done(out, k, args.shards)]
    skipped_shards = len(mine) - len(todo)
    if skipped_shards:
        print(f"[gen_rollouts] {skipped_shards} finished shard(s) skipped", file=sys.stderr, flush=True)
    totals = {"images": 0, "sentences": 0, "tokens": 0, "t0": time.perf_counter()}
    if todo:
        roller = Roller(args)
        n_items = sum(len(ranges[k]) for k in todo)
        disable = {"on": False, "off": True}.get(args.progress, None)
        with tqdm(total=n_items, desc="rollouts", unit="img", file=sys.stderr, disable=disable) as progress:
            totals["t0"] = time.perf_counter()
            for k in todo:
                run_shard(roller, source, out, k, args.shards, ranges[k], progress, totals)
        dt = max(time.perf_counter() - totals["t0"], 1e-9)
        print(f"[gen_rollouts] throughput: {totals['images'] / dt:.3f} images/s, {totals['sentences'] / dt:.2f} "
              f"sentences/s, {totals['tokens'] / dt:.1f} tokens/s ({totals['images']} images in {dt:.1f} s)",
              file=sys.stderr, flush=True)
    manifest = finalize(out, args.shards, settings, source)
    if manifest is None:
        print("[gen_rollouts] shards of other workers are unfinished; manifest not written yet", file=sys.stderr)
        return 0
    c = manifest["counts"]
    summary = {"out": out, "images": c["images"], "skipped_images": c["skipped_images"],
               "skipped": [s["name"] for s in manifest["skipped"]], "trajectories": c["trajectories"],
               "transitions": c["records"], "tau": manifest["reward"]["tau"],
               "delta_mean": manifest["delta_stats"].get("mean")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
