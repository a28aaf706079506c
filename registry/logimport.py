"""
Importing upstream nanochat's console output (what users keep with `tee`) into a run's metrics.

Recognised lines (anywhere in a line, so prefixes such as `[rank0]:` or timestamps are fine):
- training: `step 00001/00300 (0.33%) | loss: 7.624457 | lrm: 0.05 | dt: 48.55ms | tok/sec: 42,186 | ...`
  (older logs also carry `grad norm: 0.8389` and `mfu: 1.23`); fields map to the metrics.jsonl names
  loss -> train_loss, lrm -> lrm, dt -> dt_ms, tok/sec -> tok_per_sec, grad norm -> grad_norm, mfu -> mfu;
  other fields (epoch, total time, eta...) are ignored and listed in the report;
- evaluation: `Step 00050 | Validation bpb: 2.472756` -> val_bpb.
A line that starts like one of these but cannot be parsed (cut off, a value that is not a number) is
malformed: counted, the first few shown, never imported. Other lines are ordinary console output.

Points go in with the run's lock held and are deduplicated on (key, step, segment), so importing a log
twice, or a log that overlaps metrics.jsonl, adds nothing twice. Logs carry no wall time. The whole
file is imported in one transaction. This module knows nothing about scanning folders.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from registry.entities import ImportReport
from registry.errors import LogImportError
from registry.metrics import Point, ingest_points, metric_source

FIELD_MAP = {"loss": "train_loss", "lrm": "lrm", "dt": "dt_ms", "tok/sec": "tok_per_sec", "grad norm": "grad_norm",
             "mfu": "mfu"}
TRAIN_RE = re.compile(r"\bstep (\d+)/(\d+) \((\d+(?:\.\d+)?)%\)((?: \| [^|]*)*)\s*$")
EVAL_RE = re.compile(r"\bStep (\d+) \| Validation bpb: ([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s*$", re.I)
LOOKS_LIKE = re.compile(r"\bstep \d+/\d*|\bStep \d+ \| Validation", re.I)
NUMBER_RE = re.compile(r"^([-+]?(?:[\d,]*\.\d+|[\d,]+)(?:[eE][-+]?\d+)?|nan|inf)\s*(ms|s|%)?$", re.I)
MAX_EXAMPLES = 5


def _number(text: str) -> float:
    m = NUMBER_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text.strip()!r} is not a number")
    value = float(m.group(1).replace(",", ""))
    if m.group(2) == "s":
        value *= 1000.0  # a dt printed in seconds: we store milliseconds
    return value


def parse_log_line(line: str, segment: int = 1) -> tuple[str, list[Point], list[str]]:
    """("train" | "eval" | "other", points, ignored field names); ValueError when malformed."""
    if m := TRAIN_RE.search(line):
        step = int(m.group(1))
        points, ignored = [], []
        for part in m.group(4).split("|"):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition(":")
            name = name.strip()
            if not sep:
                raise ValueError(f"field {part!r} has no value")
            if name not in FIELD_MAP:
                ignored.append(name)
                continue
            v = _number(value)
            points.append((FIELD_MAP[name], step, segment, None if math.isnan(v) else v, None))
        if not points:
            raise ValueError("a step line without any known metric")
        return "train", points, ignored
    if m := EVAL_RE.search(line):
        v = float(m.group(2))
        return "eval", [("val_bpb", int(m.group(1)), segment, None if math.isnan(v) else v, None)], []
    if LOOKS_LIKE.search(line):
        raise ValueError("looks like a step line but does not parse (cut off?)")
    return "other", [], []


def import_log(store, path, run, segment: int = 1) -> ImportReport:
    """Parse an upstream console log and add its metrics to a run already in the registry."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LogImportError(f"{p} does not exist")
    if not p.is_file():
        raise LogImportError(f"{p} is not a file")
    if not isinstance(segment, int) or segment < 1:
        raise LogImportError(f"segment must be a positive integer, not {segment!r}")
    target = store.resolve_run(run)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogImportError(f"cannot read {p}: {e.strerror or e}") from None
    points: list[Point] = []
    counts = {"train": 0, "eval": 0, "other": 0}
    malformed, examples, ignored = 0, [], set()
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        try:
            kind, pts, ign = parse_log_line(line, segment)
        except ValueError as e:
            malformed += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append((i, f"{line.strip()[:160]}  <- {e}"))
            continue
        counts[kind] += 1
        points += pts
        ignored.update(ign)
    if counts["train"] + counts["eval"] + malformed == 0:
        raise LogImportError(f"{p} holds no nanochat training lines (expected lines like "
                             "'step 00001/00300 (0.33%) | loss: 7.62 | ...' or 'Step 00050 | Validation bpb: 2.47')")
    db = store.db

    def write(s):
        db.lock_run(s, target.id)
        src = metric_source(s, db, target.id, str(p.resolve()), "log")
        st = p.stat()
        src.size, src.mtime_ns, src.inode, src.offset = st.st_size, st.st_mtime_ns, st.st_ino, st.st_size
        src.lines, src.bad_lines, src.updated_at = counts["train"] + counts["eval"], malformed, time.time()
        return ingest_points(s, db, target.id, points)

    new, existing = db.write(write)
    return ImportReport(run_id=target.id, run_label=target.label, path=str(p), lines=len(lines), train_lines=counts["train"],
                        eval_lines=counts["eval"], points_new=new, points_existing=existing, malformed=malformed,
                        malformed_examples=tuple(examples), ignored_fields=tuple(sorted(ignored)))
