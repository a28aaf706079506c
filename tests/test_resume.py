"""The resume planner on real checkpoints: ours (exact), upstream's (approximate), broken ones skipped."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.model_config import GPTConfig
from nanochat.schedule import Schedule
from registry import integrity, resume
from registry.errors import RegistryError
from tests.modelkit import random_model

CFG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=48, window_pattern="SL")
USER = {"run": "dummy", "depth": 2, "aspect_ratio": 24, "head_dim": 24, "max_seq_len": 64, "window_pattern": "SL",
        "num_iterations": 100, "device_batch_size": 2, "total_batch_size": 256, "warmup_steps": 10,
        "warmdown_ratio": 0.5, "final_lr_frac": 0.1, "eval_every": 10, "save_every": 10, "model_tag": None,
        "resume_from_step": -1, "fp8": False, "compile": True}


def upstream_lrm(it: int, num_iterations: int, warmup=40, warmdown_ratio=0.65, final=0.05) -> float:
    """Upstream base_train's get_lr_multiplier, transcribed from the format doc (section 6)."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final


def save_step(d: Path, step: int, val_bpb: float | None, world: int = 1, seed: int = 0, **meta_extra) -> None:
    """One checkpoint as our training writes it: model, a shard and a training state per rank, meta last."""
    cm.invalidate_step(d, step)
    cm.save_model(d, step, random_model(CFG, seed=seed).state_dict())
    for rank in range(world):
        cm.save_optimizer_shard(d, step, rank, {"state": {}, "param_groups": [{"lr": 0.02, "params": []}]})
        cm.save_train_state(d, step, rank, {"rng": torch.get_rng_state(), "loader": {"pq_idx": 0, "rg_idx": step}})
    meta = {"step": step, "val_bpb": val_bpb, "model_config": CFG.upstream_dict(), "user_config": USER,
            "device_batch_size": 2, "max_seq_len": 64, "total_batch_size": 256,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": step, "epoch": 1},
            "loop_state": {"min_val_bpb": val_bpb, "smooth_train_loss": 4.0, "total_training_time": 1.0},
            "world_size": world, "num_iterations": 100, "resume_segment": 1, "train_state": True,
            "workbench_version": 1, **meta_extra}
    cm.write_meta(d, step, meta)


def write_metrics(d: Path, rows: list[dict], torn_tail: bool = True) -> None:
    with open(d / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"segment": 1, "wall_time": 1.0e9 + r["step"], **r}) + "\n")
        if torn_tail:
            f.write('{"step": 9999, "segm')  # a line torn by a crash mid-write


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "base" / "base_checkpoints" / "d2"
    for step, val in ((10, 3.0), (20, 2.8), (30, 2.7)):
        save_step(d, step, val, seed=step)
    write_metrics(d, [{"step": s, "train_loss": 4.0, "lrm": 1.0, "dt_ms": 100.0 + (s % 3), "tok_per_sec": 2560}
                      for s in range(0, 34)] + [{"step": s, "val_bpb": v} for s, v in ((10, 3.0), (20, 2.8), (30, 2.7))])
    return d


def test_intact_run_resumes_exactly_from_the_latest_step(run):
    plan = resume.plan_resume(run)
    assert (plan.step, plan.phase, plan.tag, plan.mode, plan.exact, plan.skipped) == (30, "base", "d2", "exact", True, ())
    assert (plan.target_steps, plan.target_source, plan.remaining_steps, plan.progress) == (100, "meta", 70, 0.3)
    schedule = Schedule(100, 10, 0.5, 0.1)
    assert plan.schedule == schedule and plan.lr_multiplier == schedule.lr_multiplier(30) == 1.0
    assert plan.schedule_phase == "constant"
    assert plan.step_time_s == pytest.approx(0.101) and plan.eta_s == pytest.approx(70 * 0.101)
    assert "metrics.jsonl" in plan.step_time_source
    # train rows 0..33 were written: 34 steps done, 4 past the checkpoint at 30
    assert plan.reached_step == 34 and any("reached step 34" in w and "4 steps" in w for w in plan.warnings)
    assert (plan.val_bpb, plan.best_val_bpb, plan.best_val_step, plan.better_step) == (2.7, 2.7, 30, None)
    argv = list(plan.command_argv)
    assert argv[:3] == ["python", "-m", "scripts.base_train"] and argv[-1] == "--resume-from-step=30"
    assert "--model-tag=d2" in argv and "--num-iterations=100" in argv and "--compile" in argv
    assert not any(a.startswith(("--fp8", "--resume-from-step=-1", "--run=dummy --")) for a in argv)
    assert plan.command_env == {"NANOCHAT_BASE_DIR": str(run.parent.parent)}
    assert shlex.split(plan.command) == [f"NANOCHAT_BASE_DIR={run.parent.parent}", *argv]
    assert plan.integrity_level == "quick" and plan.resumable


