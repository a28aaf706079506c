"""The chat pages under streamlit.testing.v1.AppTest: the Conversation builder renders a file's summary, browses and
filters it, edits a conversation turn by turn (add, reorder, delete, tool-call parts), saves only what was edited,
follows a run's sequence length, and turns bad input into messages, never a traceback. The Chat page talks to tiny
real checkpoints (an SFT run listed first, a base run), streams replies through the engine's tool loop, shows the
token view, branches, regenerates, edits, deletes and saves, and refuses bad input with a message."""

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


def test_the_demo_opens_its_play_conversations_first(demo_base, tmp_path, monkeypatch):
    """On the demo's base dir the builder opens the conversations the demo made from the plays (real data on
    first start), summarised with the demo run's tokenizer and sequence length: every one fits an SFT row."""
    base = tmp_path / "demo"
    shutil.copytree(demo_base, base, ignore=shutil.ignore_patterns("*.pt"))  # the page needs no weights
    monkeypatch.delenv("NANOCHAT_REGISTRY_URL")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    at = open_builder({"run": "base/d2"})
    assert at.text_input(key="file").value == str(base / "conversations" / "plays.jsonl")
    lines = (base / "conversations" / "plays.jsonl").read_text(encoding="utf-8").splitlines()
    assert metric(at, "Conversations").value == f"{len(lines):,}"
    assert metric(at, "Too long for SFT").value == "0.0%" and metric(at, "Invalid lines").value == "0"


# ---------------------------------------------------------------------- the Chat page


