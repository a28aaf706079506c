"""Exact, crash-proof resume of scripts.base_train, proven with real processes and real kills.

Every run here is a subprocess (`python -m scripts.base_train`, or torchrun with 2 gloo processes) on a
tiny model over real parquet shards. A crash is a SIGKILL: from the test between two checkpoints, or
from the script itself right after it wrote a given checkpoint file (NANOCHAT_FAULT_KILL_AFTER).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from registry.resume import plan_resume
from tests.modelkit import v1_optimizer_files, write_training_base
from tests.trainkit import assert_bit_identical, run_trainer, trainer_argv, trainer_env

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_META = ROOT / "tests" / "fixtures" / "upstream" / "current" / "base_checkpoints" / "d2" / "meta_000300.json"
STEPS, SAVE_EVERY = 30, 10
FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "SL",
         "--device-batch-size", "8", "--total-batch-size", "1024", "--num-iterations", str(STEPS),
         "--warmup-steps", "5", "--eval-every", "5", "--eval-tokens", "1024", "--save-every", str(SAVE_EVERY),
         "--device", "cpu", "--compile", "off", "--matrix-lr", "0.1", "--embedding-lr", "1.0"]
DETERMINISTIC = ("step", "train_loss", "lrm", "val_bpb")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_training_base(tmp_path_factory.mktemp("resume_base"))


env_for, run = trainer_env, run_trainer


def command(tag: str, *extra: str, nproc: int = 1) -> list[str]:
    return trainer_argv("scripts.base_train", [*FLAGS, "--model-tag", tag, *extra], nproc)


def run_dir(base: Path, tag: str) -> Path:
    return base / "base_checkpoints" / tag


def weights(base: Path, tag: str, step: int = STEPS) -> dict:
    return torch.load(run_dir(base, tag) / f"model_{step:06d}.pt", weights_only=True)


def assert_same_optimizer_shard(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for index in sa["state"]:
        assert_bit_identical(sa["state"][index], sb["state"][index])


def metrics(base: Path, tag: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir(base, tag) / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], after: int = -1) -> dict:
    """{(step, metric): value} as a reader shows it: each step's metric from the newest segment that
    logged it (a resumed segment re-logs the steps after its checkpoint; an eval logged before the
    checkpoint was saved is not repeated), for the metrics that must not depend on timing."""
    out, seg = {}, {}
    for r in rows:
        for key in DETERMINISTIC[1:]:
            if key in r and r["step"] >= after and r["segment"] >= seg.get((r["step"], key), 0):
                out[(r["step"], key)], seg[(r["step"], key)] = r[key], r["segment"]
    return out


def complete_steps(base: Path, tag: str) -> list[int]:
    return [c.step for c in cm.list_checkpoints(run_dir(base, tag))
            if not any(p.blocks == "load" for p in cm.quick_problems(c))]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def kill_between_checkpoints(cmd: list[str], base: Path, tag: str, kill_step: int, group: bool = False) -> int:
    """Start a run and SIGKILL it as soon as its metrics show `kill_step` (the whole process group for torchrun)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=group)
    path = run_dir(base, tag) / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and any(f'"step": {kill_step},' in line and "train_loss" in line
                                     for line in path.read_text().splitlines()):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before step {kill_step}"
    finally:
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    return proc.wait()


@pytest.fixture(scope="module")
def reference(base):
    """The uninterrupted run every crash is compared with."""
    res = run(command("ref"), base)
    assert res.returncode == 0, res.stderr
    assert complete_steps(base, "ref") == [10, 20, 30]
    return "ref"


