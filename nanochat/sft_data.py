"""
SFT data: conversation files rendered once, and packed into training rows the way upstream's SFT loader
packs them, with a position that can be saved and restored exactly.

- `read_conversation_files(paths, skip_invalid)`: every valid conversation of the files, in order. A line
  that is not one stops with `SftDataError("FILE line N: reason")`, or with `skip_invalid` is left out
  and counted. Files with no valid conversation, or none with an assistant turn, are refused.
- `SftDataset.build(conversations, template, row_capacity)`: each conversation rendered to ids + mask
  by upstream's template (nanochat/conversation.py), cut to one row (`max_seq_len + 1` tokens: upstream
  cuts at 2048 and never packs a longer conversation, which piles up in its buffer until the loss is
  NaN; we cut to the row and say how many were cut). Stored flat (int32 ids, int8 mask, offsets);
  `fingerprint` (sha256 of the renders) ties a checkpoint's data position to these exact renders.
- `SftLoader`: upstream's `sft_data_generator_bos_bestfit` rule: rank r reads conversations r, r+W, ...
  cycling through epochs into a buffer of 100; each row of `max_seq_len + 1` tokens takes the largest
  buffered conversation that fits (the first of equal ones) until none fits, then is padded with BOS.
  Inputs are row[:-1]; targets row[1:] with -1 where the mask is 0 (user turns, special tokens, tool
  output, padding). Its `state_dict()` holds the cursor, epoch, consumed count and the buffered
  conversations' indices, so a restored loader yields exactly the batches the uninterrupted one would.
- `epoch_batches`: how many batches a rank draws until it has consumed its share of one epoch
  (upstream's stop rule for `--num-iterations -1`), counted by packing lengths alone, before training.

It knows nothing of models, optimizers or checkpoints' files; torch only where a batch or state is built.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat.conversation import ChatTemplate, Conversation
from nanochat.conversation_file import ConversationFileError, read_conversations

STATE_FORMAT = "nanochat-workbench-sft-loader"
BUFFER_SIZE = 100  # upstream's SFT buffer


class SftDataError(ValueError):
    """Conversation files or a saved position that cannot be used, with a one-line reason."""


@dataclass(frozen=True)
class ConversationSet:
    conversations: list[Conversation]
    skipped: int  # invalid lines left out (skip_invalid only)
    files: tuple[str, ...]


def read_conversation_files(paths: list[str | os.PathLike], skip_invalid: bool = False) -> ConversationSet:
    out, skipped = [], 0
    for path in paths:
        try:
            entries = read_conversations(path)
        except ConversationFileError as e:
            raise SftDataError(str(e)) from None
        for e in entries:
            if e.valid:
                out.append(e.conversation)
            elif skip_invalid:
                skipped += 1
            else:
                raise SftDataError(f"{path} line {e.line}: {e.error} (fix the line, or pass --skip-invalid to leave "
                                   "invalid lines out)")
    names = ", ".join(str(p) for p in paths)
    if not out:
        raise SftDataError(f"no valid conversation in {names}" + (f" ({skipped} invalid line(s) skipped)" if skipped else ""))
    if not any(m.role == "assistant" for c in out for m in c.messages):
        raise SftDataError(f"no conversation in {names} has an assistant turn: there is nothing to train on")
    return ConversationSet(out, skipped, tuple(str(p) for p in paths))


@dataclass(frozen=True)
class SftDataset:
    """Rendered conversations, flat: conversation i is ids[offsets[i]:offsets[i+1]] (and its mask)."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # int8
    offsets: np.ndarray  # int64, len = count + 1
    truncated: int  # conversations cut to the row
    supervised: int  # tokens with mask 1

    @classmethod
    def build(cls, conversations: list[Conversation], template: ChatTemplate, row_capacity: int) -> SftDataset:
        ids, mask, offsets, truncated = [], [], [0], 0
        for r in template.render_batch(conversations, max_tokens=row_capacity):  # render's ids, on the idle cores
            truncated += r.truncated
            ids.extend(r.ids)
            mask.extend(r.mask)
            offsets.append(len(ids))
        m = np.asarray(mask, dtype=np.int8)
        return cls(np.asarray(ids, dtype=np.int32), m, np.asarray(offsets, dtype=np.int64), truncated, int(m.sum()))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.offsets, self.ids, self.mask):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


