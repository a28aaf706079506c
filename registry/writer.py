"""
The scanner's database side: what the registry already holds for the runs under a folder (a few bulk
reads) and every write of a scan (its row, one batch of inspected checkpoints, the end), as plain SQL.

Why plain SQL here and typed SQLAlchemy everywhere else: a scan usually runs in a fresh process (the
CLI) on a fresh engine, and SQLAlchemy compiles every distinct Core statement on its first use per
engine: through Core and ORM statements the database side of a scan of 50 single-file checkpoints took
~13 ms, three times reading their metadata; as plain SQL it takes ~3 ms.
The SQL below is the same on SQLite (>= 3.35) and PostgreSQL: INSERT ... ON CONFLICT DO UPDATE/NOTHING,
RETURNING, TRUE/FALSE; only the placeholder differs (`Database.sql`). Column lists come from the ORM
tables of models.py, which remain the one definition of the schema, and values are written exactly as
the ORM writes them (JSON columns as `json.dumps` text, JSON null included). Statements run on the
session's connection (`exec_driver_sql`), so transactions, locks, retries and error translation are
`Database.write`'s, as for every other write.

Every write function is safe to retry as a whole (`Database.write` reruns it after a PostgreSQL
deadlock): it reads the plans but changes nothing outside the database, and returns what the caller
applies after the commit. Deciding what changed is scanner.py's job; inspecting checkpoints is
inspection.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from registry.inspection import run_config
from registry.models import Checkpoint, CheckpointFile, MetricSource, Root, Run, Scan, ScanProblem

if TYPE_CHECKING:
    from registry.inspection import Inspection
    from registry.scanner import RunPlan

CHUNK = 500  # ids per IN (...) list

_RUNS, _CKPTS, _FILES = Run.__tablename__, Checkpoint.__tablename__, CheckpointFile.__tablename__
_SCAN_COUNTERS = ("runs_found", "runs_new", "runs_missing", "checkpoints_seen", "checkpoints_new", "checkpoints_changed",
                  "checkpoints_unchanged", "checkpoints_missing", "files_stat", "metric_lines", "metric_bad_lines")
_CONFIG_COLUMNS = ("model_config", "user_config", "config_step", "num_iterations", "world_size", "total_batch_size",
                   "depth", "n_params", "flops_per_token", "generation")
# Rewritten when a checkpoint is inspected again; first_seen_at stays the first scan's.
_CHECKPOINT_UPDATED = ("segment", "val_bpb", "meta", "complete", "resumable", "missing", "has_train_state", "world_size",
                       "problems", "size_bytes", "mtime_ns", "files_signature", "inspected_at")
_CHECKPOINT_COLUMNS = ("run_id", "layout", "step", *_CHECKPOINT_UPDATED[:-1], "first_seen_at", "inspected_at")


def _columns(table, names) -> tuple[str, ...]:
    """The names, checked against the ORM table (a renamed column fails at import, not mid-scan)."""
    missing = [n for n in names if n not in table.c]
    assert not missing, f"{table.name} has no column {missing}"
    return tuple(names)


def _insert(table, names, conflict: str) -> str:
    cols = _columns(table, names)
    return f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) {conflict}"


def _set(names) -> str:
    return ", ".join(f"{n} = ?" for n in names)


ROOT_UPSERT = _insert(Root.__table__, ("path", "first_scanned_at", "last_scanned_at"),
                      "ON CONFLICT (path) DO UPDATE SET last_scanned_at = excluded.last_scanned_at RETURNING id")
SCAN_INSERT = _insert(Scan.__table__, ("root_path", "started_at", "status", *_SCAN_COUNTERS, "problem_count"),
                      "RETURNING id")
ROOT_LAST_SCAN = f"UPDATE {Root.__tablename__} SET last_scan_id = ? WHERE id = ?"
SCAN_FINISH = (f"UPDATE {Scan.__tablename__} SET {_set(_columns(Scan.__table__, _SCAN_COUNTERS))}, "
               "status = ?, error = ?, finished_at = ?, problem_count = ? WHERE id = ?")
RUNS_UNDER = (f"SELECT id, path, dir_signature, dir_checkpoints, missing FROM {_RUNS} "
              "WHERE path = ? OR substr(path, 1, ?) = ?")
RUN_INSERT = _insert(Run.__table__, ("path", "phase", "tag", "root_id", "first_seen_at", "last_seen_at",
                                     "last_activity_at", "has_metrics_file", "missing"), "ON CONFLICT (path) DO NOTHING")
# A run seen again: where it is, that it is present, and its newest activity (never moved back).
RUN_UPDATE = (f"UPDATE {_RUNS} SET phase = ?, tag = ?, root_id = ?, last_seen_at = ?, missing = FALSE, "
              "has_metrics_file = ?, last_activity_at = CASE WHEN last_activity_at IS NULL THEN ? "
              "WHEN ? > last_activity_at THEN ? ELSE last_activity_at END WHERE id = ?")
RUN_SEEN = f"UPDATE {_RUNS} SET last_seen_at = ?, dir_signature = ?, dir_checkpoints = ? WHERE id = ?"
# The newest complete checkpoint's config wins; an incomplete one only fills an empty config. The
# condition is in the UPDATE, so concurrent scanners cannot put an older config back.
CONFIG_COMPLETE = (f"UPDATE {_RUNS} SET {_set(_columns(Run.__table__, _CONFIG_COLUMNS))} "
                   "WHERE id = ? AND (config_step IS NULL OR config_step <= ?)")
CONFIG_INCOMPLETE = f"UPDATE {_RUNS} SET {_set(_CONFIG_COLUMNS)} WHERE id = ? AND config_step IS NULL"
CHECKPOINT_UPSERT = _insert(Checkpoint.__table__, _CHECKPOINT_COLUMNS, "ON CONFLICT (run_id, layout, step) DO UPDATE SET "
                            + ", ".join(f"{c} = excluded.{c}" for c in _CHECKPOINT_UPDATED))
FILE_UPSERT = _insert(CheckpointFile.__table__, ("run_id", "checkpoint_id", "name", "kind", "rank", "size", "mtime_ns",
                                                 "missing", "first_seen_at"),
                      "ON CONFLICT (checkpoint_id, name) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                      "kind = excluded.kind, rank = excluded.rank, missing = FALSE")
FILE_VANISHED = f"UPDATE {_FILES} SET missing = TRUE WHERE checkpoint_id = ? AND name = ?"
PROBLEM_INSERT = _insert(ScanProblem.__table__, ("scan_id", "run_id", "checkpoint_id", "path", "code", "message",
                                                 "created_at"), "")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(items: list, n: int = CHUNK):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _Sql:
    """exec_driver_sql on one connection with this dialect's placeholders."""

    def __init__(self, session, db):
        self.conn, self.db = session.connection(), db

    def __call__(self, sql: str, params=()):
        return self.conn.exec_driver_sql(self.db.sql(sql), params)

    def lock_runs(self, run_ids) -> None:
        """PostgreSQL row locks in id order (see Database.lock_runs); SQLite's write transaction is the lock."""
        ids = sorted(run_ids)
        if self.db.dialect == "postgresql" and ids:
            self(f"SELECT id FROM {_RUNS} WHERE id IN ({_marks(len(ids))}) ORDER BY id FOR UPDATE", tuple(ids))


