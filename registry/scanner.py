"""
The scanner: walks a folder, finds runs (checkpoint directories, both layouts, all phases) and
brings the registry up to date with what is on disk, reading only metadata.

How one scan goes:
1. Walk (no database writes): every folder up to MAX_DEPTH below the root that holds a checkpoint
   file (`model_*.pt`, `meta_*.json`, `optim_*.pt`, `trainstate_*.pt`, `checkpoint.pt`) or a
   `metrics.jsonl` is a run; the walk does not descend into runs. A path that does not exist or cannot
   be read, or a folder with no run (that the registry did not know either), raises before anything
   is written.
2. Per run: one `stat` per file; files whose (size, mtime_ns) match the registry are not opened.
   Changed or new checkpoints are inspected by `inspect_checkpoint`: meta JSON, zip central
   directories, optimizer shards for the world size (`checkpoint_manager.quick_problems`); a
   single-file `checkpoint.pt` has its metadata read from the pickle by `torchfile` (no tensor data,
   no code run). Never `torch.load`.
3. Writes: one short transaction per batch of at most BATCH checkpoints, holding the run's lock, so
   the registry is never half-written and concurrent scanners of one tree serialise per run.
   Checkpoints and files that vanished are marked missing; nothing is deleted. Runs without a
   metrics.jsonl get their val_bpb history from the metas; metrics.jsonl is ingested incrementally
   (`metrics.sync_metrics_file`).

This module does not answer queries (store.py) and does not verify tensor data (integrity checks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from nanochat import checkpoint_manager as cm
from nanochat.model_config import GPTConfig, classic_flops_per_token, flops_per_token, param_counts
from nanochat.schedule import resolve_from_meta
from registry.errors import NoCheckpointsError, ScanPathError
from registry.metrics import ingest_points, sync_metrics_file
from registry.models import Checkpoint, CheckpointFile, MetricSource, Root, Run, Scan, ScanProblem

METRICS_FILE = "metrics.jsonl"
MAX_DEPTH = 6
BATCH = 500  # checkpoints per write transaction
Progress = Callable[[int, int, str], None]  # (done, total, message)


def _file_kind(name: str) -> tuple[str, int | None, int | None] | None:
    """(kind, step, rank) of a checkpoint file name, None for other files."""
    if m := cm.MODEL_RE.match(name):
        return "model", int(m.group(1)), None
    if m := cm.META_RE.match(name):
        return "meta", int(m.group(1)), None
    if m := cm.OPTIM_RE.match(name):
        return "optimizer", int(m.group(1)), int(m.group(2) or 0)
    if m := cm.TRAIN_STATE_RE.match(name):
        return "train_state", int(m.group(1)), int(m.group(2))
    if name == cm.SINGLE_FILE:
        return "single_file", None, None
    return None


def _is_run_file(name: str) -> bool:
    return name == METRICS_FILE or _file_kind(name) is not None


@dataclass
class Slot:
    """The files of one checkpoint as found on disk: key ("upstream", step) or ("single_file", None)."""
    layout: str
    step: int | None
    files: dict[str, tuple[str, int | None, int, int]] = field(default_factory=dict)  # name -> (kind, rank, size, mtime_ns)

    def checkpoint_files(self, directory: Path) -> cm.CheckpointFiles:
        parts: dict = {"optimizer_shards": {}, "train_states": {}}
        for name, (kind, rank, _, _) in self.files.items():
            if kind in ("model", "single_file"):
                parts["model"] = directory / name
            elif kind == "meta":
                parts["meta"] = directory / name
            elif kind == "optimizer":
                parts["optimizer_shards"][rank] = directory / name
            elif kind == "train_state":
                parts["train_states"][rank] = directory / name
        return cm.CheckpointFiles(directory=directory, step=self.step, layout=self.layout, **parts)


@dataclass
class Inspection:
    """What inspect_checkpoint learned about one checkpoint (files read: meta, zip directories)."""
    slot: Slot
    step: int  # -1 when unknown
    meta: dict | None
    problems: list[dict]
    val_bpb: float | None
    segment: int
    world_size: int | None
    has_train_state: bool

    @property
    def complete(self) -> bool:
        return not any(p["blocks"] == "load" for p in self.problems)


def inspect_checkpoint(slot: Slot, directory: Path) -> Inspection:
    """Read one checkpoint's metadata and run the quick checks (no tensor data, no torch)."""
    ckpt = slot.checkpoint_files(directory)
    try:
        meta = cm.read_meta(ckpt)
    except cm.CheckpointError:
        meta = None
    if slot.layout == "single_file" and meta is not None and isinstance(meta.get("step"), int):
        ckpt = cm.CheckpointFiles(directory=directory, step=meta["step"], layout="single_file", model=ckpt.model)
    problems = [{"code": p.code, "message": p.message, "blocks": p.blocks, "file": p.file}
                for p in (cm.quick_problems(ckpt, meta) if meta is not None else cm.quick_problems(ckpt))]
    step = ckpt.step if ckpt.step is not None else -1
    meta = meta if isinstance(meta, dict) else None
    val = meta.get("val_bpb") if meta else None
    seg = meta.get("resume_segment") if meta else None
    world = cm.expected_world_size(ckpt, meta) if slot.layout == "upstream" else None
    return Inspection(slot, step, meta, problems,
                      float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None,
                      seg if isinstance(seg, int) and not isinstance(seg, bool) and seg >= 1 else 1,
                      world if world and world > 0 else None,
                      bool(meta and meta.get("train_state") and ckpt.train_states))


