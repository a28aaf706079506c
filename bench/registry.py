"""
Registry benchmark: the scanner and the history query, each against a floor or target measured in this
one run on this machine.

1. First scan of 10,000 checkpoints (20 runs x 500 steps, --runs/--steps; tiny real torch.save model and optimizer
   files copied from one saved pair, a meta JSON each, and a 2,000-line metrics.jsonl per run), over
   the floor: a bare loop that stats every file of the same tree and reads every meta JSON, the least
   any scan must do (`first_scan_vs_floor`; no target, lower is better).
2. Re-scan with nothing changed (target: at most 5% of the first scan).
   ROUNDS rounds, each the floor, a first scan into a fresh registry, then RESCANS re-scans; the
   figures are medians (a 70 ms re-scan on a shared machine is easily hit by another process).
3. Our scan of 50 single-file checkpoints of ~20 MB (the metadata lives in each pickle), ROUNDS rounds
   into a fresh registry each, median; once more in a fresh interpreter (after its imports and opening
   the registry, as `python -m registry scan` does); and once with the files out of the page cache.
   (Issue 15 dropped the earlier target of 100x over torch.load: a warm 20 MB torch.load takes only
   6-9 ms, which left 60-90 us per checkpoint for everything a scan does.)
4. History of one metric series of 1,000,000 points downsampled to 2,000 (target: at most 100 ms).
5. Where the first scan's time goes: ROUNDS more first scans with a CPU-time timer around each part
   (SPLIT; a part's time excludes the parts it calls), printed as `first_scan_<part>_share` lines (the
   median share of the scan's CPU time; `other` is the rest: the scan's own loop, counting and progress).
   Shares, not seconds: they hold on a busy machine, where wall times do not.

Usage: python -m bench.registry [--dir DIR] [--keep] [--runs N --steps N] [--first-scan-only].
Ends with `name: value` lines.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS, STEPS = 20, 500
ROUNDS, RESCANS = 3, 3
BIG_CHECKPOINTS = 50
HISTORY_POINTS = 1_000_000


def write_prototypes(proto: Path):
    """One tiny real model file and optimizer shard (torch.save) that synthetic trees copy or hard-link;
    returns the config they were saved from."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16, window_pattern="L")
    proto.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(GPT(cfg).state_dict(), proto / "model.pt")
    torch.save({"state": {}, "param_groups": [{"lr": 0.02, "params": [0]}]}, proto / "optim.pt")
    return cfg


