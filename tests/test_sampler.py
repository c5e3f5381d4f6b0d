"""The jitted sampler driving the real Decoder: greedy parity with HF generate, shared-prefix decoding,
per-row stopping (EOS, budget, sentence ends, full cache), resuming, and compile counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import MistralConfig, MistralForCausalLM

from vimar_jax.convert import spec
from vimar_jax import text
from vimar_jax.decode.sampler import (Finish, SentenceRule, Settings, compaction_sizes, count_compiles,
                                      decoder_sampler)
from vimar_jax.models.decoder import Decoder, DecoderConfig, KVCache, decoder_rules

VOCAB = 61
PROMPTS = [[5, 17, 3, 44, 9], [8, 1, 30, 22, 60, 7, 7, 12, 2], [40, 11, 26]]
BUCKET = 10     # prompts right-padded to this length
N = 12          # buffer_size: generated tokens per row


@functools.cache
def world():
    """(HF model, our decoder, config, HF greedy continuations of PROMPTS [3, N])."""
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    cfg = DecoderConfig.from_hf(hf.config.to_dict())
    ours = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))   # abstract: the weights come from HF
    spec.from_torch_state_dict(ours, decoder_rules(cfg), hf.state_dict())
    greedy, scores = [], []
    for ids in PROMPTS:
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        greedy.append(out.sequences[0, len(ids):].numpy())
        scores.append(torch.log_softmax(torch.stack(out.logits)[:, 0], -1).numpy())
    return hf, ours, cfg, np.stack(greedy), np.stack(scores)


def boundary_table():
    """A sentence-end rule read off the greedy outputs so that it fires: 'tok ends a sentence unless prev
    blocks it' (like '.' after a digit), with a table lookup as `vimar_jax.text` does."""
    g = world()[3]
    ends = np.zeros(VOCAB, bool)
    ends[[g[0, 2], g[1, 4], g[2, 1]]] = True
    blocked = np.zeros(VOCAB, bool)
    blocked[g[1, 3]] = True     # row 1's end token at index 4 follows it: no end there
    return ends, blocked


def boundary_np(prev, tok):
    ends, blocked = boundary_table()
    return ends[tok] & ~blocked[prev]


@functools.cache
def sampler():
    ends, blocked = (jnp.asarray(a) for a in boundary_table())
    return decoder_sampler(world()[1], boundary_fn=lambda prev, tok: ends[tok] & ~blocked[prev], max_sentences=4)


def padded(prompts):
    tokens = np.zeros((len(prompts), BUCKET), np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, :len(ids)] = ids
    return tokens, np.array([len(p) for p in prompts], np.int32)


def run_per_row(settings, *, prompts=PROMPTS, cache_len=BUCKET + N, buffer_size=N, smp=None, seed=0):
    """Right-padded prompts prefilled into one per-row cache, then decoded from it."""
    smp, params = smp or sampler()
    cfg = world()[2]
    tokens, lengths = padded(prompts)
    start, cache = smp.prefill(params, tokens, lengths, KVCache.init(cfg, len(prompts), cache_len))
    return smp.decode(params, start, cache, settings, jax.random.key(seed), buffer_size=buffer_size)


def run_shared(prompt, settings, batch, *, seed=0):
    """One prompt prefilled once (batch 1), decoded by `batch` rows attending to it as a shared prefix."""
    smp, params = sampler()
    cfg = world()[2]
    tokens, lengths = padded([prompt])
    start, prefix = smp.prefill(params, tokens, lengths, KVCache.init(cfg, 1, BUCKET))
    return smp.decode(params, start.broadcast(batch), KVCache.init(cfg, batch, N), settings,
                      jax.random.key(seed), buffer_size=N, prefix=prefix)


def expected_stop(g, prev0, *, eos=(), budget=N, stop_after=0):
    """(length, reason) of one greedy row `g` under the stopping rules, computed directly."""
    n_sent, prev = 0, prev0
    for i, tok in enumerate(g[:budget]):
        if tok in eos:
            return i + 1, Finish.EOS
        if boundary_np(prev, tok):
            n_sent += 1
            if stop_after and n_sent >= stop_after:
                return i + 1, Finish.SENTENCE
        prev = tok
    return budget, Finish.BUDGET


