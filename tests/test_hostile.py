"""Hostile and broken input (issue 16): one bad file is a problem of its checkpoint (or one skipped,
counted metrics line), never of the tree; healthy runs beside it are still indexed, verified and planned;
an interrupted scan is finished by the next one; a crafted protocol-4 pickle is named, not a crash; a
flagged newest step is skipped by every tool that picks a step. Plus a seeded fuzz test of metas, metrics
lines and file names. (The FIFO, base_train flags, CLI references, refusal wording, read-only registries
and the app's listening address are in tests/test_hostile_edges.py and the app tests.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import bounds
from nanochat import checkpoint_manager as cm
from nanochat.quick_check import quick_check
from registry import metrics, open_store
from registry.cli import main as registry_main
from registry.inspection import file_kind, inspect_checkpoint, run_config
from registry.scanner import group_slots, list_run_dir
from tests.modelkit import tiny_tokenizer, write_checkpoint
from tests.registry_kit import append_metrics, make_checkpoint, train_lines
from tests.test_torchfile import MEMO_HIDDEN, rewrite_pickle
from tools import generation_explorer, training_resume_helper

ROOT = Path(__file__).resolve().parent.parent
GOOD_STEPS = (10, 20)
GOOD_POINTS = 21  # metrics lines of the healthy run, one train_loss point each


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_tokenizer_check(monkeypatch):
    """These trees hold tiny vocab-64 models that no real tokenizer matches, and they test hostile metas,
    metrics lines, names and pickles: `verify` and `registry resume` would add the run's missing tokenizer
    (issue 11's `missing_tokenizer`) to every checkpoint. That check has its own tests (tests/test_chat_phases.py)."""
    from registry import integrity

    monkeypatch.setattr(integrity, "tokenizer_problems", lambda ckpt, meta: [])


def healthy_run(base: Path) -> Path:
    run = base / "base_checkpoints" / "good"
    for step in GOOD_STEPS:
        make_checkpoint(run, step, num_iterations=20)
    append_metrics(run, train_lines(range(GOOD_POINTS)))
    return run


def cli(capsys, db: Path, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = registry_main(["--db", str(db), *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tool(capsys, main, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err


def assert_healthy_indexed(db: Path, run: Path) -> None:
    with open_store(db) as s:
        cks = [c for c in s.checkpoints(str(run)) if not c.missing]
        assert sorted(c.step for c in cks) == list(GOOD_STEPS) and all(c.resumable for c in cks)
        keys = {k.key: k for k in s.metric_keys(str(run))}
        assert keys["train_loss"].count == GOOD_POINTS


def assert_healthy_neighbour(capsys, db: Path, base: Path, good: Path) -> None:
    """Indexed, verified and planned, whatever sits beside it."""
    assert_healthy_indexed(db, good)
    rc, out, err = cli(capsys, db, "verify", base)
    assert rc in (0, 3) and "internal error" not in err, err
    assert sum(1 for line in out.splitlines() if line.startswith("base/good ") and "quick-checked" in line) == 2, out
    rc, out, err = cli(capsys, db, "resume", good)
    assert rc == 0 and "--resume-from-step=20" in out, err


def edit_meta(run: Path, step: int, change) -> None:
    p = run / f"meta_{step:06d}.json"
    meta = json.loads(p.read_text())
    change(meta)
    p.write_text(json.dumps(meta))


def table_rows(db: Path) -> dict[str, list]:
    """Every row of every table but `scans` and `scan_problems` (a scan's own bookkeeping)."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}"))) for t in tables
                if t not in ("scans", "scan_problems")}
    finally:
        con.close()


# ---------------------------------------------------------------------- item 2: a bad meta or file name


META_TRIGGERS = {
    "n_head 0": (lambda m: m["model_config"].update(n_head=0), "model_config.n_head 0 is out of range"),
    "resume_segment 2**70": (lambda m: m.update(resume_segment=2 ** 70), "resume_segment"),
    "num_iterations 2**70": (lambda m: m.update(num_iterations=2 ** 70), "num_iterations"),
    "world_size 2**70": (lambda m: m.update(world_size=2 ** 70), "world_size"),
    "world_size 10**9": (lambda m: m.update(world_size=10 ** 9), "world_size 1000000000 is out of range"),
    "n_layer 10**9": (lambda m: m["model_config"].update(n_layer=10 ** 9), "model_config.n_layer 1000000000"),
    "user_config 2**70": (lambda m: m.update(user_config={"num_iterations": 2 ** 70}), "user_config.num_iterations"),
    "nested 100,000 deep": (None, "nested deeper than 64 levels"),
}


@pytest.mark.parametrize("trigger", list(META_TRIGGERS))
def test_a_bad_meta_is_a_problem_of_its_checkpoint(trigger, tmp_path, capsys):
    base, db = tmp_path / "base", tmp_path / "reg.sqlite"
    good = healthy_run(base)
    bad = base / "base_checkpoints" / "bad"
    make_checkpoint(bad, 12, num_iterations=20)
    change, message = META_TRIGGERS[trigger]
    if change is None:
        (bad / "meta_000012.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        edit_meta(bad, 12, change)
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "internal error" not in err, err
    assert message in out and "bad@12" in out
    assert_healthy_neighbour(capsys, db, base, good)
    # the bad run itself: every tool says one line, none a traceback (item 3)
    rc, out, err = cli(capsys, db, "resume", bad)
    assert rc == 3 and message in out + err
    rc, _, err = tool(capsys, training_resume_helper.main, bad)
    assert rc == 3 and "Traceback" not in err and err.startswith("error:")
    rc, _, err = tool(capsys, generation_explorer.main, "--checkpoint", bad, "--prompt", "a")
    assert rc == 1
    assert_one_line_error(err)
    # a rescan of the unchanged tree reads nothing and reports the same
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "0 new, 0 changed, 3 unchanged" in out, out


def test_a_step_too_large_for_any_column_in_a_file_name(tmp_path, capsys):
    base, db = tmp_path / "base", tmp_path / "reg.sqlite"
    good = healthy_run(base)
    bad = base / "base_checkpoints" / "bad"
    make_checkpoint(bad, 12)
    make_checkpoint(bad, 14)
    (bad / "model_000012.pt").rename(bad / "model_99999999999999999999.pt")
    (bad / "optim_000014_rank0.pt").rename(bad / "optim_000014_rank99999999999.pt")
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "internal error" not in err, err
    assert out.count("bad_file_name") == 2 and "model_99999999999999999999.pt" in out
    assert_healthy_neighbour(capsys, db, base, good)
    assert [c.step for c in cm.list_checkpoints(bad)] == [12, 14]  # discovery ignores them too
    with pytest.raises(cm.CheckpointError, match="out of range"):
        cm.resolve_checkpoint(bad / "model_99999999999999999999.pt")


METRICS_TRIGGERS = {
    "step 2**70": (f'{{"step": {2 ** 70}, "x": 1}}', "step 1180591620717411303424 is out of range"),
    "step 1e400": ('{"step": 1e400, "x": 1}', "step must be an integer, got inf"),
    "segment 2**70": (f'{{"step": 3, "segment": {2 ** 70}, "x": 1}}', "segment 1180591620717411303424 is out of range"),
    "nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested deeper than 64 levels)"),
    "value 10**400": (f'{{"step": 3, "x": {10 ** 400}}}', None),  # not a float: that value is no point
}


@pytest.mark.parametrize("trigger", list(METRICS_TRIGGERS))
def test_a_bad_metrics_line_is_skipped_counted_and_reported(trigger, tmp_path, capsys):
    base, db = tmp_path / "base", tmp_path / "reg.sqlite"
    good = healthy_run(base)
    bad = base / "base_checkpoints" / "bad"
    make_checkpoint(bad, 12)
    line, message = METRICS_TRIGGERS[trigger]
    append_metrics(bad, train_lines(range(0, 3)) + [line + "\n"] + train_lines(range(3, 6)))
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "internal error" not in err, err
    if message:
        assert f"{GOOD_POINTS + 6} ingested, 1 malformed" in out and f"line 4: {message}" in out, out
    assert_healthy_neighbour(capsys, db, base, good)
    with open_store(db) as s:
        assert {k.key: k.count for k in s.metric_keys(str(bad))}["train_loss"] == 6
    rc, out, err = cli(capsys, db, "resume", bad)  # the planner reads metrics.jsonl too
    assert rc == 0 and "internal error" not in err, err


@pytest.mark.parametrize("value", [2 ** 63 - 1, 2 ** 63, -(2 ** 63 - 1), -(2 ** 63), 10 ** 30, 0.1000000000000000055511151231257827,
                                   "12345678901234567890", [1, {"x": 2 ** 64}], 1.5])
def test_the_scanners_shortcuts_judge_as_the_full_checks(value):
    """Speed (issue 15) took shortcuts: a meta's 64-bit walk skipped when its JSON text has no 19-digit run,
    UTF-8 metrics lines decoded without json's detection, floats taken without a call. Same verdicts."""
    text = json.dumps({"step": 3, "user_config": {"v": value}})
    meta = bounds.loads(text)
    assert bounds.meta_problem(meta, text) == bounds.meta_problem(meta)
    line = json.dumps({"step": 3, "segment": 2, "wall_time": 1.5, "x": value, "nan": float("nan"), "flag": True})
    assert metrics.parse_metrics_line(line.encode()) == metrics.parse_metrics_line(line)
    for raw in (b"\xef\xbb\xbf" + line.encode(), line.encode("utf-16-le"), b"{\xff}"):  # BOM, UTF-16, not UTF-8
        try:
            expected = json.loads(raw)
        except ValueError as e:
            with pytest.raises(ValueError) as got:
                bounds.loads(raw)
            assert type(got.value) is type(e) and str(got.value) == str(e)
        else:
            assert bounds.loads(raw) == expected


def test_the_app_scan_box_reports_a_hostile_tree(tmp_path, monkeypatch):
    """Item 7: every trigger above in one tree, scanned from the app's scan box: a report, no traceback."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    base = tmp_path / "base"
    healthy_run(base)
    for i, (change, _) in enumerate(META_TRIGGERS.values()):
        run = base / "base_checkpoints" / f"bad{i}"
        make_checkpoint(run, 12)
        if change is None:
            (run / "meta_000012.json").write_text("[" * 100_000 + "]" * 100_000)
        else:
            edit_meta(run, 12, change)
    for i, (line, _) in enumerate(METRICS_TRIGGERS.values()):
        append_metrics(base / "base_checkpoints" / f"bad{i}", [line + "\n"])
    (base / "base_checkpoints" / "bad0" / "model_000012.pt").rename(base / "base_checkpoints" / "bad0" / "model_99999999999999999999.pt")
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(tmp_path / "reg.sqlite"))
    at = AppTest.from_file(str(ROOT / "streamlit_app" / "app.py"), default_timeout=60)
    at.run()
    at.text_input(key="empty_scan_path").set_value(str(base))
    at.button(key="empty_scan_go").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert any(f"{len(META_TRIGGERS) + 1} runs" in s.value for s in at.success), [s.value for s in at.success]
    assert any("out of range" in w.value for w in at.warning)
    st.cache_data.clear()
    st.cache_resource.clear()


# ---------------------------------------------------------------------- item 1: interrupted metrics ingest


KILLER = """
import functools, os, signal, sys
from registry import metrics, open_store, scanner
real, calls = metrics.ingest_points, [0]
def dying(*a, **k):
    out = real(*a, **k)  # the chunk's points are inserted, its transaction not yet committed
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), getattr(signal, sys.argv[4]))
    return out
metrics.ingest_points = dying
scanner.sync_metrics_file = functools.partial(metrics.sync_metrics_file, chunk_bytes=4096)
with open_store(sys.argv[1]) as s:
    s.scan(sys.argv[2])
"""


def scan_rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT id, status, error FROM scans ORDER BY id"))
    finally:
        con.close()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_scan_killed_while_it_ingests_metrics_is_completed_by_the_next(how, tmp_path, capsys):
    base, db = tmp_path / "base", tmp_path / "reg.sqlite"
    run = base / "base_checkpoints" / "long"
    make_checkpoint(run, 10)
    n = 3000  # ~100 bytes a line: ~75 chunks of 4 KB, killed in the third
    append_metrics(run, train_lines(range(n)))
    res = subprocess.run([sys.executable, "-c", KILLER, str(db), str(base), "3", how], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    with open_store(db) as s:
        stored = {k.key: k.count for k in s.metric_keys(str(run))}.get("train_loss", 0)
    assert 0 < stored < n, (stored, res.stderr[-2000:])  # two chunks committed, the third rolled back
    [(killed, status, _)] = scan_rows(db)
    if how == "SIGKILL":
        assert res.returncode == -9 and status == "running"
    else:  # Ctrl-C: the scan itself records it
        assert status == "interrupted" and "Traceback" not in res.stderr.split("KeyboardInterrupt")[0][-1:]
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0, err
    assert f"{n - stored} ingested" in out.replace(",", ""), out
    with open_store(db) as s:
        assert {k.key: k.count for k in s.metric_keys(str(run))}["train_loss"] == n  # every point exactly once
    rows = dict((i, (st, e)) for i, st, e in scan_rows(db))
    assert rows[killed][0] == "interrupted" and "later scan completes it" in rows[killed][1]
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "0 ingested" in out
    with open_store(db) as s:
        assert {k.key: k.count for k in s.metric_keys(str(run))}["train_loss"] == n


# ---------------------------------------------------------------------- item 4 and 11: a crafted protocol-4 pickle


@pytest.fixture
def crafted(tmp_path) -> dict[str, Path]:
    """Runs with a healthy step 8 and a step 12 whose optimizer shard (or model) is a protocol-4 pickle
    that calls posix.system through the memo (SHORT_BINUNICODE, MEMOIZE, BINGET)."""
    base = tmp_path / "base"
    out = {}
    for what in ("optim", "model"):
        run = base / "base_checkpoints" / what
        for step in (8, 12):
            make_checkpoint(run, step, num_iterations=20)
        rewrite_pickle(run / ("optim_000012_rank0.pt" if what == "optim" else "model_000012.pt"), MEMO_HIDDEN)
        out[what] = run
    return out


@pytest.mark.parametrize("what", ["optim", "model"])
def test_a_protocol_4_pickle_is_named_and_its_step_skipped(what, crafted, tmp_path, capsys):
    run, db = crafted[what], tmp_path / "reg.sqlite"
    name = "optim_000012_rank0.pt" if what == "optim" else "model_000012.pt"
    unsafe = f"{name} references code, not just tensors: posix.system (not executed)"
    assert cli(capsys, db, "scan", run)[0] == 0
    rc, out, err = cli(capsys, db, "verify", "--deep", run)
    assert rc == 3 and "internal error" not in err, err
    assert unsafe in out and any(line.split()[1:3] == ["8", "deep-verified"] for line in out.splitlines()), out
    for argv in (["resume", "--deep", run], ["resume", run]):
        rc, out, err = cli(capsys, db, *argv)
        assert rc == 0 and "--resume-from-step=8" in out and "skipped        step 12: unsafe_pickle" in out, out + err
    rc, out, err = tool(capsys, training_resume_helper.main, run, "--verify")
    assert rc == 0 and "--resume-from-step=8" in out and "Traceback" not in err, err
    if what == "model":  # (the quick check reads no optimizer pickle: a shard is judged by the deep check)
        assert quick_check(cm.resolve_checkpoint(run, 12)).problems[0].message == unsafe
        usable = cm.find_last_usable(run, resumable=True)  # what base_train --resume uses
        assert usable.checkpoint.step == 8 and usable.notes()[0].startswith("skipped newer step 12: unsafe_pickle")
        assert cm.find_last_usable(run).checkpoint.step == 8  # the explorer's choice too


def test_the_app_integrity_check_of_a_crafted_shard(crafted, tmp_path):
    from streamlit_app import data

    url = str(tmp_path / "reg.sqlite")
    with open_store(url) as s:
        s.scan(crafted["optim"])
        rid = s.resolve_run(str(crafted["optim"])).id
    frame = data.verify_runs(url, [rid], deep=True)
    assert len(frame) == 2
    assert "posix.system" in " ".join(map(str, frame.to_dict("records")))


def test_base_train_resume_and_the_explorer_fall_back_past_a_flagged_step(tmp_path, capsys):
    from scripts import base_train

    vocab = 300
    from nanochat.gpt import GPTConfig
    from tests.modelkit import random_model

    config = GPTConfig(sequence_len=48, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")
    run = tmp_path / "base_checkpoints" / "d1"
    for step in (8, 12):
        write_checkpoint(run, random_model(config, seed=step), step=step, tokenizer=tiny_tokenizer(vocab),
                         extra_meta={"world_size": 1})
    rewrite_pickle(run / "model_000012.pt", MEMO_HIDDEN)
    rc, out, err = tool(capsys, generation_explorer.main, "--checkpoint", run, "--prompt", "To be", "--max-tokens", "2",
                        "--temperature", "0")
    assert rc == 0 and "skipped newer step 12: unsafe_pickle" in err and "posix.system" in err, err
    args = argparse.Namespace(resume_from_step=-1, allow_approximate=False)
    with pytest.raises(base_train.TrainError, match="d1@8 has no training state"):  # it chose 8
        base_train._find_resume_point(run, args, 1, True)
    assert "note: skipped newer step 12: unsafe_pickle" in capsys.readouterr().err


# ---------------------------------------------------------------------- fuzz


ODD_NUMBERS = [0, -1, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 63, 2 ** 70, -(2 ** 70), 10 ** 9, 10 ** 30, 0.5, -0.0, 1e308,
               float("inf"), float("-inf"), float("nan"), True, None, "7", [], {}, [1, [2]]]


def mutate_json(rng: random.Random, obj):
    """A copy of a JSON tree with one random leaf replaced, a key dropped, or a value nested deep."""
    obj = json.loads(json.dumps(obj))
    paths = []
    stack = [(obj, [])]
    while stack:
        node, path = stack.pop()
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()):
            paths.append(path + [k])
            stack.append((v, path + [k]))
    if not paths:
        return obj
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    r = rng.random()
    if r < 0.6:
        parent[path[-1]] = rng.choice(ODD_NUMBERS)
    elif r < 0.75 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        value = parent[path[-1]]
        for _ in range(rng.choice([2, 70, 500])):  # (deeper: mutate_text; json.dumps itself recurses)
            value = [value]
        parent[path[-1]] = value
    return obj


def mutate_text(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.3:
        return text[:rng.randrange(len(text) + 1)]
    if r < 0.6:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice('{}[]":,0123456789e-\\\x00é') + text[i + 1:]
    if r < 0.8:
        return text.replace("1", str(rng.choice([2 ** 64, 10 ** 40, "1e999", "-1"])), 1)
    return "[" * rng.choice([64, 65, 100_000]) + text


def odd_name(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([1, 6, 10, 11, 19, 20, 30])))
    return rng.choice([f"model_{digits}.pt", f"meta_{digits}.json", f"optim_{digits}.pt", f"optim_000005_rank{digits}.pt",
                       f"trainstate_000005_rank{digits}.pt", f"trainstate_{digits}_rank0.pt"])


def test_fuzz_metas_metrics_lines_and_file_names(tmp_path, capsys):
    """Seeded: a few hundred random and mutated metas, metrics lines and file names. Each reader answers
    with its named error or a problem code, never another exception; a tree of them, scanned next to a
    healthy run, is indexed without a traceback and leaves the healthy run as it was; refused commands
    change nothing stored."""
    rng = random.Random(16)
    base, db = tmp_path / "base", tmp_path / "reg.sqlite"
    good = healthy_run(base)
    template = base / "template"
    make_checkpoint(template, 5, num_iterations=20)
    meta = json.loads((template / "meta_000005.json").read_text())
    line = json.loads(train_lines([7])[0])

    # 1. readers, one case at a time (cheap: the model's pickle is read once per distinct file)
    ckpt_dir = tmp_path / "one"
    shutil.copytree(template, ckpt_dir)
    for _ in range(300):
        m = mutate_json(rng, meta)
        text = json.dumps(m) if rng.random() < 0.7 else mutate_text(rng, json.dumps(meta))
        (ckpt_dir / "meta_000005.json").write_text(text)
        slot = next(iter(group_slots(list_run_dir(ckpt_dir)[0])[0].values()))
        ins = inspect_checkpoint(slot, ckpt_dir)  # never raises
        config = run_config(ins, ckpt_dir)
        for key in ("num_iterations", "world_size", "total_batch_size", "depth", "n_params"):
            assert config[key] is None or abs(config[key]) <= bounds.MAX_INT, (key, text[:200])
        assert 0 <= ins.segment <= bounds.MAX_STEP
        try:
            cm.read_meta(cm.resolve_checkpoint(ckpt_dir, 5) if ins.complete else slot.checkpoint_files(ckpt_dir))
        except cm.CheckpointError:
            pass
    for _ in range(300):
        raw = json.dumps(mutate_json(rng, line)) if rng.random() < 0.7 else mutate_text(rng, json.dumps(line))
        try:
            points = metrics.parse_metrics_line(raw)
        except ValueError:
            continue
        assert all(0 <= p[1] <= bounds.MAX_STEP and 1 <= p[2] <= bounds.MAX_STEP for p in points), raw[:200]
    for _ in range(200):
        name = odd_name(rng)
        kind = file_kind(name)
        assert kind == cm.classify_name(name)
        assert kind[0] == "out_of_range" or (kind[1] <= bounds.MAX_STEP and (kind[2] or 0) < bounds.MAX_WORLD_SIZE)

    # 2. a tree of 60 hostile runs beside the healthy one: one scan, one verify
    expected_bad = 0
    for i in range(60):
        run = base / "base_checkpoints" / f"fz{i}"
        shutil.copytree(template, run)
        (run / "meta_000005.json").write_text(json.dumps(mutate_json(rng, meta)) if i % 2 else
                                              mutate_text(rng, json.dumps(meta)))
        lines = [json.dumps(mutate_json(rng, line)) if rng.random() < 0.5 else mutate_text(rng, json.dumps(line))
                 for _ in range(5)]
        append_metrics(run, [x.replace("\n", " ") + "\n" for x in lines])
        for x in lines:
            try:
                metrics.parse_metrics_line(x.replace("\n", " "))
            except ValueError:
                expected_bad += 1
        if i % 3 == 0:
            (run / "optim_000005_rank0.pt").rename(run / odd_name(rng))
    rc, out, err = cli(capsys, db, "scan", base)
    assert rc == 0 and "internal error" not in err and "Traceback" not in err, err
    assert f"{expected_bad} malformed" in out, out
    assert_healthy_neighbour(capsys, db, base, good)

    # 3. refused commands leave the database as it was
    before = table_rows(db)
    refused = [["scan", tmp_path / "nowhere"], ["scan", base / "base_checkpoints" / "fz0" / "meta_000005.json.x"],
               ["checkpoints", "fz-none"], ["show", f"good@{2 ** 70}"], ["history", "nothing", "--key", "x"],
               ["import-log", tmp_path / "missing.log"], ["resume", tmp_path / "nowhere"]]
    for argv in refused:
        rc, out, err = cli(capsys, db, *argv)
        assert rc in (1, 2, 3) and "Traceback" not in err and "internal error" not in err, (argv, err)
    assert table_rows(db) == before
