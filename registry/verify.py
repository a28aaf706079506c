"""
Integrity checks with a memory: run them on what a user points at, and record every result in the store.

`verify(store, target, deep)` is what `python -m registry verify` and the app's Integrity page call:
the target (a base dir, a run's checkpoint dir, one checkpoint file, or a RUN reference the registry
knows) is scanned first, so no prior scan is needed, then each of its checkpoints is checked
(`integrity.py`) and the result stored with its time, duration and, for deep checks, each file's
sha256 with the size and mtime it had, which the next deep check compares against
(`changed_since_indexed`). `plan_indexed_resume` is the registry's flavour of the resume planner:
the same `resume.plan_resume`, fed the stored deep results that still match the files and recording
the checks it has to run.

The checks themselves live in `integrity.py`, the planning in `resume.py`, the tables in `store.py`;
this module only wires them together (and parses nothing: see `cli.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import CheckpointFiles, Problem
from registry import integrity, resume
from registry.entities import state_of
from registry.errors import RunNotFoundError, ScanPathError
from registry.integrity import FileDigest, IntegrityResult

Progress = Callable[[int], None]  # units done since the last call: bytes (deep) or checkpoints (quick)


@dataclass(frozen=True)
class CheckedCheckpoint:
    run: str  # phase/tag
    checkpoint_id: int | None  # its id in the registry
    result: IntegrityResult

    @property
    def state(self) -> str:
        """The checkpoint's state after this check (registry.entities.CHECKPOINT_STATES)."""
        r = self.result
        return state_of(missing=False, loadable=r.loadable, ok=r.ok, checked=r.level)

    def to_dict(self) -> dict:
        return {"run": self.run, "checkpoint_id": self.checkpoint_id, "state": self.state, **self.result.to_dict()}