def test_greedy_equals_hf_generate():
    greedy, hf_logp = world()[3], world()[4]
    assert len({tuple(g) for g in greedy}) == 3 and all(len(set(g)) > 3 for g in greedy)  # non-trivial rows
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=N))
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)
    np.testing.assert_array_equal(np.asarray(out.lengths), [N] * 3)
    np.testing.assert_array_equal(np.asarray(out.reason), [Finish.BUDGET] * 3)
    np.testing.assert_array_equal(np.asarray(out.logprobs), 0.0)  # greedy: point mass
    ref = np.take_along_axis(hf_logp, greedy[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.raw_logprobs), ref, atol=1e-5)
    # The next position of each row follows its own prompt length (no left padding).
    np.testing.assert_array_equal(np.asarray(out.start.positions), [len(p) + N for p in PROMPTS])


def test_shared_prefix_equals_copied_prompt_cache():
    batch = 3   # the copied path then reuses the per-row compile of the other tests
    settings = Settings.make(batch, temperature=[0.0, 0.7, 1.3], top_k=[0, 5, 0], top_p=[1.0, 0.9, 0.95],
                             max_new_tokens=N)
    shared = run_shared(PROMPTS[1], settings, batch, seed=3)
    copied = run_per_row(settings, prompts=[PROMPTS[1]] * batch, seed=3)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(copied.tokens))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(copied.logprobs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(shared.raw_logprobs), np.asarray(copied.raw_logprobs), rtol=1e-5, atol=1e-6)
    tokens = np.asarray(shared.tokens)
    np.testing.assert_array_equal(tokens[0], world()[3][1])            # greedy row = HF greedy
    assert len({tuple(r) for r in tokens}) == 3                        # rows really sample
    assert np.all(np.asarray(shared.logprobs)[1:] <= 0) and np.any(np.asarray(shared.logprobs)[1:] < -0.1)


def test_eos_and_budget_stop_per_row():
    greedy = world()[3]
    eos = (int(greedy[0, 3]), int(greedy[2, 6]))
    budgets = [N, 7, 2]
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=budgets, eos_ids=eos))
    want = [expected_stop(greedy[b], PROMPTS[b][-1], eos=eos, budget=budgets[b]) for b in range(3)]
    assert {r for _, r in want} == {Finish.EOS, Finish.BUDGET}          # both rules exercised
    lengths, reason, tokens = (np.asarray(x) for x in (out.lengths, out.reason, out.tokens))
    for b, (n, r) in enumerate(want):
        assert (lengths[b], reason[b]) == (n, r), b
        np.testing.assert_array_equal(tokens[b, :n], greedy[b, :n])
        np.testing.assert_array_equal(tokens[b, n:], 0)                 # pad after the end
    assert not np.asarray(out.cache_full).any()


def test_sentence_stop_and_boundaries():
    greedy = world()[3]
    stop_after = [1, 2, 0]
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=N, stop_after_sentences=stop_after))
    lengths, reason = np.asarray(out.lengths), np.asarray(out.reason)
    for b in range(3):
        n, r = expected_stop(greedy[b], PROMPTS[b][-1], stop_after=stop_after[b])
        assert (lengths[b], reason[b]) == (n, r), (b, lengths[b], reason[b], n, r)
        ends = [i + 1 for i in range(n)
                if boundary_np(PROMPTS[b][-1] if i == 0 else greedy[b, i - 1], greedy[b, i])]
        assert int(out.num_sentences[b]) == len(ends)
        stored = min(len(ends), 4)
        np.testing.assert_array_equal(np.asarray(out.boundaries)[b, :stored], ends[:stored])
    assert Finish.SENTENCE in reason.tolist() and int(np.asarray(out.num_sentences).max()) >= 2
    assert not boundary_np(greedy[1, 3], greedy[1, 4]) and boundary_np(0, greedy[1, 4])   # prev matters


