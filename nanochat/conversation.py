"""
A chat conversation and upstream nanochat's chat template: validation, and rendering to token ids
plus the training mask, exactly as upstream's `RustBPETokenizer.render_conversation` does it
(`nanochat/tokenizer.py @92d63d4`; the rules are in ../shared/docs/UPSTREAM_OUTPUTS.md §7).

- A conversation is an optional leading system message, then user and assistant turns alternating,
  starting with the user; it may end with either. A system message is merged into the first user
  turn (`system + "\\n\\n" + user`) when rendering, as upstream does; it stays separate here so an
  editor can show and save it as written.
- User content is a string. Assistant content is a string or a list of parts: `text` (trained),
  `python` (a tool call, trained, inside <|python_start|> <|python_end|>) and `python_output` (the
  tool's answer, not trained: at inference the engine forces it, see engine.py's tool loop).
- Text is encoded as ordinary text: "<|bos|>" typed in a message is seven characters, never the token.
- `render` cuts ids and mask to the first `max_tokens` (upstream's default 2048), mid-message if
  need be, and reports how long the conversation was before the cut.

`tests/fixtures/conversations/reference_renders.json` holds renders made by upstream's own code; the
tests compare every one id for id, and check we refuse exactly the conversations upstream refuses.

This module knows nothing about files (see `conversation_file.py`), models or torch. It needs only
a tokenizer's `enc.encode_ordinary` and `special_id`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PART_TYPES = ("text", "python", "python_output")
ROLES = ("system", "user", "assistant")
UPSTREAM_MAX_TOKENS = 2048  # render_conversation's default cut
CHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
               "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class ConversationError(ValueError):
    """A conversation that is not well formed (or cannot be rendered), with a one-line reason."""


# ---------------------------------------------------------------------- the conversation type


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of an assistant turn: type is "text", "python" (a tool call) or "python_output"."""

    type: str
    text: str


@dataclass(frozen=True, slots=True)
class Message:
    """role "system", "user" or "assistant"; content a str, or (assistant only) a tuple of Parts."""

    role: str
    content: str | tuple[Part, ...]

    @property
    def has_tool_use(self) -> bool:
        return not isinstance(self.content, str) and any(p.type != "text" for p in self.content)

    def to_dict(self) -> dict:
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [{"type": p.type, "text": p.text} for p in self.content]}


@dataclass(frozen=True)
class Conversation:
    """A validated conversation (construction raises ConversationError). Build one from JSON-shaped
    data with `Conversation.parse`."""

    messages: tuple[Message, ...]

    def __post_init__(self):
        _check_structure(self.messages)

    @classmethod
    def parse(cls, obj) -> Conversation:
        """From a list of {"role", "content"} messages (CustomJSON) or {"messages": [...]}; extra keys
        are ignored, as upstream does."""
        if isinstance(obj, Mapping):
            if "messages" not in obj:
                raise ConversationError('expected a list of messages or an object with a "messages" list')
            obj = obj["messages"]
        if not isinstance(obj, list):
            raise ConversationError(f"expected a list of messages, got {_kind(obj)}")
        return cls(tuple(_parse_message(m, i) for i, m in enumerate(obj)))

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages[0].role == "system" else None

    @property
    def turns(self) -> tuple[Message, ...]:
        """The user and assistant messages (the system message left out)."""
        return self.messages[1:] if self.messages[0].role == "system" else self.messages

    @property
    def has_tool_use(self) -> bool:
        return any(m.has_tool_use for m in self.messages)

    @property
    def is_plain(self) -> bool:
        """True when upstream's old CustomJSON loader would read it: no system message, no parts,
        at least one user and one assistant turn."""
        return (self.messages[0].role != "system" and len(self.messages) >= 2
                and all(isinstance(m.content, str) for m in self.messages))

    def to_messages(self) -> list[dict]:
        return [m.to_dict() for m in self.messages]