def run_config(ins: Inspection, directory: Path) -> dict:
    """Run-level columns from a checkpoint's meta: configs, target steps, size of the model."""
    meta = ins.meta or {}
    mc = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else {}
    uc = meta.get("user_config") if isinstance(meta.get("user_config"), dict) else {}
    try:
        num = resolve_from_meta(meta)
    except (TypeError, ValueError, KeyError, ArithmeticError):
        num = None
    tbs = meta.get("total_batch_size") or uc.get("total_batch_size")
    out = {"model_config": mc, "user_config": uc, "config_step": ins.step, "num_iterations": num,
           "world_size": meta.get("world_size") if isinstance(meta.get("world_size"), int) else ins.world_size,
           "total_batch_size": tbs if isinstance(tbs, int) and tbs > 0 else None,
           "depth": mc.get("n_layer") if isinstance(mc.get("n_layer"), int) else None,
           "n_params": None, "flops_per_token": None, "generation": None}
    if ins.complete:
        try:  # the architecture generation needs the state dict's key names: read from the pickle only
            shapes = cm.state_dict_shapes(ins.slot.checkpoint_files(directory))
            config = GPTConfig.from_checkpoint(mc, {k: v.shape for k, v in shapes.items()})
            out.update(n_params=param_counts(config)["total"], generation="classic" if config.is_classic else "current",
                       flops_per_token=classic_flops_per_token(config) if config.is_classic else flops_per_token(config))
        except (cm.CheckpointError, ValueError, TypeError, KeyError):
            pass  # an unusual architecture: sizes stay unknown, the run is still indexed
    return out


# ---------------------------------------------------------------------- walking and stat


