"""
Benchmark: the deep integrity check of a ~1 GB checkpoint, memory and throughput, against sha256sum.

Writes a real checkpoint to a temporary directory: a current-architecture d12 model (n_embd 768,
vocab 32768, seq 2048: 286M float32 parameters, 1.15 GB `model_000001.pt` via torch.save), its meta
and a small optimizer shard. Then, side by side in one run, each ROUNDS times after one warm-up read
(so both sides read from the page cache; the median is printed):
  (a) `sha256sum` over the checkpoint's files;
  (b) `registry.integrity.deep_check` in a fresh child process, which reports its own duration and its
      peak RSS (VmHWM, reset with /proc/self/clear_refs after imports) above its baseline (VmRSS once
      python, torch, numpy and the registry are imported, i.e. before the check reads anything).
Targets: peak RSS above baseline < 300 MB; deep-check MB/s >= 70% of sha256sum's.

Run: `.venv/bin/python -m bench.integrity [--keep DIR]`. Not run by pytest. Ends with `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROUNDS = 3

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy, torch  # the check imports both lazily: count them in the baseline, not as the check's memory
from nanochat import checkpoint_manager as cm
from registry import integrity

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak below is the check's own
    reset = True
except OSError:
    reset = False
ckpt = cm.list_checkpoints(sys.argv[2])[0]
t0 = time.perf_counter()
result = integrity.deep_check(ckpt)
elapsed = time.perf_counter() - t0
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "hwm_reset": reset, "elapsed": elapsed,
                  "bytes": result.bytes_read, "problems": [p.code for p in result.problems]}))
"""


def write_checkpoint(directory: Path) -> list[Path]:
    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.model_config import current_config, expected_state_shapes

    cfg = current_config(12, max_seq_len=2048, vocab_size=32768)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(shape).normal_(0, 0.02, generator=gen) for k, shape in expected_state_shapes(cfg).items()}
    meta = {"step": 1, "val_bpb": 3.2, "model_config": cfg.upstream_dict(),
            "user_config": {"depth": 12, "num_iterations": 100}, "device_batch_size": 1, "max_seq_len": 2048,
            "total_batch_size": 2048, "world_size": 1, "num_iterations": 100}
    optim = {"state": {0: {"momentum_buffer": torch.zeros(768, 768)}}, "param_groups": [{"lr": 0.02, "params": [0]}]}
    ckpt = save_checkpoint(directory, 1, state, meta, optimizer_state=optim)
    del state
    return ckpt.files


def time_sha256sum(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_deep_check(directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(directory)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="write the checkpoint here and keep it (default: a temporary dir, removed)")
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        sys.exit("error: sha256sum is not installed (coreutils)")
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_integrity_"))
    try:
        t0 = time.perf_counter()
        files = write_checkpoint(directory)
        size = sum(f.stat().st_size for f in files)
        print(f"wrote {size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s to {directory}", file=sys.stderr)
        time_sha256sum(files)  # warm the page cache for both sides
        sha_times, deep_runs = [], []
        for i in range(ROUNDS):
            sha_times.append(time_sha256sum(files))
            deep_runs.append(run_deep_check(directory))
            print(f"round {i + 1}: sha256sum {sha_times[-1]:.2f} s, deep check {deep_runs[-1]['elapsed']:.2f} s",
                  file=sys.stderr)
        problems = {c for r in deep_runs for c in r["problems"]}
        if problems:
            sys.exit(f"error: the intact synthetic checkpoint reported problems: {sorted(problems)}")
        assert all(r["bytes"] == size for r in deep_runs), "the deep check did not read every byte"
        deep_s = statistics.median(r["elapsed"] for r in deep_runs)
        sha_s = statistics.median(sha_times)
        peak = max(r["peak"] - r["baseline"] for r in deep_runs)
        mb = size / 1e6
        print(f"checkpoint_mb: {mb:.0f}")
        print(f"deep_check_baseline_rss_mb: {deep_runs[0]['baseline'] / 1e6:.0f}")
        print(f"deep_check_peak_rss_above_baseline_mb: {peak / 1e6:.1f}")
        print(f"deep_check_hwm_reset_after_imports: {all(r['hwm_reset'] for r in deep_runs)}")
        print(f"deep_check_seconds: {deep_s:.3f}")
        print(f"sha256sum_seconds: {sha_s:.3f}")
        print(f"deep_check_mb_per_s: {mb / deep_s:.0f}")
        print(f"sha256sum_mb_per_s: {mb / sha_s:.0f}")
        print(f"deep_check_vs_sha256sum: {sha_s / deep_s:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
