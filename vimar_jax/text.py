"""Tokenizer, chat template and sentence segmentation (host side; the sentence-end table also runs under jit).

* `load_tokenizer(dir)`: the `tokenizers` backend from `tokenizer.json` plus the special tokens, padding side,
  post-processor and chat template of the Hugging Face files, behaving like transformers 5's
  `TokenizersBackend` (what `AutoTokenizer` gives for LLaVA-NeXT checkpoints).
* `split_sentences(text)`: the sentence states of SPEC §2.
* `SentenceEndTable` / `sentence_boundary` / `token_sentence_spans`: the same segmentation decided token by
  token from small per-vocabulary arrays, so a jitted sampler can stop at the end of a sentence.

Segmentation rules (text and tokens agree on them). A *word* is a maximal run of non-whitespace characters.
Leading openers ``"'([{«“‘`` are ignored; the rest of a word splits into a *body* and a *tail*, the tail being
its longest suffix made of ``.!?…`` and closers ``"')]}»”’``. A sentence ends after a word when the sentence
so far contains a letter and:

* the tail contains '!' or '?'; or
* the tail holds one '.': unless the body (lower-cased) is an abbreviation that never ends a sentence
  (`NEVER_END`: "mr", "dr", "e.g", "i.e", "vs", ...) or a single letter (an initial, "J."); abbreviations that
  may end one (`MAYBE_END`: "etc", "inc", "st", ...) and dotted ones ("U.S.", "a.m.") end it only when the next
  word does not start with a lower-case letter;
* the tail holds an ellipsis ("..", "...", "…"): it ends the sentence only when the next word does not start
  with a lower-case letter.

Decimals ("3.5") never split (the '.' is inside a word). A word with no letter in a sentence that has none
yet (a list marker "1.", a lone "...") never closes it: such fragments join the next sentence. Whatever
follows the last boundary is the last sentence (no final period needed); whitespace-only fragments are no
sentence. Whitespace (spaces, newlines) only separates words; it never ends a sentence by itself.
On the token side a boundary is known when the first token of the next word arrives (or EOS); the sentence
is the tokens before it. Tokens whose decoded text has whitespace *between* non-space characters are
treated as one word (no such tokens in SentencePiece, GPT-2/Qwen byte-level or word-level vocabularies).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise ValueError(f"cannot read a special token from {value!r}")


def _read_json(file: str) -> Any:
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e


class Tokenizer:
    """A `tokenizers.Tokenizer` with the HF special tokens, padding side and chat template."""

    def __init__(self, backend, *, special_tokens: Mapping[str, str | None] | None = None,
                 padding_side: str = "right", chat_template: str | dict | None = None,
                 clean_up_tokenization_spaces: bool = False, extra_special_tokens: Mapping[str, str] | None = None):
        from tokenizers import AddedToken

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = dict(extra_special_tokens or {})
        self.padding_side = padding_side
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # Named special tokens missing from the vocabulary are added as special tokens (as HF does).
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in list(self.special_tokens.values()) + list(self.extra_special_tokens.values())
                   if t not in vocab]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])
        self.backend.no_padding()
        self.backend.no_truncation()

    # ---- special tokens ----
    def _id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return None if tok is None else self.backend.token_to_id(tok)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (HF `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def special_ids(self) -> set[int]:
        """Ids of all added tokens marked special."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # ---- encoding ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def pad(self, batch: Sequence[Sequence[int]], *, length: int | None = None,
            padding_side: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [B, length or longest], padded with the pad token."""
        side = padding_side or self.padding_side
        n = max((len(x) for x in batch), default=0) if length is None else length
        if any(len(x) > n for x in batch):
            raise ValueError(f"a sequence is longer than the padding length {n}")
        pad_id = self.pad_token_id
        if pad_id is None:
            if all(len(x) == n for x in batch):
                pad_id = 0
            else:
                raise ValueError("padding needs a pad_token (set it in tokenizer_config.json)")
        ids = np.full((len(batch), n), pad_id, np.int32)
        mask = np.zeros((len(batch), n), np.int32)
        for i, x in enumerate(batch):
            sl = slice(n - len(x), n) if side == "left" else slice(0, len(x))
            ids[i, sl] = x
            mask[i, sl] = 1
        return ids, mask

    def __call__(self, texts: str | Sequence[str], *, add_special_tokens: bool = True, padding: bool = True
                 ) -> dict[str, np.ndarray]:
        """HF-style batch encoding padded to the longest text (numpy int32)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.encode_batch(texts, add_special_tokens)
        if not padding and len({len(x) for x in batch}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        ids, mask = self.pad(batch)
        return {"input_ids": ids, "attention_mask": mask}

    # ---- decoding ----
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; unlike HF, special tokens are skipped unless asked for (captions want that)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._cleans_up else text

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        texts = self.backend.decode_batch([[int(i) for i in x] for x in batch],
                                          skip_special_tokens=skip_special_tokens)
        return [_clean_up(t) for t in texts] if self._cleans_up else texts

    @property
    def _cleans_up(self) -> bool:
        # transformers 5 skips the clean-up for BPE models.
        return self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE"

    # ---- chat template ----
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render a conversation like HF `apply_chat_template(..., tokenize=False)`."""
        if isinstance(self.chat_template, dict) and chat_template in self.chat_template:
            template = self.chat_template[chat_template]
        else:
            template = chat_template if chat_template is not None else _pick_template(self.chat_template, None)
        variables = {**{k: v for k, v in self.special_tokens.items()}, **kwargs}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)


def _pick_template(templates: str | dict | None, name: str | None) -> str:
    if templates is None:
        raise ValueError("this tokenizer has no chat template (chat_template.jinja, chat_template.json or "
                         "tokenizer_config.json['chat_template'])")
    if isinstance(templates, str):
        return templates
    if name is not None:
        return templates[name]
    if "default" not in templates:
        raise ValueError(f"several chat templates and no 'default': {sorted(templates)}")
    return templates["default"]


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


_JINJA_ENV = None


def _jinja_env():
    """HF's chat-template environment: sandboxed, trim_blocks + lstrip_blocks, loop controls, json `tojson`,
    `raise_exception`, `strftime_now`, and a pass-through `{% generation %}` block."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        import datetime

        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _JINJA_ENV = env
    return _JINJA_ENV


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False, **variables) -> str:
    """Render `template` with `messages` the way transformers does (tools/documents default to None)."""
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return _compiled_template(template).render(messages=[dict(m) for m in messages],
                                               add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=32)
