"""
Metric history: ingesting points (from metrics.jsonl, checkpoint metas, imported logs) exactly once,
and reading them back downsampled on the server.

Ingestion (`ingest_points`, `sync_metrics_file`) runs inside a write transaction that holds the run's
lock (`Database.lock_run`; on SQLite the write transaction itself). Under that lock a point whose
(series, step, segment) is already stored is skipped (counted as existing) and everything else is
inserted, so re-reading a file, two scanners racing on one run, or importing a log twice never
duplicates a row. metrics.jsonl is read from the byte offset stored in `metric_sources` up to its last
complete line: a torn last line (the trainer is mid-write) is left for the next scan, and the offset
only ever lands on a line end. The offset advances in the same transaction as the points it covers.

Each ingest also maintains, per series, a running summary (count, min, max, last point) and per
segment and power-of-two block of steps a rollup (count, min point, max point) at levels 4..32.
`series_history` answers "at most N points" by picking the finest rollup level with at most ~N/2
blocks in range and returning each block's minimum and maximum point (plus the first and last point),
so extremes such as loss spikes always survive downsampling and a million-point series costs a few
thousand rows, not a scan. Small ranges are returned raw.

This module does not walk folders (scanner.py) or parse console logs (logimport.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from registry.db import Database
from registry.entities import MetricKeyInfo, MetricPoint
from registry.models import MetricPoint as PointRow
from registry.models import MetricRollup, MetricSegment, MetricSeries, MetricSource

LEVELS = tuple(range(4, 33))  # rollup block = step >> level
RESERVED = ("step", "segment", "wall_time")
CHUNK_BYTES = 8 << 20  # metrics.jsonl bytes ingested per transaction
INSERT_BATCH = 20_000

Point = tuple[str, int, int, float | None, float | None]  # key, step, segment, value (None = NaN), wall_time
ProblemSink = Callable[[str, str, str], None]  # (path, code, message)


# ---------------------------------------------------------------------- parsing metrics.jsonl


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r:.40}")
    return int(value)


def parse_metrics_line(raw: bytes | str) -> list[Point]:
    """The points of one metrics.jsonl line; ValueError with a short reason when it is malformed."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "step" not in obj:
        raise ValueError("no step")
    step = _as_int(obj["step"], "step")
    segment = _as_int(obj.get("segment", 1), "segment")
    if step < 0 or segment < 1:
        raise ValueError(f"step must be >= 0 and segment >= 1 (got step {step}, segment {segment})")
    wall = obj.get("wall_time")
    wall = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) and math.isfinite(wall) else None
    out = []
    for key, value in obj.items():
        if key in RESERVED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # strings, lists, flags: not a metric series
        value = float(value)
        out.append((key[:200], step, segment, value if not math.isnan(value) else None, wall))
    return out


# ---------------------------------------------------------------------- ingestion (caller holds the run lock)


def _series_ids(session: Session, db: Database, run_id: int, keys: Iterable[str]) -> dict[str, int]:
    keys = sorted(set(keys))
    session.execute(db.insert(MetricSeries.__table__).on_conflict_do_nothing(index_elements=["run_id", "key"]),
                    [{"run_id": run_id, "key": k, "n": 0} for k in keys])
    rows = session.execute(sa.select(MetricSeries.key, MetricSeries.id)
                           .where(MetricSeries.run_id == run_id, MetricSeries.key.in_(keys)))
    return dict(rows.all())


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


def _update_summary(series: MetricSeries, rows: list[tuple[int, int, float | None, float | None]]) -> None:
    series.n = (series.n or 0) + len(rows)
    for step, segment, value, wall in rows:
        if value is not None:
            if series.min_value is None or value < series.min_value:
                series.min_value, series.min_step, series.min_segment = value, step, segment
            if series.max_value is None or value > series.max_value:
                series.max_value, series.max_step, series.max_segment = value, step, segment
        if series.last_step is None or (segment, step) > (series.last_segment, series.last_step):
            series.last_value, series.last_step, series.last_segment, series.last_wall_time = value, step, segment, wall


