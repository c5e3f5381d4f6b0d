"""The search engine on a scripted policy and a scripted value function (no models).

Sentences are words joined by spaces and closed by "."; the scripted policy returns, for each
(prefix, stop mode), a queue of prepared candidate lists and records every prefix it was asked to continue.
"""

import numpy as np
import pytest

from vimar_jax.decode.buffer import CaptionBuffer, append, splice
from vimar_jax.decode.search import Engine, Samples, SearchConfig

WORDS = ["<pad>", "."] + [f"w{i}" for i in range(200)]
ID = {w: i for i, w in enumerate(WORDS)}
DOT = ID["."]


def enc(sentence: str) -> list[int]:
    words = sentence.rstrip(".").split()
    return [ID[w] for w in words] + [DOT]


class ScriptedPolicy:
    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}   # (prefix text, stop) -> [[(sent, eos)...]]
        self.calls = []

    def begin(self, image, prompt):
        return image

    def decode(self, tokens):
        out, cur = [], []
        for t in tokens:
            if t == DOT:
                out.append(" ".join(cur) + ".")
                cur = []
            else:
                cur.append(WORDS[t])
        if cur:
            out.append(" ".join(cur))
        return " ".join(out)

    def split(self, tokens):
        spans, cur = [], []
        for t in tokens:
            cur.append(t)
            if t == DOT:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        return spans

    def sample(self, ctx, prefix, temperatures, *, top_p, top_k, stop, max_new_tokens, seed):
        key = (self.decode(prefix), stop)
        self.calls.append(key)
        queue = self.script.get(key)
        if not queue:
            rows = [("", True)] * len(temperatures)                 # nothing scripted: every row is EOS
        else:
            rows = queue.pop(0)
        assert len(rows) <= len(temperatures)
        rows = list(rows) + [rows[-1]] * (len(temperatures) - len(rows))
        toks = [[t for s in text.split(". ") if s for t in enc(s)] if text else [] for text, _ in rows]
        return Samples(toks, [e for _, e in rows], sum(len(t) + 1 for t in toks))


class ScriptedValue:
    def __init__(self, values, default=0.0):
        self.values, self.default, self.calls, self.prompts = values, default, [], []

    def begin(self, image, prompt=None):
        self.prompts.append(prompt)
        return image

    def score(self, ctx, sentences, previous=None):
        self.calls.append(list(sentences))
        return np.asarray([self.values.get(s, self.default) for s in sentences], np.float32)


CFG = SearchConfig(temperatures=(0.5,), samples_per_temperature=3, theta=0.3, sentence_max_tokens=8,
                   max_new_tokens=32)


def test_buffer_splice_keeps_other_tokens_in_place():
    sents = [enc("w1 w2."), enc("w3 w4 w5."), enc("w6.")]
    buf = CaptionBuffer.from_sentences(sents, 32)
    new = np.zeros(8, np.int32)
    new[:4] = enc("w7 w8 w9.")
    out, overflow = splice(buf, 1, new, 4)
    assert not bool(overflow)
    assert out.to_sentences() == [sents[0], enc("w7 w8 w9."), sents[2]]
    toks = np.asarray(out.tokens)
    assert toks[:3].tolist() == sents[0]                      # before: untouched, same slots
    assert toks[7:9].tolist() == sents[2]                     # after: shifted by exactly +1
    deleted, _ = splice(buf, 0, new, 0)
    assert deleted.to_sentences() == sents[1:]
    assert np.asarray(deleted.seg)[:6].tolist() == [0, 0, 0, 0, 1, 1]
    full, overflow = append(CaptionBuffer.from_sentences(sents, 10), new, 4)
    assert bool(overflow)


def _stage1(*captions):
    return [(c, True) for c in captions]