def _compiled_template(template: str):
    """Each distinct template is compiled once (compiling costs far more than rendering)."""
    return _jinja_env().from_string(template)


def load_chat_template(path: str | os.PathLike, tokenizer_config: Mapping[str, Any] | None = None
                       ) -> str | dict | None:
    """`chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json["chat_template"]`."""
    path = os.fspath(path)
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(json_file):
        data = _read_json(json_file)
        if not isinstance(data, dict) or "chat_template" not in data:
            raise ValueError(f"{json_file} has no 'chat_template' key")
        return data["chat_template"]
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}
    return template


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `Tokenizer` from an HF directory (`tokenizer.json` + `tokenizer_config.json` /
    `special_tokens_map.json` / chat template files)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    path = os.fspath(path)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    backend = Backend.from_file(tok_file)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    config = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
    map_file = os.path.join(path, "special_tokens_map.json")
    special_map = _read_json(map_file) if os.path.isfile(map_file) else {}
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name, special_map.get(name))
        special[name] = _token_content(value)
    extra = config.get("extra_special_tokens") or {}
    extra = {k: _token_content(v) for k, v in extra.items()} if isinstance(extra, Mapping) else {}

    padding_side = config.get("padding_side")
    if padding_side is None:
        padding_side = backend.padding["direction"] if backend.padding else "right"
    tokenizer = Tokenizer(backend, special_tokens=special, padding_side=padding_side,
                          chat_template=load_chat_template(path, config),
                          clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                          extra_special_tokens=extra)
    # transformers rebuilds the post-processor when add_bos_token / add_eos_token are given explicitly.
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        add_bos = bool(config.get("add_bos_token", False)) and tokenizer.bos_token is not None
        add_eos = bool(config.get("add_eos_token", False)) and tokenizer.eos_token is not None
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = ([(bos, tokenizer.bos_token_id)] if add_bos else []) + \
                   ([(eos, tokenizer.eos_token_id)] if add_eos else [])
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tokenizer


