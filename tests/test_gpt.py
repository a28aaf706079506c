"""The GPT reproduces upstream exactly (both generations), and its KV cache equals recomputation."""

import json

import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.gpt import GPT, ArchitectureError, GPTConfig
from tests.modelkit import random_model

GENERATIONS = ["classic", "current"]


@pytest.fixture(scope="module", params=GENERATIONS)
def upstream(request, upstream_dir):
    base = upstream_dir / request.param
    loaded = load_model(base / "base_checkpoints" / "d2")
    return request.param, base, loaded


def test_upstream_logits_match_reference(upstream):
    generation, base, loaded = upstream
    ref = torch.load(base / "reference_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = loaded.model(ref["token_ids"][None])[0]
    assert logits.dtype == torch.float32
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4
    assert loaded.model.config.is_classic == (generation == "classic")


def test_upstream_greedy_generation_matches_reference(upstream):
    _, base, loaded = upstream
    ref = json.loads((base / "reference_generation.json").read_text())
    ids = list(ref["prompt_token_ids"])
    with torch.no_grad():
        for _ in range(ref["max_tokens"]):
            ids.append(int(loaded.model(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(ref["prompt_token_ids"]):] == ref["generated_token_ids"]
    assert loaded.tokenizer.decode(ids) == ref["full_text"]


def test_upstream_greedy_with_kv_cache_matches_reference(upstream):
    _, base, loaded = upstream
    ref = json.loads((base / "reference_generation.json").read_text())
    model = loaded.model
    cache = model.new_kv_cache(1, 64)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ref["prompt_token_ids"]]), kv_cache=cache)
        for _ in range(ref["max_tokens"]):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)
    assert out == ref["generated_token_ids"]


# Configs whose short window (128) is 1/4 of the context: decoding 4x past it exercises the window.
CONFIGS = {
    "classic": GPTConfig.classic(sequence_len=512, vocab_size=300, n_layer=3, n_head=2, n_kv_head=2, n_embd=64),
    "current": GPTConfig(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                         window_pattern="SSL"),
    "current_all_short": GPTConfig(sequence_len=512, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=48,
                                   window_pattern="S"),
}


def test_config_windows_and_padding():
    cfg = CONFIGS["current"]
    assert cfg.window_sizes() == [128, 128, 512, 512]  # tiled SSL, last layer forced to L
    assert cfg.padded_vocab_size == 320
    assert CONFIGS["classic"].padded_vocab_size == 300
    assert CONFIGS["classic"].window_sizes() == [512, 512, 512]
    assert GPTConfig(sequence_len=2048, window_pattern="SSSL", n_layer=6).window_sizes() == [512, 512, 512, 2048, 512, 2048]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_naive_recomputation(name):
    """Greedy decoding with the cache equals recomputing the whole sequence every step."""
    model = random_model(CONFIGS[name], seed=1)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    steps = 24
    with torch.no_grad():
        naive_ids, naive_logits = prompt.clone(), []
        for _ in range(steps):
            last = model(naive_ids)[0, -1]
            naive_logits.append(last)
            naive_ids = torch.cat([naive_ids, last.argmax().view(1, 1)], dim=1)
        cache = model.new_kv_cache(1, 64)
        logits = model(prompt, kv_cache=cache)[0, -1]
        cached_ids, cached_logits = prompt.clone(), []
        for _ in range(steps):
            cached_logits.append(logits)
            nxt = logits.argmax().view(1, 1)
            cached_ids = torch.cat([cached_ids, nxt], dim=1)
            logits = model(nxt, kv_cache=cache)[0, -1]
    assert torch.equal(cached_ids, naive_ids)
    assert max((a - b).abs().max().item() for a, b in zip(cached_logits, naive_logits)) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_with_sliding_windows_far_past_the_window(name):
    """600 positions against a 128 window: every cached step equals the full causal forward pass
    (which, being causal, is what recomputing at each step gives at every position)."""
    model = random_model(CONFIGS[name], seed=2)
    total = 600
    prompt_len = 40
    with torch.no_grad():
        cache = model.new_kv_cache(1, total)
        ids = torch.randint(0, 300, (1, prompt_len), generator=torch.Generator().manual_seed(1))
        logits = model(ids, kv_cache=cache)[0, -1]
        step_logits = []
        while ids.size(1) < total:
            step_logits.append(logits)
            nxt = logits.argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(nxt, kv_cache=cache)[0, -1]
        full = model(ids)[0]
    windows = CONFIGS[name].window_sizes()
    assert total >= 4 * min(windows) or min(windows) == CONFIGS[name].sequence_len  # classic: no windows
    expected = full[prompt_len - 1:total - 1]
    got = torch.stack(step_logits)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(expected.argmax(-1), ids[0, prompt_len:])