def ingest_points(session: Session, db: Database, run_id: int, points: Iterable[Point]) -> tuple[int, int]:
    """Store points not stored yet; return (new, already present). The caller holds the run's lock."""
    by_key: dict[str, dict[tuple[int, int], tuple[float | None, float | None]]] = {}
    for key, step, segment, value, wall in points:
        by_key.setdefault(key, {}).setdefault((step, segment), (value, wall))  # first occurrence wins
    if not by_key:
        return 0, 0
    ids = _series_ids(session, db, run_id, by_key)
    new = existing = 0
    for key in sorted(by_key):
        wanted, sid = by_key[key], ids[key]
        steps = [s for s, _ in wanted]
        have = set(session.execute(sa.select(PointRow.step, PointRow.segment).where(
            PointRow.series_id == sid, PointRow.step.between(min(steps), max(steps)))))
        rows = sorted((s, g, v, w) for (s, g), (v, w) in wanted.items() if (s, g) not in have)
        existing += len(wanted) - len(rows)
        if not rows:
            continue
        new += len(rows)
        table = PointRow.__table__
        for i in range(0, len(rows), INSERT_BATCH):
            session.execute(sa.insert(table), [{"series_id": sid, "step": s, "segment": g, "value": v, "wall_time": w}
                                               for s, g, v, w in rows[i:i + INSERT_BATCH]])
        by_segment: dict[int, list[tuple[int, float | None, float | None]]] = {}
        for s, g, v, w in rows:
            by_segment.setdefault(g, []).append((s, v, w))
        for g, seg_rows in sorted(by_segment.items()):
            roll = [{"series_id": sid, "segment": g, "level": lvl, "block": block, "n": a[0], "min_step": a[1],
                     "min_value": a[2], "min_wall_time": a[3], "max_step": a[4], "max_value": a[5], "max_wall_time": a[6]}
                    for lvl, block, a in _rollups(seg_rows)]
            for i in range(0, len(roll), INSERT_BATCH):
                session.execute(_rollup_upsert(db), roll[i:i + INSERT_BATCH])
            session.execute(_segment_upsert(db), [{
                "series_id": sid, "segment": g, "n": len(seg_rows), "first_step": seg_rows[0][0],
                "first_wall_time": seg_rows[0][2], "last_step": seg_rows[-1][0], "last_wall_time": seg_rows[-1][2]}])
        series = session.get(MetricSeries, sid, populate_existing=True)
        _update_summary(series, [(s, g, v, w) for s, g, v, w in rows])
    session.flush()
    return new, existing


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
            src.size, src.mtime_ns, src.inode, src.missing, src.updated_at = st.st_size, st.st_mtime_ns, st.st_ino, False, time.time()
            if st.st_size == src.offset:
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
                return 0, 0, False, problems  # only a torn (partial) last line: wait for the trainer
            lines = data[:end].split(b"\n")
            points: list[Point] = []
            bad = 0
            first_line_no = src.lines + src.bad_lines + 1
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    points.extend(parse_metrics_line(line))
                except ValueError as e:
                    bad += 1
                    if bad <= 5:
                        problems.append((path, "bad_metrics_line",
                                         f"{os.path.basename(path)} line {first_line_no + i}: {e}"))
            ingest_points(session, db, run_id, points)
            good = sum(1 for line in lines if line.strip()) - bad
            if bad > 5:
                problems.append((path, "bad_metrics_line", f"{os.path.basename(path)}: {bad - 5} more malformed lines"))
            src.offset += end + 1
            src.lines += good
            src.bad_lines += bad
            return good, bad, src.offset < st.st_size and len(data) >= chunk_bytes, problems

        good, bad, more, problems = db.write(chunk)
        for p in problems:
            if on_problem:
                on_problem(*p)
        total, bad_total = total + good, bad_total + bad
        if not more:
            return total, bad_total


# ---------------------------------------------------------------------- reading


def _raw(session: Session, sid: int, segment: int, lo: int, hi: int, limit: int | None = None) -> list[MetricPoint]:
    q = (sa.select(PointRow.step, PointRow.value, PointRow.segment, PointRow.wall_time)
         .where(PointRow.series_id == sid, PointRow.step.between(lo, hi), PointRow.segment == segment)
         .order_by(PointRow.step))
    if limit is not None:
        q = q.limit(limit)
    return [MetricPoint(*r) for r in session.execute(q)]


