"""scripts.chat_sft, our SFT trainer: upstream's packing and masking, a real fine-tune of upstream's own d2
checkpoint on local conversations, bit-exact resume after SIGKILL (mid-save too; 1 process and 2 under
torchrun/gloo), one-line refusals that write nothing, and the registry's scan / verify / resume of the run.

Runs are subprocesses on copies of the vendored upstream base dir (tests/fixtures/upstream/current: d2,
vocab 2048, upstream's tokenizer with the chat tokens). The base tag is also the SFT tag (upstream's
--model-tag), so each run gets its own copy of base_checkpoints/d2 under its own tag.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.conversation import ChatTemplate, Conversation
from nanochat.sft_data import SftDataset, SftLoader, epoch_batches
from nanochat.tokenizer import Tokenizer
from registry import open_store, verify
from registry.cli import main as registry_cli
from registry.resume import plan_resume
from tests.trainkit import assert_bit_identical, run_trainer, trainer_argv, trainer_env

ROOT = Path(__file__).resolve().parent.parent
CURRENT = ROOT / "tests" / "fixtures" / "upstream" / "current"
STEPS, SAVE_EVERY = 12, 4
FLAGS = ["--device-type", "cpu", "--compile", "off", "--max-seq-len", "64", "--device-batch-size", "4",
         "--total-batch-size", "256", "--num-iterations", str(STEPS), "--save-every", str(SAVE_EVERY),
         "--eval-every", str(SAVE_EVERY), "--eval-tokens", "512"]
WORDS = "apple river stone cloud bright silver king queen sword castle night morning".split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Echo conversations: the assistant repeats the user's words (learnable by a d2 model in a few steps);
    every 7th has a second exchange, every 11th a tool call."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        w = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6)))
        conv = [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]
        if i % 7 == 0:
            conv += [{"role": "user", "content": "Twice"}, {"role": "assistant", "content": f"{w} {w}"}]
        if i % 11 == 0:
            conv += [{"role": "user", "content": "How many words?"},
                     {"role": "assistant", "content": [{"type": "python", "text": f"{len(w.split())}+0"},
                                                       {"type": "python_output", "text": str(len(w.split()))},
                                                       {"type": "text", "text": "That many."}]}]
        out.append(conv)
    return out


def write_jsonl(path: Path, convs, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in convs) + "".join(f"{x}\n" for x in extra_lines))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Upstream's base dir (tokenizer, base_checkpoints/d2) and a conversation file, writable."""
    b = tmp_path_factory.mktemp("sft_base")
    shutil.copytree(CURRENT / "tokenizer", b / "tokenizer")
    shutil.copytree(CURRENT / "base_checkpoints" / "d2", b / "base_checkpoints" / "d2")
    write_jsonl(b / "chats.jsonl", conversations(160))
    return b


def base_tag(base: Path, tag: str) -> str:
    """A copy of upstream's d2 under `tag` (the SFT run reads base/<tag> and writes chatsft/<tag>)."""
    dst = base / "base_checkpoints" / tag
    if not dst.exists():
        shutil.copytree(base / "base_checkpoints" / "d2", dst)
    return tag


env_for, run = trainer_env, run_trainer


def command(base: Path, tag: str, *extra: str, nproc: int = 1, flags=FLAGS) -> list[str]:
    data = [] if "--conversations" in extra else ["--conversations", str(base / "chats.jsonl")]
    return trainer_argv("scripts.chat_sft", ["--model-tag", base_tag(base, tag), *data, *flags, *extra], nproc)


def run_dir(base: Path, tag: str) -> Path:
    return base / "chatsft_checkpoints" / tag


def weights(base: Path, tag: str, step: int = STEPS) -> dict:
    return torch.load(run_dir(base, tag) / f"model_{step:06d}.pt", weights_only=True)


