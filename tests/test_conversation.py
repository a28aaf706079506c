"""Conversations and the chat template: exact renders against upstream's own, validation, the cut."""

import copy
import json
import re
from pathlib import Path

import pytest
import tiktoken

from nanochat.conversation import Conversation, ConversationError, Message, Part
from nanochat.tokenizer import Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((ROOT / "tests/fixtures/conversations/reference_renders.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def template():
    return Tokenizer.from_directory(ROOT / REFERENCE["tokenizer"]).chat_template()


def test_fixture_covers_the_cases_that_matter():
    names = " ".join(r["name"] for r in REFERENCE["renders"])
    for needle in ("system", "tool", "cut", "special-token", "unicode", "empty"):
        assert needle in names
    assert len(REFERENCE["renders"]) >= 40 and len(REFERENCE["refused"]) >= 15


@pytest.mark.parametrize("ref", REFERENCE["renders"], ids=lambda r: r["name"])
def test_render_matches_upstream_exactly(template, ref):
    given = copy.deepcopy(ref["messages"])
    conv = Conversation.parse({"messages": given})
    r = template.render(conv) if ref["max_tokens"] is None else template.render(conv, ref["max_tokens"])
    assert r.ids == ref["ids"]
    assert r.mask == ref["mask"]
    assert given == ref["messages"]  # the caller's data is never changed (system merge included)
    assert r.truncated == (ref["max_tokens"] is not None and r.length > ref["max_tokens"])
    if "completion_ids" in ref:
        assert template.render_for_completion(conv) == ref["completion_ids"]


def test_batch_render_matches_upstream_exactly_on_threads(template, monkeypatch):
    """render_batch (every text encoded first, in chunks on threads) gives upstream's ids and mask, in order,
    whatever the chunking: chunks of 3 texts on 4 threads here, and the one-thread path."""
    from nanochat import conversation as conversation_module

    monkeypatch.setattr(conversation_module, "BATCH_CHUNK", 3)
    for max_tokens in {r["max_tokens"] for r in REFERENCE["renders"]}:  # upstream's cut (None) and the cuts inside
        refs = [r for r in REFERENCE["renders"] if r["max_tokens"] == max_tokens]
        convs = [Conversation.parse({"messages": copy.deepcopy(r["messages"])}) for r in refs]
        args = () if max_tokens is None else (max_tokens,)
        for threads in (4, 1):
            batch = template.render_batch(convs * 3, *args, threads=threads)
            assert [(b.ids, b.mask) for b in batch] == [(r["ids"], r["mask"]) for r in refs] * 3
            assert batch[:len(convs)] == [template.render(c, *args) for c in convs]
    assert template.render_batch([]) == []
    with pytest.raises(ConversationError, match="max_tokens"):
        template.render_batch(convs, 0)


@pytest.mark.parametrize("ref", REFERENCE["refused"], ids=lambda r: r["name"])
def test_refuses_what_upstream_refuses_with_one_line(ref):
    with pytest.raises(ConversationError) as e:
        Conversation.parse(ref["messages"])
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 is from user but should be from assistant"),
    ([{"role": "assistant", "content": "a"}], "message 1 is from assistant but should be from user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "b"}]}],
     "message 2 (assistant) part 1: unknown part type 'image'"),
    ([{"role": "user", "content": ["a"]}], "message 1 (user): content must be a string, got list"),
    ([], "the conversation is empty"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 2: unknown role 'bot'"),
    ([{"role": "user"}], "message 1: missing content"),
    ("text", "expected a list of messages, got str"),
    ({"msgs": []}, "expected a list of messages or an object"),
])
def test_validation_messages(messages, needle):
    with pytest.raises(ConversationError, match="^" + re.escape(needle)):
        Conversation.parse(messages)


def test_conversation_built_directly_is_validated():
    with pytest.raises(ConversationError, match="should be from user"):
        Conversation((Message("assistant", "x"),))
    with pytest.raises(ConversationError, match="content must be a string"):
        Conversation((Message("user", (Part("text", "x"),)),))
    ok = Conversation((Message("system", "s"), Message("user", "u"), Message("assistant", (Part("python", "1+1"),))))
    assert ok.system == "s" and len(ok.turns) == 2 and ok.has_tool_use and not ok.is_plain
    assert Conversation.parse(ok.to_messages()) == ok


def test_shapes_and_round_trip():
    lst = [{"role": "user", "content": "Hi", "extra": 1}, {"role": "assistant", "content": "Hello"}]
    a, b = Conversation.parse(lst), Conversation.parse({"messages": lst, "id": 7})
    assert a == b and a.is_plain and not a.has_tool_use
    assert a.to_messages() == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_cut_length_spans_and_kinds(template):
    conv = Conversation.parse([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                               {"role": "assistant", "content": [{"type": "python", "text": "2+3"},
                                                                 {"type": "python_output", "text": "5"}]}])
    full = template.render(conv)
    assert not full.truncated and full.length == len(full.ids)
    assert [(s.message, s.role) for s in full.spans] == [(1, "user"), (2, "assistant")]
    assert full.spans[-1].end == full.length and full.spans[0].start == 1
    cut = template.render(conv, 5)
    assert cut.truncated and cut.length == full.length and cut.ids == full.ids[:5] and cut.mask == full.mask[:5]
    kinds = template.token_kinds(full)
    assert kinds[0] == "special" and "trained" in kinds and "context" in kinds
    assert all(k == "special" for k, t in zip(kinds, full.ids) if t in template.special_ids)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConversationError, match="max_tokens"):
            template.render(conv, bad)


def test_prompt_and_completion_ends(template):
    conv = Conversation.parse([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ConversationError, match="end with a user"):
        template.render_prompt(conv)
    prompt = template.render_prompt(Conversation.parse([{"role": "user", "content": "a"}]))
    assert prompt == template.render_for_completion(conv)
    with pytest.raises(ConversationError, match="last message must be from the assistant"):
        template.render_for_completion(Conversation.parse([{"role": "user", "content": "a"}]))


def test_tokenizer_without_chat_tokens_says_so():
    ranks = {bytes([i]): i for i in range(256)}
    base_only = Tokenizer(tiktoken.Encoding(name="bytes", pat_str=r".", mergeable_ranks=ranks,
                                            special_tokens={"<|bos|>": 256}))
    with pytest.raises(TokenizerError, match="no chat token <\\|user_start\\|>"):
        base_only.chat_template()
    with pytest.raises(TokenizerError, match="no chat token"):
        base_only.render_chat_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("content", [
    "It is 5.",
    [{"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
     {"type": "text", "text": " so 5."}],
    [{"type": "python", "text": '"strawberry".count("r")'}, {"type": "python_output", "text": "3"}],
    [{"type": "python", "text": ""}, {"type": "text", "text": "<|python_end|> stays text"}],
])
def test_reply_content_reads_a_generated_turn_back_into_parts(template, content):
    conv = Conversation.parse([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": content}])
    r = template.render(conv)
    reply = r.ids[r.spans[-1].start + 1:r.spans[-1].end]  # after <|assistant_start|>, <|assistant_end|> included
    got = template.reply_content(reply)
    assert Message("assistant", got).to_dict()["content"] == content
    assert template.render(Conversation((conv.messages[0], Message("assistant", got)))).ids == r.ids


def test_reply_content_keeps_a_block_cut_by_max_tokens(template):
    sp = template.special
    ids = [*template._encode("Let me see. "), sp["<|python_start|>"], *template._encode("12/")]
    assert template.reply_content(ids) == (Part("text", "Let me see. "), Part("python", "12/"))
    assert template.reply_content([sp["<|assistant_end|>"]]) == ""
