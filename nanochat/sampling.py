"""
What a sampling request and its answer are, as plain values: `SamplingSettings` (with its one-line
validation), `TraceOptions`, `SamplingError`, and the result types `RowResult`, `StepTrace`,
`Alternative` and `WatchedToken`.

Torch-free on purpose: the engine (`engine.py`, which imports torch) samples with these types and
re-exports them, and the app, the command-line explorer and the tests build and read them without
importing torch. The settings are keyword-only, so a field added later can never shift another
positional value (a new filter before `seed` silently changing every seed); across layers they travel
as the dataclass itself or as its `as_dict()` (rebuilt with `SamplingSettings(**d)`).

No sampling math and no display here: see `engine.py` for the first and `streamlit_app/traces.py` /
`tools/generation_explorer.py` for the second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MAX_SEED = 2**63 - 1
FINISH_STOP = "stop"  # the row produced a stop token (included as its last token)
FINISH_LENGTH = "length"  # the row reached max_tokens


class SamplingError(ValueError):
    """A sampling request that cannot be run, with a one-line reason."""


# ---------------------------------------------------------------------- the request


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How one row samples. top_k None (or 0) and top_p 1 and min_p 0 switch that filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 42

    def validate(self) -> SamplingSettings:
        """Return self, or raise SamplingError naming the first bad value."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise SamplingError(f"top_k must be an integer >= 0 or None (0 and None: no top-k), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1: no top-p), got {p!r}")
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise SamplingError(f"min_p must be in [0, 1) (0: no min-p), got {m!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise SamplingError(f"seed must be an integer in [0, 2**63 - 1], got {s!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self, seed: bool = True) -> str:
        """One line, e.g. 'temperature=0.9 top_k=50 top_p=1 min_p=0 seed=42'."""
        k = "none" if not self.top_k else str(self.top_k)
        text = f"temperature={self.temperature:g} top_k={k} top_p={self.top_p:g} min_p={self.min_p:g}"
        return f"{text} seed={self.seed}" if seed else text

    def as_dict(self) -> dict:
        """Every field by name; `SamplingSettings(**d)` rebuilds the same settings."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TraceOptions:
    """What to record per step: the top_n alternatives (by model probability) and watched token ids."""

    top_n: int = 5
    watch: tuple[int, ...] = ()


# ---------------------------------------------------------------------- the answer


@dataclass(frozen=True, slots=True)
class Alternative:
    token_id: int
    model_prob: float  # temperature 1, no filters
    sampled_prob: float  # under the distribution the row sampled from (0 when filtered out)
    kept: bool  # survived temperature/top-k/top-p/min-p (greedy: only the argmax)


@dataclass(frozen=True, slots=True)
class WatchedToken:
    token_id: int
    rank: int  # 1 + the number of tokens the model finds strictly more probable
    model_prob: float


@dataclass(frozen=True, slots=True)
class StepTrace:
    step: int  # 0-based generated position
    token_id: int
    model_prob: float
    sampled_prob: float
    rank: int
    forced: bool  # emitted as told (a branch's forced token) or by the tool loop, not sampled
    entropy: float  # of the model's full-vocabulary distribution at temperature 1, in nats
    alternatives: tuple[Alternative, ...]
    watched: tuple[WatchedToken, ...]
    tool_output: bool = False  # emitted by the engine's tool loop (the calculator's output block)


@dataclass(frozen=True)
class RowResult:
    row: int
    settings: SamplingSettings
    token_ids: tuple[int, ...]  # every generated token, a final stop token included
    text: str  # the decoded tokens, without a final stop token
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH
    trace: tuple[StepTrace, ...] | None  # one per token, when traced