def apply_chat_template(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                        add_generation_prompt: bool = False, **kwargs) -> str:
    """Module-level form of `Tokenizer.apply_chat_template`."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Sentence segmentation on text
# ---------------------------------------------------------------------------------------------------------

OPENERS = frozenset("\"'([{«“‘")
CLOSERS = frozenset("\"')]}»”’")
TERMINALS = frozenset(".!?…")
TAIL_CHARS = TERMINALS | CLOSERS
NEVER_END = frozenset({
    "mr", "mrs", "ms", "messrs", "dr", "prof", "rev", "hon", "gen", "col", "lt", "sgt", "capt", "cmdr", "gov",
    "sen", "pres", "e.g", "i.e", "cf", "vs", "viz", "approx", "fig", "figs", "eq", "ca", "resp",
})
MAYBE_END = frozenset({
    "etc", "inc", "ltd", "co", "corp", "jr", "sr", "st", "ave", "blvd", "rd", "mt", "ft", "no", "al", "esp",
})


def _split_word(word: str) -> tuple[str, str]:
    """(body, tail) of a word: leading openers dropped, tail = longest suffix of `TAIL_CHARS`."""
    w = word.lstrip("".join(OPENERS))
    i = len(w)
    while i > 0 and w[i - 1] in TAIL_CHARS:
        i -= 1
    return w[:i], w[i:]


def _dots(tail: str) -> int:
    return tail.count(".") + 2 * tail.count("…")


def _word_ends(word: str, next_word: str) -> bool:
    """Does a sentence end after `word` when `next_word` follows (rules in the module docstring)?"""
    body, tail = _split_word(word)
    if "!" in tail or "?" in tail:
        return True
    dots = _dots(tail)
    next_not_lower = not next_word[0].islower()
    if dots >= 2:
        return next_not_lower
    if dots == 0:
        return False
    low = body.lower()
    if low in NEVER_END or (len(body) == 1 and body.isalpha()):
        return False
    if low in MAYBE_END or (any(c in ".…" for c in body) and any(c.isalpha() for c in body)):
        return next_not_lower
    return True


def _words(text: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, c in enumerate(text):
        if c.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(text)))
    return spans


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (each stripped, internal whitespace kept); see the module docstring."""
    words = _words(text)
    out, start, has_letter = [], None, False
    for k, (s, e) in enumerate(words):
        if start is None:
            start = s
        has_letter = has_letter or any(c.isalpha() for c in text[s:e])
        if k + 1 < len(words) and has_letter and _word_ends(text[s:e], text[words[k + 1][0]:words[k + 1][1]]):
            out.append(text[start:e])
            start, has_letter = None, False
    if start is not None:
        out.append(text[start:words[-1][1]])
    return out


# ---------------------------------------------------------------------------------------------------------
# Sentence segmentation on tokens (jit-friendly)
# ---------------------------------------------------------------------------------------------------------
# A word's body is tracked by two 32-bit polynomial hashes of its lower-cased characters (abbreviation
# look-up) plus its length and letter/dot flags; its tail by its own hashes and powers (a tail followed by
# more body characters joins the body: "e." + "g" -> "e.g") and its dot count and '!'/'?' flag.

_BASES = (1000003, 91138233)  # odd multipliers, arithmetic mod 2**32
_M32 = 0xFFFFFFFF

