"""
What a folder of parquet shards holds, read the way training reads it: one row group at a time.

`scan_shard(path, tokenizer=None)` is one streaming pass over a shard: rows, row groups, documents,
characters, UTF-8 bytes, empty documents, exact duplicates within the shard (8-byte BLAKE2 digests,
sorted at the end: 8 bytes per document is all that grows), documents with control characters or U+FFFD
(text damaged before it was written), values that are not valid UTF-8 (a binary `text` column), a
histogram of document lengths, and, given a tokenizer, the exact token count (tiktoken's
`encode_ordinary_batch` on every core, overlapped with the statistics of the same row group). A file
that cannot be read, or has no text column, gives a `ShardStats` with `error` set, never an exception.

`estimate_tokens` samples a few row groups (tokens per character times the shard's characters);
`sample_documents`, `random_documents`, `search` and `read_document` read documents for the pages;
`near_duplicates` finds near-duplicate documents on a sample with MinHash LSH (`rensa`, a small
Rust MinHash library with no dependencies; datasketch would have pulled in SciPy).
`dataset_findings` turns per-shard statistics into what matters before training: the validation shard
(the last, as `dataloader.split_files` says) and whether it has a row group for each of W ranks.

Progress is reported per row group (`ScanProgress`: rows and bytes done, ETA) and a pass stops between
row groups when `should_stop()` says so (`ScanStopped`). Torch-free; the registry caches the results
(`registry/datasets.py`). The file layout itself (which folder, which file is validation) is
`dataloader.py`'s.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanochat.dataloader import DataError, find_data_dir, list_parquet_files, split_files
from nanochat.tokenizer import encode_threads

TEXT = "text"
# Document length histogram edges, in characters: [0, 1), [1, 2), [2, 4), ... [2^20, inf).
HIST_EDGES = (0, *(2 ** i for i in range(21)))
NOISE_RE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # control characters other than tab, newline, carriage return
REPLACEMENT = "\ufffd"


class ScanStopped(Exception):
    """The user stopped a pass; nothing partial is stored."""


@dataclass(frozen=True)
class ScanProgress:
    path: str
    rows_done: int
    rows_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        if not self.bytes_done or self.bytes_done >= self.bytes_total:
            return None
        return self.elapsed_s * (self.bytes_total - self.bytes_done) / self.bytes_done

    def line(self) -> str:
        eta = f", ETA {fmt_duration(self.eta_s)}" if self.eta_s is not None else ""
        return (f"{Path(self.path).name}: {self.rows_done:,}/{self.rows_total:,} rows, "
                f"{self.bytes_done / 1e6:,.1f}/{self.bytes_total / 1e6:,.1f} MB{eta}")


Progress = Callable[[ScanProgress], None]


@dataclass(frozen=True)
class ShardStats:
    path: str
    size: int
    mtime_ns: int
    rows: int = 0
    row_groups: int = 0
    columns: tuple[str, ...] = ()
    docs: int = 0
    chars: int = 0
    utf8_bytes: int = 0
    empty: int = 0  # null, empty or whitespace-only
    duplicates: int = 0  # documents identical to an earlier one in this shard
    noisy: int = 0  # with control characters or U+FFFD
    invalid_utf8: int = 0  # binary values that do not decode
    hist: tuple[int, ...] = ()  # counts per HIST_EDGES bin
    error: str | None = None  # unreadable file, no text column: the shard is reported, not used
    tokens: int | None = None  # exact, under `tokenizer`
    tokenizer: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class DocRef:
    shard: str  # file name
    row_group: int
    row: int  # within the row group

    def label(self) -> str:
        return f"{self.shard} · row group {self.row_group} · row {self.row}"


@dataclass(frozen=True)
class Document:
    ref: DocRef
    text: str


@dataclass(frozen=True)
class NearDuplicate:
    a: DocRef
    b: DocRef
    similarity: float  # estimated Jaccard similarity of word 5-gram sets


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning | info
    shard: str | None
    message: str


@dataclass(frozen=True)
class DatasetFindings:
    train: tuple[str, ...]
    validation: str | None
    findings: tuple[Finding, ...] = field(default=())


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def resolve_data_dir(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """A base dir (its base_data_climbmix/ or base_data/, as training picks) or any folder of *.parquet
    files, and its shards in name order."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise DataError(f"{p} is not a folder")
    files = list_parquet_files(p)
    if not files:
        try:
            p = find_data_dir(p)
        except DataError:
            raise DataError(f"no *.parquet shards in {p} (nor in its base_data_climbmix/ or base_data/)") from None
        files = list_parquet_files(p)
    return p, files


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns): a shard with the same stamp is not read again."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _open(path: Path) -> tuple[pq.ParquetFile | None, str | None]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # ArrowInvalid (a ValueError) for bytes that are not parquet
        return None, f"not a readable parquet file: {str(e).splitlines()[0]}"
    names = pf.schema_arrow.names
    if TEXT not in names:
        return pf, f"no '{TEXT}' column (columns: {', '.join(names) or 'none'})"
    kind = pf.schema_arrow.field(TEXT).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return pf, f"the '{TEXT}' column holds {kind}, not text"
    return pf, None


