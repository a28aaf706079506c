"""The sampling engine: filter math on hand-made logits, its distribution (chi-square), per-row
independence (batched == separate), traces against a full softmax, and the upstream reference."""

import json
import math
import random

import pytest
import tiktoken
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    SamplingError,
    SamplingSettings,
    SettingsBatch,
    TraceOptions,
    sample,
    sampling_distribution,
)
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.modelkit import random_model, tiny_tokenizer

VOCAB = 300
CONFIG = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
# Critical values of the chi-square distribution at significance 0.001, by degrees of freedom.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}


@pytest.fixture(scope="module")
def engine():
    return Engine(random_model(CONFIG, seed=11, scale=1.0), tiny_tokenizer(VOCAB))


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.encode("Now is the winter of our discontent")


def reference_distribution(logits: list[float], s: SamplingSettings) -> list[float]:
    """The documented rules written out in plain Python, one token at a time (no tensors)."""
    n = len(logits)
    if s.temperature == 0:
        best = min(range(n), key=lambda i: (-logits[i], i))
        return [1.0 if i == best else 0.0 for i in range(n)]
    scaled = [x / s.temperature for x in logits]
    order = sorted(range(n), key=lambda i: (-scaled[i], i))
    top = max(scaled)
    weight = [math.exp(x - top) for x in scaled]
    kept = order[:s.top_k] if s.top_k else order
    if s.top_p < 1:
        target, mass, nucleus = s.top_p * sum(weight[i] for i in kept), 0.0, []
        for i in kept:
            if mass >= target:
                break
            nucleus.append(i)
            mass += weight[i]
        kept = nucleus
    kept = [i for i in kept if weight[i] >= s.min_p]  # weight[i] = p_i / p_max
    total = sum(weight[i] for i in kept)
    return [weight[i] / total if i in kept else 0.0 for i in range(n)]


def dist(logits, **kw) -> list[float]:
    return sampling_distribution(torch.tensor(logits, dtype=torch.float64), SamplingSettings(**kw)).tolist()


# ---------------------------------------------------------------------- settings and inputs


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=1.0), "min_p"), (dict(min_p=-0.01), "min_p"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"),
    (dict(temperature=True), "temperature"),
])
def test_bad_settings_raise_one_named_error(kw, needle):
    with pytest.raises(SamplingError) as e:
        SamplingSettings(**kw).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_edge_settings_are_valid():
    for kw in (dict(temperature=0), dict(top_k=0), dict(top_k=10**6), dict(top_p=1.0), dict(min_p=0.0), dict(seed=0)):
        SamplingSettings(**kw).validate()
    described = SamplingSettings(temperature=0.5, top_k=7, top_p=0.9, min_p=0.1, seed=3).describe()
    assert described == "temperature=0.5 top_k=7 top_p=0.9 min_p=0.1 seed=3"


def test_settings_travel_by_name_only():
    """Keyword-only: a field added before `seed` can never shift a positional caller's seed, and the dict
    form rebuilds every field by name (how the app and the explorer pass them)."""
    with pytest.raises(TypeError):
        SamplingSettings(0.5, 7)
    s = SamplingSettings(temperature=0.5, top_k=7, top_p=0.9, min_p=0.1, seed=3)
    assert SamplingSettings(**s.as_dict()) == s and s.as_dict()["seed"] == 3
    import nanochat.engine
    import nanochat.sampling

    assert nanochat.engine.SamplingSettings is nanochat.sampling.SamplingSettings  # one type, re-exported