def test_chunked_prefill_with_cache_equals_one_pass():
    model = random_model(CONFIGS["current"], seed=3)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(1, 300)
        parts = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 100), (100, 250), (250, 300))]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_expand_and_select_keep_rows_independent():
    model = random_model(CONFIGS["current"], seed=4)
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    nxt = torch.tensor([[5], [7], [9]])
    with torch.no_grad():
        one = model.new_kv_cache(1, 40)
        model(prompt, kv_cache=one)
        three = one.expand(3)
        batched = model(nxt, kv_cache=three)[:, -1]
        three.select(torch.tensor([2]))
        after_select = model(torch.tensor([[11]]), kv_cache=three)[0, -1]
        alone = model(torch.cat([prompt, torch.tensor([[9, 11]])], dim=1))[0]
        for row, tok in enumerate((5, 7, 9)):
            ref = model(torch.cat([prompt, torch.tensor([[tok]])], dim=1))[0, -1]
            assert (batched[row] - ref).abs().max().item() <= 1e-5
    assert (after_select - alone[-1]).abs().max().item() <= 1e-5


def test_missing_2026_features_take_neutral_values():
    """An intermediate checkpoint without some 2026 keys equals the full model with neutral values."""
    full = random_model(CONFIGS["current"], seed=5)
    with torch.no_grad():
        full.smear_lambda.zero_()
        full.backout_lambda.zero_()
        full.resid_lambdas.fill_(1.0)
        full.x0_lambdas.zero_()
    dropped = ("smear_gate.weight", "smear_lambda", "backout_lambda", "resid_lambdas", "x0_lambdas")
    state = {k: v for k, v in full.state_dict().items() if k not in dropped}
    cfg = GPTConfig.from_checkpoint(full.config.upstream_dict(), {k: v.shape for k, v in state.items()})
    assert not cfg.smear and not cfg.backout and not cfg.resid_lambdas and cfg.value_embeds
    assert not cfg.is_classic and cfg.vocab_pad == 64
    partial = GPT(cfg)
    partial.load_state_dict(state, strict=True)
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(partial.eval()(ids), full(ids))


def test_classic_detection_and_unknown_keys():
    classic = GPT(CONFIGS["classic"])
    shapes = {k: v.shape for k, v in classic.state_dict().items()}
    model_config = CONFIGS["classic"].upstream_dict()
    assert "window_pattern" not in model_config
    assert GPTConfig.from_checkpoint(model_config, shapes) == CONFIGS["classic"]
    with pytest.raises(ArchitectureError, match="unknown state-dict keys.*mystery"):
        GPTConfig.from_checkpoint(model_config, {**shapes, "mystery.weight": (3, 3)})
    assert GPTConfig.from_checkpoint(model_config, {f"_orig_mod.{k}": v for k, v in shapes.items()}) == CONFIGS["classic"]


def test_loss_matches_cross_entropy_of_logits():
    model = random_model(CONFIGS["current"], seed=6)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(5))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), targets[:, :-1].reshape(-1))
    assert abs(loss.item() - manual.item()) < 1e-5


def test_param_and_flop_counts_follow_upstream_rules(upstream_dir):
    loaded = load_model(upstream_dir / "current" / "base_checkpoints" / "d2")
    model, cfg = loaded.model, loaded.model.config
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_block = 4 * 64 * 64 + 2 * 4 * 64 * 64
    assert counts["transformer_matrices"] == 2 * per_block + 2 * 12  # + one ve_gate [2, 12]
    assert counts["scaling"] == counts["transformer_matrices"] + 2048 * 64
    linear = 2 * per_block + 2 * 12 + 2048 * 64 + 24  # blocks, ve_gate, lm_head, smear_gate
    assert model.estimate_flops() == 6 * linear + 2 * 12 * cfg.n_head * cfg.head_dim * 128


def test_init_weights_trains():
    """init_weights gives a model whose loss starts near ln(V) and falls under a few AdamW steps."""
    torch.manual_seed(0)
    model = GPT(CONFIGS["current"])
    model.init_weights(seed=0)
    ids = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(6))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids[:, :-1], ids[:, 1:]).item()
    assert abs(first - torch.log(torch.tensor(300.0)).item()) < 0.5
    for _ in range(30):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_bad_configs_are_refused():
    with pytest.raises(ArchitectureError, match="divisible"):
        GPTConfig(n_embd=65, n_head=2)
    with pytest.raises(ArchitectureError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ArchitectureError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)
