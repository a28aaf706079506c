"""The engine's tool loop (upstream's: ../shared/docs/UPSTREAM_OUTPUTS.md §7) on a tiny real model: a python block
forced into a row is answered, token by token, by `<|output_start|> result <|output_end|>` from the calculator;
refused or empty calls inject nothing; the output counts toward max_tokens, is traced as forced tool output, and
leaves other rows and the random draws alone."""

import pytest
import tiktoken

from nanochat.engine import FINISH_LENGTH, Engine, SamplingError, SamplingSettings, TraceOptions
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.modelkit import random_model, tiny_tokenizer

VOCAB = 300
CONFIG = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
S = SamplingSettings(temperature=1.0, seed=5)


@pytest.fixture(scope="module")
def engine():
    return Engine(random_model(CONFIG, seed=11, scale=1.0), tiny_tokenizer(VOCAB))


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.render_chat([{"role": "user", "content": "What is 2+3?"}])


def sid(engine, name: str) -> int:
    return engine.tokenizer.special_id(name)


def call(engine, expr: str, at: int = 0) -> dict[int, int]:
    """{step: token} forcing `<|python_start|> expr <|python_end|>` from step `at` on."""
    ids = [sid(engine, "<|python_start|>"), *engine.tokenizer.encode(expr), sid(engine, "<|python_end|>")]
    return {at + i: t for i, t in enumerate(ids)}


def output_block(engine, result: str) -> list[int]:
    return [sid(engine, "<|output_start|>"), *engine.tokenizer.encode(result), sid(engine, "<|output_end|>")]


@pytest.mark.parametrize("expr, result", [("2+3", "5"), ("12/60", "0.2"), ("1,000+1", "1001"),
                                          ('"strawberry".count("r")', "3")])
def test_a_forced_tool_call_is_answered_by_the_calculator_token_by_token(engine, prompt, expr, result):
    forced = call(engine, expr, at=2)
    end = max(forced) + 1
    want = output_block(engine, result)
    r = engine.generate(prompt, S, end + len(want) + 4, trace=TraceOptions(top_n=3), forced={0: forced}, stop_ids=(),
                        tools=True)[0]
    assert list(r.token_ids[end:end + len(want)]) == want
    steps = r.trace
    assert [t.forced for t in steps[:end]] == [i in forced for i in range(end)]
    assert not any(t.tool_output for t in steps[:end])  # the call itself was forced by us, not by the tool
    for t, tok in zip(steps[end:end + len(want)], want):
        assert t.token_id == tok and t.forced and t.tool_output
    after = steps[end + len(want):]
    assert after and not any(t.forced or t.tool_output for t in after)  # sampling resumes, nothing else is forced
    assert f"<|output_start|>{result}<|output_end|>" in r.text


@pytest.mark.parametrize("expr", ["2**10", "abs(-3)", "1/0", "__import__('os')", '"ab".upper()'])
def test_refused_or_failing_calls_inject_nothing(engine, prompt, expr):
    forced = call(engine, expr)
    n = max(forced) + 8
    with_tools = engine.generate(prompt, S, n, forced={0: forced}, stop_ids=(), tools=True, trace=TraceOptions(top_n=0))[0]
    without = engine.generate(prompt, S, n, forced={0: forced}, stop_ids=())[0]
    assert with_tools.token_ids == without.token_ids
    assert not any(t.tool_output for t in with_tools.trace)


def test_an_empty_block_and_tools_off_inject_nothing(engine, prompt):
    empty = {0: sid(engine, "<|python_start|>"), 1: sid(engine, "<|python_end|>")}
    a = engine.generate(prompt, S, 8, forced={0: empty}, stop_ids=(), tools=True)[0]
    b = engine.generate(prompt, S, 8, forced={0: empty}, stop_ids=())[0]
    assert a.token_ids == b.token_ids
    forced = call(engine, "2+3")
    off = engine.generate(prompt, S, max(forced) + 4, forced={0: forced}, stop_ids=())[0]
    assert sid(engine, "<|output_start|>") not in off.token_ids[max(forced) + 1:max(forced) + 2]


