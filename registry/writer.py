"""
The scanner's database side: what the registry already holds for the runs under a folder (a few bulk
reads) and every write of a scan (its row, one batch of inspected checkpoints, the end), as plain SQL.

Why plain SQL here and typed SQLAlchemy everywhere else: a scan usually runs in a fresh process (the
CLI) on a fresh engine, and SQLAlchemy compiles every distinct Core statement on its first use per
engine: through Core and ORM statements the database side of a scan of 50 single-file checkpoints took
~13 ms, three times reading their metadata; as plain SQL it takes ~3 ms. Measured again for issue 15
with Core `insert().on_conflict_do_update()` and `executemany` (compiled once per engine, then cached):
the 50-row checkpoint upsert alone took >= 3.2 ms on a fresh engine against >= 0.8 ms as plain SQL
(best of 7 rounds each, a busy 2-core machine), more than the 10% of the whole 50-checkpoint scan
(~10-18 ms) that a change may cost; so plain SQL stays.

What keeps it typed: each table's rows are dataclasses (`CheckpointRow`, `FileRow`, ...) whose field
names are the column names, checked against the ORM tables of models.py (still the one definition of
the schema) when this module is imported; they reach the driver as named parameters (`vars(row)`), in
the placeholder style of the driver (`:name` for sqlite3, `%(name)s` for psycopg), built into each
statement once per dialect, never by rewriting SQL text. Values are written exactly as the ORM writes
them (JSON columns as `json.dumps` text, JSON null included). The SQL is the same on SQLite (>= 3.35)
and PostgreSQL: INSERT ... ON CONFLICT DO UPDATE/NOTHING, RETURNING, TRUE/FALSE. Statements run on the
session's connection (`exec_driver_sql`), so transactions, locks, retries and error translation are
`Database.write`'s, as for every other write.

Every write function is safe to retry as a whole (`Database.write` reruns it after a PostgreSQL
deadlock): it changes nothing outside the database, and returns what the caller applies after the
commit. The writer knows runs only as `RunWrite`s (named values the scanner hands it) and decides
nothing: what is new, changed or gone is scanner.py's job; inspecting checkpoints is inspection.py's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from registry.db import named_placeholder
from registry.inspection import Inspection, run_config
from registry.models import Checkpoint, CheckpointFile, MetricSource, Root, Run, Scan, ScanProblem

CHUNK = 500  # ids per IN (...) list

_RUNS, _CKPTS, _FILES = Run.__tablename__, Checkpoint.__tablename__, CheckpointFile.__tablename__
_SCAN_COUNTERS = ("runs_found", "runs_new", "runs_missing", "checkpoints_seen", "checkpoints_new", "checkpoints_changed",
                  "checkpoints_unchanged", "checkpoints_missing", "files_stat", "metric_lines", "metric_bad_lines")


# ---------------------------------------------------------------------- rows (field names = column names)


@dataclass
class CheckpointRow:
    run_id: int
    layout: str
    step: int
    segment: int
    val_bpb: float | None
    meta: str  # JSON text
    complete: bool
    resumable: bool
    missing: bool
    has_train_state: bool
    world_size: int | None
    problems: str  # JSON text
    size_bytes: int
    mtime_ns: int
    files_signature: str
    first_seen_at: float
    inspected_at: float


# Rewritten when a checkpoint is inspected again; first_seen_at stays the first scan's.
_CHECKPOINT_UPDATED = ("segment", "val_bpb", "meta", "complete", "resumable", "missing", "has_train_state", "world_size",
                       "problems", "size_bytes", "mtime_ns", "files_signature", "inspected_at")


@dataclass
class FileRow:
    run_id: int
    checkpoint_id: int
    name: str
    kind: str
    rank: int | None
    size: int
    mtime_ns: int
    missing: bool
    first_seen_at: float


@dataclass
class ProblemRow:
    scan_id: int
    run_id: int | None
    checkpoint_id: int | None
    path: str
    code: str
    message: str
    created_at: float


@dataclass
class NewRunRow:
    origin: str
    path: str
    phase: str
    tag: str
    root_id: int
    first_seen_at: float
    last_seen_at: float
    last_activity_at: float | None
    has_metrics_file: bool
    missing: bool


@dataclass
class RunSeenRow:
    """A run seen again: where it is, that it is present, and its newest activity (never moved back)."""
    id: int
    phase: str
    tag: str
    root_id: int
    last_seen_at: float
    has_metrics_file: bool
    last_activity_at: float | None


@dataclass
class RunIndexedRow:
    id: int
    last_seen_at: float
    dir_signature: str
    dir_checkpoints: int


@dataclass
class ConfigRow:
    id: int
    model_config: str  # JSON text
    user_config: str  # JSON text
    config_step: int | None
    num_iterations: int | None
    world_size: int | None
    total_batch_size: int | None
    depth: int | None
    n_params: int | None
    flops_per_token: int | None
    generation: str | None


def _columns(table, row_type) -> tuple[str, ...]:
    """A row type's field names, checked against the ORM table (a renamed column fails at import, not mid-scan)."""
    names = tuple(f.name for f in fields(row_type))
    missing = [n for n in names if n not in table.c]
    assert not missing, f"{table.name} has no column {missing}"
    return names