def _texts(column: pa.ChunkedArray) -> tuple[list[str], int]:
    """Python strings of a text column (nulls as ""), and how many binary values were not UTF-8."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        out, bad = [], 0
        for v in column.to_pylist():
            try:
                out.append((v or b"").decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.decode("utf-8", errors="replace"))
                bad += 1
        return out, bad
    return [t if t is not None else "" for t in column.to_pylist()], 0


def _row_group_bytes(pf: pq.ParquetFile, i: int) -> int:
    rg = pf.metadata.row_group(i)
    return sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))


def scan_shard(path: str | os.PathLike, tokenizer=None, threads: int | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, tokenizer_key: str | None = None) -> ShardStats:
    """One pass over a shard (see the module docstring). `tokenizer`: a nanochat Tokenizer whose exact
    token count is wanted, stored as `tokenizer_key`."""
    path = Path(path)
    try:
        size, mtime = file_stamp(path)
    except OSError as e:
        return ShardStats(str(path), 0, 0, error=f"cannot stat: {e.strerror}")
    pf, error = _open(path)
    if pf is None or error:
        meta = pf.metadata if pf is not None else None
        return ShardStats(str(path), size, mtime, rows=meta.num_rows if meta else 0,
                          row_groups=meta.num_row_groups if meta else 0,
                          columns=tuple(pf.schema_arrow.names) if pf is not None else (), error=error)
    threads = threads or encode_threads()
    n_groups, total_rows = pf.num_row_groups, pf.metadata.num_rows
    sizes = [_row_group_bytes(pf, i) for i in range(n_groups)]
    total_bytes = sum(sizes)
    agg = dict(docs=0, chars=0, utf8_bytes=0, empty=0, noisy=0, invalid_utf8=0)
    hist = np.zeros(len(HIST_EDGES), dtype=np.int64)
    digests: list[np.ndarray] = []
    tokens = 0 if tokenizer is not None else None
    t0 = time.monotonic()
    done_rows = done_bytes = 0
    pool = ThreadPoolExecutor(1) if tokenizer is not None else None
    try:
        for i in range(n_groups):
            if should_stop is not None and should_stop():
                raise ScanStopped(f"stopped at row group {i} of {n_groups} of {path.name}")
            try:
                column = pf.read_row_group(i, columns=[TEXT]).column(TEXT)
            except (OSError, ValueError) as e:
                return ShardStats(str(path), size, mtime, rows=total_rows, row_groups=n_groups,
                                  columns=tuple(pf.schema_arrow.names),
                                  error=f"row group {i} cannot be read: {str(e).splitlines()[0]}")
            texts, bad = _texts(column)
            # tiktoken's Rust encoder releases the GIL: encode this row group while its statistics are computed
            future = pool.submit(tokenizer.enc.encode_ordinary_batch, texts, num_threads=threads) if pool else None
            _row_group_stats(column, texts, agg, hist, digests)
            agg["invalid_utf8"] += bad
            if future is not None:
                tokens += sum(map(len, future.result()))
            done_rows += len(texts)
            done_bytes += sizes[i]
            if progress is not None:
                progress(ScanProgress(str(path), done_rows, total_rows, done_bytes, total_bytes, time.monotonic() - t0))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    all_digests = np.sort(np.concatenate(digests)) if digests else np.zeros(0, dtype=np.uint64)
    duplicates = int(np.count_nonzero(all_digests[1:] == all_digests[:-1])) if len(all_digests) > 1 else 0
    return ShardStats(str(path), size, mtime, rows=total_rows, row_groups=n_groups, columns=tuple(pf.schema_arrow.names),
                      duplicates=duplicates, hist=tuple(int(x) for x in hist), tokens=tokens,
                      tokenizer=tokenizer_key if tokenizer is not None else None, **agg)


def _row_group_stats(column: pa.ChunkedArray, texts: list[str], agg: dict, hist: np.ndarray,
                     digests: list[np.ndarray]) -> None:
    strings = pa.chunked_array([pa.array(texts, type=pa.string())]) if not pa.types.is_string(column.type) \
        and not pa.types.is_large_string(column.type) else column.fill_null("")
    chars = pc.utf8_length(strings).to_numpy(zero_copy_only=False)
    agg["docs"] += len(texts)
    agg["chars"] += int(chars.sum())
    agg["utf8_bytes"] += int(pc.sum(pc.binary_length(strings)).as_py() or 0)
    agg["empty"] += int(pc.sum(pc.equal(pc.utf8_trim_whitespace(strings), "")).as_py() or 0)
    noisy = pc.or_(pc.match_substring_regex(strings, NOISE_RE), pc.match_substring(strings, REPLACEMENT))
    agg["noisy"] += int(pc.sum(noisy).as_py() or 0)
    hist += np.bincount(np.searchsorted(HIST_EDGES, chars, side="right") - 1, minlength=len(HIST_EDGES))
    digests.append(np.frombuffer(b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts),
                                 dtype=np.uint64))


# ---------------------------------------------------------------------- sampling and reading documents


def _readable(files: list[Path]) -> list[tuple[Path, pq.ParquetFile]]:
    out = []
    for f in files:
        pf, error = _open(Path(f))
        if pf is not None and not error and pf.num_row_groups:
            out.append((Path(f), pf))
    return out


def _row_group_texts(pf: pq.ParquetFile, i: int) -> list[str]:
    return _texts(pf.read_row_group(i, columns=[TEXT]).column(TEXT))[0]


def sample_documents(files: list[Path], max_docs: int = 2000, groups_per_shard: int = 3) -> list[Document]:
    """Up to `max_docs` documents from a few evenly spread row groups of every readable shard (deterministic)."""
    shards = _readable(files)
    if not shards:
        return []
    per_shard = max(1, max_docs // len(shards))
    out: list[Document] = []
    for path, pf in shards:
        n = pf.num_row_groups
        picks = sorted({int(k * n / groups_per_shard) for k in range(groups_per_shard)} & set(range(n)))
        taken = 0
        for i in picks:
            for row, text in enumerate(_row_group_texts(pf, i)[: per_shard - taken]):
                out.append(Document(DocRef(path.name, i, row), text))
                taken += 1
            if taken >= per_shard:
                break
    return out[:max_docs]


def estimate_tokens(stats: ShardStats, tokenizer, max_docs: int = 2000) -> int | None:
    """Tokens of a shard from a sample: sampled tokens per character times the shard's characters."""
    if stats.error or not stats.chars:
        return 0 if not stats.error else None
    sample = sample_documents([Path(stats.path)], max_docs=max_docs)
    chars = sum(len(d.text) for d in sample)
    if not chars:
        return None
    tokens = sum(map(len, tokenizer.enc.encode_ordinary_batch([d.text for d in sample], num_threads=encode_threads(len(sample)))))
    return round(stats.chars * tokens / chars)


