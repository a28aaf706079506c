"""The planner's command, executed in a shell, really resumes our training (one process and torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import checkpoint_manager as cm
from registry import integrity, resume
from tests.modelkit import corpus_texts, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--depth=2", "--aspect-ratio=24", "--head-dim=24", "--max-seq-len=64", "--window-pattern=L",
         "--device-batch-size=2", "--total-batch-size=256", "--num-iterations=12", "--warmup-steps=2",
         "--save-every=4", "--eval-every=4", "--eval-tokens=256", "--device=cpu", "--seed=3"]

pytestmark = pytest.mark.slow


@pytest.fixture
def base(tmp_path):
    """A nanochat base dir: tokenizer and three small parquet shards (the last is validation)."""
    b = tmp_path / "nanochat base"  # a space, so the command's quoting is exercised too
    tiny_tokenizer(300).save(b / "tokenizer")
    docs = [t[i:i + 800] for t in corpus_texts(120_000) for i in range(0, len(t), 800)]
    (b / "base_data").mkdir(parents=True)
    for k in range(3):
        part = docs[k::3]
        pq.write_table(pa.table({"text": part}), b / "base_data" / f"shard_{k:05d}.parquet", row_group_size=20)
    return b


def shell(command: str, base: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command line exactly as a user pastes it, with this venv's python first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra_env or {})}
    env.pop("NANOCHAT_BASE_DIR", None)  # the command must carry it itself
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train(base: Path, *flags: str, world: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "scripts.base_train"] if world == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={world}", "-m",
         "scripts.base_train", "--"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    if fault:
        env["NANOCHAT_FAULT_KILL_AFTER"] = fault
    return subprocess.run([*launcher, *FLAGS, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def final_state(run: Path, step: int) -> dict:
    return torch.load(run / f"model_{step:06d}.pt", weights_only=True)


def test_planned_command_resumes_a_crashed_run_exactly(base):
    crashed = train(base, fault="optim:8")  # SIGKILL right after the model and a shard of step 8 are written
    assert crashed.returncode != 0
    run = base / "base_checkpoints" / "d2"
    plan = resume.plan_resume(run)
    assert (plan.step, plan.target_steps, plan.remaining_steps, plan.mode) == (4, 12, 8, "exact")
    assert [(s.step, [p.code for p in s.problems][0]) for s in plan.skipped] == [(8, "missing_meta")]
    assert plan.lr_multiplier == plan.schedule.lr_multiplier(4) and plan.schedule_phase == "constant"
    assert plan.reached_step == 8 and plan.step_time_s is not None and plan.eta_s == pytest.approx(8 * plan.step_time_s)
    # trained with OMP_NUM_THREADS=1 (see train()): the command sets it, since the thread count changes the bits
    assert plan.command.startswith(f"NANOCHAT_BASE_DIR='{base}' OMP_NUM_THREADS=1 python -m scripts.base_train ")
    assert "OMP_NUM_THREADS=1 as when it was trained" in plan.mode_note

    done = shell(plan.command, base)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming d2@4 (segment 2)" in done.stdout
    assert [c.step for c in cm.list_checkpoints(run) if not cm.quick_problems(c)] == [4, 8, 12]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    segment2 = [r["step"] for r in rows if r["segment"] == 2 and "train_loss" in r]
    assert segment2 == list(range(4, 12))  # continued from the planned step, to the end
    after = resume.plan_resume(run, deep=True)
    assert after.step == 12 and after.finished and after.remaining_steps == 0 and after.integrity_level == "deep"
    for ckpt in cm.list_checkpoints(run):  # what our trainer writes passes every deep check (no false alarms)
        result = integrity.deep_check(ckpt)
        assert result.ok, result.problems
        assert {f.name.split("_")[0] for f in result.files} == {"model", "meta", "optim", "trainstate"}

    # the same run without a crash ends with the same weights: the planned resume was exact
    reference = base.parent / "reference"
    reference.mkdir()
    for name in ("tokenizer", "base_data"):
        (reference / name).symlink_to(base / name)
    assert train(reference).returncode == 0
    expected, got = final_state(reference / "base_checkpoints" / "d2", 12), final_state(run, 12)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_planned_torchrun_command_resumes_two_processes(base):
    assert train(base, "--num-iterations=8", world=2, fault="meta:8:0").returncode != 0  # killed after writing meta 8
    run = base / "base_checkpoints" / "d2"
    for name in ("meta_000008.json",):
        (run / name).unlink()  # treat step 8 as crashed mid-save: the last resumable one is 4
    plan = resume.plan_resume(run, target_steps=8)
    assert (plan.step, plan.world_size, plan.remaining_steps) == (4, 2, 4)
    assert " torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- " in f" {plan.command.split(' ', 1)[1]}"
    done = shell(plan.command, base, {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming d2@4 (segment 2)" in done.stdout
    assert {c.step for c in cm.list_checkpoints(run) if not cm.quick_problems(c)} == {4, 8}
