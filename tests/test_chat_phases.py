"""Upstream's chat phases and other run-level facts (issue 11, items 4 and 5): a chat_rl checkpoint (meta with
only model_config, no optimizer) scans, verifies (quick and deep), loads and generates; what no script can
resume is `resumable: false` with a note, never a problem; an SFT run's planned command takes only flags
upstream's chat_sft accepts; `Infinity` in a meta reads everywhere; verify checks the run's tokenizer.

The checkpoints are upstream's own fixture files, laid out as the chat phases would lay them out.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine, SamplingSettings
from registry import open_store, verify
from registry.cli import main as cli
from registry.resume import plan_resume
from tests.modelkit import tiny_tokenizer

UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "upstream"
CURRENT = UPSTREAM / "current"
FLAGS = json.loads((UPSTREAM / "script_flags.json").read_text())


def chat_base(tmp_path: Path, phase_dir: str, meta: dict, optimizer: bool) -> Path:
    """<base>/<phase_dir>/d2 holding upstream's step-300 weights with `meta`, and upstream's tokenizer."""
    base = tmp_path / "base"
    shutil.copytree(CURRENT / "tokenizer", base / "tokenizer")
    run = base / phase_dir / "d2"
    run.mkdir(parents=True)
    src = CURRENT / "base_checkpoints" / "d2"
    shutil.copy(src / "model_000300.pt", run / "model_000300.pt")
    if optimizer:
        shutil.copy(src / "optim_000300_rank0.pt", run / "optim_000300_rank0.pt")
    (run / "meta_000300.json").write_text(json.dumps(meta, indent=2))
    return run


def upstream_meta() -> dict:
    return json.loads((CURRENT / "base_checkpoints" / "d2" / "meta_000300.json").read_text())


@pytest.fixture
def rl_run(tmp_path):
    """What upstream's chat_rl writes: model and a meta with only model_config (the step is in the names)."""
    return chat_base(tmp_path, "chatrl_checkpoints", {"model_config": upstream_meta()["model_config"]}, optimizer=False)


def test_chat_rl_checkpoint_scans_verifies_loads_and_generates(rl_run, tmp_path, capsys):
    db = str(tmp_path / "r.sqlite")
    with open_store(db) as store:
        report = store.scan(rl_run.parent.parent)
        assert report.problems == () and report.checkpoints_new == 1
        (ckpt,) = store.checkpoints("rl/d2")
        assert (ckpt.step, ckpt.complete, ckpt.problems, ckpt.resumable) == (300, True, (), False)
        assert "chat_rl saves no optimizer" in ckpt.resume_note
        for deep in (False, True):
            result = verify.verify(store, str(rl_run), deep=deep)
            assert result.with_problems == 0, [r.result.problems for r in result.results]
            assert result.results[0].state == ("verified" if deep else "quick_ok")
    assert cli(["--db", db, "verify", "--deep", "--no-progress", str(rl_run)]) == 0
    capsys.readouterr()

    ref = json.loads((CURRENT / "reference_generation.json").read_text())
    loaded = load_model(rl_run)
    assert loaded.checkpoint.step == 300 and loaded.phase == "rl"
    result = Engine(loaded.model, loaded.tokenizer).generate(ref["prompt_token_ids"], SamplingSettings(temperature=0),
                                                             ref["max_tokens"])[0]
    assert list(result.token_ids) == ref["generated_token_ids"]  # upstream's weights, upstream's tokens

    plan = plan_resume(rl_run)
    assert (plan.mode, plan.command, plan.step) == ("unsupported", None, 300)
    assert "cannot be resumed: upstream's chat_rl saves no optimizer" in plan.mode_note
    assert cli(["--db", db, "resume", str(rl_run)]) == 3
    assert "command: none" in capsys.readouterr().out


def test_sft_command_takes_only_flags_upstreams_chat_sft_accepts(tmp_path):
    # chat_sft records vars(args): its own flags, unset inherited ones as null, and warmup_ratio (no warmup_steps)
    user = {"run": "sft1", "device_type": "cpu", "model_tag": None, "model_step": None, "load_optimizer": 1,
            "num_iterations": 40, "max_seq_len": None, "device_batch_size": 4, "total_batch_size": None,
            "embedding_lr": None, "unembedding_lr": None, "matrix_lr": None, "init_lr_frac": 0.8, "warmup_ratio": 0.0,
            "warmdown_ratio": 0.5, "final_lr_frac": 0.0, "eval_every": 20, "eval_tokens": 4096, "chatcore_every": -1,
            "chatcore_max_cat": -1, "chatcore_max_sample": 24, "mmlu_epochs": 3, "gsm8k_epochs": 4,
            "depth": 2}  # a key chat_sft does not take (a hand-edited meta): left out, not passed to be refused
    meta = {"step": 300, "val_bpb": 1.9, "model_config": upstream_meta()["model_config"], "user_config": user}
    plan = plan_resume(chat_base(tmp_path, "chatsft_checkpoints", meta, optimizer=True))
    assert plan.mode == "restart" and plan.script == "scripts.chat_sft"
    argv = list(plan.command_argv)
    flags = [a.split("=")[0] for a in argv[argv.index("scripts.chat_sft") + 1:]]
    assert flags and set(flags) <= set(FLAGS["scripts.chat_sft"]), set(flags) - set(FLAGS["scripts.chat_sft"])
    assert "--device-type=cpu" in argv and "--warmup-ratio=0.0" in argv and "--num-iterations=40" in argv
    assert not any(a.startswith("--device_type") or a.startswith("--depth") for a in argv)