_columns(Checkpoint.__table__, CheckpointRow)
_columns(CheckpointFile.__table__, FileRow)
_columns(ScanProblem.__table__, ProblemRow)
for _row in (NewRunRow, RunSeenRow, RunIndexedRow, ConfigRow):
    _columns(Run.__table__, _row)
_CONFIG_COLUMNS = tuple(f.name for f in fields(ConfigRow))[1:]


# ---------------------------------------------------------------------- statements, one set per dialect


class _Statements:
    """Every fixed statement of the writer with named placeholders in `mark`'s style."""

    def __init__(self, mark):
        self.mark = mark

        def insert(table, row_type, conflict: str) -> str:
            cols = _columns(table, row_type)
            return (f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join(mark(c) for c in cols)}) "
                    f"{conflict}").rstrip()

        def assign(names) -> str:
            return ", ".join(f"{n} = {mark(n)}" for n in names)

        m = mark
        self.root_upsert = (f"INSERT INTO {Root.__tablename__} (path, first_scanned_at, last_scanned_at) "
                            f"VALUES ({m('path')}, {m('now')}, {m('now')}) "
                            "ON CONFLICT (path) DO UPDATE SET last_scanned_at = excluded.last_scanned_at RETURNING id")
        self.scan_insert = (f"INSERT INTO {Scan.__tablename__} (root_path, origin, started_at, status, error, "
                            f"{', '.join(_SCAN_COUNTERS)}, problem_count) VALUES ({m('root_path')}, {m('origin')}, "
                            f"{m('started_at')}, 'running', {m('owner')}, {', '.join('0' for _ in _SCAN_COUNTERS)}, 0) "
                            "RETURNING id")
        self.scans_running = f"SELECT id, error FROM {Scan.__tablename__} WHERE status = 'running'"
        self.scan_interrupted = (f"UPDATE {Scan.__tablename__} SET status = 'interrupted', error = {m('error')} "
                                 f"WHERE id = {m('id')} AND status = 'running'")
        self.root_last_scan = f"UPDATE {Root.__tablename__} SET last_scan_id = {m('scan_id')} WHERE id = {m('root_id')}"
        self.scan_finish = (f"UPDATE {Scan.__tablename__} SET {assign(_SCAN_COUNTERS)}, status = {m('status')}, "
                            f"error = {m('error')}, finished_at = {m('finished_at')}, problem_count = {m('problem_count')} "
                            f"WHERE id = {m('id')}")
        # A scan sees its own origin's runs and the unclaimed ones ('': indexed before origins existed).
        self.runs_under = (f"SELECT id, path, dir_signature, dir_checkpoints, missing, origin FROM {_RUNS} "
                           f"WHERE (origin = {m('origin')} OR origin = '') "
                           f"AND (path = {m('root')} OR substr(path, 1, {m('length')}) = {m('prefix')})")
        self.run_claim = f"UPDATE {_RUNS} SET origin = {m('origin')} WHERE id = {m('id')} AND origin = ''"
        self.run_insert = insert(Run.__table__, NewRunRow, "ON CONFLICT (origin, path) DO NOTHING")
        act = m("last_activity_at")
        self.run_update = (f"UPDATE {_RUNS} SET {assign(('phase', 'tag', 'root_id', 'last_seen_at', 'has_metrics_file'))}, "
                           f"missing = FALSE, last_activity_at = CASE WHEN last_activity_at IS NULL THEN {act} "
                           f"WHEN {act} > last_activity_at THEN {act} ELSE last_activity_at END WHERE id = {m('id')}")
        self.run_indexed = (f"UPDATE {_RUNS} SET {assign(('last_seen_at', 'dir_signature', 'dir_checkpoints'))} "
                            f"WHERE id = {m('id')}")
        # The newest complete checkpoint's config wins; an incomplete one only fills an empty config. The
        # condition is in the UPDATE, so concurrent scanners cannot put an older config back.
        self.config_complete = (f"UPDATE {_RUNS} SET {assign(_CONFIG_COLUMNS)} WHERE id = {m('id')} "
                                f"AND (config_step IS NULL OR config_step <= {m('config_step')})")
        self.config_incomplete = f"UPDATE {_RUNS} SET {assign(_CONFIG_COLUMNS)} WHERE id = {m('id')} AND config_step IS NULL"
        self.checkpoint_upsert = insert(Checkpoint.__table__, CheckpointRow, "ON CONFLICT (run_id, layout, step) DO UPDATE SET "
                                        + ", ".join(f"{c} = excluded.{c}" for c in _CHECKPOINT_UPDATED))
        self.file_upsert = insert(CheckpointFile.__table__, FileRow,
                                  "ON CONFLICT (checkpoint_id, name) DO UPDATE SET size = excluded.size, "
                                  "mtime_ns = excluded.mtime_ns, kind = excluded.kind, rank = excluded.rank, missing = FALSE")
        self.file_vanished = f"UPDATE {_FILES} SET missing = TRUE WHERE checkpoint_id = {m('checkpoint_id')} AND name = {m('name')}"
        self.problem_insert = insert(ScanProblem.__table__, ProblemRow, "")
        self.run_missing = f"UPDATE {_RUNS} SET missing = TRUE WHERE id = {m('id')}"
        self.run_checkpoints_missing = f"UPDATE {_CKPTS} SET missing = TRUE WHERE run_id = {m('id')} AND missing = FALSE"
        self.run_files_missing = f"UPDATE {_FILES} SET missing = TRUE WHERE run_id = {m('id')}"
        self.run_sources_missing = f"UPDATE {MetricSource.__tablename__} SET missing = TRUE WHERE run_id = {m('id')}"

    def among(self, values, prefix: str = "v") -> tuple[str, dict]:
        """An IN (...) list of named placeholders for `values`, and its parameters."""
        names = [f"{prefix}{i}" for i in range(len(values))]
        return f"({', '.join(self.mark(n) for n in names)})", dict(zip(names, values))


