"""
The registry store: the one object callers hold. `open_store()` connects (checking the schema), and
every method is one operation of a narrow, documented contract returning frozen dataclasses from
`entities.py`; ORM rows never leave a method.

Operations: runs overview (`list_runs`, with filters on config values), run and checkpoint references
(`resolve_run`, `resolve_checkpoint`), checkpoint history and detail, metric keys and downsampled
history, best checkpoint by a metric, config diff, scans and summary counts, and the integrity
results the integrity checks record. Scanning lives in `scanner.py` and log import in
`logimport.py`; `scan()` and `import_log()` here only forward to them.

Run status (decided at query time, first rule that applies; `now` and the window can be passed):
- missing: the run's folder no longer exists (its history is kept);
- finished: its newest complete checkpoint is at or past the target steps (`num_iterations`);
- training: a checkpoint file or metrics.jsonl changed within the last ACTIVE_WINDOW_S seconds;
- incomplete: no complete checkpoint, or the newest checkpoint is incomplete (crash while saving);
- stopped: otherwise (it ended early or was interrupted; the resume planner can continue it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import sqlalchemy as sa

from nanochat.bounds import MAX_STEP
from nanochat.checkpoint_manager import why_not_resumable
from registry import history, tokenizer_checks
from registry.db import Database
from registry.entities import (
    BestCheckpoint,
    CheckpointDetail,
    CheckpointRecord,
    ConfigDiff,
    DiffRow,
    EvalRecord,
    FileRecord,
    IntegrityRecord,
    MetricKeyInfo,
    MetricSeries,
    ProblemRecord,
    RegistrySummary,
    RunSummary,
    ScanProblemRecord,
    ScanReport,
    utc,
)
from registry.errors import AmbiguousRunError, CheckpointNotIndexedError, RegistryError, RunNotFoundError
from registry.models import (
    Checkpoint,
    CheckpointFile,
    EvalResult,
    IntegrityResult,
    MetricSegment,
    Root,
    Run,
    Scan,
    ScanProblem,
    TokenizerCheck,
)
from registry.models import MetricPoint as PointRow
from registry.models import MetricSeries as SeriesRow

ACTIVE_WINDOW_S = 600.0
PHASES = ("base", "sft", "rl", "lrfind")  # the values of nanochat.checkpoint_manager.PHASE_DIRS
RUN_FIELDS = ("id", "phase", "tag", "label", "status", "depth", "n_params", "generation", "num_iterations", "world_size",
              "total_batch_size", "path", "origin", "missing")


def check_origin(name: str) -> str:
    """An origin name as given (scan --origin): 1-255 printable characters."""
    name = str(name).strip()
    if not name or len(name) > 255 or not name.isprintable():
        raise RegistryError(f"origin {name!r} is not usable: give 1 to 255 printable characters (e.g. the machine's name)")
    return name


def default_origin() -> str:
    """The name a machine's scans record by default: its host name."""
    return socket.gethostname() or "localhost"


def open_store(url_or_path: str | os.PathLike | None = None, create: bool = True, read_only: bool = False,
               origin: str | None = None) -> RegistryStore:
    """Connect to the registry (None: $NANOCHAT_REGISTRY_URL, else <base dir>/registry.sqlite; a plain
    path is a SQLite file). Creates an empty registry when allowed; raises for other schemas.
    read_only=True never writes (a registry we cannot write is opened read-only anyway: `read_only`).
    `origin` names this machine in what it indexes (default: the host name; see `scanner.scan_path`)."""
    db = Database(url_or_path, create=create and not read_only, read_only=read_only)
    try:
        db.ensure_schema(create=create)
    except BaseException:
        db.close()
        raise
    return RegistryStore(db, origin)


def _problems(items) -> tuple[ProblemRecord, ...]:
    return tuple(ProblemRecord(p.get("code", "?"), p.get("message", ""), p.get("file"), p.get("blocks"))
                 for p in (items or []) if isinstance(p, dict))


