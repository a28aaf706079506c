"""Issue 5's concurrency acceptance: 4 processes scanning one tree while 4 others query and a
training-like writer appends metrics lines (torn mid-line on purpose) and writes new checkpoints:
no process errors, no duplicate rows, and every metric line is ingested exactly once.

The workers are real processes (multiprocessing, spawn) that import only the registry (no torch).
Checkpoints are written like a trainer does: model and optimizer files first (hard links to the
upstream fixture's files, so they are real torch.save archives), the meta last, renamed into place.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "upstream" / "current" / "base_checkpoints" / "d2"
DURATION_S = 4.0


def _write_checkpoint(run: Path, step: int, segment: int) -> None:
    source = run.parent.parent.parent / "source"  # a copy of the fixture on the same file system
    for src, name in (("model_000300.pt", f"model_{step:06d}.pt"), ("optim_000300_rank0.pt", f"optim_{step:06d}_rank0.pt")):
        os.link(source / src, run / name)
    meta = json.loads((source / "meta_000300.json").read_text())
    meta.update(step=step, val_bpb=3.0 - step / 1000, world_size=1, num_iterations=10_000, resume_segment=segment)
    tmp = run / f".meta_{step:06d}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, run / f"meta_{step:06d}.json")


def _start(ready, go, deadline) -> float:
    """Every worker has imported what it needs before the clock starts (spawn start-up is slow)."""
    ready.put(os.getpid())
    go.wait(120)
    return deadline.value


def trainer(run: str, ready, go, deadline, results) -> None:
    """Append metrics lines in two writes each (a reader may see half a line) and save checkpoints;
    halfway through, "crash" and resume from an earlier step as segment 2."""
    try:
        deadline = _start(ready, go, deadline)
        run_dir, step, segment, lines = Path(run), 0, 1, 0
        resumed = False
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            while time.time() < deadline:
                if not resumed and time.time() > deadline - DURATION_S / 2:
                    step, segment, resumed = max(0, step - 25), 2, True
                row = {"step": step, "segment": segment, "wall_time": time.time(), "train_loss": 5.0 - step / 1e4,
                       "lrm": 1.0, "tok_per_sec": 1000.0 + step, "dt_ms": 3.5}
                if step % 25 == 0:
                    row["val_bpb"] = 3.0 - step / 1000
                text = json.dumps(row) + "\n"
                f.write(text[: len(text) // 2])
                f.flush()
                time.sleep(0.001)
                f.write(text[len(text) // 2:])
                f.flush()
                lines += 1
                if step % 50 == 0 and step > 0 and not (run_dir / f"meta_{step:06d}.json").exists():
                    _write_checkpoint(run_dir, step, segment)
                step += 1
                time.sleep(0.003)
        results.put(("trainer", lines, None))
    except BaseException as e:  # report every failure to the parent, which asserts there is none
        results.put(("trainer", 0, repr(e)))


def scanner(url: str, root: str, ready, go, deadline, results) -> None:
    try:
        from registry import open_store

        store = open_store(url)
        deadline = _start(ready, go, deadline)
        n = 0
        while time.time() < deadline:
            store.scan(root)
            n += 1
        store.close()
        results.put(("scanner", n, None))
    except BaseException as e:
        results.put(("scanner", 0, repr(e)))


def reader(url: str, ready, go, deadline, results) -> None:
    try:
        from registry import open_store

        store = open_store(url)
        deadline = _start(ready, go, deadline)
        n = 0
        while time.time() < deadline:
            for run in store.list_runs():
                store.checkpoints(run.id)
                store.metric_history(run.id, max_points=100)
                store.metric_keys(run.id)
            store.summary()
            n += 1
        store.close()
        results.put(("reader", n, None))
    except BaseException as e:
        results.put(("reader", 0, repr(e)))


@pytest.mark.slow
def test_four_scanners_four_readers_and_a_trainer(store_url, tmp_path):
    base = tmp_path / "base"
    live = base / "base_checkpoints" / "d2"
    other = base / "chatsft_checkpoints" / "d2"
    live.mkdir(parents=True)
    other.mkdir(parents=True)
    shutil.copytree(FIXTURE, tmp_path / "source")
    for step in (100, 200):
        _write_checkpoint(other, step, 1)
    ctx = mp.get_context("spawn")
    results, ready, go, deadline = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    sync = (ready, go, deadline)
    procs = [ctx.Process(target=trainer, args=(str(live), *sync, results))]
    procs += [ctx.Process(target=scanner, args=(store_url, str(base), *sync, results)) for _ in range(4)]
    procs += [ctx.Process(target=reader, args=(store_url, *sync, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    deadline.value = time.time() + DURATION_S
    go.set()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [(who, err) for who, _, err in outcomes if err]
    assert not errors, errors
    counts = {}
    for who, n, _ in outcomes:
        counts.setdefault(who, []).append(n)
    assert all(n >= 1 for n in counts["scanner"]) and all(n >= 1 for n in counts["reader"]), counts
    assert counts["trainer"][0] > 100
    print("work done:", counts)

    from registry import open_store
    from registry.models import Checkpoint, CheckpointFile, MetricPoint, MetricSeries, MetricSource

    with open_store(store_url) as store:
        store.scan(base)  # the trainer has stopped: one last scan catches up
        lines = (live / "metrics.jsonl").read_text().splitlines()
        expected = set()
        for line in lines:
            row = json.loads(line)
            expected |= {(k, row["step"], row["segment"]) for k in row if k not in ("step", "segment", "wall_time")}
        run = store.resolve_run("base/d2")
        with store.db.session() as s:
            got = s.execute(sa.select(MetricSeries.key, MetricPoint.step, MetricPoint.segment).join(
                MetricPoint, MetricPoint.series_id == MetricSeries.id).where(MetricSeries.run_id == run.id)).all()
            assert len(got) == len(set(got)) == len(expected) and set(got) == expected
            src = s.execute(sa.select(MetricSource).where(MetricSource.run_id == run.id)).scalar_one()
            assert (src.lines, src.bad_lines, src.offset) == (len(lines), 0, (live / "metrics.jsonl").stat().st_size)
            # the running summaries agree with the rows (no lost or double update under contention)
            for key, n in s.execute(sa.select(MetricSeries.key, MetricSeries.n).where(MetricSeries.run_id == run.id)):
                assert n == sum(1 for k, _, _ in expected if k == key), key
            dup_ckpts = s.execute(sa.select(Checkpoint.run_id, Checkpoint.layout, Checkpoint.step).group_by(
                Checkpoint.run_id, Checkpoint.layout, Checkpoint.step).having(sa.func.count() > 1)).all()
            dup_files = s.execute(sa.select(CheckpointFile.checkpoint_id, CheckpointFile.name).group_by(
                CheckpointFile.checkpoint_id, CheckpointFile.name).having(sa.func.count() > 1)).all()
            assert dup_ckpts == [] and dup_files == []
        on_disk = sorted(int(p.name[5:11]) for p in live.glob("meta_*.json"))
        assert [c.step for c in store.checkpoints(run)] == on_disk and len(on_disk) >= 2
        assert all(c.complete and not c.missing for c in store.checkpoints(run))
        assert store.resolve_run("sft/d2").checkpoint_count == 2
        assert run.segments == 2 and {k.key for k in store.metric_keys(run)} == {"train_loss", "lrm", "tok_per_sec",
                                                                                 "dt_ms", "val_bpb"}
