"""The resume planner on the demo runs (scripts/demo.py, profile "test"): the right steps, and commands
that resume when executed, including after a crash during a save, where the resumed run rewrites the
lost checkpoint bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from registry import resume
from registry.errors import TargetBelowStepError
from scripts import base_train
from scripts.demo import PROFILES

ROOT = Path(__file__).resolve().parent.parent
SPECS = {spec.tag: spec for spec in PROFILES["test"].runs}

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_copy(demo_base, tmp_path):
    """A private, writable copy of the shared demo base dir."""
    dst = tmp_path / "demo"
    shutil.copytree(demo_base, dst, symlinks=True)
    return dst


def shell(command: str) -> subprocess.CompletedProcess:
    # no OMP_NUM_THREADS of ours: the planned command sets the count the run was trained with
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NANOCHAT_BASE_DIR", None)  # the planned command carries it
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_every_demo_run_is_planned_at_its_last_step(demo_base):
    for tag, spec in SPECS.items():
        plan = resume.plan_resume(demo_base / "base_checkpoints" / tag)
        left = spec.steps - spec.final_step
        assert (plan.step, plan.target_steps, plan.remaining_steps, plan.finished) == (spec.final_step, spec.steps, left,
                                                                                      not left)
        assert plan.mode == "exact" and plan.skipped == () and plan.world_size == 1
        assert plan.command_env["NANOCHAT_BASE_DIR"] == str(demo_base)
        assert plan.command_env["OMP_NUM_THREADS"] == "1"  # the demo trains one thread per process
        assert f"--model-tag={tag}" in plan.command_argv
        assert plan.command_argv[-1] == f"--resume-from-step={spec.final_step}"
        assert plan.step_time_s is not None and plan.val_bpb is not None
    # the run left killed: training had gone past its last checkpoint, so those steps are trained again
    killed = next(spec for spec in SPECS.values() if spec.left_killed)
    plan = resume.plan_resume(demo_base / "base_checkpoints" / killed.tag)
    assert plan.reached_step is not None and plan.reached_step > killed.final_step
    assert plan.eta_s is not None and plan.eta_s > 0
    # the run killed mid-way was continued once: its last checkpoint is from the second segment, and the
    # planned command does not repeat the --resume that launched it (it names the step instead)
    crashed = resume.plan_resume(demo_base / "base_checkpoints" / "d2-crash")
    assert crashed.segment == 2 and resume.plan_resume(demo_base / "base_checkpoints" / "d2").segment == 1
    assert "--resume" not in crashed.command_argv


def test_the_trainer_and_the_planner_print_the_same_resume_command(demo_base):
    """One builder: what base_train prints when stopped at a step is the planner's command for that step."""
    for tag in SPECS:
        run = demo_base / "base_checkpoints" / tag
        plan = resume.plan_resume(run)
        meta = cm.read_meta(cm.find_last_complete(run, resumable=True))
        printed = base_train.stop_command(meta["user_config"], run, world_size=1, cpu_threads=1, step=plan.step)
        assert printed == plan.command


def test_a_target_below_the_resume_step_is_refused(demo_base):
    spec = SPECS["d2"]
    with pytest.raises(TargetBelowStepError, match=f"target 3 steps is below the resume step {spec.steps}"):
        resume.plan_resume(demo_base / "base_checkpoints" / "d2", target_steps=3)


def test_crash_during_the_last_save_is_resumed_to_the_same_weights(demo_copy):
    run = demo_copy / "base_checkpoints" / "d2-crash"
    spec = SPECS["d2-crash"]
    original = torch.load(run / f"model_{spec.steps:06d}.pt", weights_only=True)
    (run / f"meta_{spec.steps:06d}.json").unlink()  # as if killed while saving the last step
    plan = resume.plan_resume(run)
    previous = spec.steps - spec.save_every
    assert (plan.step, plan.remaining_steps, plan.mode) == (previous, spec.save_every, "exact")
    assert [s.step for s in plan.skipped] == [spec.steps] and plan.skipped[0].problems[0].code == "missing_meta"
    assert plan.lr_multiplier == plan.schedule.lr_multiplier(previous)
    done = shell(plan.command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming d2-crash@{previous}" in done.stdout
    again = torch.load(run / f"model_{spec.steps:06d}.pt", weights_only=True)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert resume.plan_resume(run).step == spec.steps


def test_a_finished_demo_run_trains_longer_with_target_steps(demo_copy):
    run = demo_copy / "base_checkpoints" / "d2"
    spec = SPECS["d2"]
    plan = resume.plan_resume(run, target_steps=spec.steps + 4)
    assert (plan.step, plan.remaining_steps, plan.target_source) == (spec.steps, 4, "override")
    assert f"--num-iterations={spec.steps + 4}" in plan.command_argv
    done = shell(plan.command)
    assert done.returncode == 0, done.stderr[-2000:]
    final = cm.find_last_complete(run, resumable=True)
    assert final.step == spec.steps + 4 and cm.read_meta(final)["num_iterations"] == spec.steps + 4
