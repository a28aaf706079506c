"""
Check the learning-rate finder against the truth on the demo-size model: one range test, then a grid of
short real runs (multipliers x seeds, the same step budget each), and the two side by side.

    .venv/bin/python -m bench.lr_find [--profile full] [--depth 4] [--find-steps 100] [--grid-steps 150]
                                      [--mults 0.25,0.5,1,2,4] [--seeds 1,2] [--base-dir DIR]

Both sides use the demo profile's model and batch (scripts/demo.py: depth 4, width 128, sequence 256,
4,096 tokens per step, its learning rates); a multiplier scales all four of base_train's learning-rate
flags together, as `scripts.lr_find --group all` does (the smear group's fixed 0.2 is the one rate
base_train has no flag for: the finder scales it, the grid cannot). The finder runs in-process; each grid
point is a real `scripts.base_train` subprocess whose final val_bpb (one evaluation at the last step) is
read from its meta. The grid lands in `<base>/base_checkpoints/grid-x<mult>-s<seed>/` and the find in
`<base>/lrfind/`, and the base dir is scanned into `<base>/registry.sqlite`, so the app's Sweeps and LR
finder pages show both (`--base-dir DIR` keeps them; default: a temporary dir).

Prints `name: value` lines: the sweep cost in steps (target <= 100 to a suggestion), both suggestions,
each multiplier's mean val_bpb and seed spread, the grid's best multiplier and
`lr_find_suggestion_over_grid_best` (the classic min/10 rule over the grid's best; target 0.5 to 2),
with `lr_find_steepest_over_grid_best` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_base(base: Path, profile) -> None:
    """Shards and tokenizer of the demo profile (reused when present)."""
    from scripts.demo import write_shards
    from scripts.tok_train import train_tokenizer

    if not (base / "base_data").is_dir():
        write_shards(base / "base_data", profile.corpus_chars)
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        train_tokenizer(base, profile.vocab_size, max_chars=10**9, doc_cap=10_000)


def model_flags(profile, depth: int) -> list[str]:
    """The demo's model and batch flags (its RunSpec's, without the run-specific ones)."""
    from scripts.demo import RunSpec

    flags = RunSpec("x", depth, 1, -1, -1).flags(profile)
    keep = ("--depth", "--aspect-ratio", "--head-dim", "--max-seq-len", "--window-pattern", "--device-batch-size",
            "--total-batch-size", "--matrix-lr", "--embedding-lr", "--unembedding-lr", "--scalar-lr", "--device")
    return [x for i in range(0, len(flags), 2) if flags[i] in keep for x in flags[i:i + 2]]


def run_find(base: Path, profile, depth: int, steps: int, min_mult: float, max_mult: float) -> dict:
    from scripts import lr_find

    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    args = lr_find.build_parser().parse_args(model_flags(profile, depth) + [
        "--steps", str(steps), "--min-lr-mult", str(min_mult), "--max-lr-mult", str(max_mult), "--seed", "1"])
    return lr_find.find(args)


def grid_run(base: Path, profile, depth: int, mult: float, seed: int, steps: int) -> float | None:
    """One real base_train run with every LR flag x mult; its final val_bpb."""
    from nanochat import checkpoint_manager as cm
    from scripts.demo import RunSpec

    scaled = dataclasses.replace(profile, matrix_lr=profile.matrix_lr * mult, embedding_lr=profile.embedding_lr * mult,
                                 unembedding_lr=profile.unembedding_lr * mult, scalar_lr=profile.scalar_lr * mult)
    tag = f"grid-x{mult:g}-s{seed}"
    spec = RunSpec(tag, depth, steps, save_every=-1, eval_every=steps)
    cmd = [sys.executable, "-m", "scripts.base_train", *spec.flags(scaled), "--seed", str(seed),
           "--warmup-steps", str(min(profile.warmup_steps, max(1, steps // 4)))]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"grid run {tag} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    ckpt = cm.find_last_complete(base / "base_checkpoints" / tag)
    return cm.read_meta(ckpt).get("val_bpb")


def grid(base: Path, profile, depth: int, mults: list[float], seeds: list[int], steps: int, progress=print) -> dict:
    """{mult: [val_bpb per seed]} over the grid (runs already in the base dir are read, not retrained)."""
    from nanochat import checkpoint_manager as cm

    out: dict[float, list[float]] = {}
    t0, done, total = time.time(), 0, len(mults) * len(seeds)
    for m in mults:
        for s in seeds:
            run_dir = base / "base_checkpoints" / f"grid-x{m:g}-s{s}"
            if run_dir.is_dir():
                bpb = cm.read_meta(cm.find_last_complete(run_dir)).get("val_bpb")
            else:
                bpb = grid_run(base, profile, depth, m, s, steps)
            out.setdefault(m, []).append(bpb if bpb is not None else math.nan)
            done += 1
            eta = (time.time() - t0) / done * (total - done)
            progress(f"grid {done}/{total}: x{m:g} seed {s}: val_bpb {bpb} (eta {eta:.0f}s)")
    return out


def grid_best(results: dict[float, list[float]]) -> float:
    """The multiplier with the lowest mean val_bpb over seeds."""
    return min(results, key=lambda m: statistics.fmean(results[m]))


def main(argv=None) -> int:
    from scripts.demo import PROFILES

    ap = argparse.ArgumentParser(prog="python -m bench.lr_find", description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full", help="demo profile for data, model and LRs (default full)")
    ap.add_argument("--depth", type=int, default=4, help="model depth (default 4, the demo's final model)")
    ap.add_argument("--find-steps", type=int, default=100, help="range test length in steps (default 100)")
    ap.add_argument("--min-lr-mult", type=float, default=0.01, help="range test start multiplier (default 0.01)")
    ap.add_argument("--max-lr-mult", type=float, default=100.0, help="range test end multiplier (default 100)")
    ap.add_argument("--grid-steps", type=int, default=150, help="steps of each grid run (default 150)")
    ap.add_argument("--mults", default="0.25,0.5,1,2,4", help="grid multipliers (default 0.25,0.5,1,2,4)")
    ap.add_argument("--seeds", default="1,2", help="grid seeds (default 1,2)")
    ap.add_argument("--base-dir", type=Path, help="keep data, runs and registry here (default: a temporary dir)")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    mults = [float(x) for x in args.mults.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base_dir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        prepare_base(base, profile)
        found = run_find(base, profile, args.depth, args.find_steps, args.min_lr_mult, args.max_lr_mult)
        results = grid(base, profile, args.depth, mults, seeds, args.grid_steps,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        from registry import open_store

        with open_store(base / "registry.sqlite") as store:
            store.scan(base)
        s = found["suggestion"]
        best = grid_best(results)
        lines = {
            "lr_find_steps": found["steps_run"],
            "lr_find_stopped": found["stopped"],
            "lr_find_seconds": round(found["seconds"], 1),
            "lr_find_suggestion_min_over_10": s["min_over_10"],
            "lr_find_suggestion_steepest": s["steepest"],
            **{f"grid_val_bpb_x{m:g}": round(statistics.fmean(v), 4) for m, v in results.items()},
            **{f"grid_val_bpb_spread_x{m:g}": round(max(v) - min(v), 4) for m, v in results.items()},
            "grid_best_mult": best,
            "grid_steps_total": len(mults) * len(seeds) * args.grid_steps,
            "lr_find_suggestion_over_grid_best": round(s["min_over_10"] / best, 3) if s["min_over_10"] else None,
            "lr_find_steepest_over_grid_best": round(s["steepest"] / best, 3) if s["steepest"] else None,
        }
        for k, v in lines.items():
            print(f"{k}: {v}")
        if args.base_dir:
            print(f"# runs and registry kept in {base}: " + json.dumps({"registry": str(base / 'registry.sqlite')}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
