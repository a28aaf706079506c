"""
Conversation files (JSONL) and what a dataset of them looks like to SFT.

A file holds one conversation per non-empty line, in either shape:
- CustomJSON (upstream's `tasks/customjson.py`, ../shared/docs/UPSTREAM_OUTPUTS.md §8): a JSON array
  of {"role", "content"} messages;
- `{"messages": [...]}`, the shape upstream's tasks hand to render_conversation.
Blank lines are skipped. A line that is not a valid conversation becomes an `Entry` with its line
number and a one-line reason; it is never dropped. Every entry keeps its line exactly as read
(undecodable bytes included, via surrogateescape), so saving writes an untouched or invalid line back
byte for byte and only the conversations the user edited are re-serialised. Writes are atomic.

The summary renders every valid conversation with upstream's template and compares it with a
sequence length. Upstream's SFT loader (`scripts/chat_sft.py`, best-fit packing) puts only whole
conversations into rows of `max_seq_len + 1` tokens: a longer one never fits, is never trained on,
and stays in the loader's buffer; once the buffer holds only such conversations every row is
padding with no trained target, and the loss is NaN. `Fit` names that per conversation.

This module knows nothing about display; see tools/conversation_builder.py and the app's builder page.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from nanochat.atomic_file import atomic_write_bytes
from nanochat.conversation import UPSTREAM_MAX_TOKENS, ChatTemplate, Conversation, ConversationError, Rendered

SHAPES = ("list", "messages")  # CustomJSON array, or {"messages": [...]}
MAX_FILE_BYTES = 512 * 2**20  # a conversation file larger than this is refused rather than read into memory


class ConversationFileError(ValueError):
    """A conversation file that cannot be read or written (not a bad line: those become entries)."""


@dataclass(frozen=True)
class Entry:
    """One non-empty line: its 1-based line number, its text as read, and the conversation or why not."""

    line: int
    raw: str
    conversation: Conversation | None
    error: str | None
    shape: str | None  # "list" or "messages" when the line parsed as JSON of that shape

    @property
    def valid(self) -> bool:
        return self.conversation is not None

    @classmethod
    def parse(cls, line: int, raw: str) -> Entry:
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8 in the file (kept by surrogateescape)
            return cls(line, raw, None, f"not valid UTF-8 (at character {e.start + 1})", None)
        try:
            obj = json.loads(raw)
        except ValueError as e:  # JSONDecodeError
            return cls(line, raw, None, f"not valid JSON ({_first_line(e)})", None)
        shape = "list" if isinstance(obj, list) else "messages" if isinstance(obj, dict) else None
        try:
            return cls(line, raw, Conversation.parse(obj), None, shape)
        except ConversationError as e:
            return cls(line, raw, None, str(e), shape)

    @classmethod
    def from_conversation(cls, conversation: Conversation, shape: str = "list", line: int = 0) -> Entry:
        """An entry for a new or edited conversation, serialised in `shape` (one line, UTF-8 kept)."""
        if shape not in SHAPES:
            raise ConversationFileError(f"unknown shape {shape!r} (expected list or messages)")
        msgs = conversation.to_messages()
        raw = json.dumps(msgs if shape == "list" else {"messages": msgs}, ensure_ascii=False)
        return cls(line, raw, conversation, None, shape)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def parse_lines(text: str) -> list[Entry]:
    """Entries of every non-empty line of `text` (line numbers count the blank lines too)."""
    out = []
    for i, raw in enumerate(text.split("\n")):
        if raw.strip():
            out.append(Entry.parse(i + 1, raw))
    return out


def read_conversations(path: str | os.PathLike) -> list[Entry]:
    """Every non-empty line of a conversation file as an Entry; the file is only read."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConversationFileError(f"{p} is {size / 2**20:.0f} MiB; conversation files over "
                                        f"{MAX_FILE_BYTES // 2**20} MiB are not read")
        data = p.read_bytes()
    except IsADirectoryError:
        raise ConversationFileError(f"{p} is a directory, not a conversation file") from None
    except FileNotFoundError:
        raise ConversationFileError(f"no such file: {p}") from None
    except OSError as e:
        raise ConversationFileError(f"cannot read {p}: {e.strerror}") from None
    # surrogateescape: a line with bad UTF-8 is reported (json cannot encode the stray bytes back)
    # and written back unchanged on save
    return parse_lines(data.decode("utf-8", errors="surrogateescape"))