# int32 columns of SentenceEndTable.flags
KIND, LEAD_WS, TRAIL_WS, HAS_CORE, FIRST_NOT_LOWER, HAS_ALPHA = range(6)
X_NONEMPTY, X_LEN, X_ALPHA, X_DOT, Y_LEN, Y_DOTS, Y_STRONG = range(7)  # + 6 + 7 * variant
N_FLAGS = 6 + 2 * 7
# uint32 columns of SentenceEndTable.hashes: x hash (2), x power (2), y hash (2), y power (2); + 8 * variant
N_HASHES = 16
KIND_SKIP, KIND_TEXT, KIND_EOS = 0, 1, 2


def _hash(s: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h1, h2), (B1^n, B2^n)) of the lower-cased code points of s."""
    hs, ps = [0, 0], [1, 1]
    for ch in s:
        for cp in ch.lower():
            for k, b in enumerate(_BASES):
                hs[k] = (hs[k] * b + ord(cp) + 1) & _M32
                ps[k] = (ps[k] * b) & _M32
    return (hs[0], hs[1]), (ps[0], ps[1])


def _core_split(core: str) -> tuple[str, str]:
    """(x, y) of a token's characters: y = longest `TAIL_CHARS` suffix."""
    i = len(core)
    while i > 0 and core[i - 1] in TAIL_CHARS:
        i -= 1
    return core[:i], core[i:]


class SentenceEndTable(NamedTuple):
    """Per-token features (numpy; a pytree, so it can be passed into jit) for `sentence_boundary`."""

    flags: np.ndarray    # int32 [V, N_FLAGS]
    hashes: np.ndarray   # uint32 [V, N_HASHES]
    never: np.ndarray    # uint32 [n, 2]: hashes of NEVER_END bodies
    maybe: np.ndarray    # uint32 [m, 2]: hashes of MAYBE_END bodies

    @classmethod
    def from_surfaces(cls, surfaces: Sequence[str | None], eos_ids: Iterable[int] = ()) -> "SentenceEndTable":
        """From each token's decoded text in context (None or "" = invisible token)."""
        V = len(surfaces)
        flags = np.zeros((V, N_FLAGS), np.int32)
        hashes = np.zeros((V, N_HASHES), np.uint32)
        openers = "".join(OPENERS)
        for v, s in enumerate(surfaces):
            if not s:
                continue
            f = flags[v]
            f[KIND] = KIND_TEXT
            core = s.strip()
            f[LEAD_WS] = s[0].isspace()
            f[TRAIL_WS] = s[-1].isspace()
            f[HAS_CORE] = bool(core)
            if not core:
                continue
            f[FIRST_NOT_LOWER] = not core[0].islower()
            f[HAS_ALPHA] = any(c.isalpha() for c in core)
            for variant, text in enumerate((core, core.lstrip(openers))):
                x, y = _core_split(text)
                o = 6 + 7 * variant
                f[o + X_NONEMPTY] = bool(x)
                f[o + X_LEN] = len(x)
                f[o + X_ALPHA] = any(c.isalpha() for c in x)
                f[o + X_DOT] = any(c in ".…" for c in x)
                f[o + Y_LEN] = len(y)
                f[o + Y_DOTS] = _dots(y)
                f[o + Y_STRONG] = "!" in y or "?" in y
                (xh, xp), (yh, yp) = _hash(x), _hash(y)
                hashes[v, 8 * variant: 8 * variant + 8] = xh + xp + yh + yp
        for e in eos_ids:
            if e is not None and 0 <= e < V:
                flags[e] = 0
                flags[e, KIND] = KIND_EOS
        never = np.array([_hash(w)[0] for w in sorted(NEVER_END)], np.uint32)
        maybe = np.array([_hash(w)[0] for w in sorted(MAYBE_END)], np.uint32)
        return cls(flags, hashes, never, maybe)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, extra_eos_ids: Iterable[int] = ()) -> "SentenceEndTable":
        """Surfaces from the tokenizer's decoder: the text token v adds after an anchor word, as in
        `decode(ids)` with special tokens skipped. EOS ends a sentence; other special tokens are invisible."""
        return cls.from_surfaces(token_surfaces(tokenizer), [tokenizer.eos_token_id, *extra_eos_ids])


