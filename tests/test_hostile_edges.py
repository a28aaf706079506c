"""Hostile and broken input at the edges (issue 16, items 5, 8, 9, 10, 12, 13, 14): special files where a
checkpoint file should be, numbers too large for SQL in references, a read-only registry, impossible
devices, bad flags for the demo, the tokenizer trainer and base_train, and refusal messages that say what
is wrong in one line. Each case is a promise from the README's "Bad input" notes: one line, the documented
exit code, nothing stored changed. (The scanner's own hostile trees and the fuzz test: tests/test_hostile.py.)"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from registry import cli
from tests.registry_kit import base_tree

ROOT = Path(__file__).resolve().parent.parent
HUGE = "99999999999999999999"  # > 2**63: no SQL integer holds it


def call(capsys, *argv):
    """cli.main in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def dump(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(con.iterdump())
    finally:
        con.close()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A scanned base dir (base/d1 steps 10, 20 with metrics; sft/d1 step 5) and its registry."""
    base = tmp_path_factory.mktemp("indexed") / "base"
    base_tree(base)
    db = base / "registry.sqlite"
    assert cli.main(["--db", str(db), "scan", str(base), "--no-progress"]) == 0
    return base, db


# ---------------------------------------------------------------------- 9: integers too large for SQL


def test_huge_integers_in_references_are_refused_and_change_nothing(indexed, capsys):
    base, db = indexed
    log = base / "train.log"
    log.write_text("step 00001/00300 (0.33%) | loss: 7.62 | lrm: 1.0\n")
    before = dump(db)
    cases = [
        (("checkpoints", HUGE), f"no run '{HUGE}'"),
        (("show", f"{HUGE}@latest"), f"no run '{HUGE}'"),
        (("history", HUGE), f"no run '{HUGE}'"),
        (("resume", HUGE), f"no run '{HUGE}'"),
        (("import-log", log, "--run", "base/d1", "--segment", HUGE), "segment must be a positive integer up to 2147483647"),
        (("import-log", log, "--run", "base/d1", "--segment", "0"), "segment must be a positive integer"),
    ]
    for argv, message in cases:
        code, out, err = call(capsys, "--db", db, *argv)
        assert code == 1 and out == "", (argv, out)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert dump(db) == before


def test_log_lines_with_huge_steps_are_malformed_not_fatal(indexed, capsys, tmp_path):
    base, db = indexed
    copy = tmp_path / "r.sqlite"
    copy.write_bytes(db.read_bytes())
    log = tmp_path / "train.log"
    log.write_text("step 00001/00300 (0.33%) | loss: 7.62 | lrm: 1.0\n"
                   f"step {HUGE}/00300 (0.33%) | loss: 7.62\n"
                   "Step 99999999999 | Validation bpb: 2.4\n")
    code, out, err = call(capsys, "--db", copy, "import-log", log, "--run", "base/d1")
    assert code == 0, err
    assert "2 malformed" in out and "out of range" in out


# ---------------------------------------------------------------------- 14: a registry in a read-only folder


def as_reader(argv: list[str], folder: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command for which `folder` is read-only. Its permissions say so (chmod by read_only_copy), but
    root writes anything: under root the command runs in its own mount namespace with `folder` bind-mounted
    read-only (what a read-only share looks like to root), or the test skips."""
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("root ignores file permissions and `unshare -m` is not available to mount a folder read-only")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *argv]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def main_calls(calls: list[list[str]], folder: Path | None = None, module: str = "registry.cli",
               timeout: float = 240) -> list[tuple[int, str, str]]:
    """`module.main(ARGV)` for each ARGV in one subprocess (one interpreter start, not one per call; a call
    that blocks fails the test at `timeout` instead of hanging it), for which `folder`, if given, is
    read-only: [(exit code, stdout, stderr)]. A call is [module, *argv] when module is None."""
    script = ("import contextlib, importlib, io, json, sys\n"
              "out = []\n"
              "for call in json.loads(sys.argv[2]):\n"
              "    module, argv = (sys.argv[1], call) if sys.argv[1] else (call[0], call[1:])\n"
              "    o, e = io.StringIO(), io.StringIO()\n"
              "    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):\n"
              "        try:\n"
              "            code = importlib.import_module(module).main(argv)\n"
              "        except SystemExit as x:\n"
              "            code = x.code\n"
              "    out.append((code, o.getvalue(), e.getvalue()))\n"
              "print(json.dumps(out))\n")
    argv = [sys.executable, "-c", script, module or "", json.dumps(calls)]
    if folder is None:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    else:
        p = as_reader(argv, folder, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return [tuple(r) for r in json.loads(p.stdout)]


def cli_calls(calls: list[list[str]], db: Path, folder: Path) -> list[tuple[int, str, str]]:
    """`python -m registry --db db ARGV` for each ARGV, in one process for which `folder` is read-only."""
    return main_calls([["--db", str(db), *argv] for argv in calls], folder)


def read_only_copy(db: Path, folder: Path, wal_edit: str | None = None) -> Path:
    """`db` copied into `folder`, both then read-only. wal_edit: a committed change left in the -wal file
    (the copy is taken while a connection that never checkpoints holds it open)."""
    target = folder / "registry.sqlite"
    target.write_bytes(db.read_bytes())
    if wal_edit:
        con = sqlite3.connect(target)
        con.execute("PRAGMA wal_autocheckpoint = 0")
        con.execute(wal_edit)
        con.commit()
        held = {p.name: p.read_bytes() for p in folder.glob("registry.sqlite*")}
        con.close()
        for name, data in held.items():
            (folder / name).write_bytes(data)
        assert (folder / "registry.sqlite-wal").stat().st_size > 0
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    return target


@pytest.mark.parametrize("wal", [False, True], ids=["clean", "commits-in-wal"])
def test_read_commands_work_on_a_registry_in_a_read_only_folder(indexed, tmp_path, wal):
    _, db = indexed
    folder = tmp_path / "ro"
    folder.mkdir()
    ro = read_only_copy(db, folder, "UPDATE runs SET tag = 'walonly' WHERE phase = 'sft'" if wal else None)
    base, _ = indexed
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = [["summary"], ["runs"], ["checkpoints", "base/d1"], ["history", "base/d1"], ["show", "base/d1@20"],
             ["best", "base/d1"], ["diff", "base/d1", "base/d1@10"], ["--json", "runs"], ["scan", str(base)]]
    results = cli_calls(calls, ro, folder)
    for argv, (code, _, err) in zip(calls[:-1], results):
        assert code == 0 and err == "", (argv, err)
    assert "read-only: registry.sqlite is not writable" in results[0][1].splitlines()[0]
    assert ("sft/walonly" in results[-2][1]) == wal  # a commit still in the WAL file is read, not hidden by immutable=1
    code, _, err = results[-1]
    assert code == 1 and err.count("\n") == 1 and "is read-only" in err and "reading works" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_app_browses_a_read_only_registry(indexed, tmp_path):
    _, db = indexed
    folder = tmp_path / "ro"
    folder.mkdir()
    ro = read_only_copy(db, folder)
    script = ("from streamlit.testing.v1 import AppTest\n"
              "at = AppTest.from_file('streamlit_app/app.py', default_timeout=60)\n"
              "at.run()\n"
              "print('exceptions', len(at.exception), 'errors', [e.value for e in at.error])\n"
              "print('captions', [c.value for c in at.caption])\n")
    p = as_reader([sys.executable, "-c", script], folder, env={"NANOCHAT_REGISTRY_URL": str(ro)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exceptions 0 errors []" in p.stdout, p.stdout
    assert "Read-only registry (registry.sqlite is not writable)" in p.stdout


# ---------------------------------------------------------------------- 12: devices the explorer cannot use


@pytest.fixture(scope="module")
def explorer_run(tmp_path_factory) -> Path:
    """A base run (step 12 of a tiny random GPT) with its tokenizer beside it."""
    from nanochat.gpt import GPTConfig
    from tests.modelkit import random_model, tiny_tokenizer, write_checkpoint

    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    run_dir = tmp_path_factory.mktemp("explorer") / "base_checkpoints" / "tiny"
    return write_checkpoint(run_dir, random_model(config, seed=1), step=12, tokenizer=tiny_tokenizer(300))


@pytest.mark.parametrize("device", ["meta", "mps", "cpu:3", "xla", "cuda:99", "vulkan"])
def test_explorer_says_a_device_is_unavailable_not_that_the_file_is_corrupt(explorer_run, device, capsys):
    from tools import generation_explorer

    code = generation_explorer.main(["--checkpoint", str(explorer_run), "--prompt", "To be", "--device", device])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: --device {device}") and err.count("\n") == 1, err
    assert "cannot be read" not in err and "corrupt" not in err


# ---------------------------------------------------------------------- 13: the demo's and tok_train's flags


def test_demo_refuses_a_file_or_an_unwritable_base_dir_in_one_line(tmp_path, capsys):
    from scripts import demo

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    for base in (a_file, a_file / "below"):
        assert demo.main(["--base-dir", str(base), "--profile", "test"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(a_file) in err, err
    assert a_file.read_text() == "not a folder\n"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for base in (folder, folder / "demo"):
        p = as_reader([sys.executable, "-m", "scripts.demo", "--base-dir", str(base), "--profile", "test"], folder)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--vocab-size", "99999999999"], "vocab_size must be from 265 to 1,048,576, got 99999999999"),
    (["--vocab-size", "-5"], "vocab_size must be from 265"),
    (["--doc-cap", "0"], "--doc-cap must be at least 1"),
    (["--max-chars", "-1"], "--max-chars must be at least 1"),
])
def test_tok_train_refuses_impossible_flags_before_reading_data(argv, message, tmp_path, monkeypatch, capsys):
    from scripts import tok_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # no data there: the flags must fail first
    assert tok_train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------- 10: refusal and problem messages


def test_nonfinite_message_says_the_total_and_each_tensors_own_count(explorer_run):
    import torch

    from nanochat import checkpoint_manager as cm
    from registry import integrity

    path = explorer_run / "model_000012.pt"
    state = torch.load(path, weights_only=True)
    state["backout_lambda"].fill_(float("nan"))  # one element
    state["transformer.wte.weight"][:10].fill_(float("inf"))  # 10 x 32
    state["lm_head.weight"][:3].fill_(float("nan"))  # 3 x 32
    state["smear_lambda"].fill_(float("nan"))
    broken = explorer_run.parent / "nan" / "model_000012.pt"
    broken.parent.mkdir()
    shutil.copy(explorer_run / "meta_000012.json", broken.parent)
    torch.save(state, broken)
    [message] = [p.message for p in integrity.deep_check(cm.list_checkpoints(broken.parent)[0]).problems
                 if p.code == "nonfinite_weights"]
    assert message == ("model_000012.pt: 418 NaN/Inf value(s) in 4 tensors: transformer.wte.weight (320), "
                       "lm_head.weight (96), backout_lambda (1) (+1 more)")


# ---------------------------------------------------------------------- 5: special files named like checkpoint files


@pytest.fixture(scope="module")
def fifo_run(tmp_path_factory) -> Path:
    """<base>/base_checkpoints/tiny with steps 8, 12 and 16 of a tiny GPT (tokenizer beside them), where
    meta_000012.json, model_000016.pt and metrics.jsonl are FIFOs: opening one for reading waits for a
    writer forever."""
    from nanochat.gpt import GPTConfig
    from tests.modelkit import random_model, tiny_tokenizer, write_checkpoint

    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    run_dir = tmp_path_factory.mktemp("fifo") / "base_checkpoints" / "tiny"
    for step in (8, 12, 16):
        write_checkpoint(run_dir, random_model(config, seed=step), step=step, tokenizer=tiny_tokenizer(300))
    for name in ("meta_000012.json", "model_000016.pt", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
        os.mkfifo(run_dir / name)
    return run_dir


def test_a_fifo_named_like_a_meta_is_reported_never_waited_on(fifo_run, tmp_path):
    db = str(tmp_path / "r.sqlite")
    d = str(fifo_run)
    calls = [["registry.cli", "--db", db, "verify", d, "--no-progress"],
             ["registry.cli", "--db", db, "verify", d, "--no-progress", "--deep"],
             ["registry.cli", "--db", db, "resume", d],
             ["tools.training_resume_helper", d],
             ["tools.training_resume_helper", d, "--verify"],
             ["tools.generation_explorer", "--checkpoint", d, "--prompt", "To be", "--max-tokens", "2"],
             ["tools.generation_explorer", "--checkpoint", d, "--step", "12", "--prompt", "To be"]]
    (quick, deep, resume, helper, helper_verify, explore, explore_12) = main_calls(calls, module=None)
    for code, out, err in (quick, deep):
        assert code == 3 and err == "", err
        assert "unreadable: cannot read meta_000012.json: not a regular file (a FIFO)" in out
        assert "unreadable: model_000016.pt: not a regular file (a FIFO)" in out
        assert "1 passed, 2 with problems" in out
    for code, out, err in (resume, helper, helper_verify):
        assert code == 0 and "--resume-from-step=8" in out, (out, err)
    code, out, err = explore
    assert code == 0 and "(step 8," in out, err
    code, out, err = explore_12
    assert code == 1 and err.count("\n") == 1 and "not a regular file (a FIFO)" in err, err


@pytest.fixture(scope="module")
def hostile_files(explorer_run, tmp_path_factory) -> dict[str, Path]:
    """A model, an optimizer shard and a training state whose pickles call os.system when unpickled, a model
    whose pickle is garbage inside an intact zip, and a file that is not a zip at all."""
    import io
    import zipfile

    import torch

    from tests.modelkit import touch_payload

    d = tmp_path_factory.mktemp("hostile")
    marker = d / "PWNED"
    state = torch.load(explorer_run / "model_000012.pt", weights_only=True)
    files = {"model": d / "model_000012.pt", "optim": d / "optim_000012_rank0.pt", "trainstate": d / "trainstate_000012_rank0.pt"}
    torch.save({**state, "evil": touch_payload(marker)}, files["model"])
    torch.save({"state": {0: touch_payload(marker)}, "param_groups": []}, files["optim"])
    torch.save({"torch_rng": touch_payload(marker)}, files["trainstate"])
    buf = io.BytesIO()
    with zipfile.ZipFile(explorer_run / "model_000012.pt") as zin, zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else zin.read(info))
    files["malformed"] = d / "malformed" / "model_000012.pt"
    files["malformed"].parent.mkdir()
    files["malformed"].write_bytes(buf.getvalue())
    shutil.copy(explorer_run / "meta_000012.json", files["malformed"].parent)
    files["not_zip"] = d / "not_zip.pt"
    files["not_zip"].write_bytes(b"not a zip archive at all" * 100)
    files["marker"] = marker
    return files


ADVICE = ("weights_only", "Re-running", "will likely succeed", "miniz", "trusted source")


@pytest.mark.parametrize("name, code, says", [
    ("model", "unsafe_pickle", "model_000012.pt references code, not just tensors: posix.system (not executed); the file is refused"),
    ("optim", "unsafe_pickle", "optim_000012_rank0.pt references code, not just tensors: posix.system (not executed); the file is refused"),
    ("trainstate", "unsafe_pickle", "trainstate_000012_rank0.pt references code, not just tensors: posix.system"),
    ("malformed", "bad_pickle", "model_000012.pt: pickle is malformed"),
    ("not_zip", "truncated", "not_zip.pt has no zip central directory"),
])
def test_torch_load_refusals_say_what_is_wrong_in_our_words(hostile_files, name, code, says):
    """Every torch.load of the project goes through checkpoint_manager.torch_load (the explorer, the app,
    base_train's resume, the deep check): its refusal is one line, names what is wrong, and never passes on
    torch's advice to retry with weights_only=False (or cuts it mid-sentence)."""
    from nanochat import checkpoint_manager as cm

    with pytest.raises(cm.CheckpointError) as e:
        cm.torch_load(hostile_files[name])
    message = str(e.value)
    assert e.value.code == code and says in message and "\n" not in message, message
    assert not any(a in message for a in ADVICE), message
    assert message.count(hostile_files[name].name) == 1, message  # the file named once
    assert not hostile_files["marker"].exists()


def test_explorer_and_app_refuse_a_malicious_model_in_one_line(hostile_files, explorer_run, tmp_path, capsys):
    from streamlit_app import data
    from tools import generation_explorer

    capsys.readouterr()  # streamlit's warnings at import
    run = tmp_path / "base_checkpoints" / "tiny"
    shutil.copytree(explorer_run, run)
    shutil.copytree(explorer_run.parent.parent / "tokenizer", tmp_path / "tokenizer")
    shutil.copy(hostile_files["model"], run / "model_000012.pt")
    assert generation_explorer.main(["--checkpoint", str(run), "--prompt", "To be"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "posix.system" in err, err
    assert not any(a in err for a in ADVICE), err
    from nanochat.checkpoint_manager import CheckpointError

    with pytest.raises(CheckpointError) as e:
        data.model(str(run), 12, ("malicious",))
    assert "posix.system" in str(e.value) and not any(a in str(e.value) for a in ADVICE)
    assert not hostile_files["marker"].exists()


def test_problem_messages_name_their_file_once(hostile_files):
    """`bad_pickle: model_000012.pt: model_000012.pt: pickle is malformed` said the name twice."""
    from nanochat import checkpoint_manager as cm
    from registry import integrity

    for ckpt in cm.list_checkpoints(hostile_files["malformed"].parent):
        for result in (integrity.quick_check(ckpt), integrity.deep_check(ckpt)):
            assert result.problems
            for p in result.problems:
                assert p.message.count("model_000012.pt") <= 1, p.message


def test_a_malicious_token_bytes_is_refused_in_one_line(tmp_path):
    """base_train --resume reads token_bytes.pt through the tokenizer: torch-free, nothing executed."""
    import torch

    from nanochat.tokenizer import Tokenizer, TokenizerError
    from tests.modelkit import tiny_tokenizer, touch_payload

    tiny_tokenizer(300).save(tmp_path)
    torch.save(touch_payload(tmp_path / "PWNED"), tmp_path / "token_bytes.pt")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_directory(tmp_path).token_bytes()
    assert "token_bytes.pt" in str(e.value) and "posix.system" in str(e.value) and "\n" not in str(e.value)
    assert not any(a in str(e.value) for a in ADVICE) and not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------- 8: base_train's flags (nanochat/train_config.py)


@pytest.mark.parametrize("argv, says", [
    (["--matrix-lr", "nan"], "argument --matrix-lr: must be a finite number, got nan"),
    (["--embedding-lr", "inf"], "argument --embedding-lr: must be a finite number, got inf"),
    (["--scalar-lr", "-0.1"], "argument --scalar-lr: must be at least 0, got -0.1"),
    (["--num-iterations", "0"], "argument --num-iterations: must be -1 or at least 1, got 0"),
    (["--target-flops", "0"], "argument --target-flops: must be -1 or above 0, got 0.0"),
    (["--warmup-steps", "-5"], "argument --warmup-steps: must be at least 0, got -5"),
    (["--warmdown-ratio", "2"], "argument --warmdown-ratio: must be from 0 to 1, got 2.0"),
    (["--model-tag", "../../escaped"], "argument --model-tag: must be a name (one folder under base_checkpoints/), not a path"),
    (["--model-tag", "/tmp/elsewhere"], "argument --model-tag: must be a name"),
    (["--device", "tpu"], "argument --device-type/--device: invalid choice: 'tpu'"),
    (["--compile", "maybe"], "argument --compile: invalid choice: 'maybe'"),
    (["--no-such-flag", "3"], "unrecognized arguments: --no-such-flag 3"),
])
def test_base_train_refuses_nonsense_flags_in_one_line(argv, says, tmp_path, monkeypatch, capsys):
    from scripts import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        base_train.main(["--depth", "1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_every_trainer_checks_the_flag_table_also_for_values_a_checkpoint_gives():
    from nanochat.train_config import BASE_TRAIN

    saved = {"matrix_lr": float("nan"), "warmup_steps": -3, "model_tag": "../up", "depth": 4, "num_iterations": -1}
    assert BASE_TRAIN.problems(saved) == ["--matrix-lr must be a finite number, got nan",
                                          "--warmup-steps must be at least 0, got -3",
                                          "--model-tag must be a name (one folder under base_checkpoints/), not a path: '../up'"]
    assert BASE_TRAIN.problems(BASE_TRAIN.defaults()) == []


@pytest.fixture(scope="module")
def training_base(tmp_path_factory) -> Path:
    from tests.modelkit import write_training_base

    return write_training_base(tmp_path_factory.mktemp("train_base"), limit_chars=200_000, vocab_size=300)


def test_base_train_estimates_memory_before_building_a_huge_model(training_base, monkeypatch, capsys):
    from scripts import base_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(training_base))
    code = base_train.main(["--depth", "100000", "--device", "cpu", "--num-iterations", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "needs at least" in err and "GiB for its weights, gradients and optimizer state alone, more than the " \
        "machine's RAM" in err and "lower --depth" in err
    assert not (training_base / "base_checkpoints").exists()
