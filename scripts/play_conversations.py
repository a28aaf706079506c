"""
Chat conversations made from the bundled plays (`data/shakespeare.jsonl.gz`): a line of dialogue and its
reply, each with its speaker's name as context, for the demo's SFT run and the Conversation builder.

    user:      "ROMEO: <his speech>"
    assistant: "JULIET: <her reply>"      (then possibly the next exchange of the scene, and the next)

Speeches are read scene by scene (a scene or act heading ends a dialogue; the cast list before the first
heading is skipped): a paragraph whose first line is a speaker's name (`ROMEO.`, `Hor.`, `THESEUS`) starts a
speech; whole-line stage directions (`[Aside.]`) are dropped; a paragraph without a name continues the speech
before it (a speech interrupted by an exit), and two speeches of one speaker in a row are one speech. Poems
have no speakers and give nothing.

Consecutive speeches of a scene become exchanges (speech, reply); a conversation is a run of 1-3 exchanges
(the count cycles, so the builder's length histogram has some spread), cut short when the next exchange
would not fit `max_tokens` rendered with upstream's chat template (the SFT row: sequence length + 1, so the
SFT loader never meets a conversation it cannot pack). An exchange that alone is too long (a soliloquy) is
left out. Deterministic: the same corpus and tokenizer give the same files, byte for byte.

The last play read is held out as validation, as `scripts.demo.write_shards` holds out its shard (the whole
corpus: The Winter's Tale). Files are CustomJSON (one JSON array of messages per line), written atomically
with `nanochat.conversation_file`. Torch-free. `scripts/demo.py` calls `write_play_conversations`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nanochat.conversation import ChatTemplate, Conversation, Message
from nanochat.conversation_file import write_conversations

TRAIN_FILE = "plays.jsonl"
VAL_FILE = "plays_val.jsonl"
EXCHANGE_CYCLE = (1, 2, 3)  # exchanges per conversation, in turn

_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_SMALL_WORDS = {"of", "and", "the", "de", "du", "la", "le"}  # lower-case words inside a name ("Duke of York.")


@dataclass(frozen=True)
class Speech:
    speaker: str
    text: str


def _speaker(line: str) -> str | None:
    """The name a speech starts with ("ROMEO.", "Hor.", "First Lord.", "THESEUS"), else None."""
    line = line.strip()
    if not line or len(line) > 32 or not line[0].isupper():
        return None
    name = line[:-1] if line.endswith(".") else line
    if not line.endswith(".") and not name.isupper():  # a name without its full stop only in capitals (MND)
        return None
    words = name.split()
    if not words or not all(re.fullmatch(r"[A-Za-z][A-Za-z'&-]*", w) for w in words):
        return None
    if not all(w[0].isupper() or w in _SMALL_WORDS for w in words):
        return None
    return " ".join(words)


def _is_direction(line: str) -> bool:
    s = line.strip()
    return s.startswith("[") and s.endswith("]")


def scenes(text: str) -> Iterator[list[Speech]]:
    """The speeches of each scene of a play, in order."""
    speeches: list[Speech] = []
    started = False
    pending: str | None = None  # a name alone in its paragraph (its speech follows a stage direction)
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().split("\n") if ln.strip() and not _is_direction(ln)]
        if not lines:
            continue  # blank or a stage direction: the dialogue goes on
        if _HEADING.match(lines[0]):
            if speeches:
                yield speeches
            speeches, started, pending = [], True, None
            continue
        if not started:
            continue  # title, cast list
        name = _speaker(lines[0])
        if name is not None and len(lines) == 1:
            pending = name
            continue
        if name is not None:
            speaker, body = name, lines[1:]
        elif pending is not None:
            speaker, body = pending, lines
        elif speeches:
            speaker, body = speeches[-1].speaker, lines  # the same speech after an exit or an aside
        else:
            continue
        pending = None
        words = "\n".join(body)
        if speeches and speeches[-1].speaker == speaker:
            speeches[-1] = Speech(speaker, f"{speeches[-1].text}\n{words}")
        else:
            speeches.append(Speech(speaker, words))
    if speeches:
        yield speeches


def _turns(user: Speech, reply: Speech) -> tuple[Message, Message]:
    return Message("user", f"{user.speaker}: {user.text}"), Message("assistant", f"{reply.speaker}: {reply.text}")


def scene_conversations(speeches: list[Speech], template: ChatTemplate, max_tokens: int,
                        counter: list[int]) -> Iterator[Conversation]:
    """Runs of exchanges from one scene, each rendering to at most max_tokens; `counter` (one int, shared across
    scenes) picks each conversation's exchange count from EXCHANGE_CYCLE."""
    i = 0
    while i + 1 < len(speeches):
        want = EXCHANGE_CYCLE[counter[0] % len(EXCHANGE_CYCLE)]
        messages: tuple[Message, ...] = ()
        while i + 1 < len(speeches) and len(messages) < 2 * want:
            longer = messages + _turns(speeches[i], speeches[i + 1])
            if template.render(Conversation(longer), max_tokens + 1).length > max_tokens:
                break
            messages, i = longer, i + 2
        if messages:
            counter[0] += 1
            yield Conversation(messages)
        else:
            i += 1  # this exchange alone is too long: start again from its reply


def play_conversations(works: list[tuple[str, str]], template: ChatTemplate,
                       max_tokens: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) conversations of (play id, text) works in corpus order; the last work is validation."""
    train: list[Conversation] = []
    val: list[Conversation] = []
    counter = [0]
    for k, (_, text) in enumerate(works):
        out = val if k == len(works) - 1 else train
        for speeches in scenes(text):
            out.extend(scene_conversations(speeches, template, max_tokens, counter))
    return train, val


def write_play_conversations(out_dir: Path, works: list[tuple[str, str]], template: ChatTemplate,
                             max_tokens: int) -> tuple[Path, Path]:
    """plays.jsonl and plays_val.jsonl in out_dir (created), each written atomically."""
    train, val = play_conversations(works, template, max_tokens)
    if not train or not val:
        raise ValueError(f"the plays gave {len(train)} training and {len(val)} validation conversations "
                         f"within {max_tokens} tokens; both must be non-empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / TRAIN_FILE, out_dir / VAL_FILE
    # the validation file first: a build stopped between the two leaves no train file, and the demo makes both again
    write_conversations(paths[1], val)
    write_conversations(paths[0], train)
    return paths
