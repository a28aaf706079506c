"""Continuing an upstream-written run with our trainer (issue 11 item 3): `scripts.base_train --resume
--allow-approximate` on upstream's own step-300 fixture checkpoint trains on to completion, says once that
it is approximate, records it in the meta, and writes checkpoints that then resume bit-exactly (killed
after the approximate segment's first checkpoint, resumed, and compared with an uninterrupted
continuation). Without the flag the trainer refuses, naming it. The resume planner (both CLIs, `--json`)
and the app's Resume page offer the command, built by the trainer's own command builder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.dataloader import DocumentStream
from nanochat.train_config import BASE_TRAIN

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_RUN = ROOT / "tests" / "fixtures" / "upstream" / "current"
FROM, END = 300, 304  # upstream's last step, and where the continuation stops
# tiny continuations: a checkpoint every 2 steps, short evaluations (the rest is the upstream run's own flags)
FLAGS = ["--device", "cpu", "--num-iterations", str(END), "--save-every", "2", "--eval-tokens", "2048"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base dir holding upstream's run (tokenizer, base_checkpoints/d2) and train/validation shards."""
    from scripts.demo import write_shards

    base = tmp_path_factory.mktemp("approx") / "base"
    shutil.copytree(UPSTREAM_RUN / "tokenizer", base / "tokenizer")
    shutil.copytree(UPSTREAM_RUN / "base_checkpoints", base / "base_checkpoints")
    write_shards(base / "base_data", 400_000)  # one train shard of 5 row groups: upstream saved row group 2
    return base


@pytest.fixture(scope="module")
def continued(base) -> tuple[Path, subprocess.CompletedProcess]:
    """Upstream's run continued to the end by our trainer, uninterrupted."""
    run = upstream_copy(base, "ref")
    return run, train(base, "--model-tag", "ref", "--resume", "--allow-approximate", *FLAGS)


def upstream_copy(base: Path, tag: str) -> Path:
    dst = base / "base_checkpoints" / tag
    shutil.copytree(base / "base_checkpoints" / "d2", dst)
    return dst


def train(base: Path, *args: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_FAULT_KILL_AFTER", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**clean, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1",
                                            "OMP_NUM_THREADS": "1", **env})


def weights(run: Path, step: int) -> dict:
    return torch.load(run / f"model_{step:06d}.pt", weights_only=True)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------- refusals


def test_without_the_flag_the_refusal_names_it_and_changes_nothing(base):
    run = upstream_copy(base, "refuse")
    before = snapshot(base)
    res = train(base, "--model-tag", "refuse", "--resume", *FLAGS)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: refuse@300 has no training state") and "add --allow-approximate" in line
    res = train(base, "--model-tag", "refuse", "--allow-approximate", *FLAGS)  # the flag alone starts nothing
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --allow-approximate applies to a resume: add --resume (or --resume-from-step N)"
    res = train(base, "--model-tag", "refuse", "--resume", "--allow-approximate", "--depth", "3", *FLAGS)
    assert res.returncode == 2 and "different model (n_layer 2 -> 3" in res.stderr  # the model check still holds
    assert snapshot(base) == before and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- the acceptance: approximate, then exact