def test_eos_closes_a_trailing_sentence():
    greedy = world()[3]
    eos = int(greedy[1, 6])
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=N, eos_ids=[eos]))
    n, r = expected_stop(greedy[1], PROMPTS[1][-1], eos=(eos,))
    assert r == Finish.EOS and int(out.lengths[1]) == n
    ends = [i + 1 for i in range(n - 1) if boundary_np(PROMPTS[1][-1] if i == 0 else greedy[1, i - 1], greedy[1, i])]
    if not ends or ends[-1] < n - 1:
        ends.append(n - 1)   # the EOS closes the unfinished sentence before it (EOS excluded)
    assert int(out.num_sentences[1]) == len(ends)
    np.testing.assert_array_equal(np.asarray(out.boundaries)[1, :len(ends)], ends)


def word_table():
    """Surfaces for the toy vocabulary: lower-case words, 42 = ".", 18 = " Dr" (so "Dr." never ends)."""
    surfaces = [f" w{v}" for v in range(VOCAB)]
    surfaces[42], surfaces[18] = ".", " Dr"
    return text.SentenceEndTable.from_surfaces(surfaces)


def test_lookahead_sentence_rule_from_text_table():
    """With `vimar_jax.text`'s table an end is known at the next word; the stop drops that word's token,
    and decoding resumes exactly there."""
    greedy = world()[3]
    assert greedy[0].tolist()[3:9] == [47, 42, 60, 3, 42, 41] and greedy[1].tolist()[4:6] == [42, 37]
    assert greedy[2].tolist()[:3] == [18, 2, 48] and 42 not in greedy[2]
    table = word_table()
    want_ends = [[5, 8], [5], []]   # "... w47. | w60 w3. | w41", "... w53. | w37", row 2 has no "."
    for b in range(3):              # the host segmentation of vimar_jax.text agrees
        assert np.flatnonzero(text.sentence_ends(greedy[b], table)).tolist()[:len(want_ends[b])] == want_ends[b]
    smp = decoder_sampler(world()[1], boundary_fn=SentenceRule.from_table(table), max_sentences=4)
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=[N, N, 8], stop_after_sentences=[2, 1, 1]),
                      smp=smp)
    np.testing.assert_array_equal(np.asarray(out.lengths), [8, 5, 8])
    np.testing.assert_array_equal(np.asarray(out.reason), [Finish.SENTENCE, Finish.SENTENCE, Finish.BUDGET])
    np.testing.assert_array_equal(np.asarray(out.num_sentences), [2, 1, 0])
    np.testing.assert_array_equal(np.asarray(out.boundaries)[0, :2], [5, 8])
    assert int(out.boundaries[1, 0]) == 5
    tokens = np.asarray(out.tokens)
    for b, n in enumerate([8, 5, 8]):
        np.testing.assert_array_equal(tokens[b, :n], greedy[b, :n])
        np.testing.assert_array_equal(tokens[b, n:], 0)           # the revealing token is not kept
    np.testing.assert_array_equal(np.asarray(out.start.positions), [len(p) + n for p, n in zip(PROMPTS, [8, 5, 8])])
    # Resume: the cache holds exactly the kept tokens, so greedy decoding continues as HF's did. The loop
    # ran 9 steps (row 0's 9th token revealed its end), so 22 - 10 - 9 = 3 slots are left.
    assert int(out.start.cache_index) == BUCKET + 9
    sampler_, params = smp
    rest = sampler_.decode(params, out.start, out.cache, Settings.make(3, temperature=0.0, max_new_tokens=N),
                           jax.random.key(0), buffer_size=N)
    np.testing.assert_array_equal(np.asarray(rest.lengths), 3)
    assert np.asarray(rest.cache_full).all()
    np.testing.assert_array_equal(np.asarray(rest.tokens)[0, :3], greedy[0, 8:11])
    np.testing.assert_array_equal(np.asarray(rest.tokens)[1, :3], greedy[1, 5:8])