@functools.cache
def _statements(dialect: str) -> _Statements:
    return _Statements(named_placeholder(dialect))


def _chunks(items: list, n: int = CHUNK):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _Sql:
    """exec_driver_sql on one connection, with this dialect's statements."""

    def __init__(self, session, db):
        self.conn, self.db, self.s = session.connection(), db, _statements(db.dialect)

    def __call__(self, sql: str, params: Mapping | list[Mapping] | None = None):
        return self.conn.exec_driver_sql(sql, params if params is not None else {})

    def rows(self, sql: str, rows: list) -> None:
        """executemany with one row dataclass per parameter set."""
        self.conn.exec_driver_sql(sql, [vars(r) for r in rows])

    def lock_runs(self, run_ids) -> None:
        """PostgreSQL row locks in id order (see Database.lock_runs); SQLite's write transaction is the lock."""
        ids = sorted(run_ids)
        if self.db.dialect == "postgresql" and ids:
            among, params = self.s.among(ids)
            self(f"SELECT id FROM {_RUNS} WHERE id IN {among} ORDER BY id FOR UPDATE", params)


# ---------------------------------------------------------------------- reads


@dataclass(frozen=True)
class StoredRun:
    id: int
    missing: bool
    signature: str | None
    checkpoints: int
    claimed: bool = True  # False: origin '' (indexed before schema 5), which this origin may claim