def sentence_end_table(tokenizer: Tokenizer, extra_eos_ids: Iterable[int] = ()) -> SentenceEndTable:
    return SentenceEndTable.from_tokenizer(tokenizer, extra_eos_ids)


def token_surfaces(tokenizer: Tokenizer) -> list[str]:
    """The text each id contributes to `tokenizer.decode` in the middle of a sequence ("" for special tokens)."""
    V = tokenizer.vocab_size
    specials = tokenizer.special_ids
    anchor, anchor_text = None, None
    for i in range(min(V, 100000)):
        if i in specials:
            continue
        t = tokenizer.decode([i])
        if t and t.isalnum():
            anchor, anchor_text = i, t
            break
    if anchor is None:
        raise ValueError("no alphanumeric token to anchor token surfaces")
    pairs = tokenizer.decode_batch([[anchor, i] for i in range(V)])
    alone = None
    out = []
    for i, p in enumerate(pairs):
        if i in specials:
            out.append("")
        elif p.startswith(anchor_text):
            out.append(p[len(anchor_text):])
        else:
            alone = alone or tokenizer.decode_batch([[j] for j in range(V)])
            out.append(alone[i])
    return out


class SentenceState(NamedTuple):
    """Per-row segmentation state (all [B] except the [B, 2] hashes)."""

    body_h: Any      # uint32 [B, 2]
    body_len: Any    # int32
    body_alpha: Any  # bool
    body_dot: Any    # bool
    tail_h: Any      # uint32 [B, 2]
    tail_p: Any      # uint32 [B, 2]
    tail_len: Any    # int32
    tail_dots: Any   # int32
    tail_strong: Any  # bool
    word_closed: Any  # bool: whitespace seen after the last word
    sent_alpha: Any   # bool: the current sentence has a letter


def init_sentence_state(batch: int, xp=np) -> SentenceState:
    """The state at the start of a text, for `batch` rows (`xp` = numpy or jax.numpy)."""
    def zeros(dtype, shape=(batch,)):
        return xp.zeros(shape, dtype)

    return SentenceState(
        body_h=zeros(xp.uint32, (batch, 2)), body_len=zeros(xp.int32), body_alpha=zeros(bool), body_dot=zeros(bool),
        tail_h=zeros(xp.uint32, (batch, 2)), tail_p=xp.ones((batch, 2), xp.uint32), tail_len=zeros(xp.int32),
        tail_dots=zeros(xp.int32), tail_strong=zeros(bool), word_closed=zeros(bool), sent_alpha=zeros(bool))


def _xp_of(x):
    return np if isinstance(x, (np.ndarray, np.generic, int)) else __import__("jax").numpy


def _in_set(h, table, xp):
    return xp.any((h[:, None, 0] == table[None, :, 0]) & (h[:, None, 1] == table[None, :, 1]), axis=1)


