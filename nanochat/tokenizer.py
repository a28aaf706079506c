"""
The BPE tokenizer of upstream nanochat: trained with rustbpe, run with tiktoken.

What it does: train from a text iterator (upstream's split pattern and special tokens, in upstream's
order), encode and decode, per-token byte lengths for bits-per-byte, chat rendering for prompts, and
persistence in our own data-only JSON format plus upstream's `tokenizer.pkl` (a pickled
`tiktoken.Encoding`, byte for byte what upstream writes, so upstream's loader works on our base dirs).
A `tokenizer.pkl` is only ever read by a restricted unpickler that can only rebuild that one object, so
a tokenizer file from a stranger can never run code.

What it does not do: load models or choose where a tokenizer lives (see `checkpoint_manager.py`).
torch is imported only to write `token_bytes.pt` (it is read with `torchfile.read_array`, torch-free).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from nanochat.atomic_file import atomic_write_bytes

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with this
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
OUR_FORMAT = "nanochat-workbench-tokenizer"
OUR_FILE = "tokenizer.json"
UPSTREAM_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, then the special tokens
MAX_VOCAB_SIZE = 2 ** 20  # far above any nanochat model (32,768..65,536); rustbpe's merge count is 32-bit


def encode_threads(n_texts: int | None = None) -> int:
    """Threads for tiktoken's batch encoders: the cores this process may run on (its CPU affinity, which
    `os.cpu_count` ignores under taskset or a container's cpuset), and no more than there are texts."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_texts)) if n_texts is not None else max(1, cores)


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, read or used, with a one-line reason."""


class UnsafePickleError(TokenizerError):
    """A tokenizer pickle that references something other than tiktoken's Encoding."""


def check_vocab_size(vocab_size: int) -> None:
    """A vocabulary size a BPE can be trained to: TokenizerError (one line) otherwise."""
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must be from {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE:,}, got {vocab_size}")


