"""
The training schedule, without torch: how many steps a run has and the LR multiplier at each step.

The training script and the registry's resume planner both call these functions, so the phase and
LR multiplier a resume report shows are the ones training will use. The flags' defaults and the rules
that derive the number of steps live in `train_config.py`. Both upstream generations are
covered: current (`warmup_steps`, warmdown 0.65, final 0.05) and classic (`warmup_ratio` 0.0,
warmdown 0.2, final 0.0); the flags are read from a checkpoint's `user_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.model_config import GPTConfig
from nanochat.train_config import (
    BASE_TRAIN,
    CLASSIC_DEFAULTS,
    is_classic_user_config,
    resolve_num_iterations,
)

SCHEDULE_FLAGS = ("warmup_steps", "warmdown_ratio", "final_lr_frac")
CLASSIC_SCHEDULE_FLAGS = ("warmup_ratio", "warmdown_ratio", "final_lr_frac")


@dataclass(frozen=True)
class Schedule:
    num_iterations: int
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float

    @property
    def warmdown_iters(self) -> int:
        return round(self.warmdown_ratio * self.num_iterations)

    @property
    def warmdown_start(self) -> int:
        """The last step at multiplier 1.0; warmdown runs after it."""
        return self.num_iterations - self.warmdown_iters

    def lr_multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step <= self.warmdown_start:
            return 1.0
        progress = (self.num_iterations - step) / self.warmdown_iters
        return progress * 1.0 + (1 - progress) * self.final_lr_frac

    def phase(self, step: int) -> str:
        """"warmup", "constant", "warmdown", or "done" once step >= num_iterations."""
        if step >= self.num_iterations:
            return "done"
        if step < self.warmup_steps:
            return "warmup"
        return "constant" if step <= self.warmdown_start else "warmdown"


def schedule_from_user_config(user_config: dict, num_iterations: int) -> Schedule:
    """The LR schedule a run's flags imply (classic's warmup is a ratio of the run)."""
    if is_classic_user_config(user_config):
        d = {k: CLASSIC_DEFAULTS[k] if user_config.get(k) is None else user_config[k] for k in CLASSIC_SCHEDULE_FLAGS}
        return Schedule(num_iterations, round(d["warmup_ratio"] * num_iterations), float(d["warmdown_ratio"]),
                        float(d["final_lr_frac"]))
    defaults = BASE_TRAIN.defaults()
    d = {k: defaults[k] if user_config.get(k) is None else user_config[k] for k in SCHEDULE_FLAGS}
    return Schedule(num_iterations, int(d["warmup_steps"]), float(d["warmdown_ratio"]), float(d["final_lr_frac"]))


def resolve_from_meta(meta: dict, config: GPTConfig | None = None) -> int | None:
    """num_iterations of a checkpoint's run: our meta records it; upstream's is recomputed from
    user_config (and the model_config when a rule needs the parameter count)."""
    if isinstance(meta.get("num_iterations"), int) and meta["num_iterations"] > 0:
        return meta["num_iterations"]
    user = meta.get("user_config") or {}
    if config is None:
        mc = meta.get("model_config") or {}
        try:
            if "window_pattern" in mc or not is_classic_user_config(user):
                config = GPTConfig(**{"window_pattern": "L", **mc})
            else:
                config = GPTConfig.classic(**mc)
        except (TypeError, KeyError, ValueError):
            num = user.get("num_iterations")
            return int(num) if isinstance(num, (int, float)) and num > 0 else None
    return resolve_num_iterations(user, config, meta.get("total_batch_size"))
