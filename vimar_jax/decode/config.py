"""Search settings (`SearchConfig`) and the names of the searches and their options: numpy only, no jax, so
that `vimar --help` and the argument parsers stay fast. `vimar_jax.decode.search` re-exports all of it."""

from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("greedy", "bon", "clip-search", "visvm", "vimar")
STAGE2_MODES = ("off", "append_only", "replace_append")
CAPTION_SCORES = ("mean", "min", "paragraph")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    temperatures: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)   # N settings
    samples_per_temperature: int = 6                                 # K samples each
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256          # budget of one full caption
    sentence_max_tokens: int = 64      # budget of one candidate sentence
    max_sentences: int = 12            # cap of step search
    theta: float | None = None         # weak-sentence threshold; None: the value model's default
    theta_percentile: float | None = None  # or θ = this percentile of the value model's stored statistics
    max_refine: int = 8                # at most this many weak segments are re-sampled
    max_append: int = 4                # at most this many sentences appended
    stage2: str = "replace_append"     # "off" | "append_only" (released code) | "replace_append" (paper)
    caption_score: str = "mean"        # Stage 1 / best-of-N caption score from sentence scores
    drop_below: float | None = None    # drop a weak sentence with no better candidate below this value
    bon_scorer: str = "clip"           # best-of-N picks by "clip" or "value"
    seed: int = 0
    compact_decode: bool = False       # candidate batches shrink as rows stop (CPU: faster steps, longer compiles)

    def __post_init__(self):
        if self.stage2 not in STAGE2_MODES:
            raise ValueError(f"stage2={self.stage2!r}: expected one of {STAGE2_MODES}")
        if self.caption_score not in CAPTION_SCORES:
            raise ValueError(f"caption_score={self.caption_score!r}: expected one of {CAPTION_SCORES}")
        if self.bon_scorer not in ("clip", "value"):
            raise ValueError(f"bon_scorer={self.bon_scorer!r}: expected 'clip' or 'value'")
        if self.theta_percentile is not None:
            if self.theta is not None:
                raise ValueError("give theta or theta_percentile, not both")
            if not 0 <= self.theta_percentile <= 100:
                raise ValueError(f"theta_percentile={self.theta_percentile}: expected a percentile in [0, 100]")
        if self.max_refine < 0 or self.max_append < 0:
            raise ValueError(f"max_refine={self.max_refine}, max_append={self.max_append}: expected >= 0")
        if not self.temperatures or self.samples_per_temperature < 1:
            raise ValueError("need at least one temperature and one sample per temperature")

    @property
    def num_candidates(self) -> int:
        return len(self.temperatures) * self.samples_per_temperature

    def candidate_temperatures(self) -> np.ndarray:
        return np.repeat(np.asarray(self.temperatures, np.float32), self.samples_per_temperature)
