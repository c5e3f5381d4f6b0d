"""Tokenizer loading and chat templates against transformers; sentence segmentation on text and on tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vimar_jax import text as vt

# ---------------------------------------------------------------------------------------------------------
# Text generator for segmentation tests: abbreviations, decimals, ellipses, quotes, list markers, odd spacing.
# ---------------------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "Mr.", "Dr.", "e.g.", "i.e.", "etc.", "vs.", "J.", "K.",
         "U.S.", "p.m.", "3.5", "0.25", "$4.99", "42", "1.", "2.", "(see", "Fig.", "2)", "\"Yes,\"", "it's",
         "don't", "red", "Blue", "Green", "big", "small", "and", "or", "with", "The", "A", "It", "There", "is",
         "are", "two", "three", "No.", "St.", "Inc.", "approx.", "...", "…", "wow", "hi", "v1.2", "x"]
ENDS = [".", "!", "?", "...", "…", ".\"", "!)", "?!", ".)", ". . ."]
SEPS = [" ", " ", " ", "  ", "\n", "\n\n", " \n ", "\t"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def gen_text(rng):
    def sep():
        return SEPS[rng.integers(len(SEPS))]

    parts = []
    for _ in range(rng.integers(1, 7)):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(1, 10))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        s = "".join((sep() if k else "") + w for k, w in enumerate(words))
        if rng.random() < 0.8:
            s += ENDS[rng.integers(len(ENDS))]
        parts.append(s)
    text = "".join((sep() if k else "") + p for k, p in enumerate(parts))
    if rng.random() < 0.3:
        text = sep() + text
    if rng.random() < 0.3:
        text += sep()
    return text


def corpus():
    rng = np.random.default_rng(1)
    return [gen_text(rng) for _ in range(2000)]


def word_level():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins tokens with one space
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return tok


def byte_level_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def metaspace_bpe():
    """SentencePiece-like: '▁' word starts, newlines/tabs split off as their own pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S ]"), "isolated"),
                                                 pre_tokenizers.Metaspace(prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tok


BUILDERS = {"word_level": word_level, "byte_level_bpe": byte_level_bpe, "metaspace_bpe": metaspace_bpe}


def wrap(backend):
    return vt.Tokenizer(backend, special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                                                 "pad_token": "<pad>"})


# ---------------------------------------------------------------------------------------------------------
# split_sentences
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("A cat sat. A dog ran!  Why? ", ["A cat sat.", "A dog ran!", "Why?"]),
    ("It costs 3.5 dollars. Pi is 3.14159.", ["It costs 3.5 dollars.", "Pi is 3.14159."]),
    ("Mr. Smith met Dr. Jones, e.g. at noon, i.e. lunch. They ate.",
     ["Mr. Smith met Dr. Jones, e.g. at noon, i.e. lunch.", "They ate."]),
    ("Apples, pears etc. are fruit. We like fruit etc. Then we left.",
     ["Apples, pears etc. are fruit.", "We like fruit etc.", "Then we left."]),
    ("J. K. Rowling wrote it. Red vs. blue.", ["J. K. Rowling wrote it.", "Red vs. blue."]),
    ("He lives in the U.S. and works till 5 p.m. Every day.", ["He lives in the U.S. and works till 5 p.m.",
                                                              "Every day."]),
    ("Wait... what? Well… Fine.", ["Wait... what?", "Well…", "Fine."]),
    ("1. A cat. 2. A dog.", ["1. A cat.", "2. A dog."]),
    ("\"Stop.\" She left. (See Fig. 3.) Done.", ["\"Stop.\"", "She left.", "(See Fig. 3.)", "Done."]),
    ("First line.\n\nSecond   line\nstill second. ", ["First line.", "Second   line\nstill second."]),
    ("Trailing text without a period", ["Trailing text without a period"]),
    ("Ends. And then", ["Ends.", "And then"]),
    ("A sentence... . ! Another.", ["A sentence...", ". ! Another."]),  # letterless fragments join the next
    ("", []),
    (" \n\t ", []),
    ("...", ["..."]),
])
def test_split_sentences(text, expected):
    assert vt.split_sentences(text) == expected


def test_split_sentences_never_returns_empty(rng):
    for _ in range(300):
        for s in vt.split_sentences(gen_text(rng)):
            assert s and s == s.strip()


# ---------------------------------------------------------------------------------------------------------
# Token-level segmentation agrees with split_sentences
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_token_spans_agree_with_split_sentences(name, rng):
    tok = wrap(BUILDERS[name]())
    table = vt.sentence_end_table(tok)
    assert table.flags.shape == (tok.vocab_size, vt.N_FLAGS) and table.hashes.dtype == np.uint32
    n_sentences = 0
    for i in range(400):
        ids = tok.encode(gen_text(rng), add_special_tokens=bool(i % 3))
        if i % 2:
            ids = ids + [tok.eos_token_id]
        expected = vt.split_sentences(tok.decode(ids))
        got = [tok.decode(ids[s:e]).strip() for s, e in vt.token_sentence_spans(ids, table)]
        assert got == expected, (tok.decode(ids), [tok.id_to_token(i) for i in ids])
        n_sentences += len(expected)
    assert n_sentences > 1000  # the texts really have many sentences