class Tokenizer:
    """A tiktoken Encoding plus the nanochat conventions around it (BOS, chat tokens, byte lengths)."""

    def __init__(self, encoding: tiktoken.Encoding, directory: Path | None = None):
        self.enc = encoding
        self.directory = directory  # where it was read from; token_bytes.pt is looked for there
        missing = [t for t in SPECIAL_TOKENS[:1] if t not in encoding.special_tokens_set]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special token {missing[0]}")
        self._token_bytes: list[int] | None = None
        self._chat_template = None

    # ------------------------------------------------------------------ building

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a BPE of `vocab_size` tokens in all (the special tokens included)."""
        import rustbpe

        check_vocab_size(vocab_size)
        merges = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), merges, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in trainer.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(),
                                     mergeable_ranks=ranks, special_tokens=specials))

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read our `tokenizer.json`, or else upstream's `tokenizer.pkl` (restricted unpickling)."""
        d = Path(directory)
        if (d / OUR_FILE).is_file():
            return cls(_read_our_format(d / OUR_FILE), d)
        if (d / UPSTREAM_FILE).is_file():
            return cls(read_upstream_pickle(d / UPSTREAM_FILE), d)
        raise TokenizerError(f"no {OUR_FILE} or {UPSTREAM_FILE} in {d}")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, upstream's tokenizer.pkl and token_bytes.pt into `directory` (atomically, each file)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        ordered = sorted(ranks.items(), key=lambda kv: kv[1])
        doc = {
            "format": OUR_FORMAT,
            "version": 1,
            "name": self.enc.name,
            "pat_str": self.enc._pat_str,
            "mergeable_ranks": [[base64.b64encode(b).decode("ascii"), r] for b, r in ordered],
            "special_tokens": self.enc._special_tokens,
        }
        atomic_write_bytes(d / OUR_FILE, json.dumps(doc).encode("utf-8"))
        self.save_upstream_pickle(d)
        self.save_token_bytes(d)
        self.directory = d
        return d / OUR_FILE

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.enc.special_tokens_set)

    def encode_special(self, name: str) -> int:
        try:
            return self.enc._special_tokens[name]
        except KeyError:
            raise TokenizerError(f"unknown special token {name!r}") from None

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    def special_id(self, name: str) -> int | None:
        """The id of a special token, or None when this tokenizer does not have it."""
        return self.enc._special_tokens.get(name)

    def id_to_token(self, token_id: int) -> str:
        return self.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        self._check_ids([token_id])
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token (0 for special tokens), as used for bits per byte.

        Read from token_bytes.pt beside the tokenizer when present (so an upstream run's bpb figures
        are reproduced, including classic's count of 3 for ids 128-255), else computed.
        """
        if self._token_bytes is None:
            stored = self.stored_token_bytes()
            self._token_bytes = stored if stored is not None else self.computed_token_bytes()
        return self._token_bytes

    def computed_token_bytes(self) -> list[int]:
        """The correct byte length of every token, from its raw bytes (upstream since 2ce972a; specials 0)."""
        specials = set(self.enc._special_tokens.values())
        return [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.get_vocab_size())]

    def stored_token_bytes(self) -> list[int] | None:
        """token_bytes.pt beside the tokenizer, as a list (None when there is none)."""
        if self.directory is None or not (self.directory / TOKEN_BYTES_FILE).is_file():
            return None
        from nanochat.torchfile import TorchFileError, read_array

        path = self.directory / TOKEN_BYTES_FILE
        try:
            t = read_array(path)  # torch-free, and nothing in the file is executed
        except TorchFileError as e:
            raise TokenizerError(f"cannot read {path}: {e}") from None
        if t.ndim != 1 or t.size != self.get_vocab_size():
            raise TokenizerError(f"{path} does not match a vocabulary of {self.get_vocab_size()}")
        return [int(x) for x in t.tolist()]

    def save_upstream_pickle(self, directory: str | os.PathLike) -> Path:
        """Upstream's tokenizer.pkl: `pickle.dump` (protocol 4) of the Encoding, as upstream's tok_train
        writes it (one global, tiktoken.core.Encoding, NEWOBJ and a BUILD dict of its four constructor
        arguments). The bytes are read back through the restricted reader before they are written."""
        data = pickle.dumps(self.enc, protocol=4)
        _unpickle_encoding(data, UPSTREAM_FILE)  # tiktoken pickles a registered name as a bare string: refuse
        path = Path(directory) / UPSTREAM_FILE
        atomic_write_bytes(path, data)
        return path

    def save_token_bytes(self, directory: str | os.PathLike) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(torch.tensor(self.computed_token_bytes(), dtype=torch.int32), buf)
        atomic_write_bytes(Path(directory) / TOKEN_BYTES_FILE, buf.getvalue())

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None):
        """Token ids of `text` (or a list of ids per text); special tokens in the text are plain text."""
        pre = self._as_id(prepend)
        post = self._as_id(append)
        if isinstance(text, str):
            return [*([pre] if pre is not None else []), *self.enc.encode_ordinary(text),
                    *([post] if post is not None else [])]
        texts = list(text)
        out = self.enc.encode_ordinary_batch(texts, num_threads=encode_threads(len(texts)))
        return [[*([pre] if pre is not None else []), *ids, *([post] if post is not None else [])] for ids in out]

    def _as_id(self, token: str | int | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        return self.encode_special(token)

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        self._check_ids(ids)
        return self.enc.decode(ids)

    def _check_ids(self, ids: list[int]) -> None:
        n = self.get_vocab_size()
        bad = next((i for i in ids if not 0 <= int(i) < n), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{n - 1})")

    def chat_template(self):
        """Upstream's chat template on this tokenizer (`nanochat/conversation.py`), built once."""
        if self._chat_template is None:
            from nanochat.conversation import ChatTemplate, ConversationError

            try:
                self._chat_template = ChatTemplate(self)
            except ConversationError as e:
                raise TokenizerError(str(e)) from None
        return self._chat_template

    def render_chat_prompt(self, messages: list[dict]) -> list[int]:
        """Ids that prime the model for an assistant reply: <|bos|>, the turns, then <|assistant_start|>.

        messages: [{"role": "user"|"assistant", "content": ...}, ...] ending with a user turn; a leading
        "system" message is merged into the first user turn, as upstream does.
        """
        from nanochat.conversation import Conversation, ConversationError

        template = self.chat_template()
        try:
            return template.render_prompt(Conversation.parse(list(messages)))
        except ConversationError as e:
            raise TokenizerError(str(e)) from None


# ---------------------------------------------------------------------- persistence


def _read_our_format(path: Path) -> tiktoken.Encoding:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != OUR_FORMAT:
        raise TokenizerError(f"{path} is not a {OUR_FORMAT} file")
    if doc.get("version") != 1:
        raise TokenizerError(f"{path} has format version {doc.get('version')}; this code reads version 1")
    try:
        ranks = {base64.b64decode(b, validate=True): int(r) for b, r in doc["mergeable_ranks"]}
        state = {"name": str(doc["name"]), "pat_str": doc["pat_str"], "mergeable_ranks": ranks,
                 "special_tokens": doc["special_tokens"]}
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"{path} is malformed: {e}") from None
    return _build_encoding(state, path)


class _EncodingState:
    """Inert stand-in for tiktoken.core.Encoding while unpickling: it only keeps the BUILD state."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise UnsafePickleError(f"tokenizer pickle references {module}.{name}; only tiktoken.core.Encoding is allowed")

    def persistent_load(self, pid):
        raise UnsafePickleError("tokenizer pickle uses persistent ids, which a tokenizer never needs")


def read_upstream_pickle(path: str | os.PathLike) -> tiktoken.Encoding:
    """Rebuild upstream's pickled tiktoken Encoding without executing anything from the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
    return _unpickle_encoding(data, path)


def _unpickle_encoding(data: bytes, path: Path | str) -> tiktoken.Encoding:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbage pickle: any unpickling error is a bad file
        raise TokenizerError(f"{path} is not a readable tokenizer pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, _EncodingState) or not isinstance(getattr(obj, "state", None), dict):
        raise TokenizerError(f"{path} does not hold a tiktoken Encoding")
    return _build_encoding(obj.state, path)


def _build_encoding(state: dict, path: Path | str) -> tiktoken.Encoding:
    expected = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if set(state) != expected:
        raise TokenizerError(f"{path}: tokenizer state has keys {sorted(state)}, expected {sorted(expected)}")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    ok = (isinstance(state["name"], str) and isinstance(state["pat_str"], str)
          and isinstance(ranks, dict) and all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items())
          and isinstance(specials, dict) and all(isinstance(k, str) and type(v) is int for k, v in specials.items()))
    if not ok:
        raise TokenizerError(f"{path}: tokenizer state has values of the wrong types")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: mergeable ranks are not 0..{len(ranks) - 1}")
    try:
        return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=specials)
    except Exception as e:  # tiktoken rejects a bad pattern or overlapping ids with assorted errors
        raise TokenizerError(f"{path}: tiktoken rejects this tokenizer: {e}") from None