@dataclass(frozen=True)
class VerifyReport:
    target: str
    level: str
    results: tuple[CheckedCheckpoint, ...]
    duration_s: float

    @property
    def checked(self) -> int:
        return len(self.results)

    @property
    def with_problems(self) -> int:
        return sum(not r.result.ok for r in self.results)

    @property
    def bytes_read(self) -> int:
        return sum(r.result.bytes_read for r in self.results)

    @property
    def codes(self) -> dict[str, int]:
        """Problem code -> number of checkpoints with it."""
        out: dict[str, int] = {}
        for r in self.results:
            for code in r.result.codes:
                out[code] = out.get(code, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        """The `verify --json` shape (README, integrity section)."""
        return {"target": self.target, "level": self.level, "checked": self.checked, "with_problems": self.with_problems,
                "bytes_read": self.bytes_read, "duration_s": round(self.duration_s, 6), "codes": self.codes,
                "results": [r.to_dict() for r in self.results]}


# ---------------------------------------------------------------------- what a target means


def checkpoint_of_file(path: Path) -> CheckpointFiles:
    """The checkpoint a file belongs to (model, meta, optimizer shard, training state or checkpoint.pt),
    complete or not: verifying a broken checkpoint is the point."""
    step = None
    for pattern in (cm.MODEL_RE, cm.META_RE, cm.OPTIM_RE, cm.TRAIN_STATE_RE):
        if m := pattern.match(path.name):
            step = int(m.group(1))
    if step is None and path.name != cm.SINGLE_FILE:
        raise ScanPathError(f"{path.name} is not a checkpoint file (model_NNNNNN.pt, meta_NNNNNN.json, "
                            f"optim_..., trainstate_... or {cm.SINGLE_FILE})")
    layout = "single_file" if step is None else "upstream"
    for c in cm.list_checkpoints(path.parent):
        if c.layout == layout and (layout == "single_file" or c.step == step):
            return c
    raise ScanPathError(f"{path} is not part of a checkpoint")


def resolve_target(store, target: str) -> tuple[Path, list[CheckpointFiles]]:
    """(folder to scan, checkpoints to check) for a path on disk, or else a RUN reference."""
    p = Path(target).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_file():
            return p.parent, [checkpoint_of_file(p)]
        runs = cm.find_run_dirs(p)
        if not runs:
            raise ScanPathError(f"no checkpoints under {p}")
        return p, [c for r in runs for c in cm.list_checkpoints(r)]
    if looks_like_path(target):
        raise ScanPathError(f"{p} does not exist")
    run = store.resolve_run(target)  # RunNotFoundError / AmbiguousRunError name the candidates
    if not Path(run.path).is_dir():
        raise ScanPathError(f"{run.label}'s folder {run.path} no longer exists (its history is kept in the registry)")
    return Path(run.path), cm.list_checkpoints(run.path)


def looks_like_path(target: str) -> bool:
    """A RUN is an id, a tag or phase/tag; anything else with a slash, `.` or `~` is a path."""
    head = target.split("/", 1)[0]
    return target.startswith(("/", ".", "~")) or ("/" in target and head not in set(cm.PHASE_DIRS.values()))


def total_units(checkpoints: list[CheckpointFiles], deep: bool) -> int:
    return sum(integrity.checkpoint_bytes(c) for c in checkpoints) if deep else len(checkpoints)


# ---------------------------------------------------------------------- checking with a memory


class _Index:
    """(run dir, layout, step) -> (run label, checkpoint id), one query per run."""

    def __init__(self, store):
        self.store, self.runs = store, {}

    def lookup(self, ckpt: CheckpointFiles) -> tuple[str, int | None]:
        d = str(Path(ckpt.directory).resolve())
        if d not in self.runs:
            run = self.store.resolve_run(d)
            self.runs[d] = (run.label, {(r.layout, r.step if r.layout == "upstream" else None): r.id
                                        for r in self.store.checkpoints(run)})
        label, ids = self.runs[d]
        return label, ids.get((ckpt.layout, ckpt.step if ckpt.layout == "upstream" else None))


def recorded_digests(detail) -> dict[str, FileDigest]:
    """File name -> what the last deep check recorded (sha256 with the size and mtime it had then)."""
    return {f.name: FileDigest(f.name, f.sha256_size if f.sha256_size is not None else -1,
                               f.sha256_mtime_ns if f.sha256_mtime_ns is not None else -1, f.sha256)
            for f in detail.files if f.sha256}


def check_and_record(store, ckpt: CheckpointFiles, deep: bool, progress: Progress | None = None,
                     index: _Index | None = None) -> CheckedCheckpoint:
    """Check one checkpoint and store the result (deep: with its file hashes)."""
    label, cid = (index or _Index(store)).lookup(ckpt)
    detail = store.checkpoint_detail(cid) if (deep and cid is not None) else None
    previous = recorded_digests(detail) if detail is not None else None
    result = integrity.check_checkpoint(ckpt, deep=deep, previous=previous, progress=progress, tokenizer=True)
    if not deep and progress is not None:
        progress(1)
    if cid is not None:
        present = {f.name for f in detail.files} if detail is not None else set()
        hashes = {f.name: (f.sha256, f.size, f.mtime_ns) for f in result.files if f.sha256 and f.name in present}
        store.record_integrity(cid, result.level, result.ok, result.problems, duration_s=result.duration_s,
                               checked_at=result.checked_at, file_hashes=hashes or None)
    return CheckedCheckpoint(label, cid, result)


def verify(store, target: str, deep: bool = False, progress: Progress | None = None,
           on_result: Callable[[CheckedCheckpoint], None] | None = None,
           checkpoints: list[CheckpointFiles] | None = None) -> VerifyReport:
    """Scan `target`, check each of its checkpoints and record the results (see the module docstring).
    `checkpoints` (from `resolve_target`) skips resolving again when the caller already did."""
    t0 = time.perf_counter()
    root, found = resolve_target(store, target)
    if checkpoints is not None:
        found = checkpoints
    store.scan(root)
    index = _Index(store)
    results = []
    for ckpt in found:
        checked = check_and_record(store, ckpt, deep, progress, index)
        results.append(checked)
        if on_result is not None:
            on_result(checked)
    return VerifyReport(str(root), "deep" if deep else "quick", tuple(results), time.perf_counter() - t0)


# ---------------------------------------------------------------------- the resume planner, indexed


def known_results(store, run_ref) -> dict[int, IntegrityResult]:
    """step -> the latest stored deep result of each checkpoint, as an IntegrityResult whose file
    stats are those at hashing time (so `is_current()` tells whether it still applies)."""
    out = {}
    for rec in store.checkpoints(run_ref):
        latest = rec.latest_integrity
        if rec.missing or rec.step is None or latest is None or latest.mode != "deep":
            continue
        digests = tuple(recorded_digests(store.checkpoint_detail(rec.id)).values())
        if not digests:
            continue
        problems = tuple(Problem(p.code, p.message, p.blocks or "load", p.file) for p in latest.problems)
        out[rec.step] = IntegrityResult(rec.directory, rec.step, rec.layout, "deep", problems, digests,
                                        latest.checked_at.timestamp(), latest.duration_s)
    return out


def plan_indexed_resume(store, run_ref: str, target_steps: int | None = None, deep: bool = False,
                        record: bool = True) -> resume.ResumePlan:
    """`resume.plan_resume` for a run the registry knows (or a folder): stored deep results that still
    match the files are reused (also by a quick plan). With `record` (the CLI) the folder is scanned
    first and every check that runs is stored; `record=False` (a page rendering a plan) writes nothing."""
    p = Path(run_ref).expanduser()
    if p.exists():
        run_dir = resume.find_run_dir(p)
    elif looks_like_path(run_ref):
        raise ScanPathError(f"{p} does not exist")
    else:
        run = store.resolve_run(run_ref)
        if not Path(run.path).is_dir():
            raise ScanPathError(f"{run.label}'s folder {run.path} no longer exists (its history is kept in the registry)")
        run_dir = Path(run.path)
    if record:
        store.scan(run_dir)
    # stored deep results that still match the files count even for a quick plan: a CRC failure found
    # yesterday is not forgotten because today's check is the quick one
    try:
        known = known_results(store, str(run_dir.resolve()))
    except RunNotFoundError:
        known = {}  # a folder the registry has not indexed (record=False): nothing stored to reuse
    times = _recent_step_times(store, str(run_dir.resolve()))
    if not record:
        return resume.plan_resume(run_dir, target_steps=target_steps, deep=deep, known=known, step_times=times)
    index = _Index(store)
    return resume.plan_resume(run_dir, target_steps=target_steps, deep=deep, known=known, step_times=times,
                              check=lambda c, d: check_and_record(store, c, d, index=index).result)


def _recent_step_times(store, run_ref: str) -> list[tuple[int, int, float]] | None:
    """(step, segment, dt_ms) of the run's last few hundred steps in the registry (upstream's imported logs
    included), every point (no downsampling), for the planner's steady-state step time."""
    try:
        keys = {k.key: k for k in store.metric_keys(run_ref)}
    except RunNotFoundError:
        return None
    last = getattr(keys.get("dt_ms"), "last_step", None)
    if last is None:
        return None
    window = 4 * (resume.STEP_TIME_WINDOW + resume.WARMUP_STEPS)
    series = store.metric_history(run_ref, ["dt_ms"], max_points=10 * window, step_min=max(last - window, 0))
    points = [(p.step, p.segment, p.value) for s in series for p in s.points if p.value is not None]
    return sorted(points, key=lambda p: (p[1], p[0])) or None