@dataclass
class StoredCheckpoints:
    """What the registry holds of one run's checkpoints, for the scanner to compare with the disk."""
    known_keys: set = field(default_factory=set)  # (layout, step) of every checkpoint row, present or missing
    present: dict = field(default_factory=dict)  # slot key -> (checkpoint id, files signature)
    source: tuple | None = None  # (size, mtime_ns, inode) of metrics.jsonl when last read


def runs_under(session, db, root: str, origin: str) -> dict[str, StoredRun]:
    """{path: stored run} for the root folder and every run below it (exact prefix, case-sensitive) that
    belong to `origin` or to no origin yet; a run of the origin wins over an unclaimed one at its path."""
    sql = _Sql(session, db)
    prefix = root.rstrip("/") + "/"
    out: dict[str, StoredRun] = {}
    for rid, path, signature, count, missing, owner in sql(
            sql.s.runs_under, {"origin": origin, "root": root, "length": len(prefix), "prefix": prefix}):
        if path not in out or owner:
            out[path] = StoredRun(rid, bool(missing), signature, count or 0, bool(owner))
    return out


def claim_runs(session, db, origin: str, run_ids: list[int]) -> None:
    """Give unclaimed runs (origin '') to `origin`; one another origin claimed first stays theirs."""
    if run_ids:
        sql = _Sql(session, db)
        sql(sql.s.run_claim, [{"origin": origin, "id": rid} for rid in run_ids])


def load_checkpoints(session, db, run_ids) -> dict[int, StoredCheckpoints]:
    """Each run's known checkpoints, present ones with their files signature, and its metrics source,
    in a few bulk queries."""
    sql = _Sql(session, db)
    out = {rid: StoredCheckpoints() for rid in run_ids}
    for chunk in _chunks(sorted(out)):
        among, params = sql.s.among(chunk)
        for cid, rid, layout, step, missing, signature in sql(
                f"SELECT id, run_id, layout, step, missing, files_signature FROM {_CKPTS} WHERE run_id IN {among}", params):
            stored = out[rid]
            stored.known_keys.add((layout, step))
            if not missing:
                key = ("single_file", None) if layout == "single_file" else ("upstream", step)
                stored.present[key if key not in stored.present else ("duplicate", cid)] = (cid, signature)
        for rid, size, mtime, inode in sql(
                f"SELECT run_id, size, mtime_ns, inode FROM {MetricSource.__tablename__} "
                f"WHERE kind = 'jsonl' AND run_id IN {among}", params):
            out[rid].source = (size, mtime, inode)
    return out


# ---------------------------------------------------------------------- scan rows


def start_scan(session, db, root: str, now: float, owner: str, dead: Callable[[str], str | None],
               origin: str = "") -> tuple[int, int]:
    """Record a running scan of `root` by `owner` (kept in its error column while it runs) for `origin`;
    return (root id, scan id). Scans still marked running whose owner `dead` says is gone (it returns why)
    are marked interrupted first."""
    sql = _Sql(session, db)
    gone = [{"id": sid, "error": why} for sid, who in sql(sql.s.scans_running) if who and (why := dead(who))]
    if gone:
        sql(sql.s.scan_interrupted, gone)
    root_id = sql(sql.s.root_upsert, {"path": root, "now": now}).scalar_one()
    scan_id = sql(sql.s.scan_insert, {"root_path": root, "origin": origin, "started_at": now, "owner": owner}).scalar_one()
    sql(sql.s.root_last_scan, {"scan_id": scan_id, "root_id": root_id})
    return root_id, scan_id


