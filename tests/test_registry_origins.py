"""Runs from several machines in one registry (issue 11, item 7): origins, "missing" scoped to the origin
that scans, the schema-4 migration, and `scan --watch`.

Two training boxes with the default `~/.cache/nanochat` write the same paths; here both "boxes" are
processes scanning one folder under different origins, at once, into one SQLite file or one PostgreSQL
database. Checkpoints are hard links to the upstream fixture's files (real torch.save archives) with a
meta written last, as a trainer does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from registry import open_store
from registry.cli import main as cli
from registry.db import Database
from registry.scanner import watch
from tests.registry_kit import make_version_4

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "upstream" / "current" / "base_checkpoints" / "d2"
ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(run: Path, step: int) -> None:
    source = run.parents[2] / "source"  # a copy of the fixture on the same file system
    run.mkdir(parents=True, exist_ok=True)
    for src, name in (("model_000300.pt", f"model_{step:06d}.pt"), ("optim_000300_rank0.pt", f"optim_{step:06d}_rank0.pt")):
        os.link(source / src, run / name)
    meta = json.loads((source / "meta_000300.json").read_text())
    meta.update(step=step, val_bpb=3.0 - step / 1000)
    tmp = run / f".meta_{step:06d}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, run / f"meta_{step:06d}.json")


def remove_checkpoint(run: Path, step: int) -> None:
    for name in (f"meta_{step:06d}.json", f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt"):
        (run / name).unlink()


@pytest.fixture
def box(tmp_path):
    """<tmp>/nanochat (the base dir both machines use) and its d2 run folder, empty."""
    shutil.copytree(FIXTURE, tmp_path / "source")
    return tmp_path / "nanochat", tmp_path / "nanochat" / "base_checkpoints" / "d2"


def rows(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def origin_scanner(url: str, root: str, origin: str, ready, go, deadline, results) -> None:
    try:
        store = open_store(url, origin=origin)
        ready.put(os.getpid())
        go.wait(120)
        n = 0
        while time.time() < deadline.value:
            store.scan(root)
            n += 1
        store.close()
        results.put((origin, n, None))
    except BaseException as e:  # every failure goes to the parent, which asserts there is none
        results.put((origin, 0, repr(e)))


def test_two_origins_scan_the_same_paths_at_once(store_url, box):
    base, run = box
    for step in (10, 20):
        write_checkpoint(run, step)
    ctx = mp.get_context("spawn")
    ready, results, go, deadline = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=origin_scanner, args=(store_url, str(base), o, ready, go, deadline, results))
             for o in ("box-a", "box-b")]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    deadline.value = time.time() + 2.5
    go.set()
    step = 20
    while time.time() < deadline.value:  # the trainer keeps saving while both boxes scan
        step += 10
        write_checkpoint(run, step)
        time.sleep(0.2)
    for p in procs:
        p.join(60)
    got = [results.get(timeout=10) for _ in procs]
    assert [e for _, _, e in got if e] == [] and all(n >= 1 for _, n, _ in got), got
    for origin in ("box-a", "box-b"):  # a final scan each, as the next pass of a watcher would be
        assert cli(["--db", store_url, "scan", str(base), "--origin", origin, "--no-progress"]) == 0

    on_disk = sorted(int(p.name[5:11]) for p in run.glob("meta_*.json"))
    assert rows(store_url, "SELECT origin, path FROM runs ORDER BY origin") == [("box-a", str(run)), ("box-b", str(run))]
    for origin in ("box-a", "box-b"):
        ckpts = rows(store_url, "SELECT c.step, c.missing FROM checkpoints c JOIN runs r ON r.id = c.run_id "
                                f"WHERE r.origin = '{origin}' ORDER BY c.step")
        assert ckpts == [(s, False) for s in on_disk], origin  # every checkpoint once, nothing that exists missing
    assert rows(store_url, "SELECT checkpoint_id, name, COUNT(*) FROM checkpoint_files GROUP BY checkpoint_id, name "
                           "HAVING COUNT(*) > 1") == []
    assert rows(store_url, "SELECT COUNT(*) FROM checkpoint_files WHERE missing = TRUE") == [(0,)]

    # box-b deletes a checkpoint and scans: its run says so, box-a's is box-a's scans' business
    remove_checkpoint(run, 10)
    with open_store(store_url, origin="box-b") as store:
        assert store.scan(base).checkpoints_missing == 1
        by_origin = {r.origin: r for r in store.list_runs()}
        assert by_origin["box-b"].missing_checkpoint_count == 1 and by_origin["box-a"].missing_checkpoint_count == 0
        assert store.resolve_run(str(run)).origin == "box-b"  # a folder means this machine's run
    with open_store(store_url, origin="box-a") as store:
        assert store.resolve_run(str(run)).origin == "box-a"


def test_runs_and_scans_show_their_origin(tmp_path, box, capsys):
    base, run = box
    write_checkpoint(run, 10)
    db = str(tmp_path / "r.sqlite")
    assert cli(["--db", db, "--json", "scan", str(base), "--origin", "gpu-1"]) == 0
    assert json.loads(capsys.readouterr().out)["origin"] == "gpu-1"
    assert cli(["--db", db, "scan", str(base)]) == 0  # the default origin: this host's name
    capsys.readouterr()
    assert cli(["--db", db, "--json", "runs"]) == 0
    assert sorted(r["origin"] for r in json.loads(capsys.readouterr().out)) == sorted(["gpu-1", os.uname().nodename])
    assert cli(["--db", db, "runs", "--where", "origin=gpu-1"]) == 0
    out = capsys.readouterr().out
    assert "origin" in out.splitlines()[0] and "gpu-1" in out and len(out.splitlines()) == 3
    assert cli(["--db", db, "checkpoints", "d2"]) == 1  # two machines' d2: ambiguous, each named
    assert "base/d2 on gpu-1" in capsys.readouterr().err
    assert cli(["--db", db, "scan", str(base), "--origin", " "]) == 1
    assert "origin" in capsys.readouterr().err


def test_migration_to_origins_keeps_runs_and_the_first_scan_claims_them(store_url, box):
    base, run = box
    write_checkpoint(run, 10)
    with open_store(store_url, origin="old") as store:
        store.scan(base)
        before = store.list_runs()[0].id
    make_version_4(store_url)
    db = Database(store_url, create=False)
    assert db.migrate()[:2] == (4, 5)
    db.close()
    with open_store(store_url, origin="box-a") as store:
        runs = store.list_runs()
        assert [(r.id, r.origin, r.checkpoint_count) for r in runs] == [(before, None, 1)]  # unclaimed: "any"
        store.scan(base)
        assert [(r.id, r.origin) for r in store.list_runs()] == [(before, "box-a")]  # claimed, not duplicated
    with open_store(store_url, origin="box-b") as store:
        store.scan(base)
        assert sorted((r.origin, r.checkpoint_count, r.missing) for r in store.list_runs()) == \
            [("box-a", 1, False), ("box-b", 1, False)]
    if "://" not in store_url:  # foreign keys still hold after SQLite's rebuild of runs
        assert rows(store_url, "PRAGMA foreign_key_check") == []


def test_watch_writes_nothing_while_the_tree_is_unchanged(tmp_path, box):
    base, run = box
    write_checkpoint(run, 10)
    passes, reports = [], []

    def wait(_seconds):
        passes.append(1)
        if len(passes) == 2:
            write_checkpoint(run, 20)  # between the second and third pass

    with open_store(tmp_path / "r.sqlite", origin="box-a") as store:
        scans = watch(store, base, interval=0, on_scan=reports.append, should_stop=lambda: len(passes) >= 4, wait=wait)
        assert scans == 2 and len(store.scans()) == 2  # pass 2 and 4 saw an unchanged tree: not even a scan row
        assert [r.checkpoints_new for r in reports] == [1, 1]


def _wait_for_line(proc, timeout: float = 60) -> dict:
    start = time.time()
    while time.time() - start < timeout:
        line = proc.stdout.readline()
        if line.strip():
            return json.loads(line)
    raise AssertionError("no scan line from the watcher")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_scan_watch_indexes_until_stopped_and_exits_cleanly(tmp_path, box, sig):
    base, run = box
    write_checkpoint(run, 10)
    db = tmp_path / "r.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "registry", "--db", str(db), "--json", "scan", str(base), "--watch",
                             "--interval", "0.1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_line(proc)["checkpoints_new"] == 1
        write_checkpoint(run, 20)
        assert _wait_for_line(proc)["checkpoints_new"] == 1  # the new checkpoint, indexed by the next pass
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped watching" in err and "Traceback" not in err
    with open_store(db, create=False) as store:
        assert [c.step for c in store.checkpoints(store.list_runs()[0].id)] == [10, 20]
