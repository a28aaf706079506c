"""
The scanner: walks a folder, finds runs (checkpoint directories, both layouts, all phases) and brings
the registry up to date with what is on disk, reading only metadata.

How one scan goes:
1. Walk (no database writes): every folder up to MAX_DEPTH below the root that holds a checkpoint
   file (`model_*.pt`, `meta_*.json`, `optim_*.pt`, `trainstate_*.pt`, `checkpoint.pt`) or a
   `metrics.jsonl` is a run; the walk does not descend into runs. A path that does not exist or cannot
   be read, or a folder with no run (that the registry did not know either), raises before anything
   is written.
2. Stat: one `stat` per file. A run folder whose fingerprint (its own mtime, and every file's inode,
   size and mtime_ns) equals the one stored by the last scan costs nothing more. In the others, each
   checkpoint's files are compared with what the registry holds (a few bulk queries); a checkpoint
   whose files all match is not opened. The rest are inspected (`inspection.inspect_checkpoint`: meta
   JSON, zip central directories, optimizer shards for the world size; never `torch.load`).
3. Writes: one short transaction per batch of at most BATCH inspected checkpoints (across runs),
   holding the locks of the runs it touches, so the registry is never half-written and concurrent
   scanners serialise per run. Vanished checkpoints and files are marked missing, vanished runs too;
   nothing is deleted. metrics.jsonl is ingested incrementally afterwards (`metrics.sync_metrics_file`);
   runs without one get their val_bpb history from the checkpoints' metas at query time (store.py).

Progress: `progress(done, total, message)` counts checkpoints (unchanged ones at once), called at most
every PROGRESS_EVERY_S seconds and once at the end. This module answers no queries (store.py).
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
from registry.errors import NoCheckpointsError, RegistryError, ScanPathError
from registry.inspection import METRICS_FILE, Inspection, Slot, file_kind, inspect_checkpoint, is_run_file, run_config
from registry.metrics import sync_metrics_file
from registry.models import Checkpoint, CheckpointFile, MetricSource, Root, Run, Scan, ScanProblem

MAX_DEPTH = 6
BATCH = 500  # inspected checkpoints per write transaction
PROGRESS_EVERY_S = 0.1
Progress = Callable[[int, int, str], None]  # (done, total, message)
_RUN_CONFIG_COLUMNS = ("model_config", "user_config", "config_step", "num_iterations", "world_size", "total_batch_size",
                       "depth", "n_params", "flops_per_token", "generation")
_CHECKPOINT_COLUMNS = ("segment", "val_bpb", "meta", "complete", "resumable", "missing", "has_train_state", "world_size",
                       "problems", "size_bytes", "mtime_ns", "files_signature", "inspected_at")


_STATEMENTS: dict[str, dict] = {}


def _statements(db) -> dict:
    """The batch writer's statements, built once per dialect (statements are immutable and reusable)."""
    if db.dialect in _STATEMENTS:
        return _STATEMENTS[db.dialect]
    run_t, ckpt_t, file_t = Run.__table__, Checkpoint.__table__, CheckpointFile.__table__
    act = sa.bindparam("b_act", type_=sa.Float)
    ck = db.insert(ckpt_t)
    fi = db.insert(file_t)
    config = {k: sa.bindparam(f"b_{k}", type_=run_t.c[k].type) for k in _RUN_CONFIG_COLUMNS}
    out = {
        "run_update": sa.update(run_t).where(run_t.c.id == sa.bindparam("b_id")).values(
            phase=sa.bindparam("b_phase"), tag=sa.bindparam("b_tag"), root_id=sa.bindparam("b_root"),
            last_seen_at=sa.bindparam("b_now", type_=sa.Float), missing=False, has_metrics_file=sa.bindparam("b_has_metrics"),
            last_activity_at=sa.case((run_t.c.last_activity_at.is_(None), act), (act > run_t.c.last_activity_at, act),
                                     else_=run_t.c.last_activity_at)),
        "run_seen": sa.update(run_t).where(run_t.c.id == sa.bindparam("b_id")).values(
            last_seen_at=sa.bindparam("b_now", type_=sa.Float), dir_signature=sa.bindparam("b_signature"),
            dir_checkpoints=sa.bindparam("b_count", type_=sa.Integer)),
        "checkpoint_upsert": ck.on_conflict_do_update(index_elements=["run_id", "layout", "step"],
                                                      set_={c: ck.excluded[c] for c in _CHECKPOINT_COLUMNS}),
        "file_upsert": fi.on_conflict_do_update(index_elements=["checkpoint_id", "name"], set_={
            "size": fi.excluded.size, "mtime_ns": fi.excluded.mtime_ns, "kind": fi.excluded.kind, "rank": fi.excluded.rank,
            "missing": False}),
        "file_vanished": sa.update(file_t).where(file_t.c.checkpoint_id == sa.bindparam("b_cid"),
                                                 file_t.c.name == sa.bindparam("b_name")).values(missing=True),
        # The newest complete checkpoint's config wins; an incomplete one only fills an empty config.
        "config_complete": sa.update(run_t).where(run_t.c.id == sa.bindparam("b_id"), sa.or_(
            run_t.c.config_step.is_(None), run_t.c.config_step <= sa.bindparam("b_guard", type_=sa.Integer))).values(config),
        "config_incomplete": sa.update(run_t).where(run_t.c.id == sa.bindparam("b_id"), run_t.c.config_step.is_(None))
        .values(config),
    }
    _STATEMENTS[db.dialect] = out
    return out


