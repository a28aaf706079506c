"""Integrity checks with a memory: verify indexes what it checks, stores results and hashes, and the
next deep check compares against them; the indexed resume planner reuses stored deep results. The
`store` fixture (tests/registry_kit.py) runs each test on SQLite and on PostgreSQL when configured."""

from __future__ import annotations

import pytest
import torch

from registry import verify
from registry.errors import RunNotFoundError, ScanPathError
from tests.modelkit import tiny_tokenizer
from tests.test_resume import save_step


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    for step, val in ((10, 3.0), (20, 2.9)):
        save_step(b / "base_checkpoints" / "d2", step, val, seed=step)
    tiny_tokenizer(300).save(b / "tokenizer")  # the run's tokenizer: verify checks it too
    save_step(b / "chatsft_checkpoints" / "d2", 5, 1.9)
    return b


def test_verify_a_base_dir_needs_no_prior_scan_and_records_results(store, base):
    report = verify.verify(store, str(base))
    assert report.level == "quick" and report.checked == 3 and report.with_problems == 0
    assert sorted(r.run for r in report.results) == ["base/d2", "base/d2", "sft/d2"]
    assert {r.label for r in store.list_runs()} == {"base/d2", "sft/d2"}  # indexed by the verify itself
    for r in report.results:
        (latest,) = store.integrity_history(r.checkpoint_id)
        assert latest.mode == "quick" and latest.ok and latest.duration_s == pytest.approx(r.result.duration_s)
    d = report.to_dict()
    assert d["checked"] == 3 and d["results"][0]["run"] and d["results"][0]["problems"] == []


def test_deep_verify_stores_hashes_and_finds_a_changed_file_next_time(store, base):
    run = base / "base_checkpoints" / "d2"
    first = verify.verify(store, str(run), deep=True)
    assert first.with_problems == 0 and first.bytes_read == sum(p.stat().st_size for p in run.glob("*_0000*"))
    detail = store.checkpoint_detail(f"{run}@20")
    hashes = {f.name: f.sha256 for f in detail.files}
    assert all(len(h) == 64 for h in hashes.values())
    state = torch.load(run / "model_000020.pt", weights_only=True)
    state["lm_head.weight"][0, 0] += 1.0
    torch.save(state, run / "model_000020.pt")
    second = verify.verify(store, "base/d2", deep=True)  # a RUN reference this time
    by_step = {r.result.step: r for r in second.results}
    assert by_step[10].result.ok and [p.code for p in by_step[20].result.problems] == ["changed_since_indexed"]
    history = store.integrity_history(by_step[20].checkpoint_id)
    assert [h.ok for h in history] == [False, True] and history[0].problems[0].code == "changed_since_indexed"
    assert store.checkpoint_detail(f"{run}@20").files[0].sha256 != hashes["model_000020.pt"]  # new reference
    assert verify.verify(store, str(run / "model_000020.pt"), deep=True).with_problems == 0


def test_verify_one_broken_checkpoint_file(store, base):
    run = base / "base_checkpoints" / "d2"
    (run / "optim_000020_rank0.pt").write_bytes(b"")
    report = verify.verify(store, str(run / "meta_000020.json"))
    assert report.checked == 1 and [p.code for p in report.results[0].result.problems] == ["empty_file"]
    assert report.codes == {"empty_file": 1}
    (latest,) = store.integrity_history(report.results[0].checkpoint_id)
    assert not latest.ok and latest.problems[0].blocks == "resume"


def test_indexed_resume_reuses_current_deep_results(store, base, monkeypatch):
    run = base / "base_checkpoints" / "d2"
    verify.verify(store, str(run), deep=True)
    calls = []
    real = verify.integrity.check_checkpoint
    monkeypatch.setattr(verify.integrity, "check_checkpoint", lambda *a, **k: calls.append(a[0].step) or real(*a, **k))
    plan = verify.plan_indexed_resume(store, "base/d2", deep=True)
    assert plan.step == 20 and plan.integrity_level == "deep" and calls == []
    data = bytearray((run / "model_000020.pt").read_bytes())
    data[len(data) // 2] ^= 0x08
    (run / "model_000020.pt").write_bytes(bytes(data))
    plan = verify.plan_indexed_resume(store, str(run), deep=True)
    assert plan.step == 10 and calls == [20]
    assert [p.code for p in plan.skipped[0].problems] == ["crc_mismatch", "changed_since_indexed"]
    cid = next(c.id for c in store.checkpoints("base/d2") if c.step == 20)
    assert store.integrity_history(cid)[0].problems[0].code == "crc_mismatch"


def test_bad_targets(store, tmp_path, base):
    with pytest.raises(RunNotFoundError):
        verify.verify(store, "no-such-run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanPathError, match="no checkpoints under"):
        verify.verify(store, str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanPathError, match="not a checkpoint file"):
        verify.verify(store, str(tmp_path / "notes.txt"))


def test_quick_plan_remembers_a_deep_failure(store, base):
    run = base / "base_checkpoints" / "d2"
    path = run / "model_000020.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    assert verify.plan_indexed_resume(store, str(run)).step == 20  # the quick check alone cannot see it
    assert verify.verify(store, str(run), deep=True).codes == {"crc_mismatch": 1}
    plan = verify.plan_indexed_resume(store, "base/d2")  # quick, but the stored deep result still applies
    assert plan.step == 10 and plan.skipped[0].problems[0].code == "crc_mismatch"


def test_plan_without_recording_writes_nothing(store, base, tmp_path):
    run = base / "base_checkpoints" / "d2"
    verify.verify(store, str(run), deep=True)
    before = store.summary().integrity_results
    plan = verify.plan_indexed_resume(store, "base/d2", record=False)
    assert plan.step == 20 and plan.integrity_level == "deep" and store.summary().integrity_results == before
    save_step(tmp_path / "other" / "base_checkpoints" / "d9", 5, 3.0)  # never indexed
    assert verify.plan_indexed_resume(store, str(tmp_path / "other"), record=False).step == 5
    assert "d9" not in {r.tag for r in store.list_runs()}