def finish_scan(session, db, scan_id: int, counts, status: str, error: str | None, seen: list[RunIndexedRow],
                written: list[tuple[str, str, str]], now: float) -> list[tuple[str, str, str]]:
    """Close the scan row: its counters and status, the fingerprints of the runs it indexed (`seen`),
    and the problems not already written with a batch (`written`). Returns those newly written problems."""
    sql = _Sql(session, db)
    if seen:  # only now, with every change of every run written, may the fingerprints say "indexed as is"
        sql.rows(sql.s.run_indexed, seen)
    stored = set(written)
    rows = [p for p in dict.fromkeys(counts.problems) if p not in stored]
    if rows:
        sql.rows(sql.s.problem_insert, [ProblemRow(scan_id, None, None, path, code, message, now) for path, code, message in rows])
    sql(sql.s.scan_finish, {**{n: getattr(counts, n) for n in _SCAN_COUNTERS}, "status": status, "error": error,
                            "finished_at": now, "problem_count": len(stored) + len(rows), "id": scan_id})
    return rows


def mark_run_missing(session, db, run_id: int) -> int:
    """A run whose folder vanished: it, its checkpoints, files and metrics sources are marked missing."""
    sql = _Sql(session, db)
    sql.lock_runs([run_id])
    sql(sql.s.run_missing, {"id": run_id})
    n = sql(sql.s.run_checkpoints_missing, {"id": run_id}).rowcount
    sql(sql.s.run_files_missing, {"id": run_id})
    sql(sql.s.run_sources_missing, {"id": run_id})
    return n


# ---------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class RunWrite:
    """One run folder of a batch, as the scanner hands it to the writer."""
    path: Path
    run_id: int | None  # None: not in the registry yet
    phase: str
    tag: str
    last_activity: float | None
    has_metrics_file: bool
    first_batch: bool  # this scan has not written it yet: update its run row, mark its vanished checkpoints
    gone: tuple[int, ...] = ()  # ids of its checkpoints no longer on disk
    present: Mapping = field(default_factory=dict)  # slot key -> (checkpoint id, files signature) as stored


@dataclass
class BatchResult:
    run_ids: dict[str, int]  # run path -> id, for every run of the batch
    missing: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # written with the batch, in order