def test_bad_requests_raise_one_named_error(engine, prompt):
    s = SamplingSettings()
    cases = [
        (lambda: engine.encode(""), "empty"),
        (lambda: engine.generate([], s, 5), "empty"),
        (lambda: engine.generate([1] * (CONFIG.sequence_len + 1), s, 5), "context"),
        (lambda: engine.generate([1, VOCAB], s, 5), "outside the vocabulary"),
        (lambda: engine.generate([-1, 2], s, 5), "outside the vocabulary"),
        (lambda: engine.generate(prompt, s, 0), "max_tokens"),
        (lambda: engine.generate(prompt, s, engine.max_positions), "positions"),
        (lambda: engine.generate(prompt, [], 5), "at least one row"),
        (lambda: engine.generate(prompt, SamplingSettings(top_p=0), 5), "top_p"),
        (lambda: engine.generate(prompt, s, 5, forced={0: {5: 1}}), "step"),
        (lambda: engine.generate(prompt, s, 5, forced={1: {0: 1}}), "row"),
        (lambda: engine.generate(prompt, s, 5, forced={0: {0: VOCAB}}), "forced token"),
        (lambda: engine.generate(prompt, s, 5, trace=TraceOptions(watch=(VOCAB + 3,))), "watched"),
        (lambda: engine.generate(prompt, s, 5, trace=TraceOptions(top_n=-1)), "top_n"),
        (lambda: engine.render_chat([{"role": "assistant", "content": "hi"}]), "chat"),
    ]
    for call, needle in cases:
        with pytest.raises(SamplingError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_stream_validates_before_the_first_step(engine, prompt):
    with pytest.raises(SamplingError):
        engine.stream(prompt, SamplingSettings(temperature=-1), 4)  # raised at the call, not at next()


# ---------------------------------------------------------------------- the filters on hand-made logits


def test_temperature_zero_is_argmax_with_lowest_id_among_ties():
    assert dist([1.0, 5.0, 5.0, 2.0], temperature=0) == [0, 1, 0, 0]
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    batch = SettingsBatch([SamplingSettings(temperature=0, seed=s) for s in range(1)], 4)
    assert sample(logits, batch, torch.tensor([0.999])).tolist() == [1]


def test_top_k_keeps_exactly_k_and_lower_ids_win_ties():
    logits = [1.0, 3.0, 3.0, 3.0, 0.0]
    assert [p > 0 for p in dist(logits, top_k=2)] == [False, True, True, False, False]
    assert dist(logits, top_k=2)[1] == pytest.approx(0.5)
    assert [p > 0 for p in dist(logits, top_k=4)] == [True, True, True, True, False]
    assert [p > 0 for p in dist([2.0, 2.0], top_k=1)] == [True, False]
    assert dist(logits, top_k=0) == pytest.approx(dist(logits))  # 0 and None: no top-k
    assert dist(logits, top_k=99) == pytest.approx(dist(logits))


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert dist(logits, top_p=0.45) == pytest.approx([1, 0, 0, 0])  # 0.5 alone reaches 0.45
    assert dist(logits, top_p=0.55) == pytest.approx([0.625, 0.375, 0, 0])  # 0.5 < 0.55: token 1 crosses
    assert dist(logits, top_p=0.81) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert dist(logits, top_p=1.0) == pytest.approx([0.5, 0.3, 0.15, 0.05])


def test_top_p_ties_count_in_id_order():
    logits = [1.0, 2.0, 1.0, 1.0]  # p = 0.475, then three ties of 0.175
    kept = [p > 0 for p in dist(logits, top_p=0.6)]
    assert kept == [True, True, False, False]  # the lowest-id tie crosses 0.6
    assert [p > 0 for p in dist(logits, top_p=0.7)] == [True, True, True, False]


def test_filters_apply_in_the_documented_order():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    # top-k first: renormalised (0.625, 0.375), so top-p 0.6 is reached by token 0 alone.
    assert dist(logits, top_k=2, top_p=0.6) == pytest.approx([1, 0, 0, 0])
    # min-p compares with the most likely token: 0.35 x 0.5 = 0.175 keeps tokens 0 and 1.
    assert dist(logits, min_p=0.35) == pytest.approx([0.625, 0.375, 0, 0])
    # temperature before everything: T=0.5 squares and renormalises (0.25, 0.09, ...).
    hot = dist(logits, temperature=0.5)
    squares = [p * p for p in (0.5, 0.3, 0.15, 0.05)]
    assert hot == pytest.approx([q / sum(squares) for q in squares])


def test_tiny_temperature_does_not_overflow():
    gap = 2.0 ** -10  # exact in float32
    logits = [10.0, 10.0 - gap, -5.0, 10.0 - 2 * gap]
    p = dist(logits, temperature=1e-4)
    assert all(math.isfinite(x) for x in p) and sum(p) == pytest.approx(1.0)
    assert p[1] / p[0] == pytest.approx(math.exp(-gap / 1e-4), rel=1e-9)  # about e^-9.8
    assert p[3] / p[0] == pytest.approx(math.exp(-2 * gap / 1e-4), rel=1e-9)
    naive = torch.exp(torch.tensor(logits) / 1e-4)
    assert not torch.isfinite(naive).all()  # what subtracting the max avoids
    batch = SettingsBatch([SamplingSettings(temperature=1e-4)], 4)
    assert sample(torch.tensor([logits]), batch, torch.tensor([0.5])).tolist() == [0]


def test_filtered_distribution_matches_a_plain_python_reference_on_random_cases():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(2, 12)
        logits = [round(rng.uniform(-3, 3), 1) for _ in range(n)]  # one decimal: many ties
        s = SamplingSettings(temperature=rng.choice([0, 0.3, 1.0, 1.7]), top_k=rng.choice([None, 0, 1, 3, 5, 20]),
                             top_p=rng.choice([1.0, 0.33, 0.5, 0.77, 0.93]), min_p=rng.choice([0.0, 0.05, 0.3]))
        assert dist(logits, **s.as_dict()) == pytest.approx(reference_distribution(logits, s), abs=1e-12), (logits, s)


def test_rows_with_different_settings_filter_independently():
    logits = torch.tensor([[math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]] * 3)
    rows = [SamplingSettings(top_k=1), SamplingSettings(top_p=0.55), SamplingSettings(min_p=0.2)]
    batch = SettingsBatch(rows, 4)
    from nanochat.engine import filtered_weights

    w, keep = filtered_weights(logits, batch)
    assert keep.tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    for row, s in enumerate(rows):
        assert (w[row] / w[row].sum()).tolist() == pytest.approx(dist(logits[row].tolist(), **s.as_dict()))


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs) if p > 0)