def write_conversations(path: str | os.PathLike, entries: Iterable[Entry | Conversation], shape: str = "list") -> int:
    """Write entries (their text as kept; a bare Conversation is serialised in `shape`) one per line,
    atomically (a temporary file, fsync, rename). Returns the number of lines written."""
    p = Path(path)
    lines = [e.raw if isinstance(e, Entry) else Entry.from_conversation(e, shape).raw for e in entries]
    _atomic_write(p, "".join(f"{line}\n" for line in lines).encode("utf-8", errors="surrogateescape"))
    return len(lines)


def append_conversation(path: str | os.PathLike, conversation: Conversation) -> int:
    """Add one conversation as the file's new last line (created if absent), in the CustomJSON shape
    when it is plain and as {"messages": [...]} otherwise. Every existing byte is kept (blank and
    invalid lines too); the write is atomic. Returns the new line's 1-based number."""
    p = Path(path)
    if p.is_dir():
        raise ConversationFileError(f"{p} is a directory, not a conversation file")
    if not p.parent.is_dir():
        raise ConversationFileError(f"no such folder: {p.parent}")
    old = b""
    if p.exists():
        read_conversations(p)  # refuses what cannot be read (too large, unreadable) before anything is written
        old = p.read_bytes()
        if old and not old.endswith(b"\n"):
            old += b"\n"
    line = Entry.from_conversation(conversation, "list" if conversation.is_plain else "messages").raw
    _atomic_write(p, old + f"{line}\n".encode())
    return old.count(b"\n") + 1


def _atomic_write(p: Path, body: bytes) -> None:
    try:
        atomic_write_bytes(p, body)
    except OSError as e:
        raise ConversationFileError(f"cannot write {p}: {e.strerror}") from None


def renumber(entries: Sequence[Entry]) -> list[Entry]:
    """Entries with line numbers 1..n, as they will be after a save (blank lines are not kept)."""
    return [replace(e, line=i + 1) for i, e in enumerate(entries)]


# ---------------------------------------------------------------------- fitting SFT rows


@dataclass(frozen=True, slots=True)
class Fit:
    """How one rendered conversation fares in upstream's SFT: `length` tokens before render's cut,
    `rendered` after it (at most 2048), and whether it fits a row of seq_len + 1 tokens."""

    length: int
    rendered: int
    seq_len: int

    @property
    def cut(self) -> bool:
        """render_conversation cut it at 2048 tokens: the end of the conversation is lost."""
        return self.length > self.rendered

    @property
    def fits(self) -> bool:
        return self.rendered <= self.seq_len + 1

    def describe(self) -> str:
        """One line for a user: '' when nothing is lost."""
        if not self.fits:
            return (f"{self.rendered} tokens exceed the SFT row of {self.seq_len + 1} (sequence length + 1): upstream's "
                    "SFT loader never trains on it, and a file of such conversations gives a NaN loss")
        if self.cut:
            return f"{self.length} tokens: cut to {self.rendered} when rendered, the rest is never trained on"
        return ""


def fit(rendered: Rendered, seq_len: int) -> Fit:
    return Fit(rendered.length, len(rendered.ids), seq_len)


# ---------------------------------------------------------------------- the dataset summary


@dataclass(frozen=True)
class HistogramBin:
    start: int  # token lengths in [start, end)
    end: int
    count: int