def walk_runs(root: Path, on_problem: Callable[[str, str, str], None]) -> dict[Path, list[os.DirEntry]]:
    """{folder: its entries} for folders under root (root included) holding checkpoint files or metrics.jsonl."""
    runs, seen, stack = {}, set(), [(root, 0)]
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
        if any(is_run_file(e.name) and e.is_file() for e in entries):
            runs[d] = entries
            continue
        if depth < MAX_DEPTH:
            stack += [(Path(e.path), depth + 1) for e in entries if not e.name.startswith(".") and e.is_dir()]
    return runs


def list_run_dir(d: Path, entries: list[os.DirEntry] | None = None) -> tuple[list[tuple[str, os.stat_result]], str]:
    """(name, stat) of every file in a run folder, and the folder's fingerprint: its own inode and mtime
    (which change when a file is added, removed or renamed) and each file's inode, size and mtime_ns
    (which change when it is rewritten, appended to or truncated). Built from ints only, whose hashes
    CPython does not randomise, so it can be compared with one stored by another process."""
    dir_st = os.stat(d)
    if entries is None:
        with os.scandir(d) as it:
            entries = list(it)
    files = []
    for entry in entries:
        try:
            if entry.is_file():
                files.append((entry.name, entry.stat()))
        except FileNotFoundError:
            continue  # deleted between listing and stat
    fingerprint = hash((dir_st.st_ino, dir_st.st_mtime_ns, frozenset((st.st_ino, st.st_size, st.st_mtime_ns) for _, st in files)))
    return files, str(fingerprint)


def group_slots(files: list[tuple[str, os.stat_result]]) -> tuple[dict[tuple, Slot], os.stat_result | None]:
    """The checkpoints among a run folder's files by slot key, and the metrics.jsonl stat."""
    slots: dict[tuple, Slot] = {}
    metrics = None
    for name, st in files:
        kind = file_kind(name)
        if kind is None:
            if name == METRICS_FILE:
                metrics = st
            continue
        k, step, rank = kind
        layout = "single_file" if k == "single_file" else "upstream"
        slot = slots.get((layout, step))
        if slot is None:
            slot = slots[(layout, step)] = Slot(layout, step)
        slot.files[name] = (k, rank, st.st_size, st.st_mtime_ns)
    return slots, metrics