def test_approximate_resume_runs_to_completion_then_resumes_exactly(base, continued):
    (ref, res), crash = continued, upstream_copy(base, "crash")

    # an uninterrupted continuation of upstream's run, to the end
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("approximate resume (--allow-approximate): ref@300 was written by upstream nanochat") == 1
    assert "train shard #0, row group 3 (rank 0), epoch 3" in res.stdout  # upstream saved row group 2: the next one
    assert "left out: fp8, fp8_recipe, core_metric_every" in res.stderr  # upstream flags we do not have: one note
    assert [c.step for c in cm.list_checkpoints(ref)] == [FROM, 302, END]
    meta = cm.read_meta(cm.find_last_complete(ref))
    assert meta["train_state"] is True and meta["resume_segment"] == 2 and meta["num_iterations"] == END
    approx = meta["approximate_resume"]
    assert (approx["from_step"], approx["segment"]) == (FROM, 2)
    assert approx["dataloader_state_dict"] == {"pq_idx": 0, "rg_idx": 2, "epoch": 3}
    assert "saves no RNG state and no exact data position" in approx["reason"]
    up = json.loads((UPSTREAM_RUN / "base_checkpoints" / "d2" / "meta_000300.json").read_text())
    first = json.loads((ref / "metrics.jsonl").read_text().splitlines()[1])  # row 0: the eval at the resume step
    assert first["step"] == FROM and abs(first["train_loss"] - up["loop_state"]["smooth_train_loss"]) < 0.5
    assert meta["loop_state"]["total_training_time"] > up["loop_state"]["total_training_time"]  # carried on
    assert meta["user_config"]["warmup_steps"] == 40 and meta["user_config"]["allow_approximate"] is True

    # the same continuation killed right after its first checkpoint, then resumed exactly (no flag needed)
    res = train(base, "--model-tag", "crash", "--resume", "--allow-approximate", *FLAGS,
                NANOCHAT_FAULT_KILL_AFTER="meta:302")
    assert res.returncode == -signal.SIGKILL
    res = train(base, "--model-tag", "crash", "--resume", *FLAGS)
    assert res.returncode == 0, res.stderr
    assert "resuming crash@302 (segment 3)" in res.stdout and "approximate" not in res.stdout
    for key in weights(ref, END):
        assert torch.equal(weights(ref, END)[key], weights(crash, END)[key]), key
    ours, theirs = cm.read_meta(cm.find_last_complete(crash)), meta
    assert ours["loop_state"]["smooth_train_loss"] == theirs["loop_state"]["smooth_train_loss"]
    assert ours["val_bpb"] == theirs["val_bpb"]
    assert ours["approximate_resume"]["segment"] == 2  # the history stays on record

    # the planner: exact now, and it says where the run was once continued approximately
    from registry.resume import format_plan, plan_resume

    plan = plan_resume(crash)
    assert plan.mode == "exact" and plan.workbench_command is None
    assert plan.approximate_resume["from_step"] == FROM
    assert "segment 2 continued upstream's step 300 approximately" in format_plan(plan)

    # what the model saw: exact from the approximate segment on (it started from upstream's saved position)
    from nanochat.data_replay import ReplayError, step_batch

    batch = step_batch(crash, FROM)
    assert batch.restored_from == FROM
    sources = {(s.epoch, s.row_group) for mb in batch.micro_batches for s in mb.segments}
    assert min(sources) == (3, 3)  # its buffer filled from row group 3 of epoch 3 on: nothing upstream had read
    with pytest.raises(ReplayError, match="trained by upstream nanochat"):
        step_batch(crash, FROM - 1)


def test_a_one_process_upstream_run_continues_on_two_processes(base):
    """Upstream's optimizer files load onto any world size; each rank restarts at upstream's row group rule."""
    run = upstream_copy(base, "two")
    clean = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_FAULT_KILL_AFTER", "RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "scripts.base_train", "--", "--model-tag", "two", "--resume", "--allow-approximate", *FLAGS,
                          "--num-iterations", "302"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**clean, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train shard #0, row group 4 (rank 0), epoch 3" in res.stdout  # (2 // 2 + 1) * 2 + 0
    ckpt = cm.find_last_complete(run)
    assert ckpt.step == 302 and sorted(ckpt.optimizer_shards) == [0, 1] and cm.read_meta(ckpt)["world_size"] == 2