def test_full_cache_is_reported_not_truncated():
    greedy = world()[3]
    room = 4
    out = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=[N, N, 3]), cache_len=BUCKET + room)
    np.testing.assert_array_equal(np.asarray(out.reason), [Finish.CACHE_FULL, Finish.CACHE_FULL, Finish.BUDGET])
    np.testing.assert_array_equal(np.asarray(out.cache_full), [True, True, False])
    np.testing.assert_array_equal(np.asarray(out.lengths), [room, room, 3])
    for b, n in enumerate([room, room, 3]):
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :n], greedy[b, :n])
    # No slot at all (prompts written at slots 4..13 of 14): nothing is generated.
    smp, params = sampler()
    tokens, lengths = padded(PROMPTS)
    start, cache = smp.prefill(params, tokens, lengths, KVCache.init(world()[2], 3, BUCKET + room), cache_index=room)
    out = smp.decode(params, start, cache, Settings.make(3, temperature=0.0, max_new_tokens=N), jax.random.key(0),
                     buffer_size=N)
    np.testing.assert_array_equal(np.asarray(out.lengths), 0)
    assert np.asarray(out.cache_full).all()


def test_resume_from_a_finished_state():
    greedy = world()[3]
    smp, params = sampler()
    first = run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=5))
    rest = smp.decode(params, first.start, first.cache, Settings.make(3, temperature=0.0, max_new_tokens=N - 5),
                      jax.random.key(0), buffer_size=N)
    both = np.concatenate([np.asarray(first.tokens)[:, :5], np.asarray(rest.tokens)[:, :N - 5]], axis=1)
    np.testing.assert_array_equal(both, greedy)


def test_compiles_once_per_bucket():
    _, params = sampler()
    smp = decoder_sampler(world()[1])[0]    # a fresh sampler: its own jit caches
    with count_compiles() as counts:
        run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=N), smp=(smp, params))
    assert counts["_decode_impl"] == 1 and counts["_prefill_impl"] == 1, counts
    with count_compiles() as counts:
        # Other budgets, sampling settings, EOS sets, seeds and prompt lengths in the same bucket.
        run_per_row(Settings.make(3, temperature=[0.3, 0.0, 1.0], top_k=[0, 3, 5], top_p=0.9, max_new_tokens=5,
                                  eos_ids=[1, 2, 3], stop_after_sentences=1),
                    prompts=[[1, 2], [3] * BUCKET, [4, 5, 6]], smp=(smp, params), seed=9)
        run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=[1, 2, 3]), smp=(smp, params))
    assert counts["_decode_impl"] == 0 and counts["_prefill_impl"] == 0, counts
    with count_compiles() as counts:   # a new buffer size is a new bucket
        run_per_row(Settings.make(3, temperature=0.0, max_new_tokens=4), buffer_size=N - 4, smp=(smp, params))
    assert counts["_decode_impl"] == 1 and counts["_prefill_impl"] == 0, counts


