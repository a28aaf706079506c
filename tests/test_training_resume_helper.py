"""tools/training_resume_helper.py: the feature guide's interface, our report, honest exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from registry import resume
from tests.test_resume import save_step

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "training_resume_helper.py"


def helper(*args, cwd=None) -> subprocess.CompletedProcess:
    # run as the guide runs it (a script path, from another directory) to prove it finds its packages
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=cwd or "/")


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "base" / "base_checkpoints" / "d2"
    save_step(d, 10, 3.0, seed=1)
    save_step(d, 20, 2.9, seed=2)
    return d


def test_report_is_the_registry_report(run):
    out = helper(run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == resume.format_plan(resume.plan_resume(run))
    assert "step 20" in out.stdout and "resume         exact" in out.stdout


def test_command_only(run):
    out = helper(run, "--command")
    assert out.returncode == 0 and out.stdout.strip() == resume.plan_resume(run).command
    assert out.stdout.count("\n") == 1


def test_target_steps_and_json(run):
    out = helper(run, "--target-steps", "150", "--json")
    d = json.loads(out.stdout)
    assert out.returncode == 0 and d["target_steps"] == 150 and d["remaining_steps"] == 130
    assert d["target_source"] == "override" and "--num-iterations=150" in d["command_argv"]


def test_verify_runs_the_deep_check(run):
    path = run / "model_000020.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    assert "checkpoint     step 20 (segment 1)," in helper(run).stdout  # the quick check cannot see a flipped bit
    out = helper(run, "--verify")
    assert out.returncode == 0 and "checkpoint     step 10 (segment 1), passed the deep" in out.stdout
    assert "skipped        step 20: crc_mismatch" in out.stdout


def test_nothing_resumable_exits_3_with_reasons(run):
    for step in (10, 20):
        (run / f"meta_{step:06d}.json").unlink()
    out = helper(run)
    assert out.returncode == 3 and out.stdout == ""
    assert out.stderr.splitlines()[0].startswith("error: no resumable checkpoint")
    assert "step 20: missing_meta" in out.stderr
    as_json = json.loads(helper(run, "--json").stdout)
    assert as_json["resumable"] is False and as_json["skipped"][0]["problems"][0]["code"] == "missing_meta"


def test_classic_upstream_has_no_command(upstream_dir):
    out = helper(upstream_dir / "classic" / "base_checkpoints" / "d2", "--command")
    assert out.returncode == 3 and out.stdout == "" and "classic nanochat" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["/does/not/exist"], "error: /does/not/exist does not exist"),
    (["{run}", "--target-steps", "0"], "error: --target-steps must be a positive number of steps"),
])
def test_bad_input_is_one_line(run, args, message):
    out = helper(*[a.format(run=run) for a in args])
    assert out.returncode == 1 and out.stderr.strip() == message and "Traceback" not in out.stderr
