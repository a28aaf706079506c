"""
Training throughput of scripts.base_train on CPU, eager and torch.compile'd, measured side by side.

    .venv/bin/python -m bench.train [--steps 20] [--warmup 3] [--threads N]

The configuration is the upstream fixture's (tests/fixtures/upstream/current: depth 2, aspect ratio 32,
head dim 32, sequence 128, device batch 8, total batch 2,048 tokens = 2 micro-steps, vocab 2,048), the
one upstream printed about 52,000 tok/s for on 2 cores with torch.compile. Each side builds a fresh model
and optimizer and runs base_train's own `train_step` (data loading from parquet shards included, as in
upstream's tok/sec) on a temporary base dir made from the bundled corpus. The two sides step alternately,
so a busy machine slows both alike. Reported: the median tok/s over `--steps` steps after `--warmup`
steps, the compile time with an empty inductor cache (first compiled step minus a median step) and the
number of steps after which compiling has paid for itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanochat.dataloader import BosBestFitLoader, list_parquet_files, split_files
from nanochat.gpt import GPT
from nanochat.model_config import current_config
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from nanochat.tokenizer import Tokenizer
from scripts.base_train import keep_freed_memory, train_step
from scripts.demo import write_shards
from scripts.tok_train import train_tokenizer

DEPTH, ASPECT, HEAD_DIM, SEQ, BATCH, TOTAL, VOCAB = 2, 32, 32, 128, 8, 2048, 2048


class Side:
    """One model + optimizer + loader, stepped by base_train's own train_step."""

    def __init__(self, base: Path, compiled: bool):
        tok = Tokenizer.from_directory(base / "tokenizer")
        cfg = current_config(DEPTH, ASPECT, HEAD_DIM, SEQ, tok.get_vocab_size(), "SSSL")
        torch.manual_seed(0)
        self.model = GPT(cfg)
        self.model.init_weights(seed=0)
        self.opt = MuonAdamW(self.model, param_groups_for(self.model, LearningRates()))
        self.loader = BosBestFitLoader(split_files(list_parquet_files(base / "base_data"), "train"), tok, BATCH, SEQ)
        self.fwd = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        train_step(self.fwd, self.opt, self.loader, TOTAL // (BATCH * SEQ)).item()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def measure(base: Path, steps: int, warmup: int) -> dict:
    """Both sides stepped alternately, so a busy machine slows both alike; medians after warm-up."""
    eager, compiled = Side(base, False), Side(base, True)
    first = compiled.step()  # compilation happens here
    eager.step()
    for _ in range(warmup + steps):
        eager.step()
        compiled.step()
    med_e = statistics.median(eager.times[-steps:])
    med_c = statistics.median(compiled.times[-steps:])
    return {"eager": TOTAL / med_e, "compiled": TOTAL / med_c, "compile_s": max(0.0, first - med_c)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    keep_freed_memory()  # as base_train does
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # An empty inductor cache (read when compiling): compile_s is what a first run pays, not a replay.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "inductor_cache")
        write_shards(base / "base_data", None)
        train_tokenizer(base, VOCAB, max_chars=10**9, doc_cap=10_000)
        r = measure(base, args.steps, args.warmup)
    eager, compiled, compile_s = r["eager"], r["compiled"], r["compile_s"]
    saved_per_step = TOTAL / eager - TOTAL / compiled
    print(f"config: depth {DEPTH}, aspect {ASPECT}, head dim {HEAD_DIM}, seq {SEQ}, batch {BATCH}x{SEQ}, "
          f"total {TOTAL}, vocab {VOCAB}, {torch.get_num_threads()} thread(s)")
    print(f"train_tok_per_s_eager: {eager:.0f}")
    print(f"train_tok_per_s_compiled: {compiled:.0f}")
    print(f"compile_s: {compile_s:.1f}")
    print(f"compiled_speedup: {compiled / eager:.2f}")
    print(f"compile_breakeven_steps: {compile_s / saved_per_step:.0f}" if saved_per_step > 0
          else "compile_breakeven_steps: never")
    print(f"threads: {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