def test_broken_newer_steps_are_skipped_with_reasons(run):
    save_step(run, 40, 2.6, seed=40)
    save_step(run, 50, 2.5, seed=50)
    data = (run / "model_000050.pt").read_bytes()
    (run / "model_000050.pt").write_bytes(data[:1000])
    (run / "trainstate_000040_rank0.pt").unlink()
    plan = resume.plan_resume(run)
    assert plan.step == 30
    assert [(s.step, [p.code for p in s.problems]) for s in plan.skipped] == [(50, ["truncated"]), (40, ["missing_train_state"])]
    assert "skipped newer step 50: truncated" in plan.warnings[0]
    assert "  skipped        step 50: truncated: model_000050.pt has no zip central directory" in resume.format_plan(plan)


def test_deep_planning_skips_silent_corruption_the_quick_check_cannot_see(run):
    path = run / "model_000030.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the largest tensor's data
    path.write_bytes(bytes(data))
    assert resume.plan_resume(run).step == 30
    plan = resume.plan_resume(run, deep=True)
    assert plan.step == 20 and plan.integrity_level == "deep"
    assert [p.code for p in plan.skipped[0].problems] == ["crc_mismatch"]


def test_loss_spike_warns_and_names_a_better_resumable_step(run):
    save_step(run, 40, 3.4, seed=40)  # val_bpb jumps from 2.7 to 3.4
    plan = resume.plan_resume(run)
    assert plan.step == 40 and plan.best_val_bpb == 2.7 and plan.best_val_step == 30 and plan.better_step == 30
    spike = next(w for w in plan.warnings if w.startswith("loss spike"))
    assert "26% worse" in spike and "--resume-from-step=30" in spike
    assert plan.better_command == plan.command.replace("--resume-from-step=40", "--resume-from-step=30")
    assert resume.format_plan(plan).endswith(f"or, from step 30 before the loss spike:\n  {plan.better_command}")


def test_spike_without_a_resumable_better_step(run):
    save_step(run, 40, 3.4, seed=40)
    for step in (10, 20, 30):
        (run / f"optim_{step:06d}_rank0.pt").unlink()
    plan = resume.plan_resume(run)
    assert plan.better_step is None and any(w.startswith("loss spike") for w in plan.warnings)


def test_two_processes_use_torchrun(tmp_path):
    d = tmp_path / "b" / "base_checkpoints" / "wide"
    save_step(d, 10, 3.0, world=2)
    plan = resume.plan_resume(d)
    assert plan.world_size == 2
    assert list(plan.command_argv[:6]) == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", "--"]
    assert "--model-tag=wide" in plan.command_argv
    (d / "optim_000010_rank1.pt").unlink()
    with pytest.raises(resume.NothingResumableError, match="no resumable checkpoint") as e:
        resume.plan_resume(d)
    assert [p.code for p in e.value.skipped[0].problems] == ["missing_optimizer_shard"]


def test_target_steps_override_moves_the_schedule(run):
    plan = resume.plan_resume(run, target_steps=200)
    assert (plan.target_steps, plan.target_source, plan.run_num_iterations, plan.remaining_steps) == (200, "override", 100, 170)
    assert "--num-iterations=200" in plan.command_argv and "--num-iterations=100" not in plan.command_argv
    assert plan.schedule == Schedule(200, 10, 0.5, 0.1)
    done = resume.plan_resume(run, target_steps=30)
    assert done.finished and done.remaining_steps == 0 and done.schedule_phase == "done"
    assert any("the run is complete" in w for w in done.warnings)


def test_default_base_dir_needs_no_env_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = tmp_path / ".cache" / "nanochat" / "base_checkpoints" / "d2"
    save_step(d, 10, 3.0)
    plan = resume.plan_resume(d)
    assert plan.command_env == {} and plan.command.startswith("python -m scripts.base_train ")


def test_sft_restarts_with_upstreams_script(tmp_path):
    d = tmp_path / "b" / "chatsft_checkpoints" / "d2"
    save_step(d, 10, 1.5, train_state=False)  # upstream's chat_sft wrote it (ours resume exactly: test_chat_sft)
    plan = resume.plan_resume(d)
    assert plan.phase == "sft" and plan.script == "scripts.chat_sft" and plan.mode == "restart"
    assert "upstream nanochat's script" in plan.script_note
    assert not any(a.startswith("--resume-from-step") for a in plan.command_argv)