# ---------------------------------------------------------------------- reads


@dataclass(frozen=True)
class StoredRun:
    id: int
    missing: bool
    signature: str | None
    checkpoints: int


def runs_under(session, db, root: str) -> dict[str, StoredRun]:
    """{path: stored run} for the root folder and every run below it (exact prefix, case-sensitive)."""
    prefix = root.rstrip("/") + "/"
    rows = _Sql(session, db)(RUNS_UNDER, (root, len(prefix), prefix))
    return {path: StoredRun(rid, bool(missing), signature, count or 0) for rid, path, signature, count, missing in rows}


def load_checkpoints(session, db, by_id: dict[int, RunPlan]) -> None:
    """Fill each plan's known checkpoints, present ones with their files signature, and its metrics
    source, in a few bulk queries."""
    sql = _Sql(session, db)
    for chunk in _chunks(sorted(by_id)):
        marks = _marks(len(chunk))
        for cid, rid, layout, step, missing, signature in sql(
                f"SELECT id, run_id, layout, step, missing, files_signature FROM {_CKPTS} WHERE run_id IN ({marks})",
                tuple(chunk)):
            plan = by_id[rid]
            plan.known_keys.add((layout, step))
            if not missing:
                key = ("single_file", None) if layout == "single_file" else ("upstream", step)
                plan.present[key if key not in plan.present else ("duplicate", cid)] = (cid, signature)
        for rid, size, mtime, inode in sql(
                f"SELECT run_id, size, mtime_ns, inode FROM {MetricSource.__tablename__} "
                f"WHERE kind = 'jsonl' AND run_id IN ({marks})", tuple(chunk)):
            by_id[rid].source = (size, mtime, inode)


