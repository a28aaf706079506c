"""
Benchmarks of the chat half: rendering conversations with upstream's chat template (ids + training mask),
per second; and the Chat page's time to first token.

Builds N conversations from the bundled Shakespeare corpus in two deterministic mixes, as JSON-shaped
dicts: "short", like upstream's identity conversations (1-3 exchanges of 3-20 and 5-40 words, ~100
tokens), and "long", like general SFT data (1-4 exchanges, user turns of 3-40 words, assistant turns of
5-400 words, ~500 tokens); in both one in ten assistant turns has a tool call and its output, one in
twenty conversations a system message. Then times, median of ROUNDS, the sides in turn, per mix:
  (a) parse + render: `Conversation.parse` (full validation) then `ChatTemplate.render`, one
      conversation at a time (what the Chat page and the editor do);
  (b) parse + batch render: `ChatTemplate.render_batch` of all N (what a conversation file's summary,
      the builder page's table and tools/conversation_builder.py do): every text encoded first, in
      chunks on one thread per idle CPU (`--render-threads`), then assembled; the same ids (checked);
  (c) render only, of conversations already parsed, one by one and batched.
Tokenizer: the upstream fixture's (2,048 tokens), or `--tokenizer DIR`. Target: >= 10,000 conversations
per second (the better of (a) and (b)). Nearly all of the time is tiktoken's `encode_ordinary` (the same
call upstream makes), so the rate scales with the characters per conversation, and (b) with the free cores.

Time to first token (`--part ttft`): a conversation of alternating turns from the corpus whose prompt
(rendered, ending with <|assistant_start|>) is about --history tokens (default 200), answered through
the Chat page's own code path, `streamlit_app.data.ReplyStream` (render the conversation, the engine's
checks, its stream with the tool loop and a top-20 trace, the incremental text) until its first piece
of text, against a bare prefill of the same ids (a KV cache, one forward pass, the argmax of the last
logits). The model is bench.generation's demo-sized one saved as a checkpoint in a temporary folder
(loaded once, as the page's model cache does) or --checkpoint RUN_DIR. Median of ROUNDS each, one
torch thread unless --threads. Target: page / bare <= 1.5.

Run: `.venv/bin/python -m bench.chat [--part render ttft] [--conversations N] [--mix short long] [--tokenizer DIR]
[--render-threads N] [--history N] [--checkpoint RUN_DIR] [--threads N]`. Not run by pytest. Ends with `name: value` lines.
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
TTFT_ROUNDS = 15
TTFT_TARGET = 1.5


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


def median_rates(fns: dict, n: int) -> dict[str, tuple[float, float, float]]:
    """Per function: (per second of wall time, median wall seconds, per second of this process's CPU time),
    the functions called in turn each round so a busy machine slows them alike. The CPU figure of a
    one-thread function stays meaningful on a shared machine; a threaded one spends more CPU than wall."""
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(time.process_time() - c)
    out = {}
    for name in fns:
        s = statistics.median(walls[name])
        out[name] = (n / s, s, n / statistics.median(cpus[name]))
    return out


def history_messages(template, tokens: int) -> list[dict]:
    """Alternating turns from the corpus, ending with a user turn, whose prompt renders to about `tokens`."""
    from nanochat.conversation import Conversation

    turns = [m for c in make_conversations(50, "short", seed=1) for m in c["messages"] if m["role"] != "system"]
    turns = [m if isinstance(m["content"], str) else {"role": "assistant", "content": "So it is."} for m in turns]
    msgs: list[dict] = []
    for i in range(0, len(turns) - 1, 2):
        candidate = [*msgs, turns[i]]
        if len(template.render_prompt(Conversation.parse(candidate))) >= tokens:
            words = turns[i]["content"].split()
            while len(words) > 1:  # the last question shortened until the prompt is `tokens` or just under
                words.pop()
                candidate[-1] = {"role": "user", "content": " ".join(words)}
                if len(template.render_prompt(Conversation.parse(candidate))) <= tokens:
                    break
            return candidate
        msgs = [*candidate, turns[i + 1]]
    raise SystemExit(f"the corpus sample is shorter than {tokens} tokens")


def time_to_first_token(args) -> None:
    import logging
    import tempfile

    import torch

    from nanochat.sampling import SamplingSettings
    from streamlit_app import data

    for name in list(logging.root.manager.loggerDict):  # "no runtime" notes: the caches work without one
        if name.startswith("streamlit"):
            logging.getLogger(name).setLevel(logging.ERROR)

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, step = args.checkpoint, None
        if run_dir is None:
            from bench.generation import demo_model_and_tokenizer
            from nanochat.checkpoint_manager import save_checkpoint

            model, tok = demo_model_and_tokenizer()
            run_dir = str(Path(tmp) / "chatsft_checkpoints" / "bench")
            save_checkpoint(run_dir, 1, model.state_dict(), {"step": 1, "model_config": model.config.upstream_dict()})
            tok.save(Path(tmp) / "tokenizer")
            step = 1
        else:
            from nanochat.checkpoint_manager import list_checkpoints

            step = list_checkpoints(run_dir)[-1].step
        stamp = data.model_stamp(run_dir, step)
        loaded, engine = data.model(run_dir, step, stamp)  # loaded once, as the page's model cache does
        msgs = history_messages(loaded.tokenizer.chat_template(), args.history)
        settings = SamplingSettings(temperature=0.8, top_k=50, seed=42)

        def page() -> list[int]:
            stream = data.ReplyStream(run_dir, step, stamp, msgs, settings, 64, 20)
            next(iter(stream))
            return stream.prompt_ids

        ids = page()
        model = loaded.model

        @torch.inference_mode()
        def bare() -> None:
            cache = model.new_kv_cache(1, len(ids))
            model(torch.tensor([ids], dtype=torch.long, device=engine.device), kv_cache=cache)[:, -1].argmax(-1).item()

        times = {"page": [], "bare": []}
        for _ in range(TTFT_ROUNDS):  # interleaved, so load on the machine hits both alike
            for name, fn in (("bare", bare), ("page", page)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"ttft: {len(ids)}-token prompt ({len(msgs)} messages), model {engine.model.config.n_layer} layers / "
              f"vocab {engine.vocab_size}, {torch.get_num_threads()} thread(s), median of {TTFT_ROUNDS}")
        print(f"chat_history_tokens: {len(ids)}")
        print(f"chat_ttft_page_ms: {med['page'] * 1e3:.2f}")
        print(f"chat_ttft_bare_prefill_ms: {med['bare'] * 1e3:.2f}")
        print(f"chat_ttft_over_prefill: {med['page'] / med['bare']:.2f}")
        print(f"chat_ttft_target_met: {med['page'] / med['bare'] <= TTFT_TARGET}")


def render_rates(args) -> None:
    from nanochat.conversation import Conversation, idle_cpus
    from nanochat.tokenizer import Tokenizer

    template = Tokenizer.from_directory(args.tokenizer).chat_template()
    threads = args.render_threads or idle_cpus()
    for mix in args.mix:
        raw = make_conversations(args.conversations, mix)
        parsed = [Conversation.parse(c) for c in raw]
        tokens = sum(len(template.render(c).ids) for c in parsed)
        assert template.render_batch(parsed, threads=threads) == [template.render(c) for c in parsed]  # same ids
        r = median_rates({
            "serial": lambda raw=raw: [template.render(Conversation.parse(c)) for c in raw],
            "batch": lambda raw=raw: template.render_batch([Conversation.parse(c) for c in raw], threads=threads),
            "render_only": lambda parsed=parsed: [template.render(c) for c in parsed],
            "batch_render_only": lambda parsed=parsed: template.render_batch(parsed, threads=threads),
        }, len(raw))
        print(f"{mix}: {len(raw):,} conversations, {tokens:,} tokens ({tokens / len(raw):.0f} per conversation); "
              f"parse+render {r['serial'][1]:.3f} s one by one, {r['batch'][1]:.3f} s batched on {threads} thread(s); "
              f"render only {r['render_only'][1]:.3f} s, batched {r['batch_render_only'][1]:.3f} s "
              f"(median of {ROUNDS}, in turn)")
        print(f"chat_{mix}_parse_render_per_s: {r['serial'][0]:.0f}")
        print(f"chat_{mix}_parse_render_per_cpu_s: {r['serial'][2]:.0f}")
        print(f"chat_{mix}_render_only_per_s: {r['render_only'][0]:.0f}")
        print(f"chat_{mix}_render_only_per_cpu_s: {r['render_only'][2]:.0f}")
        print(f"chat_{mix}_parse_render_batch_per_s: {r['batch'][0]:.0f}")
        print(f"chat_{mix}_batch_render_only_per_s: {r['batch_render_only'][0]:.0f}")
        print(f"chat_{mix}_batch_over_serial: {r['batch'][0] / r['serial'][0]:.2f}")
        print(f"chat_{mix}_tokens_per_s: {tokens / r['batch'][1]:.0f}")
        print(f"chat_{mix}_target_met: {max(r['batch'][0], r['serial'][0]) >= TARGET}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", choices=["render", "ttft"], default=["render", "ttft"],
                    help="what to measure: render (conversations per second), ttft (the Chat page's time to first "
                         "token over a bare prefill); default both")
    ap.add_argument("--conversations", type=int, default=10_000, help="conversations per round (default 10,000)")
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/upstream/current/tokenizer"),
                    help="tokenizer directory for render (default: the upstream fixture's)")
    ap.add_argument("--mix", nargs="+", choices=sorted(MIXES), default=["short", "long"],
                    help="conversation mixes to time (default: short long)")
    ap.add_argument("--render-threads", type=int, default=0,
                    help="render: threads of the batched render (default 0 = one per idle CPU, as the builder uses)")
    ap.add_argument("--history", type=int, default=200, help="ttft: prompt tokens of the conversation (default 200)")
    ap.add_argument("--checkpoint", help="ttft: a run directory to load (default: a demo-sized random model)")
    ap.add_argument("--threads", type=int, default=1, help="ttft: torch intra-op threads (default 1; 0 = torch's default)")
    args = ap.parse_args(argv)
    if "render" in args.part:
        render_rates(args)
    if "ttft" in args.part:
        time_to_first_token(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
