"""
The dataset inspector's cache: one pass of `nanochat.shards.scan_shard` per shard, stored in the registry
(`dataset_shards`, `shard_token_counts`) so reopening a folder costs a stat per file and one query.

`inspect_dataset(store, folder, tokenizer_dir=None, exact=False)`:
- a shard whose (size, mtime_ns) equal the stored ones is not read again (its row and token counts are
  reused); a changed or new one is scanned and replaces its row (old token counts deleted with it);
- with a tokenizer, each shard gets a token count under that tokenizer's file digest: sampled (a few row
  groups, in milliseconds) unless `exact`, which counts every token in the same streaming pass that reads
  the statistics; an exact count is never replaced by an estimate;
- a stopped pass (`should_stop`) raises `nanochat.shards.ScanStopped`; shards finished before it are kept.

Unreadable shards are stored with their error and reported as findings. What a shard holds and how it
is read is `nanochat.shards`'; which file is validation is `nanochat.dataloader`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from registry.entities import DatasetReport, ShardRecord, TokenCount, utc
from registry.errors import RegistryError
from registry.models import DatasetShard, ShardTokenCount

STAT_FIELDS = ("rows", "row_groups", "docs", "chars", "utf8_bytes", "empty", "duplicates", "noisy", "invalid_utf8", "error")


class DatasetPathError(RegistryError):
    """A folder that holds no parquet shards, or a tokenizer that cannot be read."""


def _record(row: DatasetShard, counts: list[ShardTokenCount], reused: bool) -> ShardRecord:
    from nanochat.shards import ShardStats

    stats = ShardStats(row.path, row.size, row.mtime_ns, columns=tuple(row.columns or ()), hist=tuple(row.hist or ()),
                       **{f: getattr(row, f) for f in STAT_FIELDS})
    return ShardRecord(stats, utc(row.inspected_at), row.duration_s,
                       tuple(TokenCount(c.tokenizer, c.tokens, c.exact) for c in counts), reused)


def stored_shards(store, paths: list[Path]) -> dict[str, ShardRecord]:
    """The registry's records of these shard paths (any stamp), by path."""
    keys = [str(p) for p in paths]
    with store.db.session() as s:
        rows = {r.path: r for r in s.execute(sa.select(DatasetShard).where(DatasetShard.path.in_(keys))).scalars()}
        counts: dict[int, list[ShardTokenCount]] = {}
        if rows:
            for c in s.execute(sa.select(ShardTokenCount).where(
                    ShardTokenCount.shard_id.in_([r.id for r in rows.values()]))).scalars():
                counts.setdefault(c.shard_id, []).append(c)
        return {k: _record(r, counts.get(r.id, []), True) for k, r in rows.items()}


def _save(store, stats, duration_s: float, count: TokenCount | None) -> ShardRecord:
    now = time.time()

    def write(s):
        row = s.execute(sa.select(DatasetShard).where(DatasetShard.path == stats.path)).scalar_one_or_none()
        changed = row is None or (row.size, row.mtime_ns) != (stats.size, stats.mtime_ns)
        if row is None:
            row = DatasetShard(path=stats.path, size=stats.size, mtime_ns=stats.mtime_ns, inspected_at=now)
            s.add(row)
        elif changed:
            s.execute(sa.delete(ShardTokenCount).where(ShardTokenCount.shard_id == row.id))
        row.size, row.mtime_ns, row.inspected_at, row.duration_s = stats.size, stats.mtime_ns, now, duration_s
        row.columns, row.hist = list(stats.columns), list(stats.hist)
        for f in STAT_FIELDS:
            setattr(row, f, getattr(stats, f))
        s.flush()
        if count is not None:
            _upsert_count(store, s, row.id, count, now)
        counts = list(s.execute(sa.select(ShardTokenCount).where(ShardTokenCount.shard_id == row.id)).scalars())
        return _record(row, counts, False)

    return store.db.write(write)


