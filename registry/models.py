"""
The registry's tables, as typed SQLAlchemy 2.0 ORM classes. Rows never leave `registry/`: the store
converts them to the frozen dataclasses of `entities.py` inside its session.

Design notes (the why behind the columns):
- Times are unix seconds (float) so SQLite and PostgreSQL store and compare them alike; file mtimes are
  integer nanoseconds (`st_mtime_ns`) so "unchanged" is an exact comparison.
- A run is its checkpoint directory (resolved absolute path) on one machine: (origin, path) is unique, so
  two training boxes with the same default `~/.cache/nanochat` keep two runs in a shared registry, and a
  scan marks missing only what its own origin indexed. `origin` is the scanning machine's name (host name
  by default, `scan --origin`); '' is a run indexed before schema 5, which any origin's scan treats as its
  own and claims when it finds the folder. A checkpoint is (run, layout, step); step is -1 when a
  single-file checkpoint's metadata cannot be read.
- Nothing is ever deleted by a scan: vanished files, checkpoints and runs get `missing = true`.
- Metrics are normalised into series (run, key). Points are keyed (series, step, segment): that primary
  key is both the uniqueness that makes ingestion idempotent and the (run, key, step) index that history
  queries need (MLflow's missing index made them take seconds). On SQLite the points and rollups are
  WITHOUT ROWID tables, so a series is stored clustered by step.
- `metric_rollups` keeps, per series, segment and power-of-two block of steps (levels 4..32), the
  count, the minimum and the maximum point: a history query of a million points reads at most a few
  thousand rows instead of scanning the series.
- `dataset_shards` caches one pass of the dataset inspector over a parquet shard (`nanochat.shards`), keyed
  by the resolved path and valid while (size, mtime_ns) match; `shard_token_counts` holds its token count
  per tokenizer (tokenizer-file digest), exact or sampled, and is deleted with a changed shard's old row.
  Added in schema version 2.
- `eval_results` holds evaluations (CORE and its tasks, ChatCORE and chat tasks, bpb, RL pass@k) imported
  from upstream's logs and base_eval CSVs: one row per (run, source file, step, task, metric), so a
  re-import updates instead of duplicating. The step is the checkpoint's (updates done), not a foreign key:
  a log may be imported before its run's checkpoints are scanned, and a deleted checkpoint keeps its evals.
- `tokenizer_checks` holds, per tokenizer folder, whether its token_bytes.pt is right
  (`nanochat.tokenizer_inspect.check_token_bytes`), valid while `stamp` (name, size and mtime_ns of the
  tokenizer file and of token_bytes.pt) matches, so a re-scan costs two stats per folder; each run points
  at its folder's check (`runs.tokenizer_check_id`). `values_digest` identifies the byte lengths bpb was
  computed with: two runs with a wrong file are comparable only when it is the same. Added in schema version 4.
- `integrity_results` and the `sha256*` columns of `checkpoint_files` are written by the integrity
  checks (`registry.store.RegistryStore.record_integrity`); the scanner leaves them alone.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PATH_LEN = 4096


class Base(DeclarativeBase):
    type_annotation_map = {int: Integer, float: Float(53), str: String(255), dict: JSON, list: JSON}


class RegistryInfo(Base):
    """Key/value facts about the database itself: `schema_version`, `created_at`, `application`."""
    __tablename__ = "registry_info"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Root(Base):
    """A folder the user scanned (a base dir, a run dir, any folder)."""
    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(PATH_LEN), unique=True)
    first_scanned_at: Mapped[float]
    last_scanned_at: Mapped[float]
    last_scan_id: Mapped[int | None]


class Scan(Base):
    """One scan_path call: when, where, what it found. Counters are filled when it finishes."""
    __tablename__ = "scans"
    id: Mapped[int] = mapped_column(primary_key=True)
    root_path: Mapped[str] = mapped_column(String(PATH_LEN))
    origin: Mapped[str] = mapped_column(String(255), default="", server_default="")  # schema 5
    started_at: Mapped[float]
    finished_at: Mapped[float | None]
    status: Mapped[str] = mapped_column(String(16))  # running | ok | failed | interrupted
    # while running: who runs it ("running as pid N on HOST", see scanner._owner); then the failure, if any
    error: Mapped[str | None] = mapped_column(Text)
    runs_found: Mapped[int] = mapped_column(default=0)
    runs_new: Mapped[int] = mapped_column(default=0)
    runs_missing: Mapped[int] = mapped_column(default=0)
    checkpoints_seen: Mapped[int] = mapped_column(default=0)
    checkpoints_new: Mapped[int] = mapped_column(default=0)
    checkpoints_changed: Mapped[int] = mapped_column(default=0)
    checkpoints_unchanged: Mapped[int] = mapped_column(default=0)
    checkpoints_missing: Mapped[int] = mapped_column(default=0)
    files_stat: Mapped[int] = mapped_column(default=0)
    metric_lines: Mapped[int] = mapped_column(default=0)
    metric_bad_lines: Mapped[int] = mapped_column(default=0)
    problem_count: Mapped[int] = mapped_column(default=0)


class ScanProblem(Base):
    """Something a scan found wrong: a checkpoint's quick-check problem, an unreadable folder, a bad
    metrics line. A checkpoint's *current* problems also live on the checkpoint row."""
    __tablename__ = "scan_problems"
    id: Mapped[int] = mapped_column(primary_key=True)
    scan_id: Mapped[int | None] = mapped_column(ForeignKey("scans.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    path: Mapped[str] = mapped_column(String(PATH_LEN))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float]


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("origin", "path", name="uq_runs_origin_path"),
                      Index("ix_runs_phase_tag", "phase", "tag"))
    id: Mapped[int] = mapped_column(primary_key=True)
    origin: Mapped[str] = mapped_column(String(255), default="", server_default="")  # machine that indexed it; '' any
    path: Mapped[str] = mapped_column(String(PATH_LEN))
    phase: Mapped[str] = mapped_column(String(16))  # base | sft | rl
    tag: Mapped[str] = mapped_column(String(255), index=True)
    root_id: Mapped[int | None] = mapped_column(ForeignKey("roots.id"))
    # Configuration, from the newest inspected checkpoint's meta (config_step says which).
    model_config: Mapped[dict | None]
    user_config: Mapped[dict | None]
    config_step: Mapped[int | None]
    num_iterations: Mapped[int | None]
    world_size: Mapped[int | None]
    total_batch_size: Mapped[int | None] = mapped_column(BigInteger)
    depth: Mapped[int | None]
    n_params: Mapped[int | None] = mapped_column(BigInteger)
    flops_per_token: Mapped[int | None] = mapped_column(BigInteger)
    generation: Mapped[str | None] = mapped_column(String(16))  # classic | current
    first_seen_at: Mapped[float]
    last_seen_at: Mapped[float]
    last_activity_at: Mapped[float | None]  # newest mtime of its checkpoint files and metrics.jsonl
    # Fingerprint of the folder (its mtime and every file's inode, size and mtime) when it was last fully
    # indexed, and how many checkpoints it held then: an equal fingerprint means nothing to compare.
    dir_signature: Mapped[str | None] = mapped_column(String(32))
    dir_checkpoints: Mapped[int | None]
    has_metrics_file: Mapped[bool] = mapped_column(Boolean, default=False)
    missing: Mapped[bool] = mapped_column(Boolean, default=False)
    tokenizer_check_id: Mapped[int | None] = mapped_column(ForeignKey("tokenizer_checks.id"))  # schema 4


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "layout", "step", name="uq_checkpoints_run_layout_step"),
                      Index("ix_checkpoints_run_step", "run_id", "step"))
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    step: Mapped[int]  # -1: unknown (single-file checkpoint whose metadata cannot be read)
    layout: Mapped[str] = mapped_column(String(16))  # upstream | single_file
    segment: Mapped[int] = mapped_column(default=1)  # meta resume_segment (1 when absent)
    val_bpb: Mapped[float | None]
    meta: Mapped[dict | None]
    complete: Mapped[bool] = mapped_column(Boolean)  # loadable: no problem that blocks loading
    resumable: Mapped[bool] = mapped_column(Boolean)  # no problem at all (all optimizer shards...)
    missing: Mapped[bool] = mapped_column(Boolean, default=False)
    has_train_state: Mapped[bool] = mapped_column(Boolean, default=False)
    world_size: Mapped[int | None]
    problems: Mapped[list] = mapped_column(JSON, default=list)  # [{code, message, blocks, file}]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)  # newest file
    files_signature: Mapped[str | None] = mapped_column(String(32))  # digest of (name, size, mtime) of its files
    first_seen_at: Mapped[float]
    inspected_at: Mapped[float]