# ---------------------------------------------------------------------- scan rows


def start_scan(session, db, root: str, now: float) -> tuple[int, int]:
    """Record a running scan of `root`; return (root id, scan id)."""
    sql = _Sql(session, db)
    root_id = sql(ROOT_UPSERT, (root, now, now)).scalar_one()
    scan_id = sql(SCAN_INSERT, (root, now, "running", *([0] * len(_SCAN_COUNTERS)), 0)).scalar_one()
    sql(ROOT_LAST_SCAN, (scan_id, root_id))
    return root_id, scan_id


def finish_scan(session, db, scan_id: int, counts, status: str, error: str | None, seen: list[tuple],
                written: list[tuple[str, str, str]], now: float) -> list[tuple[str, str, str]]:
    """Close the scan row: its counters and status, the fingerprints of the runs it indexed
    (`seen`: (run id, fingerprint, checkpoints)), and the problems not already written with a batch
    (`written`). Returns those newly written problems."""
    sql = _Sql(session, db)
    if seen:  # only now, with every change of every run written, may the fingerprints say "indexed as is"
        sql(RUN_SEEN, [(now, fingerprint, n, rid) for rid, fingerprint, n in seen])
    stored = set(written)
    rows = [p for p in dict.fromkeys(counts.problems) if p not in stored]
    if rows:
        sql(PROBLEM_INSERT, [(scan_id, None, None, path, code, message, now) for path, code, message in rows])
    sql(SCAN_FINISH, (*(getattr(counts, n) for n in _SCAN_COUNTERS), status, error, now, len(stored) + len(rows), scan_id))
    return rows


def mark_run_missing(session, db, run_id: int) -> int:
    """A run whose folder vanished: it, its checkpoints, files and metrics sources are marked missing."""
    sql = _Sql(session, db)
    sql.lock_runs([run_id])
    sql(f"UPDATE {_RUNS} SET missing = TRUE WHERE id = ?", (run_id,))
    n = sql(f"UPDATE {_CKPTS} SET missing = TRUE WHERE run_id = ? AND missing = FALSE", (run_id,)).rowcount
    sql(f"UPDATE {_FILES} SET missing = TRUE WHERE run_id = ?", (run_id,))
    sql(f"UPDATE {MetricSource.__tablename__} SET missing = TRUE WHERE run_id = ?", (run_id,))
    return n


# ---------------------------------------------------------------------- one batch


@dataclass
class BatchResult:
    run_ids: dict[str, int]  # run path -> id, for every run of the batch
    new: int = 0
    changed: int = 0
    missing: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # written with the batch, in order