def _upsert_count(store, s, shard_id: int, count: TokenCount, now: float) -> None:
    stmt = store.db.insert(ShardTokenCount.__table__).values(shard_id=shard_id, tokenizer=count.tokenizer,
                                                             tokens=count.tokens, exact=count.exact, counted_at=now)
    s.execute(stmt.on_conflict_do_update(index_elements=["shard_id", "tokenizer"],
                                         set_={"tokens": count.tokens, "exact": count.exact, "counted_at": now}))


def _save_count(store, path: str, count: TokenCount) -> ShardRecord:
    def write(s):
        row = s.execute(sa.select(DatasetShard).where(DatasetShard.path == path)).scalar_one()
        _upsert_count(store, s, row.id, count, time.time())
        counts = list(s.execute(sa.select(ShardTokenCount).where(ShardTokenCount.shard_id == row.id)).scalars())
        return _record(row, counts, True)

    return store.db.write(write)


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """(Tokenizer, fingerprint) or DatasetPathError with the tokenizer's own one-line reason."""
    from nanochat.tokenizer import Tokenizer, TokenizerError
    from nanochat.tokenizer_inspect import fingerprint

    try:
        return Tokenizer.from_directory(tokenizer_dir), fingerprint(tokenizer_dir)
    except TokenizerError as e:
        raise DatasetPathError(str(e)) from None


def inspect_dataset(store, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, exact: bool = False,
                    world_size: int = 1, progress: Callable | None = None,
                    should_stop: Callable[[], bool] | None = None) -> DatasetReport:
    """Every shard of a folder, read only where it changed (see the module docstring)."""
    from nanochat import shards as sh
    from nanochat.dataloader import DataError

    t0 = time.monotonic()
    try:
        data_dir, files = sh.resolve_data_dir(path)
    except DataError as e:
        raise DatasetPathError(str(e)) from None
    tok, key = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else (None, None)
    known = stored_shards(store, files)
    records: list[ShardRecord] = []
    inspected = 0
    for f in files:
        rec = known.get(str(f))
        try:
            stamp = sh.file_stamp(f)
        except OSError:
            stamp = None
        fresh = rec is not None and stamp == (rec.stats.size, rec.stats.mtime_ns)
        have = rec.tokens(key) if fresh and key else None
        need_exact = tok is not None and exact and not (have and have.exact) and not (fresh and rec.stats.error)
        if not fresh or need_exact:
            started = time.monotonic()
            stats = sh.scan_shard(f, tok if exact else None, progress=progress, should_stop=should_stop, tokenizer_key=key)
            count = TokenCount(key, stats.tokens, True) if stats.tokens is not None else None
            rec = _save(store, stats, time.monotonic() - started, count)
            inspected += 1
        if tok is not None and rec.tokens(key) is None and not rec.stats.error:
            estimate = sh.estimate_tokens(rec.stats, tok)
            if estimate is not None:
                rec = _save_count(store, str(f), TokenCount(key, estimate, False))
                rec = ShardRecord(rec.stats, rec.inspected_at, rec.duration_s, rec.token_counts, fresh)
        records.append(rec)
    findings = sh.dataset_findings([r.stats for r in records], world_size)
    counts = [r.tokens(key) for r in records if not r.stats.error] if key else []
    total = sum(c.tokens for c in counts) if key and all(counts) else None
    train = [r.tokens(key) for r in records[:-1] if not r.stats.error] if key and len(records) > 1 else []
    train_total = sum(c.tokens for c in train) if train and all(train) else None
    return DatasetReport(str(data_dir), tuple(records), findings, world_size, key,
                         str(Path(tokenizer_dir).expanduser().resolve()) if tokenizer_dir is not None else None,
                         total, train_total, bool(counts) and all(c and c.exact for c in counts), inspected,
                         len(records) - inspected, time.monotonic() - t0)
