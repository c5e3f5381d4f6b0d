"""Do the policy's image tokens tell an object's shape? Ridge probes of the features of each object's cell.

    python bench/cell_probe.py [--policy DIR] [--train 1500] [--val 300] [--json]

Every tiny-world object sits within 5% of the centre of its cell of the 3×3 grid, and LLaVA-NeXT's base tile
(the whole image resized to the tower's input size, 48 px for the tiny towers, patch 16) gives each cell one
patch. For every object of `--train` training scenes (seed 2) and `--val` validation scenes (seed 100) this
takes that patch's features (the vision tower at the policy's feature layer, and the same after the
projector: what the decoder reads), fits a ridge regression on one-hot targets over the training objects, and
prints the validation accuracy of naming the object's shape (chance 1/8) and its colour (chance 1/7).

What the probe says: whether a value model that starts from this policy could in principle read shapes from
its image tokens (`bench/pairwise.py` says whether it does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository: vimar_jax, bench

TARGETS = ("shape", "color")
LAYERS = ("vision", "projected")


def cell_features(vlm, seed: int, n: int) -> dict[str, np.ndarray]:
    """{"vision": [O, D], "projected": [O, E], "shape": [O], "color": [O]} over the objects of scenes 0..n-1
    of `seed` (class indices into `scenes.SHAPES` / `scenes.COLORS`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vimar_jax.data import scenes as S

    cfg = vlm.config
    graphdef, state = nnx.split(vlm.module)

    @jax.jit
    def features(state, base):
        module = nnx.merge(graphdef, state)
        h = module.vision.hidden_states(base, cfg.vision_feature_layer)        # [1, 1 + 9, D] (CLS first)
        return h, module.projector(h)

    grid = cfg.vision.image_size // cfg.vision.patch_size
    if grid != 3:
        raise ValueError(f"the probe needs one patch per cell of the 3×3 grid: this tower's base tile is "
                         f"{grid}×{grid} patches ({cfg.vision.image_size} px, patch {cfg.vision.patch_size})")
    shapes, colors = list(S.SHAPES), list(S.COLORS)
    out = {k: [] for k in (*LAYERS, *TARGETS)}
    for i in range(n):
        scene = S.scene_at(seed, i)
        inputs = vlm.processor(images=[S.render(scene)], texts=[vlm.processor.image_token])
        base = jnp.asarray(np.asarray(inputs["pixel_values"])[0, :1])        # [1, C, S, S]: the base tile
        h, p = features(state, base)
        for o in scene.objects:
            r, c = o.cell
            out["vision"].append(np.asarray(h[0, 1 + r * grid + c]))
            out["projected"].append(np.asarray(p[0, 1 + r * grid + c]))
            out["shape"].append(shapes.index(o.shape))
            out["color"].append(colors.index(o.color))
    return {k: np.asarray(v) for k, v in out.items()}


def ridge_accuracy(x_train, y_train, x_val, y_val, classes: int, lam: float = 1.0) -> tuple[float, float]:
    """(train, validation) accuracy of a ridge regression on one-hot targets (features standardized on the
    training set, a bias column, penalty `lam`), predicting the arg-max class."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_val - mu) / sd, np.ones(len(x_val))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_train])
    return float(((a @ w).argmax(1) == y_train).mean()), float(((b @ w).argmax(1) == y_val).mean())


def probe(vlm, n_train: int, n_val: int) -> dict:
    """{layer: {target: validation accuracy}} plus the object counts."""
    from vimar_jax.data import scenes as S

    train, val = cell_features(vlm, 2, n_train), cell_features(vlm, 100, n_val)
    classes = {"shape": len(S.SHAPES), "color": len(S.COLORS)}
    out = {layer: {t: ridge_accuracy(train[layer], train[t], val[layer], val[t], classes[t])[1] for t in TARGETS}
           for layer in LAYERS}
    return {**out, "objects": {"train": len(train["shape"]), "val": len(val["shape"])}}


def main(argv=None) -> int:
    from vimar_jax import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=str(pipeline.TINY_WORLD / "policy"), help="policy directory (HF format)")
    p.add_argument("--train", type=int, default=1500, help="training scenes (seed 2)")
    p.add_argument("--val", type=int, default=300, help="validation scenes (seed 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1:
        p.error(f"--train and --val must be >= 1, got {args.train} and {args.val}")
    if not os.path.isfile(os.path.join(args.policy, "config.json")):
        print(f"bench/cell_probe.py: error: {args.policy} has no config.json", file=sys.stderr)
        return 2
    from vimar_jax.vlm import load_vlm

    out = probe(load_vlm(args.policy), args.train, args.val)
    if args.json:
        print(json.dumps({"policy": args.policy, **out}))
        return 0
    print(f"ridge probes of each object's cell, {out['objects']['train']} training and {out['objects']['val']} "
          f"validation objects; validation accuracy (chance: shape 0.125, colour 0.143)")
    print("| features | shape | colour |\n|---|---:|---:|")
    for layer in LAYERS:
        print(f"| {layer} | {out[layer]['shape']:.3f} | {out[layer]['color']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
