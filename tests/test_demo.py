"""The demo builder (scripts/demo.py) through the shared `demo_base` fixture (profile "test"): the layout
the app and the registry tests rely on, a real crash with two resume segments, a crash left for the user to
resume, and idempotence."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat import checkpoint_manager as cm
from scripts.demo import PROFILES, DemoError, build_demo, corpus_documents

ROOT = Path(__file__).resolve().parent.parent
PROFILE = PROFILES["test"]


def test_layout_is_a_nanochat_base_dir(demo_base):
    assert (demo_base / "tokenizer" / "tokenizer.json").is_file() and (demo_base / "tokenizer" / "token_bytes.pt").is_file()
    shards = sorted((demo_base / "base_data").glob("*.parquet"))
    assert len(shards) >= 2 and not list((demo_base / "base_data").glob("*.tmp"))
    val = pq.read_table(shards[-1]).column("text").to_pylist()
    assert val and all(len(t) <= 2000 for t in val)
    assert pq.ParquetFile(shards[-1]).num_row_groups >= 2  # two processes can share the validation shard
    assert sorted(p.name for p in (demo_base / "base_checkpoints").iterdir()) == sorted(r.tag for r in PROFILE.runs)
    assert [p.name for p in (demo_base / "chatsft_checkpoints").iterdir()] == [PROFILE.sft.tag]
    assert (demo_base / "registry.sqlite").is_file()


def test_every_run_has_checkpoints_every_few_steps(demo_base):
    for spec in PROFILE.runs:
        run = demo_base / "base_checkpoints" / spec.tag
        steps = [c.step for c in cm.list_checkpoints(run) if not cm.quick_problems(c)]
        assert steps == list(range(spec.save_every, spec.final_step + 1, spec.save_every)), spec.tag
        meta = cm.read_meta(cm.find_last_complete(run, resumable=True))
        assert meta["step"] == spec.final_step and meta["num_iterations"] == spec.steps
        assert meta["model_config"]["n_layer"] == spec.depth and meta["train_state"] is True
        assert isinstance(meta["val_bpb"], float)
    # one run finished, one killed and resumed to its end, one killed and left: the Resume page's first case
    assert sorted((s.kill_after_step is not None, s.resume_after_kill) for s in PROFILE.runs) == [
        (False, True), (True, False), (True, True)]
    assert len({spec.depth for spec in PROFILE.runs}) == 2  # curves of two model sizes to compare


def test_the_crashed_run_was_really_killed_and_resumed(demo_base):
    spec = next(s for s in PROFILE.runs if s.kill_after_step is not None and s.resume_after_kill)
    run = demo_base / "base_checkpoints" / spec.tag
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = [r["step"] for r in rows if r["segment"] == 1 and "train_loss" in r]
    second = [r["step"] for r in rows if r["segment"] == 2 and "train_loss" in r]
    resumed_from = min(second)
    assert resumed_from % spec.save_every == 0 and resumed_from <= spec.kill_after_step
    assert max(first) >= spec.kill_after_step > resumed_from  # steps trained, lost in the kill, trained again
    assert max(second) == spec.steps - 1
    assert cm.read_meta(cm.find_last_complete(run))["resume_segment"] == 2


def test_the_run_left_killed_stopped_between_two_checkpoints(demo_base):
    spec = next(s for s in PROFILE.runs if s.left_killed)
    run = demo_base / "base_checkpoints" / spec.tag
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["segment"] for r in rows} == {1}
    trained = max(r["step"] for r in rows if "train_loss" in r)
    assert spec.final_step < trained < spec.steps  # steps after its last checkpoint were lost in the kill
    assert cm.find_last_complete(run).step == spec.final_step


def test_the_eta_plans_exactly_the_steps_each_run_trains(demo_base):
    """The build's ETA counts steps_to_train per run; every trained step logs one train_loss row."""
    for spec in PROFILE.runs:
        rows = (demo_base / "base_checkpoints" / spec.tag / "metrics.jsonl").read_text().splitlines()
        trained = sum("train_loss" in json.loads(line) for line in rows)
        # a killed launch may finish one more step between the line the builder reads and the SIGKILL landing
        assert 0 <= trained - spec.steps_to_train(0) <= (spec.kill_after_step is not None), spec.tag
        assert spec.steps_to_train(spec.final_step) == 0


