"""
The learning-rate range test's arithmetic, without torch: the sweep's multipliers, upstream's debiased
loss smoothing, the divergence rule, and the two classic suggestions.

`scripts/lr_find.py` runs the sweep (real optimizer steps) and calls these; the app's LR finder page
calls the same functions on the curve the registry stored, so the suggestion it shows is the one the
script printed. Not here: training, files, the registry.

The suggestions (Smith 2015, "Cyclical Learning Rates", and fastai's `lr_find`):
- **min/10**: the multiplier where the smoothed loss is lowest, divided by 10 (the classic rule: the
  minimum sits at the edge of instability, a tenth of it is safely inside);
- **steepest**: where the smoothed loss falls fastest against log(multiplier).
Both read a few dozen steps from one initialisation: a starting point for a short grid, not the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.9  # upstream base_train's EMA of the train loss (debiased by 1 - 0.9^(i+1))
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds 4x its minimum (fastai's rule) ...
# ... or climbs back above where the sweep started after improving by this fraction: nanochat's logits are
# soft-capped at 15, so from a loss near ln(vocab) a diverged run rarely reaches 4x its minimum.
IMPROVED = 0.02
MIN_STEPS = 5
MAX_STEPS = 10_000
MULT_RANGE = (1e-6, 1e6)  # multipliers of base_train's learning rates that make sense at all
SKIP_START = 0.1  # the steepest slope ignores the first 10% of the sweep (the EMA is still settling)
CAVEAT = ("A range test reads a few dozen steps from one initialisation. Its suggestion is a starting point for a "
          "short grid (e.g. 0.5x, 1x, 2x of it over two seeds), not the optimum: its own authors call it fragile, "
          "and the best multiplier for a long run is usually lower than for the first steps.")
GROUPS = ("all", "embedding", "unembedding", "matrix", "scalar")


class LRFindError(ValueError):
    """Sweep settings that cannot give a useful curve; the message is one line."""


def check_bounds(min_mult: float, max_mult: float, steps: int) -> None:
    lo, hi = MULT_RANGE
    for name, v in (("--min-lr-mult", min_mult), ("--max-lr-mult", max_mult)):
        if not math.isfinite(v) or not lo <= v <= hi:
            raise LRFindError(f"{name} {v:g} is outside {lo:g}..{hi:g} (a multiplier of base_train's learning rates)")
    if max_mult <= min_mult:
        raise LRFindError(f"--max-lr-mult {max_mult:g} must be larger than --min-lr-mult {min_mult:g}")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise LRFindError(f"--steps {steps} is outside {MIN_STEPS}..{MAX_STEPS}")


def multipliers(min_mult: float, max_mult: float, steps: int) -> list[float]:
    """An exponential sweep: step i uses min * (max/min)^(i/(steps-1))."""
    check_bounds(min_mult, max_mult, steps)
    ratio = max_mult / min_mult
    return [min_mult * ratio ** (i / (steps - 1)) for i in range(steps)]


def smoothed(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Upstream's EMA of the loss, debiased (the first values are not pulled towards 0)."""
    out, ema = [], 0.0
    for i, loss in enumerate(losses):
        ema = beta * ema + (1 - beta) * loss
        out.append(ema / (1 - beta ** (i + 1)))
    return out


def diverged(smooth: list[float], factor: float = DIVERGE_FACTOR) -> bool:
    """Whether the sweep should stop: a non-finite loss; the smoothed loss above factor x its minimum; or,
    once it had improved by IMPROVED of its start, back above the start (all it learned is undone)."""
    if not smooth:
        return False
    last, start, best = smooth[-1], smooth[0], min(smooth)
    if not math.isfinite(last):
        return True
    return last > factor * best or (start - best > IMPROVED * start and last > start)


@dataclass(frozen=True)
class Suggestion:
    min_over_10: float | None  # multiplier at the smoothed loss's minimum, / 10
    steepest: float | None  # multiplier where the smoothed loss falls fastest against log(multiplier)
    min_loss_mult: float | None  # where the smoothed loss was lowest
    min_loss: float | None
    caveat: str = CAVEAT

    def as_dict(self) -> dict:
        return {"min_over_10": self.min_over_10, "steepest": self.steepest, "min_loss_mult": self.min_loss_mult,
                "min_loss": self.min_loss, "caveat": self.caveat}


def suggest(mults: list[float], smooth: list[float]) -> Suggestion:
    """Both suggestions from a sweep's multipliers and smoothed losses (non-finite points ignored)."""
    pts = [(m, s) for m, s in zip(mults, smooth) if math.isfinite(s) and m > 0]
    if len(pts) < 3:
        return Suggestion(None, None, None, None)
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    min_mult, min_loss = pts[best]
    # the steepest slope before the minimum: the curve after it is the divergence
    start = int(len(pts) * SKIP_START)
    window = pts[start:best + 1]
    steepest = None
    if len(window) >= 3:
        xs = [math.log(m) for m, _ in window]
        slopes = [(window[i + 1][1] - window[i - 1][1]) / (xs[i + 1] - xs[i - 1]) for i in range(1, len(window) - 1)]
        steepest = window[1 + min(range(len(slopes)), key=slopes.__getitem__)][0]
    return Suggestion(min_mult / 10, steepest, min_mult, min_loss)