@dataclass(frozen=True)
class DatasetSummary:
    """What SFT would see in a file: counts, lengths (before the cut, one per valid conversation),
    and the shares that matter. Shares are of valid conversations (tokens: of rendered tokens)."""

    conversations: int
    invalid: int
    seq_len: int
    max_tokens: int
    lengths: tuple[int, ...]
    too_long: int  # rendered longer than seq_len + 1: never packed by upstream's SFT loader
    cut: int  # longer than max_tokens: render_conversation cut the end off
    tool_use: int
    no_assistant: int  # nothing to train on (a lone user turn)
    tokens: int  # rendered (after the cut)
    supervised_tokens: int
    histogram: tuple[HistogramBin, ...]

    @property
    def too_long_share(self) -> float:
        return self.too_long / self.conversations if self.conversations else 0.0

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    @property
    def tool_use_share(self) -> float:
        return self.tool_use / self.conversations if self.conversations else 0.0

    def as_dict(self) -> dict:
        return {"conversations": self.conversations, "invalid": self.invalid, "seq_len": self.seq_len,
                "max_tokens": self.max_tokens, "too_long": self.too_long, "too_long_share": self.too_long_share,
                "cut": self.cut, "tool_use": self.tool_use, "tool_use_share": self.tool_use_share,
                "no_assistant": self.no_assistant, "tokens": self.tokens,
                "supervised_tokens": self.supervised_tokens, "supervised_share": self.supervised_share,
                "length_min": min(self.lengths, default=0), "length_max": max(self.lengths, default=0),
                "length_mean": sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
                "histogram": [{"start": b.start, "end": b.end, "count": b.count} for b in self.histogram]}


def check_seq_len(seq_len) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= 2**20:
        raise ConversationFileError(f"the sequence length must be an integer in 1..{2**20}, got {seq_len!r}")
    return seq_len


def summarize(entries: Sequence[Entry], template: ChatTemplate, seq_len: int,
              max_tokens: int = UPSTREAM_MAX_TOKENS, renders: Sequence[Rendered] | None = None) -> DatasetSummary:
    """The summary of a file's entries against `seq_len`; `renders` (of the valid entries, in order)
    may be passed when the caller has them already."""
    check_seq_len(seq_len)
    valid = [e for e in entries if e.valid]
    if renders is None:
        renders = template.render_batch([e.conversation for e in valid], max_tokens)
    lengths = tuple(r.length for r in renders)
    too_long = sum(1 for r in renders if not fit(r, seq_len).fits)
    return DatasetSummary(
        conversations=len(valid), invalid=len(entries) - len(valid), seq_len=seq_len, max_tokens=max_tokens,
        lengths=lengths, too_long=too_long, cut=sum(1 for r in renders if r.truncated),
        tool_use=sum(1 for e in valid if e.conversation.has_tool_use),
        no_assistant=sum(1 for e in valid if not any(m.role == "assistant" for m in e.conversation.messages)),
        tokens=sum(len(r.ids) for r in renders), supervised_tokens=sum(r.supervised for r in renders),
        histogram=histogram(lengths, seq_len + 1))


def histogram(lengths: Sequence[int], mark: int, bins: int = 20) -> tuple[HistogramBin, ...]:
    """About `bins` bins of a round width (1, 2 or 5 times a power of ten) from 0 past both the longest
    length and `mark`, with `mark` (the SFT row capacity) always a bin edge: the bin it falls in is
    split there, so every bin is wholly below or wholly at/above it."""
    top = max(max(lengths, default=0) + 1, mark + 1)
    raw = top / bins
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    width = max(1, int(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)))
    edges = sorted({*range(0, top + width, width), mark})
    edges = edges[:bisect.bisect_left(edges, top) + 1]  # the last edge is the first one >= top
    counts = [0] * (len(edges) - 1)
    for n in lengths:
        counts[bisect.bisect_right(edges, n) - 1] += 1
    return tuple(HistogramBin(a, b, c) for a, b, c in zip(edges, edges[1:], counts))


# ---------------------------------------------------------------------- a folder of files (the dataset inspector)

UPSTREAM_FILE = "identity_conversations.jsonl"  # the file upstream's chat_sft read from the base dir
CONVERSATIONS_DIR = "conversations"  # <base>/conversations/*.jsonl: more of a base dir's files (the demo's plays)


