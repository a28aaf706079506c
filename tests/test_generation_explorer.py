"""tools/generation_explorer.py driven as a subprocess on tiny real checkpoints (and the upstream fixture)."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine, SamplingSettings, TraceOptions
from nanochat.gpt import GPT, GPTConfig
from tests.modelkit import random_model, tiny_tokenizer, write_checkpoint
from tools.generation_explorer import DEFAULT_TEMPS, DEFAULT_TOPKS, DEFAULT_TOPPS, build_parser, main, visible

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "generation_explorer.py"
VOCAB = 300
CONFIG = GPTConfig(sequence_len=48, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")
PROMPT = "Now is the winter of our discontent"


def run(*args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOCHAT_BASE_DIR": "/nonexistent-base-dir"}
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def run_many(commands: list[list]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda a: run(*a), commands))


def run_here(capsys, *args) -> subprocess.CompletedProcess:
    """The same entry point in this process (no torch start-up): for long tables of variations."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A base run with steps 10 and 20 of a tiny random GPT, tokenizer beside it."""
    root = tmp_path_factory.mktemp("explorer")
    run_dir = root / "base_checkpoints" / "tiny"
    tok = tiny_tokenizer(VOCAB)
    write_checkpoint(run_dir, random_model(CONFIG, seed=3, scale=1.0), step=10, tokenizer=tok)
    write_checkpoint(run_dir, random_model(CONFIG, seed=4, scale=1.0), step=20, tokenizer=tok)
    return run_dir


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """An SFT run whose model always predicts <|assistant_end|>: every position's final hidden state
    is the same vector (identical embeddings, identity blocks), and only that token's unembedding
    row is non-zero."""
    root = tmp_path_factory.mktemp("explorer_sft")
    run_dir = root / "chatsft_checkpoints" / "tiny"
    tok = tiny_tokenizer(VOCAB)
    model = GPT(CONFIG)
    model.init_weights(seed=0)  # zero output projections: every block starts as the identity
    with torch.no_grad():
        v = torch.randn(CONFIG.n_embd, generator=torch.Generator().manual_seed(0))
        model.transformer.wte.weight.copy_(v.expand_as(model.transformer.wte.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 10 * v / v.pow(2).mean().sqrt()
    write_checkpoint(run_dir, model.eval(), step=5, tokenizer=tok)
    return run_dir


def one_line_error(proc, code=1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---------------------------------------------------------------------- reference and flags


def test_upstream_fixture_at_temperature_zero_prints_the_reference_continuation(upstream_dir):
    base = upstream_dir / "current"
    ref = json.loads((base / "reference_generation.json").read_text())
    proc = run("--checkpoint", base / "base_checkpoints" / "d2", "--prompt", ref["prompt_text"], "--temperature", "0",
               "--max-tokens", ref["max_tokens"])
    assert proc.returncode == 0 and proc.stderr == ""
    assert ref["generated_text"] in proc.stdout
    assert proc.stdout.rstrip("\n").endswith(ref["generated_text"])
    assert "(14 tokens)" in proc.stdout and "finished: length" in proc.stdout


def test_help_lists_every_flag():
    proc = run("--help")
    assert proc.returncode == 0
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag


def test_json_agrees_with_the_engine_trace(base_run):
    args = ["--checkpoint", base_run, "--prompt", PROMPT, "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
            "--min-p", "0.02", "--seed", "5", "--max-tokens", "8", "--num-alternatives", "4", "--watch", "3", "7", "--json"]
    proc = run(*args)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"checkpoint", "mode", "prompt", "chat", "prompt_token_ids", "max_tokens", "rows"}
    assert doc["mode"] == "generate" and doc["chat"] is False and doc["max_tokens"] == 8
    assert doc["checkpoint"]["step"] == 20 and doc["checkpoint"]["phase"] == "base" and doc["checkpoint"]["tag"] == "tiny"
    loaded = load_model(base_run)
    engine = Engine(loaded.model, loaded.tokenizer)
    assert doc["prompt_token_ids"] == engine.encode(PROMPT)
    settings = SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=5)
    want = engine.generate(engine.encode(PROMPT), settings, 8, trace=TraceOptions(top_n=4, watch=(3, 7)))[0]
    (row,) = doc["rows"]
    assert set(row) == {"row", "settings", "token_ids", "text", "finish_reason", "steps"}
    assert row["settings"] == settings.as_dict()
    assert row["token_ids"] == list(want.token_ids) and row["text"] == want.text
    assert row["finish_reason"] == want.finish_reason
    assert len(row["steps"]) == len(want.trace)
    for got, t in zip(row["steps"], want.trace):
        assert set(got) == {"step", "token_id", "token", "model_prob", "sampled_prob", "rank", "forced", "entropy_nats",
                            "alternatives", "watched"}
        assert (got["step"], got["token_id"], got["rank"], got["forced"]) == (t.step, t.token_id, t.rank, t.forced)
        assert got["token"] == loaded.tokenizer.decode([t.token_id])
        assert got["model_prob"] == pytest.approx(t.model_prob) and got["sampled_prob"] == pytest.approx(t.sampled_prob)
        assert got["entropy_nats"] == pytest.approx(t.entropy)
        assert [a["token_id"] for a in got["alternatives"]] == [a.token_id for a in t.alternatives]
        for a, b in zip(got["alternatives"], t.alternatives):
            assert set(a) == {"token_id", "token", "model_prob", "sampled_prob", "kept"}
            assert a["model_prob"] == pytest.approx(b.model_prob) and a["kept"] == b.kept
            assert a["sampled_prob"] == pytest.approx(b.sampled_prob)
        assert [(w["token_id"], w["rank"]) for w in got["watched"]] == [(w.token_id, w.rank) for w in t.watched]
        assert all(set(w) == {"token_id", "token", "rank", "model_prob"} for w in got["watched"])


def test_comparisons_run_one_row_per_setting_and_sample(base_run, capsys):
    common = ["--checkpoint", base_run, "--prompt", PROMPT, "--max-tokens", "6", "--json", "--seed", "11"]
    procs = run_many([
        [*common, "--compare-temp", "0.5", "1.0", "--num-samples", "2"],
        [*common, "--compare-topk", "5", "none", "--num-samples", "1", "--temperature", "1.1"],
        [*common, "--compare-topp", "0.5", "--num-samples", "2"],
    ])
    procs += [run_here(capsys, *common, "--compare-temp"), run_here(capsys, *common, "--compare-topk"),
              run_here(capsys, *common, "--compare-topp", "--num-samples", "1")]
    docs = []
    for p in procs:
        assert p.returncode == 0, p.stderr
        docs.append(json.loads(p.stdout))
    temps, topks, topps, dtemps, dtopks, dtopps = docs
    assert temps["mode"] == "compare-temp"
    assert [(r["settings"]["temperature"], r["settings"]["seed"]) for r in temps["rows"]] == \
        [(0.5, 11), (0.5, 12), (1.0, 11), (1.0, 12)]
    assert [(r["settings"]["top_k"], r["settings"]["temperature"]) for r in topks["rows"]] == [(5, 1.1), (None, 1.1)]
    assert [r["settings"]["top_p"] for r in topps["rows"]] == [0.5, 0.5]
    assert [r["settings"]["temperature"] for r in dtemps["rows"]] == [t for t in DEFAULT_TEMPS for _ in range(3)]
    assert [r["settings"]["top_k"] for r in dtopks["rows"]] == [k for k in DEFAULT_TOPKS for _ in range(3)]
    assert [r["settings"]["top_p"] for r in dtopps["rows"]] == DEFAULT_TOPPS
    # every row is what its settings give alone (the comparison ran batched, in one engine call)
    loaded = load_model(base_run)
    engine = Engine(loaded.model, loaded.tokenizer)
    for row in temps["rows"] + topks["rows"]:
        alone = engine.generate(engine.encode(PROMPT), SamplingSettings(**row["settings"]), 6)[0]
        assert row["token_ids"] == list(alone.token_ids)


def test_comparison_text_output_one_block_per_setting(base_run):
    proc = run("--checkpoint", base_run, "--prompt", PROMPT, "--max-tokens", "5", "--compare-topk", "5", "none",
               "--num-samples", "2", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "top_k comparison" in out and "4 rows in one batch" in out
    assert out.count("--- temperature=0 top_k=5") == 1 and out.count("--- temperature=0 top_k=none") == 1
    assert out.count("  seed 42 [") == 2 and out.count("  seed 43 [") == 2
    assert "temperature 0 is greedy" in out


def test_show_probs_prints_each_step_with_alternatives_and_entropy(base_run):
    tok = tiny_tokenizer(VOCAB)
    space, newline = tok.encode(" ")[0], tok.encode("\n")[0]
    proc = run("--checkpoint", base_run, "--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0", "--show-probs",
               "--num-alternatives", "3", "--watch", space, newline)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 1", "step 2", "step 3", "step 4"]
    assert all("nats" in s and "p=" in s and "rank 1" in s for s in steps)  # greedy: the top token
    assert sum("<- sampled" in line for line in lines) == 4  # marked among the alternatives
    assert sum(line.strip().startswith(("1.", "2.", "3.")) for line in lines) == 12
    assert any(f'watch [{space}] "·"' in line for line in lines)
    assert any(f'watch [{newline}] "↵"' in line for line in lines)
    assert visible(" a\tb\n\r") == "·a⇥b↵␍"


def test_step_flag_and_text_output(base_run):
    procs = run_many([["--checkpoint", base_run, "--prompt", PROMPT, "--step", "10", "--max-tokens", "3", "--temperature", "0"],
                      ["--checkpoint", base_run / "model_000010.pt", "--prompt", PROMPT, "--max-tokens", "3",
                       "--temperature", "0", "--device", "cpu"]])
    for proc in procs:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert "(step 10, base, tiny)" in proc.stdout
    assert procs[0].stdout == procs[1].stdout
    loaded = load_model(base_run, step=10)
    engine = Engine(loaded.model, loaded.tokenizer)
    text = engine.generate(engine.encode(PROMPT), SamplingSettings(temperature=0), 3)[0].text
    assert procs[0].stdout.endswith(f"continuation (3 tokens, finished: length):\n{text}\n")


def test_chat_checkpoints_wrap_the_prompt_and_stop_at_assistant_end(sft_run, base_run):
    tok = tiny_tokenizer(VOCAB)
    end = tok.encode_special("<|assistant_end|>")
    sft, no_chat, base_chat = run_many([
        ["--checkpoint", sft_run, "--prompt", "hello", "--json", "--temperature", "0"],
        ["--checkpoint", sft_run, "--prompt", "hello", "--json", "--no-chat"],
        ["--checkpoint", base_run, "--prompt", "hello", "--json", "--chat", "--max-tokens", "2"],
    ])
    doc = json.loads(sft.stdout)
    assert doc["chat"] is True and doc["checkpoint"]["phase"] == "sft"
    assert doc["prompt_token_ids"] == tok.render_chat_prompt([{"role": "user", "content": "hello"}])
    row = doc["rows"][0]
    assert row["token_ids"] == [end] and row["finish_reason"] == "stop" and row["text"] == ""
    doc = json.loads(no_chat.stdout)
    assert doc["chat"] is False and doc["prompt_token_ids"] == tok.encode("hello", prepend="<|bos|>")
    assert doc["rows"][0]["finish_reason"] == "stop"
    doc = json.loads(base_chat.stdout)
    assert doc["chat"] is True and doc["prompt_token_ids"][-1] == tok.encode_special("<|assistant_start|>")


# ---------------------------------------------------------------------- bad input


def test_bad_input_gives_one_line_and_a_nonzero_exit(base_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "base_checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(base_run, broken / "base_checkpoints" / "tiny")
    (broken / "tokenizer").mkdir()
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    ck = ["--checkpoint", base_run, "--prompt", PROMPT]
    cases = {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope", "--prompt", "x"], "does not exist"),
        "wrong step": ([*ck, "--step", "15"], "no step 15"),
        "unreadable tokenizer": (["--checkpoint", broken / "base_checkpoints" / "tiny", "--prompt", "x"], "tokenizer"),
        "negative temperature": ([*ck, "--temperature", "-1"], "temperature"),
        "nan temperature": ([*ck, "--temperature", "nan"], "temperature"),
        "top-k": ([*ck, "--top-k", "-3"], "top_k"),
        "top-p zero": ([*ck, "--top-p", "0"], "top_p"),
        "top-p above one": ([*ck, "--top-p", "1.5"], "top_p"),
        "min-p": ([*ck, "--min-p", "1"], "min_p"),
        "seed": ([*ck, "--seed", "-1"], "seed"),
        "max tokens": ([*ck, "--max-tokens", "0"], "max-tokens"),
        "num samples": ([*ck, "--num-samples", "0", "--compare-temp"], "num-samples"),
        "alternatives": ([*ck, "--num-alternatives", "-1"], "num-alternatives"),
        "compare value": ([*ck, "--compare-temp", "0.5", "-2"], "temperature"),
        "compare top-p": ([*ck, "--compare-topp", "0"], "top_p"),
        "watched id": ([*ck, "--watch", "99999"], "vocabulary"),
        "long prompt": (["--checkpoint", base_run, "--prompt", "word " * 200], "context"),
        "empty prompt": (["--checkpoint", base_run, "--prompt", ""], "empty"),
        "device": ([*ck, "--device", "nonsense"], "device"),
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ([*ck, "--device", "cuda"], "CUDA")
    # Every case through the entry point in-process; the main kinds also as real subprocesses.
    as_subprocess = ["missing checkpoint", "wrong step", "unreadable tokenizer", "negative temperature",
                     "top-p above one", "long prompt", "device"]
    procs = run_many([cases[name][0] for name in as_subprocess])
    results = list(zip(as_subprocess, procs)) + [(name, run_here(capsys, *args)) for name, (args, _) in cases.items()]
    for name, proc in results:
        line = one_line_error(proc)
        assert line.startswith("error: ") and cases[name][1] in line, (name, line)
        assert proc.stdout == "", name


def test_usage_errors_exit_2_with_one_line(base_run, capsys):
    cases = [[], ["--checkpoint", base_run], ["--checkpoint", base_run, "--prompt", "x", "--temperature", "hot"],
             ["--checkpoint", base_run, "--prompt", "x", "--top-k", "many"],
             ["--checkpoint", base_run, "-i", "--json"],
             ["--checkpoint", base_run, "--prompt", "x", "--compare-temp", "--compare-topk"]]
    for proc in run_many(cases[:2]) + [run_here(capsys, *args) for args in cases]:
        line = one_line_error(proc, code=2)
        assert line.startswith("generation_explorer: error:")


# ---------------------------------------------------------------------- interactive


def test_interactive_commands_through_stdin(base_run):
    script = "\n".join([
        "help", "temp abc", "temp -1", "temp 0", "topk x", "topk 5", "topk none", "topk -2", "topp 2", "topp 0.9",
        "minp 1", "minp 0.05", "seed -3", "seed x", "seed 7", "tokens 0", "tokens many", "tokens 3", "settings",
        "probs", PROMPT, "probs", "compare-temp", "compare-temp " + PROMPT, "compare-topk " + PROMPT,
        "compare-topp " + PROMPT, "gen", "gen temp is a prompt", "", "temp 0.7", "quit", "never reached",
    ]) + "\n"
    proc = run("--checkpoint", base_run, "-i", stdin=script)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    expected_in_order = [
        "commands:", "compare-topk PROMPT",
        "error: temp needs a number >= 0", "error: temperature must be a finite number >= 0",
        "settings: temperature=0 top_k=none", "error: topk needs an integer or 'none'",
        "settings: temperature=0 top_k=5", "settings: temperature=0 top_k=none", "error: top_k must be",
        "error: top_p must be in (0, 1]", "top_p=0.9", "error: min_p must be in [0, 1)", "min_p=0.05",
        "error: seed must be", "error: seed needs an integer", "seed=7",
        "error: max_tokens must be an integer >= 1", "error: tokens needs an integer", "max tokens: 3",
        "settings: temperature=0 top_k=none top_p=0.9 min_p=0.05 seed=7, max 3 tokens, probabilities off, chat off",
        "probabilities: on", f'prompt: "{PROMPT}"', "step 1:", "step 3:", "continuation (3 tokens",
        "probabilities: off", "error: compare-temp needs a prompt",
        "temperature comparison", "15 rows in one batch", "--- temperature=1.5",
        "top_k comparison", "12 rows in one batch", "top_p comparison", "--- temperature=0 top_k=none top_p=0.5",
        "error: gen needs a prompt", 'prompt: "temp is a prompt"', "settings: temperature=0.7",
    ]
    pos = 0
    for needle in expected_in_order:
        found = out.find(needle, pos)
        assert found >= 0, f"{needle!r} not found after position {pos}:\n{out[pos:pos + 800]}"
        pos = found + len(needle)
    assert len(re.findall(r"^(?:> )?step \d+:", out, flags=re.M)) == 3  # probabilities only while on
    assert "never reached" not in out and "Traceback" not in out


def test_interactive_exits_cleanly_on_eof(base_run):
    proc = run("--checkpoint", base_run, "-i", "--temperature", "0", "--max-tokens", "2", stdin=f"{PROMPT}\n")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "continuation (2 tokens" in proc.stdout


class Reader:
    """Reads a pipe or pty until a marker appears, keeping what came after it for the next call."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def until(self, marker: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {marker!r}; got {self.buf[-500:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the pty closed
                    chunk = b""
                assert chunk, f"closed while waiting for {marker!r}; got {self.buf[-500:]!r}"
                self.buf += chunk
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out


def test_interactive_ctrl_c_at_the_prompt_exits_cleanly(base_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(TOOL), "--checkpoint", str(base_run), "-i"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        Reader(proc.stdout.fileno()).until(b"> ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == b""


def test_interactive_on_a_tty_has_line_editing_and_history(base_run):
    """With a terminal, readline is active: the up arrow recalls the previous line."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, str(TOOL), "--checkpoint", str(base_run), "-i"], stdin=slave,
                            stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    tty = Reader(master)
    try:
        tty.until(b"> ")
        os.write(master, b"temp 0.25\r")
        tty.until(b"temperature=0.25")
        tty.until(b"> ")
        os.write(master, b"seed 9\r")
        tty.until(b"seed=9")
        tty.until(b"> ")
        os.write(master, b"\x1b[A\x1b[A\x1b[D\x1b[D3\r")  # up twice: 'temp 0.25'; left twice; type 3: 'temp 0.325'
        tty.until(b"settings: temperature=0.325")
        tty.until(b"> ")
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


def test_readme_documents_every_flag_and_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: engine -->")[1].split("<!-- end section: engine -->")[0]
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert f"`{flag}" in section or f"{flag}`" in section or f" {flag} " in section, flag
    from tools.generation_explorer import HELP

    for line in HELP.splitlines()[2:]:
        word = line.split()[0]
        assert f"`{word}" in section, word
    for key in ("entropy_nats", "sampled_prob", "finish_reason", "prompt_token_ids", "kept", "watched"):
        assert f'"{key}"' in section, key


def test_interactive_chat_mode_keeps_turns_runs_the_tool_loop_and_saves(base_run, tmp_path, capsys, monkeypatch):
    import io

    from nanochat.conversation_file import read_conversations

    asked = []
    real = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, ids, *a, **kw: asked.append((list(ids), kw)) or real(self, ids, *a, **kw))
    saved = tmp_path / "chats.jsonl"
    script = "\n".join(["chat", "/history", "/save " + str(saved), "/undo", "Good morrow", "/temp 0", "And then?",
                        "/history", "/save", "/save " + str(saved), "/undo", "/save " + str(tmp_path / "no" / "x.jsonl"),
                        "/reset", "/history", "/end", "/history", "quit"]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    proc = run_here(capsys, "--checkpoint", base_run, "-i", "--max-tokens", "4", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    expected_in_order = [
        "chat mode: every line is your turn", "note: a base checkpoint", "(empty conversation)",
        "error: nothing to save yet", "error: nothing to undo", "model> ", "tokens,", "context tokens]",
        "settings: temperature=0", "model> ", "you> Good morrow", "you> And then?", "error: save needs a file",
        f"saved as line 1 of {saved}", "removed the last exchange (1 left)", "error: no such folder",
        "new conversation", "(empty conversation)", "chat mode off",
    ]
    pos = 0
    for needle in expected_in_order:
        found = out.find(needle, pos)
        assert found >= 0, f"{needle!r} not found after position {pos}:\n{out[pos:pos + 800]}"
        pos = found + len(needle)
    assert [kw.get("tools") for _, kw in asked] == [True, True, False]  # after /end a line is a plain prompt again
    tok = tiny_tokenizer(VOCAB)
    assert asked[0][0] == tok.render_chat_prompt([{"role": "user", "content": "Good morrow"}])
    second = asked[1][0]
    assert second[:len(asked[0][0])] == asked[0][0] and len(second) > len(asked[0][0])  # the whole conversation
    entry = read_conversations(saved)[0]
    assert [m["role"] for m in entry.conversation.to_messages()] == ["user", "assistant", "user", "assistant"]
