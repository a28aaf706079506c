"""
Looking inside a tokenizer: how a text splits into tokens, what the vocabulary holds, how tokenizers
compare on the same text, and whether a `token_bytes.pt` was built the right way.

- `split(tok, text)`: the tokens of a text with their bytes and kind: `special` (a chat or BOS token typed
  in the text), `partial` (bytes that are not valid UTF-8 on their own: a piece of a multibyte character,
  byte fallback), `normal`. `visible(s)` shows whitespace (`·` space, `→` tab, `↵` newline).
- `counts` / `compare`: tokens, bytes, characters and bytes per token of texts under one or more
  tokenizers. bits per byte = (loss in nats per token) / ln 2 / (bytes per token), so for two runs with
  different tokenizers only bpb is comparable; equal per-token losses are worth different bpb.
- `vocabulary(tok)`: every id with its bytes; `unused_ids(tok, texts)`: ids never produced on a sample.
- `check_token_bytes(tok)`: the stored token_bytes.pt against the correct computation
  (`Tokenizer.computed_token_bytes`, the one home of that rule). Upstream's old build (before 2ce972a,
  `UPSTREAM_OUTPUTS.md` §6) counted U+FFFD's 3 bytes for every token that is not valid UTF-8 alone, which
  shifts every bpb figure a little: two runs' val_bpb are comparable only when both files agree.
- `fingerprint(directory)`: a short digest of the tokenizer file, the key the registry stores token
  counts under.

Torch-free. It does not load tokenizers (see `tokenizer.py`) or read datasets (see `shards.py`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nanochat.tokenizer import OUR_FILE, SPECIAL_TOKENS, TOKEN_BYTES_FILE, UPSTREAM_FILE, Tokenizer, TokenizerError, encode_threads

# What each chat-template token marks (UPSTREAM_OUTPUTS.md §7); mask = 1 where the model is trained on it.
SPECIAL_ROLES = {
    "<|bos|>": "starts every document and every conversation",
    "<|user_start|>": "opens a user turn (not trained on)",
    "<|user_end|>": "closes a user turn",
    "<|assistant_start|>": "opens an assistant turn; a prompt ends with it",
    "<|assistant_end|>": "closes an assistant turn (trained on: the model learns to stop)",
    "<|python_start|>": "opens a tool call (Python expression) inside an assistant turn",
    "<|python_end|>": "closes a tool call; the engine then runs it",
    "<|output_start|>": "opens the tool output the engine inserts (not trained on)",
    "<|output_end|>": "closes the tool output",
}


@dataclass(frozen=True)
class TokenPiece:
    id: int
    raw: bytes
    text: str  # decoded (U+FFFD for invalid bytes)
    kind: str  # normal | special | partial

    @property
    def shown(self) -> str:
        return self.text if self.kind == "special" else (visible(self.text) if self.kind == "normal"
                                                          else "".join(f"<{b:02X}>" for b in self.raw))


@dataclass(frozen=True)
class TextCounts:
    tokens: int
    bytes: int
    chars: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class VocabEntry:
    id: int
    raw: bytes
    kind: str

    @property
    def shown(self) -> str:
        return TokenPiece(self.id, self.raw, self.raw.decode("utf-8", errors="replace"), self.kind).shown


@dataclass(frozen=True)
class TokenBytesDiff:
    id: int
    token: str  # shown form
    stored: int
    correct: int


@dataclass(frozen=True)
class TokenBytesCheck:
    """The stored token_bytes.pt against the correct computation. `ok` is None when there is no file."""
    path: str
    present: bool
    vocab_size: int
    wrong: tuple[TokenBytesDiff, ...]
    old_method: bool  # every difference is what upstream's pre-2ce972a build produced
    stored_sum: int | None
    correct_sum: int

    @property
    def ok(self) -> bool | None:
        return None if not self.present else not self.wrong

    @property
    def wrong_ids(self) -> list[int]:
        return [d.id for d in self.wrong]


def visible(s: str) -> str:
    return s.replace(" ", "·").replace("\t", "→").replace("\r", "␍").replace("\n", "↵")


def _kind(tok: Tokenizer, token_id: int, raw: bytes, specials: set[int]) -> str:
    if token_id in specials:
        return "special"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "partial"
    return "normal"


def split(tok: Tokenizer, text: str, specials_in_text: bool = True) -> list[TokenPiece]:
    """The tokens of `text`; with `specials_in_text`, a typed `<|bos|>` etc. is that special token
    (as in a rendered conversation), else its characters are ordinary text (as in training data)."""
    ids = tok.enc.encode(text, allowed_special="all") if specials_in_text else tok.enc.encode_ordinary(text)
    specials = set(tok.enc._special_tokens.values())
    out = []
    for i in ids:
        raw = tok.enc.decode_single_token_bytes(i)
        out.append(TokenPiece(i, raw, raw.decode("utf-8", errors="replace"), _kind(tok, i, raw, specials)))
    return out


def counts(tok: Tokenizer, texts: Iterable[str], specials_in_text: bool = False, threads: int | None = None) -> TextCounts:
    """Tokens, UTF-8 bytes and characters of texts. Tokens as training sees documents (ordinary encoding),
    or with `specials_in_text` as `split` counts them (a typed <|bos|> is one token)."""
    texts = list(texts)
    threads = threads or encode_threads(len(texts))
    ids = (tok.enc.encode_batch(texts, num_threads=threads, allowed_special="all") if specials_in_text
           else tok.enc.encode_ordinary_batch(texts, num_threads=threads))
    return TextCounts(sum(map(len, ids)), sum(len(t.encode("utf-8")) for t in texts), sum(map(len, texts)))


def compare(tokenizers: dict[str, Tokenizer], texts: list[str], specials_in_text: bool = False) -> dict[str, TextCounts]:
    """The same texts under each tokenizer (in the given order)."""
    return {name: counts(tok, texts, specials_in_text) for name, tok in tokenizers.items()}


def longest(entries: list[VocabEntry], n: int) -> list[VocabEntry]:
    """The n longest ordinary tokens, in bytes (special tokens are names, not text)."""
    return sorted((v for v in entries if v.kind != "special"), key=lambda v: (-len(v.raw), v.id))[:n]


def vocabulary(tok: Tokenizer) -> list[VocabEntry]:
    specials = set(tok.enc._special_tokens.values())
    out = []
    for i in range(tok.get_vocab_size()):
        raw = tok.enc.decode_single_token_bytes(i)
        out.append(VocabEntry(i, raw, _kind(tok, i, raw, specials)))
    return out


def unused_ids(tok: Tokenizer, texts: Iterable[str]) -> set[int]:
    """Ordinary token ids that never occur when encoding these texts (special tokens excluded)."""
    seen: set[int] = set()
    texts = list(texts)
    for ids in tok.enc.encode_ordinary_batch(texts, num_threads=encode_threads(len(texts))):
        seen.update(ids)
    specials = set(tok.enc._special_tokens.values())
    return {i for i in range(tok.get_vocab_size()) if i not in seen and i not in specials}


def special_tokens(tok: Tokenizer) -> list[tuple[str, int | None, str]]:
    """(name, id or None when missing, what it marks) for the chat template's tokens, in upstream's order."""
    return [(name, tok.special_id(name), SPECIAL_ROLES[name]) for name in SPECIAL_TOKENS]


def check_token_bytes(tok: Tokenizer) -> TokenBytesCheck:
    """Compare the token_bytes.pt beside the tokenizer with the correct byte lengths."""
    path = (tok.directory / TOKEN_BYTES_FILE) if tok.directory else Path(TOKEN_BYTES_FILE)
    correct = tok.computed_token_bytes()
    stored = tok.stored_token_bytes()
    if stored is None:
        return TokenBytesCheck(str(path), False, len(correct), (), False, None, sum(correct))
    wrong = tuple(TokenBytesDiff(i, VocabEntry(i, tok.enc.decode_single_token_bytes(i), "").shown, s, c)
                  for i, (s, c) in enumerate(zip(stored, correct)) if s != c)
    old = bool(wrong) and all(d.stored == old_token_bytes_of(tok, d.id) for d in wrong)
    return TokenBytesCheck(str(path), True, len(correct), wrong, old, sum(stored), sum(correct))


def old_token_bytes_of(tok: Tokenizer, token_id: int) -> int:
    """A token's entry as upstream built it before 2ce972a (UPSTREAM_OUTPUTS.md §6): the UTF-8 length of
    the *decoded* token, so invalid bytes count as U+FFFD's 3; 0 for specials. Only to name the old method."""
    if token_id in set(tok.enc._special_tokens.values()):
        return 0
    return len(tok.enc.decode([token_id]).encode("utf-8"))


def tokenizer_file(directory: str | os.PathLike) -> Path:
    """The file `Tokenizer.from_directory` reads (ours first, else upstream's pickle)."""
    d = Path(directory)
    for name in (OUR_FILE, UPSTREAM_FILE):
        if (d / name).is_file():
            return d / name
    raise TokenizerError(f"no {OUR_FILE} or {UPSTREAM_FILE} in {d}")


def fingerprint(directory: str | os.PathLike) -> str:
    """16 hex digits of the tokenizer file's sha256: equal files give equal token counts."""
    path = tokenizer_file(directory)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
