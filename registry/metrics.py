"""
Metric ingestion: points from metrics.jsonl and imported logs, stored exactly once, with the running
summaries and rollups that make reading them cheap (reading is history.py).

Ingestion (`ingest_points`, `ingest_many`, `sync_metrics_file`) runs inside a write transaction that
holds the runs' locks (`Database.lock_runs`; on SQLite the write transaction itself). Under that lock
a point whose (series, step, segment) is already stored is skipped (counted as existing) and every
other point is inserted, so re-reading a file, two scanners racing on one run, or importing a log
twice never duplicates a row. metrics.jsonl is read from the byte offset stored in `metric_sources`
up to its last complete line: a torn last line (the trainer is mid-write) is left for the next scan,
and the offset only ever lands on a line end. It advances in the same transaction as the points it
covers, so a crash cannot skip or repeat a line.

Each ingest also maintains a running summary per series (count, min, max, last point by (segment,
step)) and, for segments of at least ROLLUP_MIN points, rollups: per power-of-two block of steps at
levels 4..32, the count and the minimum and maximum point. A segment crossing ROLLUP_MIN gets its
rollups built from all its points at that moment. This module does not walk folders (scanner.py)
or parse console logs (logimport.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.orm import Session

from nanochat import bounds
from nanochat.bounds import MAX_STEP
from registry.db import Database, named_placeholder
from registry.models import MetricPoint as PointRow
from registry.models import MetricRollup, MetricSegment, MetricSeries, MetricSource

LEVELS = tuple(range(4, 33))  # rollup block = step >> level
ROLLUP_MIN = 4096  # a segment gets rollups once it holds this many points; smaller ones are bucketed from raw rows
RESERVED = ("step", "segment", "wall_time")
CHUNK_BYTES = 8 << 20  # metrics.jsonl bytes ingested per transaction
INSERT_BATCH = 20_000
_POINT_COLUMNS = ("series_id", "step", "segment", "value", "wall_time")  # the parameter names of each row

Point = tuple[str, int, int, float | None, float | None]  # key, step, segment, value (None = NaN), wall_time
ProblemSink = Callable[[str, str, str], None]  # (path, code, message)


# ---------------------------------------------------------------------- parsing metrics.jsonl


def _as_int(value, name: str, low: int) -> int:
    """A step or segment: an integer (or an integral float) from `low` to MAX_STEP."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    if not low <= value <= MAX_STEP:
        raise ValueError(f"{name} {_show(value)} is out of range ({low} to {MAX_STEP})")
    return int(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "…"


def _number(value) -> float | None:
    """A metric value or wall time as a float (None: not a number, or too large for one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer past 1.8e308
        return None


def parse_metrics_line(raw: bytes | str) -> list[Point]:
    """The points of one metrics.jsonl line; ValueError with a short reason when it is malformed. The one
    place a metrics line's numbers are checked: nesting (`bounds.loads`), step and segment within the
    registry's columns, values that are floats."""
    try:
        obj = bounds.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except ValueError as e:  # JSONDecodeError, too deep, an integer of too many digits
        raise ValueError(f"not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "step" not in obj:
        raise ValueError("no step")
    step, segment = obj["step"], obj.get("segment", 1)
    if not (type(step) is int and 0 <= step <= MAX_STEP):  # the common case passes without a call
        step = _as_int(step, "step", 0)
    if not (type(segment) is int and 1 <= segment <= MAX_STEP):
        segment = _as_int(segment, "segment", 1)
    wall = _number(obj.get("wall_time"))
    wall = wall if wall is not None and math.isfinite(wall) else None
    out = []
    for key, value in obj.items():
        if type(value) is not float:  # a float (nearly every value) is taken as is; the rest are checked
            if key in RESERVED:
                continue
            value = _number(value)
            if value is None:
                continue  # strings, lists, flags, numbers no float holds: not a metric series
        elif key in RESERVED:
            continue
        out.append((key[:200], step, segment, value if value == value else None, wall))  # NaN != NaN: stored as None
    return out


# ---------------------------------------------------------------------- ingestion (caller holds the run lock)


def _series_ids(session: Session, db: Database, pairs: set[tuple[int, str]]) -> dict[tuple[int, str], tuple[int, int]]:
    """{(run, key): (series id, points stored before)} creating missing series."""
    session.execute(db.insert(MetricSeries.__table__).on_conflict_do_nothing(index_elements=["run_id", "key"]),
                    [{"run_id": r, "key": k, "n": 0} for r, k in sorted(pairs)])
    rows = session.execute(sa.select(MetricSeries.run_id, MetricSeries.key, MetricSeries.id, MetricSeries.n).where(
        MetricSeries.run_id.in_(sorted({r for r, _ in pairs})), MetricSeries.key.in_(sorted({k for _, k in pairs}))))
    return {(r, k): (i, n) for r, k, i, n in rows if (r, k) in pairs}


def _rollups(rows: list[tuple[int, float | None, float | None]]) -> Iterable[tuple[int, int, list]]:
    """(level, block, [n, min_step, min_value, min_wall, max_step, max_value, max_wall]) for every level."""
    level: dict[int, list] = {}
    shift = LEVELS[0]
    for step, value, wall in rows:
        agg = level.get(step >> shift)
        if agg is None:
            agg = level[step >> shift] = [0, None, None, None, None, None, None]
        agg[0] += 1
        if value is not None:
            if agg[2] is None or value < agg[2]:
                agg[1], agg[2], agg[3] = step, value, wall
            if agg[5] is None or value > agg[5]:
                agg[4], agg[5], agg[6] = step, value, wall
    for lvl in LEVELS:
        if lvl != shift:
            coarser: dict[int, list] = {}
            for block, a in level.items():
                c = coarser.get(block >> 1)
                if c is None:
                    coarser[block >> 1] = list(a)
                    continue
                c[0] += a[0]
                if a[2] is not None and (c[2] is None or a[2] < c[2]):
                    c[1], c[2], c[3] = a[1], a[2], a[3]
                if a[5] is not None and (c[5] is None or a[5] > c[5]):
                    c[4], c[5], c[6] = a[4], a[5], a[6]
            level = coarser
        for block, a in level.items():
            yield lvl, block, a


def _rollup_upsert(db: Database):
    t = MetricRollup.__table__
    ins = db.insert(t)
    x = ins.excluded
    take_min = sa.or_(t.c.min_value.is_(None), x.min_value < t.c.min_value)
    take_max = sa.or_(t.c.max_value.is_(None), x.max_value > t.c.max_value)
    return ins.on_conflict_do_update(index_elements=["series_id", "segment", "level", "block"], set_={
        "n": t.c.n + x.n,
        "min_step": sa.case((take_min, x.min_step), else_=t.c.min_step),
        "min_value": sa.case((take_min, x.min_value), else_=t.c.min_value),
        "min_wall_time": sa.case((take_min, x.min_wall_time), else_=t.c.min_wall_time),
        "max_step": sa.case((take_max, x.max_step), else_=t.c.max_step),
        "max_value": sa.case((take_max, x.max_value), else_=t.c.max_value),
        "max_wall_time": sa.case((take_max, x.max_wall_time), else_=t.c.max_wall_time),
    })


def _segment_upsert(db: Database):
    t = MetricSegment.__table__
    ins = db.insert(t)
    x = ins.excluded
    earlier, later = x.first_step < t.c.first_step, x.last_step > t.c.last_step
    return ins.on_conflict_do_update(index_elements=["series_id", "segment"], set_={
        "n": t.c.n + x.n,
        "first_step": sa.case((earlier, x.first_step), else_=t.c.first_step),
        "first_wall_time": sa.case((earlier, x.first_wall_time), else_=t.c.first_wall_time),
        "last_step": sa.case((later, x.last_step), else_=t.c.last_step),
        "last_wall_time": sa.case((later, x.last_wall_time), else_=t.c.last_wall_time),
    })


_SUMMARY = ("n", "min_value", "min_step", "min_segment", "max_value", "max_step", "max_segment", "last_value", "last_step",
            "last_segment", "last_wall_time")


def _update_summaries(session: Session, new_rows: dict[int, list[tuple[int, int, float | None, float | None]]]) -> None:
    """Fold new points into each series' running summary (count, min, max, last by (segment, step))."""
    t = MetricSeries.__table__
    updates = []
    for row in session.execute(sa.select(t.c.id, *(t.c[c] for c in _SUMMARY)).where(t.c.id.in_(sorted(new_rows)))):
        sid, cur = row[0], dict(zip(_SUMMARY, row[1:]))
        cur["n"] = (cur["n"] or 0) + len(new_rows[sid])
        for step, segment, value, wall in new_rows[sid]:
            if value is not None:
                if cur["min_value"] is None or value < cur["min_value"]:
                    cur["min_value"], cur["min_step"], cur["min_segment"] = value, step, segment
                if cur["max_value"] is None or value > cur["max_value"]:
                    cur["max_value"], cur["max_step"], cur["max_segment"] = value, step, segment
            if cur["last_step"] is None or (segment, step) > (cur["last_segment"], cur["last_step"]):
                cur["last_value"], cur["last_step"], cur["last_segment"], cur["last_wall_time"] = value, step, segment, wall
        updates.append({"b_id": sid, **{f"b_{k}": v for k, v in cur.items()}})
    session.connection().execute(sa.update(t).where(t.c.id == sa.bindparam("b_id")).values(
        {c: sa.bindparam(f"b_{c}", type_=t.c[c].type) for c in _SUMMARY}), updates)


assert set(_POINT_COLUMNS) == set(PointRow.__table__.c.keys()), "metric_points' columns changed"


@functools.cache
def _point_insert(dialect: str) -> str:
    """The metric points' INSERT as plain SQL with named parameters: through Core, SQLAlchemy processes
    each of the scan's hundreds of thousands of rows in Python (about a third of ingesting them)."""
    mark = named_placeholder(dialect)
    return f"INSERT INTO {PointRow.__tablename__} ({', '.join(_POINT_COLUMNS)}) VALUES ({', '.join(map(mark, _POINT_COLUMNS))})"


def ingest_points(session: Session, db: Database, run_id: int, points: Iterable[Point]) -> tuple[int, int]:
    """Store points not stored yet; return (new, already present). The caller holds the run's lock."""
    return ingest_many(session, db, {run_id: points})


def ingest_many(session: Session, db: Database, points_by_run: Mapping[int, Iterable[Point]]) -> tuple[int, int]:
    """ingest_points for several runs in one go (the scanner's batches); the caller holds their locks."""
    wanted: dict[tuple[int, str], dict[tuple[int, int], tuple[float | None, float | None]]] = {}
    for run_id, points in points_by_run.items():
        by_key: dict[str, dict] = {}
        for key, step, segment, value, wall in points:
            per = by_key.get(key)
            if per is None:
                per = by_key[key] = {}
            at = (step, segment)
            if at not in per:  # first occurrence wins
                per[at] = (value, wall)
        for key, per in by_key.items():
            wanted[(run_id, key)] = per
    if not wanted:
        return 0, 0
    series = _series_ids(session, db, set(wanted))
    new_rows: dict[int, list[tuple[int, int, float | None, float | None]]] = {}
    existing = 0
    for pair in sorted(wanted):
        sid, stored = series[pair]
        want = wanted[pair]
        have: set = set()
        if stored:
            steps = [s for s, _ in want]
            have = set(session.execute(sa.select(PointRow.step, PointRow.segment).where(
                PointRow.series_id == sid, PointRow.step.between(min(steps), max(steps)))).all())
        rows = sorted([(s, g, v, w) for (s, g), (v, w) in want.items() if (s, g) not in have] if have else
                      [(s, g, v, w) for (s, g), (v, w) in want.items()])
        existing += len(want) - len(rows)
        if rows:
            new_rows[sid] = rows
    if not new_rows:
        return 0, existing
    flat = [{"series_id": sid, "step": s, "segment": g, "value": v, "wall_time": w}
            for sid, rows in new_rows.items() for s, g, v, w in rows]
    sql = _point_insert(db.dialect)
    conn = session.connection()
    for i in range(0, len(flat), INSERT_BATCH):
        conn.exec_driver_sql(sql, flat[i:i + INSERT_BATCH])
    by_segment: dict[tuple[int, int], list[tuple[int, float | None, float | None]]] = {}
    for sid, rows in new_rows.items():
        last, bucket = None, []
        for s, g, v, w in rows:
            if g != last:  # one lookup per run of points of one segment (usually one per series)
                last, bucket = g, by_segment.setdefault((sid, g), [])
            bucket.append((s, v, w))
    before = {(sid, g): n for sid, g, n in session.execute(sa.select(
        MetricSegment.series_id, MetricSegment.segment, MetricSegment.n).where(MetricSegment.series_id.in_(sorted(new_rows))))}
    session.execute(_segment_upsert(db), [
        {"series_id": sid, "segment": g, "n": len(rows), "first_step": rows[0][0], "first_wall_time": rows[0][2],
         "last_step": rows[-1][0], "last_wall_time": rows[-1][2]} for (sid, g), rows in sorted(by_segment.items())])
    roll = []
    for (sid, g), rows in sorted(by_segment.items()):
        old = before.get((sid, g), 0)
        if old + len(rows) < ROLLUP_MIN:
            continue  # small segments are bucketed from their raw rows at query time
        if 0 < old < ROLLUP_MIN:  # crossing the threshold: roll up every point of the segment (new ones included)
            rows = list(session.execute(sa.select(PointRow.step, PointRow.value, PointRow.wall_time).where(
                PointRow.series_id == sid, PointRow.segment == g)).all())
        roll += [{"series_id": sid, "segment": g, "level": lvl, "block": block, "n": a[0], "min_step": a[1],
                  "min_value": a[2], "min_wall_time": a[3], "max_step": a[4], "max_value": a[5], "max_wall_time": a[6]}
                 for lvl, block, a in _rollups(rows)]
    for i in range(0, len(roll), INSERT_BATCH):
        session.execute(_rollup_upsert(db), roll[i:i + INSERT_BATCH])
    _update_summaries(session, new_rows)
    return len(flat), existing


def metric_source(session: Session, db: Database, run_id: int, path: str, kind: str) -> MetricSource:
    session.execute(db.insert(MetricSource.__table__).on_conflict_do_nothing(index_elements=["run_id", "path"]),
                    [{"run_id": run_id, "path": path, "kind": kind, "offset": 0, "size": 0, "mtime_ns": 0,
                      "lines": 0, "bad_lines": 0, "missing": False, "updated_at": time.time()}])
    return session.execute(sa.select(MetricSource).where(MetricSource.run_id == run_id, MetricSource.path == path)
                           .execution_options(populate_existing=True)).scalar_one()


def sync_metrics_file(db: Database, run_id: int, path: str, on_problem: ProblemSink | None = None,
                      chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """Ingest the complete lines appended to a metrics.jsonl since the stored offset, one transaction
    per chunk. Returns (lines ingested, malformed lines). Safe to call from many processes at once."""
    total = bad_total = 0
    while True:
        def chunk(session: Session):
            db.lock_run(session, run_id)
            src = metric_source(session, db, run_id, path, "jsonl")
            problems: list[tuple[str, str, str]] = []
            try:
                st = os.stat(path)
            except FileNotFoundError:
                src.missing = True
                return 0, 0, False, problems
            if (src.inode is not None and st.st_ino != src.inode) or st.st_size < src.offset:
                problems.append((path, "metrics_rewritten", f"{os.path.basename(path)} was replaced or shortened; "
                                 "reading it again from the start (points already stored are kept)"))
                src.offset, src.lines, src.bad_lines = 0, 0, 0
            src.inode, src.missing, src.updated_at = st.st_ino, False, time.time()
            caught_up = (st.st_size, st.st_mtime_ns)  # the size and mtime a scan compares with, once all is read
            if st.st_size == src.offset:
                src.size, src.mtime_ns = caught_up
                return 0, 0, False, problems
            with open(path, "rb") as f:
                f.seek(src.offset)
                data = f.read(chunk_bytes)
                while data and b"\n" not in data and len(data) >= chunk_bytes:
                    more = f.read(chunk_bytes)  # one line longer than a chunk: keep reading to its end
                    if not more:
                        break
                    data += more
            end = data.rfind(b"\n")
            if end < 0:
                src.size, src.mtime_ns = caught_up
                return 0, 0, False, problems  # only a torn (partial) last line: wait for the trainer
            lines = data[:end].split(b"\n")
            points: list[Point] = []
            good = bad = 0
            first_line_no = src.lines + src.bad_lines + 1
            for i, line in enumerate(lines):
                if not line or line.isspace():  # a blank line is no line (isspace: no stripped copy)
                    continue
                try:
                    points.extend(parse_metrics_line(line))
                except ValueError as e:
                    bad += 1
                    if bad <= 5:
                        problems.append((path, "bad_metrics_line",
                                         f"{os.path.basename(path)} line {first_line_no + i}: {e}"))
                else:
                    good += 1
            ingest_points(session, db, run_id, points)
            if bad > 5:
                problems.append((path, "bad_metrics_line", f"{os.path.basename(path)}: {bad - 5} more malformed lines"))
            src.offset += end + 1  # in the transaction that stores the points of these lines, never ahead of them
            src.lines += good
            src.bad_lines += bad
            more = src.offset < st.st_size and len(data) >= chunk_bytes
            if not more:  # until then a scan that dies leaves the old size, and the next one reads on
                src.size, src.mtime_ns = caught_up
            return good, bad, more, problems

        good, bad, more, problems = db.write(chunk)
        for p in problems:
            if on_problem:
                on_problem(*p)
        total, bad_total = total + good, bad_total + bad
        if not more:
            return total, bad_total