def test_the_planners_command_is_what_the_trainer_runs(base, capsys):
    """The planner (and both CLIs' --json) offer our command next to upstream's; run, it continues the run."""
    from registry.cli import main as registry_cli
    from tools import training_resume_helper as helper

    run = upstream_copy(base, "planned")
    assert helper.main([str(run), "--json", "--target-steps", "302"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "approximate" and "--fp8-recipe=tensorwise" in plan["command"]  # upstream's own, as before
    argv = plan["workbench_command_argv"]
    assert argv[:3] == ["python", "-m", "scripts.base_train"] and argv[-2:] == ["--resume-from-step=300",
                                                                                "--allow-approximate"]
    assert "--num-iterations=302" in argv and "--model-tag=planned" in argv
    assert plan["workbench_command_env"] == {"NANOCHAT_BASE_DIR": str(base.resolve())}
    assert "left out: fp8, fp8_recipe" in plan["workbench_note"]
    BASE_TRAIN.parse_args(argv[3:])  # every flag is one our trainer takes (argparse exits otherwise)
    assert registry_cli(["--db", str(base / "reg.sqlite"), "--json", "resume", str(run), "--target-steps", "302"]) == 0
    assert json.loads(capsys.readouterr().out)["workbench_command_argv"] == argv
    assert helper.main([str(run)]) == 0  # complete at its own 300 steps: the report still shows both commands
    text = capsys.readouterr().out
    assert "or with the workbench's trainer" in text and "--allow-approximate" in text

    res = train(base, *argv[3:], "--save-every", "2", "--eval-tokens", "2048")
    assert res.returncode == 0, res.stderr
    assert [c.step for c in cm.list_checkpoints(run)] == [FROM, 302]


# ---------------------------------------------------------------------- the data position rule


def stream_of(tmp_path: Path, row_groups: list[int], rank: int, world: int) -> DocumentStream:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for i, n in enumerate(row_groups):
        files.append(tmp_path / f"s{i}.parquet")
        pq.write_table(pa.table({"text": [f"doc {i}.{g}" for g in range(n)]}), files[-1], row_group_size=1)
    return DocumentStream(files, rank, world)


@pytest.mark.parametrize("saved, rank, world, where", [
    ({"pq_idx": 0, "rg_idx": 2, "epoch": 3}, 0, 1, (3, 0, 3)),  # the next row group of the same file
    ({"pq_idx": 0, "rg_idx": 2, "epoch": 3}, 1, 2, (3, 0, 5)),  # (2 // 2 + 1) * 2 + 1
    ({"pq_idx": 0, "rg_idx": 5, "epoch": 1}, 0, 1, (1, 1, 0)),  # past the end of file 0: file 1 from the start
    ({"pq_idx": 1, "rg_idx": 3, "epoch": 2}, 1, 2, (3, 0, 1)),  # past the last file: the next epoch
    ({"pq_idx": 7, "rg_idx": 0}, 0, 1, (2, 0, 0)),  # a shard that is gone (epoch 1 by default): upstream's next epoch
])
def test_upstream_position_resumes_as_upstream_does(tmp_path, saved, rank, world, where):
    stream = stream_of(tmp_path, [6, 4], rank, world)
    pos = stream.resume_upstream(saved)
    assert (pos["epoch"], pos["pq_idx"], pos["rg_idx"]) == where
    stream.next_texts()
    assert stream.last == dict(zip(("epoch", "pq_idx", "rg_idx"), where))


def test_a_garbled_upstream_position_is_one_clear_error(tmp_path):
    from nanochat.dataloader import DataError

    stream = stream_of(tmp_path, [2], 0, 1)
    for bad in ({"pq_idx": "0", "rg_idx": 1}, {"pq_idx": 0}, {"pq_idx": 0, "rg_idx": 1, "epoch": 0}, [0, 1]):
        with pytest.raises(DataError, match="upstream's saved data position"):
            stream.resume_upstream(bad)


# ---------------------------------------------------------------------- the app's Resume page


def test_resume_page_offers_our_command_and_shows_an_approximate_history(base, continued, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from registry import open_store

    upstream_copy(base, "fresh")
    with open_store(tmp_path / "r.sqlite") as store:
        store.scan(base)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(tmp_path / "r.sqlite"))
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)

    def page(run: str) -> AppTest:
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "streamlit_app" / "app.py"), default_timeout=60)
        at.run()
        at.switch_page("app_pages/resume.py")
        at.query_params["run"] = run
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        return at

    at = page("base/fresh")
    assert next(m for m in at.metric if m.label == "Resume").value.endswith("approximate")
    upstream_cmd, ours = (c.value for c in at.code)
    assert "--fp8-recipe" in upstream_cmd and "--allow-approximate" not in upstream_cmd
    assert ours.endswith("--model-tag=fresh --resume-from-step=300 --allow-approximate") and "--fp8" not in ours
    assert any("workbench's trainer" in m.value for m in at.markdown)
    at = page("base/ref")  # continued by our trainer: exact now, with the approximate segment on record
    assert next(m for m in at.metric if m.label == "Resume").value.endswith("exact")
    assert len(at.code) == 1 and "--allow-approximate" not in at.code[0].value
    assert any(i.value.startswith("Segment 2 continued upstream's step 300 approximately") for i in at.info)
    st.cache_data.clear()
    st.cache_resource.clear()