def test_eos_ends_sentence_and_tokens_after_it_start_anew():
    tok = wrap(metaspace_bpe())
    table = vt.sentence_end_table(tok)
    a, b = tok.encode("The cat sat on the mat", add_special_tokens=False), tok.encode("It is red.",
                                                                                       add_special_tokens=False)
    ids = [tok.bos_token_id] + a + [tok.eos_token_id] + b
    spans = vt.token_sentence_spans(ids, table)
    assert spans == [(1, 1 + len(a)), (2 + len(a), len(ids))]
    ends = vt.sentence_ends(ids, table)
    assert ends.nonzero()[0].tolist() == [1 + len(a)]


@pytest.mark.parametrize("name", ["byte_level_bpe", "metaspace_bpe"])
def test_sentence_boundary_under_jit_matches_host(name, rng):
    """The jnp step in a jitted scan over a batch gives the same boundaries as the host loop."""
    tok = wrap(BUILDERS[name]())
    table = vt.sentence_end_table(tok)
    seqs = [tok.encode(gen_text(rng)) + ([tok.eos_token_id] if k % 2 else []) for k in range(16)]
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id  # an invisible special token: no effect on the state
    batch = np.full((len(seqs), T), pad, np.int32)
    for k, s in enumerate(seqs):
        batch[k, :len(s)] = s

    @jax.jit
    def run(table, tokens):
        def body(state, tok_t):
            state, ended = vt.sentence_boundary(table, state, tok_t)
            return state, ended
        _, ends = jax.lax.scan(body, vt.init_sentence_state(tokens.shape[0], jnp), tokens.T)
        return ends.T

    ends = np.asarray(run(table, jnp.asarray(batch)))
    assert ends.any()
    for k, s in enumerate(seqs):
        np.testing.assert_array_equal(ends[k, :len(s)], vt.sentence_ends(s, table))
        assert not ends[k, len(s):].any()
    # the numpy path of the same function agrees too
    state, host = vt.init_sentence_state(len(seqs)), []
    for t in range(T):
        state, e = vt.sentence_boundary(table, state, batch[:, t])
        host.append(e)
    np.testing.assert_array_equal(np.stack(host, 1), ends)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer loading and chat template against transformers
# ---------------------------------------------------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} [/INST]\n"
    "{% elif message['role'] == 'assistant' %}  {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% generation %} Answer:{% endgeneration %}{% endif %}"
)
OTHER_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | tojson }}{% endfor %}"


def hf_dir(tmp_path, *, padding_side="right", template=TEMPLATE, jinja=False, pad_token="<pad>"):
    backend = metaspace_bpe()
    from tokenizers import AddedToken
    backend.add_special_tokens([AddedToken("<image>", special=True)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token=pad_token, padding_side=padding_side, add_bos_token=True,
                                 chat_template=template)
    hf.save_pretrained(tmp_path)
    cfg_file = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    if jinja:  # the template lives in chat_template.jinja, overriding tokenizer_config.json
        cfg["chat_template"] = OTHER_TEMPLATE
        (tmp_path / "chat_template.jinja").write_text(template)
    elif (tmp_path / "chat_template.jinja").exists():
        cfg["chat_template"] = template
        (tmp_path / "chat_template.jinja").unlink()
    cfg_file.write_text(json.dumps(cfg))
    return AutoTokenizer.from_pretrained(tmp_path)


MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
    {"role": "assistant", "content": "A cat. It sat."},
    {"role": "user", "content": "More detail, e.g. colours?"},
]


@pytest.mark.parametrize("padding_side,jinja", [("right", False), ("left", True)])
def test_load_tokenizer_matches_transformers(tmp_path, rng, padding_side, jinja):
    hf = hf_dir(tmp_path, padding_side=padding_side, jinja=jinja)
    ours = vt.load_tokenizer(tmp_path)
    assert ours.padding_side == padding_side
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.vocab_size == len(hf)
    texts = [gen_text(rng) for _ in range(20)] + ["<image>\nDescribe it. <s> in the middle", ""]
    for t in texts:
        assert ours.encode(t) == hf(t)["input_ids"], t
        assert ours.encode(t, add_special_tokens=False) == hf(t, add_special_tokens=False)["input_ids"]
    ref = hf(texts, padding=True, return_tensors="np")
    got = ours(texts)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    assert got["input_ids"].dtype == np.int32
    for row in ref["input_ids"]:
        for skip in (True, False):
            assert ours.decode(row, skip_special_tokens=skip) == hf.decode(row, skip_special_tokens=skip)
    for gen_prompt in (False, True):
        expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt) == expected
        assert vt.apply_chat_template(ours, MESSAGES, add_generation_prompt=gen_prompt) == expected
    assert "[INST] <image>\nDescribe the image. [/INST]" in expected and expected.endswith(" Answer:")


def test_special_token_missing_from_vocab_is_added(tmp_path):
    hf = hf_dir(tmp_path, pad_token="<newpad>")
    ours = vt.load_tokenizer(tmp_path)
    assert ours.pad_token_id == hf.pad_token_id == len(hf) - 1
    assert ours.encode("a <newpad> b") == hf("a <newpad> b")["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        vt.load_tokenizer(tmp_path)
    hf_dir(tmp_path, template=None)
    ours = vt.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        ours.apply_chat_template(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        vt.load_tokenizer(tmp_path)