def build_small_tree(root: Path) -> int:
    """RUNS runs x STEPS checkpoints, each a real (tiny) torch.save model + optimizer shard + meta."""
    proto = root / "_proto"
    cfg = write_prototypes(proto)
    count = 0
    for r in range(RUNS):
        run = root / "base_checkpoints" / f"d{r + 1}"
        run.mkdir(parents=True)
        lines = []
        for i in range(STEPS):
            step = (i + 1) * 10
            shutil.copyfile(proto / "model.pt", run / f"model_{step:06d}.pt")
            shutil.copyfile(proto / "optim.pt", run / f"optim_{step:06d}_rank0.pt")
            meta = {"step": step, "val_bpb": 3.0 - step / 10_000, "model_config": cfg.upstream_dict(),
                    "user_config": {"depth": 1, "num_iterations": STEPS * 10, "run": f"bench{r}"},
                    "device_batch_size": 4, "max_seq_len": 16, "total_batch_size": 64, "world_size": 1,
                    "num_iterations": STEPS * 10, "resume_segment": 1, "train_state": False, "workbench_version": 1}
            (run / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
            count += 1
        for step in range(2000):
            lines.append(json.dumps({"step": step, "segment": 1, "wall_time": 1.7e9 + step, "train_loss": 5 - step / 1000,
                                     "lrm": 1.0, "tok_per_sec": 1000.0, "dt_ms": 12.0}) + "\n")
        (run / "metrics.jsonl").write_text("".join(lines))
    shutil.rmtree(proto)
    return count


def build_big_tree(root: Path, count: int = BIG_CHECKPOINTS) -> float:
    """Single-file checkpoints (the guide's layout: {model, metadata, optimizers}) of ~20 MB (a 5M-parameter model)."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    cfg = GPTConfig(sequence_len=256, vocab_size=8192, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="L")
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    sizes = []
    for i in range(count):
        d = root / f"run{i:02d}"
        d.mkdir(parents=True)
        meta = {"step": 1000 + i, "val_bpb": 2.0 + i / 100, "model_config": cfg.upstream_dict(),
                "user_config": {"depth": 4, "num_iterations": 5000}, "device_batch_size": 8, "max_seq_len": 256}
        torch.save({"model": state, "metadata": meta, "optimizers": [{"state": {}, "param_groups": []}]}, d / "checkpoint.pt")
        sizes.append((d / "checkpoint.pt").stat().st_size)
    return statistics.mean(sizes) / 1e6


def floor_pass(tree: Path) -> int:
    """The least a scan of `tree` must do: stat every file and read every meta JSON. Returns files stat'ed."""
    n = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(dirpath, name)
            os.stat(path)
            n += 1
            if name.startswith("meta_") and name.endswith(".json"):
                with open(path, "rb") as f:
                    json.loads(f.read())
    return n


# Our scan alone in a fresh interpreter: argv = registry, tree, checkpoints; prints the seconds of the scan.
_FRESH_OURS = """
import sys, time
from registry import open_store
from registry.scanner import scan_path
store = open_store(sys.argv[1])
t = time.perf_counter()
report = scan_path(store, sys.argv[2])
print(time.perf_counter() - t)
assert report.checkpoints_new == int(sys.argv[3]), report
"""


# The parts of a first scan the split times: (part, module, attribute). A call to one part made inside
# another counts for the inner part only (so the shares add up to 1 with `other`), except that a metrics
# file's transactions count as its ingest. The timers cost ~1 us per call, so hot functions (one call per
# metrics line) are left inside their part: metrics lines' step and segment checks, inlined in
# parse_metrics_line, count as metrics_ingest; their JSON nesting check as bounds.
SPLIT = (
    ("walk_stat", "registry.scanner", "walk_runs"), ("walk_stat", "registry.scanner", "_plan_runs"),
    ("quick_check", "registry.inspection", "quick_check"),  # files, zips, meta, resume files, the model's pickle
    ("inspect_other", "registry.scanner", "inspect_checkpoint"),  # around the quick check: resumability, the slot
    ("bounds", "nanochat.bounds", "meta_problem"), ("bounds", "nanochat.bounds", "json_depth_exceeds"),
    ("checkpoint_writes", "registry.writer", "write_batch"),  # rows of runs, checkpoints, files, configs
    ("metrics_ingest", "registry.scanner", "sync_metrics_file"),  # parse, points, series, their transactions
    ("registry_reads", "registry.writer", "runs_under"), ("registry_reads", "registry.writer", "load_checkpoints"),
    ("registry_reads", "registry.writer", "claim_runs"),  # origins: runs indexed before schema 5
    ("scan_owner", "registry.writer", "start_scan"), ("scan_owner", "registry.writer", "finish_scan"),
    ("scan_owner", "registry.scanner", "_owner"),
    ("token_bytes", "registry.tokenizer_checks", "refresh_under"),
    ("transactions", "registry.db", "Database.write"),  # begin, commit, the session around the other writes
)


def first_scan_split(store, tree: Path) -> tuple[dict[str, float], float]:
    """One first scan of `tree` with each SPLIT part timed (CPU time): ({part: share of the scan}, its CPU s)."""
    from registry.scanner import scan_path

    totals: dict[str, float] = dict.fromkeys([part for part, _, _ in SPLIT] + ["other"], 0.0)
    stack = [["other", 0.0]]  # per open part: its name and the time of the parts it called
    clock = time.process_time

    def timed(part, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if part == "transactions" and stack[-1][0] == "metrics_ingest":
                return fn(*args, **kwargs)
            start, frame = clock(), [part, 0.0]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                took = clock() - start
                totals[part] += took - frame[1]
                stack[-1][1] += took
        return inner

    patched = []
    for part, module, attr in SPLIT:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timed(part, getattr(owner, name)))
    try:
        start = clock()
        scan_path(store, tree)
        total = clock() - start
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    totals["other"] = total - sum(totals.values())
    return {part: t / total for part, t in totals.items()}, total


def fresh_process(code: str, *args) -> float:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return float(out.stdout.split()[-1])


def evict_page_cache(tree: Path) -> None:
    """Drop the tree's files from the OS page cache (POSIX_FADV_DONTNEED; no root needed), as after a
    reboot or once a training run's gigabytes of later checkpoints have pushed them out."""
    os.sync()
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def our_scans(tree: Path, stores: Path, rounds: int, count: int, cold: bool = False) -> list[float]:
    """Our first scan of `tree` into a fresh registry, `rounds` times (with `cold`, the tree leaves the
    page cache before each)."""
    from registry import open_store
    from registry.scanner import scan_path

    out = []
    for i in range(rounds):
        store = open_store(stores / f"{tree.name}{'-cold' if cold else ''}{i}.sqlite")
        if cold:
            evict_page_cache(tree)
        t = time.perf_counter()
        report = scan_path(store, tree)
        out.append(time.perf_counter() - t)
        assert report.checkpoints_new == count, report
        store.close()
    print(f"{tree.name}{' (cold page cache)' if cold else ''}: ours {[round(x, 4) for x in out]} s", file=sys.stderr)
    return out


def main() -> int:
    global RUNS, STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"runs in the synthetic tree (default {RUNS})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"checkpoints per run (default {STEPS})")
    ap.add_argument("--first-scan-only", action="store_true",
                    help="only the first scan, its re-scans and its split (no 20 MB checkpoints, no history)")
    args = ap.parse_args()
    RUNS, STEPS = args.runs, args.steps
    from registry import open_store
    from registry.scanner import scan_path

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-registry-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {}
    try:
        t = time.perf_counter()
        n = build_small_tree(work / "small")
        print(f"built {n} checkpoints in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        firsts, rescans, floors = [], [], []
        for i in range(ROUNDS):
            t = time.perf_counter()
            floor_pass(work / "small")
            floors.append(time.perf_counter() - t)
            store = open_store(work / f"small{i}.sqlite")
            t = time.perf_counter()
            first = scan_path(store, work / "small")
            firsts.append(time.perf_counter() - t)
            assert first.checkpoints_new == n and first.metric_lines == RUNS * 2000, first
            for _ in range(RESCANS):
                t = time.perf_counter()
                again = scan_path(store, work / "small")
                rescans.append(time.perf_counter() - t)
                assert again.checkpoints_unchanged == n and again.checkpoints_new == again.checkpoints_changed == 0, again
            store.close()
        print(f"floors {[round(x, 3) for x in floors]} s, first scans {[round(x, 3) for x in firsts]} s, "
              f"re-scans {[round(x, 4) for x in rescans]} s", file=sys.stderr)
        figures["floor_10k_s"] = round(statistics.median(floors), 3)
        figures["first_scan_10k_s"] = round(statistics.median(firsts), 3)
        figures["first_scan_vs_floor"] = round(statistics.median(firsts) / statistics.median(floors), 1)
        figures["rescan_10k_s"] = round(statistics.median(rescans), 4)
        figures["rescan_fraction"] = round(statistics.median(rescans) / statistics.median(firsts), 4)
        splits, cpu = [], []
        for i in range(ROUNDS):
            store = open_store(work / f"split{i}.sqlite")
            t = time.process_time()
            scan_path(store, work / "small")  # the same scan untimed, for the timers' own cost
            cpu.append(time.process_time() - t)
            store.close()
            store = open_store(work / f"split-timed{i}.sqlite")
            shares, timed_cpu = first_scan_split(store, work / "small")
            splits.append(shares)
            cpu.append(timed_cpu)
            store.close()
        print(f"first scans' CPU time untimed, timed: {[round(x, 3) for x in cpu]} s", file=sys.stderr)
        for part in splits[0]:
            figures[f"first_scan_{part}_share"] = round(statistics.median(s[part] for s in splits), 3)
        if args.first_scan_only:
            return _print(figures)

        t = time.perf_counter()
        mb = build_big_tree(work / "big")
        print(f"built {BIG_CHECKPOINTS} checkpoints of {mb:.1f} MB in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        (work / "stores").mkdir()
        figures["our_scan_50_s"] = round(statistics.median(our_scans(work / "big", work / "stores", ROUNDS,
                                                                     BIG_CHECKPOINTS)), 4)
        figures["checkpoint_mb"] = round(mb, 1)
        figures["our_scan_50_fresh_process_s"] = round(
            fresh_process(_FRESH_OURS, work / "stores" / "fresh.sqlite", work / "big", BIG_CHECKPOINTS), 4)
        # The files on disk rather than in RAM: what scanning a base dir of real runs meets, since their
        # checkpoints (gigabytes) are rarely all in the page cache.
        figures["our_scan_50_cold_s"] = round(statistics.median(our_scans(work / "big", work / "stores", ROUNDS,
                                                                          BIG_CHECKPOINTS, cold=True)), 4)
        shutil.rmtree(work / "big")

        store = open_store(work / "history.sqlite")
        run = work / "history" / "base_checkpoints" / "d1"
        run.mkdir(parents=True)
        shutil.copytree(work / "small" / "base_checkpoints" / "d1", run, dirs_exist_ok=True)
        (run / "metrics.jsonl").unlink()
        scan_path(store, run)
        run_id = store.resolve_run(str(run)).id
        from registry import metrics

        t = time.perf_counter()
        chunk = 100_000
        for i in range(0, HISTORY_POINTS, chunk):
            pts = [("train_loss", s, 1, 3.0 + ((s * 7919) % 1000) / 1000, 1.7e9 + s) for s in range(i, i + chunk)]
            with store.db.session(write=True) as s:
                store.db.lock_run(s, run_id)
                metrics.ingest_points(s, store.db, run_id, pts)
        figures["ingest_1m_points_s"] = round(time.perf_counter() - t, 2)
        timings = []
        for _ in range(7):
            t = time.perf_counter()
            [series] = store.metric_history(run_id, "train_loss", max_points=2000)
            timings.append(time.perf_counter() - t)
        assert series.total_points == HISTORY_POINTS and 0 < len(series.points) <= 2000
        figures["history_1m_points_returned"] = len(series.points)
        figures["history_1m_to_2k_first_ms"] = round(timings[0] * 1000, 2)
        figures["history_1m_to_2k_ms"] = round(statistics.median(timings) * 1000, 2)
        store.close()
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return _print(figures)


def _print(figures: dict) -> int:
    for k, v in figures.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