def write_batch(session, db, runs: list[RunWrite], items: list[tuple[RunWrite, Inspection]], root_id: int, scan_id: int,
                now: float, origin: str = "") -> BatchResult:
    """Write one batch: run rows, inspected checkpoints with their files and problems, vanished
    checkpoints and files, the runs' configs. A run's first batch of this scan also updates its run row
    and marks its vanished checkpoints."""
    sql = _Sql(session, db)
    runs = list({str(r.path): r for r in runs}.values())
    ids = {str(r.path): r.run_id for r in runs if r.run_id is not None}
    new_runs = [r for r in runs if r.run_id is None]
    if new_runs:
        sql.rows(sql.s.run_insert, [NewRunRow(origin, str(r.path), r.phase, r.tag, root_id, now, now, r.last_activity,
                                              r.has_metrics_file, False) for r in new_runs])
        for chunk in _chunks([str(r.path) for r in new_runs]):
            among, params = sql.s.among(chunk)
            ids.update(sql(f"SELECT path, id FROM {_RUNS} WHERE origin = {sql.s.mark('origin')} AND path IN {among}",
                           {**params, "origin": origin}).all())
    sql.lock_runs(ids.values())
    # New runs were just inserted with this scan's values (or by a concurrent scanner, with the same).
    fresh = [r for r in runs if r.run_id is not None and r.first_batch]
    if fresh:
        sql.rows(sql.s.run_update, [RunSeenRow(r.run_id, r.phase, r.tag, root_id, now, r.has_metrics_file, r.last_activity)
                                    for r in fresh])
    out = BatchResult(ids)
    gone = [cid for r in fresh for cid in r.gone]
    if items:
        sql.rows(sql.s.checkpoint_upsert, [_checkpoint_row(ids[str(r.path)], r.path, ins, now) for r, ins in items])
        run_ids = sorted({ids[str(r.path)] for r, _ in items})
        steps = sorted({ins.step for _, ins in items})
        runs_in, run_params = sql.s.among(run_ids, "r")
        steps_in, step_params = sql.s.among(steps, "s")
        cids = {(rid, lay, step): c for c, rid, lay, step in sql(
            f"SELECT id, run_id, layout, step FROM {_CKPTS} WHERE run_id IN {runs_in} AND step IN {steps_in}",
            {**run_params, **step_params})}
        file_rows, problems = [], []
        rechecked = {}  # checkpoint id -> the file names on disk now, for checkpoints indexed before
        for r, ins in items:
            rid = ids[str(r.path)]
            cid = cids[(rid, ins.slot.layout, ins.step)]
            file_rows += [FileRow(rid, cid, name, f[0], f[1], f[2], f[3], False, now) for name, f in sorted(ins.slot.files.items())]
            before = r.present.get(ins.slot.key)
            if before is not None and before[0] != cid:
                gone.append(before[0])  # checkpoint.pt rewritten with another step: the old step stays, as missing
            elif before is not None:
                rechecked[cid] = ins.slot.files
            for x in ins.problems:
                problems.append(ProblemRow(scan_id, rid, cid, str(r.path / (x["file"] or "")), x["code"],
                                           f"{r.path.name}@{ins.step if ins.step >= 0 else '?'}: {x['message']}", now))
        sql.rows(sql.s.file_upsert, file_rows)
        vanished = []
        for chunk in _chunks(sorted(rechecked)):
            among, params = sql.s.among(chunk)
            for cid, name in sql(f"SELECT checkpoint_id, name FROM {_FILES} WHERE checkpoint_id IN {among} "
                                 "AND missing = FALSE", params):
                if name not in rechecked[cid]:
                    vanished.append({"checkpoint_id": cid, "name": name})
        if vanished:
            sql(sql.s.file_vanished, vanished)
        if problems:
            sql.rows(sql.s.problem_insert, problems)
            out.problems = [(p.path, p.code, p.message) for p in problems]
        _update_configs(sql, ids, items)
    for chunk in _chunks(gone):
        among, params = sql.s.among(chunk)
        out.missing += sql(f"UPDATE {_CKPTS} SET missing = TRUE WHERE id IN {among} AND missing = FALSE", params).rowcount
        sql(f"UPDATE {_FILES} SET missing = TRUE WHERE checkpoint_id IN {among}", params)
    return out


def _checkpoint_row(run_id: int, run_path: Path, ins: Inspection, now: float) -> CheckpointRow:
    files = ins.slot.files.values()
    return CheckpointRow(run_id=run_id, layout=ins.slot.layout, step=ins.step, segment=ins.segment, val_bpb=ins.val_bpb,
                         meta=json.dumps(ins.meta), complete=ins.complete, resumable=ins.resumable, missing=False,
                         has_train_state=ins.has_train_state, world_size=ins.world_size(run_path),
                         problems=json.dumps(ins.problems) if ins.problems else "[]",
                         size_bytes=sum(f[2] for f in files), mtime_ns=max(f[3] for f in files),
                         files_signature=ins.slot.signature(), first_seen_at=now, inspected_at=now)


def _update_configs(sql: _Sql, ids: dict[str, int], items: list[tuple[RunWrite, Inspection]]) -> None:
    """A run's config follows its newest complete checkpoint (a resume may change flags); an incomplete
    checkpoint's meta is used only while no complete one is known."""
    best: dict[int, tuple[RunWrite, Inspection]] = {}
    for r, ins in items:
        if ins.meta is not None:
            rid = ids[str(r.path)]
            cur = best.get(rid)
            if cur is None or (ins.complete, ins.step) > (cur[1].complete, cur[1].step):
                best[rid] = (r, ins)
    rows: dict[bool, list] = {True: [], False: []}
    for rid, (r, ins) in best.items():
        c = run_config(ins, r.path)
        rows[ins.complete].append(ConfigRow(rid, json.dumps(c["model_config"]), json.dumps(c["user_config"]),
                                            c["config_step"] if ins.complete else None,
                                            *(c[k] for k in _CONFIG_COLUMNS[3:])))
    if rows[True]:
        sql.rows(sql.s.config_complete, rows[True])
    if rows[False]:
        sql.rows(sql.s.config_incomplete, rows[False])