def test_20000_draws_match_the_filtered_distribution():
    logits = [2.0, 1.5, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0]
    s = SamplingSettings(temperature=0.8, top_k=8, top_p=0.95, min_p=0.03, seed=1234)
    expected = reference_distribution(logits, s)
    kept = [i for i, p in enumerate(expected) if p > 0]
    assert 4 <= len(kept) < 8  # every filter bites: top-k (8), then top-p and min-p remove more
    n = 20_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(s.seed), dtype=torch.float64)
    tokens = sample(torch.tensor([logits]).expand(n, -1), SettingsBatch([s] * n, len(logits)), uniforms)
    counts = torch.bincount(tokens, minlength=len(logits)).tolist()
    assert all(counts[i] == 0 for i in range(len(logits)) if i not in kept)  # filtered tokens never drawn
    stat = chi_square(counts, expected)
    assert stat < CHI2_CRIT_001[len(kept) - 1], (stat, counts, expected)
    # the same counts against the unfiltered softmax fail by far: the test can tell them apart
    unfiltered = reference_distribution(logits, SamplingSettings(temperature=0.8))
    assert chi_square(counts, unfiltered) > 10 * CHI2_CRIT_001[len(logits) - 1]


# ---------------------------------------------------------------------- the engine on a tiny real model

SIX = [SamplingSettings(temperature=0.9, seed=1), SamplingSettings(temperature=1.3, top_k=20, seed=2),
       SamplingSettings(temperature=0.7, top_p=0.8, seed=3), SamplingSettings(temperature=1.0, min_p=0.1, seed=3),
       SamplingSettings(temperature=0, seed=4), SamplingSettings(temperature=1e-4, seed=5)]


def test_batched_rows_equal_each_setting_alone(engine, prompt):
    batched = engine.generate(prompt, SIX, 40, stop_ids=())
    for s, row in zip(SIX, batched):
        alone = engine.generate(prompt, s, 40, stop_ids=())[0]
        assert row.token_ids == alone.token_ids and row.settings == s
        assert len(row.token_ids) == 40 and row.finish_reason == FINISH_LENGTH
    assert len({r.token_ids for r in batched[:4]}) == 4  # the settings really differ
    assert batched[4].token_ids == batched[5].token_ids  # T=1e-4 is greedy here


def test_rows_that_stop_leave_the_batch_and_the_rest_stay_exact(engine, prompt):
    # Stop tokens the sampled rows are likely to hit early: the commonest tokens of a first run.
    first = engine.generate(prompt, SIX, 40, stop_ids=())
    freq = torch.bincount(torch.tensor([t for r in first[:4] for t in r.token_ids[3:]]), minlength=VOCAB)
    greedy = set(first[4].token_ids)
    stops = [t for t in freq.argsort(descending=True).tolist() if t not in greedy][:4]  # the greedy rows run on
    batch_sizes = []
    hook = engine.model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        events = list(engine.stream(prompt, SIX, 40, stop_ids=stops))
    finally:
        hook.remove()
    results = engine.generate(prompt, SIX, 40, stop_ids=stops)
    reasons = [r.finish_reason for r in results]
    assert FINISH_STOP in reasons and FINISH_LENGTH in reasons
    for s, row in zip(SIX, results):
        alone = engine.generate(prompt, s, 40, stop_ids=stops)[0]
        assert row.token_ids == alone.token_ids and row.finish_reason == alone.finish_reason
        if row.finish_reason == FINISH_STOP:
            assert row.token_ids[-1] in stops and row.text == engine.decode(row.token_ids[:-1])
    # the model ran on exactly the rows still active: 1 prefill row, then the survivors of each step
    assert batch_sizes[0] == 1
    assert batch_sizes[1:] == [len(ev.rows) - len(ev.finished) for ev in events[:-1]]
    gone = set()
    for ev in events:
        assert not gone & set(ev.rows)
        gone |= set(ev.finished)