def _norm(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip().lower()


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dicts to dotted keys; lists become JSON text so they compare as one value."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def run_status(run: Run, latest_complete: int | None, newest_incomplete: bool, now: float,
               active_window_s: float = ACTIVE_WINDOW_S) -> str:
    if run.missing:
        return "missing"
    if run.num_iterations and latest_complete is not None and latest_complete >= run.num_iterations:
        return "finished"
    if run.last_activity_at is not None and now - run.last_activity_at <= active_window_s:
        return "training"
    if latest_complete is None or newest_incomplete:
        return "incomplete"
    return "stopped"


class RegistryStore:
    """Queries and the few writes that are not scanning. Thread-safe: each call opens its own session."""

    def __init__(self, db: Database, origin: str | None = None):
        self.db = db
        self.origin = check_origin(origin) if origin is not None else default_origin()

    @property
    def url(self) -> str:
        return self.db.display_url

    @property
    def read_only(self) -> str | None:
        """Why this store cannot write (its file or folder is not writable); None: it could."""
        return self.db.read_only

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writers forwarded

    def scan(self, path, progress=None, origin: str | None = None) -> ScanReport:
        from registry.scanner import scan_path

        return scan_path(self, path, progress, origin)

    def import_log(self, path, run=None, segment: int = 1):
        from registry.logimport import import_log

        return import_log(self, path, run, segment=segment)

    def inspect_dataset(self, path, tokenizer_dir=None, exact: bool = False, world_size: int = 1, progress=None,
                        should_stop=None):
        """A folder of parquet shards, each read only when it changed (see `registry/datasets.py`)."""
        from registry.datasets import inspect_dataset

        return inspect_dataset(self, path, tokenizer_dir, exact=exact, world_size=world_size, progress=progress,
                               should_stop=should_stop)

    def import_logs(self, path, progress=None):
        from registry.logimport import import_logs

        return import_logs(self, path, progress)

    # ------------------------------------------------------------------ runs

    def list_runs(self, where: Mapping[str, object] | None = None, now: float | None = None,
                  active_window_s: float = ACTIVE_WINDOW_S, run_ids: Iterable[int] | None = None) -> list[RunSummary]:
        """Every run (newest activity first), optionally filtered: where={"depth": 20, "phase": "sft"}
        matches run fields (phase, tag, status, depth, ...) and model_config / user_config keys
        (plain or dotted, e.g. "user_config.num_iterations"), comparing values as text."""
        now = time.time() if now is None else now
        with self.db.session() as s:
            q = sa.select(Run)
            if run_ids is not None:
                q = q.where(Run.id.in_(list(run_ids)))
            runs = s.execute(q).scalars().all()
            if not runs:
                return []
            ids = [r.id for r in runs]
            agg = {row[0]: row[1:] for row in s.execute(sa.select(
                Checkpoint.run_id,
                sa.func.sum(sa.case((Checkpoint.missing.is_(False), 1), else_=0)),
                sa.func.sum(sa.case((sa.and_(Checkpoint.missing.is_(False), Checkpoint.complete.is_(True)), 1), else_=0)),
                sa.func.sum(sa.case((Checkpoint.missing.is_(True), 1), else_=0)),
                sa.func.max(sa.case((sa.and_(Checkpoint.missing.is_(False), Checkpoint.complete.is_(True)), Checkpoint.step))),
                sa.func.max(sa.case((Checkpoint.missing.is_(False), Checkpoint.step))),
            ).where(Checkpoint.run_id.in_(ids)).group_by(Checkpoint.run_id))}
            val = history.val_summaries(s, runs)
            steps = dict(s.execute(sa.select(SeriesRow.run_id, sa.func.max(MetricSegment.last_step))
                                   .join(MetricSegment, MetricSegment.series_id == SeriesRow.id)
                                   .where(SeriesRow.run_id.in_(ids)).group_by(SeriesRow.run_id)).all())
            checks = {c.id: c for c in s.execute(sa.select(TokenizerCheck).where(
                TokenizerCheck.id.in_({r.tokenizer_check_id for r in runs if r.tokenizer_check_id is not None})))
                .scalars()}
            out = []
            for r in runs:
                present, complete, missing, latest_complete, newest = agg.get(r.id, (0, 0, 0, None, None))
                best, best_step, last, last_step, segments = val[r.id]
                metric_step = steps.get(r.id)
                latest = max((x for x in (newest, metric_step) if x is not None and x >= 0), default=None)
                out.append(RunSummary(
                    id=r.id, path=r.path, origin=r.origin or None, phase=r.phase, tag=r.tag, label=f"{r.phase}/{r.tag}",
                    status=run_status(r, latest_complete, newest is not None and newest != latest_complete, now, active_window_s),
                    depth=r.depth, n_params=r.n_params, generation=r.generation, model_config=r.model_config or {},
                    user_config=r.user_config or {}, num_iterations=r.num_iterations, world_size=r.world_size,
                    total_batch_size=r.total_batch_size, flops_per_token=r.flops_per_token, latest_step=latest,
                    latest_checkpoint_step=latest_complete, best_val_bpb=best, best_val_bpb_step=best_step,
                    last_val_bpb=last, last_val_bpb_step=last_step, checkpoint_count=int(present or 0),
                    complete_checkpoint_count=int(complete or 0), missing_checkpoint_count=int(missing or 0),
                    segments=int(segments or 0), has_metrics_file=r.has_metrics_file, first_seen=utc(r.first_seen_at),
                    last_seen=utc(r.last_seen_at), last_update=utc(r.last_activity_at), missing=r.missing,
                    token_bytes=tokenizer_checks.to_verdict(checks.get(r.tokenizer_check_id))))
        out.sort(key=lambda x: (x.last_update.timestamp() if x.last_update else 0.0, x.id), reverse=True)
        return self._filter(out, where) if where else out

    def _filter(self, runs: list[RunSummary], where: Mapping[str, object]) -> list[RunSummary]:
        def lookup(run: RunSummary, key: str):
            if key in RUN_FIELDS:
                return True, getattr(run, key)
            section, _, sub = key.partition(".")
            if sub and section in ("model_config", "user_config"):
                flat = flatten(getattr(run, section))
                return sub in flat, flat.get(sub)
            for section in (run.model_config, run.user_config):
                flat = flatten(section)
                if key in flat:
                    return True, flat[key]
            return False, None

        for key in where:
            if not any(lookup(r, key)[0] for r in runs):
                raise RegistryError(f"no run has a field or config key {key!r} (fields: {', '.join(RUN_FIELDS)}; "
                                    "or any model_config / user_config key)")
        return [r for r in runs if all(lookup(r, k)[0] and _norm(lookup(r, k)[1]) == _norm(v) for k, v in where.items())]

    def get_run(self, run_id: int) -> RunSummary:
        found = self.list_runs(run_ids=[run_id])
        if not found:
            raise RunNotFoundError(f"no run with id {run_id} in the registry")
        return found[0]

    def resolve_run(self, ref: str | int | RunSummary) -> RunSummary:
        """A run from its id, model tag, phase/tag or folder path (AmbiguousRunError lists candidates)."""
        if isinstance(ref, RunSummary):
            return ref
        if isinstance(ref, int):
            return self.get_run(ref)
        ref = str(ref).strip()
        cols = (Run.id, Run.phase, Run.tag, Run.path, Run.origin)
        with self.db.session() as s:
            rows = []
            if ref.isdigit() and int(ref) <= MAX_STEP:  # ids are 32-bit columns too: a longer number is no id
                rows = s.execute(sa.select(*cols).where(Run.id == int(ref))).all()
            p = Path(ref).expanduser()
            if not rows and (os.sep in ref or ref.startswith(".")) and (p.exists() or p.is_absolute()):
                p = p.resolve()  # a run folder, or a file in one; a vanished run is still found by its path
                rows = s.execute(sa.select(*cols).where(Run.path.in_([str(p), str(p.parent)]))).all()
                rows = [r for r in rows if r.path == str(p)] or rows
                # a folder on this machine is this origin's run (else an unclaimed one), when several machines have it
                rows = [r for r in rows if r.origin == self.origin] or [r for r in rows if not r.origin] or rows
            if not rows and "/" in ref and ref.split("/", 1)[0] in PHASES:
                phase, tag = ref.split("/", 1)
                rows = s.execute(sa.select(*cols).where(Run.phase == phase, Run.tag == tag)).all()
            if not rows:
                rows = s.execute(sa.select(*cols).where(Run.tag == ref)).all()
            if not rows:
                known = [f"{phase}/{tag}" for phase, tag in s.execute(sa.select(Run.phase, Run.tag).order_by(Run.id).limit(8))]
                hint = f" (indexed runs: {', '.join(known)})" if known else " (the registry has no runs: scan a folder first)"
                raise RunNotFoundError(f"no run {ref!r} in the registry{hint}")
        if len(rows) > 1:
            several = len({r.origin for r in rows}) > 1  # name the machines when they tell the candidates apart
            raise AmbiguousRunError(ref, sorted((r.id, f"{r.phase}/{r.tag}" + (f" on {r.origin or 'any'}" if several else ""),
                                                 r.path) for r in rows))
        return self.get_run(rows[0].id)

    def _run_id(self, run) -> int:
        return self.resolve_run(run).id

    # ------------------------------------------------------------------ checkpoints

    def _records(self, s, where, latest_integrity: bool = True) -> list[CheckpointRecord]:
        rows = s.execute(sa.select(Checkpoint, Run.phase, Run.tag, Run.path).join(Run, Run.id == Checkpoint.run_id)
                         .where(where).order_by(Checkpoint.run_id, Checkpoint.step, Checkpoint.layout)).all()
        integrity: dict[int, IntegrityRecord] = {}
        if rows and latest_integrity:
            ids = sa.select(Checkpoint.id).where(where).scalar_subquery()
            newest = (sa.select(sa.func.max(IntegrityResult.id)).where(IntegrityResult.checkpoint_id.in_(ids))
                      .group_by(IntegrityResult.checkpoint_id).scalar_subquery())
            for ir in s.execute(sa.select(IntegrityResult).where(IntegrityResult.id.in_(newest))).scalars():
                integrity[ir.checkpoint_id] = self._integrity(ir)
        return [CheckpointRecord(
            id=c.id, run_id=c.run_id, run_label=f"{phase}/{tag}", directory=path, step=c.step if c.step >= 0 else None,
            layout=c.layout, segment=c.segment, val_bpb=c.val_bpb, complete=c.complete,
            resumable=c.resumable and note is None, resume_note=note,
            missing=c.missing, has_train_state=c.has_train_state, world_size=c.world_size, problems=_problems(c.problems),
            size_bytes=c.size_bytes, mtime=utc(c.mtime_ns / 1e9) if c.mtime_ns else None, first_seen=utc(c.first_seen_at),
            inspected=utc(c.inspected_at), latest_integrity=integrity.get(c.id))
            for c, phase, tag, path in rows for note in (why_not_resumable(c.layout, path, c.meta),)]

    @staticmethod
    def _integrity(ir: IntegrityResult) -> IntegrityRecord:
        return IntegrityRecord(ir.id, ir.checkpoint_id, utc(ir.checked_at), ir.duration_s, ir.mode, ir.ok, _problems(ir.problems))

    def checkpoints(self, run, include_missing: bool = True) -> list[CheckpointRecord]:
        """A run's checkpoints, oldest step first, each with its latest integrity result."""
        rid = self._run_id(run)
        cond = Checkpoint.run_id == rid
        if not include_missing:
            cond = sa.and_(cond, Checkpoint.missing.is_(False))
        with self.db.session() as s:
            return self._records(s, cond)

    def get_checkpoint(self, checkpoint_id: int) -> CheckpointRecord:
        with self.db.session() as s:
            found = self._records(s, Checkpoint.id == checkpoint_id)
        if not found:
            raise CheckpointNotIndexedError(f"no checkpoint with id {checkpoint_id} in the registry")
        return found[0]

    def resolve_checkpoint(self, ref: str | int | CheckpointRecord) -> CheckpointRecord:
        """RUN@STEP (STEP: a number, `latest` = newest complete, `best` = best val_bpb), a checkpoint
        file path (model_/meta_/optim_ file or checkpoint.pt), a checkpoint id, or RUN (its latest)."""
        if isinstance(ref, CheckpointRecord):
            return ref
        if isinstance(ref, int):
            return self.get_checkpoint(ref)
        ref = str(ref).strip()
        p = Path(ref).expanduser()
        if os.sep in ref and p.is_file():
            from registry.inspection import file_kind

            kind = file_kind(p.name)
            if kind is None:
                raise CheckpointNotIndexedError(f"{p} is not a checkpoint file")
            run = self.resolve_run(str(p.resolve().parent))
            step = kind[1]
            cands = [c for c in self.checkpoints(run) if (c.step == step and c.layout == "upstream")
                     or (step is None and c.layout == "single_file" and not c.missing)]
            if not cands:
                raise CheckpointNotIndexedError(f"{p.name} is not indexed yet: scan {p.parent} first")
            return cands[-1]
        run_ref, _, step_ref = ref.rpartition("@") if "@" in ref else (ref, "", "latest")
        run = self.resolve_run(run_ref)
        ckpts = self.checkpoints(run)
        if step_ref == "latest":
            usable = [c for c in ckpts if c.complete and not c.missing]
            if not usable:
                raise CheckpointNotIndexedError(f"{run.label} has no complete checkpoint on disk")
            return max(usable, key=lambda c: c.step or -1)
        if step_ref == "best":
            return self.best_checkpoint(run).checkpoint
        try:
            step = int(step_ref)
        except ValueError:
            raise CheckpointNotIndexedError(f"bad step {step_ref!r} in {ref!r}: use RUN@STEP, RUN@latest or RUN@best") from None
        cands = [c for c in ckpts if c.step == step]
        if not cands:
            have = ", ".join(str(c.step) for c in ckpts[-6:])
            raise CheckpointNotIndexedError(f"{run.label} has no checkpoint at step {step} (latest steps: {have or 'none'})")
        return min(cands, key=lambda c: (c.missing, c.layout))

    def checkpoint_detail(self, ref) -> CheckpointDetail:
        """One checkpoint with its meta, files (size, mtime, sha256) and integrity history."""
        record = self.resolve_checkpoint(ref)
        with self.db.session() as s:
            meta = s.execute(sa.select(Checkpoint.meta).where(Checkpoint.id == record.id)).scalar_one()
            files = s.execute(sa.select(CheckpointFile).where(CheckpointFile.checkpoint_id == record.id)
                              .order_by(CheckpointFile.name)).scalars().all()
            history = s.execute(sa.select(IntegrityResult).where(IntegrityResult.checkpoint_id == record.id)
                                .order_by(IntegrityResult.checked_at.desc(), IntegrityResult.id.desc())).scalars().all()
            file_records = tuple(FileRecord(
                name=f.name, path=str(Path(record.directory) / f.name), kind=f.kind, rank=f.rank, size=f.size,
                mtime=utc(f.mtime_ns / 1e9), mtime_ns=f.mtime_ns, missing=f.missing, sha256=f.sha256,
                sha256_at=utc(f.sha256_at), sha256_size=f.sha256_size, sha256_mtime_ns=f.sha256_mtime_ns) for f in files)
            integrity = tuple(self._integrity(ir) for ir in history)
        return CheckpointDetail(record, self.get_run(record.run_id), meta, file_records, integrity)

    def best_checkpoint(self, run, metric: str = "val_bpb", mode: str = "min") -> BestCheckpoint:
        """The complete, present checkpoint with the lowest (mode="max": highest) value of a metric:
        val_bpb from its meta, any other metric from its series at the checkpoint's step and segment."""
        if mode not in ("min", "max"):
            raise RegistryError(f"mode must be 'min' or 'max', not {mode!r}")
        r = self.resolve_run(run)
        usable = [c for c in self.checkpoints(r) if c.complete and not c.missing and c.step is not None]
        values: dict[int, float] = {}
        if ":" in metric:  # an evaluation, TASK:METRIC (eval_results)
            at = {}
            for e in self.eval_results(r):
                if e.key == metric and e.value is not None:
                    at[e.step] = e.value  # newest recorded wins (eval_results is oldest first)
            values = {c.id: at[c.step] for c in usable if c.step in at}
            if not values:
                keys = sorted({e.key for e in self.eval_results(r)})
                raise CheckpointNotIndexedError(f"no complete checkpoint of {r.label} has an evaluation {metric} "
                                                f"(evaluations: {', '.join(keys) or 'none'})")
        elif metric == "val_bpb":
            values = {c.id: c.val_bpb for c in usable if c.val_bpb is not None}
        if not values and usable and ":" not in metric:
            with self.db.session() as s:
                sid = s.execute(sa.select(SeriesRow.id).where(SeriesRow.run_id == r.id, SeriesRow.key == metric)).scalar()
                if sid is not None:
                    got = dict(((st, g), v) for st, g, v in s.execute(sa.select(
                        PointRow.step, PointRow.segment, PointRow.value).where(
                        PointRow.series_id == sid, PointRow.step.in_(sorted({c.step for c in usable})))))
                    values = {c.id: got[(c.step, c.segment)] for c in usable if got.get((c.step, c.segment)) is not None}
        if not values:
            keys = ", ".join(k.key for k in self.metric_keys(r)) or "none"
            raise CheckpointNotIndexedError(f"no complete checkpoint of {r.label} has a {metric} value (metrics: {keys})")
        pick = (min if mode == "min" else max)(values, key=lambda cid: (values[cid], -cid if mode == "min" else cid))
        return BestCheckpoint(next(c for c in usable if c.id == pick), metric, values[pick], mode)

    def eval_results(self, run, step: int | None = None) -> list[EvalRecord]:
        """A run's evaluation results (imported from upstream's logs and base_eval CSVs), by step, task,
        metric, then oldest recorded first."""
        r = self.resolve_run(run)
        q = sa.select(EvalResult).where(EvalResult.run_id == r.id)
        if step is not None:
            q = q.where(EvalResult.step == step)
        q = q.order_by(EvalResult.step, EvalResult.task, EvalResult.metric, EvalResult.recorded_at, EvalResult.id)
        with self.db.session() as s:
            return [EvalRecord(e.id, r.id, r.label, e.step, e.task, e.metric, e.value, e.n_examples, e.script, e.source,
                               utc(e.recorded_at)) for e in s.scalars(q)]

    # ------------------------------------------------------------------ metrics

    def metric_keys(self, run) -> list[MetricKeyInfo]:
        """Every metric of a run with its count, extremes, last point and segments."""
        r = self.resolve_run(run)
        with self.db.session() as s:
            return history.metric_keys(s, r.id, r.has_metrics_file)

    def metric_history(self, run, keys: Iterable[str] | str | None = None, max_points: int = 2000,
                       step_min: int | None = None, step_max: int | None = None) -> list[MetricSeries]:
        """Series of a run (all keys by default), each downsampled on the server to at most max_points
        points that keep every block's minimum and maximum; points sorted by (segment, step)."""
        r = self.resolve_run(run)
        keys = [keys] if isinstance(keys, str) else (list(keys) if keys is not None else None)
        with self.db.session() as s:
            try:
                found = history.run_series(s, r.id, r.has_metrics_file, keys, max_points, step_min, step_max)
            except KeyError as e:
                have = ", ".join(k.key for k in history.metric_keys(s, r.id, r.has_metrics_file)) or "none"
                raise RegistryError(f"{r.label} has no metric {e.args[0]!r} (metrics: {have})") from None
        return [MetricSeries(r.id, r.label, key, tuple(pts), total, down, segs) for key, pts, total, down, segs in found]

    # ------------------------------------------------------------------ configs

    def config_of(self, ref) -> tuple[str, dict[str, object]]:
        """(label, flat config) of a run (its configs and resolved training facts) or, for RUN@STEP or a
        checkpoint file, the checkpoint's whole meta flattened."""
        if "@" in str(ref) or (os.sep in str(ref) and Path(str(ref)).is_file()):
            detail = self.checkpoint_detail(ref)
            return detail.checkpoint.label, flatten(detail.meta or {})
        r = self.resolve_run(ref)
        return r.label, flatten({"model_config": r.model_config, "user_config": r.user_config,
                                 "num_iterations": r.num_iterations, "world_size": r.world_size,
                                 "total_batch_size": r.total_batch_size, "generation": r.generation, "n_params": r.n_params})

    def diff(self, a, b) -> ConfigDiff:
        """Config diff of two runs or two checkpoints (RUN@STEP); rows for every key, sorted."""
        la, ca = self.config_of(a)
        lb, cb = self.config_of(b)
        if la == lb and str(a) != str(b):
            la, lb = f"{la} ({a})", f"{lb} ({b})"
        rows = []
        for key in sorted(set(ca) | set(cb)):
            if key not in cb:
                rows.append(DiffRow(key, ca[key], None, "only_a"))
            elif key not in ca:
                rows.append(DiffRow(key, None, cb[key], "only_b"))
            else:
                rows.append(DiffRow(key, ca[key], cb[key], "same" if ca[key] == cb[key] else "changed"))
        return ConfigDiff(la, lb, tuple(rows))

    # ------------------------------------------------------------------ scans and summary

    def scan_report(self, scan_id: int) -> ScanReport:
        with self.db.session() as s:
            scan = s.get(Scan, scan_id)
            if scan is None:
                raise RegistryError(f"no scan with id {scan_id}")
            problems = s.execute(sa.select(ScanProblem.path, ScanProblem.code, ScanProblem.message)
                                 .where(ScanProblem.scan_id == scan_id).order_by(ScanProblem.id)).all()
            return ScanReport(
                scan_id=scan.id, root=scan.root_path, status=scan.status, started_at=utc(scan.started_at),
                finished_at=utc(scan.finished_at),
                duration_s=scan.finished_at - scan.started_at if scan.finished_at else None,
                runs_found=scan.runs_found, runs_new=scan.runs_new, runs_missing=scan.runs_missing,
                checkpoints_seen=scan.checkpoints_seen, checkpoints_new=scan.checkpoints_new,
                checkpoints_changed=scan.checkpoints_changed, checkpoints_unchanged=scan.checkpoints_unchanged,
                checkpoints_missing=scan.checkpoints_missing, files_stat=scan.files_stat, metric_lines=scan.metric_lines,
                metric_bad_lines=scan.metric_bad_lines, problems=tuple(ScanProblemRecord(*p) for p in problems),
                error=scan.error, origin=scan.origin or None)

    def scans(self, limit: int = 20) -> list[ScanReport]:
        with self.db.session() as s:
            ids = s.execute(sa.select(Scan.id).order_by(Scan.id.desc()).limit(limit)).scalars().all()
        return [self.scan_report(i) for i in ids]

    def summary(self, now: float | None = None) -> RegistrySummary:
        runs = self.list_runs(now=now)
        by_status: dict[str, int] = {}
        for r in runs:
            by_status[r.status] = by_status.get(r.status, 0) + 1
        with self.db.session() as s:
            count = lambda q: int(s.execute(q).scalar() or 0)
            present = Checkpoint.missing.is_(False)
            out = dict(
                roots=count(sa.select(sa.func.count(Root.id))),
                checkpoints=count(sa.select(sa.func.count(Checkpoint.id)).where(present)),
                complete_checkpoints=count(sa.select(sa.func.count(Checkpoint.id)).where(present, Checkpoint.complete.is_(True))),
                missing_checkpoints=count(sa.select(sa.func.count(Checkpoint.id)).where(Checkpoint.missing.is_(True))),
                metric_series=count(sa.select(sa.func.count(SeriesRow.id)).where(SeriesRow.n > 0)),
                metric_points=count(sa.select(sa.func.sum(SeriesRow.n))),
                integrity_results=count(sa.select(sa.func.count(IntegrityResult.id))),
            )
            last = s.execute(sa.select(Scan.id).order_by(Scan.id.desc()).limit(1)).scalar()
        return RegistrySummary(url=self.url, schema_version=self.db.schema_version() or 0, read_only=self.read_only, runs=len(runs),
                               runs_by_status=by_status, incomplete_checkpoints=out["checkpoints"] - out["complete_checkpoints"],
                               last_scan=self.scan_report(last) if last else None, **out)

    # ------------------------------------------------------------------ integrity results

    def record_integrity(self, checkpoint_id: int, mode: str, ok: bool, problems: Iterable = (), duration_s: float = 0.0,
                         checked_at: float | None = None,
                         file_hashes: Mapping[str, str | tuple[str, int, int]] | None = None) -> IntegrityRecord:
        """Store one integrity check of a checkpoint. problems: ProblemRecord, checkpoint_manager.Problem
        or {code, message, file} items. file_hashes: {file name: sha256} or {name: (sha256, size, mtime_ns)}
        (size and mtime at hashing time; with a bare hash the file's current stat is used)."""
        if mode not in ("quick", "deep"):
            raise RegistryError(f"integrity mode must be 'quick' or 'deep', not {mode!r}")
        items = []
        for p in problems:
            get = p.get if isinstance(p, Mapping) else lambda k, p=p: getattr(p, k, None)
            items.append({k: get(k) for k in ("code", "message", "file", "blocks") if get(k) is not None})
        when = time.time() if checked_at is None else checked_at

        def write(s):
            ckpt = s.get(Checkpoint, checkpoint_id)
            if ckpt is None:
                raise CheckpointNotIndexedError(f"no checkpoint with id {checkpoint_id} in the registry")
            self.db.lock_run(s, ckpt.run_id)
            row = IntegrityResult(checkpoint_id=checkpoint_id, checked_at=when, duration_s=float(duration_s), mode=mode,
                                  ok=bool(ok), problems=items)
            s.add(row)
            if file_hashes:
                files = {f.name: f for f in s.execute(sa.select(CheckpointFile).where(
                    CheckpointFile.checkpoint_id == checkpoint_id)).scalars()}
                run_path = s.execute(sa.select(Run.path).where(Run.id == ckpt.run_id)).scalar_one()
                for name, value in file_hashes.items():
                    if name not in files:
                        raise CheckpointNotIndexedError(f"{name} is not a file of checkpoint {checkpoint_id}")
                    if isinstance(value, str):
                        try:
                            st = os.stat(Path(run_path) / name)
                            value = (value, st.st_size, st.st_mtime_ns)
                        except OSError:
                            value = (value, None, None)
                    f = files[name]
                    f.sha256, f.sha256_size, f.sha256_mtime_ns = value
                    f.sha256_at = when
            s.flush()
            return self._integrity(row)

        return self.db.write(write)

    def integrity_history(self, checkpoint, limit: int | None = None) -> list[IntegrityRecord]:
        """A checkpoint's integrity results, newest first (checkpoint: id, record or reference)."""
        cid = checkpoint if isinstance(checkpoint, int) else self.resolve_checkpoint(checkpoint).id
        with self.db.session() as s:
            q = (sa.select(IntegrityResult).where(IntegrityResult.checkpoint_id == cid)
                 .order_by(IntegrityResult.checked_at.desc(), IntegrityResult.id.desc()))
            if limit:
                q = q.limit(limit)
            return [self._integrity(ir) for ir in s.execute(q).scalars()]