def sentence_boundary(table: SentenceEndTable, state: SentenceState, tok) -> tuple[SentenceState, Any]:
    """One step for tokens `tok` [B] (int32): (new state, ended [B] bool). `ended[b]` means the sentence of
    row b ended *before* `tok` (tok starts the next word of a new sentence, or is EOS). Pure numpy or
    jax.numpy (chosen from `tok`), so a jitted sampler can carry `state` through its loop."""
    xp = _xp_of(tok)
    f = xp.asarray(table.flags)[tok]
    hsh = xp.asarray(table.hashes)[tok]
    kind = f[:, KIND]
    is_eos, is_skip = kind == KIND_EOS, kind == KIND_SKIP
    has_core = f[:, HAS_CORE] > 0
    s = state

    # Decide for the finished word, now that the next word's first character is known.
    new_word = has_core & (s.word_closed | (f[:, LEAD_WS] > 0))
    nnl = f[:, FIRST_NOT_LOWER] > 0
    never = _in_set(s.body_h, xp.asarray(table.never), xp) | ((s.body_len == 1) & s.body_alpha)
    maybe = _in_set(s.body_h, xp.asarray(table.maybe), xp) | (s.body_dot & s.body_alpha)
    single = xp.where(never, False, xp.where(maybe, nnl, True))
    word_end = s.tail_strong | ((s.tail_dots >= 2) & nnl) | ((s.tail_dots == 1) & single)
    ended = (new_word & s.sent_alpha & word_end) | is_eos

    # Start a new word (or keep the current one), then add this token's characters to it.
    reset = new_word | is_eos
    body_h = xp.where(reset[:, None], xp.zeros_like(s.body_h), s.body_h)
    body_len = xp.where(reset, 0, s.body_len)
    body_alpha = s.body_alpha & ~reset
    body_dot = s.body_dot & ~reset
    tail_h = xp.where(reset[:, None], xp.zeros_like(s.tail_h), s.tail_h)
    tail_p = xp.where(reset[:, None], xp.ones_like(s.tail_p), s.tail_p)
    tail_len = xp.where(reset, 0, s.tail_len)
    tail_dots = xp.where(reset, 0, s.tail_dots)
    tail_strong = s.tail_strong & ~reset

    empty = (body_len == 0) & (tail_len == 0)
    o = xp.where(empty, 6 + 7, 6)[:, None]
    fv = xp.take_along_axis(f, o + xp.arange(7)[None, :], axis=1)
    hv = xp.take_along_axis(hsh, xp.where(empty, 8, 0)[:, None] + xp.arange(8)[None, :], axis=1)
    x_h, x_p, y_h, y_p = hv[:, 0:2], hv[:, 2:4], hv[:, 4:6], hv[:, 6:8]
    use_x = has_core & (fv[:, X_NONEMPTY] > 0)
    grow = has_core[:, None]
    # with x: body <- body + tail + x; tail <- y.   without x: tail <- tail + y.
    joined = (body_h * tail_p + tail_h) * x_p + x_h
    body_h = xp.where(use_x[:, None], joined, body_h)
    body_len = xp.where(use_x, body_len + tail_len + fv[:, X_LEN], body_len)
    body_alpha = body_alpha | (use_x & (fv[:, X_ALPHA] > 0))
    body_dot = body_dot | (use_x & ((tail_dots > 0) | (fv[:, X_DOT] > 0)))
    tail_h = xp.where(use_x[:, None], y_h, xp.where(grow, tail_h * y_p + y_h, tail_h))
    tail_p = xp.where(use_x[:, None], y_p, xp.where(grow, tail_p * y_p, tail_p))
    tail_len = xp.where(use_x, fv[:, Y_LEN], xp.where(has_core, tail_len + fv[:, Y_LEN], tail_len))
    tail_dots = xp.where(use_x, fv[:, Y_DOTS], xp.where(has_core, tail_dots + fv[:, Y_DOTS], tail_dots))
    tail_strong = xp.where(use_x, fv[:, Y_STRONG] > 0, tail_strong | (has_core & (fv[:, Y_STRONG] > 0)))

    word_closed = xp.where(is_skip, s.word_closed, xp.where(has_core, f[:, TRAIL_WS] > 0, ~is_eos))
    sent_alpha = (s.sent_alpha & ~ended) | (has_core & (f[:, HAS_ALPHA] > 0))
    new = SentenceState(body_h.astype(xp.uint32), body_len.astype(xp.int32), body_alpha, body_dot,
                        tail_h.astype(xp.uint32), tail_p.astype(xp.uint32), tail_len.astype(xp.int32),
                        tail_dots.astype(xp.int32), tail_strong, word_closed, sent_alpha)
    return new, ended


