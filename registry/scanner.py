"""
The scanner: walks a folder, finds runs (checkpoint directories, both layouts, all phases) and brings
the registry up to date with what is on disk, reading only metadata.

How one scan goes:
1. Walk (no database writes): every folder up to MAX_DEPTH below the root that holds a checkpoint
   file (`model_*.pt`, `meta_*.json`, `optim_*.pt`, `trainstate_*.pt`, `checkpoint.pt`) or a
   `metrics.jsonl` is a run; the walk does not descend into runs. A path that does not exist or cannot
   be read, or a folder with no run (that the registry did not know either), raises before anything
   is written. What the registry holds for the runs under the root (ids, fingerprints) is one query.
2. Stat: one `stat` per file, by name relative to the open run folder (the kernel resolves one path
   component instead of the whole path), keeping nothing per file but its name and stat result. A
   run folder whose fingerprint (its own inode and mtime, and every file's inode, size and mtime_ns,
   in listing order) equals the one stored by the last scan costs nothing more: an unchanged tree of
   10,000 checkpoints costs its stats, one read and two short writes (the scan's own row, start and end).
   In the other folders each checkpoint's files are compared with what the registry holds (a few bulk
   queries); a checkpoint whose files all match is not opened. The rest are inspected
   (`inspection.inspect_checkpoint`: the meta JSON, then `nanochat.quick_check`, the one quick check:
   zip central directories, optimizer shards for the world size, the model's pickle read without
   running it and checked against its config; never `torch.load`).
3. Writes (`writer.py`, handed each run as a `writer.RunWrite`; this module decides what is new,
   changed or gone, the writer only writes): one short transaction per batch of at most BATCH inspected checkpoints
   (across runs), holding the locks of the runs it touches, so the registry is never half-written and
   concurrent scanners serialise per run. Vanished checkpoints and files are marked missing, vanished
   runs too; nothing is deleted. metrics.jsonl is ingested incrementally afterwards
   (`metrics.sync_metrics_file`); runs without one get their val_bpb history from the checkpoints'
   metas at query time (store.py).

Progress: `progress(done, total, message)` counts checkpoints (unchanged ones at once), called at most
every PROGRESS_EVERY_S seconds and once at the end. The report returned is the scan's row as stored
(`store.scan_report` reads the same), built from what this scan wrote. This module answers no queries
(store.py) and writes nothing itself (writer.py).
"""

from __future__ import annotations

import gc
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from nanochat import bounds
from nanochat import checkpoint_manager as cm
from nanochat.atomic_file import pid_alive
from registry import tokenizer_checks, writer
from registry.entities import ScanProblemRecord, ScanReport, utc
from registry.errors import NoCheckpointsError, RegistryError, ScanPathError
from registry.inspection import METRICS_FILE, Inspection, Slot, file_kind, inspect_checkpoint, is_run_file
from registry.metrics import sync_metrics_file

MAX_DEPTH = 6
BATCH = 500  # inspected checkpoints per write transaction
PROGRESS_EVERY_S = 0.1
Progress = Callable[[int, int, str], None]  # (done, total, message)
_DIR_FD = os.stat in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