def test_a_row_extends_its_shorter_run_and_seeds_decide(engine, prompt):
    s = SamplingSettings(temperature=1.0, seed=9)
    short = engine.generate(prompt, s, 8, stop_ids=())[0].token_ids
    long = engine.generate(prompt, s, 30, stop_ids=())[0].token_ids
    assert long[:8] == short
    twins = engine.generate(prompt, [s, s, SamplingSettings(temperature=1.0, seed=10)], 30, stop_ids=())
    assert twins[0].token_ids == twins[1].token_ids == long
    assert twins[2].token_ids != long


def test_stream_events_agree_with_the_batch_api(engine, prompt):
    opts = TraceOptions(top_n=3, watch=(5,))
    rows = SIX[:3]
    events = list(engine.stream(prompt, rows, 12, trace=opts, stop_ids=()))
    results = engine.generate(prompt, rows, 12, trace=opts, stop_ids=())
    assert [ev.step for ev in events] == list(range(12))
    for r in results:
        assert tuple(ev.tokens[ev.rows.index(r.row)] for ev in events) == r.token_ids
        assert tuple(ev.trace(r.row) for ev in events) == r.trace
    assert events[-1].finished == {0: FINISH_LENGTH, 1: FINISH_LENGTH, 2: FINISH_LENGTH}
    plain = next(iter(engine.stream(prompt, rows, 2)))
    assert plain.trace(0) is None


def test_forcing_the_chosen_tokens_reproduces_the_run_and_a_branch_differs_only_from_there(engine, prompt):
    s = SamplingSettings(temperature=1.0, top_k=50, seed=21)
    opts = TraceOptions(top_n=5)
    base = engine.generate(prompt, s, 20, trace=opts, stop_ids=())[0]
    replay = engine.generate(prompt, s, 20, trace=opts, stop_ids=(), forced={0: dict(enumerate(base.token_ids[:10]))})[0]
    assert replay.token_ids == base.token_ids
    assert [t.forced for t in replay.trace] == [True] * 10 + [False] * 10
    step = 6
    alt = next(a.token_id for a in base.trace[step].alternatives if a.token_id != base.token_ids[step])
    branch = engine.generate(prompt, [s, s], 20, trace=opts, stop_ids=(), forced={1: {step: alt}})
    assert branch[0].token_ids == base.token_ids  # row 0 unaffected by its forced neighbour
    b = branch[1]
    assert b.token_ids[:step] == base.token_ids[:step] and b.token_ids[step] == alt
    assert b.trace[step].forced and not b.trace[step + 1].forced
    expected = next(a.sampled_prob for a in base.trace[step].alternatives if a.token_id == alt)
    assert b.trace[step].sampled_prob == pytest.approx(expected, rel=1e-5)  # batch of 2 vs 1: float32 noise


def test_trace_agrees_with_an_independent_full_softmax(engine, prompt):
    rows = [SamplingSettings(temperature=0.8, top_k=30, top_p=0.9, seed=3), SamplingSettings(temperature=0, seed=4),
            SamplingSettings(temperature=1.4, min_p=0.05, seed=5)]
    opts = TraceOptions(top_n=6, watch=(3, 100, 250))
    results = engine.generate(prompt, rows, 10, trace=opts, stop_ids=())
    model = engine.model
    for r in results:
        assert len(r.trace) == len(r.token_ids)
        for step, t in enumerate(r.trace):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(r.token_ids[:step])]))[0, -1].double()
            p = torch.softmax(logits, -1)
            ref_q = reference_distribution(logits.tolist(), r.settings)
            assert t.step == step and t.token_id == r.token_ids[step] and not t.forced
            assert t.model_prob == pytest.approx(p[t.token_id].item(), abs=1e-6)
            assert t.sampled_prob == pytest.approx(ref_q[t.token_id], abs=1e-6) and t.sampled_prob > 0
            assert t.rank == int((p > p[t.token_id]).sum()) + 1
            assert t.entropy == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
            top = torch.argsort(p, descending=True)[:6].tolist()
            assert [a.token_id for a in t.alternatives] == top
            for a in t.alternatives:
                assert a.model_prob == pytest.approx(p[a.token_id].item(), abs=1e-6)
                assert a.sampled_prob == pytest.approx(ref_q[a.token_id], abs=1e-6)
                assert a.kept == (ref_q[a.token_id] > 0)
            for w, tok in zip(t.watched, opts.watch):
                assert w.token_id == tok and w.model_prob == pytest.approx(p[tok].item(), abs=1e-6)
                assert w.rank == int((p > p[tok]).sum()) + 1