class CheckpointFile(Base):
    __tablename__ = "checkpoint_files"
    __table_args__ = (UniqueConstraint("checkpoint_id", "name", name="uq_checkpoint_files_name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # model | meta | optimizer | train_state | single_file
    rank: Mapped[int | None]
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    missing: Mapped[bool] = mapped_column(Boolean, default=False)
    first_seen_at: Mapped[float]
    # Written by the integrity checks; NULL until computed. size/mtime at hashing time tell a silent
    # change (same size and mtime, other bytes) from an ordinary rewrite.
    sha256: Mapped[str | None] = mapped_column(String(64))
    sha256_at: Mapped[float | None]
    sha256_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)


class IntegrityResult(Base):
    __tablename__ = "integrity_results"
    __table_args__ = (Index("ix_integrity_checkpoint_time", "checkpoint_id", "checked_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    checked_at: Mapped[float]
    duration_s: Mapped[float]
    mode: Mapped[str] = mapped_column(String(8))  # quick | deep
    ok: Mapped[bool] = mapped_column(Boolean)
    problems: Mapped[list] = mapped_column(JSON, default=list)  # [{code, message, file}]


class MetricSource(Base):
    """A file metrics come from (metrics.jsonl, an imported log) and how far it has been read."""
    __tablename__ = "metric_sources"
    __table_args__ = (UniqueConstraint("run_id", "path", name="uq_metric_sources_run_path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    path: Mapped[str] = mapped_column(String(PATH_LEN))
    kind: Mapped[str] = mapped_column(String(16))  # jsonl | log
    offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes ingested (always at a line end)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # size and mtime when last read
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    inode: Mapped[int | None] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(BigInteger, default=0)
    bad_lines: Mapped[int] = mapped_column(BigInteger, default=0)
    missing: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[float]


class MetricSeries(Base):
    """One metric of one run, with a running summary (count, min, max, last) kept by ingestion."""
    __tablename__ = "metric_series"
    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_metric_series_run_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    key: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    min_value: Mapped[float | None]
    min_step: Mapped[int | None]
    min_segment: Mapped[int | None]
    max_value: Mapped[float | None]
    max_step: Mapped[int | None]
    max_segment: Mapped[int | None]
    last_value: Mapped[float | None]  # the point with the largest (segment, step)
    last_step: Mapped[int | None]
    last_segment: Mapped[int | None]
    last_wall_time: Mapped[float | None]


class MetricSegment(Base):
    """The part of a series written by one training launch (resume segment)."""
    __tablename__ = "metric_segments"
    series_id: Mapped[int] = mapped_column(ForeignKey("metric_series.id"), primary_key=True)
    segment: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    first_step: Mapped[int]
    last_step: Mapped[int]
    first_wall_time: Mapped[float | None]
    last_wall_time: Mapped[float | None]


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = ({"sqlite_with_rowid": False},)
    series_id: Mapped[int] = mapped_column(ForeignKey("metric_series.id"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    segment: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[float | None]  # NULL: the line held NaN
    wall_time: Mapped[float | None]


class MetricRollup(Base):
    __tablename__ = "metric_rollups"
    __table_args__ = ({"sqlite_with_rowid": False},)
    series_id: Mapped[int] = mapped_column(ForeignKey("metric_series.id"), primary_key=True)
    segment: Mapped[int] = mapped_column(primary_key=True)
    level: Mapped[int] = mapped_column(primary_key=True)  # block = step >> level
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    min_step: Mapped[int | None]
    min_value: Mapped[float | None]
    min_wall_time: Mapped[float | None]
    max_step: Mapped[int | None]
    max_value: Mapped[float | None]
    max_wall_time: Mapped[float | None]


class DatasetShard(Base):
    __tablename__ = "dataset_shards"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(PATH_LEN), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    row_groups: Mapped[int] = mapped_column(default=0)
    columns: Mapped[list] = mapped_column(JSON, default=list)
    docs: Mapped[int] = mapped_column(BigInteger, default=0)
    chars: Mapped[int] = mapped_column(BigInteger, default=0)
    utf8_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    empty: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    noisy: Mapped[int] = mapped_column(BigInteger, default=0)
    invalid_utf8: Mapped[int] = mapped_column(BigInteger, default=0)
    hist: Mapped[list] = mapped_column(JSON, default=list)  # document-length counts per nanochat.shards.HIST_EDGES bin
    error: Mapped[str | None] = mapped_column(Text)  # unreadable, no text column: the shard is reported, not used
    inspected_at: Mapped[float]
    duration_s: Mapped[float] = mapped_column(default=0.0)


class ShardTokenCount(Base):
    __tablename__ = "shard_token_counts"
    shard_id: Mapped[int] = mapped_column(ForeignKey("dataset_shards.id"), primary_key=True)
    tokenizer: Mapped[str] = mapped_column(String(32), primary_key=True)  # nanochat.tokenizer_inspect.fingerprint
    tokens: Mapped[int] = mapped_column(BigInteger)
    exact: Mapped[bool] = mapped_column(Boolean)  # False: estimated from a sample
    counted_at: Mapped[float]


class EvalResult(Base):
    """One evaluation figure of a run at a step (schema version 3)."""
    __tablename__ = "eval_results"
    __table_args__ = (UniqueConstraint("run_id", "source", "step", "task", "metric", name="uq_eval_results_key"),
                      Index("ix_eval_results_run_step", "run_id", "step"))
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    step: Mapped[int]  # updates done when evaluated (the checkpoint's step)
    task: Mapped[str] = mapped_column(String(100))  # CORE, arc_easy, ChatCORE, ARC-Easy, GSM8K, bpb, ...
    metric: Mapped[str] = mapped_column(String(64))  # accuracy | centered | core | chatcore | chatcore_cat | pass@k | ...
    value: Mapped[float | None]
    n_examples: Mapped[int | None]  # when the source says (chat evals' "Final: passed/total")
    script: Mapped[str] = mapped_column(String(32))  # base_train | base_eval | chat_sft | chat_eval | chat_rl
    source: Mapped[str] = mapped_column(String(PATH_LEN))  # the log or CSV it came from
    recorded_at: Mapped[float]


class TokenizerCheck(Base):
    __tablename__ = "tokenizer_checks"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(PATH_LEN), unique=True)  # the tokenizer folder, resolved
    stamp: Mapped[str] = mapped_column(String(255))  # tokenizer file and token_bytes.pt: name:size:mtime_ns each
    verdict: Mapped[str] = mapped_column(String(16))  # right | absent | wrong | unreadable
    fingerprint: Mapped[str | None] = mapped_column(String(32))  # nanochat.tokenizer_inspect.fingerprint
    vocab_size: Mapped[int | None]
    wrong: Mapped[int] = mapped_column(default=0)  # tokens whose stored byte length differs
    old_method: Mapped[bool] = mapped_column(Boolean, default=False)  # the differences are upstream's pre-2ce972a bug
    stored_sum: Mapped[int | None] = mapped_column(BigInteger)
    correct_sum: Mapped[int | None] = mapped_column(BigInteger)
    values_digest: Mapped[str | None] = mapped_column(String(32))  # of the byte lengths bpb is computed with
    error: Mapped[str | None] = mapped_column(Text)  # why the folder could not be checked (verdict unreadable)
    checked_at: Mapped[float]
