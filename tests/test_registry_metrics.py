"""Metric history: metrics.jsonl ingested exactly once by byte offset (torn last line, malformed lines,
rewritten files), resume segments, and server-side downsampling that keeps minima and maxima."""

from __future__ import annotations

import json
import math
import random

import pytest
import sqlalchemy as sa

from registry import metrics
from registry.entities import MetricPoint as MetricPoint_
from registry.models import MetricPoint, MetricRollup, MetricSource
from tests.registry_kit import append_metrics, make_checkpoint, metrics_line, train_lines


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "base_checkpoints" / "d1"
    make_checkpoint(d, 10, num_iterations=1000)
    return d


def stored(store, run, key):
    return {(p.step, p.segment): p.value for p in store.metric_history(run, key, max_points=10**9)[0].points}


def point_rows(store) -> int:
    with store.db.session() as s:
        return s.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar()


def test_torn_last_line_waits_for_its_end(store, run_dir):
    lines = train_lines(range(5))
    last = metrics_line(5, train_loss=1.25, lrm=0.5)
    path = append_metrics(run_dir, lines + [last[:17]])  # the trainer is mid-write
    report = store.scan(run_dir)
    assert (report.metric_lines, report.metric_bad_lines, report.problems) == (5, 0, ())
    with store.db.session() as s:
        src = s.execute(sa.select(MetricSource)).scalar_one()
        assert src.offset == len("".join(lines).encode()) < path.stat().st_size
    assert sorted(stored(store, "d1", "train_loss")) == [(s, 1) for s in range(5)]
    assert store.scan(run_dir).metric_lines == 0  # unchanged file: nothing read, offset stays
    append_metrics(run_dir, last[17:] + "".join(train_lines(range(6, 8))))
    report = store.scan(run_dir)
    assert (report.metric_lines, report.metric_bad_lines) == (3, 0)
    assert stored(store, "d1", "train_loss")[(5, 1)] == 1.25
    assert len(stored(store, "d1", "train_loss")) == 8 and point_rows(store) == 5 * 4 + 2 + 2 * 4


def test_every_line_once_across_rescans_and_reingest(store, run_dir):
    append_metrics(run_dir, train_lines(range(50), eval_every=10))
    store.scan(run_dir)
    rows = point_rows(store)
    assert rows == 50 * 4 + 5
    # ingesting the same points again (as a second scanner racing would) adds nothing
    run_id = store.resolve_run("d1").id
    with store.db.session(write=True) as s:
        store.db.lock_run(s, run_id)
        new, existing = metrics.ingest_points(s, store.db, run_id, [("train_loss", 3, 1, 9.9, None), ("train_loss", 99, 1, 1.0, None)])
    assert (new, existing) == (1, 1)
    assert stored(store, "d1", "train_loss")[(3, 1)] == pytest.approx(5.0 - 3 / 100)  # the first value stays
    assert point_rows(store) == rows + 1
    keys = {k.key: k for k in store.metric_keys("d1")}
    assert keys["train_loss"].count == 51 and keys["train_loss"].last_step == 99
    assert keys["val_bpb"].count == 5 and keys["val_bpb"].min_value == pytest.approx(3.0 - 40 / 1000)


def test_malformed_lines_counted_and_skipped(store, run_dir):
    append_metrics(run_dir, [metrics_line(0, train_loss=5.0), "not json at all\n", '{"segment": 1, "train_loss": 2}\n',
                             '{"step": "ten", "loss": 1}\n', "[1, 2]\n", metrics_line(1, train_loss=4.0, note="text is ignored"),
                             '{"step": 2, "segment": 1, "train_loss": NaN, "flag": true}\n'])
    report = store.scan(run_dir)
    assert (report.metric_lines, report.metric_bad_lines) == (3, 4)
    msgs = [p.message for p in report.problems if p.code == "bad_metrics_line"]
    assert msgs[0] == "metrics.jsonl line 2: not valid JSON (Expecting value)"
    assert "line 3: no step" in msgs[1] and "line 4: step must be an integer" in msgs[2] and "line 5: not a JSON object" in msgs[3]
    assert stored(store, "d1", "train_loss") == {(0, 1): 5.0, (1, 1): 4.0, (2, 1): None}  # NaN kept as None
    assert {k.key for k in store.metric_keys("d1")} == {"train_loss"}  # strings and flags are not series
    info = {k.key: k for k in store.metric_keys("d1")}["train_loss"]
    assert (info.min_value, info.max_value, info.count) == (4.0, 5.0, 3)