def test_vimar_replaces_weak_segments_left_to_right_then_appends():
    a, b, c, d = "w1 w2.", "w3 w4.", "w5 w6.", "w7 w8."
    b2, d2, e = "w9 w10.", "w11 w12.", "w13 w14."
    policy = ScriptedPolicy({
        ("", "eos"): [_stage1(" ".join([a, b, c, d]), "w20 w21.")],
        (a, "sentence"): [[(b2, False), ("w30.", False), ("", True)]],
        (" ".join([a, b2, c]), "sentence"): [[(d2, False), ("w31.", False), ("w32.", False)]],
        (" ".join([a, b2, c, "w31."]), "sentence"): [[(e, False), ("w33.", False), ("", True)],
                                                 [("", True)]],
    })
    values = {a: 0.5, b: 0.1, c: 0.6, d: 0.05, b2: 0.45, d2: 0.35, e: 0.4, "w30.": 0.2, "w31.": 0.9,
              "w32.": 0.0, "w33.": 0.1, "w20 w21.": 0.2}
    # "w31." has the highest value of the candidates for segment 3: the argmax is taken, not the first.
    value = ScriptedValue(values)
    res = Engine(policy, CFG, value=value).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a, b2, c, "w31.", e]
    assert [s.origin for s in res.sentences] == ["sample", "replaced", "sample", "replaced", "appended"]
    assert value.prompts == ["p"]        # the value scorer knows the prompt (prefix states hold it)
    # Weak segments were visited in order, each conditioned on the refined prefix.
    sentence_calls = [k for k, mode in policy.calls if mode == "sentence"]
    assert sentence_calls[:2] == [a, " ".join([a, b2, c])]
    # Stage 1: one batched scoring call over all sentences of all candidates.
    assert value.calls[0] == [a, b, c, d, "w20 w21.", "w20 w21."]     # 3 slots: the last row repeats
    # The buffer holds exactly the final caption's tokens.
    assert res._buffer.to_sentences() == [enc(x) for x in (a, b2, c, "w31.", e)]


def test_vimar_keeps_original_when_no_candidate_is_better_and_drops_below_threshold():
    a, b, c = "w1 w2.", "w3 w4.", "w5 w6."
    script = {("", "eos"): [_stage1(" ".join([a, b, c]))],
              (a, "sentence"): [[("w40.", False), ("w41.", False)]],
              (" ".join([a, b]), "sentence"): [[("w42.", False)]]}
    values = {a: 0.5, b: 0.2, c: 0.1, "w40.": 0.15, "w41.": 0.19, "w42.": 0.05}
    res = Engine(ScriptedPolicy(script), CFG, value=ScriptedValue(values)).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a, b, c]
    cfg = SearchConfig(**{**CFG.__dict__, "drop_below": 0.12})
    res = Engine(ScriptedPolicy(script), cfg, value=ScriptedValue(values)).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a, b]           # c (0.1 < 0.12) dropped, b kept (0.2)


def test_caps_hold():
    a, b, c = "w1 w2.", "w3 w4.", "w5 w6."
    appended = [f"w{50 + i}." for i in range(6)]
    script = {("", "eos"): [_stage1(" ".join([a, b, c]))],
              ("", "sentence"): [[("w45.", False)]]}
    prefix = " ".join(["w45.", b, c])
    for s in appended:
        script[(prefix, "sentence")] = [[(s, False)]]
        prefix = prefix + " " + s
    values = {a: 0.1, b: 0.1, c: 0.1, "w45.": 0.9, **{s: 0.5 for s in appended}}
    cfg = SearchConfig(**{**CFG.__dict__, "max_refine": 1, "max_append": 2})
    policy = ScriptedPolicy(script)
    res = Engine(policy, cfg, value=ScriptedValue(values)).run(None, "p", "vimar")
    # Only the first of three weak segments is re-sampled; only two sentences are appended.
    assert [s.text for s in res.sentences] == ["w45.", b, c, *appended[:2]]
    assert sum(mode == "sentence" for _, mode in policy.calls) == 1 + 2
    cfg = SearchConfig(**{**CFG.__dict__, "max_refine": 1, "max_append": 6})
    res = Engine(ScriptedPolicy(script), cfg, value=ScriptedValue(values)).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == ["w45.", b, c, *appended]


