"""The scanner: upstream fixtures, our own runs, incomplete steps, incremental re-scans, vanished files,
single-file checkpoints, and every bad input of issue 5 (clear message, recorded problem, nothing lost)."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil

import pytest
import torch

from nanochat.model_config import GPTConfig, param_counts
from registry import NoCheckpointsError, ScanPathError, scanner
from tests.registry_kit import base_tree, make_checkpoint, tiny_model


def snapshot(store):
    """Everything a user could see, to prove a failed operation lost or changed nothing."""
    runs = store.list_runs(now=0)
    return ([(r.id, r.path, r.best_val_bpb, r.checkpoint_count, r.latest_step) for r in runs],
            [(c.id, c.step, c.complete, c.missing, c.val_bpb) for r in runs for c in store.checkpoints(r.id)],
            [(s.key, len(s.points)) for r in runs for s in store.metric_history(r.id)])


def test_upstream_fixtures_indexed_complete(store, upstream_copy):
    for gen, optim in (("classic", "optim_000300.pt"), ("current", "optim_000300_rank0.pt")):
        base = upstream_copy(gen)
        report = store.scan(base)
        assert report.status == "ok" and report.runs_new == 1 and report.checkpoints_new == 1 and not report.problems
        run = store.resolve_run(str(base / "base_checkpoints" / "d2"))
        meta = json.loads((base / "base_checkpoints" / "d2" / "meta_000300.json").read_text())
        assert (run.phase, run.tag, run.label) == ("base", "d2", "base/d2")
        assert run.model_config == meta["model_config"] and run.user_config == meta["user_config"]
        assert run.num_iterations == 300 and run.depth == 2 and run.generation == gen
        assert run.status == "finished" and run.latest_step == 300 and run.latest_checkpoint_step == 300
        assert run.best_val_bpb == pytest.approx(meta["val_bpb"]) and run.last_val_bpb == pytest.approx(meta["val_bpb"])
        assert run.total_batch_size == 2048
        cfg = GPTConfig(**meta["model_config"]) if gen == "current" else GPTConfig.classic(**meta["model_config"])
        assert run.n_params == param_counts(cfg)["total"]
        [ckpt] = store.checkpoints(run)
        # classic upstream cannot be resumed, however intact (resume says unsupported): one word, one meaning
        assert (ckpt.step, ckpt.layout, ckpt.complete, ckpt.resumable, ckpt.missing) == \
            (300, "upstream", True, gen == "current", False)
        assert ckpt.val_bpb == pytest.approx(meta["val_bpb"]) and ckpt.world_size == 1
        detail = store.checkpoint_detail(f"{run.id}@300")
        assert detail.meta == meta
        assert sorted(f.name for f in detail.files) == sorted(["meta_000300.json", "model_000300.pt", optim])
        assert all(f.size == (base / "base_checkpoints" / "d2" / f.name).stat().st_size and f.sha256 is None for f in detail.files)
        # no metrics.jsonl upstream: the val_bpb history comes from the metas
        [series] = store.metric_history(run, "val_bpb")
        assert [(p.step, p.segment) for p in series.points] == [(300, 1)]
    assert len(store.list_runs()) == 2


def test_base_dir_with_phases_and_metrics(store, tmp_path):
    runs = base_tree(tmp_path / "base")
    report = store.scan(tmp_path / "base")
    assert (report.runs_found, report.checkpoints_new, report.metric_lines) == (2, 3, 21)
    base, sft = store.resolve_run("base/d1"), store.resolve_run("sft/d1")
    assert (base.path, sft.path) == (str(runs["base"]), str(runs["sft"]))
    assert sft.phase == "sft" and sft.user_config["phase_hint"] == "sft"
    assert base.num_iterations == 20 and base.status in ("finished",)
    assert base.best_val_bpb == pytest.approx(2.98) and base.best_val_bpb_step == 20  # from metrics.jsonl
    assert base.has_metrics_file and not sft.has_metrics_file
    assert {k.key for k in store.metric_keys(base)} == {"train_loss", "lrm", "tok_per_sec", "dt_ms", "val_bpb"}
    assert [p.value for p in store.metric_history(sft, "val_bpb")[0].points] == [1.9]


def test_incomplete_steps_are_recorded_as_problems(store, tmp_path):
    run = tmp_path / "base_checkpoints" / "d1"
    for step in (10, 20, 30, 40):
        make_checkpoint(run, step)
    (run / "meta_000020.json").unlink()  # crash before the meta was written
    model = run / "model_000030.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated: no zip central directory
    meta = json.loads((run / "meta_000040.json").read_text())
    (run / "meta_000040.json").write_text(json.dumps({**meta, "world_size": 2}))  # rank 1's shard never written
    report = store.scan(tmp_path)
    by_step = {c.step: c for c in store.checkpoints("d1")}
    assert (by_step[10].complete, by_step[10].resumable) == (True, True)
    assert [p.code for p in by_step[20].problems] == ["missing_meta"] and not by_step[20].complete
    assert "truncated" in [p.code for p in by_step[30].problems] and not by_step[30].complete
    assert [p.code for p in by_step[40].problems] == ["missing_optimizer_shard"]
    assert by_step[40].complete and not by_step[40].resumable and by_step[40].world_size == 2
    assert {p.code for p in report.problems} == {"missing_meta", "truncated", "missing_optimizer_shard"}
    assert store.resolve_run("d1").latest_checkpoint_step == 40


def test_rescan_of_unchanged_tree_opens_no_file(store, tmp_path, monkeypatch):
    runs = base_tree(tmp_path / "base")
    (runs["sft"].parent.parent / "single").mkdir()
    torch.save({"model": tiny_model().state_dict(), "metadata": {"step": 7, "model_config": {}}},
               runs["sft"].parent.parent / "single" / "checkpoint.pt")
    first = store.scan(tmp_path / "base")
    inspected, opened = [], []
    real_inspect, real_open, real_os_open = scanner.inspect_checkpoint, io.open, os.open

    def counting_inspect(slot, directory):
        inspected.append((directory, slot.step))
        return real_inspect(slot, directory)

    def recording_open(file, *a, **kw):
        if str(file).startswith(str(tmp_path / "base")):
            opened.append(str(file))
        return real_open(file, *a, **kw)

    def recording_os_open(file, flags, *a, **kw):  # the archive reader's; a folder opened to stat its files is fine
        if str(file).startswith(str(tmp_path / "base")) and not flags & getattr(os, "O_DIRECTORY", 0):
            opened.append(str(file))
        return real_os_open(file, flags, *a, **kw)

    monkeypatch.setattr(scanner, "inspect_checkpoint", counting_inspect)
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(os, "open", recording_os_open)
    again = store.scan(tmp_path / "base")
    monkeypatch.undo()
    assert inspected == [] and opened == []
    assert again.checkpoints_unchanged == again.checkpoints_seen == first.checkpoints_seen == 4
    assert again.checkpoints_new == again.checkpoints_changed == again.metric_lines == 0
    assert again.files_stat == first.files_stat

    # A new step and a rewritten meta are the only things read next time.
    monkeypatch.setattr(scanner, "inspect_checkpoint", counting_inspect)
    make_checkpoint(runs["base"], 30, val_bpb=2.0, num_iterations=40)
    meta = json.loads((runs["base"] / "meta_000010.json").read_text())
    (runs["base"] / "meta_000010.json").write_text(json.dumps({**meta, "val_bpb": 2.4}))
    third = store.scan(tmp_path / "base")
    assert sorted(s for _, s in inspected) == [10, 30]
    assert (third.checkpoints_new, third.checkpoints_changed, third.checkpoints_unchanged) == (1, 1, 3)
    assert {c.step: c.val_bpb for c in store.checkpoints("base/d1")} == {10: 2.4, 20: 2.2, 30: 2.0}
    assert store.resolve_run("base/d1").num_iterations == 40  # the run's config follows its newest checkpoint


def test_vanished_files_marked_missing_history_kept(store, tmp_path):
    runs = base_tree(tmp_path / "base")
    store.scan(tmp_path / "base")
    for name in ("model_000010.pt", "meta_000010.json", "optim_000010_rank0.pt"):
        (runs["base"] / name).unlink()
    (runs["base"] / "optim_000020_rank0.pt").unlink()
    report = store.scan(tmp_path / "base")
    assert report.checkpoints_missing == 1
    by_step = {c.step: c for c in store.checkpoints("base/d1")}
    assert by_step[10].missing and not by_step[20].missing and not by_step[20].resumable
    files = {f.name: f.missing for f in store.checkpoint_detail("base/d1@20").files}
    assert files == {"meta_000020.json": False, "model_000020.pt": False, "optim_000020_rank0.pt": True}
    assert [c.step for c in store.checkpoints("base/d1", include_missing=False)] == [20]
    assert len(store.metric_history("base/d1", "train_loss")[0].points) == 21

    shutil.rmtree(runs["sft"])
    report = store.scan(tmp_path / "base")
    assert report.runs_missing == 1
    sft = store.resolve_run("sft/d1")
    assert store.resolve_run(str(runs["sft"])) == sft  # a vanished run is still found by its path
    assert sft.missing and sft.status == "missing" and sft.missing_checkpoint_count == 1
    assert [p.value for p in store.metric_history(sft, "val_bpb")[0].points] == [1.9]
    # files come back: the checkpoint is present again
    make_checkpoint(runs["sft"], 5, val_bpb=1.9)
    store.scan(tmp_path / "base")
    assert not store.resolve_run("sft/d1").missing and not store.checkpoints("sft/d1")[0].missing


def test_single_file_checkpoint_layout(store, tmp_path):
    run = tmp_path / "guide_run"
    run.mkdir()
    meta = {"step": 100, "val_bpb": 2.5, "model_config": tiny_model().config.upstream_dict(), "user_config": {"depth": 1}}
    torch.save({"model": tiny_model().state_dict(), "metadata": meta, "optimizers": [{"state": {}}]}, run / "checkpoint.pt")
    store.scan(run)
    [c] = store.checkpoints(str(run))
    assert (c.step, c.layout, c.complete, c.val_bpb) == (100, "single_file", True, 2.5)
    r = store.resolve_run(str(run))
    assert r.generation == "current" and r.n_params == param_counts(tiny_model().config)["total"]
    # the guide's tool overwrites checkpoint.pt: the older step stays in the history, as missing
    torch.save({"model": tiny_model().state_dict(), "metadata": {**meta, "step": 200, "val_bpb": 2.1}}, run / "checkpoint.pt")
    store.scan(run)
    assert [(c.step, c.missing) for c in store.checkpoints(str(run))] == [(100, True), (200, False)]
    assert store.resolve_checkpoint(str(run / "checkpoint.pt")).step == 200


def test_progress_callback_and_file_path(store, tmp_path, monkeypatch):
    runs = base_tree(tmp_path / "base")
    calls = []
    monkeypatch.setattr(scanner, "PROGRESS_EVERY_S", 0.0)
    store.scan(tmp_path / "base", progress=lambda done, total, msg: calls.append((done, total, msg)))
    assert [(d, t) for d, t, _ in calls] == [(0, 3), (1, 3), (2, 3), (3, 3), (3, 3)]  # one per checkpoint
    assert calls[1][2] == "base/d1: step 10" and calls[-1][2] == "done"
    calls.clear()
    store.scan(tmp_path / "base", progress=lambda done, total, msg: calls.append((done, total, msg)))
    assert [(d, t) for d, t, _ in calls] == [(3, 3), (3, 3)]  # nothing to inspect: done at once
    report = store.scan(runs["base"] / "model_000010.pt")  # a checkpoint file: its folder is scanned
    assert report.root == str(runs["base"]) and report.runs_found == 1


# ---------------------------------------------------------------------- bad input


def test_nonexistent_and_unreadable_paths(store, tmp_path, monkeypatch):
    base_tree(tmp_path / "base")
    store.scan(tmp_path / "base")
    before = snapshot(store)
    with pytest.raises(ScanPathError, match="does not exist"):
        store.scan(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanPathError, match="is a file, not a folder"):
        store.scan(tmp_path / "notes.txt")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root reads anything: make the OS refusal happen where the scanner lists folders
        real_scandir = os.scandir

        def refusing_scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(scanner.os, "scandir", refusing_scandir)
    else:
        locked.chmod(0)
    with pytest.raises(ScanPathError, match="cannot read .*locked.*Permission denied"):
        store.scan(locked)
    monkeypatch.undo()
    locked.chmod(0o755)
    assert snapshot(store) == before
    assert len(store.scans()) == 1  # failed scans wrote nothing, not even a scan row


def test_unreadable_subfolder_is_a_problem_not_a_failure(store, tmp_path, monkeypatch):
    runs = base_tree(tmp_path / "base")
    real_scandir = os.scandir
    blocked = runs["sft"].parent

    def refusing_scandir(path="."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(scanner.os, "scandir", refusing_scandir)
    report = store.scan(tmp_path / "base")
    assert report.runs_found == 1 and [p.code for p in report.problems] == ["unreadable"]
    assert str(blocked) in report.problems[0].message


def test_folder_without_checkpoints(store, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no checkpoints here")
    with pytest.raises(NoCheckpointsError, match="no checkpoints under .*empty"):
        store.scan(tmp_path / "empty")
    assert store.list_runs() == [] and store.scans() == []


def test_garbage_meta_and_step_mismatch(store, tmp_path):
    run = tmp_path / "base_checkpoints" / "d1"
    for step in (10, 20, 30):
        make_checkpoint(run, step)
    store.scan(tmp_path)
    before = {c.step: c for c in store.checkpoints("d1")}
    (run / "meta_000020.json").write_text('{"step": 20, "val_bpb": 2.')  # cut-off JSON
    meta = json.loads((run / "meta_000030.json").read_text())
    (run / "meta_000030.json").write_text(json.dumps({**meta, "step": 31}))
    report = store.scan(tmp_path)
    codes = {p.code: p.message for p in report.problems}
    assert "bad_meta_json" in codes and "meta_000020.json is not valid JSON" in codes["bad_meta_json"]
    assert "meta says step 31 but its file name says step 30" in codes["step_mismatch"]
    after = {c.step: c for c in store.checkpoints("d1")}
    assert [p.code for p in after[20].problems] == ["bad_meta_json"] and not after[20].complete
    assert [p.code for p in after[30].problems] == ["step_mismatch"] and not after[30].complete
    assert after[10] == before[10]  # untouched
    assert store.checkpoint_detail("d1@20").meta is None
    # the problems are stored with the scan, so they survive the process
    assert {p.code for p in store.scan_report(report.scan_id).problems} == {"bad_meta_json", "step_mismatch"}
    # the run keeps its config from the last good checkpoint
    assert store.resolve_run("d1").model_config == tiny_model().config.upstream_dict()


def test_in_place_changes_are_seen_although_the_folder_is_unchanged(store, tmp_path):
    """Upstream writes files in place: the folder's mtime stays, each file's size or mtime tells."""
    run = tmp_path / "base_checkpoints" / "d1"
    for step in (10, 20):
        make_checkpoint(run, step)
    store.scan(tmp_path)
    folder_mtime = run.stat().st_mtime_ns
    model = run / "model_000020.pt"
    with open(model, "r+b") as f:  # cut short in place (a copy interrupted, a disk full)
        f.truncate(100)
    report = store.scan(tmp_path)
    assert run.stat().st_mtime_ns == folder_mtime and report.checkpoints_changed == 1
    assert [p.code for p in store.checkpoints("d1")[1].problems] == ["truncated"]
    meta = run / "meta_000010.json"
    text = meta.read_text()
    meta.write_text(text.replace('"val_bpb": 3.0', '"val_bpb": 2.9'))  # same length, new content and mtime
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    report = store.scan(tmp_path)
    assert report.checkpoints_changed == 1 and store.checkpoints("d1")[0].val_bpb == 2.9
    assert store.scan(tmp_path).checkpoints_unchanged == 2


def test_rewritten_upstream_meta_changes_its_val_bpb_history(store, upstream_copy):
    base = upstream_copy("current")
    store.scan(base)
    meta_path = base / "base_checkpoints" / "d2" / "meta_000300.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "val_bpb": 1.5}))
    store.scan(base)
    [series] = store.metric_history("d2", "val_bpb")
    assert [(p.step, p.value) for p in series.points] == [(300, 1.5)]  # no stale point from the first scan
    assert store.resolve_run("d2").best_val_bpb == 1.5
    meta_path.write_text(json.dumps({**meta, "step": 301}))  # now the meta contradicts its file name
    store.scan(base)
    assert store.metric_history("d2") == [] and store.resolve_run("d2").best_val_bpb is None


def test_interrupted_scan_keeps_whole_batches_only(store, tmp_path, monkeypatch):
    """Ctrl-C in the middle: the batches written are whole, the scan is marked interrupted, the next scan finishes."""
    run = tmp_path / "base_checkpoints" / "d1"
    for step in range(10, 80, 10):
        make_checkpoint(run, step)
    monkeypatch.setattr(scanner, "BATCH", 2)
    real, calls = scanner.inspect_checkpoint, []

    def interrupted(slot, directory):
        calls.append(slot.step)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(slot, directory)

    monkeypatch.setattr(scanner, "inspect_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.scan(tmp_path)
    monkeypatch.setattr(scanner, "inspect_checkpoint", real)
    [failed] = store.scans()
    assert failed.status == "interrupted" and failed.error.startswith("interrupted (Ctrl-C)")
    assert [c.step for c in store.checkpoints("d1")] == [10, 20, 30, 40]  # two whole batches, nothing of the third
    assert all(len(store.checkpoint_detail(c.id).files) == 3 for c in store.checkpoints("d1"))
    report = store.scan(tmp_path)
    assert (report.checkpoints_new, report.checkpoints_unchanged, report.status) == (3, 4, "ok")


def test_report_is_what_the_registry_stored(store, tmp_path, monkeypatch):
    """scan_path builds its report from what it wrote; store.scan_report reads it back: the same."""
    runs = base_tree(tmp_path / "base")
    (runs["base"] / "meta_000010.json").write_text("{oops")
    real_scandir = os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) == str(runs["sft"]):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(scanner.os, "scandir", refusing_scandir)
    report = store.scan(tmp_path / "base")
    monkeypatch.undo()
    assert {p.code for p in report.problems} == {"bad_meta_json", "unreadable"}
    assert report == store.scan_report(report.scan_id)
    again = store.scan(tmp_path / "base")
    assert again.checkpoints_new == 1 and again == store.scan_report(again.scan_id)  # the folder readable now


def test_runs_under_a_root_are_matched_by_exact_prefix(store, tmp_path):
    """Scanning /x/a never touches runs of /x/A or /x/ab (SQLite's LIKE ignores case)."""
    x = tmp_path / "x"
    for name in ("a", "A", "ab"):
        make_checkpoint(x / name / "base_checkpoints" / "d1", 10)
    if (x / "A").samefile(x / "a"):
        pytest.skip("a case-insensitive file system has one folder for a and A")
    store.scan(x / "A")
    store.scan(x / "ab")
    before = {r.path: r for r in store.list_runs(now=0)}
    report = store.scan(x / "a")
    assert (report.runs_found, report.runs_new) == (1, 1)
    after = {r.path: r for r in store.list_runs(now=0)}
    assert len(after) == 3 and all(after[p] == r for p, r in before.items())  # not re-indexed under x/a
    shutil.rmtree(x / "a" / "base_checkpoints")
    assert store.scan(x / "a").runs_missing == 1
    assert [r.path for r in store.list_runs(now=0) if r.missing] == [str(x / "a" / "base_checkpoints" / "d1")]


def test_a_failed_batch_leaves_the_plans_as_they_were(store, tmp_path):
    """A batch transaction can be retried (PostgreSQL deadlocks): writing it changes no plan, only the database."""
    from registry import writer

    base_tree(tmp_path / "base")
    c = scanner._Counts()
    plans = scanner._plan_runs(scanner.walk_runs(tmp_path / "base", c.problem), {}, c)
    views = {path: p.for_writer() for path, p in plans.items()}
    items = [(views[path], scanner.inspect_checkpoint(slot, p.path)) for path, p in plans.items() for slot in p.changed()]
    root_id, scan_id = store.db.write(lambda s: writer.start_scan(s, store.db, str(tmp_path / "base"), 1.0,
                                                                           "a test", lambda owner: None))

    def fails_after_writing(s):
        writer.write_batch(s, store.db, list(views.values()), items, root_id, scan_id, 2.0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.db.write(fails_after_writing)
    assert all(p.run_id is None and not p.written for p in plans.values())
    assert store.list_runs() == []
    result = store.db.write(lambda s: writer.write_batch(s, store.db, list(views.values()), items, root_id, scan_id, 2.0))
    assert (len(items), sorted(result.run_ids)) == (3, sorted(plans))
    assert all(p.run_id is None for p in plans.values())  # the scanner applies the result after the commit


def test_stat_phase_keeps_no_object_the_garbage_collector_counts(tmp_path):
    """A re-scan of a big unchanged tree costs its stats: keeping a stat result per file counted as a GC
    allocation each, so a re-scan of 30,000 files ran dozens of collections (a full one is ~50 ms beside torch)."""
    import gc

    run = tmp_path / "base_checkpoints" / "d1"
    run.mkdir(parents=True)
    for i in range(3000):
        (run / f"optim_{i:06d}_rank0.pt").write_bytes(b"x")
    entries = list(os.scandir(run))
    enabled = gc.isenabled()
    gc.disable()
    try:
        before = gc.get_count()[0]
        names, flat, fingerprint = scanner.stat_run_dir(run, entries)
        grew = gc.get_count()[0] - before
    finally:
        if enabled:
            gc.enable()
    assert len(names) == 3000 and len(flat) == 9000 and grew < 100
    assert scanner.stat_run_dir(run)[2] == fingerprint  # same folder, same fingerprint
    os.utime(run / names[0], ns=(0, 1))
    assert scanner.stat_run_dir(run)[2] != fingerprint