def test_the_chat_flag_tables_are_upstreams():
    from nanochat.train_config import CHAT_RL, CHAT_SFT

    for trainer in (CHAT_SFT, CHAT_RL):
        assert [f.option_strings[0] for f in trainer.flags] == FLAGS[trainer.script]


def test_classic_and_single_file_checkpoints_are_not_resumable_by_one_rule(tmp_path, capsys):
    classic = tmp_path / "classic"
    shutil.copytree(UPSTREAM / "classic", classic)
    db = str(tmp_path / "r.sqlite")
    assert cli(["--db", db, "--json", "scan", str(classic)]) == 0
    capsys.readouterr()
    assert cli(["--db", db, "--json", "checkpoints", "d2"]) == 0
    (ckpt,) = json.loads(capsys.readouterr().out)
    assert ckpt["resumable"] is False and ckpt["state"] == "unchecked" and "classic nanochat" in ckpt["resume_note"]
    assert cli(["--db", db, "show", "d2@300"]) == 0
    assert "not resumable: classic nanochat" in capsys.readouterr().out
    assert cli(["--db", db, "resume", "d2"]) == 3
    assert "unsupported: classic nanochat" in capsys.readouterr().out


def test_infinity_in_a_meta_reads_everywhere(store_url, tmp_path, capsys):
    """Upstream with --eval-every=-1 writes min_val_bpb as Infinity: strict JSON (PostgreSQL's json, --json
    consumers) has no such token."""
    meta = upstream_meta()
    meta["val_bpb"] = None
    meta["loop_state"]["min_val_bpb"] = float("inf")
    run = chat_base(tmp_path, "base_checkpoints", meta, optimizer=True)
    assert "Infinity" in (run / "meta_000300.json").read_text()
    assert cli(["--db", store_url, "scan", str(run.parent.parent), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["--db", store_url, "--json", "show", "d2@300"]) == 0
    shown = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert shown["meta"]["loop_state"]["min_val_bpb"] is None and shown["checkpoint"]["problems"] == []
    plan = plan_resume(run)
    assert plan.mode == "approximate" and plan.step == 300


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("case, code", [("missing", "missing_tokenizer"), ("malicious", "bad_tokenizer"),
                                        ("garbled", "bad_tokenizer"), ("other vocab", "vocab_mismatch")])
def test_verify_checks_the_tokenizer_the_run_needs(tmp_path, monkeypatch, case, code):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    run = chat_base(tmp_path, "base_checkpoints", upstream_meta(), optimizer=True)
    tok = run.parent.parent / "tokenizer"
    if case == "missing":
        shutil.rmtree(tok)
    elif case == "malicious":
        (tok / "tokenizer.pkl").write_bytes(pickle.dumps(_Boom()))
    elif case == "garbled":
        (tok / "tokenizer.pkl").write_bytes(b"\x80\x04not a pickle")
    else:  # a tokenizer of 300 tokens beside a model of 2048
        shutil.rmtree(tok)
        tiny_tokenizer(300).save(tok)
    with open_store(tmp_path / "r.sqlite") as store:
        for deep in (False, True):
            report = verify.verify(store, str(run), deep=deep)
            assert report.codes == {code: 1}, report.codes
            (problem,) = report.results[0].result.problems
            assert problem.blocks == "load" and "\n" not in problem.message


# ---------------------------------------------------------------------- the resume planner's smaller fixes


def test_a_checkpoint_file_plans_from_that_checkpoint(tmp_path, capsys):
    from tests.test_resume import save_step
    from tools import training_resume_helper as helper

    run = tmp_path / "base" / "base_checkpoints" / "d2"
    for step in (10, 20):
        save_step(run, step, 3.0 - step / 100, seed=step)
    assert helper.main([str(run / "model_000010.pt"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["step"] == 10 and "--resume-from-step=10" in plan["command"]
    assert helper.main([str(run), "--json"]) == 0  # a folder: its newest good step
    assert json.loads(capsys.readouterr().out)["step"] == 20
    (run / "optim_000010_rank0.pt").unlink()  # the one asked for cannot resume: said so, no other step taken
    assert helper.main([str(run / "meta_000010.json")]) == 3
    assert "missing_optimizer_shard" in capsys.readouterr().err


def test_target_steps_on_a_run_nothing_resumes_speaks_of_no_command(tmp_path):
    classic = tmp_path / "classic"
    shutil.copytree(UPSTREAM / "classic", classic)
    plan = plan_resume(classic / "base_checkpoints" / "d2", target_steps=600)
    assert plan.command is None and plan.mode == "unsupported"
    assert not any("command" in w or "--target-steps" in w for w in plan.warnings), plan.warnings


def test_step_time_leaves_out_the_compile_after_each_start():
    from registry.resume import steady_step_times

    first = [(s, 1, 900.0 if s < 10 else 40.0) for s in range(0, 60)]
    resumed = [(s, 2, 12_000.0 if s < 50 else 41.0) for s in range(40, 80)]  # upstream resumed at 40: a compile
    times = steady_step_times(first + resumed)
    assert set(times) == {40.0, 41.0} and len(times) == 50 + 30


def test_planner_step_time_after_an_upstream_resume_is_the_steady_rate(tmp_path):
    from registry.resume import _step_time

    rows = [{"step": s, "segment": 1, "dt_ms": 900.0 if s < 10 else 40.0} for s in range(60)]
    rows += [{"step": s, "segment": 2, "dt_ms": 12_000.0 if s < 50 else 41.0} for s in range(40, 80)]
    seconds, source = _step_time({}, rows, 79)
    assert seconds == pytest.approx(0.041) and "steady" in source
    meta = {"loop_state": {"total_training_time": 400.0}, "user_config": {"resume_from_step": 200}}
    assert "includes the compile of the resume" in _step_time(meta, [], 300)[1]