def _kind(x) -> str:
    return "null" if x is None else type(x).__name__


def _parse_message(m, i: int) -> Message:
    where = f"message {i + 1}"
    if not isinstance(m, Mapping):
        raise ConversationError(f"{where}: expected an object with role and content, got {_kind(m)}")
    if "role" not in m or "content" not in m:
        raise ConversationError(f"{where}: missing {'role' if 'role' not in m else 'content'}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
        raise ConversationError(f"{where}: unknown role {role!r} (expected user, assistant or a leading system)")
    if isinstance(content, str):
        return Message(role, content)
    if role != "assistant":
        raise ConversationError(f"{where} ({role}): content must be a string, got {_kind(content)}")
    if not isinstance(content, list):
        raise ConversationError(f"{where} (assistant): content must be a string or a list of parts, got {_kind(content)}")
    parts = []
    for j, p in enumerate(content):
        at = f"{where} (assistant) part {j + 1}"
        if not isinstance(p, Mapping):
            raise ConversationError(f"{at}: expected an object with type and text, got {_kind(p)}")
        if "type" not in p or "text" not in p:
            raise ConversationError(f"{at}: missing {'type' if 'type' not in p else 'text'}")
        if p["type"] not in PART_TYPES:
            raise ConversationError(f"{at}: unknown part type {p['type']!r} (expected text, python or python_output)")
        if not isinstance(p["text"], str):
            raise ConversationError(f"{at}: text must be a string, got {_kind(p['text'])}")
        parts.append(Part(p["type"], p["text"]))
    return Message(role, tuple(parts))


def _check_structure(messages: Sequence[Message]) -> None:
    """Upstream's rules: an optional leading system message followed by a user turn, then strict
    user/assistant alternation starting with user. Content types are checked too, so a Conversation
    built directly (not parsed) is held to the same rules."""
    if not messages:
        raise ConversationError("the conversation is empty")
    start = 0
    if messages[0].role == "system":
        if len(messages) < 2:
            raise ConversationError("a system message must be followed by a user message")
        start = 1
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise ConversationError(f"message {i + 1}: expected a Message, got {_kind(m)}")
        if i < start:
            continue
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role != expected:
            raise ConversationError(f"message {i + 1} is from {m.role} but should be from {expected} "
                                    "(turns alternate user, assistant, ... after an optional first system message)")
        if isinstance(m.content, str):
            continue
        if m.role != "assistant" or not isinstance(m.content, tuple) or not all(
                isinstance(p, Part) and p.type in PART_TYPES and isinstance(p.text, str) for p in m.content):
            raise ConversationError(f"message {i + 1} ({m.role}): content must be a string"
                                    f"{' or a tuple of Parts' if m.role == 'assistant' else ''}")
    if start and not isinstance(messages[0].content, str):
        raise ConversationError("message 1 (system): content must be a string")


# ---------------------------------------------------------------------- the template


@dataclass(frozen=True, slots=True)
class Span:
    """Where one rendered turn lies in the ids (before the cut): [start, end). `message` indexes
    Conversation.messages; a merged system + user turn has the user's index."""

    message: int
    role: str
    start: int
    end: int


@dataclass(frozen=True)
class Rendered:
    """ids and mask (1 = trained on), cut to max_tokens; `length` is the count before the cut."""

    ids: list[int]
    mask: list[int]
    length: int
    max_tokens: int
    spans: tuple[Span, ...]

    @property
    def truncated(self) -> bool:
        return self.length > self.max_tokens

    @property
    def supervised(self) -> int:
        return sum(self.mask)


def _check_max_tokens(max_tokens) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConversationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")


def _texts(conversation: Conversation) -> list[str]:
    """The texts the template encodes, in order: each message's content or each part's text, with a leading
    system message merged into the first user turn (`system + "\\n\\n" + user`) as upstream does."""
    messages = conversation.messages
    out = []
    if messages[0].role == "system":
        out.append(f"{messages[0].content}\n\n{messages[1].content}")
        messages = messages[2:]
    for m in messages:
        if isinstance(m.content, str):
            out.append(m.content)
        else:
            out += [p.text for p in m.content]
    return out


BATCH_CHUNK = 256  # texts per task of encode_texts: large enough that the pool's per-task cost is noise


def idle_cpus() -> int:
    """CPUs with nothing to run, from the 1-minute load average, plus the one this process runs on; at least 1.
    Threads beyond the free cores only make GIL hand-offs wait for descheduled threads: on a 2-core machine with
    ~3 runnable processes, 2 threads rendered at 0.77x the speed of 1 (bench.chat, measured)."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not offered on this platform
        return cpus
    return max(1, min(cpus, cpus - round(load) + 1))


def encode_texts(encode: Callable[[str], list[int]], texts: Sequence[str], threads: int | None = None) -> list[list[int]]:
    """encode(t) for every text, in order, on `threads` threads (default: `idle_cpus()`) in chunks of BATCH_CHUNK.
    tiktoken's encoder releases the GIL, so the chunks encode side by side. (tiktoken's own
    encode_ordinary_batch submits one task per text: for short texts the pool costs more than it gains.)"""
    threads = threads or idle_cpus()
    if threads == 1 or len(texts) <= BATCH_CHUNK:
        return [encode(t) for t in texts]
    chunks = [texts[i:i + BATCH_CHUNK] for i in range(0, len(texts), BATCH_CHUNK)]
    with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
        return [ids for part in pool.map(lambda chunk: [encode(t) for t in chunk], chunks) for ids in part]


class ChatTemplate:
    """Upstream's chat template bound to one tokenizer (which must have all nine chat tokens)."""

    def __init__(self, tokenizer):
        ids = {name: tokenizer.special_id(name) for name in CHAT_TOKENS}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise ConversationError(f"the tokenizer has no chat token {missing[0]} (it is not a chat tokenizer)")
        self.special = ids
        self.special_ids = frozenset(ids.values())
        self._ordered = tuple(ids[name] for name in CHAT_TOKENS)
        self._encode = tokenizer.enc.encode_ordinary
        self._decode = tokenizer.enc.decode

    def render(self, conversation: Conversation, max_tokens: int = UPSTREAM_MAX_TOKENS) -> Rendered:
        """ids + training mask, as upstream's render_conversation(conversation, max_tokens)."""
        _check_max_tokens(max_tokens)
        return self._assemble(conversation, map(self._encode, _texts(conversation)), max_tokens)

    def render_batch(self, conversations: Sequence[Conversation], max_tokens: int = UPSTREAM_MAX_TOKENS,
                     threads: int | None = None) -> list[Rendered]:
        """`render` of each conversation, the same ids and mask, faster for many: every text of every
        conversation is encoded first, in chunks on `threads` threads (default: one per idle CPU; tiktoken
        releases the GIL while it encodes), then each conversation is assembled from its encoded texts."""
        _check_max_tokens(max_tokens)
        texts = [_texts(c) for c in conversations]
        flat = [t for ts in texts for t in ts]
        bodies = iter(encode_texts(self._encode, flat, threads))
        return [self._assemble(c, bodies, max_tokens) for c in conversations]

    def _assemble(self, conversation: Conversation, bodies: Iterator[list[int]], max_tokens: int) -> Rendered:
        """The template proper: the special tokens and the mask around each encoded text; `bodies` gives the
        encoding of each of `_texts(conversation)` in turn (render and render_batch both come here). Written
        for speed (a file summary assembles thousands): special ids in locals, no per-token Python work."""
        bos, user_start, user_end, assistant_start, assistant_end, python_start, python_end, output_start, \
            output_end = self._ordered
        ids, mask, spans = [bos], [0], []
        messages = conversation.messages
        first = 1 if messages[0].role == "system" else 0  # the system text was merged into the first user text
        for i in range(first, len(messages)):
            m = messages[i]
            start = len(ids)
            if m.role == "user":
                body = next(bodies)
                ids.append(user_start)
                ids += body
                ids.append(user_end)
                mask += [0] * (len(body) + 2)
            else:
                ids.append(assistant_start)
                mask.append(0)
                if isinstance(m.content, str):
                    body = next(bodies)
                    ids += body
                    mask += [1] * len(body)
                else:
                    for p in m.content:
                        body = next(bodies)
                        if p.type == "text":
                            ids += body
                            mask += [1] * len(body)
                        elif p.type == "python":
                            ids.append(python_start)
                            ids += body
                            ids.append(python_end)
                            mask += [1] * (len(body) + 2)
                        else:  # python_output: produced by the tool at inference, so never trained
                            ids.append(output_start)
                            ids += body
                            ids.append(output_end)
                            mask += [0] * (len(body) + 2)
                ids.append(assistant_end)
                mask.append(1)
            spans.append(Span(i, m.role, start, len(ids)))
        length = len(ids)
        if length > max_tokens:
            del ids[max_tokens:], mask[max_tokens:]
        return Rendered(ids, mask, length, max_tokens, tuple(spans))

    def render_for_completion(self, conversation: Conversation, max_tokens: int = UPSTREAM_MAX_TOKENS) -> list[int]:
        """Upstream's render_for_completion (used by RL and evaluation): drop the final assistant
        turn, render the rest (with upstream's cut), then append <|assistant_start|>."""
        if conversation.messages[-1].role != "assistant":
            raise ConversationError("the last message must be from the assistant (it is the one to complete)")
        rest = Conversation(conversation.messages[:-1])
        return [*self.render(rest, max_tokens).ids, self.special["<|assistant_start|>"]]

    def render_prompt(self, conversation: Conversation) -> list[int]:
        """Ids that prime the model for the next assistant turn: the whole conversation (no cut; the
        engine checks it fits the context), ending with a user turn, then <|assistant_start|>."""
        if conversation.messages[-1].role != "user":
            raise ConversationError("a chat prompt must end with a user message")
        full = self.render(conversation, max_tokens=2**62)
        return [*full.ids, self.special["<|assistant_start|>"]]

    def reply_content(self, ids: Sequence[int]) -> str | tuple[Part, ...]:
        """An assistant turn's content from the ids a model generated for it (what follows
        <|assistant_start|>; a final <|assistant_end|> is left out): its tool calls and their outputs
        become python / python_output parts, the rest text parts; a plain string when it used no
        tool. A block cut off by max_tokens keeps what it has. Rendering the content gives the ids
        back whenever the text's tokens are the tokenizer's own encoding of it."""
        sp = self.special
        opens = {sp["<|python_start|>"]: ("python", sp["<|python_end|>"]),
                 sp["<|output_start|>"]: ("python_output", sp["<|output_end|>"])}
        ids = list(ids)
        if ids and ids[-1] == sp["<|assistant_end|>"]:
            ids.pop()
        parts: list[Part] = []
        kind, close, run = "text", None, []
        for t in ids:
            if kind == "text" and t in opens:
                if run:
                    parts.append(Part("text", self._decode(run)))
                (kind, close), run = opens[t], []
            elif kind != "text" and t == close:
                parts.append(Part(kind, self._decode(run)))
                kind, close, run = "text", None, []
            else:
                run.append(t)
        if run or kind != "text":
            parts.append(Part(kind, self._decode(run)))
        if all(p.type == "text" for p in parts):
            return "".join(p.text for p in parts)
        return tuple(parts)

    def token_kinds(self, rendered: Rendered) -> list[str]:
        """Per token: "special" (a chat token), "trained" or "context" (mask 0), for display."""
        specials = self.special_ids
        return ["special" if t in specials else ("trained" if m else "context")
                for t, m in zip(rendered.ids, rendered.mask)]
