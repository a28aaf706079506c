"""
The training schedule, without torch: how many steps a run has and the LR multiplier at each step.

The training script and the registry's resume planner both call these functions, so the phase and
LR multiplier a resume report shows are the ones training will use. Both upstream generations are
covered: current (`warmup_steps`, warmdown 0.65, final 0.05) and classic (`warmup_ratio` 0.0,
warmdown 0.2, final 0.0); the flags are read from a checkpoint's `user_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanochat.model_config import (
    GPTConfig,
    classic_flops_per_token,
    current_config,
    flops_per_token,
    param_counts,
)

CURRENT_DEFAULTS = {"warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05}
CLASSIC_DEFAULTS = {"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0}
B_REF = 2 ** 19  # upstream's reference batch (tokens) for a d12 model when --total-batch-size=-1


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


def is_classic_user_config(user_config: dict) -> bool:
    return "warmup_ratio" in user_config and "warmup_steps" not in user_config


def schedule_from_user_config(user_config: dict, num_iterations: int) -> Schedule:
    """The LR schedule a run's flags imply (classic's warmup is a ratio of the run)."""
    if is_classic_user_config(user_config):
        d = {**CLASSIC_DEFAULTS, **{k: user_config[k] for k in CLASSIC_DEFAULTS if user_config.get(k) is not None}}
        return Schedule(num_iterations, round(d["warmup_ratio"] * num_iterations), float(d["warmdown_ratio"]),
                        float(d["final_lr_frac"]))
    d = {**CURRENT_DEFAULTS, **{k: user_config[k] for k in CURRENT_DEFAULTS if user_config.get(k) is not None}}
    return Schedule(num_iterations, int(d["warmup_steps"]), float(d["warmdown_ratio"]), float(d["final_lr_frac"]))


def derive_total_batch_size(user_config: dict, config: GPTConfig) -> int:
    """Current upstream's batch size when --total-batch-size=-1: scale 2**19 tokens (tuned for d12)
    by (target tokens / d12's target tokens) ** 0.383, rounded to a power of two."""
    ratio = float(user_config.get("target_param_data_ratio", 12))
    d12 = current_config(12, int(user_config.get("aspect_ratio", 64)), int(user_config.get("head_dim", 128)),
                         config.sequence_len, config.vocab_size, config.window_pattern)
    d_ref = ratio * param_counts(d12)["scaling"]
    target_tokens = ratio * param_counts(config)["scaling"]
    return 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))


def resolve_num_iterations(user_config: dict, config: GPTConfig, total_batch_size: int | None = None) -> int | None:
    """Steps a run trains for, exactly as upstream base_train resolves them; None when the flags
    do not determine it (e.g. a data ratio of 0 with no other rule)."""
    num = user_config.get("num_iterations")
    if isinstance(num, (int, float)) and num > 0:
        return int(num)
    tbs = total_batch_size or user_config.get("total_batch_size")
    if not tbs or tbs <= 0:
        if is_classic_user_config(user_config):
            return None
        tbs = derive_total_batch_size(user_config, config)
    target_flops = user_config.get("target_flops") or -1
    classic = is_classic_user_config(user_config) or config.is_classic
    if target_flops > 0:
        fpt = classic_flops_per_token(config) if classic else flops_per_token(config)
        return round(target_flops / (fpt * tbs))
    ratio = user_config.get("target_param_data_ratio")
    if ratio is None or ratio <= 0:
        return None
    counts = param_counts(config)
    params = counts["total"] if classic else counts["scaling"]
    return int(ratio * params) // tbs


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