@pytest.fixture(scope="module")
def ddp_reference(base):
    """The uninterrupted 2-process run (torchrun, gloo)."""
    res = run(command("ddp-ref", nproc=2), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(cm.find_last_complete(run_dir(base, "ddp-ref")).optimizer_shards) == [0, 1]
    return "ddp-ref"


# ---------------------------------------------------------------------- exact resume after a real kill


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(base, reference):
    kill_step = random.Random().randint(SAVE_EVERY + 1, SAVE_EVERY + 5)
    code = kill_between_checkpoints(command("crash"), base, "crash", kill_step)
    assert code == -signal.SIGKILL
    assert complete_steps(base, "crash") == [10], f"killed at step {kill_step}: not between checkpoints 10 and 20"
    assert max(r["step"] for r in metrics(base, "crash")) >= kill_step  # it really trained past the checkpoint
    res = run(command("crash", "--resume"), base)
    assert res.returncode == 0, res.stderr
    assert "resuming crash@10 (segment 2)" in res.stdout
    assert_bit_identical(weights(base, "ref"), weights(base, "crash"))
    rows = metrics(base, "crash")
    assert {r["segment"] for r in rows} == {1, 2}
    assert min(r["step"] for r in rows if r["segment"] == 2) == 10
    assert series(rows, after=10) == series(metrics(base, "ref"), after=10)
    meta = cm.read_meta(cm.find_last_complete(run_dir(base, "crash")))
    assert meta["resume_segment"] == 2 and meta["world_size"] == 1 and meta["num_iterations"] == STEPS
    ref_meta = cm.read_meta(cm.find_last_complete(run_dir(base, "ref")))
    assert meta["val_bpb"] == ref_meta["val_bpb"]
    for key in ("min_val_bpb", "smooth_train_loss"):
        assert meta["loop_state"][key] == ref_meta["loop_state"][key]
    assert_same_optimizer_shard(run_dir(base, "ref") / "optim_000030_rank0.pt",
                                run_dir(base, "crash") / "optim_000030_rank0.pt")


def test_compiled_training_resumes_bit_identically(base):
    """--compile on (what --compile auto picks for long CPU runs): killed, then resumed, and the weights
    match an uninterrupted compiled run; the checkpoint records the choice, so auto resumes it compiled."""
    res = run(command("cref", "--compile", "on"), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ", compiled (--compile on)" in res.stdout
    code = kill_between_checkpoints(command("ccrash", "--compile", "on"), base, "ccrash", SAVE_EVERY + 2)
    assert code == -signal.SIGKILL and complete_steps(base, "ccrash") == [10]
    assert cm.read_meta(cm.find_last_complete(run_dir(base, "ccrash")))["compiled"] is True
    res = run(command("ccrash", "--resume", "--compile", "auto"), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ", compiled (as the checkpoint's launch chose)" in res.stdout
    assert_bit_identical(weights(base, "cref"), weights(base, "ccrash"))


def test_two_processes_under_torchrun_resume_bit_identically(base, ddp_reference):
    kill_step = random.Random().randint(SAVE_EVERY + 1, SAVE_EVERY + 5)
    code = kill_between_checkpoints(command("ddp-crash", nproc=2), base, "ddp-crash", kill_step, group=True)
    assert code == -signal.SIGKILL
    assert complete_steps(base, "ddp-crash") == [10]
    res = run(command("ddp-crash", "--resume", nproc=2), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_bit_identical(weights(base, "ddp-ref"), weights(base, "ddp-crash"))
    for rank in (0, 1):
        assert_same_optimizer_shard(run_dir(base, "ddp-ref") / f"optim_000030_rank{rank}.pt",
                                    run_dir(base, "ddp-crash") / f"optim_000030_rank{rank}.pt")
    assert series(metrics(base, "ddp-crash"), after=10) == series(metrics(base, "ddp-ref"), after=10)
    assert cm.read_meta(cm.find_last_complete(run_dir(base, "ddp-crash")))["world_size"] == 2


def test_checkpoints_with_our_earlier_optimizer_layout_still_resume_exactly(base, ddp_reference):
    """Runs saved before the optimizer files took upstream's layout (per-name state, v1) continue bit-exactly."""
    src, dst = run_dir(base, "ddp-ref"), run_dir(base, "ddp-v1")
    dst.mkdir(parents=True)
    for p in src.glob("*_000010*"):
        shutil.copy2(p, dst / p.name)
    shutil.copy2(src / "metrics.jsonl", dst / "metrics.jsonl")
    meta = json.loads((dst / "meta_000010.json").read_text())
    shapes = {k: v.shape for k, v in torch.load(dst / "model_000010.pt", weights_only=True).items()}
    model = GPT(cm.config_from_checkpoint(meta, shapes))
    full = MuonAdamW(model, param_groups_for(model, LearningRates()))
    full.load_shards([torch.load(dst / f"optim_000010_rank{r}.pt", weights_only=True) for r in (0, 1)])
    for r, sd in enumerate(v1_optimizer_files(full, 2, model)):
        torch.save(sd, dst / f"optim_000010_rank{r}.pt")
    res = run(command("ddp-v1", "--resume", nproc=2), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_bit_identical(weights(base, "ddp-ref"), weights(base, "ddp-v1"))
    for rank in (0, 1):  # and from now on it writes upstream's layout
        assert_same_optimizer_shard(src / f"optim_000030_rank{rank}.pt", dst / f"optim_000030_rank{rank}.pt")


# ---------------------------------------------------------------------- kill while a checkpoint is written


@pytest.mark.parametrize("fault, resumes_from", [("model:20", 10), ("optim:20", 10), ("trainstate:20", 10),
                                                 ("meta:20", 20)])
def test_kill_during_save_never_resumes_an_incomplete_step(base, reference, fault, resumes_from):
    tag = "fault-" + fault.split(":")[0]
    res = run(command(tag), base, NANOCHAT_FAULT_KILL_AFTER=fault)
    assert res.returncode == -signal.SIGKILL
    left = {c.step: c for c in cm.list_checkpoints(run_dir(base, tag))}
    assert left[20].model is not None  # the half-written step is on disk ...
    assert cm.find_last_complete(run_dir(base, tag)).step == resumes_from  # ... but never chosen
    assert cm.find_last_complete(run_dir(base, tag), resumable=True).step == resumes_from
    res = run(command(tag, "--resume"), base)
    assert res.returncode == 0, res.stderr
    assert f"resuming {tag}@{resumes_from}" in res.stdout
    if resumes_from == 10:
        assert "note: skipped newer step 20: missing_meta" in res.stderr
    assert_bit_identical(weights(base, "ref"), weights(base, tag))
    assert complete_steps(base, tag) == [10, 20, 30]


def test_torchrun_rank_killed_after_its_shard_resumes_from_the_previous_step(base, ddp_reference):
    tag = "ddp-fault"
    res = run(command(tag, nproc=2), base, NANOCHAT_FAULT_KILL_AFTER="optim:20:1")
    assert res.returncode != 0
    assert cm.find_last_complete(run_dir(base, tag)).step == 10
    res = run(command(tag, "--resume", nproc=2), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_bit_identical(weights(base, "ddp-ref"), weights(base, tag))


# ---------------------------------------------------------------------- refusals that change nothing


def assert_refused(res: subprocess.CompletedProcess, fragment: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert fragment in lines[0]
    assert "Traceback" not in res.stdout + res.stderr


def test_refused_resumes_leave_the_disk_untouched(base, ddp_reference):
    # a run with complete steps 10 and 20, killed after writing step 20
    res = run(command("refuse"), base, NANOCHAT_FAULT_KILL_AFTER="meta:20")
    assert res.returncode == -signal.SIGKILL
    before = snapshot(base)

    # a different world size (the same check refuses 2 processes on a 1-process run)
    res = run(command("ddp-ref", "--resume-from-step", "20"), base)
    assert_refused(res, "ddp-ref@20 was trained by 2 process(es) but this launch has 1")
    assert "--nproc_per_node=2" in res.stderr
    assert snapshot(base) == before

    # a changed model config
    res = run(command("refuse", "--resume", "--depth", "3"), base)
    assert_refused(res, "different model (n_layer 2 -> 3,")
    assert snapshot(base) == before

    # a missing optimizer shard: the step named is refused; --resume falls back to the older step, saying so
    (run_dir(base, "refuse") / "optim_000020_rank0.pt").unlink()
    before = snapshot(base)
    res = run(command("refuse", "--resume-from-step", "20"), base)
    assert_refused(res, "optimizer shard of rank 0 of 1 is missing")
    assert snapshot(base) == before

    # nothing to resume at all
    res = run(command("never-trained", "--resume"), base)
    assert_refused(res, "nothing to resume")
    assert snapshot(base) == before

    # a fresh start over an existing run would overwrite its checkpoints and muddle its metrics
    res = run(command("refuse"), base)
    assert_refused(res, "already holds a run (checkpoint steps: 10, 20)")
    assert "--resume" in res.stderr
    assert snapshot(base) == before


def test_an_unusable_optimizer_file_stops_every_rank_with_one_line(base, ddp_reference, tmp_path):
    tag = "ddp-bad-shard"
    shutil.copytree(run_dir(base, "ddp-ref"), run_dir(base, tag))
    torch.save({"state": {}, "param_groups": []}, run_dir(base, tag) / "optim_000020_rank1.pt")  # loads, wrong kind
    before = snapshot(base)
    res = run(command(tag, "--resume-from-step", "20", nproc=2), base)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: cannot resume from ddp-bad-shard@20: the optimizer file of rank 1 holds 0 parameter "
                    "groups, this model has 10 (written for another model?)"]
    assert snapshot(base) == before


# ---------------------------------------------------------------------- signals, retention, meta


def test_sigterm_saves_prints_the_resume_command_and_that_command_resumes(base):
    tag = "term"
    proc = subprocess.Popen(command(tag, "--num-iterations", "100000", "--eval-every", "-1", "--save-every", "-1"),
                            cwd=ROOT, env=env_for(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = run_dir(base, tag) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err
    m = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved\. Resume with:\n  (.+)\n", out)
    assert m, out[-1000:]
    step, cmd = int(m.group(1)), m.group(2)
    assert complete_steps(base, tag) == [step]
    assert cmd.startswith(f"NANOCHAT_BASE_DIR={shlex.quote(str(base.resolve()))} OMP_NUM_THREADS=1 "
                          "python -m scripts.base_train ")
    assert f"--model-tag={tag}" in cmd and cmd.endswith(f" --resume-from-step={step}")
    assert cmd == plan_resume(run_dir(base, tag)).command  # the registry's planner says the same
    argv = shlex.split(cmd)[2:]
    argv = [sys.executable, *argv[1:], "--num-iterations", str(step + 2)]  # run it, but only two more steps
    res = subprocess.run(argv, cwd=ROOT, env=env_for(base), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"resuming {tag}@{step} (segment 2)" in res.stdout
    assert complete_steps(base, tag) == [step, step + 2]


def test_a_second_signal_exits_at_once_and_leaves_no_half_checkpoint(base):
    tag = "term2"  # steps of 1,024 micro-batches (seconds): the second signal lands while the first is honoured
    proc = subprocess.Popen(command(tag, "--total-batch-size", str(8 * 64 * 1024), "--eval-every", "-1",
                                    "--save-every", "-1", "--num-iterations", "1000"),
                            cwd=ROOT, env=env_for(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("model term2:")  # printed once the handlers are installed
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "second signal (SIGTERM): exiting now" in err and "Resume with" not in out
    assert complete_steps(base, tag) == []


def test_keep_last_never_deletes_the_best_or_the_resume_point(base):
    """Three segments with --keep-last 2: a good start (best val_bpb at step 12), a continuation with
    absurd learning rates (much worse val_bpb) killed after writing step 20, then --resume from 20.
    The newest two, the best (12) and the resume point (20) remain; 4, 8 and 16 are gone."""
    tag = "keep"
    flags = ["--num-iterations", "24", "--save-every", "4", "--eval-every", "4", "--keep-last", "2"]
    res = run(command(tag, *flags), base, NANOCHAT_FAULT_KILL_AFTER="meta:12")
    assert res.returncode == -signal.SIGKILL
    res = run(command(tag, *flags, "--resume", "--unembedding-lr", "200", "--matrix-lr", "5"), base,
              NANOCHAT_FAULT_KILL_AFTER="meta:20")
    assert res.returncode == -signal.SIGKILL
    res = run(command(tag, *flags, "--resume"), base)
    assert res.returncode == 0, res.stderr
    assert "resuming keep@20 (segment 3)" in res.stdout
    final = cm.read_meta(cm.find_last_complete(run_dir(base, tag)))
    assert final["user_config"]["unembedding_lr"] == 200  # a flag not given again comes from the checkpoint
    evals = {step: v for (step, key), v in series(metrics(base, tag)).items() if key == "val_bpb"}
    assert min((4, 8, 12, 16, 20, 24), key=evals.get) == 12, evals
    assert complete_steps(base, tag) == [12, 20, 24]
    assert sorted(p.name for p in run_dir(base, tag).iterdir() if "_000016" in p.name or "_000008" in p.name) == []


def test_meta_has_upstream_keys_and_types(base, reference):
    ours = cm.read_meta(cm.find_last_complete(run_dir(base, "ref")))
    upstream = json.loads(FIXTURE_META.read_text())
    for key, value in upstream.items():
        assert key in ours, key
        assert type(ours[key]) is type(value), (key, ours[key], value)
    assert set(ours["model_config"]) == set(upstream["model_config"])
    for sub in ("dataloader_state_dict", "loop_state"):
        assert {k: type(v) for k, v in ours[sub].items()} == {k: type(v) for k, v in upstream[sub].items()}, sub
    shared = set(ours["user_config"]) & set(upstream["user_config"])
    assert {"depth", "aspect_ratio", "num_iterations", "target_flops", "total_batch_size", "warmup_steps",
            "resume_from_step", "eval_every", "save_every", "model_tag", "run", "device_type"} <= shared
    for key in shared - {"model_tag", "num_iterations", "eval_every", "eval_tokens", "save_every"}:
        assert type(ours["user_config"][key]) is type(upstream["user_config"][key]), key
    assert (ours["world_size"], ours["num_iterations"], ours["resume_segment"], ours["train_state"],
            ours["workbench_version"]) == (1, STEPS, 1, True, 1)
    # upstream's loader: GPTConfig(**model_config) and a strict load of the state dict
    loaded = cm.load_model(run_dir(base, "ref"))
    assert loaded.checkpoint.step == STEPS and loaded.model.config.upstream_dict() == ours["model_config"]
