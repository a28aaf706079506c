"""
Training throughput of scripts.base_train on CPU: eager and torch.compile'd, with and without the
determinism switches exact resume needs, at two scales, measured side by side.

    .venv/bin/python -m bench.train [--steps 20] [--warmup 3] [--threads N] [--configs fixture,demo]

Configurations (vocab 2,048, window pattern SSSL, aspect ratio 32, head dim 32):
- `fixture`: upstream's fixture (tests/fixtures/upstream/current): depth 2, sequence 128, device batch 8, total
  2,048 tokens = 2 micro-steps, 300 planned steps; upstream printed about 52,000 tok/s on 2 cores compiled;
- `demo`: the demo's scale (scripts/demo.py, SSSL): depth 4, sequence 256, batch 16 x 256 = 4,096 tokens,
  250 planned steps (the demo's d4 run); upstream's base_train (always compiled) made 12,861 tok/s on a quiet
  2-core machine where ours eager made 11,659 (issue 15).

Each side builds a fresh model and optimizer and runs base_train's own `train_step` (data loading from
parquet shards included, as in upstream's tok/sec) on a temporary base dir made from the bundled corpus:
eager and compiled, each with base_train's determinism switches (`exact_kernels`, the default mode) and
without them (`_fast`). The sides step in turn, so a busy machine slows all alike. Reported per
configuration: median tok/s over `--steps` steps after `--warmup`, the compile time with an empty inductor
cache (first compiled step minus a median step), the steps after which compiling pays for itself, what
`--compile auto` chooses for the planned steps, the estimated run time of that choice and of always
compiling (upstream's), and `exactness_cost`: the default mode's step time over the fastest side without
determinism switches (target <= 1.10). Because that ratio also holds the compile choice (eager for a run
too short to pay back the compile), two more split it: `determinism_cost_eager` / `_compiled` (the switches
alone, kernels equal) and `run_exactness_cost` (the default run's whole time over the fastest non-exact
way to run the same planned steps, compile time included). The fixture's figures keep their earlier names (no prefix).
Measure on a quiet machine: on 2 cores, torch's threads slow down ~10x while another process keeps a core busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.dataloader import BosBestFitLoader, list_parquet_files, split_files
from nanochat.gpt import GPT
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from nanochat.tokenizer import Tokenizer
from nanochat.train_config import compile_decision, run_shape
from scripts.base_train import exact_kernels, keep_freed_memory, train_step
from scripts.demo import write_shards
from scripts.tok_train import train_tokenizer

VOCAB = 2048


@dataclass(frozen=True)
class BenchConfig:
    name: str
    prefix: str  # of its figures
    flags: dict  # base_train flags (user_config)
    planned_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.flags["total_batch_size"]


def _flags(depth: int, seq: int, batch: int, total: int, steps: int) -> dict:
    return {"depth": depth, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": seq, "window_pattern": "SSSL",
            "device_batch_size": batch, "total_batch_size": total, "num_iterations": steps}


CONFIGS = {
    "fixture": BenchConfig("fixture", "", _flags(2, 128, 8, 2048, 300), 300),
    "demo": BenchConfig("demo", "demo_", _flags(4, 256, 16, 4096, 250), 250),
}


class Side:
    """One model + optimizer + loader, stepped by base_train's own train_step."""

    def __init__(self, base: Path, cfg: BenchConfig, compiled: bool, exact: bool):
        tok = Tokenizer.from_directory(base / "tokenizer")
        self.shape = run_shape(cfg.flags, vocab_size=tok.get_vocab_size())
        torch.manual_seed(0)
        self.model = GPT(self.shape.config)
        self.model.init_weights(seed=0)
        self.opt = MuonAdamW(self.model, param_groups_for(self.model, LearningRates()))
        f = cfg.flags
        self.loader = BosBestFitLoader(split_files(list_parquet_files(base / "base_data"), "train"), tok,
                                       f["device_batch_size"], f["max_seq_len"])
        self.fwd = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.exact = exact
        self.times: list[float] = []

    def step(self) -> float:
        if self.exact:
            exact_kernels("cpu")
        else:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default, unused when off
        t0 = time.perf_counter()
        train_step(self.fwd, self.opt, self.loader, self.shape.grad_accum).item()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def measure(base: Path, cfg: BenchConfig, steps: int, warmup: int) -> dict:
    """All four sides stepped in turn, so a busy machine slows them alike; medians after warm-up."""
    sides = {"eager": Side(base, cfg, False, True), "compiled": Side(base, cfg, True, True),
             "eager_fast": Side(base, cfg, False, False), "compiled_fast": Side(base, cfg, True, False)}
    first = {name: side.step() for name, side in sides.items()}  # compilation happens here
    for _ in range(warmup + steps):
        for side in sides.values():
            side.step()
    median = {name: statistics.median(side.times[-steps:]) for name, side in sides.items()}
    return {"median_s": median, "compile_s": max(0.0, first["compiled"] - median["compiled"]),
            "shape": sides["eager"].shape}