class SftLoader:
    """(inputs, targets) batches of shape (B, T); see the module docstring for the packing rule."""

    def __init__(self, dataset: SftDataset, bos: int, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device="cpu", buffer_size: int = BUFFER_SIZE):
        self.data, self.bos = dataset, bos
        self.lengths = dataset.lengths().tolist()
        self.B, self.T = batch_size, seq_len
        self.rank, self.world = rank, world_size
        self.device = device
        self.buffer_size = buffer_size
        self.buffer: list[int] = []  # conversation indices, in the order fetched
        self.cursor, self.epoch, self.consumed = rank, 1, rank  # upstream's counters
        self.supervised = 0  # targets >= 0 in the last batch

    def _refill(self) -> None:
        n = len(self.lengths)
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.cursor % n)
            self.cursor += self.world
            if self.cursor >= n:
                self.cursor %= n
                self.epoch += 1

    def next_packing(self) -> list[tuple[list[int], int]]:
        """The next batch as B rows of (conversation indices, content length); the rest of each row of
        T + 1 tokens is BOS padding."""
        width = self.T + 1
        rows = []
        for _ in range(self.B):
            picked, used = [], 0
            while used < width:
                self._refill()
                remaining = width - used
                best, best_len = -1, 0
                for i, c in enumerate(self.buffer):
                    n = self.lengths[c]
                    if best_len < n <= remaining:
                        best, best_len = i, n
                if best < 0:
                    break  # nothing fits: pad the rest (upstream never crops a conversation)
                picked.append(self.buffer.pop(best))
                used += best_len
                self.consumed += self.world
            rows.append((picked, used))
        return rows

    def next_batch(self):
        import torch

        width = self.T + 1
        tokens = np.full((self.B, width), self.bos, dtype=np.int64)
        mask = np.zeros((self.B, width), dtype=np.int8)
        offsets, ids, masks = self.data.offsets, self.data.ids, self.data.mask
        for r, (picked, _) in enumerate(self.next_packing()):
            at = 0
            for c in picked:
                a, b = offsets[c], offsets[c + 1]
                tokens[r, at:at + b - a] = ids[a:b]
                mask[r, at:at + b - a] = masks[a:b]
                at += b - a
        targets = tokens[:, 1:].copy()
        targets[mask[:, 1:] == 0] = -1
        self.supervised = int((targets >= 0).sum())
        x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))
        y = torch.from_numpy(targets)
        if torch.device(self.device).type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        import torch

        return {"format": STATE_FORMAT, "version": 1, "rank": self.rank, "world_size": self.world,
                "batch_size": self.B, "seq_len": self.T, "conversations": len(self.lengths),
                "fingerprint": self.data.fingerprint, "cursor": self.cursor, "epoch": self.epoch,
                "consumed": self.consumed, "buffer": torch.tensor(self.buffer, dtype=torch.int64)}

    def load_state_dict(self, sd: dict) -> None:
        from nanochat.dataloader import DataError  # what the shared restore translates

        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise DataError("the saved data-loader state was not written by the SFT loader")
        if (sd.get("rank"), sd.get("world_size")) != (self.rank, self.world):
            raise DataError(f"the saved data position is rank {sd.get('rank')} of {sd.get('world_size')}, this process "
                            f"is rank {self.rank} of {self.world}")
        if sd.get("fingerprint") != self.data.fingerprint:
            raise DataError("the conversation files render differently from when the checkpoint was written "
                            f"({sd.get('conversations')} conversations then, {len(self.lengths)} now): the data "
                            "position cannot be restored exactly")
        buffer = [int(i) for i in sd["buffer"].tolist()]
        if any(not 0 <= i < len(self.lengths) for i in buffer):
            raise DataError("the saved data position names conversations past the end of the files")
        self.cursor, self.epoch, self.consumed = int(sd["cursor"]), int(sd["epoch"]), int(sd["consumed"])
        self.buffer = buffer

    @property
    def epoch_done(self) -> bool:
        """This rank has consumed its share of one epoch (upstream's `consumed >= dataset_size`)."""
        return self.consumed >= len(self.lengths)


def epoch_batches(dataset: SftDataset, batch_size: int, seq_len: int, rank: int, world_size: int) -> int:
    """Batches rank `rank` draws until it has consumed its share of one epoch."""
    loader = SftLoader(dataset, 0, batch_size, seq_len, rank, world_size)
    batches = 0
    while not loader.epoch_done:
        loader.next_packing()
        batches += 1
    return batches


def check_paths(paths: list[str]) -> list[str]:
    """The files as absolute paths (what a resume command repeats), each an existing file."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise SftDataError(f"no such conversation file: {p}" if not path.exists() else f"{p} is not a file")
        out.append(str(path.resolve()))
    return out