def _edge(session: Session, sid: int, segment: int, lo: int, hi: int, last: bool) -> MetricPoint | None:
    q = (sa.select(PointRow.step, PointRow.value, PointRow.segment, PointRow.wall_time)
         .where(PointRow.series_id == sid, PointRow.step.between(lo, hi), PointRow.segment == segment)
         .order_by(PointRow.step.desc() if last else PointRow.step).limit(1))
    row = session.execute(q).first()
    return MetricPoint(*row) if row else None


def series_history(session: Session, sid: int, max_points: int, step_min: int | None = None,
                   step_max: int | None = None) -> tuple[list[MetricPoint], int, bool, tuple[int, ...]]:
    """(points sorted by (segment, step), points stored in range, downsampled?, segments) of one series."""
    segs = session.execute(sa.select(MetricSegment).where(MetricSegment.series_id == sid)
                           .order_by(MetricSegment.segment)).scalars().all()
    lo_req = step_min if step_min is not None else -(1 << 62)
    hi_req = step_max if step_max is not None else 1 << 62
    segs = [s for s in segs if s.last_step >= lo_req and s.first_step <= hi_req]
    all_segments = tuple(s.segment for s in segs)
    max_points = max(1, int(max_points))
    if len(segs) > max_points:
        segs = segs[-max_points:]  # more segments than points: the newest ones
    if not segs:
        return [], 0, False, all_segments
    budget = max_points // len(segs)
    points: list[MetricPoint] = []
    total, downsampled = 0, False
    ranged = step_min is not None or step_max is not None
    for seg in segs:
        lo, hi = max(seg.first_step, lo_req), min(seg.last_step, hi_req)
        if not ranged and seg.n <= budget:
            points += _raw(session, sid, seg.segment, lo, hi)
            total += seg.n
            continue
        blocks = max(1, (budget - 2) // 2)
        level = next((lv for lv in LEVELS if (hi >> lv) - (lo >> lv) + 1 <= blocks), LEVELS[-1])
        rows = session.execute(sa.select(MetricRollup).where(
            MetricRollup.series_id == sid, MetricRollup.segment == seg.segment, MetricRollup.level == level,
            MetricRollup.block.between(lo >> level, hi >> level)).order_by(MetricRollup.block)).scalars().all()
        in_range = sum(r.n for r in rows)  # exact without a range; an upper bound with one
        if in_range <= budget:
            found = _raw(session, sid, seg.segment, lo, hi)
            points += found
            total += len(found) if ranged else seg.n
            continue
        picked: dict[int, MetricPoint] = {}
        for r in rows:
            for step, value, wall in ((r.min_step, r.min_value, r.min_wall_time), (r.max_step, r.max_value, r.max_wall_time)):
                if value is not None and lo <= step <= hi:
                    picked[step] = MetricPoint(step, value, seg.segment, wall)
        if budget >= 2:
            for edge in (_edge(session, sid, seg.segment, lo, hi, False), _edge(session, sid, seg.segment, lo, hi, True)):
                if edge is not None:
                    picked[edge.step] = edge
        chosen = sorted(picked.values(), key=lambda p: p.step)
        if len(chosen) > budget:  # only with tiny budgets (< 4 points per segment)
            chosen = chosen[:: math.ceil(len(chosen) / budget)][:budget]
        points += chosen
        total += seg.n if not ranged else in_range
        downsampled = True
    return points, total, downsampled, all_segments


def metric_keys(session: Session, run_id: int) -> list[MetricKeyInfo]:
    series = session.execute(sa.select(MetricSeries).where(MetricSeries.run_id == run_id, MetricSeries.n > 0)
                             .order_by(MetricSeries.key)).scalars().all()
    segs: dict[int, list[int]] = {}
    if series:
        for sid, g in session.execute(sa.select(MetricSegment.series_id, MetricSegment.segment)
                                      .where(MetricSegment.series_id.in_([s.id for s in series]))
                                      .order_by(MetricSegment.segment)):
            segs.setdefault(sid, []).append(g)
    return [MetricKeyInfo(s.key, s.n, s.min_value, s.min_step, s.max_value, s.max_step, s.last_value, s.last_step,
                          s.last_segment, tuple(segs.get(s.id, ()))) for s in series]