def find_run_dirs(root: Path, on_problem: Callable[[str, str, str], None]) -> list[Path]:
    """Folders under root (root included) holding checkpoint files or metrics.jsonl, sorted."""
    runs, seen, stack = [], set(), [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue  # a symlink loop
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            if d == root:
                raise ScanPathError(f"cannot read {d}: {e.strerror or e}") from None
            on_problem(str(d), "unreadable", f"cannot read folder {d}: {e.strerror or e}")
            continue
        if any(_is_run_file(e.name) and e.is_file() for e in entries):
            runs.append(d)
            continue
        if depth < MAX_DEPTH:
            stack += [(Path(e.path), depth + 1) for e in entries if not e.name.startswith(".") and e.is_dir()]
    return sorted(runs)


def stat_run_dir(d: Path) -> tuple[dict[tuple, Slot], os.stat_result | None, int]:
    """The checkpoints in a run folder by key, the metrics.jsonl stat, and how many files were stat'ed."""
    slots: dict[tuple, Slot] = {}
    metrics = None
    count = 0
    with os.scandir(d) as it:
        for entry in it:
            kind = _file_kind(entry.name)
            if kind is None and entry.name != METRICS_FILE:
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except FileNotFoundError:
                continue  # deleted between listing and stat
            count += 1
            if kind is None:
                metrics = st
                continue
            k, step, rank = kind
            layout = "single_file" if k == "single_file" else "upstream"
            slot = slots.setdefault((layout, step), Slot(layout, step))
            slot.files[entry.name] = (k, rank, st.st_size, st.st_mtime_ns)
    return slots, metrics, count


# ---------------------------------------------------------------------- the scan


@dataclass
class _Counts:
    runs_found: int = 0
    runs_new: int = 0
    runs_missing: int = 0
    checkpoints_seen: int = 0
    checkpoints_new: int = 0
    checkpoints_changed: int = 0
    checkpoints_unchanged: int = 0
    checkpoints_missing: int = 0
    files_stat: int = 0
    metric_lines: int = 0
    metric_bad_lines: int = 0
    problems: list = field(default_factory=list)  # (path, code, message)


def _resolve_root(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise ScanPathError(f"{p} does not exist")
    p = p.resolve()
    if p.is_file():
        if not _is_run_file(p.name):
            raise ScanPathError(f"{p} is a file, not a folder of checkpoints")
        p = p.parent
    return p


def scan_path(store, path, progress: Progress | None = None):
    """Bring the registry up to date with the runs under `path`; return a ScanReport."""
    db = store.db
    root = _resolve_root(path)
    counts = _Counts()
    report = counts.problems.append

    def on_problem(p: str, code: str, message: str) -> None:
        report((p, code, message))

    run_dirs = find_run_dirs(root, on_problem)
    with db.session() as s:
        known = {r.path: r for r in s.execute(sa.select(Run).where(
            sa.or_(Run.path == str(root), Run.path.startswith(str(root).rstrip("/") + "/", autoescape=True)))).scalars()}
    if not run_dirs and not known:
        raise NoCheckpointsError(f"no checkpoints under {root} (looked for model_NNNNNN.pt, meta_NNNNNN.json, "
                                 f"checkpoint.pt or {METRICS_FILE}, up to {MAX_DEPTH} folders deep)")
    now = time.time()
    root_id, scan_id = db.write(lambda s: _start_scan(s, db, root, now))
    try:
        listings = []
        for d in sorted(set(run_dirs) | {Path(p) for p in known if Path(p).is_dir()}):
            try:
                listings.append((d, *stat_run_dir(d)))
            except OSError as e:
                on_problem(str(d), "unreadable", f"cannot read folder {d}: {e.strerror or e}")
        total = sum(len(slots) + 1 for _, slots, _, _ in listings)
        done = 0
        for d, slots, metrics_stat, n_stat in listings:
            counts.files_stat += n_stat
            counts.runs_found += 1
            done = _scan_run(store, d, slots, metrics_stat, root_id, scan_id, counts, on_problem, progress, done, total)
            done += 1
            if progress:
                progress(done, total, f"{d.name}: done")
        for p, run in known.items():
            if not Path(p).is_dir() and not run.missing:
                counts.runs_missing += 1
                counts.checkpoints_missing += db.write(lambda s, rid=run.id: _mark_run_missing(s, db, rid))
    except BaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        db.write(lambda s: _finish_scan(s, scan_id, counts, "failed", msg))
        raise
    db.write(lambda s: _finish_scan(s, scan_id, counts, "ok", None))
    return store.scan_report(scan_id)


def _start_scan(s: Session, db, root: Path, now: float) -> tuple[int, int]:
    s.execute(db.insert(Root.__table__).on_conflict_do_nothing(index_elements=["path"]),
              [{"path": str(root), "first_scanned_at": now, "last_scanned_at": now}])
    root_row = s.execute(sa.select(Root).where(Root.path == str(root))).scalar_one()
    scan = Scan(root_path=str(root), started_at=now, status="running")
    s.add(scan)
    s.flush()
    root_row.last_scanned_at, root_row.last_scan_id = now, scan.id
    return root_row.id, scan.id


def _finish_scan(s: Session, scan_id: int, c: _Counts, status: str, error: str | None) -> None:
    scan = s.get(Scan, scan_id)
    for name in ("runs_found", "runs_new", "runs_missing", "checkpoints_seen", "checkpoints_new", "checkpoints_changed",
                 "checkpoints_unchanged", "checkpoints_missing", "files_stat", "metric_lines", "metric_bad_lines"):
        setattr(scan, name, getattr(c, name))
    scan.status, scan.error, scan.finished_at = status, error, time.time()
    # Checkpoint problems were written with their batch; the rest (folders, metrics lines) now.
    stored = {(p, code, m) for p, code, m in s.execute(sa.select(ScanProblem.path, ScanProblem.code, ScanProblem.message)
                                                        .where(ScanProblem.scan_id == scan_id))}
    rows = [{"scan_id": scan_id, "path": p, "code": code, "message": m, "created_at": time.time()}
            for p, code, m in dict.fromkeys(c.problems) if (p, code, m) not in stored]
    if rows:
        s.execute(sa.insert(ScanProblem), rows)
    scan.problem_count = len(stored) + len(rows)


def _mark_run_missing(s: Session, db, run_id: int) -> int:
    db.lock_run(s, run_id)
    s.execute(sa.update(Run).where(Run.id == run_id).values(missing=True))
    n = s.execute(sa.update(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.missing.is_(False))
                  .values(missing=True)).rowcount
    s.execute(sa.update(CheckpointFile).where(CheckpointFile.run_id == run_id).values(missing=True))
    s.execute(sa.update(MetricSource).where(MetricSource.run_id == run_id).values(missing=True))
    return n


def _stored_state(s: Session, path: str):
    """The run row, {slot key: (checkpoint id, {file name: (size, mtime_ns)})} of its present
    checkpoints, and its metrics.jsonl source row (None when never seen)."""
    run = s.execute(sa.select(Run).where(Run.path == path)).scalar_one_or_none()
    if run is None:
        return None, {}, None
    ckpts = {c.id: c for c in s.execute(sa.select(Checkpoint).where(Checkpoint.run_id == run.id,
                                                                   Checkpoint.missing.is_(False))).scalars()}
    present: dict[tuple, tuple[int, dict]] = {}
    for c in ckpts.values():
        key = ("single_file", None) if c.layout == "single_file" else ("upstream", c.step)
        present[key if key not in present else ("duplicate", c.id)] = (c.id, {})
    by_id = {cid: files for cid, files in present.values()}
    for cid, name, size, mtime in s.execute(sa.select(
            CheckpointFile.checkpoint_id, CheckpointFile.name, CheckpointFile.size, CheckpointFile.mtime_ns).where(
            CheckpointFile.run_id == run.id, CheckpointFile.missing.is_(False))):
        if cid in by_id:
            by_id[cid][name] = (size, mtime)
    source = s.execute(sa.select(MetricSource).where(MetricSource.run_id == run.id,
                                                     MetricSource.kind == "jsonl")).scalars().first()
    return run, present, source


def _scan_run(store, d: Path, slots: dict[tuple, Slot], metrics_stat, root_id: int, scan_id: int, counts: _Counts,
              on_problem, progress: Progress | None, done: int, total: int) -> int:
    db = store.db
    path = str(d)
    phase, tag = cm.phase_and_tag(d)
    with db.session() as s:
        run, present, source = _stored_state(s, path)
    if run is None:
        counts.runs_new += 1
    changed = [slot for key, slot in sorted(slots.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else -1))
               if key not in present or present[key][1] != {n: (f[2], f[3]) for n, f in slot.files.items()}]
    gone = [cid for key, (cid, _) in present.items() if key not in slots]
    counts.checkpoints_seen += len(slots)
    counts.checkpoints_unchanged += len(slots) - len(changed)
    done += len(slots) - len(changed)
    mtimes = [f[3] for slot in slots.values() for f in slot.files.values()] + ([metrics_stat.st_mtime_ns] if metrics_stat else [])
    run_values = {"path": path, "phase": phase, "tag": tag, "root_id": root_id, "last_seen_at": time.time(),
                  "last_activity_at": max(mtimes) / 1e9 if mtimes else None, "has_metrics_file": metrics_stat is not None,
                  "missing": False}
    run_id = db.write(lambda s: _upsert_run(s, db, run_values, gone))
    counts.checkpoints_missing += len(gone)
    if progress:
        progress(done, total, f"{phase}/{tag}: {len(changed)} new or changed checkpoints")
    for i in range(0, len(changed), BATCH):
        batch = [inspect_checkpoint(slot, d) for slot in changed[i:i + BATCH]]
        with_meta = [b for b in batch if b.meta is not None]
        best = max(with_meta, key=lambda b: (b.complete, b.step)) if with_meta else None
        config = (best.complete, run_config(best, d)) if best else None
        stats = db.write(lambda s, batch=batch, config=config: _write_batch(
            s, db, run_id, d, batch, config, present, scan_id, metrics_stat is None))
        counts.checkpoints_new += stats[0]
        counts.checkpoints_changed += stats[1]
        counts.checkpoints_missing += stats[2]
        for b in batch:
            for p in b.problems:
                on_problem(str(d / (p["file"] or "")), p["code"], f"{d.name}@{b.step}: {p['message']}")
        done += len(batch)
        if progress:
            progress(done, total, f"{phase}/{tag}: inspected {min(i + BATCH, len(changed))}/{len(changed)}")
    if metrics_stat is not None and (source is None or (source.size, source.mtime_ns, source.inode) !=
                                     (metrics_stat.st_size, metrics_stat.st_mtime_ns, metrics_stat.st_ino)):
        lines, bad = sync_metrics_file(db, run_id, str(d / METRICS_FILE), on_problem)
        counts.metric_lines += lines
        counts.metric_bad_lines += bad
    return done


def _upsert_run(s: Session, db, values: dict, gone: list[int]) -> int:
    now = values["last_seen_at"]
    s.execute(db.insert(Run.__table__).on_conflict_do_nothing(index_elements=["path"]),
              [{**values, "first_seen_at": now}])
    run = s.execute(sa.select(Run).where(Run.path == values["path"])).scalar_one()
    db.lock_run(s, run.id)
    s.refresh(run)
    for k, v in values.items():
        if k == "last_activity_at" and v is not None and run.last_activity_at is not None:
            v = max(v, run.last_activity_at)
        setattr(run, k, v)
    if gone:
        s.execute(sa.update(Checkpoint).where(Checkpoint.id.in_(gone)).values(missing=True))
        s.execute(sa.update(CheckpointFile).where(CheckpointFile.checkpoint_id.in_(gone)).values(missing=True))
    return run.id


def _write_batch(s: Session, db, run_id: int, d: Path, batch: list[Inspection], config: tuple[bool, dict] | None,
                 present: dict, scan_id: int, meta_history: bool) -> tuple[int, int, int]:
    """Upsert one batch of inspected checkpoints and their files; returns (new, changed, marked missing)."""
    db.lock_run(s, run_id)
    now = time.time()
    existing = {(c.layout, c.step): c for c in s.execute(sa.select(Checkpoint).where(
        Checkpoint.run_id == run_id, Checkpoint.step.in_(sorted({b.step for b in batch})))).scalars()}
    new = changed = superseded = 0
    for b in batch:
        files = b.slot.files
        values = dict(step=b.step, layout=b.slot.layout, segment=b.segment, val_bpb=b.val_bpb, meta=b.meta,
                      complete=b.complete, resumable=b.complete and not b.problems, missing=False,
                      has_train_state=b.has_train_state, world_size=b.world_size, problems=b.problems,
                      size_bytes=sum(f[2] for f in files.values()), mtime_ns=max(f[3] for f in files.values()),
                      inspected_at=now)
        row = existing.get((b.slot.layout, b.step))
        if row is None:
            row = Checkpoint(run_id=run_id, first_seen_at=now, **values)
            s.add(row)
            s.flush()
            new += 1
        else:
            for k, v in values.items():
                setattr(row, k, v)
            changed += 1
        ins = db.insert(CheckpointFile.__table__)
        s.execute(ins.on_conflict_do_update(index_elements=["checkpoint_id", "name"], set_={
            "size": ins.excluded.size, "mtime_ns": ins.excluded.mtime_ns, "kind": ins.excluded.kind,
            "rank": ins.excluded.rank, "missing": False}), [
            {"run_id": run_id, "checkpoint_id": row.id, "name": n, "kind": f[0], "rank": f[1], "size": f[2],
              "mtime_ns": f[3], "missing": False, "first_seen_at": now} for n, f in sorted(files.items())])
        s.execute(sa.update(CheckpointFile).where(CheckpointFile.checkpoint_id == row.id,
                                                  CheckpointFile.name.not_in(sorted(files))).values(missing=True))
        if b.slot.layout == "single_file":
            # checkpoint.pt was rewritten with another step: the previous step's record stays, as missing
            older = s.execute(sa.update(Checkpoint).where(
                Checkpoint.run_id == run_id, Checkpoint.layout == "single_file", Checkpoint.id != row.id,
                Checkpoint.missing.is_(False)).values(missing=True)).rowcount
            s.execute(sa.update(CheckpointFile).where(CheckpointFile.run_id == run_id, CheckpointFile.checkpoint_id != row.id,
                                                      CheckpointFile.name == cm.SINGLE_FILE).values(missing=True))
            superseded += older
        if b.problems:
            s.execute(sa.insert(ScanProblem), [
                {"scan_id": scan_id, "run_id": run_id, "checkpoint_id": row.id, "path": str(d / (p["file"] or "")),
                 "code": p["code"], "message": f"{d.name}@{b.step}: {p['message']}", "created_at": now} for p in b.problems])
    if config is not None:
        # The run's config follows its newest complete checkpoint (a resume may change flags); an
        # incomplete checkpoint's meta is used only until a complete one is seen.
        complete, values = config
        run = s.get(Run, run_id)
        if run.config_step is None or (complete and values["config_step"] >= run.config_step):
            for k, v in values.items():
                setattr(run, k, v)
            if not complete:
                run.config_step = None
    if meta_history:
        points = [("val_bpb", b.step, b.segment, b.val_bpb, b.slot.files[f"meta_{b.step:06d}.json"][3] / 1e9
                   if f"meta_{b.step:06d}.json" in b.slot.files else None)
                  for b in batch if b.val_bpb is not None and b.step >= 0
                  and not any(p["code"] in ("step_mismatch", "bad_meta") for p in b.problems)]
        ingest_points(s, db, run_id, points)
    return new, changed, superseded