CHAT_CONFIG = dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A base dir with a tiny SFT run and a tiny base run (random GPTs, a chat tokenizer), indexed into a registry."""
    from nanochat.gpt import GPTConfig
    from registry import open_store
    from tests.modelkit import random_model, tiny_tokenizer, write_checkpoint

    base = tmp_path_factory.mktemp("chat_base")
    tok = tiny_tokenizer(300)
    write_checkpoint(base / "base_checkpoints" / "tiny", random_model(GPTConfig(**CHAT_CONFIG), seed=3), step=10,
                     tokenizer=tok)
    write_checkpoint(base / "chatsft_checkpoints" / "tiny", random_model(GPTConfig(**CHAT_CONFIG), seed=4), step=5,
                     tokenizer=tok)
    with open_store(base / "registry.sqlite") as s:
        s.scan(base)
    return base


@pytest.fixture
def chat_registry(chat_base, tmp_path, monkeypatch) -> Path:
    reg = tmp_path / "reg"
    reg.mkdir()
    for f in chat_base.glob("registry.sqlite*"):
        shutil.copy(f, reg / f.name)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(reg / "registry.sqlite"))
    return reg / "registry.sqlite"


def open_chat(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.switch_page("app_pages/chat.py")
    for k, v in (query or {}).items():
        at.query_params[k] = str(v)
    at.run()
    assert_clean(at)
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="chat_message").set_value(text).run()
    assert_clean(at)
    return at


def chat_turns(at: AppTest) -> list[dict]:
    return at.session_state["chat_state"]["turns"]


def test_on_the_demo_the_chat_page_opens_its_sft_model_and_it_answers(demo_base, tmp_path, monkeypatch):
    """The demo's chat model (its final run fine-tuned on the plays' dialogue) is the Chat page's default, and a
    reply comes back through the page."""
    reg = tmp_path / "reg"
    reg.mkdir()
    for f in demo_base.glob("registry.sqlite*"):
        shutil.copy(f, reg / f.name)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(reg / "registry.sqlite"))
    at = open_chat({"n": 8})
    assert "sft/d2" in at.selectbox(key="run").format_func(at.selectbox(key="run").value)
    assert not any("base model" in i.value for i in at.info)
    send(at, "ROMEO: What light through yonder window breaks?")
    assert [t["role"] for t in chat_turns(at)] == ["user", "assistant"]


def test_chat_defaults_to_the_sft_run_streams_a_reply_and_shows_its_tokens(chat_registry, monkeypatch):
    from nanochat.engine import Engine

    asked = []
    real = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, *a, **kw: asked.append(kw) or real(self, *a, **kw))
    at = open_chat({"n": 12, "t": 0.9})
    assert "sft/tiny" in at.selectbox(key="run").format_func(at.selectbox(key="run").value)
    assert not any("base model" in i.value for i in at.info)
    send(at, "Good morrow, what is 2+3?")
    assert asked and asked[-1]["tools"] is True and asked[-1]["trace"].top_n == 20
    assert asked[-1]["forced"] is None
    turns = chat_turns(at)
    assert [t["role"] for t in turns] == ["user", "assistant"]
    gen = turns[1]["versions"][0]["reply"].generation
    assert 1 <= len(gen.token_ids) <= 12 and gen.settings.temperature == 0.9
    assert metric(at, "Turns").value == "1 asked"
    assert metric(at, "Last reply").value == f"{len(gen.token_ids)} tokens"
    assert len(at.get("vega_lite_chart")) >= 3  # the grid, the entropy and the step's distribution
    assert any("rgba(31,119,180" in m.value for m in at.markdown)  # probability shading
    # a second turn: the prompt is the whole conversation rendered with the chat template
    send(at, "And then?")
    assert [t["role"] for t in chat_turns(at)] == ["user", "assistant", "user", "assistant"]
    assert metric(at, "Turns").value == "2 asked"


def test_chat_branches_regenerates_edits_deletes_and_saves(chat_registry, tmp_path):
    at = open_chat({"n": 10, "t": 1.0})
    send(at, "Speak.")
    first = chat_turns(at)[1]["versions"][0]["reply"].generation
    at.number_input(key=f"chat_{chat_turns(at)[1]['versions'][0]['id']}_step").set_value(3).run()
    key = chat_turns(at)[1]["versions"][0]["id"]
    at.button(key=f"chat_{key}_branch").click().run()
    assert_clean(at)
    turn = chat_turns(at)[1]
    assert len(turn["versions"]) == 2 and turn["current"] == 1 and turn["versions"][1]["label"].startswith("branch 1")
    branch = turn["versions"][1]["reply"].generation
    assert branch.token_ids[:2] == first.token_ids[:2] and branch.token_ids[2] != first.token_ids[2]
    assert [s.forced for s in branch.steps[:3]] == [True] * 3
    at.button(key="chat_regen_1").click().run()
    assert_clean(at)
    turn = chat_turns(at)[1]
    assert len(turn["versions"]) == 3 and turn["versions"][2]["settings"].seed == 42 + 2
    # edit the question: the reply is regenerated from there
    at.button(key="chat_edit_btn_0").click().run()
    at.text_area(key="chat_edit_0").set_value("Speak again.")
    at.button(key="chat_edit_save_0").click().run()
    assert_clean(at)
    turns = chat_turns(at)
    assert turns[0]["content"] == "Speak again." and len(turns) == 2 and len(turns[1]["versions"]) == 1
    # save: a line the builder and chat_sft read
    out = tmp_path / "saved.jsonl"
    at.text_input(key="chat_file").set_value(str(out))
    click(at, "Save")
    assert any("Saved as line 1" in s.value for s in at.success)
    from nanochat.conversation_file import read_conversations

    saved = read_conversations(out)
    assert saved[0].valid and saved[0].conversation.to_messages()[0] == {"role": "user", "content": "Speak again."}
    # delete the reply, then generate one for the question left
    at.button(key="chat_delete_1").click().run()
    assert [t["role"] for t in chat_turns(at)] == ["user"]
    click(at, "Generate a reply")
    assert [t["role"] for t in chat_turns(at)] == ["user", "assistant"]
    click(at, "New chat")
    assert chat_turns(at) == []


def test_chat_refuses_bad_input_with_a_message(chat_registry, tmp_path):
    at = open_chat({"run": "base/tiny", "n": 8})
    assert any("is a base model" in i.value for i in at.info)  # allowed, with a note
    send(at, "   ")
    assert any("empty" in w.value for w in at.warning) and chat_turns(at) == []
    send(at, "To be, or not to be, that is the question " * 8)  # beyond the 64-token context
    assert any("context" in e for e in page_errors(at)) and [t["role"] for t in chat_turns(at)] == ["user"]
    send(at, "another")
    assert any("no reply yet" in w.value for w in at.warning)
    at.button(key="chat_edit_btn_0").click().run()
    at.text_area(key="chat_edit_0").set_value("  ")
    at.button(key="chat_edit_save_0").click().run()
    assert_clean(at)
    assert any("cannot be empty" in w.value for w in at.warning)
    at.button(key="chat_edit_cancel_0").click().run()
    at.text_input(key="chat_file").set_value(str(tmp_path / "no" / "such" / "dir.jsonl"))
    click(at, "Save")
    assert any("no such folder" in e for e in page_errors(at))


def test_a_tool_call_in_a_reply_is_answered_and_saved_as_parts(chat_base, tmp_path):
    """The page's code path (data.ReplyStream) with a tool call forced into the reply: the calculator's output block
    follows, the reply's content has python / python_output parts, and it saves in the {"messages"} shape."""
    from nanochat.sampling import SamplingSettings
    from nanochat.tokenizer import Tokenizer
    from streamlit_app import data

    tok = Tokenizer.from_directory(chat_base / "tokenizer")
    call = [tok.special_id("<|python_start|>"), *tok.encode("2+3"), tok.special_id("<|python_end|>")]
    run = chat_base / "chatsft_checkpoints" / "tiny"
    msgs = [{"role": "user", "content": "2+3?"}]
    stream = data.ReplyStream(str(run), 5, data.model_stamp(str(run), 5), msgs, SamplingSettings(seed=1), 12, 5,
                              tuple(enumerate(call)))
    text = "".join(stream)
    reply = stream.reply
    assert "<|output_start|>5<|output_end|>" in text and reply.tool_calls == 1
    assert reply.content[0] == {"type": "python", "text": "2+3"} and reply.content[1] == {"type": "python_output", "text": "5"}
    assert [s.tool_output for s in reply.generation.steps[len(call):len(call) + 3]] == [True] * 3
    line = data.append_conversation(str(tmp_path / "t.jsonl"), msgs + [{"role": "assistant", "content": reply.content}])
    assert line == 1 and '"messages"' in (tmp_path / "t.jsonl").read_text(encoding="utf-8")