def write_batch(session, db, plans: list[RunPlan], items: list[tuple[RunPlan, Inspection]], root_id: int, scan_id: int,
                now: float) -> BatchResult:
    """Write one batch: run rows, inspected checkpoints with their files and problems, vanished
    checkpoints and files, the runs' configs. A plan not `written` yet gets its run row updated and
    its vanished checkpoints marked (once per scan, with its first batch)."""
    sql = _Sql(session, db)
    plans = list({id(p): p for p in plans}.values())
    ids = {str(p.path): p.run_id for p in plans if p.run_id is not None}
    new_runs = [p for p in plans if p.run_id is None]
    if new_runs:
        sql(RUN_INSERT, [(str(p.path), p.phase, p.tag, root_id, now, now, p.last_activity(), p.metrics_stat is not None,
                          False) for p in new_runs])
        for chunk in _chunks([str(p.path) for p in new_runs]):
            ids.update(sql(f"SELECT path, id FROM {_RUNS} WHERE path IN ({_marks(len(chunk))})", tuple(chunk)).all())
    sql.lock_runs(ids.values())
    # New runs were just inserted with this scan's values (or by a concurrent scanner, with the same).
    fresh = [p for p in plans if p.run_id is not None and not p.written]
    if fresh:
        rows = []
        for p in fresh:
            act = p.last_activity()
            rows.append((p.phase, p.tag, root_id, now, p.metrics_stat is not None, act, act, act, p.run_id))
        sql(RUN_UPDATE, rows)
    out = BatchResult(ids)
    gone = [cid for p in fresh for cid in p.gone()]
    if items:
        rows = []
        for p, ins in items:
            files = ins.slot.files.values()
            rows.append((ids[str(p.path)], ins.slot.layout, ins.step, ins.segment, ins.val_bpb, json.dumps(ins.meta),
                         ins.complete, ins.resumable, False, ins.has_train_state, ins.world_size(p.path),
                         json.dumps(ins.problems) if ins.problems else "[]", sum(f[2] for f in files),
                         max(f[3] for f in files), ins.slot.signature(), now, now))
            if p.known_keys and (ins.slot.layout, ins.step) in p.known_keys:
                out.changed += 1
            else:
                out.new += 1
        sql(CHECKPOINT_UPSERT, rows)
        run_ids = sorted({ids[str(p.path)] for p, _ in items})
        steps = sorted({ins.step for _, ins in items})
        cids = {(r, lay, step): c for c, r, lay, step in sql(
            f"SELECT id, run_id, layout, step FROM {_CKPTS} WHERE run_id IN ({_marks(len(run_ids))}) "
            f"AND step IN ({_marks(len(steps))})", (*run_ids, *steps))}
        file_rows, problems = [], []
        rechecked = {}  # checkpoint id -> the file names on disk now, for checkpoints indexed before
        for p, ins in items:
            rid = ids[str(p.path)]
            cid = cids[(rid, ins.slot.layout, ins.step)]
            file_rows += [(rid, cid, name, f[0], f[1], f[2], f[3], False, now) for name, f in sorted(ins.slot.files.items())]
            before = p.present.get(ins.slot.key)
            if before is not None and before[0] != cid:
                gone.append(before[0])  # checkpoint.pt rewritten with another step: the old step stays, as missing
            elif before is not None:
                rechecked[cid] = ins.slot.files
            for x in ins.problems:
                problems.append((rid, cid, str(p.path / (x["file"] or "")), x["code"],
                                 f"{p.path.name}@{ins.step if ins.step >= 0 else '?'}: {x['message']}"))
        sql(FILE_UPSERT, file_rows)
        vanished = []
        for chunk in _chunks(sorted(rechecked)):
            for cid, name in sql(f"SELECT checkpoint_id, name FROM {_FILES} WHERE checkpoint_id IN ({_marks(len(chunk))}) "
                                 "AND missing = FALSE", tuple(chunk)):
                if name not in rechecked[cid]:
                    vanished.append((cid, name))
        if vanished:
            sql(FILE_VANISHED, vanished)
        if problems:
            sql(PROBLEM_INSERT, [(scan_id, rid, cid, path, code, message, now) for rid, cid, path, code, message in problems])
            out.problems = [(path, code, message) for _, _, path, code, message in problems]
        _update_configs(sql, ids, items)
    for chunk in _chunks(gone):
        marks = _marks(len(chunk))
        out.missing += sql(f"UPDATE {_CKPTS} SET missing = TRUE WHERE id IN ({marks}) AND missing = FALSE",
                           tuple(chunk)).rowcount
        sql(f"UPDATE {_FILES} SET missing = TRUE WHERE checkpoint_id IN ({marks})", tuple(chunk))
    return out


def _update_configs(sql: _Sql, ids: dict[str, int], items: list[tuple[RunPlan, Inspection]]) -> None:
    """A run's config follows its newest complete checkpoint (a resume may change flags); an incomplete
    checkpoint's meta is used only while no complete one is known."""
    best: dict[int, tuple[RunPlan, Inspection]] = {}
    for p, ins in items:
        if ins.meta is not None:
            rid = ids[str(p.path)]
            cur = best.get(rid)
            if cur is None or (ins.complete, ins.step) > (cur[1].complete, cur[1].step):
                best[rid] = (p, ins)
    rows: dict[bool, list] = {True: [], False: []}
    for rid, (p, ins) in best.items():
        c = run_config(ins, p.path)
        values = [json.dumps(c["model_config"]), json.dumps(c["user_config"]), c["config_step"] if ins.complete else None,
                  *(c[k] for k in _CONFIG_COLUMNS[3:]), rid]
        rows[ins.complete].append((*values, ins.step) if ins.complete else tuple(values))
    if rows[True]:
        sql(CONFIG_COMPLETE, rows[True])
    if rows[False]:
        sql(CONFIG_INCOMPLETE, rows[False])