def base_dir_conversation_files(base: str | os.PathLike) -> list[Path]:
    """The conversation files a base dir holds: its own *.jsonl (upstream's identity_conversations.jsonl first),
    then those in its conversations/ folder (sorted)."""
    b = Path(base).expanduser()
    top = sorted((f for f in b.glob("*.jsonl") if f.is_file()), key=lambda f: (f.name != UPSTREAM_FILE, f.name))
    return top + sorted(f for f in (b / CONVERSATIONS_DIR).glob("*.jsonl") if f.is_file())


def conversation_files(path: str | os.PathLike) -> list[Path]:
    """A `.jsonl` file itself, or the `*.jsonl` files of a folder that holds no parquet shards (sorted);
    [] otherwise. A base dir holds identity_conversations.jsonl beside base_data/: its shards are its data."""
    from nanochat.dataloader import DataError
    from nanochat.shards import resolve_data_dir

    p = Path(path).expanduser()
    if p.is_file():
        return [p] if p.suffix == ".jsonl" else []
    if not p.is_dir():
        return []
    try:
        resolve_data_dir(p)
        return []
    except DataError:
        return sorted(f for f in p.glob("*.jsonl") if f.is_file())


@dataclass(frozen=True)
class FileSummary:
    """One file of a folder: its summary, or why it could not be read (`error`, one line)."""

    path: str
    summary: DatasetSummary | None
    error: str | None = None


def summarize_files(paths: Sequence[str | os.PathLike], template: ChatTemplate, seq_len: int,
                    max_tokens: int = UPSTREAM_MAX_TOKENS) -> tuple[list[FileSummary], DatasetSummary]:
    """Each file's summary and the summary of all of them together (every conversation rendered once).
    A file that cannot be read is reported in its FileSummary, not raised."""
    check_seq_len(seq_len)
    files, all_entries, all_renders = [], [], []
    for p in paths:
        try:
            entries = read_conversations(p)
        except ConversationFileError as e:
            files.append(FileSummary(str(p), None, str(e)))
            continue
        renders = template.render_batch([e.conversation for e in entries if e.valid], max_tokens)
        files.append(FileSummary(str(p), summarize(entries, template, seq_len, max_tokens, renders)))
        all_entries += entries
        all_renders += renders
    return files, summarize(all_entries, template, seq_len, max_tokens, all_renders)


@dataclass(frozen=True)
class Finding:
    """What stops or skews SFT on these files: level "error" (the loader stops, or the loss goes to NaN)
    or "warning"; `file` None for the files together."""

    level: str
    file: str | None
    message: str


def findings(files: Sequence[FileSummary], total: DatasetSummary) -> list[Finding]:
    """One line per problem of the files (unreadable, invalid lines) and of their conversations together."""
    out = []
    for f in files:
        name = Path(f.path).name
        if f.error:
            out.append(Finding("error", f.path, f"{name}: {f.error}"))
        elif f.summary.invalid:
            out.append(Finding("error", f.path, f"{name}: {f.summary.invalid:,} line(s) are not a valid conversation: "
                                                "upstream's CustomJSON loader stops at the first"))
    s = total
    if s.too_long:
        out.append(Finding("error", None, f"{s.too_long:,} of {s.conversations:,} conversations ({s.too_long_share:.1%}) "
                                          f"are longer than an SFT row of {s.seq_len + 1} tokens (sequence length + 1): "
                                          "upstream's loader never packs them, they pile up in its buffer, and once it "
                                          "holds only them the loss is NaN. Raise the sequence length or drop them"))
    if s.cut:
        out.append(Finding("warning", None, f"{s.cut:,} conversation(s) are longer than {s.max_tokens:,} tokens: rendering "
                                            "cuts their ends, which are never trained on"))
    if s.no_assistant:
        out.append(Finding("warning", None, f"{s.no_assistant:,} conversation(s) have no assistant turn: nothing in them "
                                            "is trained on"))
    return out
