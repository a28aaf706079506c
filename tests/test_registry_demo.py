"""Issue 5's acceptance on the demo data: scanning the demo base dir (built by scripts/demo.py, the
same builder the app's demo uses) indexes its runs, including the resumed run's two segments."""

from __future__ import annotations

import shutil

import pytest

from registry import open_store
from scripts.demo import PROFILES

SPECS = {spec.tag: spec for spec in PROFILES["test"].runs}
SFT = PROFILES["test"].sft


@pytest.fixture
def demo_copy(demo_base, tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(demo_base, dst, ignore=shutil.ignore_patterns("registry.sqlite*"))
    return dst


def test_scan_demo_indexes_runs_and_resume_segments(store, demo_copy):
    report = store.scan(demo_copy)
    assert report.status == "ok" and report.runs_found == 4 and report.metric_bad_lines == 0, report.problems
    found = store.list_runs()
    assert {(r.phase, r.tag) for r in found} == {("base", "d1"), ("base", "d2"), ("base", "d2-crash"), ("sft", SFT.tag)}
    sft = next(r for r in found if r.phase == "sft")  # the demo's chat model, from the final base run
    assert sft.status == "finished" and sft.latest_checkpoint_step == SFT.steps and sft.best_val_bpb is not None
    assert all(c.complete and c.resumable and not c.problems for c in store.checkpoints(sft.id))
    runs = {r.tag: r for r in found if r.phase == "base"}
    for r in runs.values():
        spec = SPECS[r.tag]
        assert r.phase == "base" and r.has_metrics_file and r.num_iterations == spec.steps
        assert r.latest_checkpoint_step == spec.final_step and r.latest_step >= spec.final_step
        assert r.status == ("stopped" if spec.left_killed else "finished")
        assert r.best_val_bpb is not None and r.checkpoint_count >= 3
        assert all(c.complete and c.resumable and not c.problems for c in store.checkpoints(r.id))
    crashed = runs["d2-crash"]
    assert crashed.segments == 2 and runs["d2"].segments == 1
    [loss] = store.metric_history(crashed.id, "train_loss", max_points=10_000)
    assert loss.segments == (1, 2)
    first = [p.step for p in loss.points if p.segment == 1]
    second = [p.step for p in loss.points if p.segment == 2]
    assert first and second and max(second) >= 11 and min(second) <= max(first) + 1  # resumed from its last checkpoint
    assert {c.segment for c in store.checkpoints(crashed.id)} == {1, 2}
    assert store.scan(demo_copy).checkpoints_unchanged == report.checkpoints_seen


def test_demo_registry_is_a_current_registry(demo_base):
    with open_store(demo_base / "registry.sqlite", create=False) as s:
        assert {(r.phase, r.tag) for r in s.list_runs()} == {("base", "d1"), ("base", "d2"), ("base", "d2-crash"),
                                                              ("sft", SFT.tag)}
        assert s.resolve_run("d2-crash").segments == 2