def test_registry_lists_the_demo_runs(demo_base):
    from registry import open_store

    with open_store(str(demo_base / "registry.sqlite")) as store:
        found = store.list_runs()
    assert sorted((r.phase, r.tag) for r in found) == sorted([("base", s.tag) for s in PROFILE.runs]
                                                             + [("sft", PROFILE.sft.tag)])
    runs = {r.tag: r for r in found if r.phase == "base"}
    for spec in PROFILE.runs:
        assert runs[spec.tag].latest_checkpoint_step == spec.final_step
        assert runs[spec.tag].num_iterations == spec.steps
        # the crash left alone is found later, not still training: the registry calls it stopped
        assert runs[spec.tag].status == ("stopped" if spec.left_killed else "finished")


def test_second_build_reuses_everything(demo_base, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_base, copy)
    before = {str(p.relative_to(copy)): p.stat().st_mtime_ns for p in copy.rglob("*")
              if p.is_file() and p.name != "registry.sqlite" and "registry.sqlite" not in p.name}
    result = build_demo(copy, profile="test")
    assert result.reused and all(r.reused for r in result.runs) and result.sft.reused
    after = {str(p.relative_to(copy)): p.stat().st_mtime_ns for p in copy.rglob("*")
             if p.is_file() and p.name != "registry.sqlite" and "registry.sqlite" not in p.name}
    assert after == before
    assert result.sample.startswith("KING HENRY.\n") and len(result.sample) > len("KING HENRY.\n")


def test_an_interrupted_build_is_completed_by_the_next_one(demo_base, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_base, copy)
    run = copy / "base_checkpoints" / PROFILE.final_tag
    last = PROFILE.runs[-1].steps
    for f in run.glob(f"*_{last:06d}*"):
        f.unlink()  # as if the build was stopped before the final checkpoint
    result = build_demo(copy, profile="test")
    final = next(r for r in result.runs if r.tag == PROFILE.final_tag)
    assert not final.reused and final.step == last and final.segments == 2


def test_the_chat_model_is_the_final_run_fine_tuned_on_the_play_conversations(demo_base):
    spec = PROFILE.sft
    run = demo_base / "chatsft_checkpoints" / spec.tag
    assert spec.tag == PROFILE.final_tag
    steps = [c.step for c in cm.list_checkpoints(run) if not cm.quick_problems(c)]
    assert steps == list(range(spec.save_every, spec.steps + 1, spec.save_every))
    meta = cm.read_meta(cm.find_last_complete(run, resumable=True))
    assert meta["source"]["phase"] == "base" and meta["source"]["tag"] == spec.tag
    assert meta["source"]["step"] == next(s for s in PROFILE.runs if s.tag == spec.tag).steps
    assert meta["sft"]["truncated"] == 0 and meta["sft"]["train_conversations"] > 100  # every conversation fits a row
    assert meta["user_config"]["conversations"] == [str(demo_base / "conversations" / "plays.jsonl")]
    assert isinstance(meta["val_bpb"], float) and meta["model_config"]["sequence_len"] == PROFILE.seq_len
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("train_loss" in r for r in rows) == spec.steps_to_train([]) == spec.steps  # what the ETA planned
    assert [r["step"] for r in rows if "val_bpb" in r] == list(range(0, spec.steps + 1, spec.eval_every))


def test_an_interrupted_fine_tune_is_resumed_by_the_next_build(demo_base, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_base, copy)
    run = copy / "chatsft_checkpoints" / PROFILE.sft.tag
    for f in run.glob(f"*_{PROFILE.sft.steps:06d}*"):
        f.unlink()  # as if the build was stopped before the SFT run's final checkpoint
    result = build_demo(copy, profile="test")
    assert not result.sft.reused and result.sft.step == PROFILE.sft.steps and result.sft.segments == 2
    assert all(r.reused for r in result.runs)


def test_other_profile_in_the_same_directory_is_refused(demo_base, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_base, copy)
    with pytest.raises(DemoError, match="holds the 'test' demo"):
        build_demo(copy, profile="full")


