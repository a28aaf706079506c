"""Every kind of upstream log line and eval output into the registry: base_train (CORE), chat_sft (step lines
without /total, ChatCORE), chat_rl, base_eval (console and CSV), chat_eval, a log holding several scripts;
evaluation rows in history/best/--json; the schema migration that added them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import db as regdb
from registry import open_store
from registry.cli import main as cli
from registry.errors import LogImportError
from tests.registry_kit import make_checkpoint, make_version_1

CORE_TASKS = ["hellaswag_zeroshot", "jeopardy", "arc_easy"]


def core_block(step_prefix: str | None, base: float = 0.3) -> str:
    lines = [f"Evaluating: {t} (10-shot, type: multiple_choice)... accuracy: {base + i / 100:.4f} | centered: "
             f"{base / 2 + i / 100:.4f} | time: 1.50s" for i, t in enumerate(CORE_TASKS)]
    return "\n".join(lines) + "\n"


def logger(msg: str) -> str:  # nanochat's logger format, colours included
    return f"2026-11-24 06:24:02,880 - nanochat.checkpoint_manager - \x1b[32m\x1b[1mINFO\x1b[0m - {msg}\n"


def base_train_log(base: Path) -> str:
    d = base / "base_checkpoints" / "d2"
    return ("Distributed world size: 1\n"
            "Vocab size: 2,048\n"
            "Step 00000 | Validation bpb: 3.100000\n"
            "step 00000/00300 (0.00%) | loss: 7.624457 | lrm: 0.03 | dt: 48.55ms | tok/sec: 42,186 | bf16_mfu: 0.00 | "
            "epoch: 1 pq: 0 rg: 1 | total time: 0.00m\n"
            "step 00001/00300 (0.33%) | loss: 7.512000 | lrm: 0.05 | dt: 47.10ms | tok/sec: 43,500 | bf16_mfu: 0.00 | "
            "epoch: 1 pq: 0 rg: 2 | total time: 0.01m | eta: 0.2m\n"
            + core_block("Step") +
            "Step 00100 | CORE metric: 0.1432\n"
            + logger(f"Saved model parameters to: {d}/model_000300.pt")
            + logger(f"Saved metadata to: {d}/meta_000300.json"))


def chat_sft_log(base: Path) -> str:
    src = base / "base_checkpoints" / "d2"
    out = base / "chatsft_checkpoints" / "d2"
    chat = ""
    for task, (p, t) in {"ARC-Easy": (60, 100), "ARC-Challenge": (30, 100), "MMLU": (40, 100), "GSM8K": (5, 50),
                         "HumanEval": (2, 20)}.items():
        if task in ("GSM8K", "HumanEval"):
            chat += f"\r\x1b[KRank 0 | {p}/{t} ({100 * p / t:.2f}%)\n" + "=" * 50 + "\n"
        chat += f"Final: {p}/{t} ({100 * p / t:.2f}%)\n  {task}: {100 * p / t:.2f}%\n"
    return ("Distributed world size: 1\n"
            + logger(f"Loading model from {src} with step 300") +
            "Inherited max_seq_len=128 from pretrained checkpoint\n"
            "Step 00000 | Validation bpb: 1.2345\n"
            "step 00001 (0.03%) | loss: 0.672917 | lrm: 1.00 | dt: 612.40ms | tok/sec: 856,112 | mfu: 41.20 | epoch: 1 | "
            "total time: 0.00m\n"
            "step 00002 (0.06%) | loss: 0.650000 | lrm: 1.00 | dt: 600.00ms | tok/sec: 860,000 | mfu: 41.00 | epoch: 1 | "
            "total time: 0.01m\n"
            + chat +
            "Step 00002 | ChatCORE: 0.1234 | ChatCORE_cat: 0.0567\n"
            + logger(f"Saved model parameters to: {out}/model_000002.pt"))


def chat_rl_log(base: Path) -> str:
    out = base / "chatrl_checkpoints" / "d2"
    return ("Distributed world size: 1\n"
            + logger(f"Loading model from {base / 'chatsft_checkpoints' / 'd2'} with step 2") +
            "Calculated number of steps: 4\n"
            "Step 0 | Pass@1: 0.0500, Pass@2: 0.0800\n"
            "Step 0/4 | Example step 0 | Pass 0 | loss: 0.123456 | Average reward: 0.0625\n"
            "Step 0/4 | Average reward: 0.0625 | Average sequence length: 187.44\n"
            "Step 1/4 | Average reward: 0.125 | Average sequence length: 150.5\n"
            "✅ Saved model checkpoint to " + str(out) + "\n"
            + logger(f"Saved model parameters to: {out}/model_000003.pt"))


def base_eval_log(base: Path) -> str:
    return ("Distributed world size: 1\n"
            + logger(f"Loading model from {base / 'base_checkpoints' / 'd2'} with step 300") +
            "Evaluating model: base_model (step 300)\nEval modes: bpb, core\n\n" + "=" * 80 + "\nBPB Evaluation\n" + "=" * 80
            + "\ntrain bpb: 2.100000\nval bpb: 2.186809\n\n" + "=" * 80 + "\nCORE Evaluation\n" + "=" * 80 + "\n"
            + core_block(None, 0.4) + "\nResults written to: x.csv\nCORE metric: 0.2100\n")


def chat_eval_log(base: Path) -> str:
    return ("Distributed world size: 1\n"
            + logger(f"Loading model from {base / 'chatsft_checkpoints' / 'd2'} with step 2") +
            "Final: 1205/2376 (50.72%)\nARC-Easy accuracy: 50.72%\n"
            "\r\x1b[KRank 0 | 10/20 (50.00%)\r\x1b[KRank 0 | 11/20 (55.00%)\n" + "=" * 50 + "\n"
            "Final: 11/20 (55.00%)\nGSM8K accuracy: 55.00%\n")


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "base"
    make_checkpoint(base / "base_checkpoints" / "d2", 100, val_bpb=2.5, num_iterations=300)
    make_checkpoint(base / "base_checkpoints" / "d2", 300, val_bpb=2.2, num_iterations=300)
    make_checkpoint(base / "chatsft_checkpoints" / "d2", 2, val_bpb=1.2, num_iterations=2)
    make_checkpoint(base / "chatrl_checkpoints" / "d2", 3, val_bpb=None, num_iterations=4)
    return base


@pytest.fixture
def reg(tree, tmp_path):
    with open_store(tmp_path / "registry.sqlite") as s:
        s.scan(tree)
        yield s


def evals(store, run) -> dict:
    return {(e.step, e.task, e.metric): (e.value, e.n_examples, e.script) for e in store.eval_results(run)}


def test_base_train_log_finds_its_run_and_keeps_core_and_the_ema_loss_apart(reg, tree, tmp_path):
    log = tmp_path / "base_train.log"
    log.write_text(base_train_log(tree))
    r = reg.import_log(log)  # no --run: the Saved lines say which run
    assert r.run_label == "base/d2" and r.runs == ("base/d2",) and r.unmatched == ()
    assert (r.malformed, r.evals_new) == (0, 7)
    e = evals(reg, "base/d2")
    assert e[(100, "CORE", "core")] == (0.1432, None, "base_train")
    assert e[(100, "arc_easy", "accuracy")][0] == pytest.approx(0.32)
    assert e[(100, "arc_easy", "centered")][0] == pytest.approx(0.17)
    keys = {k.key for k in reg.metric_keys("base/d2")}
    assert {"train_loss_ema", "mfu", "lrm", "dt_ms", "tok_per_sec", "val_bpb"} <= keys and "train_loss" not in keys
    again = reg.import_log(log)
    assert (again.evals_new, again.evals_updated, again.points_new) == (0, 7, 0)
    assert len(reg.eval_results("base/d2")) == 7


def test_chat_sft_log_step_lines_without_total_and_chatcore(reg, tree, tmp_path):
    log = tmp_path / "sft.log"
    log.write_text(chat_sft_log(tree))
    r = reg.import_log(log)
    assert r.runs == ("sft/d2",) and r.malformed == 0, r
    loss = reg.metric_history("sft/d2", "train_loss_ema")[0]
    assert [(p.step, p.value) for p in loss.points] == [(0, 0.672917), (1, 0.65)]  # 1-based updates -> update index
    assert [p.value for p in reg.metric_history("sft/d2", "mfu")[0].points] == [41.2, 41.0]
    assert {p.step: p.value for p in reg.metric_history("sft/d2", "val_bpb")[0].points}[0] == 1.2345
    e = evals(reg, "sft/d2")
    assert e[(2, "ChatCORE", "chatcore")][0] == 0.1234 and e[(2, "ChatCORE", "chatcore_cat")][0] == 0.0567
    assert e[(2, "ARC-Easy", "accuracy")] == (0.6, 100, "chat_sft")
    assert e[(2, "GSM8K", "accuracy")] == (0.1, 50, "chat_sft")
    assert e[(2, "HumanEval", "accuracy")] == (0.1, 20, "chat_sft")
    assert not reg.eval_results("base/d2")  # the base model it loaded is not the run it trained


def test_chat_rl_log(reg, tree, tmp_path):
    log = tmp_path / "rl.log"
    log.write_text(chat_rl_log(tree))
    r = reg.import_log(log)
    assert r.runs == ("rl/d2",) and r.malformed == 0
    assert [p.value for p in reg.metric_history("rl/d2", "reward")[0].points] == [0.0625, 0.125]
    assert [p.value for p in reg.metric_history("rl/d2", "sequence_length")[0].points] == [187.44, 150.5]
    assert evals(reg, "rl/d2") == {(0, "GSM8K", "pass@1"): (0.05, None, "chat_rl"),
                                   (0, "GSM8K", "pass@2"): (0.08, None, "chat_rl")}


def test_base_eval_and_chat_eval_logs_take_run_and_step_from_the_loaded_model(reg, tree, tmp_path):
    (tmp_path / "be.log").write_text(base_eval_log(tree))
    r = reg.import_log(tmp_path / "be.log")
    assert r.runs == ("base/d2",)
    e = evals(reg, "base/d2")
    assert e[(300, "CORE", "core")] == (0.21, None, "base_eval")
    assert e[(300, "bpb", "val_bpb")][0] == 2.186809 and e[(300, "bpb", "train_bpb")][0] == 2.1
    assert e[(300, "jeopardy", "accuracy")][0] == pytest.approx(0.41)
    (tmp_path / "ce.log").write_text(chat_eval_log(tree))
    r = reg.import_log(tmp_path / "ce.log")
    assert r.runs == ("sft/d2",)
    e = evals(reg, "sft/d2")
    assert e[(2, "ARC-Easy", "accuracy")] == (0.5072, 2376, "chat_eval")
    assert e[(2, "GSM8K", "accuracy")] == (0.55, 20, "chat_eval")


def test_one_log_holding_several_scripts_feeds_each_run(reg, tree, tmp_path):
    log = tmp_path / "speedrun.log"
    log.write_text(base_train_log(tree) + base_eval_log(tree) + chat_sft_log(tree) + chat_eval_log(tree)
                   + chat_rl_log(tree))
    r = reg.import_log(log)
    assert sorted(r.runs) == ["base/d2", "rl/d2", "sft/d2"] and r.unmatched == () and r.malformed == 0
    assert {k for k in evals(reg, "base/d2") if k[1] == "CORE"} == {(100, "CORE", "core"), (300, "CORE", "core")}
    assert (2, "ChatCORE", "chatcore") in evals(reg, "sft/d2")


def test_a_log_that_names_no_run_asks_for_one(reg, tree, tmp_path):
    log = tmp_path / "bare.log"
    log.write_text("step 00000/00300 (0.00%) | loss: 7.6 | lrm: 0.03 | dt: 48.55ms | tok/sec: 42,186\n")
    with pytest.raises(LogImportError, match="cannot tell which run bare.log belongs to .*--run RUN"):
        reg.import_log(log)
    assert reg.import_log(log, "base/d2").points_new == 4


def test_base_eval_csv_goes_to_the_one_run_with_that_step(reg, tree, tmp_path):
    csv = tree / "base_eval" / "base_model_000300.csv"
    csv.parent.mkdir()
    csv.write_text(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n"
                   + "".join(f"{t:<35}, {0.5:<10.6f}, {0.3:<10.6f}\n" for t in CORE_TASKS)
                   + f"{'CORE':<35}, {'':<10}, {0.3:<10.6f}\n")
    r = reg.import_log(csv)
    assert r.runs == ("base/d2",) and r.evals_new == 7
    assert evals(reg, "base/d2")[(300, "CORE", "core")] == (0.3, None, "base_eval")
    # A second tag with a step-300 checkpoint makes the tag-less file ambiguous: refused, candidates named.
    make_checkpoint(tree / "base_checkpoints" / "d4", 300, num_iterations=300)
    reg.scan(tree)
    with pytest.raises(LogImportError, match=r"names no model tag, and 2 runs .* \(base/d2, base/d4\): import it with --run"):
        reg.import_log(csv)
    assert reg.import_log(csv, "base/d4").evals_new == 7
    bad = tree / "base_eval" / "base_model_000100.csv"
    bad.write_text("hello\n")
    with pytest.raises(LogImportError, match="is not a base_eval CSV"):
        reg.import_log(bad)


def test_folder_import_finds_logs_and_csvs_and_reports_the_rest(reg, tree, tmp_path):
    (tree / "logs").mkdir()
    (tree / "logs" / "train.log").write_text(base_train_log(tree))
    (tree / "logs" / "bare.log").write_text("step 00000/00300 (0.00%) | loss: 7.6 | lrm: 0.03\n")
    (tree / "base_eval").mkdir()
    (tree / "base_eval" / "base_model_000300.csv").write_text("Task, Accuracy, Centered\nCORE, , 0.25\n")
    done = reg.import_logs(tree)
    assert sorted(Path(r.path).name for r in done.reports) == ["base_model_000300.csv", "train.log"]
    assert [Path(f).name for f, _ in done.failures] == ["bare.log"]
    assert "--run" in done.failures[0][1]


def test_best_history_and_json_offer_evaluations(reg, tree, tmp_path, capsys):
    log = tmp_path / "be.log"
    log.write_text(base_train_log(tree).replace("Step 00100 | CORE metric: 0.1432", "Step 00100 | CORE metric: 0.3000")
                   + base_eval_log(tree))
    reg.import_log(log)
    best = reg.best_checkpoint("base/d2", "CORE:core", "max")
    assert (best.checkpoint.step, best.value) == (100, 0.3)
    assert reg.best_checkpoint("base/d2", "CORE:core", "min").checkpoint.step == 300
    db = ["--db", str(tmp_path / "registry.sqlite")]
    assert cli([*db, "best", "base/d2", "--metric", "CORE:core", "--max", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == 0.3
    assert cli([*db, "history", "base/d2", "--evals", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"step", "task", "metric", "key", "value", "n_examples", "script", "source", "run_label"} <= set(rows[0])
    assert any(r["key"] == "CORE:core" and r["step"] == 300 and r["value"] == 0.21 for r in rows)
    assert cli([*db, "history", "base/d2", "--evals"]) == 0
    assert "CORE:core" in capsys.readouterr().out
    assert cli([*db, "best", "base/d2", "--metric", "MMLU:accuracy"]) == 1
    assert "evaluations: CORE:core" in capsys.readouterr().err


def test_a_version_1_registry_migrates_to_the_current_version_and_keeps_its_runs(tree, tmp_path):
    path = tmp_path / "old.sqlite"
    with open_store(path) as s:
        s.scan(tree)
        before = [(r.id, r.path) for r in s.list_runs()]
    make_version_1(path)
    with pytest.raises(regdb.SchemaTooOldError, match="migrate"):
        open_store(path)
    database = regdb.Database(path, create=False)
    assert database.migrate()[:2] == (1, regdb.SCHEMA_VERSION)
    database.close()
    with open_store(path) as s:
        assert [(r.id, r.path) for r in s.list_runs()] == before
        (tmp_path / "x.log").write_text(base_eval_log(tree))
        assert s.import_log(tmp_path / "x.log").evals_new > 0
