"""
Pretraining data: upstream's parquet shards, read into BOS-aligned batches whose position can be saved
and restored exactly.

Layout (as upstream): `$NANOCHAT_BASE_DIR/base_data_climbmix/` (current) or `base_data/` (older) holds
`*.parquet` files with a `text` column, one document per row; sorted by name, the LAST file is the
validation split and the others are train; names ending in `.tmp` (downloads in progress) are ignored.

Batches follow upstream's BOS-aligned best-fit packing: every row starts with `<|bos|>`, whole documents
are placed largest-first while they fit, and when none fits the shortest is cropped to fill the row, so no
token is padding. Rank r of W reads row groups r, r+W, r+2W, ... of each file, epoch after epoch.

Exact resume: `BosBestFitLoader.state_dict()` holds the next row group to read *and* the documents
already tokenized into the best-fit buffer (as one int32 tensor), so a restored loader yields exactly
the batches the uninterrupted one would have. `upstream_state()` is the `{epoch, pq_idx, rg_idx}` dict
upstream keeps in its meta (the last row group read), written for compatibility; `resume_upstream(d)`
continues from such a dict as upstream's own resume does (an approximate position: see the method).

Provenance (`track=True`): the loader also keeps, for each buffered document, where it came from
(`DocSource`: shard, row group, row), and `last_packing` says how the rows of the last batch were filled
(`RowSegment`s): what `nanochat.data_replay` shows as "what did the model see at step N". Off in training.

torch is imported only where a batch or a state tensor is built, so the shard helpers here are torch-free.
This module does not evaluate the model (see `loss_eval.py`) or decide when to save (the training script).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

DATA_DIRS = ("base_data_climbmix", "base_data")
STATE_FORMAT = "nanochat-workbench-loader"


class DataError(ValueError):
    """Missing, unreadable or unusable training data, with a one-line reason."""


@dataclass(frozen=True)
class DocSource:
    """Where a buffered document came from: `pq_idx` into the loader's file list, its row group and row;
    None fields for a document restored from a saved buffer (its origin was not saved)."""
    pq_idx: int | None
    rg_idx: int | None
    row: int | None
    epoch: int | None


@dataclass(frozen=True)
class RowSegment:
    """The first `length` tokens of one document, placed at `offset` in a batch row (best fit only ever
    crops a document's end, and throws the rest away)."""
    source: DocSource
    offset: int
    length: int
    doc_tokens: int  # the document's length, BOS included; length < doc_tokens means it was cropped


def find_data_dir(base_dir: str | os.PathLike) -> Path:
    """`base_data_climbmix/` if it has shards, else `base_data/`."""
    base = Path(base_dir)
    for name in DATA_DIRS:
        if list_parquet_files(base / name):
            return base / name
    raise DataError(f"no parquet shards in {base / DATA_DIRS[0]} or {base / DATA_DIRS[1]} "
                    "(the demo builder, `python -m scripts.demo`, writes some)")


def list_parquet_files(data_dir: str | os.PathLike) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(".parquet") and p.is_file())


