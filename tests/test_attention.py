"""The attention visualizer's explicit path reproduces the fast path (both upstream generations, windows
active), its weights are proper attention (rows sum to 1, zero outside each layer's window), the
summaries and the logit lens read them correctly, and the capture leaves the model's normal forward as
it was."""

import pytest
import torch

from nanochat.attention import AttentionInputError, capture, downsample, head_scores, logit_lens
from nanochat.checkpoint_manager import load_model
from nanochat.gpt import GPTConfig
from tests.modelkit import random_model

# Windows active: every fixture's short window (128) is shorter than the prompt.
PROMPT_LEN = 300


@pytest.fixture(scope="module", params=["classic", "current"])
def fixture_model(request, upstream_dir):
    return load_model(upstream_dir / request.param / "base_checkpoints" / "d2").model


def long_prompt(vocab: int, length: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_explicit_path_equals_fast_path_on_every_fixture(fixture_model):
    model = fixture_model
    ids = long_prompt(model.config.vocab_size)
    assert min(model.config.window_sizes()) < len(ids)  # the windows cut in
    with torch.no_grad():
        fast = model(torch.tensor([ids]))[0]
    cap = capture(model, ids, max_len=len(ids))
    assert (cap.logits - fast).abs().max().item() <= 1e-5
    with torch.no_grad():  # the probe is gone: the normal forward is the fused one again, same numbers
        assert torch.equal(model(torch.tensor([ids]))[0], fast)
    assert all(block.attn.probe is None for block in model.transformer.h)


GQA_WINDOWS = GPTConfig(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                        window_pattern="SSL")  # windows 128, 128, 512, 512; two query heads per kv head


def test_explicit_path_with_gqa_and_short_windows():
    model = random_model(GQA_WINDOWS, seed=3)
    ids = long_prompt(300, 400)
    with torch.no_grad():
        fast = model(torch.tensor([ids]))[0]
    cap = capture(model, ids)
    assert (cap.logits - fast).abs().max().item() <= 1e-5
    assert [cap.kv_group(h) for h in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("config", [GQA_WINDOWS, GPTConfig.classic(sequence_len=256, vocab_size=300, n_layer=2, n_head=2,
                                                                    n_kv_head=2, n_embd=32)])
def test_rows_sum_to_one_and_vanish_outside_the_window(config):
    model = random_model(config, seed=4)
    ids = long_prompt(300, 256)
    cap = capture(model, ids)
    t = len(ids)
    pos = torch.arange(t)
    delta = pos[:, None] - pos[None, :]
    assert cap.windows == config.window_sizes()
    for layer, w in enumerate(cap.weights):
        assert w.shape == (config.n_head, t, t)
        assert torch.allclose(w.sum(-1), torch.ones(config.n_head, t), atol=1e-5)
        outside = (delta < 0) | (delta > cap.windows[layer])
        assert w[:, outside].abs().max().item() == 0.0
        inside = ~outside
        assert (w[:, inside] > 0).all()  # softmax: every visible key gets some weight
    if config.window_pattern != "L":
        assert (torch.arange(t)[:, None] - torch.arange(t)[None, :] > 128).any()  # the window did cut


def test_head_scores_recognise_made_up_patterns():
    model = random_model(GQA_WINDOWS, seed=5)
    ids = [7, 1, 2, 1, 3, 1]
    cap = capture(model, ids)
    t = len(ids)
    bos, prev, same = torch.zeros(t, t), torch.zeros(t, t), torch.zeros(t, t)
    bos[:, 0] = 1
    prev[0, 0] = 1
    prev[torch.arange(1, t), torch.arange(0, t - 1)] = 1
    for i, j in [(0, 0), (1, 1), (2, 2), (3, 1), (4, 4), (5, 3)]:
        same[i, j] = 1
    cap.weights = [torch.stack([bos, prev, same, torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]])]
    scores = head_scores(cap)
    assert [s.pattern for s in scores] == ["BOS", "previous token", "same token", "mixed"]
    assert scores[0].bos == 1.0 and scores[0].entropy == 0.0
    assert scores[1].mean_distance == pytest.approx(5 / 6)
    assert scores[3].entropy == pytest.approx(sum(torch.log(torch.arange(1, t + 1).float())).item() / t)


def test_downsample_keeps_rows_summing_to_one():
    model = random_model(GQA_WINDOWS, seed=6)
    cap = capture(model, long_prompt(300, 301))
    small, factor = downsample(cap.weights[0], 64)
    assert factor == 5 and small.shape == (4, 61, 61)
    assert torch.allclose(small.sum(-1), torch.ones(4, 61), atol=1e-5)
    same, one = downsample(cap.weights[0], 400)
    assert one == 1 and same is cap.weights[0]


def test_logit_lens_last_layer_is_the_models_prediction(fixture_model):
    model = fixture_model
    ids = long_prompt(model.config.vocab_size, 20)
    cap = capture(model, ids)
    rows = logit_lens(model, cap, position=19, top=3)
    assert [r.layer for r in rows] == list(range(model.config.n_layer))
    probs = torch.softmax(cap.logits[19], -1)
    assert rows[-1].token_ids[0] == int(probs.argmax())
    assert rows[-1].probs[0] == pytest.approx(float(probs.max()), abs=1e-5)
    assert all(r.probs == tuple(sorted(r.probs, reverse=True)) for r in rows)
    with pytest.raises(AttentionInputError, match="outside the prompt"):
        logit_lens(model, cap, position=20)


def test_prompt_beyond_the_context_is_one_message():
    model = random_model(GQA_WINDOWS, seed=7)
    with pytest.raises(AttentionInputError, match="beyond this model's context of 512"):
        capture(model, list(range(513)))
    with pytest.raises(AttentionInputError, match="empty"):
        capture(model, [])