def test_rewritten_metrics_file_is_read_again_without_duplicates(store, run_dir):
    path = append_metrics(run_dir, train_lines(range(10)))
    store.scan(run_dir)
    path.write_text("".join(train_lines(range(4))))  # replaced by a shorter file (a fresh run in the same folder)
    report = store.scan(run_dir)
    assert [p.code for p in report.problems] == ["metrics_rewritten"]
    assert len(stored(store, "d1", "train_loss")) == 10 and point_rows(store) == 40
    append_metrics(run_dir, train_lines(range(4, 12)))
    store.scan(run_dir)
    assert len(stored(store, "d1", "train_loss")) == 12


def test_resume_segments(store, run_dir):
    """Segment 1 trains to step 60 and crashes; segment 2 resumes from step 40 and goes on to 100."""
    append_metrics(run_dir, train_lines(range(0, 61), segment=1, eval_every=20))
    append_metrics(run_dir, train_lines(range(41, 101), segment=2, eval_every=20))
    make_checkpoint(run_dir, 100, val_bpb=2.5, segment=2, num_iterations=100)
    store.scan(run_dir)
    run = store.resolve_run("d1")
    assert run.segments == 2 and run.latest_step == 100 and run.status in ("finished",)
    assert run.last_val_bpb_step == 100 and run.last_val_bpb == pytest.approx(2.9)
    [loss] = store.metric_history(run, "train_loss")
    assert loss.segments == (1, 2) and loss.total_points == 61 + 60 and not loss.downsampled
    assert [(p.segment, p.step) for p in loss.points] == [(1, s) for s in range(61)] + [(2, s) for s in range(41, 101)]
    overlap = {(p.segment, p.step): p.value for p in loss.points if 41 <= p.step <= 60}
    assert len(overlap) == 40  # both launches' points at the same steps are kept
    assert {k.key: k.segments for k in store.metric_keys(run)}["train_loss"] == (1, 2)
    assert {c.step: c.segment for c in store.checkpoints(run)} == {10: 1, 100: 2}
    # downsampled, each segment keeps its own extremes and the total stays within the budget
    [small] = store.metric_history(run, "train_loss", max_points=20)
    assert small.downsampled and len(small.points) <= 20 and {p.segment for p in small.points} == {1, 2}


