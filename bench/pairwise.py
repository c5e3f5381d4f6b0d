"""Does a scorer rank a true sentence above a false one about the same image? Value model vs CLIP.

    python bench/pairwise.py [--models DIR] [--n 100] [--seed 100] [--policy] [--json]

For each scene of the stream `seed` (default 100, the validation scenes), every object's true sentence is
scored against one false sentence of each kind (wrong colour, wrong shape, absent shape, wrong position;
`vimar_jax.data.scenes.false_object`) worded the same way (`minimal_pairs`), by the value model (image +
sentence state) and by CLIP (δ). Prints the fraction of (true, false) pairs each scorer orders correctly
(0.5 = chance), and in a last column, `shape only`, the pairs of every kind whose false sentence names a shape
the scene lacks in a colour the scene has: only reading shapes orders those (colour existence and cell
occupancy do not), and a mentioned shape the scene lacks is what CHAIR_I counts. A value model that guides
search away from hallucination must order them; CLIP's row is what its reward could teach. With `--policy`,
a third row scores each sentence by the policy's own log-likelihood of it as the whole answer to the detail
prompt (teacher-forced): whether the policy, from which the value model starts, reads the image at all.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository: vimar_jax, bench

KINDS = ("color", "shape", "absent", "position")
SHAPE_ONLY = "shape only"


def minimal_pairs(scene, scene_index: int, seed: int, wrong: dict[str, list] | None = None
                  ) -> tuple[list[str], dict[str, list[str]]]:
    """(true sentences, {kind: false sentences}) of one scene: for each object, its true sentence and, per
    kind of error, the sentence of `scenes.false_object` of that object drawn with an equally seeded
    generator, so that each pair has the same template and phrasing and differs in one attribute (colour,
    shape, shape and colour for an absent shape, position). A scorer cannot win on template or length.
    `wrong`: the false objects, when the caller already has them (`false_objects`)."""
    from vimar_jax.data import scenes as S

    wrong = false_objects(scene, scene_index, seed) if wrong is None else wrong
    trues, falses = [], {k: [] for k in KINDS}
    for j, obj in enumerate(scene.objects):
        key = [seed, scene_index, j]
        trues.append(S.object_sentence(obj, np.random.default_rng(key)))
        for k in KINDS:
            falses[k].append(S.object_sentence(wrong[k][j], np.random.default_rng(key)))
    return trues, falses


def false_objects(scene, scene_index: int, seed: int) -> dict[str, list]:
    """{kind: each object of the scene altered by that kind}: the false objects `minimal_pairs` describes."""
    from vimar_jax.data import scenes as S

    return {k: [S.false_object(scene, np.random.default_rng([seed, scene_index, j, n]), k, obj=obj)
                for j, obj in enumerate(scene.objects)] for n, k in enumerate(KINDS)}


def shape_only(scene, wrong: dict[str, list]) -> dict[str, list[bool]]:
    """{kind: per object, whether its false object has a shape the scene lacks in a colour the scene has}."""
    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    return {k: [w.shape not in shapes and w.color in colors for w in ws] for k, ws in wrong.items()}


def pairwise(scorers: dict, n: int, seed: int) -> dict:
    """{scorer: {kind: accuracy, SHAPE_ONLY: accuracy, "pairs": count per kind, "shape_only_pairs": count}}
    over scenes 0..n-1 of `seed` (minimal pairs, one per object and kind; a tie is not a win)."""
    from vimar_jax.data import scenes as S

    wins = {name: {k: [] for k in (*KINDS, SHAPE_ONLY)} for name in scorers}
    for i in range(n):
        scene = S.scene_at(seed, i)
        image = S.render(scene)
        wrong = false_objects(scene, i, seed)
        trues, falses = minimal_pairs(scene, i, seed, wrong)
        only = shape_only(scene, wrong)
        texts = trues + [f for k in KINDS for f in falses[k]]
        m = len(trues)
        for name, scorer in scorers.items():
            s = np.asarray(scorer.score(scorer.begin(image), texts))
            for j, k in enumerate(KINDS):
                won = list(s[:m] > s[m * (j + 1):m * (j + 2)])
                wins[name][k] += won
                wins[name][SHAPE_ONLY] += [w for w, o in zip(won, only[k]) if o]
    return {name: {**{k: float(np.mean(v)) if v else float("nan") for k, v in w.items()},
                   "pairs": len(w[KINDS[0]]), "shape_only_pairs": len(w[SHAPE_ONLY])}
            for name, w in wins.items()}


class PolicyLikelihood:
    """Scores sentences by the policy's summed log-probability of their tokens after the rendered prompt (image
    + `prompt`), all sentences of one image in one teacher-forced forward pass."""

    def __init__(self, vlm, prompt: str):
        from vimar_jax.decode.policy import LlavaPolicy

        self.vlm = vlm
        self.text = LlavaPolicy(vlm).render(prompt)

    def begin(self, image):
        return image

    def score(self, image, sentences) -> np.ndarray:
        import jax

        proc = self.vlm.processor
        head = proc(images=[image], texts=[self.text])
        prompt_ids = np.asarray(head["input_ids"])[0][np.asarray(head["attention_mask"])[0] > 0]
        n_prompt = len(prompt_ids)
        enc = proc(images=[image] * len(sentences), texts=[self.text + s for s in sentences])
        logits = self.vlm.logits(enc["input_ids"], enc["pixel_values"], enc["image_sizes"], enc["attention_mask"])
        logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]) > 0
        out = np.zeros(len(sentences))
        for r in range(len(sentences)):
            pos = np.nonzero(mask[r])[0]            # valid positions, whichever side the padding is on
            if not np.array_equal(ids[r, pos[:n_prompt]], prompt_ids):
                raise ValueError(f"tokenizing the prompt + {sentences[r]!r} changes the prompt's tokens")
            targets = pos[n_prompt:]                # the sentence's tokens, each predicted from the one before
            if targets.size == 0:
                raise ValueError(f"sentence {sentences[r]!r} adds no tokens after the prompt")
            out[r] = logp[r, targets - 1, ids[r, targets]].sum()
        return out


def main(argv=None) -> int:
    from vimar_jax import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(pipeline.TINY_WORLD), help="directory with value/ and clip/ (and policy/ for --policy)")
    p.add_argument("--n", type=int, default=100, help="scenes")
    p.add_argument("--seed", type=int, default=100, help="scene stream (default: validation)")
    p.add_argument("--policy", action="store_true", help="add the policy's own likelihood (needs policy/)")
    p.add_argument("--prompt", default="Describe this image in detail.", help="the policy's prompt (--policy)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    from bench.common import missing_model_dirs

    missing = missing_model_dirs(args.models, ("value", "clip") + (("policy",) if args.policy else ()))
    if missing:
        print(f"bench/pairwise.py: error: {args.models} has no {missing[0]}/config.json", file=sys.stderr)
        return 2
    scorers = {"value": pipeline.load_value_scorer(os.path.join(args.models, "value")),
               "clip": pipeline.load_clip_scorer(os.path.join(args.models, "clip"))}
    if args.policy:
        from vimar_jax.vlm import load_vlm

        scorers["policy"] = PolicyLikelihood(load_vlm(os.path.join(args.models, "policy")), args.prompt)
    out = pairwise(scorers, args.n, args.seed)
    if args.json:
        print(json.dumps({"models": args.models, "seed": args.seed, "n": args.n, "accuracy": out}))
        return 0
    print(f"true above false, {args.n} scenes of seed {args.seed} ({out['value']['pairs']} pairs per kind, "
          f"{out['value']['shape_only_pairs']} of them {SHAPE_ONLY})")
    cols = (*KINDS, SHAPE_ONLY)
    print("| scorer | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, acc in out.items():
        print(f"| {name} | " + " | ".join(f"{acc[k]:.3f}" for k in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
