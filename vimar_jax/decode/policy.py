"""`LlavaPolicy`: a LLaVA-NeXT checkpoint as the search engine's `Policy` (vimar_jax.decode.search).

Per image (`begin`): the prompt is rendered with the checkpoint's chat template (or `prompt_template`),
the image preprocessed, and the prompt prefilled **once** with batch 1 into a cache of a bucketed length.
The prompt's last token is held back: every `sample` call runs it together with the caption prefix, so a
call always has at least one new token and its start logits come from the same place.

Per call (`sample(ctx, prefix, temperatures, ...)`):
1. the prompt cache is extended (as a new batch-1 cache, the prompt cache stays untouched) by slots
   holding [last prompt token] + prefix, run at a power-of-two width: by default just enough slots for
   them (a power of two, at least `MIN_EXTENSION`), so every decode step of the call attends to the
   prompt and the prefix, not to a reservation of empty slots;
2. all candidate rows decode against that extended cache through the decoder's `prefix=` (never copied per
   row), each with its own temperature, in a power-of-two number of batch rows (by default the call's
   rows rounded up: a greedy call decodes one row even in a search that samples 30) and a power-of-two
   token buffer.

So the shapes of a whole search are: prompt buckets x extension widths x extension sizes for the
extension, and (rows, buffer, prompt bucket + extension size) for the decode loop; each compiles once, and
there are few of each (powers of two). `shapes` records the buckets used (for tests and diagnostics).
`slots=` / `caption_slots=` fix the batch rows / the extension size instead (the earlier behaviour: one
decode shape per buffer for a whole search, at the price of computing unused rows and empty slots at
every step); each grows to the next power of two when a call does not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from vimar_jax.decode.generate import MIN_BUFFER, decoding, pow2_bucket, prepare_prompts
from vimar_jax.decode.sampler import Finish, Settings
from vimar_jax.decode.search import Samples
from vimar_jax.models.decoder import KVCache

STOPS = ("eos", "sentence")
MIN_EXTENSION = 32          # smallest extension of the prompt cache per call (slots)


@dataclasses.dataclass
class PolicyContext:
    """One image + prompt, prefilled: all prompt tokens but the last are in `cache` (batch 1)."""
    cache: KVCache
    length: int                 # prompt tokens (the held-back last one included)
    last_token: int
    prompt_ids: list[int]


class LlavaPolicy:
    """`vlm`: a `vimar_jax.vlm.VLM` loaded from a directory (tokenizer, processor, chat template).

    `prompt_template`: None = the checkpoint's chat template with a user turn [image, prompt] and the
    generation prompt; else a string with `<image>` (the processor's image token) and `{prompt}`.
    `slots`: None (default) = each call decodes its rows rounded up to a power of two; an int = every call
    decodes at least that many rows (a fixed batch shape), more (a power of two) when it asks for more.
    `caption_slots`: None (default) = each call extends the prompt cache by just enough slots for the
    caption prefix (a power of two >= `MIN_EXTENSION`); an int = a fixed reservation after the prompt for
    caption prefixes, doubled when a prefix does not fit. `compact`: decode with compaction (the candidate
    batch halves as its rows stop; `vimar_jax.decode.sampler`, "Compaction"): for long runs on a CPU."""

    def __init__(self, vlm, prompt_template: str | None = None, *, slots: int | None = None,
                 caption_slots: int | None = None, compact: bool = False):
        if getattr(vlm, "path", None) is None:
            raise ValueError("LlavaPolicy needs a VLM loaded from a directory (tokenizer and processor files)")
        self.vlm = vlm
        self.processor = vlm.processor
        self.tokenizer = self.processor.tokenizer
        self.rt = decoding(vlm)
        if prompt_template is not None:
            image = self.processor.image_token
            if prompt_template.count(image) != 1 or "{prompt}" not in prompt_template:
                raise ValueError(f"prompt_template must hold {image!r} once and '{{prompt}}', got {prompt_template!r}")
        self.prompt_template = prompt_template
        if slots is not None and int(slots) < 1:
            raise ValueError(f"slots must be >= 1 (or None), got {slots}")
        if caption_slots is not None and int(caption_slots) < 1:
            raise ValueError(f"caption_slots must be >= 1 (or None), got {caption_slots}")
        self.slots = None if slots is None else pow2_bucket(slots)
        self.caption_slots = None if caption_slots is None else pow2_bucket(caption_slots, MIN_BUFFER)
        self.compact = bool(compact)
        self.shapes: dict[str, set] = {"prefill": set(), "extend": set(), "decode": set()}

    # ---- Policy protocol ----
    def render(self, prompt: str) -> str:
        """The prompt text with one image placeholder (before image-token expansion)."""
        if self.prompt_template is not None:
            return self.prompt_template.replace("{prompt}", prompt)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        return self.processor.apply_chat_template([user], add_generation_prompt=True)

    def begin(self, image, prompt: str) -> PolicyContext:
        text = self.render(prompt)
        bos = self.tokenizer.bos_token
        inputs = self.processor(images=[image], texts=[text], add_special_tokens=not (bos and text.startswith(bos)))
        ids = inputs["input_ids"][0]
        if ids.shape[0] < 2 or ids[-1] == self.processor.image_token_id:
            raise ValueError(f"the rendered prompt must end with text after the image: {text!r}")
        prompts = prepare_prompts(self.vlm, ids[None, :-1], inputs["pixel_values"], inputs["image_sizes"])
        _, cache = self.rt.prefill(prompts, prompts.bucket)
        self.shapes["prefill"].add(prompts.bucket)
        return PolicyContext(cache, int(ids.shape[0]), int(ids[-1]), ids.tolist())

    def sample(self, ctx: PolicyContext, prefix: Sequence[int], temperatures, *, top_p: float = 1.0,
               top_k: int = 0, stop: str = "eos", max_new_tokens: int, seed: int = 0) -> Samples:
        if stop not in STOPS:
            raise ValueError(f"stop={stop!r}: expected one of {STOPS}")
        if stop == "sentence" and self.rt.table is None:
            raise ValueError("stop='sentence' needs the tokenizer's sentence table")
        temps = np.asarray(temperatures, np.float32).reshape(-1)
        rows, budget = temps.shape[0], int(max_new_tokens)
        if rows < 1:
            raise ValueError("sample needs at least one temperature (one row)")
        if budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        slots = pow2_bucket(rows) if self.slots is None else max(self.slots, pow2_bucket(rows))
        ext = [ctx.last_token, *map(int, prefix)]
        if self.caption_slots is None:
            extension = pow2_bucket(len(ext), MIN_EXTENSION)
        else:
            while len(ext) > self.caption_slots:
                self.caption_slots *= 2
            extension = self.caption_slots
        start, cache = self.rt.extend(ctx.cache, ext, ctx.length - 1, slots=extension)
        width = min(pow2_bucket(len(ext), 16), extension)
        self.shapes["extend"].add((ctx.cache.max_len, width, extension))
        buffer = pow2_bucket(budget, MIN_BUFFER)
        pad = slots - rows
        settings = Settings.make(slots, temperature=np.pad(temps, (0, pad)), top_k=int(top_k), top_p=float(top_p),
                                 max_new_tokens=np.pad(np.full(rows, budget, np.int32), (0, pad)),
                                 stop_after_sentences=1 if stop == "sentence" else 0, eos_ids=self.rt.eos_ids)
        self.shapes["decode"].add((slots, buffer, cache.max_len))
        state = self.rt.sampler.decode(self.rt.params, start.broadcast(slots), self.rt.new_cache(slots, buffer),
                                       settings, jax.random.key(int(seed)), buffer_size=buffer, prefix=cache,
                                       compact=self.compact)
        tokens, lengths, reason = (np.asarray(x)[:rows] for x in (state.tokens, state.lengths, state.reason))
        ended = reason == Finish.EOS
        out = [row[:n - int(e)].tolist() for row, n, e in zip(tokens, lengths, ended)]
        return Samples(out, ended.tolist(), int(lengths.sum()))

    def split(self, tokens: Sequence[int]) -> list[list[int]]:
        """Sentences of a caption as contiguous token lists (their concatenation is `tokens`): each sentence
        runs from its first visible token to the next sentence's (`text.token_sentence_spans`)."""
        from vimar_jax import text

        tokens = [int(t) for t in tokens]
        if not tokens:
            return []
        if self.rt.table is None:
            return [tokens]
        spans = text.token_sentence_spans(tokens, self.rt.table)
        starts = [0] + [s for s, _ in spans[1:]]
        ends = starts[1:] + [len(tokens)]
        return [tokens[a:b] for a, b in zip(starts, ends)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    def caption(self, image, prompt: str, *, max_new_tokens: int = 256) -> str:
        """Greedy caption of one image (a convenience around begin + sample)."""
        ctx = self.begin(image, prompt)
        s = self.sample(ctx, [], np.zeros((1,), np.float32), stop="eos", max_new_tokens=max_new_tokens)
        return self.decode(s.tokens[0]).strip()


__all__ = ["LlavaPolicy", "PolicyContext", "STOPS"]
