"""
Benchmark: rendering conversations with upstream's chat template (ids + training mask), per second.

Builds N conversations from the bundled Shakespeare corpus in two deterministic mixes, as JSON-shaped
dicts: "short", like upstream's identity conversations (1-3 exchanges of 3-20 and 5-40 words, ~100
tokens), and "long", like general SFT data (1-4 exchanges, user turns of 3-40 words, assistant turns of
5-400 words, ~500 tokens); in both one in ten assistant turns has a tool call and its output, one in
twenty conversations a system message. Then times, median of ROUNDS, per mix:
  (a) parse + render: `Conversation.parse` (full validation) then `ChatTemplate.render`, what a
      conversation file, the builder page and SFT do per conversation;
  (b) render only, of conversations already parsed.
Tokenizer: the upstream fixture's (2,048 tokens), or `--tokenizer DIR`. Target: (a) >= 10,000
conversations per second. Nearly all of the time is tiktoken's `encode_ordinary` (the same call
upstream makes), so the rate scales with the characters per conversation.

Run: `.venv/bin/python -m bench.chat [--conversations N] [--mix short long] [--tokenizer DIR]`. Not run by pytest. Ends with
`name: value` lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROUNDS = 5
TARGET = 10_000


MIXES = {"short": ((1, 3), (3, 20), (40,)), "long": ((1, 4), (3, 40), (20, 60, 150, 400))}


def make_conversations(n: int, mix: str = "long", seed: int = 0) -> list[dict]:
    exchanges, user_words, answer_words = MIXES[mix]
    words = []
    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            words += json.loads(line)["text"].split()
            if len(words) > 300_000:
                break
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        a = rng.randrange(len(words) - hi)
        return " ".join(words[a:a + rng.randint(lo, hi)])

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(3, 12)}] if rng.random() < 0.05 else []
        for _ in range(rng.randint(*exchanges)):
            msgs.append({"role": "user", "content": text(*user_words)})
            body = text(5, rng.choice(answer_words))
            if rng.random() < 0.1:
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": body},
                                                              {"type": "python", "text": "12/60"},
                                                              {"type": "python_output", "text": "0.2"},
                                                              {"type": "text", "text": "So 0.2."}]})
            else:
                msgs.append({"role": "assistant", "content": body})
        out.append({"messages": msgs})
    return out


def median_rate(fn, n: int) -> tuple[float, float, float]:
    """(per second of wall time, median wall seconds, per second of this process's CPU time): the CPU
    figure stays meaningful on a shared, busy machine."""
    walls, cpus = [], []
    for _ in range(ROUNDS):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    s = statistics.median(walls)
    return n / s, s, n / statistics.median(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=10_000, help="conversations per round (default 10,000)")
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream/current/tokenizer"),
                    help="tokenizer directory (default: the upstream fixture's)")
    ap.add_argument("--mix", nargs="+", choices=sorted(MIXES), default=["short", "long"],
                    help="conversation mixes to time (default: short long)")
    args = ap.parse_args(argv)
    from nanochat.conversation import Conversation
    from nanochat.tokenizer import Tokenizer

    template = Tokenizer.from_directory(args.tokenizer).chat_template()
    for mix in args.mix:
        raw = make_conversations(args.conversations, mix)
        parsed = [Conversation.parse(c) for c in raw]
        tokens = sum(len(template.render(c).ids) for c in parsed)
        full, full_s, full_cpu = median_rate(lambda raw=raw: [template.render(Conversation.parse(c)) for c in raw],
                                             len(raw))
        only, only_s, only_cpu = median_rate(lambda parsed=parsed: [template.render(c) for c in parsed], len(parsed))
        print(f"{mix}: {len(raw):,} conversations, {tokens:,} tokens ({tokens / len(raw):.0f} per conversation); "
              f"parse+render {full_s:.3f} s, render only {only_s:.3f} s (median of {ROUNDS})")
        print(f"chat_{mix}_parse_render_per_s: {full:.0f}")
        print(f"chat_{mix}_parse_render_per_cpu_s: {full_cpu:.0f}")
        print(f"chat_{mix}_render_only_per_s: {only:.0f}")
        print(f"chat_{mix}_render_only_per_cpu_s: {only_cpu:.0f}")
        print(f"chat_{mix}_tokens_per_s: {tokens / full_s:.0f}")
        print(f"chat_{mix}_target_met: {full >= TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