def test_the_output_counts_toward_max_tokens_and_can_be_cut(engine, prompt):
    forced = call(engine, "7*3")
    end = max(forced) + 1
    r = engine.generate(prompt, S, end + 2, forced={0: forced}, stop_ids=(), tools=True)[0]
    assert list(r.token_ids[end:]) == output_block(engine, "21")[:2] and r.finish_reason == FINISH_LENGTH


def test_the_tool_loop_leaves_other_rows_and_the_draws_alone(engine, prompt):
    forced = call(engine, "2+3")
    end = max(forced) + 1 + len(output_block(engine, "5"))
    other = SamplingSettings(temperature=0.9, top_k=40, seed=9)
    both = engine.generate(prompt, [S, other], end + 6, forced={0: forced}, stop_ids=(), tools=True)
    alone = engine.generate(prompt, other, end + 6, stop_ids=(), tools=True)[0]
    assert both[1].token_ids == alone.token_ids
    # forcing the whole run back reproduces it; its tool outputs are still recognised as such
    replay = engine.generate(prompt, S, end + 6, forced={0: dict(enumerate(both[0].token_ids))}, stop_ids=(), tools=True,
                             trace=TraceOptions(top_n=0))[0]
    assert replay.token_ids == both[0].token_ids
    assert [i for i, t in enumerate(replay.trace) if t.tool_output] == list(range(max(forced) + 1, end))


def test_an_explicit_forced_token_wins_over_a_due_output_and_the_rest_follows(engine, prompt):
    forced = call(engine, "2+3")
    end = max(forced) + 1
    want = output_block(engine, "5")
    r = engine.generate(prompt, S, end + len(want) + 2, forced={0: {**forced, end: 65}}, stop_ids=(), tools=True,
                        trace=TraceOptions(top_n=0))[0]
    assert list(r.token_ids[end:end + len(want)]) == [65, *want[1:]]
    assert [t.tool_output for t in r.trace[end:end + len(want)]] == [False] + [True] * (len(want) - 1)


def test_a_sampled_python_block_is_answered_too(engine, prompt):
    """The loop reads every emitted token, so a block the model samples itself is evaluated the same way. The real
    model is steered greedily through the block by a large bonus on its next token (its own logits otherwise)."""
    model = engine.model
    seq = [sid(engine, "<|python_start|>"), *engine.tokenizer.encode("6/3"), sid(engine, "<|python_end|>")]
    want = output_block(engine, "2.0")
    calls = []
    real = type(model).forward

    def steered(self, ids, *a, **kw):
        logits = real(self, ids, *a, **kw)
        if len(calls) < len(seq):
            logits[..., seq[len(calls)]] += 1e4
        calls.append(1)
        return logits

    model.forward = steered.__get__(model)
    try:
        r = engine.generate(prompt, SamplingSettings(temperature=0), len(seq) + len(want), stop_ids=(), tools=True,
                            trace=TraceOptions(top_n=0))[0]
    finally:
        del model.forward
    assert list(r.token_ids[:len(seq)]) == seq and not any(t.forced for t in r.trace[:len(seq)])
    assert list(r.token_ids[len(seq):]) == want and all(t.tool_output for t in r.trace[len(seq):])


def test_tools_need_a_chat_tokenizer():
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="bytes", pat_str=r".", mergeable_ranks=ranks, special_tokens={"<|bos|>": 256})
    cfg = GPTConfig(sequence_len=32, vocab_size=257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32, window_pattern="L")
    eng = Engine(random_model(cfg, seed=2), Tokenizer(enc))
    with pytest.raises(SamplingError, match="tool loop needs a chat tokenizer"):
        eng.stream(eng.encode("hi"), S, 3, tools=True)


def test_text_deltas_add_up_to_the_reply_and_build_the_same_result(engine, prompt):
    from nanochat.engine import ResultBuilder

    forced = call(engine, "2+3", at=1)
    opts = TraceOptions(top_n=2)
    whole = engine.generate(prompt, S, 30, trace=opts, forced={0: forced}, tools=True)[0]
    builder = ResultBuilder(engine, [S], opts)
    deltas = list(builder.text_deltas(engine.stream(prompt, S, 30, trace=opts, forced={0: forced}, tools=True)))
    assert len(deltas) > 1 and "".join(deltas) == whole.text
    assert builder.results()[0] == whole
