"""
App benchmark: is every page's data ready in under a second with a big registry?

Builds a synthetic nanochat tree of 100 runs x 100 checkpoints (10,000 checkpoints: a real tiny
torch.save model and optimizer shard per step, hard-linked, and a meta JSON each) with a 2,500-line
metrics.jsonl per run (4 train series + val_bpb: ~1,010,000 metric points; every 10th run resumed, so
it has two segments), indexes it with the registry's own scanner, then times, with the caches cleared,
the same `streamlit_app.data` functions each page calls on its first render:

- runs: summary, runs table, curves of the newest run (and of 5 runs)
- checkpoints: one run's checkpoint table, one checkpoint's detail, a config diff
- resume: the resume plan of a run (files read from disk, deep results reused)
- integrity: every checkpoint of every run with its integrity state, one checkpoint's history
- generate / compare: the loadable checkpoints to pick from (model loading and sampling are the engine's
  business: bench/generation.py)
- calculator: the runs to prefill from, and the estimate with its 25-depth sweep

Usage: python -m bench.app [--dir DIR] [--keep]. Target: every *_page_data_s < 1 s. Ends with
`name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RUNS, CKPTS, LINES = 100, 100, 2_500
SAVE_EVERY = LINES // CKPTS  # a checkpoint every 25 steps
RESUMED_EVERY = 10  # runs 0, 10, 20... were killed and resumed


def build_tree(root: Path) -> None:
    from bench.registry import write_prototypes

    proto = root / "_proto"
    cfg = write_prototypes(proto)
    t0 = 1.75e9
    for r in range(RUNS):
        run = root / "base_checkpoints" / f"r{r:03d}"
        run.mkdir(parents=True)
        resumed = r % RESUMED_EVERY == 0
        user = {"depth": 1, "num_iterations": LINES, "run": f"bench{r}", "aspect_ratio": 16, "head_dim": 16, "max_seq_len": 16,
                "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05, "total_batch_size": 64,
                "device_batch_size": 4, "model_tag": f"r{r:03d}", "matrix_lr": 0.02 + r / 1e4}
        for i in range(CKPTS):
            step = (i + 1) * SAVE_EVERY
            os.link(proto / "model.pt", run / f"model_{step:06d}.pt")
            os.link(proto / "optim.pt", run / f"optim_{step:06d}_rank0.pt")
            meta = {"step": step, "val_bpb": 3.0 - step / 2000 + r / 1000, "model_config": cfg.upstream_dict(), "user_config": user,
                    "device_batch_size": 4, "max_seq_len": 16, "total_batch_size": 64, "world_size": 1,
                    "num_iterations": LINES, "resume_segment": 2 if resumed and step > LINES // 2 else 1,
                    "train_state": False, "workbench_version": 1,
                    "loop_state": {"min_val_bpb": 3.0 - step / 2000, "smooth_train_loss": 4.0, "total_training_time": step * 0.1}}
            (run / f"meta_{step:06d}.json").write_text(json.dumps(meta))
        lines = []
        segments = [(1, 0, LINES // 2 + 30), (2, LINES // 2, LINES)] if resumed else [(1, 0, LINES)]
        for seg, first, last in segments:
            for step in range(first, last):
                row = {"step": step, "segment": seg, "wall_time": t0 + r * 1e5 + step * 0.1 + seg * 600,
                       "train_loss": 5 - step / 1000 + (step % 7) / 50, "lrm": 1.0, "tok_per_sec": 1000.0 + step % 13, "dt_ms": 100.0}
                if step % SAVE_EVERY == 0:
                    row["val_bpb"] = 3.0 - step / 2000 + r / 1000
                lines.append(json.dumps(row) + "\n")
        (run / "metrics.jsonl").write_text("".join(lines))
    shutil.rmtree(proto)


def timed(name: str, fn, figures: dict) -> object:
    from streamlit_app import data

    data.clear_registry_caches()
    t = time.perf_counter()
    out = fn()
    figures[name] = round(time.perf_counter() - t, 4)
    print(f"{name:<28} {figures[name]:.3f} s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (a second run with --dir reuses it)")
    args = ap.parse_args()
    import streamlit.logger

    streamlit.logger.set_log_level("error")  # "No runtime found": expected outside `streamlit run`
    from registry import open_store
    from streamlit_app import data

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-app-"))
    tree, db = work / "tree", work / "registry.sqlite"
    figures: dict[str, object] = {}
    try:
        if not db.exists():
            t = time.perf_counter()
            build_tree(tree)
            print(f"built {RUNS * CKPTS} checkpoints in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            t = time.perf_counter()
            with open_store(db) as s:
                report = s.scan(tree)
            figures["index_s"] = round(time.perf_counter() - t, 1)
            assert report.checkpoints_new == RUNS * CKPTS, report
        url = str(db)
        t = time.perf_counter()
        data.store(url)
        figures["store_open_s"] = round(time.perf_counter() - t, 4)
        summary = data.store(url).summary()
        figures["runs"], figures["checkpoints"], figures["metric_points"] = summary.runs, summary.checkpoints, summary.metric_points
        assert summary.runs == RUNS and summary.checkpoints == RUNS * CKPTS and summary.metric_points >= 1_000_000, summary

        runs = data.store(url).list_runs()
        newest, resumed = runs[0], next(r for r in runs if r.segments > 1)
        five = tuple(r.id for r in runs[:5])

        def runs_page(ids):
            data.summary(url)
            data.runs_table(url)
            df = data.metrics(url, ids)
            assert len(df) > 0 and len(df) <= 2 * 2000 * len(ids), len(df)

        timed("runs_page_data_s", lambda: runs_page((newest.id,)), figures)
        timed("runs_page_5_runs_s", lambda: runs_page(five), figures)

        def checkpoints_page():
            table = data.checkpoints_table(url, resumed.id)
            assert len(table) == CKPTS
            data.checkpoint_detail(url, int(table["id"].iloc[-1]))
            diff = data.config_diff(url, f"{resumed.id}@{SAVE_EVERY}", f"{resumed.id}@{LINES}")
            assert diff.changed

        timed("checkpoints_page_data_s", checkpoints_page, figures)

        def resume_page():
            plan = data.resume_plan(url, resumed.id, None)
            assert plan.step == LINES and plan.lr_curve()

        timed("resume_page_data_s", resume_page, figures)

        def integrity_page():
            df = data.all_checkpoints(url)
            assert len(df) == RUNS * CKPTS
            data.integrity_history(url, int(df["id"].iloc[0]))

        timed("integrity_page_data_s", integrity_page, figures)
        timed("generate_page_data_s", lambda: data.runs(url) and data.model_choices(url), figures)
        timed("compare_page_data_s", lambda: data.runs(url) and data.model_choices(url), figures)

        def calculator_page():
            data.runs(url)
            for depth in range(8, 33):
                data.model_estimate({"depth": depth}, vocab_size=32768, world_size=8)

        timed("calculator_page_data_s", calculator_page, figures)
        pages = [k for k in figures if k.endswith("_page_data_s")]
        figures["max_page_data_s"] = max(figures[k] for k in pages)
        figures["all_pages_under_1s"] = all(figures[k] < 1.0 for k in pages)
    finally:
        data.store.clear()
        if not (args.keep or args.dir):
            shutil.rmtree(work, ignore_errors=True)
    for k, v in figures.items():
        print(f"{k}: {v}")
    return 0 if figures.get("all_pages_under_1s") else 1


if __name__ == "__main__":
    sys.exit(main())
