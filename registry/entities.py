"""
What the registry returns: frozen dataclasses, built inside the store's session from ORM rows, so
callers (CLI, app, integrity checks) never hold a row or a session. `to_jsonable` turns any of them
into the plain JSON the CLI's `--json` prints (datetimes as ISO 8601 strings in UTC).

Times are timezone-aware UTC datetimes; a metric point's `wall_time` stays unix seconds (float),
as metrics.jsonl writes it, because charts plot it as a number. This module has no behaviour beyond
small derived properties.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing the registry never imports pyarrow
    from nanochat.shards import DatasetFindings, ShardStats

# Run statuses, in the order they are decided (first that applies).
RUN_STATUSES = ("missing", "finished", "training", "incomplete", "stopped")
# A checkpoint's state, worst first (the first that applies): the word (JSON "state", the app's filters)
# -> the label people read (the CLI's tables, the app's pages). The CLI and the app use only these.
CHECKPOINT_STATES: dict[str, str] = {
    "missing": "deleted",  # its files are gone from disk (its history is kept)
    "incomplete": "incomplete",  # cannot be loaded: a file is missing or unreadable
    "problems": "problems",  # loads, but a problem blocks resuming from it, or its latest check failed
    "verified": "deep-verified",  # its latest check read every byte and passed
    "quick_ok": "quick-checked",  # its latest check was a quick one and passed
    "unchecked": "not verified",  # complete and resumable as far as the scan saw; never checked
}


def utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def state_of(*, missing: bool, loadable: bool, ok: bool, checked: str | None) -> str:
    """The word of CHECKPOINT_STATES that applies first. ok: no problem known (from the scan or the
    latest check); checked: the latest check's mode ("quick" | "deep"), None when never checked."""
    if missing:
        return "missing"
    if not loadable:
        return "incomplete"
    if not ok:
        return "problems"
    if checked is None:
        return "unchecked"
    return "verified" if checked == "deep" else "quick_ok"


def checkpoint_state(c) -> str:
    """The state word of a CheckpointRecord (read by attribute: its problems and latest integrity result)."""
    latest = c.latest_integrity
    return state_of(missing=c.missing, loadable=c.complete, ok=not c.problems and (latest is None or latest.ok),
                    checked=latest.mode if latest is not None else None)


@dataclasses.dataclass(frozen=True)
class ProblemRecord:
    """One thing wrong with a checkpoint. `blocks`: "load" (unusable) or "resume" (loads, cannot resume)."""
    code: str
    message: str
    file: str | None = None
    blocks: str | None = None


@dataclasses.dataclass(frozen=True)
class IntegrityRecord:
    id: int
    checkpoint_id: int
    checked_at: datetime
    duration_s: float
    mode: str  # "quick" | "deep"
    ok: bool
    problems: tuple[ProblemRecord, ...]


@dataclasses.dataclass(frozen=True)
class TokenBytesVerdict:
    """Whether the token_bytes.pt beside a run's tokenizer is right (registry/tokenizer_checks.py). verdict:
    "right", "absent" (no file: bpb computed from the tokenizer, also right), "wrong" or "unreadable"."""
    tokenizer_dir: str
    verdict: str
    wrong: int  # tokens whose stored byte length differs from the tokenizer's
    old_method: bool  # the differences are exactly upstream's pre-2ce972a bug
    vocab_size: int | None
    stored_sum: int | None
    correct_sum: int | None
    values_digest: str | None  # of the byte lengths bpb was computed with
    error: str | None
    checked_at: datetime

    @property
    def right(self) -> bool:
        return self.verdict in ("right", "absent")

    @property
    def label(self) -> str:
        """A few characters for tables: "right", "no file (ok)", "WRONG: 312" (token ids), "unreadable"."""
        return {"right": "right", "absent": "no file (ok)", "wrong": f"WRONG: {self.wrong}"}.get(self.verdict, self.verdict)