def losses(base: Path, tag: str) -> dict:
    """(step, metric) -> value, each step's newest segment (a resume re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir(base, tag) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("train_loss", "val_bpb", "lrm"):
            if key in row:
                out[(row["step"], key)] = row[key]
    return out


def complete_steps(base: Path, tag: str) -> list[int]:
    return [c.step for c in cm.list_checkpoints(run_dir(base, tag))
            if not any(p.blocks == "load" for p in cm.quick_problems(c))]


@pytest.fixture(scope="module")
def reference(base) -> str:
    res = run(command(base, "ref"), base)
    assert res.returncode == 0, res.stderr
    assert complete_steps(base, "ref") == [4, 8, 12]
    return "ref"


# ---------------------------------------------------------------------- packing and masking (in process)


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(Tokenizer.from_directory(CURRENT / "tokenizer"))


def test_rows_start_with_bos_targets_masked_and_long_conversations_cut(template):
    convs = [Conversation.parse(c) for c in conversations(40)]
    convs.append(Conversation.parse([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": " ".join(WORDS * 20)}]))
    row = 33
    data = SftDataset.build(convs, template, row)
    longer = sum(template.render(c, max_tokens=10**6).length > row for c in convs)
    assert data.truncated == longer >= 1 and data.lengths().max() == row  # cut to the row, and counted
    bos = template.special["<|bos|>"]
    loader = SftLoader(data, bos, batch_size=4, seq_len=row - 1)
    for _ in range(12):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, row - 1)
        assert (x[:, 0] == bos).all()  # every row starts a conversation
        assert loader.supervised == int((y >= 0).sum()) > 0
    # targets: the next token where the mask says trained, -1 elsewhere (user turns, specials, padding)
    loader = SftLoader(data, bos, batch_size=2, seq_len=row - 1)
    (picked, used), _ = loader.next_packing()
    loader2 = SftLoader(data, bos, batch_size=2, seq_len=row - 1)
    x, y = loader2.next_batch()
    ids = [t for c in picked for t in data.ids[data.offsets[c]:data.offsets[c + 1]].tolist()]
    mask = [m for c in picked for m in data.mask[data.offsets[c]:data.offsets[c + 1]].tolist()]
    full = ids + [bos] * (row - used)
    fmask = mask + [0] * (row - used)
    assert x[0].tolist() == full[:-1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(full[1:], fmask[1:])]
    assert sum(data.lengths()[c] for c in picked) == used <= row


def test_best_fit_takes_the_largest_that_fits_then_pads(template):
    convs = [Conversation.parse([{"role": "user", "content": "a " * n}, {"role": "assistant", "content": "b"}])
             for n in (1, 9, 3, 20)]
    data = SftDataset.build(convs, template, 64)
    lengths = data.lengths().tolist()
    loader = SftLoader(data, 0, batch_size=1, seq_len=lengths[3] + lengths[1] - 1, buffer_size=4)
    (picked, used), = loader.next_packing()
    assert picked == [3, 1] and used == lengths[3] + lengths[1]  # the largest, then the largest that still fits


def test_loader_state_restores_the_exact_batch_stream(template):
    data = SftDataset.build([Conversation.parse(c) for c in conversations(50)], template, 65)
    a = SftLoader(data, 0, batch_size=3, seq_len=64, rank=1, world_size=2)
    for _ in range(5):
        a.next_batch()
    sd = a.state_dict()
    b = SftLoader(data, 0, batch_size=3, seq_len=64, rank=1, world_size=2)
    b.load_state_dict(sd)
    for _ in range(8):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert epoch_batches(data, 3, 64, 0, 1) >= 1
    other = SftDataset.build([Conversation.parse(c) for c in conversations(51)], template, 65)
    with pytest.raises(ValueError, match="render differently"):
        SftLoader(other, 0, batch_size=3, seq_len=64, rank=1, world_size=2).load_state_dict(sd)


# ---------------------------------------------------------------------- a real fine-tune


def test_sft_of_upstreams_checkpoint_learns_and_writes_upstreams_layout(base, reference):
    rows = losses(base, reference)
    train = [rows[(s, "train_loss")] for s in range(STEPS)]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3  # the loss goes down
    assert rows[(STEPS, "val_bpb")] < rows[(0, "val_bpb")]
    meta = cm.read_meta(cm.find_last_complete(run_dir(base, reference)))
    for key in ("step", "val_bpb", "model_config", "user_config"):  # upstream chat_sft's meta keys
        assert key in meta
    assert meta["model_config"]["sequence_len"] == 64 and meta["train_state"] is True
    assert {k: meta["source"][k] for k in ("phase", "tag", "step")} == {"phase": "base", "tag": "ref", "step": 300}
    assert meta["user_config"]["embedding_lr"] == 0.3  # inherited from the base meta, recorded resolved
    opt = torch.load(run_dir(base, reference) / f"optim_{STEPS:06d}_rank0.pt", weights_only=True)
    assert set(opt) == {"state", "param_groups"} and len(opt["param_groups"]) == 10  # upstream's structure
    loaded = cm.load_model(run_dir(base, reference))  # the loader upstream's layout needs
    assert loaded.phase == "sft" and loaded.checkpoint.step == STEPS


# ---------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("fault, resumes_from", [("optim:8", 4), ("meta:8", 8)])
def test_sigkill_mid_save_then_resume_is_bit_identical(base, reference, fault, resumes_from):
    tag = "kill-" + fault.split(":")[0]
    res = run(command(base, tag), base, NANOCHAT_FAULT_KILL_AFTER=fault)
    assert res.returncode == -signal.SIGKILL
    assert cm.find_last_complete(run_dir(base, tag), resumable=True).step == resumes_from
    res = run(command(base, tag, "--resume"), base)
    assert res.returncode == 0, res.stderr
    assert f"resuming {tag}@{resumes_from} (segment 2)" in res.stdout
    assert_bit_identical(weights(base, reference), weights(base, tag))
    assert losses(base, tag) == losses(base, reference)


def test_two_processes_under_torchrun_resume_bit_identically(base):
    flags = [*FLAGS[:FLAGS.index("--total-batch-size")], "--total-batch-size", "512",
             *FLAGS[FLAGS.index("--total-batch-size") + 2:]]
    res = run(command(base, "ddp-ref", nproc=2, flags=flags), base)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run(command(base, "ddp-kill", nproc=2, flags=flags), base, NANOCHAT_FAULT_KILL_AFTER="trainstate:8:1")
    assert res.returncode != 0
    assert cm.find_last_complete(run_dir(base, "ddp-kill"), resumable=True).step == 4
    res = run(command(base, "ddp-kill", "--resume", nproc=2, flags=flags), base)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_bit_identical(weights(base, "ddp-ref"), weights(base, "ddp-kill"))
    assert losses(base, "ddp-kill") == losses(base, "ddp-ref")
    for rank in (0, 1):
        a = torch.load(run_dir(base, "ddp-ref") / f"optim_{STEPS:06d}_rank{rank}.pt", weights_only=True)
        b = torch.load(run_dir(base, "ddp-kill") / f"optim_{STEPS:06d}_rank{rank}.pt", weights_only=True)
        assert a["param_groups"] == b["param_groups"]
        for i in a["state"]:
            for k, v in a["state"][i].items():
                assert torch.equal(v, b["state"][i][k]) if torch.is_tensor(v) else v == b["state"][i][k]


# ---------------------------------------------------------------------- refusals that write nothing


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("extra, fragment", [
    (["--conversations", "/nonexistent/chats.jsonl"], "no such conversation file: /nonexistent/chats.jsonl"),
    (["--conversations", "BAD"], "BAD line 1: not valid JSON"),
    (["--conversations", "BAD", "--skip-invalid"], "no valid conversation in"),
    (["--conversations", "HALF"], "HALF line 3: message 1 is from assistant but should be from user"),
    (["--conversations", "USERS"], "has an assistant turn: there is nothing to train on"),
    (["--max-seq-len", "0"], "--max-seq-len: must be at least 1, got 0"),
    (["--init-lr-frac", "nan"], "--init-lr-frac: must be a finite number, got nan"),
    (["--total-batch-size", "300"], "--total-batch-size 300 is not a multiple of"),
    (["--model-tag", "nope"], "no base checkpoint tagged 'nope'"),
    (["--model-tag", "../x"], "must be a name"),
    (["--resume"], "nothing to resume"),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, extra, fragment):
    files = {"BAD": write_jsonl(tmp_path / "bad.jsonl", [], ("{not json", "[1, 2]")),
             "HALF": write_jsonl(tmp_path / "half.jsonl", conversations(2), ('[{"role": "assistant", "content": "x"}]',)),
             "USERS": write_jsonl(tmp_path / "users.jsonl", [[{"role": "user", "content": "hi"}]] * 3)}
    extra = [str(files.get(a, a)) for a in extra]
    fragment = fragment.replace("BAD", str(files["BAD"])).replace("HALF", str(files["HALF"]))
    base_tag(base, "refuse")
    before = snapshot(base)
    res = run(command(base, "refuse", *extra), base)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and fragment in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert snapshot(base) == before


# ---------------------------------------------------------------------- the registry


def test_registry_indexes_verifies_and_plans_the_exact_resume(base, reference, tmp_path, capsys):
    run_path = run_dir(base, reference)
    db = str(tmp_path / "r.sqlite")
    with open_store(db) as store:
        report = store.scan(base)
        assert report.problems == ()
        ckpts = store.checkpoints(f"sft/{reference}")
        assert [c.step for c in ckpts] == [4, 8, 12] and all(c.resumable and c.complete for c in ckpts)
        for deep in (False, True):
            result = verify.verify(store, str(run_path), deep=deep)
            assert result.with_problems == 0, [r.result.problems for r in result.results]
    plan = plan_resume(run_path)
    assert (plan.phase, plan.mode, plan.script, plan.step) == ("sft", "exact", "scripts.chat_sft", STEPS)
    assert plan.command.endswith(f"--resume-from-step={STEPS}") and f"--model-tag={reference}" in plan.command
    assert f"--conversations={base / 'chats.jsonl'}" in plan.command
    assert registry_cli(["--db", db, "resume", str(run_path)]) == 0
    assert "resume         exact" in capsys.readouterr().out
    # the planned command is the one the trainer prints on a stop (one builder), and it runs
    from scripts.chat_sft import stop_command

    meta = cm.read_meta(cm.find_last_complete(run_path))
    assert plan.command == stop_command(meta["user_config"], run_path, 1, 1, STEPS)
    argv = plan.command_argv
    res = subprocess.run([sys.executable, *argv[1:], "--num-iterations", str(STEPS + 1)], cwd=ROOT,
                         env=env_for(base), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming {reference}@{STEPS}" in res.stdout
