"""
Benchmark: generation speed of the sampling engine against the naive loop, on CPU.

Measures side by side in one run, each a few times (the median is printed), at N new tokens with
no stop tokens so every run generates exactly N:
  (a) the naive loop of the feature guide: re-run the whole sequence through the model every step;
  (b) the engine (KV cache, one prefill) with one row;
  (c) the engine with a top-20 trace;
  (d) six different settings batched in one engine call, versus the same six one after another.
Targets: (b) >= 5x the tokens/s of (a); (c) <= 1.15x the time of (b); (d) batched <= 2.5x the time
of one setting. For reference it also times the bare KV-cache argmax loop (no sampling at all): the
engine's time over it is the engine's own per-step cost; the rest is the model's forward pass.

The model is the demo size (sequence_len 512, vocab 2048, 4 layers, 4 heads, n_embd 128, SSSL),
initialised with init_weights and a small random perturbation, with a tokenizer trained on the
bundled corpus; or a real checkpoint with --checkpoint. Run: `.venv/bin/python -m bench.generation`.
Not run by pytest. Ends with `name: value` lines.

Timings use one intra-op thread unless --threads says otherwise: on a 2-core machine shared with
other processes, torch's worker threads turned the same 4 s loop into 70 s in some repeats, so
the default measures the code rather than the scheduler. Note that the naive loop's large matmuls
gain from more threads and single-token decoding does not, so --threads 0 lowers the speedup of (b).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nanochat.engine import Engine, SamplingSettings, TraceOptions  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

DEMO_CONFIG = GPTConfig(sequence_len=512, vocab_size=2048, n_layer=4, n_head=4, n_kv_head=4, n_embd=128,
                        window_pattern="SSSL")
SIX = [SamplingSettings(temperature=0.1, seed=1), SamplingSettings(temperature=0.5, seed=2), SamplingSettings(temperature=0.9, seed=3),
       SamplingSettings(temperature=1.2, top_k=50, seed=4), SamplingSettings(temperature=1.5, top_p=0.9, seed=5),
       SamplingSettings(temperature=0.9, min_p=0.05, seed=6)]


def corpus_texts(limit_chars: int = 400_000) -> list[str]:
    import gzip
    import json

    texts, total = [], 0
    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            total += len(texts[-1])
            if total > limit_chars:
                break
    return texts


def demo_model_and_tokenizer():
    from nanochat.tokenizer import Tokenizer

    model = GPT(DEMO_CONFIG)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # init_weights zeroes the output projections (every block starts as the identity); perturb
        # them so each layer does real work and the logits are not flat.
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    texts = corpus_texts()
    tok = Tokenizer.train_from_iterator((t[i:i + 10_000] for t in texts for i in range(0, len(t), 10_000)),
                                       DEMO_CONFIG.vocab_size)
    return model.eval(), tok


def naive_generate(model, prompt: list[int], new_tokens: int, temperature: float, seed: int) -> list[int]:
    """The feature guide's loop: the whole sequence through the model at every step, no cache."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids], dtype=torch.long))[0, -1]
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).item()
            out.append(nxt)
            ids.append(nxt)
    return out


def cache_loop(model, prompt: list[int], new_tokens: int) -> None:
    """The floor for (b): the bare KV-cache decode loop (argmax, no settings, no sampling, no checks),
    so the engine's own per-step cost shows as engine time over this."""
    with torch.inference_mode():
        cache = model.new_kv_cache(1, len(prompt) + new_tokens)
        logits = model(torch.tensor([prompt], dtype=torch.long), kv_cache=cache)[:, -1]
        for _ in range(new_tokens - 1):
            logits = model(logits.argmax(-1)[:, None], kv_cache=cache)[:, -1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a real checkpoint (run directory or model file) instead of the demo model")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run (default 256)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements of each variant; the median is printed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1; 0: torch's default, one per core). On a small machine "
                         "shared with other work, worker threads make one run's time swing tenfold")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        from nanochat.checkpoint_manager import load_model

        loaded = load_model(args.checkpoint)
        model, tok = loaded.model, loaded.tokenizer
    else:
        model, tok = demo_model_and_tokenizer()
    prompt = tok.encode(corpus_texts(20_000)[0], prepend=tok.get_bos_token_id())[:args.prompt_tokens]
    n = args.new_tokens
    cfg = model.config
    if len(prompt) + n > model.max_positions:
        print(f"error: prompt {len(prompt)} + {n} new tokens exceed {model.max_positions} positions", file=sys.stderr)
        return 1
    engine = Engine(model, tok)
    one = SamplingSettings(temperature=0.9, seed=7)

    def run_naive():
        naive_generate(model, prompt, n, 0.9, 7)

    def run_cache_loop():
        cache_loop(model, prompt, n)

    def run_engine():
        r = engine.generate(prompt, one, n, stop_ids=())
        assert len(r[0].token_ids) == n

    def run_traced():
        r = engine.generate(prompt, one, n, trace=TraceOptions(top_n=20), stop_ids=())
        assert len(r[0].trace) == n

    def run_batched():
        r = engine.generate(prompt, SIX, n, stop_ids=())
        assert all(len(x.token_ids) == n for x in r)

    def run_sequential():
        for s in SIX:
            engine.generate(prompt, s, n, stop_ids=())

    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, n_layer={cfg.n_layer} "
          f"n_embd={cfg.n_embd} vocab={cfg.vocab_size}; prompt {len(prompt)} tokens, {n} new tokens; "
          f"torch threads {torch.get_num_threads()}; {args.repeats} repeats, medians")
    run_engine()  # warm-up (allocator, first-call dispatch)
    runs = {"naive": run_naive, "cache_loop": run_cache_loop, "engine": run_engine, "traced": run_traced, "batched6": run_batched,
            "sequential6": run_sequential}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        for name, fn in runs.items():  # interleaved, so drift in machine load hits every variant alike
            times[name].append(timed(fn))
        print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    one_setting = med["sequential6"] / len(SIX)
    figures = {
        "new_tokens": n,
        "prompt_tokens": len(prompt),
        "naive_tok_per_s": n / med["naive"],
        "engine_tok_per_s": n / med["engine"],
        "engine_vs_naive_speedup": med["naive"] / med["engine"],
        "cache_loop_tok_per_s": n / med["cache_loop"],
        "engine_time_vs_cache_loop": med["engine"] / med["cache_loop"],
        "trace_tok_per_s": n / med["traced"],
        "trace_time_ratio": med["traced"] / med["engine"],
        "batched6_tok_per_s": len(SIX) * n / med["batched6"],
        "sequential6_tok_per_s": len(SIX) * n / med["sequential6"],
        "batched6_time_vs_one": med["batched6"] / one_setting,
        "batched6_vs_sequential_speedup": med["sequential6"] / med["batched6"],
    }
    figures["target_engine_5x_naive"] = figures["engine_vs_naive_speedup"] >= 5
    figures["target_trace_within_1.15x"] = figures["trace_time_ratio"] <= 1.15
    figures["target_batched6_within_2.5x_one"] = figures["batched6_time_vs_one"] <= 2.5
    for k, v in figures.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