def test_bad_arguments_raise():
    smp, params = sampler()
    cfg = world()[2]
    tokens, lengths = padded(PROMPTS)
    with pytest.raises(ValueError, match="prompt lengths"):
        smp.prefill(params, tokens, np.array([0, 3, 3]), KVCache.init(cfg, 3, BUCKET))
    start, cache = smp.prefill(params, tokens, lengths, KVCache.init(cfg, 3, BUCKET + N))
    with pytest.raises(ValueError, match="exceeds buffer_size"):
        smp.decode(params, start, cache, Settings.make(3, max_new_tokens=N + 1), jax.random.key(0), buffer_size=N)
    with pytest.raises(ValueError, match="temperature"):
        Settings.make(3, temperature=[1.0, 2.0], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        Settings.make(3, top_p=1.5, max_new_tokens=4)
    with pytest.raises(ValueError, match="at most 8 eos_ids"):
        Settings.make(3, max_new_tokens=4, eos_ids=range(9))
    with pytest.raises(ValueError, match="batch-1"):
        start.broadcast(4)


def _same_decode(a, b, *, atol=1e-5):
    for name in ("tokens", "lengths", "reason", "boundaries", "num_sentences"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
    for name in ("logprobs", "raw_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), atol=atol, err_msg=name)
    np.testing.assert_allclose(np.asarray(a.start.logits), np.asarray(b.start.logits), atol=1e-4)
    for name in ("positions", "last_token", "cache_index"):
        np.testing.assert_array_equal(np.asarray(getattr(a.start, name)), np.asarray(getattr(b.start, name)))
    pos = np.asarray(a.cache.pos)
    np.testing.assert_array_equal(pos, np.asarray(b.cache.pos))
    filled = pos >= 0                                           # empty slots hold whatever was written there
    np.testing.assert_allclose(np.asarray(a.cache.k)[:, filled], np.asarray(b.cache.k)[:, filled], atol=atol)
    np.testing.assert_allclose(np.asarray(a.cache.v)[:, filled], np.asarray(b.cache.v)[:, filled], atol=atol)


def test_compaction_samples_what_the_full_batch_samples():
    """Rows stopping at different steps (budgets 1..N, sentence stops, EOS): a compacted decode (16 -> 8 -> 4
    rows as rows stop) gives every row the tokens, log-probs, stops, sentence ends, next start and filled
    cache slots of the full-batch decode, with a shared prefix and with per-row prompts, and resuming from
    either continues the same."""
    smp, params = sampler()
    cfg = world()[2]
    assert compaction_sizes(16) == (8, 4) and compaction_sizes(8) == (4,) and compaction_sizes(7) == ()
    B = 16
    settings = Settings.make(B, temperature=np.linspace(0.3, 1.5, B), top_p=0.95,
                             max_new_tokens=np.arange(B) % N + 1, stop_after_sentences=np.arange(B) % 3 == 0,
                             eos_ids=[int(world()[3][0, 5])])
    tokens, lengths = padded([PROMPTS[1]])

    def shared(compact):
        start, prefix = smp.prefill(params, tokens, lengths, KVCache.init(cfg, 1, BUCKET))
        return smp.decode(params, start.broadcast(B), KVCache.init(cfg, B, 2 * N), settings, jax.random.key(3),
                          buffer_size=N, prefix=prefix, compact=compact), prefix

    (full, prefix), (comp, _) = shared(False), shared(True)
    _same_decode(full, comp)
    lengths_ = np.asarray(full.lengths)
    assert len(set(lengths_.tolist())) >= 6 and (np.asarray(full.reason) == Finish.SENTENCE).any()
    more = Settings.make(B, temperature=1.0, max_new_tokens=N)
    _same_decode(smp.decode(params, full.start, full.cache, more, jax.random.key(4), buffer_size=N, prefix=prefix),
                 smp.decode(params, comp.start, comp.cache, more, jax.random.key(4), buffer_size=N, prefix=prefix,
                            compact=True))

    prompts = (PROMPTS * 3)[:8]                                # per-row prompt caches: 8 -> 4 rows
    eight = Settings.make(8, temperature=0.8, max_new_tokens=np.arange(8) + 2)
    runs = []
    for compact in (False, True):
        ptoks, plens = padded(prompts)
        start, cache = smp.prefill(params, ptoks, plens, KVCache.init(cfg, 8, BUCKET + N))
        runs.append(smp.decode(params, start, cache, eight, jax.random.key(5), buffer_size=N, compact=compact))
    _same_decode(*runs)

    # The compacted program holds a loop per batch size (the plain one: one), so it did compact.
    def loops(sizes):
        start, prefix = smp.prefill(params, tokens, lengths, KVCache.init(cfg, 1, BUCKET))
        rows = start.broadcast(B)
        lowered = smp._decode.lower(params, rows, KVCache.init(cfg, B, 2 * N), settings, jax.random.key(3),
                                    jnp.arange(B, dtype=jnp.int32), prefix, smp.rule.init(rows.last_token),
                                    buffer_size=N, sizes=sizes)
        return lowered.as_text().count("stablehlo.while")
    assert loops((8, 4)) == 3 * loops(())


def test_compaction_needs_a_cache_that_can_take_rows():
    smp, params = sampler()
    cfg = world()[2]
    tokens, lengths = padded([PROMPTS[0]])
    start, prefix = smp.prefill(params, tokens, lengths, KVCache.init(cfg, 1, BUCKET))
    cache = KVCache.init(cfg, 8, N)
    plain = {"k": cache.k, "v": cache.v, "pos": cache.pos}
    with pytest.raises(TypeError, match="compact=True needs a cache with take_rows and put_rows; a dict"):
        smp.decode(params, start.broadcast(8), plain, Settings.make(8, max_new_tokens=N), jax.random.key(0),
                   buffer_size=N, prefix=prefix, compact=True)
