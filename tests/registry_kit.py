"""Shared pieces of the registry tests: the store fixture (SQLite and a real PostgreSQL), and small
real run trees (tiny real checkpoints written by tests/modelkit, metrics.jsonl lines per the convention).

tests/conftest.py loads this module as a plugin, so `store` and `store_url` are fixtures everywhere.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from nanochat.gpt import GPTConfig
from registry import open_store
from tests.modelkit import random_model, write_checkpoint

PG_ENV = "NANOCHAT_TEST_POSTGRES_URL"
PG_SKIP = f"PostgreSQL registry tests need a server: set {PG_ENV} or run bash .ci/run"
TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16, window_pattern="L")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# What each schema version after 1 added (registry/db.py MIGRATIONS): tables, and columns of older tables. A
# migration test removes them and sets the stored version, to make what an older registry looked like. A new
# migration adds its tables and columns here.
ADDED_IN = {2: (("shard_token_counts", "dataset_shards"), {}), 3: (("eval_results",), {}),
            4: (("tokenizer_checks",), {"runs": ("tokenizer_check_id",)}),
            5: ((), {"runs": ("origin",), "scans": ("origin",)})}
# Constraints a table had before a version changed them: before 5, a run was unique per path.
UNIQUE_BEFORE = {5: {"runs": ("path",)}}
TABLES_ADDED_AFTER_V1 = tuple(t for v in sorted(ADDED_IN, reverse=True) for t in ADDED_IN[v][0])


def make_version(path, version: int) -> None:
    """Turn a current SQLite registry at `path` into a registry of schema `version` (rows of older tables kept)."""
    from registry.models import Base

    engine = sa.create_engine(f"sqlite:///{path}")  # no foreign_keys pragma: tables can be rebuilt in any order
    with engine.begin() as conn:
        for v in sorted((v for v in ADDED_IN if v > version), reverse=True):
            tables, columns = ADDED_IN[v]
            for table, gone in columns.items():  # SQLite cannot drop a column with a REFERENCES clause: rebuild
                full = Base.metadata.tables[table]
                present = {r[1] for r in conn.exec_driver_sql(f"PRAGMA table_info({table})")}
                keep = [c for c in full.columns if c.name not in gone and c.name in present]
                unique = [sa.UniqueConstraint(*m[table]) for w, m in UNIQUE_BEFORE.items() if w > version and table in m]
                sa.Table(f"{table}_old", sa.MetaData(), *[sa.Column(c.name, c.type, primary_key=c.primary_key,
                                                                    nullable=c.nullable, unique=c.unique) for c in keep],
                         *unique).create(conn)
                names = ", ".join(c.name for c in keep)
                conn.exec_driver_sql(f"INSERT INTO {table}_old ({names}) SELECT {names} FROM {table}")
                conn.exec_driver_sql(f"DROP TABLE {table}")
                conn.exec_driver_sql(f"ALTER TABLE {table}_old RENAME TO {table}")
                for index in full.indexes:
                    conn.exec_driver_sql(f"CREATE INDEX {index.name} ON {table} ({', '.join(c.name for c in index.columns)})")
            for table in tables:
                conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"UPDATE registry_info SET value = '{version}' WHERE key = 'schema_version'")
    engine.dispose()


def make_version_4(url) -> None:
    """A current registry (a SQLite path or a PostgreSQL URL) as schema 4 left it: no origins, runs unique per path."""
    if "://" not in str(url):
        make_version(url, 4)
        return
    engine = sa.create_engine(str(url))
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE runs DROP CONSTRAINT uq_runs_origin_path")
        conn.exec_driver_sql("ALTER TABLE runs DROP COLUMN origin")
        conn.exec_driver_sql("ALTER TABLE runs ADD CONSTRAINT runs_path_key UNIQUE (path)")
        conn.exec_driver_sql("ALTER TABLE scans DROP COLUMN origin")
        conn.exec_driver_sql("UPDATE registry_info SET value = '4' WHERE key = 'schema_version'")
    engine.dispose()


def make_version_1(path) -> None:
    """Turn a current SQLite registry at `path` into a version-1 one (runs, checkpoints, metrics kept)."""
    make_version(path, 1)


def pg_schema_url(base_url: str, schema: str) -> str:
    url = sa.engine.make_url(base_url)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A URL for an empty registry: a SQLite file, or a fresh schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        yield str(tmp_path / "registry.sqlite")
    else:
        yield from _fresh_pg_schema()


@pytest.fixture
def pg_url():
    """A fresh schema on the PostgreSQL test server (for PostgreSQL-only tests)."""
    yield from _fresh_pg_schema()


def _fresh_pg_schema():
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_SKIP)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_schema_url(base, schema)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


_MODEL = None


def tiny_model():
    global _MODEL
    if _MODEL is None:
        _MODEL = random_model(TINY, seed=0)
    return _MODEL


def make_checkpoint(run_dir: Path, step: int, val_bpb: float | None = 3.0, segment: int = 1, num_iterations: int = 100,
                    optimizer: bool = True, extra: dict | None = None) -> Path:
    """A real tiny checkpoint in our meta convention (world size 1)."""
    meta = {"val_bpb": val_bpb, "world_size": 1, "num_iterations": num_iterations, "resume_segment": segment,
            "workbench_version": 1, "total_batch_size": 64, **(extra or {})}
    write_checkpoint(Path(run_dir), tiny_model(), step=step, extra_meta=meta, with_optimizer=optimizer)
    return Path(run_dir)


def metrics_line(step: int, segment: int = 1, wall_time: float | None = None, **values) -> str:
    row = {"step": step, "segment": segment, "wall_time": 1_700_000_000.0 + step if wall_time is None else wall_time, **values}
    return json.dumps(row) + "\n"


def append_metrics(run_dir: Path, lines: list[str] | str) -> Path:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines) if isinstance(lines, list) else lines)
    return path


def train_lines(steps, segment: int = 1, eval_every: int = 0) -> list[str]:
    out = []
    for s in steps:
        extra = {"val_bpb": 3.0 - s / 1000} if eval_every and s % eval_every == 0 else {}
        out.append(metrics_line(s, segment, train_loss=5.0 - s / 100, lrm=1.0, tok_per_sec=1000.0 + s, dt_ms=12.5, **extra))
    return out


def base_tree(base: Path) -> dict[str, Path]:
    """<base>/base_checkpoints/d1 (steps 10, 20, metrics.jsonl with one segment) and
    <base>/chatsft_checkpoints/d1 (step 5, no metrics: val_bpb history from its meta)."""
    base_run = base / "base_checkpoints" / "d1"
    for step, bpb in ((10, 2.5), (20, 2.2)):
        make_checkpoint(base_run, step, val_bpb=bpb, num_iterations=20)
    append_metrics(base_run, train_lines(range(0, 21), eval_every=10))
    sft_run = base / "chatsft_checkpoints" / "d1"
    make_checkpoint(sft_run, 5, val_bpb=1.9, num_iterations=50, extra={"user_config": {"depth": 1, "phase_hint": "sft"}})
    return {"base": base_run, "sft": sft_run}
