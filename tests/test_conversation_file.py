"""Conversation files: both shapes, invalid lines kept and reported, byte-exact saves, the SFT fit,
the dataset summary, and the command-line tool (in process, plus one real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.conversation import Conversation
from nanochat.conversation_file import (
    ConversationFileError,
    Entry,
    histogram,
    parse_lines,
    read_conversations,
    renumber,
    summarize,
    write_conversations,
)
from nanochat.tokenizer import Tokenizer
from tools.conversation_builder import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests/fixtures/upstream/current/tokenizer"
PLAIN = '[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]'
TOOLS = json.dumps({"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"},
                                      {"type": "python_output", "text": "5"}, {"type": "text", "text": "5."}]}],
    "source": "kept on save"})
GUIDE_IDS = [2039, 2040, 737, 1406, 935, 286, 50, 43, 51, 63, 2041, 2042, 794, 330, 32, 2044, 50, 43, 51, 2045, 2046, 53,
             2047, 53, 46, 2043]
GUIDE_MASK = [0] * 12 + [1] * 8 + [0] * 3 + [1] * 3
BAD_BYTES = b'[{"role":"user","content":"caf\xe9"}]'
FILE = (f"{PLAIN}\n\n{TOOLS}\r\n" '[{"role":"user","content":"a"},{"role":"user","content":"b"}]\n'
        "not json\n").encode() + BAD_BYTES + b"\n" + b'[{"role":"user","content":"only a question"}]\n'


@pytest.fixture(scope="module")
def template():
    return Tokenizer.from_directory(TOKENIZER).chat_template()


@pytest.fixture
def conv_file(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_bytes(FILE)
    return p


def test_read_reports_invalid_lines_with_numbers_and_keeps_them(conv_file):
    entries = read_conversations(conv_file)
    assert [e.line for e in entries] == [1, 3, 4, 5, 6, 7]
    assert [e.valid for e in entries] == [True, True, False, False, False, True]
    assert [e.shape for e in entries] == ["list", "messages", "list", None, None, "list"]
    assert entries[2].error.startswith("message 2 is from user but should be from assistant")
    assert entries[3].error.startswith("not valid JSON")
    assert entries[4].error == "not valid UTF-8 (at character 31)"
    assert all("\n" not in (e.error or "") for e in entries)
    assert entries[1].conversation.has_tool_use and entries[1].conversation.system == "Be brief."


def test_save_keeps_every_line_byte_for_byte_and_only_rewrites_edits(conv_file, tmp_path):
    entries = read_conversations(conv_file)
    out = tmp_path / "out.jsonl"
    assert write_conversations(out, entries) == 6
    assert out.read_bytes() == FILE.replace(b"\n\n", b"\n")  # only the blank line goes
    edited = Conversation.parse([{"role": "user", "content": "Héllo"}, {"role": "assistant", "content": "Bonjour"}])
    entries[0] = Entry.from_conversation(edited, "messages", entries[0].line)
    write_conversations(out, [*entries, edited])
    again = read_conversations(out)
    assert json.loads(again[0].raw) == {"messages": edited.to_messages()} and "Héllo" in again[0].raw
    assert again[1].raw == TOOLS + "\r" and again[-1].conversation == edited and again[-1].shape == "list"
    assert [e.line for e in renumber(again)] == list(range(1, 8))
    assert conv_file.read_bytes() == FILE  # the original is never touched by reading or saving elsewhere


def test_file_errors_are_one_line(tmp_path):
    for path, needle in [(tmp_path / "missing.jsonl", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(ConversationFileError, match=needle):
            read_conversations(path)
    with pytest.raises(ConversationFileError, match="cannot write"):
        write_conversations(tmp_path / "no" / "dir.jsonl", [])
    with pytest.raises(ConversationFileError, match="unknown shape"):
        Entry.from_conversation(Conversation.parse(json.loads(PLAIN)), "yaml")
    assert parse_lines("") == [] and parse_lines("\n  \n") == []


def test_summary_against_the_sequence_length(conv_file, template):
    entries = read_conversations(conv_file)
    s = summarize(entries, template, seq_len=20)
    assert (s.conversations, s.invalid, s.tool_use, s.no_assistant) == (3, 3, 1, 1)
    assert sorted(s.lengths) == [8, 10, 26]
    assert s.too_long == 1 and s.cut == 0  # the 26-token one does not fit a row of 21
    assert s.supervised_tokens == 4 + 11 and s.tokens == 44
    assert s.as_dict()["supervised_share"] == pytest.approx(15 / 44)
    assert sum(b.count for b in s.histogram) == 3
    cut = summarize(entries, template, seq_len=20, max_tokens=12)
    assert cut.cut == 1 and cut.too_long == 0 and max(cut.lengths) == 26
    with pytest.raises(ConversationFileError, match="sequence length"):
        summarize(entries, template, seq_len=0)


def test_histogram_bins_are_round_and_split_at_the_mark():
    bins = histogram([0, 5, 99, 1000, 2049, 2050], mark=2049)
    assert bins[0].start == 0 and bins[-1].end > 2050 and sum(b.count for b in bins) == 6
    assert all(a.end == b.start for a, b in zip(bins, bins[1:]))
    assert any(b.start == 2049 for b in bins) and any(b.end == 2049 for b in bins)
    widths = {b.end - b.start for b in bins if 2049 not in (b.start, b.end)}
    assert len(widths) == 1 and widths.pop() in (100, 200, 500)
    assert next(b for b in bins if b.start == 2049).count == 2
    assert histogram([], mark=1)[0].count == 0 and histogram([3], mark=3)[-1].count == 1


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_lists_ids_and_mask_or_error_per_line(conv_file, capsys):
    code, out, err = run_cli(capsys, conv_file, "--tokenizer", TOKENIZER, "--json", "--seq-len", "20")
    assert code == 3 and err == ""
    doc = json.loads(out)
    assert set(doc) == {"file", "tokenizer", "seq_len", "max_tokens", "conversations", "summary"}
    rows = {r["line"]: r for r in doc["conversations"]}
    assert rows[3]["ids"] == GUIDE_IDS and rows[3]["mask"] == GUIDE_MASK
    assert rows[3]["fits"] is False and rows[3]["tool_use"] is True and "tokens" not in rows[3]
    assert set(rows[4]) == {"line", "error"} and "should be from assistant" in rows[4]["error"]
    assert doc["summary"]["too_long"] == 1 and doc["summary"]["invalid"] == 3


def test_cli_text_and_show_tokens(conv_file, capsys, tmp_path):
    code, out, _ = run_cli(capsys, conv_file, "--tokenizer", TOKENIZER, "--show-tokens", "--seq-len", "20")
    assert code == 3
    assert "line 5: invalid: not valid JSON" in out and "TOO LONG" in out and "<- row capacity" in out
    assert "2039 0 <|bos|>" in out and " 794 1 It" in out
    good = tmp_path / "good.jsonl"
    good.write_text(PLAIN + "\n")
    code, out, _ = run_cli(capsys, good, "--tokenizer", TOKENIZER)
    assert code == 0 and "1 valid conversations, 0 invalid lines" in out


@pytest.mark.parametrize("args, code, needle", [
    (["missing.jsonl", "--tokenizer", TOKENIZER], 1, "error: no such file"),
    (["GOOD", "--tokenizer", "/nonexistent"], 1, "error: no tokenizer directory"),
    (["GOOD", "--tokenizer", TOKENIZER, "--seq-len", "0"], 1, "error: the sequence length"),
    (["GOOD", "--tokenizer", TOKENIZER, "--max-tokens", "-5"], 1, "error: --max-tokens"),
    (["GOOD", "--tokenizer", TOKENIZER / "tokenizer.pkl"], 1, "error: no tokenizer directory"),
])
def test_cli_bad_input_is_one_line(args, code, needle, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(PLAIN + "\n")
    got, out, err = run_cli(capsys, *[good if a == "GOOD" else a for a in args])
    assert got == code and err.startswith(needle) and err.count("\n") == 1 and out == ""


def test_cli_as_a_script_help_and_usage_errors():
    script = ROOT / "tools" / "conversation_builder.py"
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag
    proc = subprocess.run([sys.executable, script, "x.jsonl", "--seq-len", "many"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_readme_documents_the_tool():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: chat -->")[1].split("<!-- end section: chat -->")[0]
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert f"`{flag}" in section, flag
    for key in ('"ids"', '"mask"', '"error"', '"too_long"', '"supervised_share"', "Exit codes"):
        assert key in section, key


def test_append_keeps_every_byte_and_picks_the_shape(tmp_path):
    from nanochat.conversation_file import append_conversation

    p = tmp_path / "chat.jsonl"
    plain = Conversation.parse([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    tools = Conversation.parse([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}]}])
    assert append_conversation(p, plain) == 1
    before = b'{not json\n\n' + b'\xff\xfe bad bytes'  # an invalid line, a blank one, bad UTF-8, no final newline
    p.write_bytes(before)
    assert append_conversation(p, tools) == 4
    assert p.read_bytes().startswith(before + b"\n")
    entries = read_conversations(p)
    assert [e.valid for e in entries] == [False, False, True] and entries[-1].shape == "messages"
    assert entries[-1].conversation == tools
    assert append_conversation(p, plain) == 5 and read_conversations(p)[-1].shape == "list"
    with pytest.raises(ConversationFileError, match="no such folder"):
        append_conversation(tmp_path / "nope" / "x.jsonl", plain)
    with pytest.raises(ConversationFileError, match="directory"):
        append_conversation(tmp_path, plain)
