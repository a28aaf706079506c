"""The torch-free model arithmetic agrees with the built module and with upstream's rules."""

import json

import pytest

from nanochat.gpt import GPT
from nanochat.model_config import (
    GPTConfig,
    classic_config,
    current_config,
    flops_per_token,
    param_counts,
    training_memory_bytes,
)

CONFIGS = [
    GPTConfig(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL"),
    GPTConfig(sequence_len=128, vocab_size=2048, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
    GPTConfig.classic(sequence_len=128, vocab_size=2048, n_layer=2, n_head=1, n_kv_head=1, n_embd=128),
    GPTConfig(sequence_len=512, vocab_size=1000, n_layer=5, n_head=2, n_kv_head=1, n_embd=96, smear=False, backout=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c.n_layer}C{c.n_embd}")
def test_counts_match_the_built_module(cfg):
    model = GPT(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["transformer_matrices"] == sum(p.numel() for p in model.transformer.h.parameters())
    assert counts["value_embeds"] == sum(p.numel() for p in model.value_embeds.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
    assert flops_per_token(cfg) == model.estimate_flops() == 6 * linear + attn


def test_configs_from_flags_match_the_fixtures(upstream_dir):
    current = json.loads((upstream_dir / "current/base_checkpoints/d2/meta_000300.json").read_text())["model_config"]
    classic = json.loads((upstream_dir / "classic/base_checkpoints/d2/meta_000300.json").read_text())["model_config"]
    assert current_config(2, aspect_ratio=32, head_dim=32, max_seq_len=128, vocab_size=2048).upstream_dict() == current
    assert classic_config(2, max_seq_len=128, vocab_size=2048).upstream_dict() == classic
    assert current_config(20).n_embd == 1280 and current_config(20).n_head == 10  # upstream's d20


def test_memory_estimate_is_consistent():
    mem = training_memory_bytes(CONFIGS[1], device_batch_size=8)
    assert mem["weights"] == param_counts(CONFIGS[1])["total"] * 4
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert training_memory_bytes(CONFIGS[1], 16)["activations"] > mem["activations"]
    no_flash = training_memory_bytes(CONFIGS[1], 8, flash_attention=False)["activations"]
    assert no_flash - mem["activations"] == 2 * 8 * 128 * 5 * 2 * 128 * 4 // 2  # L * tokens * 5HT * bytes/2