def split_files(files: list[Path], split: str) -> list[Path]:
    """The last shard is validation, the rest train (upstream's rule)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    if len(files) < 2:
        raise DataError(f"need at least 2 parquet shards (train + validation), found {len(files)}")
    return files[:-1] if split == "train" else files[-1:]


def iter_texts(files: list[Path]):
    """Every document of these shards, in order (for tokenizer training)."""
    for f in files:
        pf = _open(f)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def _open(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for non-parquet bytes
        raise DataError(f"cannot read {path}: {e}") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf


class DocumentStream:
    """This rank's row groups of a list of shards, forever; the position is (epoch, pq_idx, rg_idx) of
    the next row group to read."""

    def __init__(self, files: list[Path], rank: int = 0, world_size: int = 1):
        self.files = files
        self.rank, self.world_size = rank, world_size
        self._row_groups = [_open(f).num_row_groups for f in files]
        if not any(n > rank for n in self._row_groups):
            raise DataError(f"rank {rank} of {world_size} gets no data: {len(files)} shard(s) with at most "
                            f"{max(self._row_groups, default=0)} row group(s) each (write shards with more row groups)")
        self.epoch, self.pq_idx, self.rg_idx = 1, 0, rank
        self.last = {"epoch": 1, "pq_idx": 0, "rg_idx": rank}

    def _advance_file(self) -> None:
        self.pq_idx += 1
        self.rg_idx = self.rank
        if self.pq_idx >= len(self.files):
            self.pq_idx = 0
            self.epoch += 1

    def next_texts(self) -> list[str]:
        while self.rg_idx >= self._row_groups[self.pq_idx]:
            self._advance_file()
        pf = _open(self.files[self.pq_idx])
        texts = pf.read_row_group(self.rg_idx, columns=["text"]).column("text").to_pylist()
        self.last = {"epoch": self.epoch, "pq_idx": self.pq_idx, "rg_idx": self.rg_idx}
        self.rg_idx += self.world_size
        return texts

    def resume_upstream(self, state: dict) -> dict:
        """Continue after upstream's saved `dataloader_state_dict` as upstream's loader resumes it: in file
        `pq_idx` at row group (rg_idx // W + 1) * W + rank, the next file when that is past the end, the
        epoch carried over (`../shared/docs/UPSTREAM_OUTPUTS.md` §8). Returns the position as
        `{epoch, pq_idx, rg_idx}` of the next row group read (a shard that no longer exists: the next epoch's
        first, as upstream)."""
        def number(key: str, low: int, default: int | None = None) -> int:
            v = state.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise DataError(f"upstream's saved data position has {key} {v!r}: not a number of at least {low}")
            return v

        if not isinstance(state, dict):
            raise DataError("upstream's saved data position (dataloader_state_dict) is not a dict")
        pq_idx, rg_idx, epoch = number("pq_idx", 0), number("rg_idx", 0), number("epoch", 1, default=1)
        self.last = {"epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx}
        if pq_idx >= len(self.files):  # upstream's first pass finds no such file and starts the next epoch
            self.epoch, self.pq_idx, self.rg_idx = epoch + 1, 0, self.rank
        else:
            self.epoch, self.pq_idx = epoch, pq_idx
            self.rg_idx = (rg_idx // self.world_size + 1) * self.world_size + self.rank
        while self.rg_idx >= self._row_groups[self.pq_idx]:  # past the file's end: the next file, as next_texts would
            self._advance_file()
        return {"epoch": self.epoch, "pq_idx": self.pq_idx, "rg_idx": self.rg_idx}

    def position(self) -> dict:
        return {"epoch": self.epoch, "pq_idx": self.pq_idx, "rg_idx": self.rg_idx, "last": dict(self.last)}

    def set_position(self, pos: dict) -> None:
        self.epoch, self.pq_idx, self.rg_idx = int(pos["epoch"]), int(pos["pq_idx"]), int(pos["rg_idx"])
        self.last = {k: int(v) for k, v in pos["last"].items()}
        if not 0 <= self.pq_idx < len(self.files):
            raise DataError(f"saved data position names shard {self.pq_idx}, but there are {len(self.files)} train shards")


class BosBestFitLoader:
    """(inputs, targets) batches of shape (B, T), every row starting with BOS; see the module docstring."""

    def __init__(self, files: list[Path], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device="cpu", buffer_size: int = 1000, track: bool = False):
        import torch

        self.stream = DocumentStream(files, rank, world_size)
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.buffer: list[list[int]] = []
        self.track = track
        self.sources: list[DocSource] = []  # parallel to buffer when tracking
        self.last_packing: list[list[RowSegment]] = []

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            texts = self.stream.next_texts()
            self.buffer.extend(self.tokenizer.encode(texts, prepend=self.bos))
            if self.track:
                last = self.stream.last
                self.sources.extend(DocSource(last["pq_idx"], last["rg_idx"], row, last["epoch"]) for row in range(len(texts)))

    def _take(self, remaining: int) -> tuple[int, list[int]]:
        """The largest buffered document that fits, else the shortest cropped to fit (upstream's best fit).
        Returns its index in the buffer, which the caller pops."""
        self._refill()
        best, best_len = -1, 0
        for i, doc in enumerate(self.buffer):
            n = len(doc)
            if best_len < n <= remaining:
                best, best_len = i, n
        if best < 0:
            best = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i]))
        return best, self.buffer[best][:remaining]

    def next_rows(self) -> list[list[int]]:
        """The next batch as B rows of T + 1 token ids (inputs are row[:-1], targets row[1:])."""
        width = self.T + 1
        rows, packing = [], []
        for _ in range(self.B):
            row: list[int] = []
            segments: list[RowSegment] = []
            while len(row) < width:
                i, piece = self._take(width - len(row))
                doc = self.buffer.pop(i)
                if self.track:
                    segments.append(RowSegment(self.sources.pop(i), len(row), len(piece), len(doc)))
                row.extend(piece)
            rows.append(row)
            packing.append(segments)
        self.last_packing = packing if self.track else []
        return rows

    def next_batch(self):
        import torch

        rows = self.next_rows()
        data = torch.tensor(rows, dtype=torch.long)
        x, y = data[:, :-1], data[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ state

    def upstream_state(self) -> dict:
        """Upstream's `dataloader_state_dict`: the last row group read (its resume skips past it)."""
        last = self.stream.last
        return {"epoch": last["epoch"], "pq_idx": last["pq_idx"], "rg_idx": last["rg_idx"]}

    def resume_upstream(self, state: dict) -> dict:
        """Continue from upstream's `dataloader_state_dict` (`DocumentStream.resume_upstream`), with an
        empty buffer: the documents upstream had buffered but not yet packed are skipped, as upstream's
        own resume skips them."""
        self.buffer, self.sources = [], []
        return self.stream.resume_upstream(state)

    def state_dict(self) -> dict:
        import torch

        lengths = torch.tensor([len(d) for d in self.buffer], dtype=torch.int64)
        flat = [t for d in self.buffer for t in d]
        pos = self.stream.position()
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "epoch": pos["epoch"], "pq_idx": pos["pq_idx"], "rg_idx": pos["rg_idx"],
            "last": pos["last"],
            "rank": self.stream.rank, "world_size": self.stream.world_size,
            "batch_size": self.B, "seq_len": self.T,
            "buffer_tokens": torch.tensor(flat, dtype=torch.int32),
            "buffer_lengths": lengths,
        }

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise DataError("the saved data-loader state was not written by this loader")
        if (sd["rank"], sd["world_size"]) != (self.stream.rank, self.stream.world_size):
            raise DataError(f"the saved data position is rank {sd['rank']} of {sd['world_size']}, this process is "
                            f"rank {self.stream.rank} of {self.stream.world_size}")
        self.stream.set_position(sd)
        tokens = sd["buffer_tokens"].tolist()
        self.buffer, offset = [], 0
        for n in sd["buffer_lengths"].tolist():
            self.buffer.append(tokens[offset:offset + n])
            offset += n
        self.sources = [DocSource(None, None, None, None) for _ in self.buffer]
