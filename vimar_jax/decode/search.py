"""The searches, as configurations of one engine: greedy, best-of-N, CLIP-PRM / VisVM step search, ViMaR.

The engine is host-side orchestration over two narrow interfaces, so it knows models only through
"sample continuations of a token prefix" and "score sentences of an image":

- a `Policy` prefills an (image, prompt) once (`begin`) and samples candidate continuations of a caption
  prefix (`sample`), in fixed batch slots, through the jitted sampler;
- a `Scorer` prepares an image once (`begin`: the value model's image-prefix KV cache, or CLIP's image
  embedding) and scores a batch of sentences against it (`score`).

Sentences travel between them as text, which is what lets a value model trained on one policy guide
another policy with a different tokenizer (cross-model guidance).

ViMaR (SPEC §4): Stage 1 samples N·K full captions from one shared prompt prefill and keeps the one with
the best caption score (mean sentence value by default). Stage 2 values each sentence of it; sentences
below θ are weak; walking the weak ones left to right, N·K candidate sentences are sampled after the
refined prefix, and the best replaces the original when it is better (or the original is dropped when
its value is below `drop_below`). Then new sentences are appended while the best candidate is not EOS,
not a repeat, clears θ, and the cap allows. The caption lives in a static-shape `CaptionBuffer` whose
jitted `splice`/`append` never recompile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol, Sequence

import numpy as np

from vimar_jax.decode.buffer import CaptionBuffer, append, splice
# The search settings live in a module without jax (command-line parsers use them); re-exported here.
from vimar_jax.decode.config import CAPTION_SCORES, METHODS, STAGE2_MODES, SearchConfig  # noqa: F401


@dataclasses.dataclass
class Samples:
    """Candidates from one `Policy.sample` call: generated tokens only (no prompt, no EOS)."""
    tokens: list[list[int]]
    ended: list[bool]            # the row stopped at EOS (the caption is finished after it)
    decoded: int                 # tokens decoded by the call, all rows together


class Policy(Protocol):
    def begin(self, image: Any, prompt: str) -> Any: ...

    def sample(self, ctx: Any, prefix: Sequence[int], temperatures: np.ndarray, *, top_p: float, top_k: int,
               stop: str, max_new_tokens: int, seed: int) -> Samples:
        """Continue caption `prefix` once per temperature row; stop="sentence" ends each row after one
        sentence (or at EOS), stop="eos" runs to EOS or the budget."""

    def split(self, tokens: Sequence[int]) -> list[list[int]]:
        """Sentence token spans of a caption (consistent with text segmentation)."""

    def decode(self, tokens: Sequence[int]) -> str: ...


class Scorer(Protocol):
    def begin(self, image: Any, prompt: str | None = None) -> Any:
        """Per-image context; `prompt` (the one the caption answers) is what prefix value states hold."""

    def score(self, ctx: Any, sentences: Sequence[str],
              previous: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """One score per sentence; `previous` (the caption before each sentence) for prefix states."""


@dataclasses.dataclass
class Sentence:
    text: str
    value: float | None = None
    refined: bool = False        # produced by Stage 2 (a replacement or an appended sentence)
    origin: str = "sample"       # "sample" | "replaced" | "appended" | "step"


@dataclasses.dataclass
class CaptionResult:
    method: str
    caption: str
    sentences: list[Sentence]
    seconds: float = 0.0
    tokens_decoded: int = 0
    sentences_scored: int = 0
    stage1_caption: str | None = None

    def to_json(self) -> dict:
        return {"method": self.method, "caption": self.caption,
                "sentences": [{"text": s.text, "value": s.value, "refined": s.refined, "origin": s.origin}
                              for s in self.sentences],
                "seconds": self.seconds, "tokens_decoded": self.tokens_decoded,
                "sentences_scored": self.sentences_scored}


class _Counter:
    def __init__(self):
        self.decoded = 0
        self.scored = 0


def _join(texts: Sequence[str]) -> str:
    return " ".join(t.strip() for t in texts if t.strip())


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!?")


def _aggregate(scores: np.ndarray, how: str) -> float:
    if scores.size == 0:
        return -np.inf
    return float(scores.min() if how == "min" else scores.mean())


class Engine:
    """Runs one search method for one image. Stateless across images apart from the models."""

    def __init__(self, policy: Policy, config: SearchConfig = SearchConfig(), *, value: Scorer | None = None,
                 clip: Scorer | None = None, theta: float | None = None):
        self.policy, self.cfg, self.value, self.clip = policy, config, value, clip
        self.theta = config.theta if config.theta is not None else theta

    # -- helpers -----------------------------------------------------------------------------------
    def _sample(self, pctx, prefix, stop, budget, seed, counter, temperatures=None) -> Samples:
        temps = self.cfg.candidate_temperatures() if temperatures is None else temperatures
        s = self.policy.sample(pctx, list(prefix), temps, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                               stop=stop, max_new_tokens=budget, seed=seed)
        counter.decoded += s.decoded
        return s

    def _score(self, scorer, sctx, texts, counter, previous=None) -> np.ndarray:
        if not texts:
            return np.zeros((0,), np.float32)
        counter.scored += len(texts)
        return np.asarray(scorer.score(sctx, list(texts), previous), np.float32)

    def _need(self, scorer: Scorer | None, name: str) -> Scorer:
        if scorer is None:
            raise ValueError(f"this method needs a {name} model; none was given")
        return scorer

    def _theta(self) -> float:
        if self.theta is None:
            raise ValueError("ViMaR Stage 2 needs θ: set SearchConfig.theta or load a value model with "
                             "stored value statistics")
        return float(self.theta)

    def _score_captions(self, scorer, sctx, captions: list[list[list[int]]], counter, paragraph=False):
        """Caption scores and per-sentence scores for a batch of captions, in one scoring call."""
        texts, owner, previous = [], [], []
        for c, sents in enumerate(captions):
            stexts = [self.policy.decode(s).strip() for s in sents]
            stexts = [t for t in stexts if t]
            if paragraph:
                stexts = [_join(stexts)] if stexts else []
            for j, t in enumerate(stexts):
                texts.append(t)
                owner.append(c)
                previous.append(stexts[:j])
        scores = self._score(scorer, sctx, texts, counter, previous)
        owner = np.asarray(owner, np.int64)
        per = [scores[owner == c] for c in range(len(captions))]
        how = "mean" if paragraph else self.cfg.caption_score
        return np.asarray([_aggregate(p, how) for p in per]), per

    # -- methods -----------------------------------------------------------------------------------
    def run(self, image, prompt: str, method: str) -> CaptionResult:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
        t0 = time.perf_counter()
        counter = _Counter()
        pctx = self.policy.begin(image, prompt)
        if method == "greedy":
            res = self._greedy(pctx, counter)
        elif method == "bon":
            scorer = self._need(self.clip if self.cfg.bon_scorer == "clip" else self.value, self.cfg.bon_scorer)
            res = self._best_of_n(pctx, scorer, scorer.begin(image, prompt), counter, "bon")
        elif method == "clip-search":
            clip = self._need(self.clip, "CLIP")
            res = self._step_search(pctx, clip, clip.begin(image, prompt), counter, method)
        elif method == "visvm":
            value = self._need(self.value, "value")
            res = self._step_search(pctx, value, value.begin(image, prompt), counter, method)
        else:
            value = self._need(self.value, "value")
            res = self._vimar(pctx, value, value.begin(image, prompt), counter)
        res.seconds = time.perf_counter() - t0
        res.tokens_decoded, res.sentences_scored = counter.decoded, counter.scored
        return res

    def _greedy(self, pctx, counter) -> CaptionResult:
        s = self._sample(pctx, [], "eos", self.cfg.max_new_tokens, self.cfg.seed, counter,
                         temperatures=np.zeros((1,), np.float32))
        sents = [self.policy.decode(t).strip() for t in self.policy.split(s.tokens[0])]
        sents = [t for t in sents if t]
        return CaptionResult("greedy", _join(sents), [Sentence(t) for t in sents])

    def _best_of_n(self, pctx, scorer, sctx, counter, method) -> CaptionResult:
        s = self._sample(pctx, [], "eos", self.cfg.max_new_tokens, self.cfg.seed, counter)
        caps = [self.policy.split(t) for t in s.tokens]
        paragraph = self.cfg.caption_score == "paragraph"
        scores, per = self._score_captions(scorer, sctx, caps, counter, paragraph=paragraph)
        best = int(np.argmax(scores))
        texts = [t for t in (self.policy.decode(x).strip() for x in caps[best]) if t]
        vals = per[best] if not paragraph else [None] * len(texts)
        res = CaptionResult(method, _join(texts),
                            [Sentence(t, None if v is None else float(v)) for t, v in zip(texts, vals)])
        res._tokens = caps[best]  # sentence token spans, used by Stage 2
        return res

    def _step_search(self, pctx, scorer, sctx, counter, method) -> CaptionResult:
        tokens: list[int] = []
        sents: list[Sentence] = []
        for step in range(self.cfg.max_sentences):
            s = self._sample(pctx, tokens, "sentence", self.cfg.sentence_max_tokens,
                             self.cfg.seed + 1 + step, counter)
            cand = [(i, self.policy.decode(t).strip()) for i, t in enumerate(s.tokens)]
            cand = [(i, t) for i, t in cand if t]
            if not cand:
                break
            scores = self._score(scorer, sctx, [t for _, t in cand], counter, [[x.text for x in sents]] * len(cand))
            j = int(np.argmax(scores))
            i, text = cand[j]
            tokens += s.tokens[i]
            sents.append(Sentence(text, float(scores[j]), origin="step"))
            if s.ended[i]:
                break
        return CaptionResult(method, _join(x.text for x in sents), sents)

    def _vimar(self, pctx, value, vctx, counter) -> CaptionResult:
        cfg = self.cfg
        stage1 = self._best_of_n(pctx, value, vctx, counter, "vimar")
        spans = stage1._tokens
        if cfg.stage2 == "off" or not spans:
            return stage1
        theta = self._theta()
        if cfg.caption_score == "paragraph":       # Stage 2 needs sentence values
            vals = self._score(value, vctx, [self.policy.decode(t).strip() for t in spans], counter)
        else:
            vals = np.asarray([s.value for s in stage1.sentences], np.float32)
        # Keep only non-empty sentences (their values are aligned with stage1.sentences).
        spans = [t for t in spans if self.policy.decode(t).strip()]
        capacity = sum(len(t) for t in spans) + cfg.max_append * cfg.sentence_max_tokens + \
            cfg.max_refine * cfg.sentence_max_tokens
        capacity = int(2 ** np.ceil(np.log2(max(capacity, 64))))      # bucket: fewer compilations
        buf = CaptionBuffer.from_sentences(spans, capacity)
        sents = [Sentence(t.text, t.value) for t in stage1.sentences]
        pad = np.zeros((cfg.sentence_max_tokens,), np.int32)

        def padded(tok):
            out = pad.copy()
            out[:len(tok)] = tok
            return out

        step_seed = cfg.seed + 1000
        if cfg.stage2 == "replace_append":
            weak = [k for k, v in enumerate(vals) if v < theta][:cfg.max_refine]
            removed = 0
            for k0 in weak:
                k = k0 - removed
                seg = np.asarray(buf.seg)
                prefix = np.asarray(buf.tokens)[(seg >= 0) & (seg < k)].tolist()
                step_seed += 1
                s = self._sample(pctx, prefix, "sentence", cfg.sentence_max_tokens, step_seed, counter)
                cand = [(i, self.policy.decode(t).strip()) for i, t in enumerate(s.tokens)]
                cand = [(i, t) for i, t in cand if t and len(s.tokens[i]) <= cfg.sentence_max_tokens]
                previous = [[x.text for x in sents[:k]]] * len(cand)
                scores = self._score(value, vctx, [t for _, t in cand], counter, previous)
                if len(cand) and float(scores.max()) > float(vals[k0]):
                    j = int(np.argmax(scores))
                    i, text = cand[j]
                    buf, _ = splice(buf, k, padded(s.tokens[i]), len(s.tokens[i]))
                    sents[k] = Sentence(text, float(scores[j]), refined=True, origin="replaced")
                elif cfg.drop_below is not None and float(vals[k0]) < cfg.drop_below:
                    buf, _ = splice(buf, k, pad, 0)
                    del sents[k]
                    removed += 1
        # Append while it adds value.
        for _ in range(cfg.max_append):
            prefix = np.asarray(buf.tokens)[np.asarray(buf.seg) >= 0].tolist()
            step_seed += 1
            s = self._sample(pctx, prefix, "sentence", cfg.sentence_max_tokens, step_seed, counter)
            cand = [(i, self.policy.decode(t).strip()) for i, t in enumerate(s.tokens)]
            cand = [(i, t) for i, t in cand if t and len(s.tokens[i]) <= cfg.sentence_max_tokens]
            if not cand:
                break                                   # every candidate is EOS: the caption is done
            previous = [[x.text for x in sents]] * len(cand)
            scores = self._score(value, vctx, [t for _, t in cand], counter, previous)
            j = int(np.argmax(scores))
            i, text = cand[j]
            if float(scores[j]) < theta or _norm(text) in {_norm(x.text) for x in sents}:
                break
            buf, overflow = append(buf, padded(s.tokens[i]), len(s.tokens[i]))
            if bool(overflow):
                break
            sents.append(Sentence(text, float(scores[j]), refined=True, origin="appended"))
            if s.ended[i]:
                break
        res = CaptionResult("vimar", _join(x.text for x in sents), sents, stage1_caption=stage1.caption)
        res._buffer = buf
        return res