def test_cli_prints_runs_and_a_sample(demo_base, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_base, copy)
    res = subprocess.run([sys.executable, "-m", "scripts.demo", "--base-dir", str(copy), "--profile", "test"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for spec in PROFILE.runs:
        assert f"run {spec.tag}" in res.stdout
    assert f"sft {PROFILE.sft.tag}" in res.stdout
    assert "sample from" in res.stdout and "demo ready in" in res.stdout and "(reused)" in res.stdout


def test_corpus_documents_are_speech_sized_and_keep_the_plays_in_order():
    docs = corpus_documents(limit_chars=300_000)
    assert docs[0][0] == "alls_well_that_ends_well"
    assert all(len(d) <= 2000 for _, d in docs)
    assert sum(len(d) for _, d in docs) > 250_000


# ---------------------------------------------------------------------- the play conversations (SFT data of the demo)

SCENE = """PERSONS REPRESENTED.

ROMEO, son to Montague.
JULIET, daughter to Capulet.

ACT I.

SCENE I. Verona.

[Enter ROMEO and JULIET.]

ROMEO.
What light through yonder window breaks?

Jul.
It is the east.

[Aside.]

And I the sun.

FIRST WATCH.

[Within.]

Who goes there?

ROMEO.
A friend.
[Exit.]

SCENE II. A garden.

THESEUS
What say you, Hermia?
"""


def test_scenes_read_speakers_and_their_speeches():
    from scripts.play_conversations import Speech, scenes

    assert list(scenes(SCENE)) == [
        [Speech("ROMEO", "What light through yonder window breaks?"), Speech("Jul", "It is the east.\nAnd I the sun."),
         Speech("FIRST WATCH", "Who goes there?"), Speech("ROMEO", "A friend.")],
        [Speech("THESEUS", "What say you, Hermia?")]]


def test_play_conversations_pair_each_line_with_its_reply_and_fit_the_budget():
    from nanochat.tokenizer import Tokenizer
    from scripts.play_conversations import play_conversations

    template = Tokenizer.from_directory(ROOT / "tests/fixtures/upstream/current/tokenizer").chat_template()
    train, val = play_conversations([("a", SCENE), ("b", SCENE.replace("ROMEO", "PUCK"))], template, 64)
    assert [c.to_messages() for c in train] == [
        [{"role": "user", "content": "ROMEO: What light through yonder window breaks?"},
         {"role": "assistant", "content": "Jul: It is the east.\nAnd I the sun."}],
        [{"role": "user", "content": "FIRST WATCH: Who goes there?"},
         {"role": "assistant", "content": "ROMEO: A friend."}]]
    assert val[0].messages[0].content.startswith("PUCK: ")  # the last work is held out
    # the second conversation wants two exchanges (the cycle) but its scene has one left; a budget too small
    # for any exchange leaves the exchange out
    assert play_conversations([("a", SCENE), ("b", SCENE)], template, 12) == ([], [])


def test_demo_conversations_are_valid_fit_an_sft_row_and_hold_out_the_last_play(demo_base):
    from nanochat.conversation_file import read_conversations
    from nanochat.tokenizer import Tokenizer
    from scripts.demo import corpus_works
    from scripts.play_conversations import play_conversations

    folder = demo_base / "conversations"
    train, val = read_conversations(folder / "plays.jsonl"), read_conversations(folder / "plays_val.jsonl")
    assert len(train) > 100 and len(val) > 10 and all(e.valid and e.shape == "list" for e in train + val)
    template = Tokenizer.from_directory(demo_base / "tokenizer").chat_template()
    lengths = [template.render(e.conversation).length for e in train + val]
    assert max(lengths) <= PROFILE.seq_len + 1
    assert 2 in {len(e.conversation.messages) for e in train} <= {2, 4, 6}  # runs of 1-3 exchanges
    works = corpus_works(PROFILE.corpus_chars)
    again = play_conversations(works, template, PROFILE.seq_len + 1)  # deterministic: the same conversations
    assert [c.to_messages() for c in again[1]] == [e.conversation.to_messages() for e in val]
    last_play_speakers = {s for _, text in works[-1:] for s in re.findall(r"\n([A-Z][A-Z ]+)\.\n", text)}
    assert all(e.conversation.messages[0].content.split(":")[0] in last_play_speakers for e in val[:20])


def test_warm_launches_run_on_go_and_do_nothing_when_cancelled(tmp_path):
    """A launch started ahead imports its module, then waits: `take` sends go (the same process runs main with the
    flags, output and exit code its own); one never taken exits at cancel_all without running main."""
    from scripts.warm_launch import Launches

    launches = Launches(tmp_path)
    launches.start("scripts.demo", ["--help"], threads=1)
    launches.start("scripts.demo", ["--profile", "test", "--base-dir", str(tmp_path / "never")], threads=1)
    proc = launches.take("scripts.demo", ["--help"], threads=1)
    out = proc.stdout.read()
    proc.stdout.close()
    assert proc.wait() == 0 and "usage: python -m scripts.demo" in out
    launches.cancel_all()  # the second was never taken: it exits without building anything
    assert not (tmp_path / "never").exists()
    fresh = launches.take("scripts.demo", ["--profile", "nope"], threads=1)  # not started ahead: started now
    err = fresh.stdout.read()
    fresh.stdout.close()
    assert fresh.wait() == 2 and "invalid choice: 'nope'" in err
