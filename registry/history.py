"""
Reading metric history: a run's series, downsampled on the server to at most N points per series
that keep every block's minimum and maximum (and both ends), and the per-run summaries the runs
overview shows.

Downsampling: a segment with more points than its share of the budget is cut into power-of-two
blocks of steps (the finest level with at most ~budget/2 blocks in range) and each block gives its
minimum and maximum point, so spikes and dips always survive. Segments of at least
`metrics.ROLLUP_MIN` points read those from the stored rollups (a few thousand rows for a million
points); smaller ones are bucketed from their raw rows, with the same result.

val_bpb of runs without a metrics.jsonl (upstream runs) is derived here from their checkpoints'
metas (the `checkpoints.val_bpb` column, missing checkpoints included: history is kept) and merged
with any points imported from a log. Deriving it at query time means a rewritten meta can never
leave a stale point behind. This module writes nothing (see metrics.py).
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from sqlalchemy.orm import Session

from nanochat.bounds import MAX_STEP
from registry.entities import MetricKeyInfo, MetricPoint
from registry.metrics import LEVELS, ROLLUP_MIN
from registry.models import Checkpoint, MetricRollup, MetricSegment, MetricSeries, Run
from registry.models import MetricPoint as PointRow

VAL = "val_bpb"
STEP_MIN, STEP_MAX = -(MAX_STEP + 1), MAX_STEP  # the bounds of an open step range (steps are 32-bit columns)


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


RAW_LEVELS = tuple(range(0, LEVELS[-1] + 1))  # raw rows can be bucketed finer than the stored rollups


def _level_for(lo: int, hi: int, blocks: int, levels: tuple[int, ...] = LEVELS) -> int:
    """The finest level at which [lo, hi] spans at most `blocks` blocks of 2**level steps."""
    return next((lv for lv in levels if (hi >> lv) - (lo >> lv) + 1 <= blocks), levels[-1])


def _thin(picked: dict[int, MetricPoint], budget: int) -> list[MetricPoint]:
    chosen = sorted(picked.values(), key=lambda p: p.step)
    if len(chosen) > budget:  # only with tiny budgets (< 4 points per segment)
        chosen = chosen[:: math.ceil(len(chosen) / budget)][:budget]
    return chosen


def _bucket(rows: list[MetricPoint], budget: int, lo: int, hi: int) -> list[MetricPoint]:
    """What the rollups give, computed from raw rows: each block's min and max point, plus both ends."""
    level = _level_for(lo, hi, max(1, (budget - 2) // 2), RAW_LEVELS)
    lows: dict[int, MetricPoint] = {}
    highs: dict[int, MetricPoint] = {}
    for p in rows:
        if p.value is None:
            continue
        b = p.step >> level
        if b not in lows or p.value < lows[b].value:
            lows[b] = p
        if b not in highs or p.value > highs[b].value:
            highs[b] = p
    picked = {p.step: p for p in (*lows.values(), *highs.values())}
    if budget >= 2 and rows:
        picked[rows[0].step], picked[rows[-1].step] = rows[0], rows[-1]
    return _thin(picked, budget)


def series_history(session: Session, sid: int, max_points: int, step_min: int | None = None,
                   step_max: int | None = None) -> tuple[list[MetricPoint], int, bool, tuple[int, ...]]:
    """(points sorted by (segment, step), points stored in range, downsampled?, segments) of one series."""
    segs = session.execute(sa.select(MetricSegment).where(MetricSegment.series_id == sid)
                           .order_by(MetricSegment.segment)).scalars().all()
    lo_req = max(STEP_MIN, step_min) if step_min is not None else STEP_MIN
    hi_req = min(STEP_MAX, step_max) if step_max is not None else STEP_MAX
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
        if (not ranged and seg.n <= budget) or seg.n < ROLLUP_MIN:
            found = _raw(session, sid, seg.segment, lo, hi)
            total += len(found)
            if len(found) > budget:
                found, downsampled = _bucket(found, budget, lo, hi), True
            points += found
            continue
        level = _level_for(lo, hi, max(1, (budget - 2) // 2))
        rows = session.execute(sa.select(MetricRollup).where(
            MetricRollup.series_id == sid, MetricRollup.segment == seg.segment, MetricRollup.level == level,
            MetricRollup.block.between(lo >> level, hi >> level)).order_by(MetricRollup.block)).scalars().all()
        in_range = sum(r.n for r in rows)  # exact without a range; an upper bound with one
        if in_range <= budget:
            found = _raw(session, sid, seg.segment, lo, hi)
            points += found
            total += len(found)
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
        points += _thin(picked, budget)
        total += seg.n if not ranged else in_range
        downsampled = True
    return points, total, downsampled, all_segments


def derived_val_points(session: Session, run_ids: list[int]) -> dict[int, list[MetricPoint]]:
    """{run id: val_bpb points from its checkpoints} for the given runs that have no metrics.jsonl."""
    out: dict[int, list[MetricPoint]] = {}
    if not run_ids:
        return out
    rows = session.execute(sa.select(Checkpoint.run_id, Checkpoint.step, Checkpoint.val_bpb, Checkpoint.segment,
                                     Checkpoint.mtime_ns).join(Run, Run.id == Checkpoint.run_id).where(
        Run.id.in_(run_ids), Run.has_metrics_file.is_(False), Checkpoint.val_bpb.is_not(None), Checkpoint.step >= 0)
        .order_by(Checkpoint.run_id, Checkpoint.segment, Checkpoint.step))
    for rid, step, val, seg, mtime in rows:
        out.setdefault(rid, []).append(MetricPoint(step, val, seg, mtime / 1e9 if mtime else None))
    return out


def _merge(stored: list[MetricPoint], derived: list[MetricPoint]) -> list[MetricPoint]:
    merged = {(p.segment, p.step): p for p in derived}
    merged.update({(p.segment, p.step): p for p in stored})  # a stored point (imported log) wins
    return [merged[k] for k in sorted(merged)]


def _downsample(points: list[MetricPoint], max_points: int) -> tuple[list[MetricPoint], bool]:
    """Budget split over segments as series_history does, each bucketed from raw points."""
    by_seg: dict[int, list[MetricPoint]] = {}
    for p in points:
        by_seg.setdefault(p.segment, []).append(p)
    segs = sorted(by_seg)[-max(1, max_points):]
    budget = max(1, max_points // len(segs)) if segs else 1
    out, down = [], False
    for g in segs:
        rows = by_seg[g]
        if len(rows) > budget:
            rows, down = _bucket(rows, budget, rows[0].step, rows[-1].step), True
        out += rows
    return out, down


def run_series(session: Session, run_id: int, has_metrics_file: bool, keys: list[str] | None, max_points: int,
               step_min: int | None = None, step_max: int | None = None):
    """[(key, points, total, downsampled, segments)] for a run, every key (or `keys`), sorted by key.
    Raises KeyError(key) for a requested key the run does not have."""
    q = sa.select(MetricSeries.id, MetricSeries.key).where(MetricSeries.run_id == run_id, MetricSeries.n > 0)
    found = dict(session.execute(q.order_by(MetricSeries.key)).all())
    derived = [] if has_metrics_file else derived_val_points(session, [run_id]).get(run_id, [])
    lo = max(STEP_MIN, step_min) if step_min is not None else STEP_MIN
    hi = min(STEP_MAX, step_max) if step_max is not None else STEP_MAX
    derived = [p for p in derived if lo <= p.step <= hi]
    names = set(found.values()) | ({VAL} if derived else set())
    for k in keys or []:
        if k not in names:
            raise KeyError(k)
    out = []
    for key in sorted(names if keys is None else set(keys)):
        sid = next((i for i, k in found.items() if k == key), None)
        if key == VAL and derived:
            stored = []
            if sid is not None:
                for seg in session.execute(sa.select(MetricSegment.segment).where(MetricSegment.series_id == sid)).scalars():
                    stored += _raw(session, sid, seg, lo, hi)
            merged = _merge(stored, derived)
            pts, down = _downsample(merged, max(1, int(max_points)))
            out.append((key, pts, len(merged), down, tuple(sorted({p.segment for p in merged}))))
        else:
            pts, total, down, segs = series_history(session, sid, max_points, step_min, step_max)
            out.append((key, pts, total, down, segs))
    return out


def _key_info(key: str, points: list[MetricPoint]) -> MetricKeyInfo:
    valued = [p for p in points if p.value is not None]
    low = min(valued, key=lambda p: p.value) if valued else None
    high = max(valued, key=lambda p: p.value) if valued else None
    last = max(points, key=lambda p: (p.segment, p.step))
    return MetricKeyInfo(key, len(points), low.value if low else None, low.step if low else None,
                         high.value if high else None, high.step if high else None, last.value, last.step, last.segment,
                         tuple(sorted({p.segment for p in points})))


def metric_keys(session: Session, run_id: int, has_metrics_file: bool = True) -> list[MetricKeyInfo]:
    series = session.execute(sa.select(MetricSeries).where(MetricSeries.run_id == run_id, MetricSeries.n > 0)
                             .order_by(MetricSeries.key)).scalars().all()
    segs: dict[int, list[int]] = {}
    if series:
        for sid, g in session.execute(sa.select(MetricSegment.series_id, MetricSegment.segment)
                                      .where(MetricSegment.series_id.in_([s.id for s in series]))
                                      .order_by(MetricSegment.segment)):
            segs.setdefault(sid, []).append(g)
    out = {s.key: MetricKeyInfo(s.key, s.n, s.min_value, s.min_step, s.max_value, s.max_step, s.last_value, s.last_step,
                                s.last_segment, tuple(segs.get(s.id, ()))) for s in series}
    derived = [] if has_metrics_file else derived_val_points(session, [run_id]).get(run_id, [])
    if derived:
        stored = []
        sid = next((s.id for s in series if s.key == VAL), None)
        if sid is not None:
            stored = [MetricPoint(*r) for r in session.execute(sa.select(
                PointRow.step, PointRow.value, PointRow.segment, PointRow.wall_time).where(PointRow.series_id == sid))]
        out[VAL] = _key_info(VAL, _merge(stored, derived))
    return [out[k] for k in sorted(out)]


def val_summaries(session: Session, runs: list[Run]) -> dict[int, tuple]:
    """{run id: (best, best step, last, last step, segments seen)} over stored val_bpb points, metric
    segments and, for runs without metrics.jsonl, their checkpoints' val_bpb."""
    ids = [r.id for r in runs]
    stored = {rid: (mn, mn_step, last, last_step, last_seg) for rid, mn, mn_step, last, last_step, last_seg in session.execute(
        sa.select(MetricSeries.run_id, MetricSeries.min_value, MetricSeries.min_step, MetricSeries.last_value,
                  MetricSeries.last_step, MetricSeries.last_segment)
        .where(MetricSeries.key == VAL, MetricSeries.run_id.in_(ids), MetricSeries.n > 0))}
    segments: dict[int, set[int]] = {}
    for rid, g in session.execute(sa.select(MetricSeries.run_id, MetricSegment.segment).distinct()
                                  .join(MetricSegment, MetricSegment.series_id == MetricSeries.id)
                                  .where(MetricSeries.run_id.in_(ids))):
        segments.setdefault(rid, set()).add(g)
    derived = derived_val_points(session, [r.id for r in runs if not r.has_metrics_file])
    out = {}
    for rid in ids:
        cands = [MetricPoint(p.step, p.value, p.segment, None) for p in derived.get(rid, [])]
        best = last = None
        if rid in stored:
            mn, mn_step, lv, lstep, lseg = stored[rid]
            if mn is not None:
                best = (mn, mn_step)
            last = (lv, lstep, lseg)
        for p in cands:
            if p.value is not None and (best is None or p.value < best[0]):
                best = (p.value, p.step)
            if last is None or (p.segment, p.step) > (last[2], last[1]):
                last = (p.value, p.step, p.segment)
            segments.setdefault(rid, set()).add(p.segment)
        out[rid] = (*(best or (None, None)), *((last[0], last[1]) if last else (None, None)), len(segments.get(rid, ())))
    return out
