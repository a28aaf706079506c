"""`python -m registry verify` and `python -m registry resume`: tables, --json shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from registry import cli, resume
from tests.modelkit import tiny_tokenizer
from tests.test_resume import save_step

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    for step, val in ((10, 3.0), (20, 2.9)):
        save_step(b / "base_checkpoints" / "d2", step, val, seed=step)
    tiny_tokenizer(300).save(b / "tokenizer")  # the run's tokenizer: verify checks it too
    return b


def run_cli(capsys, db, *argv) -> tuple[int, str, str]:
    code = cli.main(["--db", str(db), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_deep_table_and_summary(capsys, tmp_path, base):
    code, out, err = run_cli(capsys, tmp_path / "r.sqlite", "verify", "--deep", "--no-progress", base)
    assert code == 0, err
    assert re.search(r"base/d2  10 +deep-verified", out) and re.search(r"base/d2  20 +deep-verified", out)
    assert f"deep check of 2 checkpoint(s) under {base}: 2 passed, 0 with problems" in out


def test_verify_json_shape_and_exit_3_on_problems(capsys, tmp_path, base):
    run = base / "base_checkpoints" / "d2"
    (run / "meta_000020.json").write_text("{")
    code, out, _ = run_cli(capsys, tmp_path / "r.sqlite", "verify", "--json", "--no-progress", base)
    assert code == 3
    d = json.loads(out)
    assert {"target", "level", "checked", "with_problems", "bytes_read", "duration_s", "codes", "results"} <= set(d)
    assert (d["level"], d["checked"], d["with_problems"], d["codes"]) == ("quick", 2, 1, {"bad_meta_json": 1})
    bad = next(r for r in d["results"] if r["step"] == 20)
    assert bad["run"] == "base/d2" and isinstance(bad["checkpoint_id"], int) and not bad["ok"]
    assert bad["state"] == "incomplete" and {r["state"] for r in d["results"] if r["step"] == 10} == {"quick_ok"}
    assert bad["problems"][0] == {"code": "bad_meta_json", "message": bad["problems"][0]["message"], "blocks": "load",
                                  "file": "meta_000020.json"}
    assert {"name", "size", "mtime_ns", "sha256"} == set(bad["files"][0])
    code, out, _ = run_cli(capsys, tmp_path / "r.sqlite", "show", "d2@20")  # the result is in the registry
    assert code == 0 and "bad_meta_json" in out


def test_resume_prints_the_helpers_report(capsys, tmp_path, base):
    run = base / "base_checkpoints" / "d2"
    code, out, err = run_cli(capsys, tmp_path / "r.sqlite", "resume", run)
    assert code == 0, err
    assert out.strip() == resume.format_plan(resume.plan_resume(run))
    code, out, _ = run_cli(capsys, tmp_path / "r.sqlite", "resume", "d2", "--json", "--target-steps", "40")
    d = json.loads(out)
    assert code == 0 and d["step"] == 20 and d["target_steps"] == 40 and d["mode"] == "exact"
    assert d["command_argv"][-1] == "--resume-from-step=20"


def test_resume_nothing_resumable_exits_3(capsys, tmp_path, base):
    run = base / "base_checkpoints" / "d2"
    for step in (10, 20):
        (run / f"optim_{step:06d}_rank0.pt").unlink()
    code, out, _ = run_cli(capsys, tmp_path / "r.sqlite", "resume", run)
    assert code == 3 and out.startswith("nothing to resume: no resumable checkpoint")
    assert "step 20: missing_optimizer_shard" in out
    code, out, _ = run_cli(capsys, tmp_path / "r.sqlite", "resume", run, "--json")
    assert code == 3 and json.loads(out)["resumable"] is False


@pytest.mark.parametrize("argv,message", [
    (["verify", "/no/such/dir"], "error: /no/such/dir does not exist"),
    (["verify", "nosuchrun"], "error: no run 'nosuchrun' in the registry"),
    (["resume", "./nothing/here"], "error: nothing/here does not exist"),
    (["resume", "d2", "--target-steps", "0"], "error: --target-steps must be a positive number of steps"),
])
def test_bad_input_is_one_line_exit_1(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, tmp_path / "r.sqlite", *argv)
    assert code == 1 and out == "" and err.startswith(message) and err.count("\n") == 1


def test_help_names_every_flag():
    out = subprocess.run([sys.executable, "-m", "registry", "verify", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert all(flag in out for flag in ("--deep", "--no-progress", "--json", "--db", "RUN|PATH"))
    out = subprocess.run([sys.executable, "-m", "registry", "resume", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert all(flag in out for flag in ("--target-steps", "--deep", "--json", "RUN"))
    readme = (ROOT / "README.md").read_text()
    for flag in ("--deep", "--no-progress", "--target-steps", "--verify", "--command", "--json"):
        assert flag in readme.split("<!-- section: integrity -->")[1].split("<!-- end section: integrity -->")[0]
