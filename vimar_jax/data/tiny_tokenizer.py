"""Word-level tokenizers for the tiny world, saved in the Hugging Face layout.

Variant "a" is Mistral-like: SentencePiece-style '▁' word tokens (a space is attached to the word after
it, and a '▁' is prepended at the start of the text, so "There is" and "[/INST] There is" give the same
tokens for the caption; a word right after a newline or a special token is a bare 'word' token),
`<s>` added in front, `[INST] <image>\\n{prompt} [/INST]` chat template. Variant "b" is Qwen-like, for the
cross-model policy: byte-level 'Ġ' word tokens (no space prepended), a different id order, special tokens
at the end (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`), no BOS, and a ChatML template.

Both decode the tokens of any text made of `scenes.vocabulary()` words, single spaces and punctuation
back to exactly that text (the decoder joins '▁'/'Ġ' as spaces and punctuation without one).
Only `tokenizers` is needed here; `transformers` can load the saved directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from vimar_jax.data import scenes

VARIANTS = ("a", "b")

# Chat templates. User content is a string (text only) or a LLaVA-style list of parts
# ({"type": "image"} / {"type": "text", "text": ...}); every image part becomes "<image>\n" before the text.
# No whitespace control: the same text renders under plain jinja and under HF's trim_blocks/lstrip_blocks
# (no newline follows a block tag and no line starts with blanks before one).
_USER_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
)
_ASSISTANT_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endfor %}{% endif %}"
)
CHAT_TEMPLATE_A = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] " + _USER_CONTENT + " [/INST]"
    "{% elif message['role'] == 'assistant' %} " + _ASSISTANT_CONTENT + "{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATE_B = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}" + _ASSISTANT_CONTENT + "{% else %}" + _USER_CONTENT
    + "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = {
    # role -> token, in id order for variant a (Mistral: unk 0, bos 1, eos 2).
    "a": {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "inst": "[INST]", "inst_end": "[/INST]",
          "image": "<image>"},
    # Qwen-like: no BOS; the specials follow the words.
    "b": {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|unk|>",
          "image": "<image>"},
}
_EXTRA_WORDS_B = ("system", "user", "assistant", "You", "helpful")
_PUNCT_SPLIT = Regex(r"[.,!?:;]|\n")


def special_tokens(variant: str = "a") -> dict[str, str]:
    """Role -> special token string (roles: unk, eos, pad, image, and bos/inst/inst_end or im_start)."""
    _check(variant)
    return dict(_SPECIALS[variant])


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; known: {VARIANTS}")


def _vocab(variant: str) -> dict[str, int]:
    words = scenes.vocabulary()
    alpha = [w for w in words if w.isalpha()]
    punct = [w for w in words if not w.isalpha()]
    specials = list(_SPECIALS[variant].values())
    if variant == "a":
        # '▁word' after a space or at the start of the text; bare 'word' right after a newline or special token.
        tokens = specials + ["▁", "\n"] + punct + ["▁" + w for w in alpha] + alpha
    else:
        alpha = sorted(set(alpha) | set(_EXTRA_WORDS_B))
        pieces = [p for w in alpha for p in (w, "Ġ" + w)] + punct + ["Ġ", "Ċ"]
        order = np.random.default_rng(1234).permutation(len(pieces))
        tokens = [pieces[i] for i in order] + specials
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate tokens in the tiny vocabulary")
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(variant: str = "a") -> Tokenizer:
    """The tiny world tokenizer (a `tokenizers.Tokenizer`)."""
    _check(variant)
    sp = _SPECIALS[variant]
    tok = Tokenizer(models.WordLevel(_vocab(variant), unk_token=sp["unk"]))
    if variant == "a":
        # "There is a red circle." -> ▁There ▁is ▁a ▁red ▁circle .   (punctuation split off after '▁' marking)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Split(_PUNCT_SPLIT, behavior="isolated"),
        ])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A {sp['bos']} $B",
            special_tokens=[(sp["bos"], tok.model.token_to_id(sp["bos"]))])
        # A newline is its own token (the word after it is bare, as after a special token).
        tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    else:
        # "There is a red circle." -> There Ġis Ġa Ġred Ġcircle .
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sp.values()])
    return tok


def _tokenizer_config(tok: Tokenizer, variant: str, model_max_length: int) -> dict:
    sp = _SPECIALS[variant]
    added = {}
    for tid, at in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {"content": at.content, "lstrip": at.lstrip, "rstrip": at.rstrip,
                           "normalized": at.normalized, "single_word": at.single_word, "special": at.special}
    named = {f"{k}_token": sp.get(k) for k in ("bos", "eos", "unk", "pad")}
    extra = [t for k, t in sp.items() if k not in ("bos", "eos", "unk", "pad")]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": extra,
        "add_bos_token": variant == "a",
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE_A if variant == "a" else CHAT_TEMPLATE_B,
        "added_tokens_decoder": added,
    }


def save_tokenizer(directory: str, variant: str = "a", *, model_max_length: int = 4096) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory` (created if
    needed); loadable with `transformers.AutoTokenizer.from_pretrained(directory)`."""
    _check(variant)
    tok = build_tokenizer(variant)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = _tokenizer_config(tok, variant, model_max_length)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    sp = _SPECIALS[variant]
    special_map = {f"{k}_token": sp[k] for k in ("bos", "eos", "unk", "pad") if k in sp}
    special_map["additional_special_tokens"] = config["additional_special_tokens"]
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
    return tok