def walk_runs(root: Path, on_problem: Callable[[str, str, str], None]) -> dict[Path, tuple[list[os.DirEntry], os.stat_result]]:
    """{folder: (its entries, its stat)} for folders under root (root included) holding checkpoint
    files or metrics.jsonl."""
    runs, seen, stack = {}, set(), [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            st = os.stat(d)
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
            runs[d] = (entries, st)
            continue
        if depth < MAX_DEPTH:
            stack += [(Path(e.path), depth + 1) for e in entries if not e.name.startswith(".") and e.is_dir()]
    return runs


class FileStat(NamedTuple):
    """What the scanner keeps of a file's stat."""
    st_ino: int
    st_size: int
    st_mtime_ns: int


def stat_run_dir(d: Path, entries: list[os.DirEntry] | None = None,
                 dir_st: os.stat_result | None = None) -> tuple[list[str], list[int], str]:
    """(names, [inode, size, mtime_ns] of each file in a flat list, fingerprint) of a run folder.

    The fingerprint covers the folder's inode and mtime (which change when a file is added, removed or
    renamed) and each file's inode, size and mtime_ns (which change when it is rewritten, appended to or
    truncated), in listing order (stable for an unchanged folder; another order only costs one full
    comparison). It is built from ints only, whose hashes CPython does not randomise, so another process
    computes the same. Each stat result is dropped as soon as its three ints are taken: stat results
    count as garbage-collector allocations while alive, and keeping 30,000 of them set off collections
    (a full one costs ~50 ms in a process that has imported torch)."""
    path = os.fspath(d)
    if dir_st is None:
        dir_st = os.stat(path)
    if entries is None:
        with os.scandir(path) as it:
            entries = list(it)
    names: list[str] = []
    flat: list[int] = []
    add, stat = flat.append, os.stat
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if _DIR_FD else None
    try:
        for entry in entries:
            try:
                if not entry.is_file():
                    continue
                st = stat(entry.name, dir_fd=fd) if fd is not None else stat(entry.path)
            except FileNotFoundError:
                continue  # deleted between listing and stat
            names.append(entry.name)
            add(st.st_ino)
            add(st.st_size)
            add(st.st_mtime_ns)
    finally:
        if fd is not None:
            os.close(fd)
    return names, flat, str(hash((dir_st.st_ino, dir_st.st_mtime_ns, tuple(flat))))


def file_stats(names: list[str], flat: list[int]) -> list[tuple[str, FileStat]]:
    return [(name, FileStat(flat[i], flat[i + 1], flat[i + 2])) for name, i in zip(names, range(0, len(flat), 3))]


def list_run_dir(d: Path, entries: list[os.DirEntry] | None = None) -> tuple[list[tuple[str, FileStat]], str]:
    """(name, stat) of every file in a run folder, and the folder's fingerprint (see stat_run_dir)."""
    names, flat, fingerprint = stat_run_dir(d, entries)
    return file_stats(names, flat), fingerprint


def group_slots(files: Iterable[tuple[str, FileStat]], on_bad_name: Callable[[str], None] | None = None
                ) -> tuple[dict[tuple, Slot], FileStat | None]:
    """The checkpoints among a run folder's files by slot key, and the metrics.jsonl stat. A checkpoint
    name whose step or rank is out of range is no checkpoint: it goes to `on_bad_name`."""
    slots: dict[tuple, Slot] = {}
    metrics = None
    for name, st in files:
        kind = file_kind(name)
        if kind is None:
            if name == METRICS_FILE:
                metrics = st
            continue
        k, step, rank = kind
        if k == "out_of_range":
            if on_bad_name:
                on_bad_name(name)
            continue
        layout = "single_file" if k == "single_file" else "upstream"
        slot = slots.get((layout, step))
        if slot is None:
            slot = slots[(layout, step)] = Slot(layout, step)
        slot.files[name] = (k, rank, st.st_size, st.st_mtime_ns)
    return slots, metrics


@dataclass(eq=False)
class RunPlan:
    """One run folder: what is on disk, what the registry holds, and what changed."""
    path: Path
    names: list[str]
    stats: list[int]  # inode, size, mtime_ns of each file, flat
    fingerprint: str
    slots: dict[tuple, Slot] = field(default_factory=dict)
    metrics_stat: FileStat | None = None
    run_id: int | None = None
    unchanged: bool = False  # the folder's fingerprint matches the registry: nothing was grouped or loaded
    stored_count: int = 0
    known_keys: set = field(default_factory=set)  # (layout, step) of every checkpoint row, present or missing
    present: dict = field(default_factory=dict)  # slot key -> (checkpoint id, files signature)
    source: tuple | None = None  # (size, mtime_ns, inode) of metrics.jsonl when last read
    written: bool = False  # its run row was updated by this scan

    def __post_init__(self):
        self.phase, self.tag = cm.phase_and_tag(self.path)

    @property
    def files(self) -> list[tuple[str, FileStat]]:
        return file_stats(self.names, self.stats)

    def changed(self) -> list[Slot]:
        order = sorted(self.slots, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        return [self.slots[k] for k in order if k not in self.present or self.present[k][1] != self.slots[k].signature()]

    def gone(self) -> list[int]:
        return [cid for key, (cid, _) in self.present.items() if key not in self.slots]

    def metrics_changed(self) -> bool:
        st = self.metrics_stat
        return st is not None and self.source != (st.st_size, st.st_mtime_ns, st.st_ino)

    def for_writer(self) -> writer.RunWrite:
        """This run as the writer needs it for the next batch (named values; it never sees a plan)."""
        st = self.metrics_stat
        return writer.RunWrite(self.path, self.run_id, self.phase, self.tag, self.last_activity(), st is not None,
                               first_batch=not self.written, gone=tuple(self.gone()) if not self.written else (),
                               present=self.present)

    def knows(self, ins: Inspection) -> bool:
        """Whether an inspected checkpoint was indexed before (then it changed), or is new."""
        return (ins.slot.layout, ins.step) in self.known_keys

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


# While a scan runs, its row's error column names its process, so that a later scan can tell one that was
# killed (kill -9, a crash, a lost node) from one still running, and mark it interrupted. A scan on another
# host cannot be told apart: it stays "running".
_OWNER_RE = re.compile(r"^running as pid (\d+) on (.+)$")


def _owner() -> str:
    return f"running as pid {os.getpid()} on {socket.gethostname()}"


def _dead_owner(owner: str) -> str | None:
    """Why the scan `owner` describes is no longer running, or None when it may be."""
    m = _OWNER_RE.match(owner)
    if m is None or m[2] != socket.gethostname() or pid_alive(int(m[1])):
        return None
    return (f"interrupted: its process (pid {m[1]} on {m[2]}) ended without finishing (killed?); what it wrote is kept, "
            "a later scan completes it")


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


@contextmanager
def _no_cyclic_collections():
    """The cyclic garbage collector paused (for the whole process) while a scan runs. A first scan
    allocates tens of container objects per checkpoint and metric point, nearly all freed at once by
    reference counting, yet they set off hundreds of collections (~5% of a first scan) and, in a process
    that has imported torch, full ones over its ~200,000 objects (~100 ms each). A scan of 2,000
    checkpoints leaves ~400 objects in cycles (its sessions) for the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def scan_path(store, path, progress: Progress | None = None, origin: str | None = None) -> ScanReport:
    """Bring the registry up to date with the runs under `path` as seen from `origin` (default: the
    store's, the host name); return a ScanReport. Runs of other origins at the same paths are neither
    read nor marked missing."""
    with _no_cyclic_collections():
        return _scan_path(store, path, progress, origin)


def _scan_path(store, path, progress: Progress | None, origin: str | None) -> ScanReport:
    db = store.db
    origin = store.origin if origin is None else origin
    root = _resolve_root(path)
    counts = _Counts()
    run_dirs = walk_runs(root, counts.problem)
    with db.session() as s:
        known = writer.runs_under(s, db, str(root), origin)
    if not run_dirs and not known:
        raise NoCheckpointsError(f"no checkpoints under {root} (looked for model_NNNNNN.pt, meta_NNNNNN.json, "
                                 f"checkpoint.pt or {METRICS_FILE}, up to {MAX_DEPTH} folders deep)")
    unclaimed = [r.id for p, r in known.items() if not r.claimed and (Path(p) in run_dirs or os.path.isdir(p))]
    if unclaimed:  # runs indexed before origins existed, found here: this origin's from now on
        db.write(lambda s: writer.claim_runs(s, db, origin, unclaimed))
        with db.session() as s:
            known = writer.runs_under(s, db, str(root), origin)
    started = time.time()
    root_id, scan_id = db.write(lambda s: writer.start_scan(s, db, str(root), started, _owner(), _dead_owner, origin))
    written: list[tuple[str, str, str]] = []  # problems written with the batches, in order
    try:
        plans = _scan(db, root_id, scan_id, run_dirs, known, counts, progress, written, origin)
    except BaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if status == "interrupted":
            msg = "interrupted (Ctrl-C); what it wrote is kept, a later scan completes it"
        try:
            db.write(lambda s: writer.finish_scan(s, db, scan_id, counts, status, msg, [], written, time.time()))
        except RegistryError:
            pass  # the database itself is failing: the original error is the one to report
        raise
    finished = time.time()
    seen = [writer.RunIndexedRow(p.run_id, finished, p.fingerprint, p.stored_count if p.unchanged else len(p.slots))
            for p in plans]
    rest = db.write(lambda s: writer.finish_scan(s, db, scan_id, counts, "ok", None, seen, written, finished))
    tokenizer_checks.refresh_under(store, str(root), origin)  # each run's token_bytes verdict (two stats per tokenizer folder)
    if progress:
        progress(counts.checkpoints_seen, counts.checkpoints_seen, "done")
    return ScanReport(
        scan_id=scan_id, root=str(root), status="ok", started_at=utc(started), finished_at=utc(finished),
        duration_s=finished - started, runs_found=counts.runs_found, runs_new=counts.runs_new,
        runs_missing=counts.runs_missing, checkpoints_seen=counts.checkpoints_seen, checkpoints_new=counts.checkpoints_new,
        checkpoints_changed=counts.checkpoints_changed, checkpoints_unchanged=counts.checkpoints_unchanged,
        checkpoints_missing=counts.checkpoints_missing, files_stat=counts.files_stat, metric_lines=counts.metric_lines,
        metric_bad_lines=counts.metric_bad_lines, problems=tuple(ScanProblemRecord(*p) for p in written + rest),
        origin=origin or None)


def tree_fingerprint(root: Path) -> str:
    """One string that changes when anything a scan of `root` would look at changes: the run folders
    found and each one's fingerprint (see stat_run_dir). Costs the walk and a stat per file, no database."""
    parts = []
    for d, (entries, st) in sorted(walk_runs(root, lambda *_: None).items()):
        try:
            parts.append((str(d), stat_run_dir(d, entries, st)[2]))
        except OSError:
            parts.append((str(d), "unreadable"))
    return str(hash(tuple(parts)))


def watch(store, path, interval: float = 10.0, on_scan: Callable[[ScanReport | None], None] | None = None,
          on_error: Callable[[Exception], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
          wait: Callable[[float], None] = time.sleep, origin: str | None = None) -> int:
    """Keep the registry up to date with `path` until `should_stop()`: scan now, then every `interval`
    seconds scan again when the tree's fingerprint changed. A pass over an unchanged tree costs the walk
    and one stat per file and writes nothing (not even a scan row). `on_scan(report)` follows each scan
    (None: no checkpoints yet); a RegistryError (a locked or unreachable database) goes to `on_error` and
    the next pass tries again. `wait(seconds)` sleeps (the CLI's returns early on a signal). Returns the
    number of scans made."""
    root = _resolve_root(path)
    last, scans = None, 0
    while not should_stop():
        try:
            fingerprint = tree_fingerprint(root)
            if fingerprint != last:
                try:
                    report = scan_path(store, root, origin=origin)
                except NoCheckpointsError:
                    report = None  # nothing to index yet: keep watching
                last, scans = fingerprint, scans + 1  # taken before the scan: a change during it is seen next pass
                if on_scan:
                    on_scan(report)
        except (RegistryError, OSError) as e:
            last = None
            if on_error is None:
                raise
            on_error(e)
        if not should_stop():
            wait(interval)
    return scans


def _plan_runs(run_dirs: dict, known: dict[str, writer.StoredRun], counts: _Counts) -> dict[str, RunPlan]:
    """Stat every run folder (those found, and those the registry knows that still exist) and settle
    the ones whose fingerprint is unchanged."""
    dirs: dict[Path, tuple | None] = dict(run_dirs)
    for p in known:
        if Path(p) not in dirs and os.path.isdir(p):
            dirs[Path(p)] = None  # known, but without checkpoint files now (all deleted): its rows are marked
    plans: dict[str, RunPlan] = {}
    for d in sorted(dirs):
        try:
            names, stats, fingerprint = stat_run_dir(d, *(dirs[d] or ()))
        except OSError as e:
            counts.problem(str(d), "unreadable", f"cannot read folder {d}: {e.strerror or e}")
            continue
        plan = plans[str(d)] = RunPlan(d, names, stats, fingerprint)
        counts.files_stat += len(names)
        stored = known.get(str(d))
        if stored is not None:
            plan.run_id = stored.id
            if not stored.missing and stored.signature == fingerprint:
                plan.unchanged, plan.stored_count = True, stored.checkpoints
                continue
        plan.slots, plan.metrics_stat = group_slots(plan.files, lambda name, d=d: counts.problem(
            str(d / name), "bad_file_name", f"{d.name}/{name}: its step or rank is out of range (steps up to "
            f"{bounds.MAX_STEP}, ranks below {bounds.MAX_WORLD_SIZE}); not indexed"))
    return plans


def _scan(db, root_id: int, scan_id: int, run_dirs: dict, known: dict[str, writer.StoredRun], counts: _Counts,
          progress, written: list, origin: str) -> list[RunPlan]:
    plans = _plan_runs(run_dirs, known, counts)
    indexed = {p.run_id: p for p in plans.values() if p.run_id is not None and not p.unchanged}
    if indexed:
        with db.session() as s:
            stored = writer.load_checkpoints(s, db, list(indexed))
        for rid, plan in indexed.items():
            plan.known_keys, plan.present, plan.source = stored[rid].known_keys, stored[rid].present, stored[rid].source
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
        now = time.time()
        views = {id(p): p.for_writer() for p in batch_runs}
        items = [(views[id(p)], ins) for p, ins in batch]
        result = db.write(lambda s: writer.write_batch(s, db, list(views.values()), items, root_id, scan_id, now,
                                                       origin))
        for p in batch_runs:  # only once committed: a retried transaction starts from the same plans
            p.run_id, p.written = result.run_ids[str(p.path)], True
        for p, ins in batch:
            if p.knows(ins):
                counts.checkpoints_changed += 1
            else:
                counts.checkpoints_new += 1
        counts.checkpoints_missing += result.missing
        for x in result.problems:
            counts.problem(*x)
        written.extend(result.problems)
        batch_runs.clear()
        batch.clear()

    for plan, changed in work:
        batch_runs.append(plan)
        for slot in changed:
            batch.append((plan, inspect_checkpoint(slot, plan.path)))
            done += 1
            if progress:  # the message is built only for a caller that shows it
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
    for p, stored in known.items():
        if p not in plans and not stored.missing and not os.path.isdir(p):
            counts.runs_missing += 1
            counts.checkpoints_missing += db.write(lambda s, rid=stored.id: writer.mark_run_missing(s, db, rid))
    return list(plans.values())