def test_upstream_current_fixture_step_300_of_300(upstream_dir):
    base = upstream_dir / "current"
    plan = resume.plan_resume(base)  # a base dir holding one run
    assert (plan.step, plan.target_steps, plan.remaining_steps, plan.target_source) == (300, 300, 0, "user_config")
    assert plan.finished and plan.progress == 1.0
    assert plan.lr_multiplier == upstream_lrm(300, 300) == pytest.approx(0.05)
    assert plan.schedule_phase == "done"
    assert [plan.schedule.phase(s) for s in (0, 39, 40, 105, 106, 299)] == \
        ["warmup", "warmup", "constant", "constant", "warmdown", "warmdown"]
    assert all(lrm == upstream_lrm(s, 300) for s, lrm in plan.lr_curve(301))
    assert plan.mode == "approximate" and not plan.exact and "without RNG state" in plan.mode_note
    assert plan.world_size == 1 and plan.step_time_s == pytest.approx(12.653087139129639 / 290)
    assert plan.command_env == {"NANOCHAT_BASE_DIR": str(base)}
    assert plan.command_argv[-1] == "--resume-from-step=300" and "--depth=2" in plan.command_argv
    assert plan.best_val_bpb == pytest.approx(2.1868093265773716)
    longer = resume.plan_resume(base, target_steps=400)
    assert longer.lr_multiplier == upstream_lrm(300, 400) and longer.schedule_phase == "warmdown"
    assert longer.eta_s == pytest.approx(100 * 12.653087139129639 / 290)


def test_upstream_classic_fixture_cannot_be_resumed(upstream_dir):
    plan = resume.plan_resume(upstream_dir / "classic" / "base_checkpoints" / "d2")
    assert plan.mode == "unsupported" and plan.command is None and not plan.resumable
    assert plan.lr_multiplier == 0.0 and plan.schedule.warmup_steps == 0 and plan.schedule.warmdown_start == 240
    assert plan.step_time_s is None and "no ETA" in resume.format_plan(plan)


def test_known_results_spare_the_checks_while_files_are_unchanged(run):
    known = {c.step: integrity.deep_check(c) for c in cm.list_checkpoints(run)}
    calls = []

    def check(ckpt, deep):
        calls.append(ckpt.step)
        return integrity.check_checkpoint(ckpt, deep)

    plan = resume.plan_resume(run, deep=True, known=known, check=check)
    assert plan.step == 30 and calls == [] and plan.integrity_level == "deep"
    save_step(run, 30, 2.7, seed=31)  # rewritten: the stored result no longer applies
    resume.plan_resume(run, deep=True, known=known, check=check)
    assert calls == [30]


def test_lr_curve_marks_the_resume_step(run):
    plan = resume.plan_resume(run)
    curve = dict(plan.lr_curve(points=5))
    assert {0, 9, 10, 30, 50, 51, 100} <= set(curve) and curve[30] == plan.lr_multiplier
    assert all(curve[s] == plan.schedule.lr_multiplier(s) for s in curve)


def test_json_shape_round_trips(run):
    d = json.loads(json.dumps(resume.plan_resume(run).to_dict()))
    assert d["step"] == 30 and d["exact"] is True and d["resumable"] is True
    assert d["schedule"] == {"num_iterations": 100, "warmup_steps": 10, "warmdown_ratio": 0.5, "final_lr_frac": 0.1}
    assert isinstance(d["command_argv"], list) and d["skipped"] == []


def test_bad_paths_give_one_line_errors(tmp_path, run):
    with pytest.raises(RegistryError, match="does not exist"):  # one family for the CLI and the pages to catch
        resume.plan_resume(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(resume.ResumePlanError, match="no checkpoints in"):
        resume.plan_resume(tmp_path / "empty")
    save_step(run.parent / "d3", 10, 3.0)
    with pytest.raises(resume.ResumePlanError, match="holds 2 runs"):
        resume.plan_resume(run.parent.parent)
    assert resume.plan_resume(run / "model_000020.pt").step == 20  # a file names its checkpoint (issue 11)


def test_cpu_thread_count_of_our_training_goes_into_the_command(tmp_path):
    d = tmp_path / "b" / "base_checkpoints" / "d2"
    save_step(d, 10, 3.0)
    cm.save_train_state(d, 10, 0, {"rng": {"torch_cpu": torch.get_rng_state()}, "cpu_threads": 3})
    plan = resume.plan_resume(d)
    assert plan.command_env["OMP_NUM_THREADS"] == "3" and " OMP_NUM_THREADS=3 python -m" in plan.command
    cm.save_train_state(d, 10, 0, {"rng": {"torch_cpu": torch.get_rng_state(), "torch_cuda": [torch.get_rng_state()]},
                                   "cpu_threads": 3})
    assert "OMP_NUM_THREADS" not in resume.plan_resume(d).command_env  # a CUDA run: threads do not decide the bits