def sentence_ends(token_ids: Sequence[int], table: SentenceEndTable) -> np.ndarray:
    """bool [T]: `ended` of `sentence_boundary` at every token of one sequence (host, pure Python loop;
    the same rules as the array version, ~30x faster than it for one sequence: ~10 us per token)."""
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    flags, hashes = table.flags[ids].tolist(), table.hashes[ids].tolist()
    never = {tuple(h) for h in table.never.tolist()}
    maybe = {tuple(h) for h in table.maybe.tolist()}
    M = _M32
    bh, blen, balpha, bdot = (0, 0), 0, False, False
    th, tp, tlen, tdots, tstrong = (0, 0), (1, 1), 0, 0, False
    closed, salpha = False, False
    out = np.zeros((len(flags),), bool)
    for t, (f, hv) in enumerate(zip(flags, hashes)):
        kind = f[KIND]
        if kind == KIND_SKIP:
            continue
        if kind == KIND_EOS:
            out[t] = True
            bh, blen, balpha, bdot = (0, 0), 0, False, False
            th, tp, tlen, tdots, tstrong = (0, 0), (1, 1), 0, 0, False
            closed, salpha = False, False
            continue
        if not f[HAS_CORE]:
            closed = True
            continue
        if closed or f[LEAD_WS]:  # a new word: decide for the previous one
            nnl = bool(f[FIRST_NOT_LOWER])
            if tstrong:
                end = True
            elif tdots >= 2:
                end = nnl
            elif tdots == 1:
                if bh in never or (blen == 1 and balpha):
                    end = False
                elif bh in maybe or (bdot and balpha):
                    end = nnl
                else:
                    end = True
            else:
                end = False
            if end and salpha:
                out[t] = True
                salpha = False
            bh, blen, balpha, bdot = (0, 0), 0, False, False
            th, tp, tlen, tdots, tstrong = (0, 0), (1, 1), 0, 0, False
        o, k = (13, 8) if blen == 0 and tlen == 0 else (6, 0)
        xh, xp, yh, yp = (hv[k], hv[k + 1]), (hv[k + 2], hv[k + 3]), (hv[k + 4], hv[k + 5]), (hv[k + 6], hv[k + 7])
        if f[o + X_NONEMPTY]:
            bh = tuple(((bh[i] * tp[i] + th[i]) * xp[i] + xh[i]) & M for i in range(2))
            blen += tlen + f[o + X_LEN]
            balpha = balpha or bool(f[o + X_ALPHA])
            bdot = bdot or tdots > 0 or bool(f[o + X_DOT])
            th, tp, tlen, tdots, tstrong = yh, yp, f[o + Y_LEN], f[o + Y_DOTS], bool(f[o + Y_STRONG])
        else:
            th = tuple((th[i] * yp[i] + yh[i]) & M for i in range(2))
            tp = tuple((tp[i] * yp[i]) & M for i in range(2))
            tlen += f[o + Y_LEN]
            tdots += f[o + Y_DOTS]
            tstrong = tstrong or bool(f[o + Y_STRONG])
        closed = bool(f[TRAIL_WS])
        salpha = salpha or bool(f[HAS_ALPHA])
    return out


def token_sentence_spans(token_ids: Sequence[int], table: SentenceEndTable) -> list[tuple[int, int]]:
    """Token spans [start, end) of the sentences of one sequence, from its first to its last token with
    visible text (so `decode(ids[start:end]).strip()` is the sentence). Tokens after an EOS start anew."""
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    ends = sentence_ends(ids, table)
    visible = (table.flags[ids, HAS_CORE] > 0) & (table.flags[ids, KIND] == KIND_TEXT)
    spans, start, last = [], None, None
    for t in range(ids.size):
        if ends[t] and start is not None:
            spans.append((start, last + 1))
            start = None
        if visible[t]:
            start = t if start is None else start
            last = t
    if start is not None:
        spans.append((start, last + 1))
    return spans