def test_append_stops_at_repeat_below_theta_and_eos():
    a = "w1 w2."
    base = {("", "eos"): [_stage1(a)]}
    # A repeat of an existing sentence stops appending.
    res = Engine(ScriptedPolicy({**base, (a, "sentence"): [[(a, False)]]}), CFG,
                 value=ScriptedValue({a: 0.9})).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a]
    # A best candidate below θ stops appending.
    res = Engine(ScriptedPolicy({**base, (a, "sentence"): [[("w3.", False)]]}), CFG,
                 value=ScriptedValue({a: 0.9, "w3.": 0.29})).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a]
    # All-EOS candidates stop; a candidate that ended with EOS is appended and then stops.
    script = {**base, (a, "sentence"): [[("w3.", True)]], (a + " w3.", "sentence"): [[("w4.", False)]]}
    res = Engine(ScriptedPolicy(script), CFG, value=ScriptedValue({a: 0.9, "w3.": 0.5, "w4.": 0.6})).run(
        None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a, "w3."]


def test_append_only_flag_reproduces_released_stage2():
    a, b = "w1 w2.", "w3 w4."
    script = {("", "eos"): [_stage1(" ".join([a, b]))],
              (a, "sentence"): [[("w9.", False)]],
              (" ".join([a, b]), "sentence"): [[("w5.", False)], [("", True)]]}
    values = {a: 0.5, b: 0.1, "w9.": 0.8, "w5.": 0.6}
    cfg = SearchConfig(**{**CFG.__dict__, "stage2": "append_only"})
    policy = ScriptedPolicy(script)
    res = Engine(policy, cfg, value=ScriptedValue(values)).run(None, "p", "vimar")
    assert [s.text for s in res.sentences] == [a, b, "w5."]      # weak b is kept, w5 appended
    assert (a, "sentence") not in policy.calls
    cfg = SearchConfig(**{**CFG.__dict__, "stage2": "replace_append"})
    res = Engine(ScriptedPolicy(script), cfg, value=ScriptedValue(values)).run(None, "p", "vimar")
    assert [s.text for s in res.sentences][:2] == [a, "w9."]


def test_stage1_picks_best_mean_value_and_step_search_stops_at_eos():
    c1, c2 = "w1. w2.", "w3. w4."
    values = {"w1.": 0.9, "w2.": 0.0, "w3.": 0.5, "w4.": 0.5}
    script = {("", "eos"): [_stage1(c1, c2)]}
    cfg = SearchConfig(**{**CFG.__dict__, "stage2": "off"})
    assert Engine(ScriptedPolicy(script), cfg, value=ScriptedValue(values)).run(None, "p", "vimar").caption == c2
    cfg = SearchConfig(**{**CFG.__dict__, "stage2": "off", "caption_score": "min"})
    assert Engine(ScriptedPolicy(script), cfg, value=ScriptedValue(values)).run(None, "p", "vimar").caption == c2
    steps = {("", "sentence"): [[("w1.", False), ("w2.", False)]],
             ("w1.", "sentence"): [[("w5.", True), ("w6.", False)]]}
    res = Engine(ScriptedPolicy(steps), CFG, value=ScriptedValue({"w1.": 1, "w5.": 1, "w6.": 0})).run(
        None, "p", "visvm")
    assert res.caption == "w1. w5."
    cfg = SearchConfig(**{**CFG.__dict__, "max_sentences": 1})
    res = Engine(ScriptedPolicy(steps), cfg, value=ScriptedValue({"w1.": 1})).run(None, "p", "visvm")
    assert res.caption == "w1."


def test_missing_models_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="value model"):
        Engine(ScriptedPolicy({}), CFG).run(None, "p", "vimar")
    with pytest.raises(ValueError, match="unknown method"):
        Engine(ScriptedPolicy({}), CFG).run(None, "p", "beam")
    with pytest.raises(ValueError, match="stage2"):
        SearchConfig(stage2="sometimes")
