"""Tiny real models, tokenizers and checkpoints for tests (no mocks: real GPTs, real files)."""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare.jsonl.gz"


def corpus_texts(limit_chars: int | None = None) -> list[str]:
    texts, total = [], 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            texts.append(t)
            total += len(t)
            if limit_chars and total >= limit_chars:
                break
    return texts


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    texts = corpus_texts(400_000)
    return Tokenizer.train_from_iterator((t[i:i + 10_000] for t in texts for i in range(0, len(t), 10_000)), vocab_size)


def random_model(config: GPTConfig, seed: int = 0, scale: float = 0.3) -> GPT:
    """A GPT whose every weight, lambdas included, is random: a bug in any path changes the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("resid_lambdas",):
                p.uniform_(0.5, 1.5)
            elif name.endswith("lambdas") or name.endswith("lambda"):
                p.uniform_(-0.5, 0.5)
            elif "wte" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, scale * p.shape[-1] ** -0.5 * 3)
    return model.eval()


def write_checkpoint(directory: Path, model: GPT, step: int = 10, tokenizer: Tokenizer | None = None,
                     extra_meta: dict | None = None, with_optimizer: bool = True) -> Path:
    """An upstream-layout checkpoint of `model` in <directory>, tokenizer in <directory>/../../tokenizer
    when the directory is <base>/base_checkpoints/<tag>."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "val_bpb": 3.0, "model_config": model.config.upstream_dict(),
            "user_config": {"depth": model.config.n_layer}, "device_batch_size": 2,
            "max_seq_len": model.config.sequence_len, **(extra_meta or {})}
    optim = {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]} if with_optimizer else None
    save_checkpoint(directory, step, model.state_dict(), meta, optimizer_state=optim)
    if tokenizer is not None and directory.parent.name.endswith("_checkpoints"):
        tokenizer.save(directory.parent.parent / "tokenizer")
    return directory


def write_training_base(base_dir: Path, limit_chars: int = 400_000, vocab_size: int = 512) -> Path:
    """A nanochat base dir that scripts.base_train can train from: the corpus's first plays as parquet
    shards in <base>/base_data/ (last shard = validation) and a tokenizer trained on them."""
    from scripts.demo import write_shards
    from scripts.tok_train import train_tokenizer

    write_shards(base_dir / "base_data", limit_chars)
    train_tokenizer(base_dir, vocab_size, max_chars=10**9, doc_cap=10_000)
    return base_dir


class RunsCode:
    """A pickle payload that calls func(arg) when unpickled: what a malicious checkpoint carries."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def touch_payload(marker: Path) -> RunsCode:
    """Unpickling this creates `marker`: a test asserts the file never appears."""
    return RunsCode(os.system, f"touch {marker}")


def v1_optimizer_files(full, world: int, model: GPT) -> list[dict]:
    """Our earlier optimizer layout (format nanochat-workbench-optimizer v1), from a one-process MuonAdamW
    holding the whole state: per rank, the state of the params that rank owned, keyed by name."""
    from nanochat.optim import STATE_FORMAT, LearningRates, MuonAdamW, param_groups_for

    out = []
    for r in range(world):
        owner = MuonAdamW(model, param_groups_for(model, LearningRates()), rank=r, world_size=world)
        out.append({"format": STATE_FORMAT, "version": 1, "rank": r, "world_size": world, "owned": owner.owned,
                    "state": {n: s for n, s in full.state.items() if n in owner.owned},
                    "param_groups": [dict(g) for g in owner.param_groups]})
    return out
