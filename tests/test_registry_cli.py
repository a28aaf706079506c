"""`python -m registry`: every subcommand in table and --json form (same data), global options before
or after the subcommand, one-line errors with exit code 1 and no traceback, --help, and the README
documenting every subcommand and flag (datasette's test_docs idea)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from registry import cli
from registry import db as regdb
from registry.entities import CHECKPOINT_STATES
from tests.registry_kit import append_metrics, base_tree, make_checkpoint, train_lines

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
INTEGRITY_COMMANDS = {"verify", "resume"}  # documented in the README's integrity section


def run_cli(*argv, db=None):
    """The real entry point in a subprocess: (exit code, stdout, stderr)."""
    args = [sys.executable, "-m", "registry", *(["--db", str(db)] if db else []), *map(str, argv)]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def call(capsys, *argv):
    """cli.main in this process (fast): (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tree(tmp_path):
    runs = base_tree(tmp_path / "base")
    make_checkpoint(runs["base"], 30, val_bpb=2.0, num_iterations=30)
    return runs


def test_subprocess_scan_and_query(tree, store_url, tmp_path):
    code, out, err = run_cli("scan", tmp_path / "base", "--no-progress", db=store_url)
    assert code == 0, err
    assert "runs: 2 found, 2 new" in out and "checkpoints: 4 found, 4 new" in out
    code, out, err = run_cli("runs", "--json", db=store_url)  # --json after the subcommand
    assert code == 0 and err == ""
    runs = json.loads(out)
    assert {r["label"] for r in runs} == {"base/d1", "sft/d1"}
    base = next(r for r in runs if r["label"] == "base/d1")
    # base/d1 has a metrics.jsonl: its val_bpb history (and best) come from there, evaluated up to step 20
    assert (base["latest_step"], base["num_iterations"], base["best_val_bpb"], base["progress"]) == (30, 30, 2.98, 1.0)
    assert base["status"] == "finished" and base["last_update"].endswith("+00:00")


def test_every_command_table_and_json(tree, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    code, out, _ = call(capsys, "--db", db, "--json", "scan", tmp_path / "base", "--no-progress")
    report = json.loads(out)
    assert code == 0 and report["checkpoints_new"] == 4 and report["status"] == "ok" and report["problems"] == []

    code, out, _ = call(capsys, "--db", db, "runs")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["id", "run", "status", "depth"]
    assert "base/d1" in out and "30/30" in out and "2.9800@20" in out
    code, out, _ = call(capsys, "--db", db, "runs", "--where", "phase=sft", "--json")
    assert [r["label"] for r in json.loads(out)] == ["sft/d1"]

    code, out, _ = call(capsys, "--db", db, "checkpoints", "base/d1")
    assert code == 0 and len(out.strip().splitlines()) == 2 + 3 and CHECKPOINT_STATES["unchecked"] in out
    code, out, _ = call(capsys, "--db", db, "--json", "checkpoints", "base/d1")
    ckpts = json.loads(out)
    assert [c["step"] for c in ckpts] == [10, 20, 30] and ckpts[0]["label"] == "base/d1@10"
    assert [c["state"] for c in ckpts] == ["unchecked"] * 3  # the words the app uses (registry.entities)
    assert set(ckpts[0]) >= {"id", "run_id", "val_bpb", "complete", "resumable", "missing", "problems", "size_bytes",
                             "latest_integrity", "segment", "layout"}

    code, out, _ = call(capsys, "--db", db, "show", "base/d1@20")
    assert code == 0 and "model_000020.pt" in out and '"step": 20' in out
    code, out, _ = call(capsys, "--db", db, "show", "base/d1@best", "--json")
    detail = json.loads(out)
    assert detail["checkpoint"]["step"] == 30 and detail["meta"]["val_bpb"] == 2.0 and len(detail["files"]) == 3
    assert detail["run"]["label"] == "base/d1" and detail["integrity"] == []

    code, out, _ = call(capsys, "--db", db, "history", "base/d1", "--key", "train_loss", "--max-points", "12")
    assert code == 0 and "train_loss: 6 of 21 points (downsampled)" in out  # 3 blocks of 8 steps: min and max each
    code, out, _ = call(capsys, "--db", db, "history", "base/d1", "--key", "val_bpb", "--json")
    [series] = json.loads(out)
    assert series["key"] == "val_bpb" and [p["step"] for p in series["points"]] == [0, 10, 20]
    assert set(series["points"][0]) == {"step", "value", "segment", "wall_time"} and series["total_points"] == 3
    code, out, _ = call(capsys, "--db", db, "history", "sft/d1", "--from", "0", "--to", "10", "--json")
    assert [p["value"] for p in json.loads(out)[0]["points"]] == [1.9]

    code, out, _ = call(capsys, "--db", db, "best", "base/d1")
    assert code == 0 and out.startswith("base/d1@30 (id ") and "val_bpb = 2.000000" in out
    code, out, _ = call(capsys, "--db", db, "best", "base/d1", "--metric", "tok_per_sec", "--max", "--json")
    best = json.loads(out)
    assert (best["metric"], best["mode"], best["value"], best["checkpoint"]["step"]) == ("tok_per_sec", "max", 1020.0, 20)

    code, out, _ = call(capsys, "--db", db, "diff", "base/d1", "sft/d1")
    assert code == 0 and "num_iterations" in out and "model_config.n_layer" not in out
    code, out, _ = call(capsys, "--db", db, "diff", "base/d1", "sft/d1", "--all", "--json")
    d = json.loads(out)
    assert {r["key"]: r["status"] for r in d["rows"]}["model_config.n_layer"] == "same" and d["a"] == "base/d1"
    code, out, _ = call(capsys, "--db", db, "diff", "base/d1@10", "base/d1@20", "--json")
    assert {r["key"] for r in json.loads(out)["rows"]} == {"step", "val_bpb"}

    code, out, _ = call(capsys, "--db", db, "summary")
    assert code == 0 and "runs: 2" in out and "checkpoints: 4 on disk" in out
    code, out, _ = call(capsys, "--db", db, "summary", "--json")
    assert json.loads(out)["checkpoints"] == 4

    code, out, _ = call(capsys, "--db", db, "migrate")
    assert code == 0 and f"already at schema version {regdb.SCHEMA_VERSION}" in out
    code, out, _ = call(capsys, "--db", db, "migrate", "--json")
    assert json.loads(out) == {"from_version": regdb.SCHEMA_VERSION, "to_version": regdb.SCHEMA_VERSION, "backup": None}


def test_import_log_command(tree, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    call(capsys, "--db", db, "scan", tmp_path / "base", "--no-progress")
    log = tmp_path / "train.log"
    log.write_text("step 00001/00050 (2.00%) | loss: 7.5 | lrm: 0.1 | dt: 10.00ms | tok/sec: 1,000 | epoch: 1\n"
                   "step 00002/000\nStep 00001 | Validation bpb: 3.1\n")
    code, out, err = call(capsys, "--db", db, "import-log", log, "--run", "sft/d1", "--segment", "2")
    assert code == 0 and "points: 5 new, 0 already present" in out and "ignored fields: epoch" in out
    assert err == f"warning: 1 malformed line(s) in {log} were skipped\n"
    code, out, _ = call(capsys, "--db", db, "--json", "import-log", log, "--run", "sft/d1", "--segment", "2")
    r = json.loads(out)
    assert (r["points_new"], r["points_existing"], r["malformed"], r["malformed_examples"][0][0]) == (0, 5, 1, 2)


def test_errors_are_one_line_without_traceback(tree, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    call(capsys, "--db", db, "scan", tmp_path / "base", "--no-progress")
    (tmp_path / "empty").mkdir()
    foreign = tmp_path / "other.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    cases = [
        (("--db", db, "scan", tmp_path / "nope"), "does not exist"),
        (("--db", db, "scan", tmp_path / "empty"), "no checkpoints under"),
        (("--db", db, "checkpoints", "d1"), "'d1' matches 2 runs"),
        (("--db", db, "history", "d9"), "no run 'd9' in the registry"),
        (("--db", db, "history", "base/d1", "--key", "nope"), "has no metric 'nope'"),
        (("--db", db, "history", "base/d1", "--max-points", "0"), "--max-points must be at least 1"),
        (("--db", db, "runs", "--where", "depth"), "--where needs KEY=VALUE"),
        (("--db", db, "show", "base/d1@99"), "has no checkpoint at step 99"),
        (("--db", db, "best", "sft/d1", "--metric", "mfu"), "has a mfu value"),
        (("--db", db, "import-log", tmp_path / "missing.log", "--run", "base/d1"), "does not exist"),
        (("--db", foreign, "runs"), "is a database but not a nanochat registry"),
        (("--db", tmp_path / "absent.sqlite", "runs"), "no registry at"),
    ]
    for argv, message in cases:
        code, out, err = call(capsys, *argv)
        assert code == 1 and out == "", argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "absent.sqlite").exists()
    set_newer = sqlite3.connect(db)
    set_newer.execute("UPDATE registry_info SET value = '999' WHERE key = 'schema_version'")
    set_newer.commit()
    set_newer.close()
    code, out, err = run_cli("runs", db=db)  # the real entry point, too
    assert code == 1 and out == "" and "schema version 999, newer than this code's" in err and err.count("\n") == 1
    code, _, err = run_cli("nonsense", db=db)
    assert code == 2 and "invalid choice" in err


def test_help_for_every_command():
    code, out, _ = run_cli("--help")
    assert code == 0 and all(name in out for name in cli.COMMANDS) and "RUN is a run id" in out
    code, out, _ = run_cli("scan", "--help")
    assert code == 0 and "usage: python -m registry scan" in out and "--no-progress" in out and "--db" in out
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        help_text = p.format_help()
        assert p.description and "--json" in help_text and "--db" in help_text, name
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def readme_section(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- section: {name} -->(.*?)<!-- end section: {name} -->", text, re.S)
    assert m, f"README has no {name} section"
    return m.group(1)


def test_readme_documents_every_command_and_flag():
    section = readme_section("registry")
    whole = README.read_text(encoding="utf-8")
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        where = whole if name in INTEGRITY_COMMANDS else section
        assert f"python -m registry {name}" in where or f"`{name}`" in where, f"README does not document {name}"
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in where, f"README does not document {name} {flag}"
    for flag in ("--db", "--json", "NANOCHAT_REGISTRY_URL", "postgresql+psycopg://", "migrate"):
        assert flag in section
    # each registry command's --json shape is described
    for name in set(sub.choices) - INTEGRITY_COMMANDS:
        assert re.search(rf"- `{name}`[^\n]*:", section), f"README has no --json shape for {name}"


def test_metrics_file_changes_show_up_in_history(tmp_path, capsys):
    run = tmp_path / "base_checkpoints" / "d3"
    make_checkpoint(run, 5)
    append_metrics(run, train_lines(range(3)))
    db = tmp_path / "r.sqlite"
    call(capsys, "--db", db, "scan", tmp_path, "--no-progress")
    append_metrics(run, train_lines(range(3, 6)))
    code, out, _ = call(capsys, "--db", db, "scan", tmp_path, "--no-progress", "--json")
    assert json.loads(out)["metric_lines"] == 3
    code, out, _ = call(capsys, "--db", db, "history", "d3", "--key", "lrm", "--json")
    assert [p["step"] for p in json.loads(out)[0]["points"]] == list(range(6))