def read_document(path: str | os.PathLike, row_group: int, row: int) -> Document:
    pf, error = _open(Path(path))
    if pf is None or error:
        raise ValueError(f"{Path(path).name}: {error}")
    if not 0 <= row_group < pf.num_row_groups:
        raise ValueError(f"{Path(path).name} has {pf.num_row_groups} row groups, not {row_group + 1}")
    texts = _row_group_texts(pf, row_group)
    if not 0 <= row < len(texts):
        raise ValueError(f"row group {row_group} of {Path(path).name} has {len(texts)} rows, not {row + 1}")
    return Document(DocRef(Path(path).name, row_group, row), texts[row])


def document_at(path: str | os.PathLike, index: int) -> tuple[Document, int]:
    """The `index`-th document (0-based, counting across row groups) of a shard, and how many it holds;
    only its row group is read. ValueError (one line) for an unreadable shard or an index out of range."""
    pf, error = _open(Path(path))
    if pf is None or error:
        raise ValueError(f"{Path(path).name}: {error}")
    total = pf.metadata.num_rows
    if not 0 <= index < total:
        raise ValueError(f"{Path(path).name} has {total:,} documents (0..{total - 1}), not {index}")
    for i in range(pf.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if index < n:
            return read_document(path, i, index), total
        index -= n
    raise AssertionError("unreachable: the row groups hold num_rows rows")


def random_documents(files: list[Path], n: int = 5, seed: int | None = None) -> list[Document]:
    """n documents at random (a random row group of a shard chosen by size, then a random row)."""
    shards = _readable(files)
    if not shards:
        return []
    rng = random.Random(seed)
    weights = [pf.metadata.num_rows for _, pf in shards]
    out = []
    for _ in range(n):
        path, pf = rng.choices(shards, weights=weights)[0]
        i = rng.randrange(pf.num_row_groups)
        texts = _row_group_texts(pf, i)
        if texts:
            row = rng.randrange(len(texts))
            out.append(Document(DocRef(path.name, i, row), texts[row]))
    return out


def search(files: list[Path], needle: str, limit: int = 20, should_stop: Callable[[], bool] | None = None,
           ignore_case: bool = True) -> Iterator[Document]:
    """Documents containing `needle`, in shard order, row group by row group (pyarrow's vectorised match)."""
    found = 0
    for path, pf in _readable(files):
        for i in range(pf.num_row_groups):
            if found >= limit or (should_stop is not None and should_stop()):
                return
            column = pf.read_row_group(i, columns=[TEXT]).column(TEXT)
            strings = column if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) \
                else pa.chunked_array([pa.array(_texts(column)[0], type=pa.string())])
            mask = pc.match_substring(strings.fill_null(""), needle, ignore_case=ignore_case)
            for row in np.flatnonzero(mask.to_numpy(zero_copy_only=False)):
                if found >= limit:
                    return
                yield Document(DocRef(path.name, i, int(row)), strings[int(row)].as_py())
                found += 1


