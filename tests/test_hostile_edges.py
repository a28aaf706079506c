"""Hostile and broken input at the edges (issue 16, items 5, 8, 9, 10, 12, 13, 14): special files where a
checkpoint file should be, numbers too large for SQL in references, a read-only registry, impossible
devices, bad flags for the demo, the tokenizer trainer and base_train, and refusal messages that say what
is wrong in one line. Each case is a promise from the README's "Bad input" notes: one line, the documented
exit code, nothing stored changed. (The scanner's own hostile trees and the fuzz test: tests/test_hostile.py.)"""

from __future__ import annotations

import sqlite3
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
        (("import-log", log, "--run", "base/d1", "--segment", HUGE), "segment must be an integer from 1 to 2147483647"),
        (("import-log", log, "--run", "base/d1", "--segment", "0"), "segment must be an integer from 1"),
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
