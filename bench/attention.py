"""
Cost of capturing every layer's and head's attention (nanochat/attention.py's explicit path) against one
plain forward of the same prompt, on the demo-size model.

    .venv/bin/python -m bench.attention [--tokens 512] [--rounds 7] [--depth 4]

Model: the demo's final architecture (scripts/demo.py "full": depth 4, aspect ratio 32, head dim 32 ->
width 128, 4 heads, vocab 2,048) with a 512-token context and window pattern SSSL so the sliding windows
cut in (short window 128), random weights (the cost does not depend on them). Both sides run under
no_grad, alternating, median of `--rounds` after one warm-up each. Prints `name: value` lines, ending with
`attention_capture_over_forward` (target <= 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanochat.attention import capture
from nanochat.gpt import GPT
from nanochat.model_config import current_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per side (default 7)")
    ap.add_argument("--depth", type=int, default=4, help="model depth (default 4, the demo's final model)")
    args = ap.parse_args(argv)
    cfg = current_config(args.depth, 32, 32, max(args.tokens, 256), 2048, "SSSL")
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,))
    plain, captured = [], []
    with torch.no_grad():
        model(ids[None])
        capture(model, ids)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            model(ids[None])
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cap = capture(model, ids)
            captured.append(time.perf_counter() - t0)
    f, c = statistics.median(plain), statistics.median(captured)
    print(f"model: depth {cfg.n_layer}, width {cfg.n_embd}, {cfg.n_head} heads, windows {cfg.window_sizes()}")
    print(f"prompt_tokens: {args.tokens}")
    print(f"attention_matrices: {len(cap.weights) * cap.n_head}")
    print(f"plain_forward_ms: {f * 1000:.2f}")
    print(f"attention_capture_ms: {c * 1000:.2f}")
    print(f"attention_capture_over_forward: {c / f:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
