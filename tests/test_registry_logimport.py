"""import-log: upstream console logs (current and classic formats) into a run's metrics."""

from __future__ import annotations

import pytest

from registry.errors import AmbiguousRunError, LogImportError, RunNotFoundError
from registry.logimport import parse_log_line
from tests.registry_kit import make_checkpoint

CURRENT_LOG = """\
Vocab size: 2,048
step 00000/00300 (0.00%) | loss: 7.624457 | lrm: 0.03 | dt: 48.55ms | tok/sec: 42,186 | bf16_mfu: 0.01 | epoch: 1 | total time: 0.00m
Step 00000 | Validation bpb: 3.312345
step 00001/00300 (0.33%) | loss: 7.512000 | lrm: 0.05 | dt: 47.10ms | tok/sec: 43,500 | mfu: 0.02 | epoch: 1 | total time: 0.01m | eta: 0.2m
[rank0]: step 00002/00300 (0.67%) | loss: 7.401000 | lrm: 0.08 | dt: 46.00ms | tok/sec: 44,100 | mfu: 0.02 | epoch: 1 | total time: 0.01m
step 00003/00300 (1.00%) | loss: 7.30 | lrm: oops | dt: 46.00ms | tok/sec: 44,100
Step 00050 | Validation bpb: 2.472756
step 00004/003
Peak memory usage: 120.5MiB
"""

CLASSIC_LOG = """\
step 00010/00020 (50.00%) | loss: 6.000000 | grad norm: 0.8389 | lrm: 1.00 | dt: 120.00ms | tok/sec: 17,066 | mfu: 0.10 | total time: 0.02m
Step 00010 | Validation bpb: 2.9000
step 00020/00020 (100.00%) | loss: 5.500000 | grad norm: 0.5000 | lrm: 0.00 | dt: 118.00ms | tok/sec: 17,300 | mfu: 0.11 | total time: 0.04m
"""


def test_parse_current_and_classic_lines():
    kind, pts, ignored = parse_log_line(CURRENT_LOG.splitlines()[3])
    assert kind == "train" and ignored == ["epoch", "total time", "eta"]
    assert sorted(pts) == [("dt_ms", 1, 1, 47.1, None), ("lrm", 1, 1, 0.05, None), ("mfu", 1, 1, 0.02, None),
                           ("tok_per_sec", 1, 1, 43500.0, None), ("train_loss_ema", 1, 1, 7.512, None)]
    kind, pts, _ = parse_log_line(CLASSIC_LOG.splitlines()[0], segment=3)
    assert ("grad_norm", 10, 3, 0.8389, None) in pts and ("tok_per_sec", 10, 3, 17066.0, None) in pts
    assert parse_log_line("Step 00050 | Validation bpb: 2.472756") == ("eval", [("val_bpb", 50, 1, 2.472756, None)], [])
    assert parse_log_line("Vocab size: 2,048") == ("other", [], [])
    for bad in ("step 00004/003", "step 00003/00300 (1.00%) | loss: 7.30 | lrm: oops", "Step 00050 | Validation bpb: ?"):
        with pytest.raises(ValueError):
            parse_log_line(bad)


def test_import_log_into_a_run(store, tmp_path):
    run = tmp_path / "base_checkpoints" / "d2"
    make_checkpoint(run, 300, val_bpb=2.2, num_iterations=300)
    store.scan(tmp_path)
    log = tmp_path / "train.log"
    log.write_text(CURRENT_LOG)
    r = store.import_log(log, "d2")
    assert (r.lines, r.train_lines, r.eval_lines, r.malformed) == (9, 3, 2, 2)
    assert [n for n, _ in r.malformed_examples] == [6, 8] and "lrm: oops" in r.malformed_examples[0][1]
    assert "bf16_mfu" not in r.ignored_fields and "epoch" in r.ignored_fields  # bf16_mfu is current upstream's mfu
    assert r.points_new == 5 + 5 + 5 + 2 and r.points_existing == 0
    assert [p.value for p in store.metric_history("d2", "mfu")[0].points] == [0.01, 0.02, 0.02]
    assert "train_loss" not in {k.key for k in store.metric_keys("d2")}  # upstream's loss is a debiased EMA
    loss = store.metric_history("d2", "train_loss_ema")[0]
    assert [(p.step, p.value, p.wall_time) for p in loss.points] == [(0, 7.624457, None), (1, 7.512, None), (2, 7.401, None)]
    val = {p.step: p.value for p in store.metric_history("d2", "val_bpb")[0].points}
    assert val == {0: 3.312345, 50: 2.472756, 300: 2.2}  # the meta's own point is kept beside the log's
    again = store.import_log(log, "d2")
    assert (again.points_new, again.points_existing) == (0, 17)
    assert store.metric_history("d2", "train_loss_ema")[0].total_points == 3


def test_import_classic_log_with_segment(store, tmp_path):
    make_checkpoint(tmp_path / "base_checkpoints" / "d2", 20, num_iterations=20)
    store.scan(tmp_path)
    (tmp_path / "classic.log").write_text(CLASSIC_LOG)
    r = store.import_log(tmp_path / "classic.log", "base/d2", segment=2)
    assert (r.train_lines, r.eval_lines, r.malformed, r.points_new) == (2, 1, 0, 13)
    [g] = store.metric_history("base/d2", "grad_norm")
    assert [(p.step, p.segment, p.value) for p in g.points] == [(10, 2, 0.8389), (20, 2, 0.5)]


def test_import_log_bad_input(store, tmp_path):
    make_checkpoint(tmp_path / "base_checkpoints" / "d2", 20)
    make_checkpoint(tmp_path / "chatsft_checkpoints" / "d2", 20)
    store.scan(tmp_path)
    (tmp_path / "ok.log").write_text(CLASSIC_LOG)
    with pytest.raises(LogImportError, match="does not exist"):
        store.import_log(tmp_path / "missing.log", "base/d2")
    with pytest.raises(LogImportError, match="is not a file"):
        store.import_log(tmp_path, "base/d2")
    (tmp_path / "other.txt").write_text("hello\nworld\n")
    with pytest.raises(LogImportError, match="holds no nanochat training or evaluation lines"):
        store.import_log(tmp_path / "other.txt", "base/d2")
    with pytest.raises(RunNotFoundError, match="no run 'd9'"):
        store.import_log(tmp_path / "ok.log", "d9")
    with pytest.raises(AmbiguousRunError, match="'d2' matches 2 runs.*base/d2.*sft/d2"):
        store.import_log(tmp_path / "ok.log", "d2")
    with pytest.raises(LogImportError, match="segment must be a positive integer"):
        store.import_log(tmp_path / "ok.log", "base/d2", segment=0)
    assert store.metric_keys("base/d2")[0].key == "val_bpb" and len(store.metric_keys("base/d2")) == 1  # nothing imported