def _ingest(store, run, key, values: dict[tuple[int, int], float | None], chunk: int = 50_000):
    run_id = store.resolve_run(run).id
    items = sorted(values.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    for i in range(0, len(items), chunk):
        with store.db.session(write=True) as s:
            store.db.lock_run(s, run_id)
            metrics.ingest_points(s, store.db, run_id, [(key, st, g, v, 1e9 + st) for (st, g), v in items[i:i + chunk]])


def test_downsampling_keeps_minima_and_maxima(store, run_dir):
    rng = random.Random(0)
    values = {(s, 1): 3.0 + 0.1 * math.sin(s / 50) + rng.uniform(-0.01, 0.01) for s in range(20_000)}
    values[(12_345, 1)] = 50.0  # a loss spike
    values[(777, 1)] = -1.0  # and a dip
    store.scan(run_dir)
    _ingest(store, "d1", "train_loss", values, chunk=7_000)  # arrives in several chunks, like a live run
    for n in (2000, 301, 50, 10):
        [series] = store.metric_history("d1", "train_loss", max_points=n)
        pts = series.points
        assert series.downsampled and series.total_points == 20_000 and 0 < len(pts) <= n
        assert [p.step for p in pts] == sorted({p.step for p in pts})
        assert all(p.value == values[(p.step, 1)] and p.wall_time == 1e9 + p.step for p in pts)  # real points only
        steps = {p.step for p in pts}
        assert {12_345, 777, 0, 19_999} <= steps, n  # extremes and both ends survive
        if n >= 50:
            assert len(pts) >= n // 4  # and the budget is used, not wasted
    # within each block the min and max are those of the raw data: compare against a direct computation
    [series] = store.metric_history("d1", "train_loss", max_points=2000)
    level = next(lv for lv in metrics.LEVELS if (19_999 >> lv) + 1 <= (2000 - 2) // 2)
    blocks: dict[int, list[float]] = {}
    for (s, _), v in values.items():
        blocks.setdefault(s >> level, []).append(v)
    got: dict[int, list[float]] = {}
    for p in series.points:
        got.setdefault(p.step >> level, []).append(p.value)
    for b, vs in blocks.items():
        assert min(vs) in got[b] and max(vs) in got[b]


def test_history_step_range_and_small_series_raw(store, run_dir):
    store.scan(run_dir)
    _ingest(store, "d1", "train_loss", {(s, 1): float(s % 97) for s in range(10_000)})
    [part] = store.metric_history("d1", "train_loss", max_points=1000, step_min=2000, step_max=2499)
    assert [p.step for p in part.points] == list(range(2000, 2500)) and not part.downsampled  # 500 <= 1000: raw
    [part] = store.metric_history("d1", "train_loss", max_points=100, step_min=2000, step_max=5999)
    assert part.downsampled and len(part.points) <= 100 and all(2000 <= p.step <= 5999 for p in part.points)
    assert max(p.value for p in part.points) == 96.0 and min(p.value for p in part.points) == 0.0
    with pytest.raises(Exception, match="has no metric 'nope'.*train_loss"):
        store.metric_history("d1", ["nope"])


def test_nan_only_blocks_and_all_null_summary(store, run_dir):
    store.scan(run_dir)
    _ingest(store, "d1", "grad_norm", {(s, 1): (None if s < 5000 else float(s)) for s in range(10_000)})
    [series] = store.metric_history("d1", "grad_norm", max_points=100)
    assert len(series.points) <= 100 and min(p.step for p in series.points if p.value is not None) == 5000
    info = {k.key: k for k in store.metric_keys("d1")}["grad_norm"]
    assert (info.min_value, info.min_step, info.max_value, info.count) == (5000.0, 5000, 9999.0, 10_000)


def test_parse_metrics_line_contract():
    pts = metrics.parse_metrics_line(json.dumps({"step": 7, "segment": 2, "wall_time": 12.5, "train_loss": 1, "lrm": 0.5,
                                                 "tag": "x", "ok": True, "vec": [1, 2]}))
    assert sorted(pts) == [("lrm", 7, 2, 0.5, 12.5), ("train_loss", 7, 2, 1.0, 12.5)]
    assert metrics.parse_metrics_line('{"step": 3, "val_bpb": 2.0}') == [("val_bpb", 3, 1, 2.0, None)]
    for bad, why in (('{"step": -1}', r"step -1 is out of range \(0 to"), ('{"step": 1, "segment": 0}', r"segment 0 .*\(1 to"),
                     (f'{{"step": {2 ** 70}}}', "out of range"), ('{"step": 1e400}', "integer, got inf"),
                     (f'{{"step": 1, "segment": {2 ** 70}}}', "out of range"), ("[" * 100 + "]" * 100, "nested deeper"),
                     ('{"step": 1.5}', "integer"), ('{"step": true}', "integer"), ("{", "not valid JSON")):
        with pytest.raises(ValueError, match=why):
            metrics.parse_metrics_line(bad)


def test_rollups_give_what_raw_bucketing_gives(store, run_dir):
    """A segment crossing ROLLUP_MIN in small chunks gets rollups equal to bucketing its raw rows."""
    from registry import history

    store.scan(run_dir)
    rng = random.Random(1)
    values = {(s, 1): rng.uniform(0, 10) for s in range(0, 3 * metrics.ROLLUP_MIN, 3)}  # steps every 3
    items = sorted(values.items())
    run_id = store.resolve_run("d1").id
    for i in range(0, len(items), 700):  # crosses the threshold in the middle of a chunk
        with store.db.session(write=True) as s:
            store.db.lock_run(s, run_id)
            metrics.ingest_points(s, store.db, run_id, [("x", st, g, v, None) for (st, g), v in items[i:i + 700]])
    raw = [MetricPoint_(st, v, 1, None) for (st, _), v in items]
    for n in (1000, 300, 40):
        [series] = store.metric_history("d1", "x", max_points=n)
        assert series.total_points == len(values) and series.downsampled
        expected = history._bucket(raw, n, raw[0].step, raw[-1].step)  # the same blocks, levels from 4 up
        if n <= 300:  # both choose the same level here, so the same points
            assert [(p.step, p.value) for p in series.points] == [(p.step, p.value) for p in expected], n
        assert len(series.points) <= n
    with store.db.session() as s:
        stored = s.execute(sa.select(sa.func.sum(MetricRollup.n)).where(MetricRollup.level == 4)).scalar()
    assert stored == len(values)  # every point counted once in the rollups
