"""
SFT throughput against base training on the same model and batch: tokens per second of scripts.chat_sft's
step over scripts.base_train's (target >= 0.9).

    .venv/bin/python -m bench.sft [--steps 20] [--warmup 3] [--threads N]

The model and batch are the demo's (bench/train.py's `demo` config: depth 4, aspect ratio 32, head dim 32,
sequence 256, batch 16 x 256 = 4,096 tokens per step, SSSL, vocab 2,048), eager, each trainer's exact mode
(its default). Two sides, each a fresh model and MuonAdamW, stepped in turn so a busy machine slows both
alike: base_train's own `train_step` with its BOS best-fit loader reading parquet shards (bench/train.py's
`Side`), and chat_sft's own `train_step` with its loader (`nanochat/sft_data.py`: BOS-aligned best-fit
packing of whole conversations, padding, masked targets) over the demo's play conversations
(`scripts/play_conversations.py`, the ones that fit a row). Both count tokens as their trainers print
tok/s: the step's batch (rows x sequence), padding included. Median over `--steps` steps after `--warmup`.
A temporary base dir holds the corpus's shards, a 2,048-token tokenizer and the conversations.
Ends with `name: value` lines: sft_tok_per_s, base_tok_per_s, sft_over_base_tok_per_s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.train import CONFIGS, VOCAB, Side
from nanochat.gpt import GPT
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from nanochat.sft_data import SftDataset, SftLoader
from nanochat.tokenizer import Tokenizer
from nanochat.train_config import run_shape
from nanochat.training import exact_kernels, keep_freed_memory
from scripts.chat_sft import train_step as sft_train_step
from scripts.demo import corpus_works, write_shards
from scripts.play_conversations import play_conversations
from scripts.tok_train import train_tokenizer

TARGET = 0.9
CONFIG = CONFIGS["demo"]


class SftSide:
    """The same model and batch as base_train's Side, stepped by chat_sft's train_step and loader."""

    def __init__(self, base: Path):
        tok = Tokenizer.from_directory(base / "tokenizer")
        f = CONFIG.flags
        self.shape = run_shape(f, vocab_size=tok.get_vocab_size())
        torch.manual_seed(0)
        self.model = GPT(self.shape.config)
        self.model.init_weights(seed=0)
        self.opt = MuonAdamW(self.model, param_groups_for(self.model, LearningRates()))
        template = tok.chat_template()
        train, _ = play_conversations(corpus_works(), template, f["max_seq_len"] + 1)
        self.data = SftDataset.build(train, template, f["max_seq_len"] + 1)
        self.loader = SftLoader(self.data, tok.get_bos_token_id(), f["device_batch_size"], f["max_seq_len"])
        self.times: list[float] = []

    def step(self) -> float:
        exact_kernels("cpu")
        t0 = time.perf_counter()
        sft_train_step(self.model, self.opt, self.loader, self.shape.grad_accum).item()
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def measure(base: Path, steps: int, warmup: int) -> dict:
    sides = {"base": Side(base, CONFIG, compiled=False, exact=True), "sft": SftSide(base)}
    for _ in range(1 + warmup + steps):
        for side in sides.values():
            side.step()
    return {name: statistics.median(side.times[-steps:]) for name, side in sides.items()} | {"sft_side": sides["sft"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sft", description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    keep_freed_memory()  # as both trainers do
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        write_shards(base / "base_data", None)
        train_tokenizer(base, VOCAB, max_chars=10**9, doc_cap=10_000)
        r = measure(base, args.steps, args.warmup)
    tokens = CONFIG.tokens_per_step
    data = r["sft_side"].data
    f = CONFIG.flags
    print(f"model: depth {f['depth']}, aspect 32, head dim 32, seq {f['max_seq_len']}, batch {f['device_batch_size']}x"
          f"{f['max_seq_len']} = {tokens} tokens per step, vocab {VOCAB}, SSSL, eager, exact kernels, "
          f"{torch.get_num_threads()} thread(s); SFT data: {len(data):,} play conversations, {data.tokens:,} tokens "
          f"({data.supervised / max(data.tokens, 1):.0%} trained on); median of {args.steps} steps, sides in turn")
    print(f"sft_step_ms: {r['sft'] * 1e3:.1f}")
    print(f"base_step_ms: {r['base'] * 1e3:.1f}")
    print(f"sft_tok_per_s: {tokens / r['sft']:.0f}")
    print(f"base_tok_per_s: {tokens / r['base']:.0f}")
    print(f"sft_over_base_tok_per_s: {r['base'] / r['sft']:.3f}")
    print(f"sft_target_met: {r['base'] / r['sft'] >= TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