def test_trace_sizes(engine, prompt):
    none = engine.generate(prompt, SamplingSettings(), 3, trace=TraceOptions(top_n=0))[0]
    assert all(t.alternatives == () and t.watched == () for t in none.trace)
    every = engine.generate(prompt, SamplingSettings(), 2, trace=TraceOptions(top_n=VOCAB + 50))[0]
    assert len(every.trace[0].alternatives) == VOCAB
    assert sum(a.model_prob for a in every.trace[0].alternatives) == pytest.approx(1.0)
    assert sum(a.sampled_prob for a in every.trace[0].alternatives) == pytest.approx(1.0)
    assert engine.generate(prompt, SamplingSettings(), 3)[0].trace is None


def test_chat_prompts_and_stop_tokens(engine):
    tok = engine.tokenizer
    ids = engine.encode("Hello there", chat=True)
    assert ids == tok.render_chat_prompt([{"role": "user", "content": "Hello there"}])
    assert ids[0] == tok.get_bos_token_id() and ids[-1] == tok.encode_special("<|assistant_start|>")
    end, bos = tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()
    assert set(engine.default_stop_ids) == {end, bos}
    for stop in (end, bos):
        r = engine.generate(ids, SamplingSettings(seed=1), 20, forced={0: {3: stop}})[0]
        assert r.finish_reason == FINISH_STOP and len(r.token_ids) == 4 and r.token_ids[-1] == stop
        assert r.text == tok.decode(r.token_ids[:3])
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert engine.render_chat(conversation) == tok.render_chat_prompt(conversation)


def test_a_tokenizer_without_chat_tokens_stops_only_at_bos():
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="bytes", pat_str=r".", mergeable_ranks=ranks, special_tokens={"<|bos|>": 256})
    cfg = GPTConfig(sequence_len=32, vocab_size=257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32, window_pattern="L")
    eng = Engine(random_model(cfg, seed=2), Tokenizer(enc))
    assert eng.default_stop_ids == (256,)
    r = eng.generate(eng.encode("hi"), SamplingSettings(seed=3), 5, forced={0: {1: 256}})[0]
    assert r.finish_reason == FINISH_STOP and len(r.token_ids) == 2


# ---------------------------------------------------------------------- the upstream reference


@pytest.mark.parametrize("generation", ["current", "classic"])
def test_greedy_trace_reproduces_the_upstream_reference(upstream_dir, generation):
    base = upstream_dir / generation
    ref = json.loads((base / "reference_generation.json").read_text())
    loaded = load_model(base / "base_checkpoints" / "d2")
    engine = Engine(loaded.model, loaded.tokenizer)
    assert engine.encode(ref["prompt_text"]) == ref["prompt_token_ids"]
    r = engine.generate(ref["prompt_token_ids"], SamplingSettings(temperature=0), ref["max_tokens"],
                        trace=TraceOptions(top_n=3))[0]
    assert list(r.token_ids) == ref["generated_token_ids"]
    assert r.text == ref["generated_text"] and r.finish_reason == FINISH_LENGTH
    assert [t.token_id for t in r.trace] == ref["generated_token_ids"]
    assert all(t.rank == 1 and t.sampled_prob == 1.0 and t.alternatives[0].token_id == t.token_id for t in r.trace)
    assert all(not a.kept for t in r.trace for a in t.alternatives[1:])
    # a tiny temperature is greedy in effect, without overflowing
    cold = engine.generate(ref["prompt_token_ids"], SamplingSettings(temperature=1e-4), ref["max_tokens"])[0]
    assert list(cold.token_ids) == ref["generated_token_ids"]