def bpb_comparability(runs, names=None) -> str | None:
    """Why these runs' val_bpb cannot be compared, or None when they can. val_bpb is comparable across
    tokenizers only when each run's token_bytes is right; runs with a wrong file compare only with runs
    that used the very same byte lengths. `runs`: RunSummary-like (id, label, token_bytes); `names`: run id
    -> the name to print (default: the label)."""
    runs = list(runs)
    if len(runs) < 2:
        return None
    name = (lambda r: names.get(r.id, r.label)) if names else (lambda r: r.label)
    unknown = [name(r) for r in runs if r.token_bytes is None or r.token_bytes.verdict == "unreadable"]
    wrong = [r for r in runs if r.token_bytes is not None and r.token_bytes.verdict == "wrong"]
    if wrong and (len({r.token_bytes.values_digest for r in wrong}) > 1 or len(wrong) < len(runs) - len(unknown)):
        which = ", ".join(f"{name(r)} ({r.token_bytes.wrong} tokens wrong)" for r in wrong)
        return (f"val_bpb not comparable: the token_bytes.pt of {which} disagrees with its tokenizer (upstream's old build), "
                "so its bits per byte are off; rebuild it and re-evaluate, or compare only runs that used the same file")
    if unknown:
        return (f"val_bpb may not be comparable: the token_bytes of {', '.join(unknown)} could not be checked (no readable "
                "tokenizer folder beside the run or in its base dir)")
    return None


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run (a checkpoint directory on one machine) with what the runs overview shows."""
    id: int
    path: str
    origin: str | None  # the machine whose scans index it (host name or scan --origin); None: any (before schema 5)
    phase: str  # base | sft | rl
    tag: str
    label: str  # "phase/tag"
    status: str  # one of RUN_STATUSES, see store.run_status
    depth: int | None
    n_params: int | None
    generation: str | None  # "classic" | "current" (architecture read from the state dict)
    model_config: dict
    user_config: dict
    num_iterations: int | None  # target steps
    world_size: int | None
    total_batch_size: int | None  # tokens per step
    flops_per_token: int | None
    latest_step: int | None  # largest step seen in checkpoints or metrics
    latest_checkpoint_step: int | None  # newest complete, present checkpoint
    best_val_bpb: float | None
    best_val_bpb_step: int | None
    last_val_bpb: float | None  # at the largest (segment, step)
    last_val_bpb_step: int | None
    checkpoint_count: int  # present on disk
    complete_checkpoint_count: int
    missing_checkpoint_count: int
    segments: int  # resume segments seen in its metrics
    has_metrics_file: bool
    first_seen: datetime
    last_seen: datetime  # last scan that found it
    last_update: datetime | None  # newest mtime of its checkpoint files and metrics.jsonl
    missing: bool
    token_bytes: TokenBytesVerdict | None = None  # None: no tokenizer folder found for it (schema 3)

    @property
    def progress(self) -> float | None:
        if self.latest_step is None or not self.num_iterations:
            return None
        return min(1.0, self.latest_step / self.num_iterations)


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    id: int
    run_id: int
    run_label: str
    directory: str  # the run's directory
    step: int | None  # None: a single-file checkpoint whose metadata cannot be read
    layout: str  # "upstream" | "single_file"
    segment: int
    val_bpb: float | None
    complete: bool  # loadable (no problem that blocks loading)
    resumable: bool  # a script can continue from it: no problem at all, and resume_note is None
    missing: bool  # its files are gone from disk (history kept)
    has_train_state: bool
    world_size: int | None
    problems: tuple[ProblemRecord, ...]
    size_bytes: int
    mtime: datetime | None  # newest of its files
    first_seen: datetime
    inspected: datetime
    latest_integrity: IntegrityRecord | None
    resume_note: str | None = None  # why no script resumes it however intact (classic, single file, chat_rl)

    @property
    def label(self) -> str:
        return f"{self.run_label}@{self.step if self.step is not None else '?'}"

    @property
    def state(self) -> str:
        """One of CHECKPOINT_STATES."""
        return checkpoint_state(self)


@dataclasses.dataclass(frozen=True)
class FileRecord:
    name: str
    path: str
    kind: str  # model | meta | optimizer | train_state | single_file
    rank: int | None
    size: int
    mtime: datetime
    mtime_ns: int
    missing: bool
    sha256: str | None  # NULL until an integrity check computes it
    sha256_at: datetime | None
    sha256_size: int | None
    sha256_mtime_ns: int | None


@dataclasses.dataclass(frozen=True)
class CheckpointDetail:
    checkpoint: CheckpointRecord
    run: RunSummary
    meta: dict | None
    files: tuple[FileRecord, ...]
    integrity: tuple[IntegrityRecord, ...]  # newest first


@dataclasses.dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float | None  # None: NaN in the source
    segment: int
    wall_time: float | None  # unix seconds


@dataclasses.dataclass(frozen=True)
class MetricSeries:
    """One metric of one run, at most max_points points, sorted by (segment, step)."""
    run_id: int
    run_label: str
    key: str
    points: tuple[MetricPoint, ...]
    total_points: int  # points stored (in the requested step range)
    downsampled: bool
    segments: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MetricKeyInfo:
    key: str
    count: int
    min_value: float | None
    min_step: int | None
    max_value: float | None
    max_step: int | None
    last_value: float | None
    last_step: int | None
    last_segment: int | None
    segments: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BestCheckpoint:
    checkpoint: CheckpointRecord
    metric: str
    value: float
    mode: str  # "min" | "max"


@dataclasses.dataclass(frozen=True)
class DiffRow:
    key: str  # dotted, e.g. "model_config.n_layer"
    a: object
    b: object
    status: str  # "changed" | "only_a" | "only_b" | "same"


@dataclasses.dataclass(frozen=True)
class ConfigDiff:
    a: str  # labels of what was compared
    b: str
    rows: tuple[DiffRow, ...]

    @property
    def changed(self) -> tuple[DiffRow, ...]:
        return tuple(r for r in self.rows if r.status != "same")


@dataclasses.dataclass(frozen=True)
class ScanProblemRecord:
    path: str
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class ScanReport:
    scan_id: int
    root: str
    status: str  # "ok" | "failed" | "running" | "interrupted" (Ctrl-C, or found dead by a later scan)
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    runs_found: int
    runs_new: int
    runs_missing: int  # runs whose folder vanished, marked missing by this scan
    checkpoints_seen: int
    checkpoints_new: int
    checkpoints_changed: int
    checkpoints_unchanged: int  # cost a stat only
    checkpoints_missing: int  # marked missing by this scan
    files_stat: int
    metric_lines: int
    metric_bad_lines: int
    problems: tuple[ScanProblemRecord, ...]
    error: str | None = None
    origin: str | None = None  # the machine that scanned (None: a scan from before schema 5)


@dataclasses.dataclass(frozen=True)
class ImportReport:
    run_id: int
    run_label: str
    path: str
    lines: int
    train_lines: int
    eval_lines: int
    points_new: int
    points_existing: int  # already in the registry (same key, step, segment)
    malformed: int
    malformed_examples: tuple[tuple[int, str], ...]  # (line number, text) of the first few
    ignored_fields: tuple[str, ...]  # field names seen in step lines that are not imported
    evals_new: int = 0  # evaluation results added (eval_results rows)
    evals_updated: int = 0  # already there from this source (value refreshed)
    runs: tuple[str, ...] = ()  # every run the file fed (a log may hold several scripts' output)
    unmatched: tuple[str, ...] = ()  # parts of the file that no run could be found for, and why


@dataclasses.dataclass(frozen=True)
class LogsImport:
    """Logs and base_eval CSVs imported from one file or folder: what went in, and what could not."""
    path: str
    reports: tuple[ImportReport, ...]
    failures: tuple[tuple[str, str], ...]  # (file, one-line reason)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One evaluation figure (eval_results row): `task` and `metric` name it, `key` = "task:metric" is
    what `best --metric` and the app use."""
    id: int
    run_id: int
    run_label: str
    step: int
    task: str
    metric: str
    value: float | None
    n_examples: int | None
    script: str  # base_train | base_eval | chat_sft | chat_eval | chat_rl
    source: str
    recorded_at: datetime

    @property
    def key(self) -> str:
        return f"{self.task}:{self.metric}"


