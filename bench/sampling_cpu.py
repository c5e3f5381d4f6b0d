"""CPU benchmark: one sampling step (temperature -> top-k -> top-p, then a draw) for N·K = 30 rows, ours vs
a sort and vs HF's warpers, same logits.

    python bench/sampling_cpu.py [--rows 30] [--vocab 391,32000] [--repeats 5] [--smoke]

- ours: `vimar_jax.decode.sampling.sample(method="search")` (no sort: the k-th value and the top-p cut by
  bisection over the float32 bit patterns; the default on CPU and TPU);
- sort: `sample(method="sort")`, the textbook way, one stable ascending `argsort` per row serving top-k and
  top-p and a scatter back, the same Gumbel draw (the default on a GPU; what `sample` did before on all);
- HF: `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` (torch.sort) and `torch.multinomial`.

The JAX contenders run `--steps` sampling steps inside one jitted `fori_loop` (as in the decode loop, no
dispatch per step); HF runs them from Python, as `generate` does. Milliseconds per step, median of
`--repeats` rounds taken in turns. The kept sets of ours and the sort are compared on every row (they must
agree: ties are split by token id in both), and the tokens drawn too: one step's tokens on every row with
the same keys, and the loops' token sums.
Vocabulary 391 is the tiny world's, 32,000 Mistral's; top-p 0.9 and the temperatures of the searches.
"""

from __future__ import annotations

import argparse
import functools

from common import Table, fmt, machine_line, median_times, ratio  # noqa: F401  (sets sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vimar_jax.decode.sampling import process_logits, row_keys, sample  # noqa: E402


def looped(method: str, steps: int):
    """`steps` sampling steps of `sample(method=...)` in one jitted loop; each step's logits are shifted by
    the last draw so the steps cannot be hoisted or merged. Returns the sum of the drawn tokens."""
    @jax.jit
    def run(logits, temperature, top_k, top_p):
        def body(i, carry):
            total, shift = carry
            keys = row_keys(jax.random.fold_in(jax.random.key(0), i), jnp.arange(logits.shape[0]))
            tok = sample(logits + shift, keys, temperature, top_k, top_p, method=method)[0]
            return total + tok.sum(), (tok[:1] % 3).astype(jnp.float32) * 1e-3
        return jax.lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.zeros((1,), jnp.float32)))[0]
    return run


def hf_step(torch, warpers, logits, temperature):
    scores = logits / temperature
    for w in warpers:
        scores = w(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--vocab", default="391,32000", help="comma-separated vocabulary sizes")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per timed call")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.rows, a.vocab, a.steps, a.repeats = 4, "64", 3, 1
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    print(machine_line())
    table = Table(f"One sampling step, {a.rows} rows, top-p {a.top_p}, temperatures 0.1-0.9 (ms per step)",
                  ("figure", "ours", "sort", "ours vs sort", "HF", "ours vs HF", "note"))
    methods = ("search", "sort")                                      # ours, the alternative
    runs = {m: looped(m, a.steps) for m in methods}
    process = {m: jax.jit(functools.partial(process_logits, method=m)) for m in methods}
    one_step = {m: jax.jit(functools.partial(sample, method=m)) for m in methods}
    for vocab in (int(v) for v in a.vocab.split(",")):
        r = np.random.default_rng(vocab)
        logits = (r.standard_normal((a.rows, vocab)) * 3).astype(np.float32)
        logits[::2] = np.round(logits[::2] * 2) / 2          # ties in every other row
        temperature = np.resize(np.array([0.1, 0.3, 0.5, 0.7, 0.9], np.float32), a.rows)
        top_k = np.zeros(a.rows, np.int32)
        top_p = np.full(a.rows, a.top_p, np.float32)
        args = tuple(jnp.asarray(x) for x in (logits, temperature, top_k, top_p))
        kept, kept_sort = (np.isfinite(np.asarray(process[m](*args))) for m in methods)
        same_sets = int((kept == kept_sort).all(-1).sum())
        keys = row_keys(jax.random.key(1), jnp.arange(a.rows))
        drawn = [np.asarray(one_step[m](args[0], keys, *args[1:])[0]) for m in methods]
        same_draws = bool((drawn[0] == drawn[1]).all()) and bool(runs["search"](*args) == runs["sort"](*args))
        t_logits = torch.tensor(logits)
        t_temp = torch.tensor(temperature)[:, None]
        warpers = [TopPLogitsWarper(a.top_p)]
        hf = lambda: [hf_step(torch, warpers, t_logits, t_temp) for _ in range(a.steps)]  # noqa: E731
        t_ours, t_sort, t_hf = median_times([lambda: runs["search"](*args), lambda: runs["sort"](*args), hf],
                                            repeats=a.repeats)
        ms = lambda t: 1000 * t / a.steps  # noqa: E731
        table.add(f"vocab {vocab:,}", fmt(ms(t_ours), 3), fmt(ms(t_sort), 3), ratio(t_sort, t_ours),
                  fmt(ms(t_hf), 3), ratio(t_hf, t_ours),
                  f"kept sets equal {same_sets}/{a.rows}; draws equal: {'yes' if same_draws else 'no'}; "
                  f"mean kept {kept.sum(-1).mean():.0f}")
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