@dataclass
class RunPlan:
    """One run folder: what is on disk, what the registry holds, and what changed."""
    path: Path
    files: list[tuple[str, os.stat_result]]
    fingerprint: str
    slots: dict[tuple, Slot] = field(default_factory=dict)
    metrics_stat: os.stat_result | None = None
    run_id: int | None = None
    unchanged: bool = False  # the folder's fingerprint matches the registry: nothing was grouped or loaded
    stored_count: int = 0
    known_keys: set = field(default_factory=set)  # (layout, step) of every checkpoint row, present or missing
    present: dict = field(default_factory=dict)  # slot key -> (checkpoint id, files signature)
    source: tuple | None = None  # (size, mtime_ns, inode) of metrics.jsonl when last read
    written: bool = False  # its run row was updated by this scan

    def __post_init__(self):
        self.phase, self.tag = cm.phase_and_tag(self.path)

    def changed(self) -> list[Slot]:
        order = sorted(self.slots, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        return [self.slots[k] for k in order if k not in self.present or self.present[k][1] != self.slots[k].signature()]

    def gone(self) -> list[int]:
        return [cid for key, (cid, _) in self.present.items() if key not in self.slots]

    def metrics_changed(self) -> bool:
        st = self.metrics_stat
        return st is not None and self.source != (st.st_size, st.st_mtime_ns, st.st_ino)

    def last_activity(self) -> float | None:
        mtimes = [f[3] for slot in self.slots.values() for f in slot.files.values()]
        if self.metrics_stat is not None:
            mtimes.append(self.metrics_stat.st_mtime_ns)
        return max(mtimes) / 1e9 if mtimes else None


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

    def problem(self, path: str, code: str, message: str) -> None:
        self.problems.append((path, code, message))


def _resolve_root(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise ScanPathError(f"{p} does not exist")
    p = p.resolve()
    if p.is_file():
        if not is_run_file(p.name):
            raise ScanPathError(f"{p} is a file, not a folder of checkpoints")
        p = p.parent
    return p


def _chunks(items: list, n: int = 500):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def scan_path(store, path, progress: Progress | None = None):
    """Bring the registry up to date with the runs under `path`; return a ScanReport."""
    db = store.db
    root = _resolve_root(path)
    counts = _Counts()
    run_dirs = walk_runs(root, counts.problem)
    under = sa.or_(Run.path == str(root), Run.path.startswith(str(root).rstrip("/") + "/", autoescape=True))
    with db.session() as s:
        known = {p: (rid, missing) for p, rid, missing in s.execute(sa.select(Run.path, Run.id, Run.missing).where(under))}
    if not run_dirs and not known:
        raise NoCheckpointsError(f"no checkpoints under {root} (looked for model_NNNNNN.pt, meta_NNNNNN.json, "
                                 f"checkpoint.pt or {METRICS_FILE}, up to {MAX_DEPTH} folders deep)")
    root_id, scan_id = db.write(lambda s: _start_scan(s, db, root, time.time()))
    try:
        plans = _scan(store, root_id, scan_id, run_dirs, known, counts, progress)
    except BaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            db.write(lambda s: _finish_scan(s, db, scan_id, counts, "failed", msg, []))
        except RegistryError:
            pass  # the database itself is failing: the original error is the one to report
        raise
    db.write(lambda s: _finish_scan(s, db, scan_id, counts, "ok", None, plans))
    if progress:
        progress(counts.checkpoints_seen, counts.checkpoints_seen, "done")
    return store.scan_report(scan_id)


def _scan(store, root_id: int, scan_id: int, run_dirs: dict[Path, list], known: dict, counts: _Counts,
          progress) -> list[RunPlan]:
    db = store.db
    plans: dict[str, RunPlan] = {}
    for d in sorted(set(run_dirs) | {Path(p) for p in known if Path(p).is_dir()}):
        try:
            files, fingerprint = list_run_dir(d, run_dirs.get(d))
        except OSError as e:
            counts.problem(str(d), "unreadable", f"cannot read folder {d}: {e.strerror or e}")
            continue
        plans[str(d)] = RunPlan(d, files, fingerprint)
        counts.files_stat += len(files)
    with db.session() as s:
        _load_state(s, plans)
    counts.runs_found = len(plans)
    counts.runs_new = sum(1 for p in plans.values() if p.run_id is None)
    total = sum(p.stored_count if p.unchanged else len(p.slots) for p in plans.values())
    work = [(plan, plan.changed()) for plan in plans.values() if not plan.unchanged]
    counts.checkpoints_seen = total
    counts.checkpoints_unchanged = done = total - sum(len(c) for _, c in work)
    last_report = 0.0

    def report(message: str, force: bool = False) -> None:
        nonlocal last_report
        if progress and (force or time.monotonic() - last_report >= PROGRESS_EVERY_S):
            last_report = time.monotonic()
            progress(done, total, message)

    report("comparing with the registry", force=True)
    batch_runs: list[RunPlan] = []
    batch: list[tuple[RunPlan, Inspection]] = []

    def flush() -> None:
        if not batch_runs:
            return
        new, changed, missing = db.write(lambda s: _write_batch(s, db, batch_runs, batch, root_id, scan_id, counts))
        counts.checkpoints_new += new
        counts.checkpoints_changed += changed
        counts.checkpoints_missing += missing
        batch_runs.clear()
        batch.clear()

    for plan, changed in work:
        batch_runs.append(plan)
        for slot in changed:
            batch.append((plan, inspect_checkpoint(slot, plan.path)))
            done += 1
            report(f"{plan.phase}/{plan.tag}: step {slot.step if slot.step is not None else 'checkpoint.pt'}")
            if len(batch) >= BATCH:
                flush()
                batch_runs.append(plan)
    flush()
    for plan in plans.values():
        if not plan.unchanged and plan.metrics_changed():
            lines, bad = sync_metrics_file(db, plan.run_id, str(plan.path / METRICS_FILE), counts.problem)
            counts.metric_lines += lines
            counts.metric_bad_lines += bad
    for p, (rid, missing) in known.items():
        if p not in plans and not Path(p).is_dir() and not missing:
            counts.runs_missing += 1
            counts.checkpoints_missing += db.write(lambda s, rid=rid: _mark_run_missing(s, db, rid))
    return list(plans.values())


def _load_state(s: Session, plans: dict[str, RunPlan]) -> None:
    """What the registry holds for these runs, in a few bulk queries. A run whose folder fingerprint
    is unchanged is settled here; only the others have their files grouped and checkpoints loaded."""
    by_id: dict[int, RunPlan] = {}
    conn = s.connection()  # plain rows: tens of thousands of them on a big tree
    for chunk in _chunks(list(plans)):
        for rid, path, signature, count, missing in conn.execute(sa.select(
                Run.id, Run.path, Run.dir_signature, Run.dir_checkpoints, Run.missing).where(Run.path.in_(chunk))):
            plan = plans[path]
            plan.run_id = rid
            if not missing and signature is not None and signature == plan.fingerprint:
                plan.unchanged, plan.stored_count = True, count or 0
            else:
                by_id[rid] = plan
    for plan in plans.values():
        if not plan.unchanged:
            plan.slots, plan.metrics_stat = group_slots(plan.files)
    for chunk in _chunks(sorted(by_id)):
        for cid, rid, layout, step, missing, signature in conn.execute(sa.select(
                Checkpoint.id, Checkpoint.run_id, Checkpoint.layout, Checkpoint.step, Checkpoint.missing,
                Checkpoint.files_signature).where(Checkpoint.run_id.in_(chunk))):
            plan = by_id[rid]
            plan.known_keys.add((layout, step))
            if not missing:
                key = ("single_file", None) if layout == "single_file" else ("upstream", step)
                plan.present[key if key not in plan.present else ("duplicate", cid)] = (cid, signature)
        for rid, size, mtime, inode in conn.execute(sa.select(
                MetricSource.run_id, MetricSource.size, MetricSource.mtime_ns, MetricSource.inode)
                .where(MetricSource.run_id.in_(chunk), MetricSource.kind == "jsonl")):
            by_id[rid].source = (size, mtime, inode)


def _start_scan(s: Session, db, root: Path, now: float) -> tuple[int, int]:
    s.execute(db.insert(Root.__table__).on_conflict_do_nothing(index_elements=["path"]),
              [{"path": str(root), "first_scanned_at": now, "last_scanned_at": now}])
    root_row = s.execute(sa.select(Root).where(Root.path == str(root))).scalar_one()
    scan = Scan(root_path=str(root), started_at=now, status="running")
    s.add(scan)
    s.flush()
    root_row.last_scanned_at, root_row.last_scan_id = now, scan.id
    return root_row.id, scan.id


def _finish_scan(s: Session, db, scan_id: int, c: _Counts, status: str, error: str | None, plans: list[RunPlan]) -> None:
    if plans:  # only now, with every change of every run written, may the fingerprints say "indexed as is"
        s.connection().execute(_statements(db)["run_seen"], [
            {"b_id": p.run_id, "b_now": time.time(), "b_signature": p.fingerprint,
             "b_count": p.stored_count if p.unchanged else len(p.slots)} for p in plans])
    scan = s.get(Scan, scan_id)
    for name in ("runs_found", "runs_new", "runs_missing", "checkpoints_seen", "checkpoints_new", "checkpoints_changed",
                 "checkpoints_unchanged", "checkpoints_missing", "files_stat", "metric_lines", "metric_bad_lines"):
        setattr(scan, name, getattr(c, name))
    scan.status, scan.error, scan.finished_at = status, error, time.time()
    # Checkpoint problems were written with their batch; the others (folders, metrics lines) now.
    stored = set(s.execute(sa.select(ScanProblem.path, ScanProblem.code, ScanProblem.message)
                           .where(ScanProblem.scan_id == scan_id)).all())
    rows = [{"scan_id": scan_id, "path": p, "code": code, "message": m, "created_at": time.time()}
            for p, code, m in dict.fromkeys(c.problems) if (p, code, m) not in stored]
    if rows:
        s.execute(sa.insert(ScanProblem), rows)
    scan.problem_count = len(stored) + len(rows)


def _mark_run_missing(s: Session, db, run_id: int) -> int:
    db.lock_runs(s, [run_id])
    s.execute(sa.update(Run).where(Run.id == run_id).values(missing=True))
    n = s.execute(sa.update(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.missing.is_(False))
                  .values(missing=True)).rowcount
    s.execute(sa.update(CheckpointFile).where(CheckpointFile.run_id == run_id).values(missing=True))
    s.execute(sa.update(MetricSource).where(MetricSource.run_id == run_id).values(missing=True))
    return n


def _write_batch(s: Session, db, plans: list[RunPlan], items: list[tuple[RunPlan, Inspection]], root_id: int,
                 scan_id: int, counts: _Counts) -> tuple[int, int, int]:
    """Write one batch: run rows, inspected checkpoints with their files and problems, vanished
    checkpoints and files, the runs' configs. Returns (new, changed, marked missing)."""
    now = time.time()
    run_t = Run.__table__
    plans = list({id(p): p for p in plans}.values())
    new_runs = [{"path": str(p.path), "phase": p.phase, "tag": p.tag, "root_id": root_id, "first_seen_at": now,
                 "last_seen_at": now, "last_activity_at": p.last_activity(), "has_metrics_file": p.metrics_stat is not None,
                 "missing": False} for p in plans if p.run_id is None]
    if new_runs:
        s.execute(db.insert(run_t).on_conflict_do_nothing(index_elements=["path"]), new_runs)
    ids = dict(s.execute(sa.select(Run.path, Run.id).where(Run.path.in_([str(p.path) for p in plans]))).all())
    for p in plans:
        if p.run_id is None:
            p.written = True  # just inserted with this scan's values (or by a concurrent scanner, with the same)
        p.run_id = ids[str(p.path)]
    db.lock_runs(s, sorted(ids.values()))
    fresh = [p for p in plans if not p.written]
    conn, st = s.connection(), _statements(db)
    if fresh:
        conn.execute(st["run_update"], [
            {"b_id": p.run_id, "b_phase": p.phase, "b_tag": p.tag, "b_root": root_id, "b_now": now,
             "b_has_metrics": p.metrics_stat is not None, "b_act": p.last_activity()} for p in fresh])
    gone = [cid for p in fresh for cid in p.gone()]
    for p in fresh:
        p.written = True
    new = changed = 0
    if items:
        rows = []
        for p, ins in items:
            files = ins.slot.files
            rows.append({"run_id": p.run_id, "layout": ins.slot.layout, "step": ins.step, "segment": ins.segment,
                         "val_bpb": ins.val_bpb, "meta": ins.meta, "complete": ins.complete, "resumable": ins.resumable,
                         "missing": False, "has_train_state": ins.has_train_state, "world_size": ins.world_size(p.path),
                         "problems": ins.problems, "size_bytes": sum(f[2] for f in files.values()),
                         "mtime_ns": max(f[3] for f in files.values()), "files_signature": ins.slot.signature(),
                         "first_seen_at": now, "inspected_at": now})
            if (ins.slot.layout, ins.step) in p.known_keys:
                changed += 1
            else:
                new += 1
        conn.execute(st["checkpoint_upsert"], rows)
        run_ids = sorted({p.run_id for p, _ in items})
        steps = sorted({ins.step for _, ins in items})
        cids = {(r, lay, step): c for c, r, lay, step in s.execute(sa.select(
            Checkpoint.id, Checkpoint.run_id, Checkpoint.layout, Checkpoint.step).where(
            Checkpoint.run_id.in_(run_ids), Checkpoint.step.in_(steps)))}
        conn.execute(st["file_upsert"], [
            {"run_id": p.run_id, "checkpoint_id": cids[(p.run_id, ins.slot.layout, ins.step)], "name": n, "kind": f[0],
             "rank": f[1], "size": f[2], "mtime_ns": f[3], "missing": False, "first_seen_at": now}
            for p, ins in items for n, f in sorted(ins.slot.files.items())])
        problems = []
        rechecked = {}  # checkpoint id -> the file names on disk now, for checkpoints indexed before
        for p, ins in items:
            cid = cids[(p.run_id, ins.slot.layout, ins.step)]
            before = p.present.get(ins.slot.key)
            if before is not None and before[0] != cid:
                gone.append(before[0])  # checkpoint.pt rewritten with another step: the old step stays, as missing
            elif before is not None:
                rechecked[cid] = ins.slot.files
            problems += [{"scan_id": scan_id, "run_id": p.run_id, "checkpoint_id": cid, "path": str(p.path / (x["file"] or "")),
                          "code": x["code"], "message": f"{p.path.name}@{ins.step if ins.step >= 0 else '?'}: {x['message']}",
                          "created_at": now}
                         for x in ins.problems]
        vanished_files = [{"b_cid": cid, "b_name": name} for chunk in _chunks(sorted(rechecked)) for cid, name in s.execute(
            sa.select(CheckpointFile.checkpoint_id, CheckpointFile.name).where(
                CheckpointFile.checkpoint_id.in_(chunk), CheckpointFile.missing.is_(False))) if name not in rechecked[cid]]
        if vanished_files:
            conn.execute(st["file_vanished"], vanished_files)
        if problems:
            s.execute(sa.insert(ScanProblem), problems)
            for x in problems:
                counts.problem(x["path"], x["code"], x["message"])
        _update_configs(conn, st, items)
    missing = 0
    if gone:
        missing = s.execute(sa.update(Checkpoint).where(Checkpoint.id.in_(gone), Checkpoint.missing.is_(False))
                            .values(missing=True)).rowcount
        s.execute(sa.update(CheckpointFile).where(CheckpointFile.checkpoint_id.in_(gone)).values(missing=True))
    return new, changed, missing


def _update_configs(conn, st: dict, items: list[tuple[RunPlan, Inspection]]) -> None:
    """A run's config follows its newest complete checkpoint (a resume may change flags); an incomplete
    checkpoint's meta is used only while no complete one is known. The condition is in the UPDATE, so
    concurrent scanners cannot put an older config back."""
    best: dict[int, tuple[RunPlan, Inspection]] = {}
    for p, ins in items:
        if ins.meta is not None:
            cur = best.get(p.run_id)
            if cur is None or (ins.complete, ins.step) > (cur[1].complete, cur[1].step):
                best[p.run_id] = (p, ins)
    rows = {True: [], False: []}
    for run_id, (p, ins) in best.items():
        values = {f"b_{k}": v for k, v in run_config(ins, p.path).items()}
        values.update(b_id=run_id, b_guard=ins.step)
        if not ins.complete:
            values["b_config_step"] = None
        rows[ins.complete].append(values)
    for complete, batch in rows.items():
        if batch:
            conn.execute(st["config_complete" if complete else "config_incomplete"], batch)