@dataclasses.dataclass(frozen=True)
class RegistrySummary:
    url: str
    schema_version: int
    read_only: str | None  # why the registry was opened read-only (its file or folder is not writable); None: writable
    roots: int
    runs: int
    runs_by_status: dict
    checkpoints: int  # present on disk
    complete_checkpoints: int
    incomplete_checkpoints: int
    missing_checkpoints: int
    metric_series: int
    metric_points: int
    integrity_results: int
    last_scan: ScanReport | None


@dataclasses.dataclass(frozen=True)
class TokenCount:
    tokenizer: str  # digest of the tokenizer file (nanochat.tokenizer_inspect.fingerprint)
    tokens: int
    exact: bool  # False: estimated from a sample


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One shard as the dataset inspector last read it (`stats` is a nanochat.shards.ShardStats)."""
    stats: ShardStats
    inspected_at: datetime
    duration_s: float
    token_counts: tuple[TokenCount, ...]
    reused: bool = False  # taken from the registry this time (the file was unchanged)

    def tokens(self, tokenizer: str | None) -> TokenCount | None:
        return next((t for t in self.token_counts if t.tokenizer == tokenizer), None)


@dataclasses.dataclass(frozen=True)
class DatasetReport:
    """A folder of shards: every shard (validation last), the findings that matter before training and
    the token total under one tokenizer (None when some shard has no count)."""
    data_dir: str
    shards: tuple[ShardRecord, ...]
    findings: DatasetFindings
    world_size: int
    tokenizer: str | None  # fingerprint
    tokenizer_dir: str | None
    tokens: int | None
    train_tokens: int | None
    tokens_exact: bool
    inspected: int  # shards read in this call
    reused: int  # shards taken from the registry unchanged
    duration_s: float


def to_jsonable(obj):
    """Dataclasses, datetimes, paths, tuples and non-finite floats to plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, RunSummary):
            out["progress"] = obj.progress
        if isinstance(obj, TokenBytesVerdict):
            out["right"] = obj.right
        if isinstance(obj, CheckpointRecord):
            out["label"] = obj.label
            out["state"] = obj.state
        if isinstance(obj, EvalRecord):
            out["key"] = obj.key
        return out
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
