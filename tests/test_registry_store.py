"""The store: where the database is, its schema version (create, refuse, migrate, never recreate), and
every query the app and CLI use: runs overview and filters, references, checkpoints, best, diff,
summary, integrity results."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from nanochat.checkpoint_manager import Problem
from registry import db as regdb
from registry import open_store
from registry.errors import (
    AmbiguousRunError,
    CheckpointNotIndexedError,
    NotARegistryError,
    RegistryError,
    RegistryNotFoundError,
    RunNotFoundError,
    SchemaTooNewError,
    SchemaTooOldError,
)
from registry.store import run_status
from tests.registry_kit import append_metrics, base_tree, make_checkpoint, train_lines


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_version(url: str, version: int) -> None:
    engine = sa.create_engine(regdb.to_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE registry_info SET value = :v WHERE key = 'schema_version'"), {"v": str(version)})
    engine.dispose()


# ---------------------------------------------------------------------- where and which database


def test_default_location_env_and_plain_path(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_REGISTRY_URL", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    with open_store() as s:
        assert s.url == f"sqlite:///{tmp_path / 'base' / 'registry.sqlite'}"
    assert (tmp_path / "base" / "registry.sqlite").is_file()
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", f"sqlite:///{tmp_path / 'env.sqlite'}")
    with open_store() as s:
        assert s.url.endswith("env.sqlite")
    with open_store(tmp_path / "plain.sqlite") as s:
        assert s.db.dialect == "sqlite" and s.db.path == tmp_path / "plain.sqlite"
    with pytest.raises(RegistryNotFoundError, match="no registry at .*absent.sqlite"):
        open_store(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()
    with pytest.raises(RegistryError, match="unsupported database 'mysql'"):
        open_store("mysql://localhost/x")


def test_sqlite_connection_settings(tmp_path):
    with open_store(tmp_path / "r.sqlite") as s, s.db.session() as session:
        pragma = lambda name: session.execute(sa.text(f"PRAGMA {name}")).scalar()
        assert pragma("journal_mode") == "wal" and pragma("foreign_keys") == 1 and pragma("busy_timeout") == 30_000


def test_schema_version_stored_and_empty_database_created(store_url):
    with open_store(store_url) as s:
        assert s.db.schema_version() == regdb.SCHEMA_VERSION
        assert s.summary().runs == 0
    if store_url.startswith("postgresql"):
        engine = sa.create_engine(store_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE " + ", ".join(sa.inspect(conn).get_table_names()) + " CASCADE"))
        engine.dispose()
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(store_url + suffix).unlink(missing_ok=True)
        Path(store_url).touch()  # an empty file is an empty SQLite database
    with pytest.raises(RegistryNotFoundError, match="holds no registry yet"):
        open_store(store_url, create=False)
    with open_store(store_url) as s:  # allowed to create: it does
        assert s.db.schema_version() == regdb.SCHEMA_VERSION


def test_sqlite_file_that_is_not_a_registry_is_left_alone(tmp_path):
    other = tmp_path / "app.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users VALUES (1, 'ada')")
    conn.commit()
    conn.close()
    before = digest(other)
    with pytest.raises(NotARegistryError, match="is a database but not a nanochat registry .*users"):
        open_store(other)
    assert digest(other) == before and sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    text = tmp_path / "notes.sqlite"
    text.write_text("these are my notes, not a database" * 100)
    before = digest(text)
    with pytest.raises(NotARegistryError, match="is not a SQLite database"):
        open_store(text)
    assert digest(text) == before
    with pytest.raises(NotARegistryError, match="is a directory"):
        open_store(tmp_path)


@pytest.mark.postgres
def test_postgres_schema_that_is_not_a_registry(pg_url):
    store_url = pg_url
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE experiments (id int)"))
    engine.dispose()
    with pytest.raises(NotARegistryError, match="experiments"):
        open_store(store_url)


def test_newer_schema_refused_and_untouched(store_url, tmp_path):
    base_tree(tmp_path / "base")
    with open_store(store_url) as s:
        s.scan(tmp_path / "base")
    set_version(store_url, regdb.SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNewError, match=f"schema version {regdb.SCHEMA_VERSION + 1}, newer than this code's"):
        open_store(store_url)
    set_version(store_url, regdb.SCHEMA_VERSION)
    with open_store(store_url) as s:
        assert len(s.list_runs()) == 2


def test_older_schema_refused_with_the_command_then_migrated(store_url, tmp_path, monkeypatch):
    base_tree(tmp_path / "base")
    with open_store(store_url) as s:
        s.scan(tmp_path / "base")
        before = [(r.id, r.path, r.best_val_bpb) for r in s.list_runs()]
    # Pretend this code is one version ahead, with a real migration that adds a column.
    applied = []

    def add_note_column(conn):
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN note VARCHAR(200)"))
        applied.append(True)

    monkeypatch.setattr(regdb, "SCHEMA_VERSION", regdb.SCHEMA_VERSION + 1)
    monkeypatch.setattr(regdb, "MIGRATIONS", {regdb.SCHEMA_VERSION - 1: add_note_column})
    with pytest.raises(SchemaTooOldError) as err:
        open_store(store_url)
    target = store_url if store_url.startswith("postgresql") else str(Path(store_url))
    command = f"python -m registry --db {target} migrate"
    if store_url.startswith("postgresql"):
        command = f"python -m registry --db {regdb.to_url(store_url).render_as_string(hide_password=True)} migrate"
    assert f"run `{command}` to migrate it" in str(err.value)
    database = regdb.Database(store_url, create=False)
    old, new, backup = database.migrate()
    database.close()
    assert (old, new, applied) == (regdb.SCHEMA_VERSION - 1, regdb.SCHEMA_VERSION, [True])
    if not store_url.startswith("postgresql"):
        assert backup == Path(store_url + f".v{old}.bak") and backup.is_file()
    with open_store(store_url) as s:
        assert [(r.id, r.path, r.best_val_bpb) for r in s.list_runs()] == before
        assert s.db.schema_version() == new
    database = regdb.Database(store_url, create=False)
    assert database.migrate()[:2] == (new, new)  # idempotent
    database.close()


# ---------------------------------------------------------------------- queries


@pytest.fixture
def tree(store, tmp_path):
    runs = base_tree(tmp_path / "base")
    store.scan(tmp_path / "base")
    return runs


def test_runs_overview(store, tree):
    base, sft = store.resolve_run("base/d1"), store.resolve_run("sft/d1")
    assert (base.latest_step, base.num_iterations, base.progress, base.latest_checkpoint_step) == (20, 20, 1.0, 20)
    assert (base.best_val_bpb, base.best_val_bpb_step) == (pytest.approx(2.98), 20)
    assert (base.last_val_bpb, base.last_val_bpb_step) == (pytest.approx(2.98), 20)
    assert (base.checkpoint_count, base.complete_checkpoint_count, base.segments, base.depth) == (2, 2, 1, 1)
    assert base.n_params and base.flops_per_token and base.generation == "current" and base.world_size == 1
    assert (sft.best_val_bpb, sft.latest_step, sft.num_iterations, sft.status) == (1.9, 5, 50, "training")
    assert [r.label for r in store.list_runs()] in (["sft/d1", "base/d1"], ["base/d1", "sft/d1"])
    assert store.get_run(base.id) == base
    later = time.time() + 3600
    assert {r.label: r.status for r in store.list_runs(now=later)} == {"base/d1": "finished", "sft/d1": "stopped"}


def test_best_differs_from_last(store, tmp_path):
    run = tmp_path / "base_checkpoints" / "d1"
    for step, bpb in ((10, 2.5), (20, 2.1), (30, 2.7)):  # a loss spike after the best
        make_checkpoint(run, step, val_bpb=bpb, num_iterations=100)
    store.scan(tmp_path)
    r = store.resolve_run("d1")
    assert (r.best_val_bpb, r.best_val_bpb_step, r.last_val_bpb, r.last_val_bpb_step) == (2.1, 20, 2.7, 30)
    assert store.best_checkpoint("d1").checkpoint.step == 20
    assert store.resolve_checkpoint("d1@best").step == 20 and store.resolve_checkpoint("d1@latest").step == 30
    (run / "model_000020.pt").unlink()  # the best is gone: the best *usable* one is chosen
    store.scan(tmp_path)
    assert store.best_checkpoint("d1").checkpoint.step == 10


def test_run_status_rules():
    class R:
        missing, num_iterations, last_activity_at = False, 100, 1000.0

    r = R()
    assert run_status(r, 100, False, now=5000) == "finished"
    assert run_status(r, 50, False, now=1100) == "training"
    assert run_status(r, 50, False, now=5000) == "stopped"
    assert run_status(r, 50, True, now=5000) == "incomplete"
    assert run_status(r, None, False, now=5000) == "incomplete"
    r.missing = True
    assert run_status(r, 100, False, now=1100) == "missing"


def test_filter_runs_by_config(store, tree):
    assert [r.label for r in store.list_runs(where={"phase": "sft"})] == ["sft/d1"]
    assert {r.label for r in store.list_runs(where={"depth": 1})} == {"base/d1", "sft/d1"}
    assert [r.label for r in store.list_runs(where={"depth": "1", "num_iterations": "20"})] == ["base/d1"]
    assert [r.label for r in store.list_runs(where={"user_config.phase_hint": "SFT"})] == ["sft/d1"]
    assert [r.label for r in store.list_runs(where={"n_embd": 16, "phase": "base"})] == ["base/d1"]  # a model_config key
    assert store.list_runs(where={"depth": 20}) == []
    with pytest.raises(RegistryError, match="no run has a field or config key 'dept'"):
        store.list_runs(where={"dept": 20})


def test_resolve_run_references(store, tree):
    base = store.resolve_run("base/d1")
    assert store.resolve_run(str(base.id)) == base == store.resolve_run(base.id) == store.resolve_run(str(tree["base"]))
    assert store.resolve_run(str(tree["base"] / "model_000010.pt")) == base
    with pytest.raises(AmbiguousRunError) as err:
        store.resolve_run("d1")
    assert [label for _, label, _ in err.value.candidates] == ["base/d1", "sft/d1"]
    assert "use the run id, its phase/tag, or its path" in str(err.value).lower()
    with pytest.raises(RunNotFoundError, match=r"no run 'd7' in the registry \(indexed runs: base/d1, sft/d1\)"):
        store.resolve_run("d7")
    with pytest.raises(RunNotFoundError, match="no run with id 999"):
        store.resolve_run(999)


def test_checkpoints_and_detail(store, tree):
    ckpts = store.checkpoints("base/d1")
    assert [(c.step, c.label, c.val_bpb, c.segment) for c in ckpts] == [(10, "base/d1@10", 2.5, 1), (20, "base/d1@20", 2.2, 1)]
    d = store.checkpoint_detail("base/d1@20")
    assert d.run.label == "base/d1" and d.meta["step"] == 20 and d.meta["world_size"] == 1
    f = {x.name: x for x in d.files}
    st = (tree["base"] / "model_000020.pt").stat()
    assert (f["model_000020.pt"].size, f["model_000020.pt"].mtime_ns, f["model_000020.pt"].kind) == (st.st_size, st.st_mtime_ns, "model")
    assert f["optim_000020_rank0.pt"].rank == 0 and f["meta_000020.json"].kind == "meta"
    assert store.checkpoint_detail(str(tree["base"] / "meta_000010.json")).checkpoint.step == 10
    assert store.resolve_checkpoint(d.checkpoint.id) == d.checkpoint
    with pytest.raises(CheckpointNotIndexedError, match="has no checkpoint at step 15 .*10, 20"):
        store.resolve_checkpoint("base/d1@15")
    with pytest.raises(CheckpointNotIndexedError, match="bad step 'x'"):
        store.resolve_checkpoint("base/d1@x")


def test_best_checkpoint_by_other_metrics(store, tmp_path):
    run = tmp_path / "base_checkpoints" / "d1"
    for step in (5, 10, 15):
        make_checkpoint(run, step)
    append_metrics(run, train_lines(range(16)))
    store.scan(tmp_path)
    assert store.best_checkpoint("d1", "train_loss").checkpoint.step == 15
    best = store.best_checkpoint("d1", "tok_per_sec", mode="max")
    assert (best.checkpoint.step, best.value, best.mode) == (15, 1015.0, "max")
    with pytest.raises(CheckpointNotIndexedError, match="has a mfu value .*train_loss"):
        store.best_checkpoint("d1", "mfu")


def test_config_diff(store, tree, tmp_path):
    d = store.diff("base/d1", "sft/d1")
    changed = {r.key: (r.a, r.b, r.status) for r in d.changed}
    assert changed["num_iterations"] == (20, 50, "changed")
    assert changed["user_config.phase_hint"] == (None, "sft", "only_b")
    assert "model_config.n_layer" not in changed and any(r.key == "model_config.n_layer" for r in d.rows)
    meta = json.loads((tree["base"] / "meta_000020.json").read_text())
    (tree["base"] / "meta_000020.json").write_text(json.dumps({**meta, "val_bpb": 2.0, "loop_state": {"x": 1}}))
    store.scan(tmp_path / "base")
    cd = store.diff("base/d1@10", "base/d1@20")
    assert {r.key for r in cd.changed} == {"step", "val_bpb", "loop_state.x"} and cd.a == "base/d1@10"
    assert not store.diff("base/d1", "base/d1").changed


def test_summary_and_scans(store, tree):
    s = store.summary(now=time.time() + 3600)
    assert (s.runs, s.checkpoints, s.complete_checkpoints, s.missing_checkpoints, s.roots) == (2, 3, 3, 0, 1)
    assert s.runs_by_status == {"finished": 1, "stopped": 1}
    assert s.metric_points == 21 * 4 + 3 and s.metric_series == 5  # stored points (sft's val_bpb is derived from its metas)
    assert s.last_scan.status == "ok" and s.schema_version == regdb.SCHEMA_VERSION
    assert [x.scan_id for x in store.scans()] == [s.last_scan.scan_id]


def test_integrity_results_recorded_and_read(store, tree):
    ckpt = store.resolve_checkpoint("base/d1@20")
    model = tree["base"] / "model_000020.pt"
    sha = digest(model)
    first = store.record_integrity(ckpt.id, "deep", True, [], duration_s=0.5, checked_at=1000.0,
                                   file_hashes={"model_000020.pt": sha})
    second = store.record_integrity(ckpt.id, "quick", False, [
        Problem("missing_optimizer_shard", "optimizer shard of rank 1 of 2 is missing", "resume"),
        {"code": "truncated", "message": "cut", "file": "model_000020.pt"}], duration_s=0.01, checked_at=2000.0)
    assert first.ok and first.mode == "deep" and first.checked_at.timestamp() == 1000.0
    history = store.integrity_history(ckpt.id)
    assert [h.id for h in history] == [second.id, first.id]
    assert [(p.code, p.blocks, p.file) for p in history[0].problems] == [
        ("missing_optimizer_shard", "resume", None), ("truncated", None, "model_000020.pt")]
    assert store.integrity_history("base/d1@20", limit=1) == [history[0]]
    assert store.checkpoints("base/d1")[1].latest_integrity == history[0] and store.checkpoints("base/d1")[0].latest_integrity is None
    f = {x.name: x for x in store.checkpoint_detail(ckpt.id).files}
    st = model.stat()
    m = f["model_000020.pt"]
    assert (m.sha256, m.sha256_size, m.sha256_mtime_ns) == (sha, st.st_size, st.st_mtime_ns)
    assert f["meta_000020.json"].sha256 is None
    store.record_integrity(ckpt.id, "deep", True, file_hashes={"meta_000020.json": ("ab" * 32, 12, 34)})
    assert {x.name: x.sha256_size for x in store.checkpoint_detail(ckpt.id).files}["meta_000020.json"] == 12
    with pytest.raises(CheckpointNotIndexedError, match="not a file of checkpoint"):
        store.record_integrity(ckpt.id, "deep", True, file_hashes={"other.pt": "00"})
    with pytest.raises(RegistryError, match="mode must be 'quick' or 'deep'"):
        store.record_integrity(ckpt.id, "full", True)
    with pytest.raises(CheckpointNotIndexedError):
        store.record_integrity(10**6, "quick", True)
    assert len(store.integrity_history(ckpt.id)) == 3  # the failed calls wrote nothing
    assert store.summary().integrity_results == 3


def test_store_is_usable_from_threads(store, tree):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: len(store.list_runs()) + len(store.checkpoints("base/d1")), range(16)))
    assert results == [4] * 16
