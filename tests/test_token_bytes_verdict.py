"""Each run's token_bytes verdict in the registry (schema 3): the upstream fixtures' classic tokenizer (token_bytes.pt
built the old way) is flagged and the current one passes; a re-scan re-checks only a changed tokenizer folder; the
verdict is in `runs --json`; two runs whose val_bpb cannot be compared are named; the migration to 4 keeps runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from registry import cli, open_store, tokenizer_checks
from registry import db as regdb
from registry.entities import bpb_comparability
from registry.models import Run
from tests.registry_kit import make_version

UPSTREAM = Path(__file__).resolve().parent / "fixtures" / "upstream"


@pytest.fixture
def two_generations(tmp_path, monkeypatch) -> Path:
    """Upstream's classic (old-way token_bytes.pt) and current base dirs side by side."""
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    root = tmp_path / "runs"
    for g in ("classic", "current"):
        shutil.copytree(UPSTREAM / g, root / g)
        for p in (root / g).rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def by_generation(runs) -> dict:
    return {Path(r.path).parts[-3]: r for r in runs}


def test_scan_stores_each_runs_verdict_and_rescans_cost_a_stat(two_generations, tmp_path, monkeypatch):
    calls = []
    real = tokenizer_checks.check_folder
    monkeypatch.setattr(tokenizer_checks, "check_folder", lambda folder: calls.append(folder) or real(folder))
    with open_store(tmp_path / "r.sqlite") as s:
        s.scan(two_generations)
        runs = by_generation(s.list_runs())
        classic, current = runs["classic"].token_bytes, runs["current"].token_bytes
        assert (classic.verdict, classic.wrong, classic.old_method, classic.right) == ("wrong", 128, True, False)
        assert (current.verdict, current.wrong, current.right) == ("right", 0, True)
        assert classic.tokenizer_dir == str((two_generations / "classic" / "tokenizer").resolve())
        assert classic.label == "WRONG: 128" and current.label == "right"
        assert len(calls) == 2
        s.scan(two_generations)  # nothing changed: the stamps match, no tokenizer is read
        assert len(calls) == 2
        # rebuild classic's token_bytes.pt the right way: only that folder is checked again
        from nanochat.tokenizer import Tokenizer

        folder = two_generations / "classic" / "tokenizer"
        Tokenizer.from_directory(folder).save_token_bytes(folder)
        os.utime(folder / "token_bytes.pt", ns=(1, 1))  # a different mtime even on coarse clocks
        s.scan(two_generations)
        assert len(calls) == 3 and calls[-1] == folder.resolve()
        assert by_generation(s.list_runs())["classic"].token_bytes.verdict == "right"


def test_val_bpb_comparability_names_the_run_with_a_wrong_file(two_generations, tmp_path):
    with open_store(tmp_path / "r.sqlite") as s:
        s.scan(two_generations)
        runs = by_generation(s.list_runs())
    names = {r.id: g for g, r in runs.items()}
    why = bpb_comparability([runs["classic"], runs["current"]], names)
    assert why.startswith("val_bpb not comparable: the token_bytes.pt of classic (128 tokens wrong)") and "current" not in why
    assert bpb_comparability([runs["current"]]) is None
    assert bpb_comparability([runs["classic"], runs["classic"]]) is None  # the same wrong file on both sides
    lost = type(runs["current"])(**{**runs["current"].__dict__, "token_bytes": None})
    assert bpb_comparability([runs["current"], lost]).startswith("val_bpb may not be comparable")


def test_runs_json_has_the_verdict_and_the_table_a_column(two_generations, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert cli.main(["--db", str(db), "scan", str(two_generations)]) == 0
    capsys.readouterr()
    assert cli.main(["--db", str(db), "runs", "--json"]) == 0
    rows = {Path(r["path"]).parts[-3]: r["token_bytes"] for r in json.loads(capsys.readouterr().out)}
    assert rows["classic"]["verdict"] == "wrong" and rows["classic"]["wrong"] == 128 and rows["classic"]["old_method"]
    assert rows["current"]["verdict"] == "right" and rows["current"]["tokenizer_dir"].endswith("current/tokenizer")
    assert cli.main(["--db", str(db), "runs"]) == 0
    text = capsys.readouterr().out
    assert "token_bytes" in text and "WRONG: 128" in text


def test_unreadable_tokenizer_is_a_verdict_not_a_scan_failure(two_generations, tmp_path):
    (two_generations / "current" / "tokenizer" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with open_store(tmp_path / "r.sqlite") as s:
        report = s.scan(two_generations)
        assert report.status == "ok"
        v = by_generation(s.list_runs())["current"].token_bytes
        assert v.verdict == "unreadable" and "tokenizer.pkl" in v.error and "\n" not in v.error


@pytest.mark.parametrize("version", [1, 3])
def test_migration_to_schema_4_adds_the_verdicts_and_keeps_runs(tmp_path, version, two_generations):
    path = tmp_path / "old.sqlite"
    with open_store(path) as s:
        s.scan(two_generations / "current")  # a run and its verdict, then the registry made older
    make_version(path, version)
    with pytest.raises(regdb.SchemaTooOldError, match="migrate"):
        open_store(path)
    database = regdb.Database(path, create=False)
    assert database.migrate()[:2] == (version, regdb.SCHEMA_VERSION) == (version, 5)  # 5: origins (issue 11)
    database.close()
    engine = sa.create_engine(f"sqlite:///{path}")
    assert {"tokenizer_checks", "dataset_shards"} <= set(sa.inspect(engine).get_table_names())
    assert "tokenizer_check_id" in {c["name"] for c in sa.inspect(engine).get_columns("runs")}
    with engine.connect() as c:
        assert c.execute(sa.select(Run.tag)).scalars().all() == ["d2"]  # the run survived, its link did not
        assert c.execute(sa.select(Run.tokenizer_check_id)).scalar_one() is None
    engine.dispose()
    with open_store(path) as s:  # the migrated registry scans and stores verdicts
        s.scan(two_generations)
        assert sorted(r.token_bytes.verdict for r in s.list_runs()) == ["right", "wrong"]
