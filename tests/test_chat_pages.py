"""The chat pages under streamlit.testing.v1.AppTest: the Conversation builder renders a file's summary, browses and
filters it, edits a conversation turn by turn (add, reorder, delete, tool-call parts), saves only what was edited,
follows a run's sequence length, and turns bad input into messages, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "streamlit_app" / "app.py"
TOKENIZER = ROOT / "tests/fixtures/upstream/current/tokenizer"
PLAIN = '[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]'
TOOLS = json.dumps({"messages": [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}]}]})
LONG = json.dumps([{"role": "user", "content": "To be, or not to be " * 12}, {"role": "assistant", "content": "Aye."}])
TWO_USERS = '[{"role":"user","content":"a"},{"role":"user","content":"b"}]'
FILE = "\n".join([PLAIN, TOOLS, "{not json", LONG, TWO_USERS]) + "\n"


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch, tmp_path):
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(tmp_path / "no-registry" / "registry.sqlite"))  # no runs
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def conv_file(tmp_path) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text(FILE, encoding="utf-8")
    return p


def open_builder(query: dict) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    at.switch_page("app_pages/conversations.py")
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def click(at: AppTest, label: str) -> AppTest:
    at.button[[b.label for b in at.button].index(label)].click().run()
    assert_clean(at)
    return at


def file_table(at: AppTest):
    return next(d.value for d in at.dataframe if "line" in d.value.columns)


def page_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error if "no-registry" not in e.value]  # the sidebar reports the absent registry


def test_builder_summarises_a_file_against_the_sequence_length(conv_file):
    at = open_builder({"tok": TOKENIZER, "file": conv_file})
    assert metric(at, "Conversations").value == "3" and metric(at, "Invalid lines").value == "2"
    assert metric(at, "Too long for SFT").value == "0.0%"
    at.number_input(key="seq_None").set_value(40).run()  # the long conversation no longer fits a row of 41
    assert_clean(at)
    assert metric(at, "Too long for SFT").value == "33.3%"
    assert any("never packs them" in w.value for w in at.warning)
    hist = at.get("vega_lite_chart")
    assert hist, "the length histogram is drawn"
    assert any("--seq-len 40" in c.value for c in at.caption)


def test_browse_filters_and_lists_invalid_lines_with_reasons(conv_file):
    at = open_builder({"tok": TOKENIZER, "file": conv_file})
    table = file_table(at)
    assert list(table["line"]) == [1, 2, 3, 4, 5]
    bad = table[~table["valid"]].set_index("line")["error"]
    assert bad[3].startswith("not valid JSON") and bad[5].startswith("message 2 is from user but should be from assistant")
    at.selectbox(key="cb_show").set_value("invalid").run()
    assert list(file_table(at)["line"]) == [3, 5]
    at.selectbox(key="cb_show").set_value("all").run()
    at.selectbox(key="cb_tools").set_value("with").run()
    assert list(file_table(at)["line"]) == [2]


def test_edit_a_line_and_save_rewrites_only_that_line(conv_file):
    at = open_builder({"tok": TOKENIZER, "file": conv_file})
    at.number_input(key="cb_line").set_value(1).run()
    click(at, "Open in the editor")
    assert any("Editing line 1" in c.value for c in at.caption)
    boxes = [t for t in at.text_area if t.key.startswith("cb_text_")]
    assert [t.value for t in boxes] == ["Hi", "Hello"]
    boxes[1].set_value("Well met.").run()
    click(at, "Save to line 1")
    assert any("Saved 5 lines" in s.value for s in at.success)
    lines = conv_file.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])[1]["content"] == "Well met."
    assert lines[1:] == FILE.splitlines()[1:]  # untouched and invalid lines kept byte for byte
    click(at, "Append to file")
    assert len(conv_file.read_text(encoding="utf-8").splitlines()) == 6


def test_turns_are_added_reordered_deleted_and_get_tool_parts(conv_file):
    at = open_builder({"tok": TOKENIZER, "file": conv_file})
    click(at, "Clear")
    assert metric(at, "Tokens").value == "5"  # <|bos|> and the start and end tokens of two empty turns
    assert any("empty" in w.value for w in at.warning)
    turns = [t for t in at.text_area if t.key.startswith("cb_text_")]
    turns[0].set_value("What is 2+3?")
    turns[1].set_value("It is 5.").run()
    click(at, "Parts")  # the assistant turn becomes one text part
    click(at, "+ tool call")
    part_boxes = [t for t in at.text_area if t.key.startswith("cb_ptext_")]
    part_boxes[-1].set_value("2+3").run()
    assert metric(at, "Tool calls").value == "1"
    html = next(m.value for m in at.markdown if "&lt;|python_start|&gt;" in m.value)
    assert "&lt;|python_end|&gt;" in html
    click(at, "System message")
    first = [b for b in at.button if b.key and b.key.startswith("down_")][0]
    first.click().run()  # the system message moved below the user turn: wrong order, a message
    assert_clean(at)
    assert any("message 2 is from system but should be from assistant" in e for e in page_errors(at))
    up = [b for b in at.button if b.key and b.key.startswith("up_")][1]
    up.click().run()  # back on top: valid again
    assert not page_errors(at)
    [b for b in at.button if b.key and b.key.startswith("del_")][0].click().run()  # drop the system message
    assert_clean(at)
    assert [t.value for t in at.text_area if t.key.startswith("cb_text_")] == ["What is 2+3?"]


def test_bad_tokenizer_missing_file_and_deleting_every_turn(tmp_path, conv_file):
    at = open_builder({"tok": tmp_path / "nowhere", "file": conv_file})
    assert any("no tokenizer folder" in e for e in page_errors(at))
    at = open_builder({"tok": TOKENIZER, "file": tmp_path / "new.jsonl"})
    assert any("No file at" in i.value for i in at.info)
    while [b for b in at.button if b.key and b.key.startswith("del_")]:
        [b for b in at.button if b.key and b.key.startswith("del_")][0].click().run()
        assert_clean(at)
    assert any("the conversation is empty" in e for e in page_errors(at))
    click(at, "User turn")
    click(at, "Assistant turn")
    assert not page_errors(at)
    click(at, "Append to file")
    assert (tmp_path / "new.jsonl").read_text(encoding="utf-8") == \
        '[{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]\n'


def test_a_runs_tokenizer_and_sequence_length_are_used(demo_base, tmp_path, monkeypatch, conv_file):
    reg = tmp_path / "reg"
    reg.mkdir()
    for f in demo_base.glob("registry.sqlite*"):
        shutil.copy(f, reg / f.name)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(reg / "registry.sqlite"))
    at = open_builder({"run": "base/d2", "file": conv_file})
    seq = next(n for n in at.number_input if n.key.startswith("seq_"))
    assert seq.value < 2048  # the demo run's sequence length, not the default
    assert any("Tokenizer:" in c.value and str(demo_base) in c.value for c in at.caption)
    assert metric(at, "Conversations").value == "3"