def report(cfg: BenchConfig, r: dict) -> None:
    med, compile_s, p = r["median_s"], r["compile_s"], cfg.prefix
    tokens = cfg.tokens_per_step
    saved_per_step = med["eager"] - med["compiled"]
    decision = compile_decision("auto", "cpu", r["shape"], cfg.planned_steps)
    default_s = med["compiled" if decision.compile else "eager"]
    f = cfg.flags
    print(f"config {cfg.name}: depth {f['depth']}, aspect 32, head dim 32, seq {f['max_seq_len']}, batch "
          f"{f['device_batch_size']}x{f['max_seq_len']}, total {tokens}, vocab {VOCAB}, SSSL, "
          f"{torch.get_num_threads()} thread(s); --compile auto for {cfg.planned_steps} steps: "
          f"{'compiled' if decision.compile else 'eager'} ({decision.reason})")
    print(f"{p}train_tok_per_s_eager: {tokens / med['eager']:.0f}")
    print(f"{p}train_tok_per_s_compiled: {tokens / med['compiled']:.0f}")
    print(f"{p}train_tok_per_s_eager_fast: {tokens / med['eager_fast']:.0f}")
    print(f"{p}train_tok_per_s_compiled_fast: {tokens / med['compiled_fast']:.0f}")
    print(f"{p}train_tok_per_s_default: {tokens / default_s:.0f}")
    print(f"{p}compile_s: {compile_s:.1f}")
    print(f"{p}compiled_speedup: {med['eager'] / med['compiled']:.2f}")
    print(f"{p}compile_breakeven_steps: {compile_s / saved_per_step:.0f}" if saved_per_step > 0
          else f"{p}compile_breakeven_steps: never")
    print(f"{p}run_s_default: {cfg.planned_steps * default_s + (compile_s if decision.compile else 0):.1f}")
    print(f"{p}run_s_always_compiled: {cfg.planned_steps * med['compiled'] + compile_s:.1f}")
    print(f"{p}exactness_cost: {default_s / min(med['eager_fast'], med['compiled_fast']):.2f}")
    # What the determinism switches alone cost, kernels held equal: exactness_cost above also holds the
    # compile choice, which --compile auto makes from the run's length, not from exactness.
    print(f"{p}determinism_cost_eager: {med['eager'] / med['eager_fast']:.3f}")
    print(f"{p}determinism_cost_compiled: {med['compiled'] / med['compiled_fast']:.3f}")
    # Whole planned run, compile time included: the default (exact) run over the fastest non-exact way
    # to run the same steps (eager, or compiled and paying the compile once).
    fastest_run = min(cfg.planned_steps * med["eager_fast"], cfg.planned_steps * med["compiled_fast"] + compile_s)
    default_run = cfg.planned_steps * default_s + (compile_s if decision.compile else 0)
    print(f"{p}run_exactness_cost: {default_run / fastest_run:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--configs", default="fixture,demo", help="comma-separated: fixture, demo")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r} (choose from {', '.join(CONFIGS)})")
    keep_freed_memory()  # as base_train does
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # An empty inductor cache (read when compiling): compile_s is what a first run pays, not a replay.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "inductor_cache")
        write_shards(base / "base_data", None)
        train_tokenizer(base, VOCAB, max_chars=10**9, doc_cap=10_000)
        for name in names:
            report(CONFIGS[name], measure(base, CONFIGS[name], args.steps, args.warmup))
    print(f"threads: {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