# ---------------------------------------------------------------------- near-duplicates


def _shingles(text: str, n: int = 5) -> list[str]:
    words = text.lower().split()
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def near_duplicates(docs: list[Document], threshold: float = 0.7, num_perm: int = 128, seed: int = 42) -> list[NearDuplicate]:
    """Pairs of documents whose word 5-gram sets have an estimated Jaccard similarity >= threshold
    (MinHash LSH with 16 bands of 8 rows: candidates from about 0.7 up; every candidate is verified)."""
    from rensa import RMinHash, RMinHashLSH

    hashes = []
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=16)
    for k, d in enumerate(docs):
        shingles = _shingles(d.text)
        m = RMinHash(num_perm=num_perm, seed=seed)
        if shingles:
            m.update(shingles)
            lsh.insert(k, m)
        hashes.append(m if shingles else None)
    pairs = []
    for k, m in enumerate(hashes):
        if m is None:
            continue
        for j in lsh.query(m):
            if j > k:
                sim = m.jaccard(hashes[j])
                if sim >= threshold:
                    pairs.append(NearDuplicate(docs[k].ref, docs[j].ref, float(sim)))
    return sorted(pairs, key=lambda p: -p.similarity)


# ---------------------------------------------------------------------- what matters before training


def dataset_findings(stats: list[ShardStats], world_size: int = 1) -> DatasetFindings:
    """The train/validation split (the last readable file is validation, as training has it) and the
    problems that stop or skew training, one line each."""
    findings: list[Finding] = []
    usable = [s for s in stats if not s.error]
    for s in stats:
        if s.error:
            findings.append(Finding("error", s.name, f"{s.name}: {s.error.rstrip('.')}; training would stop on it"))
    try:  # training splits every *.parquet file, readable or not: so does this
        train = split_files([Path(s.path) for s in stats], "train")
        val = split_files([Path(s.path) for s in stats], "val")[0]
    except ValueError as e:
        findings.append(Finding("error", None, str(e)))
        return DatasetFindings(tuple(s.name for s in stats), None, tuple(findings))
    val_stats = stats[-1]
    if not val_stats.error and val_stats.row_groups < world_size:
        findings.append(Finding("error", val_stats.name,
                                f"validation shard {val_stats.name} has {val_stats.row_groups} row group(s): with "
                                f"{world_size} ranks, rank {val_stats.row_groups} and above get no validation data and "
                                f"training stops (write it with at least {world_size} row groups)"))
    for s in usable:
        if s is val_stats:
            continue
        if s.row_groups < world_size:
            findings.append(Finding("warning", s.name, f"{s.name} has {s.row_groups} row group(s) for {world_size} ranks: "
                                                       "some ranks read nothing from it"))
    for s in usable:
        if s.empty:
            findings.append(Finding("warning", s.name, f"{s.name}: {s.empty:,} empty document(s)"))
        if s.duplicates:
            findings.append(Finding("warning", s.name, f"{s.name}: {s.duplicates:,} exact duplicate document(s)"))
        if s.noisy or s.invalid_utf8:
            findings.append(Finding("warning", s.name, f"{s.name}: {s.noisy:,} document(s) with control characters or "
                                                       f"U+FFFD, {s.invalid_utf8:,} not valid UTF-8"))
    return DatasetFindings(tuple(p.name for p in train), val.name, tuple(findings))


def epochs(train_tokens: int | None, total_batch_size: int | None, num_iterations: int | None) -> float | None:
    """Passes over the train shards a run of `num_iterations` steps of `total_batch_size` tokens makes
    (best-fit packing crops documents, so slightly more data is read than trained on)."""
    if not train_tokens or not total_batch_size or not num_iterations:
        return None
    return total_batch_size * num_iterations / train_tokens
