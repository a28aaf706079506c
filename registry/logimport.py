"""
Importing upstream nanochat's console output (what users keep with `tee`) and base_eval's CSVs: metric
series into a run's metrics, evaluations into `eval_results`.

Console lines (ANSI colour codes and a `[rankN]:` prefix are stripped; UPSTREAM_OUTPUTS.md §4):
- base_train step lines `step 00011/00300 (3.67%) | loss: 7.61 | lrm: 0.30 | dt: 47.10ms | tok/sec: 43,478 |
  bf16_mfu: 0.00 | ...` and chat_sft's `step 00001 (0.03%) | loss: ... | mfu: ...` (no `/total`; its step is
  the number of updates done, stored as the 0-based index of the update, like base_train's). Fields:
  loss -> `train_loss_ema` (upstream prints a debiased EMA, not the raw loss: it never goes into
  `train_loss`), lrm, dt -> dt_ms, tok/sec -> tok_per_sec, grad norm -> grad_norm, mfu and bf16_mfu -> mfu;
  other fields (epoch, pq, rg, total time, eta) are ignored and listed in the report;
- `Step 00050 | Validation bpb: 2.47` -> val_bpb (base_train and chat_sft);
- chat_rl: `Step 12/467 | Average reward: 0.31 | Average sequence length: 187.44` -> reward,
  sequence_length; `Step 60 | Pass@1: 0.1, Pass@2: ...` -> evaluations GSM8K pass@k;
- evaluations: base_train's and base_eval's `Evaluating: arc_easy (10-shot, ...)... accuracy: a | centered:
  c` (task accuracy and centered), `Step N | CORE metric: x` / `CORE metric: x` (CORE core), base_eval's
  `train bpb` / `val bpb` (task bpb); chat_sft's `  ARC-Easy: 50.72%` and `Step N | ChatCORE: x |
  ChatCORE_cat: y`; chat_eval's `Final: passed/total (pct%)`, `ARC-Easy accuracy: 50.72%`, `ChatCORE metric:
  x`. Accuracies are stored as fractions; `Final:` gives the number of examples.
A line that starts like a step line but does not parse is malformed: counted, the first few shown.

Which run: a log may hold several scripts' output (one `Distributed world size:` line starts each). A
training script's part belongs to the folder of its `Saved model parameters to:` lines, an evaluation's
to the `Loading model from DIR with step N` line (which also gives its step). With `run=` everything goes
to that run. The folder is matched to an indexed run by path, else by phase/tag when unambiguous; parts
that match nothing are reported, not guessed. A base_eval CSV (`<base>/base_eval/base_model_NNNNNN.csv`)
names no model tag: it goes to the one run under that base dir with a checkpoint at that step, and is
refused with the candidates when there are several or none.

Points are deduplicated on (key, step, segment) and evaluations on (run, source, step, task, metric), with
the run's lock held, so importing twice adds nothing twice. One file is one transaction. This module
knows nothing about scanning checkpoint folders.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path

import sqlalchemy as sa

from nanochat.bounds import MAX_STEP
from registry.entities import ImportReport, LogsImport
from registry.errors import LogImportError, RunNotFoundError
from registry.metrics import Point, ingest_points, metric_source
from registry.models import Checkpoint, EvalResult, Run

FIELD_MAP = {"loss": "train_loss_ema", "lrm": "lrm", "dt": "dt_ms", "tok/sec": "tok_per_sec",
             "grad norm": "grad_norm", "mfu": "mfu", "bf16_mfu": "mfu"}
NUM = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
TRAIN_RE = re.compile(r"\bstep (\d+)/(\d+) \((\d+(?:\.\d+)?)%\)((?: \| [^|]*)*)\s*$")
SFT_RE = re.compile(r"\bstep (\d+) \((\d+(?:\.\d+)?)%\)((?: \| [^|]*)*)\s*$")
EVAL_RE = re.compile(rf"\bStep (\d+) \| Validation bpb: ({NUM})\s*$", re.I)
CORE_STEP_RE = re.compile(rf"\bStep (\d+) \| CORE metric: ({NUM})\s*$")
CHATCORE_STEP_RE = re.compile(rf"\bStep (\d+) \| ChatCORE: ({NUM}) \| ChatCORE_cat: ({NUM})\s*$")
RL_EVAL_RE = re.compile(rf"\bStep (\d+) \| (Pass@\d+: (?:{NUM})(?:, Pass@\d+: (?:{NUM}))*)\s*$")
RL_STEP_RE = re.compile(rf"\bStep (\d+)/(\d+) \| Average reward: ({NUM}) \| Average sequence length: ({NUM})\s*$")
RL_PASS_RE = re.compile(r"\bStep \d+/\d+ \| Example step \d+ \| Pass \d+ \|")
CORE_TASK_RE = re.compile(rf"Evaluating: (\S+) \(\d+-shot, type: [^)]*\)\.\.\. accuracy: ({NUM}) \| centered: ({NUM})")
CORE_TOTAL_RE = re.compile(rf"^CORE metric: ({NUM})\s*$")
EVAL_HEADER_RE = re.compile(r"^Evaluating model: .*\(step (\d+)\)\s*$")
BPB_RE = re.compile(rf"^(train|val) bpb: ({NUM})\s*$")
FINAL_RE = re.compile(rf"^Final: (\d+)/(\d+) \((?:{NUM})%\)\s*$")
CHAT_ACC_RE = re.compile(rf"^([A-Za-z][\w-]*) accuracy: ({NUM})%\s*$")
SFT_TASK_RE = re.compile(rf"^  ([A-Za-z][\w-]*): ({NUM})%\s*$")
CHATCORE_RE = re.compile(rf"^ChatCORE metric: ({NUM})\s*$")
LOADING_RE = re.compile(r"Loading model from (.+?) with step (\d+)\s*$")
SAVED_RE = re.compile(r"Saved model parameters to: (.+)[/\\]model_(\d+)\.pt\s*$")
WORLD_RE = re.compile(r"Distributed world size: \d+")
LOOKS_LIKE = re.compile(r"\bstep \d+/\d*|\bstep \d+ \(|\bStep \d+ \| (?:Validation|CORE|ChatCORE)", re.I)
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RANK_PREFIX_RE = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
CSV_RE = re.compile(r"^base_model_(\d+)\.csv$")
TRAINING_SCRIPTS = ("base_train", "chat_sft", "chat_rl")
MAX_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class EvalRow:
    step: int
    task: str
    metric: str
    value: float | None
    n_examples: int | None
    script: str


def _number(text: str) -> float:
    m = re.match(rf"^({NUM})\s*(ms|s|%)?$", text.strip(), re.I)
    if not m:
        raise ValueError(f"{text.strip()!r} is not a number")
    value = float(m.group(1).replace(",", ""))
    if m.group(2) == "s":
        value *= 1000.0  # a dt printed in seconds: we store milliseconds
    return value


def _value(text: str) -> float | None:
    v = _number(text)
    return None if math.isnan(v) else v


def _fields(text: str, step: int, segment: int) -> tuple[list[Point], list[str]]:
    points, ignored = [], []
    for part in text.split("|"):
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
        points.append((FIELD_MAP[name], step, segment, _value(value), None))
    if not points:
        raise ValueError("a step line without any known metric")
    return points, ignored


def clean(line: str) -> str:
    """A console line as printed: colour codes and torchrun's `[rankN]:` prefix removed."""
    return RANK_PREFIX_RE.sub("", ANSI_RE.sub("", line)).rstrip("\n")


def _step(text: str) -> int:
    step = int(text)
    if step > MAX_STEP:  # steps are 32-bit columns: a longer number is a malformed line, not an SQL error
        raise ValueError(f"step {text} is out of range (at most {MAX_STEP})")
    return step


def parse_log_line(line: str, segment: int = 1) -> tuple[str, list[Point], list[str]]:
    """The metric series of one line: ("train" | "eval" | "rl" | "other", points, ignored field names);
    ValueError when it looks like a step line but is malformed. Evaluation lines need context: LogParser."""
    line = clean(line)
    if m := TRAIN_RE.search(line):
        return ("train", *_fields(m.group(4), _step(m.group(1)), segment))
    if m := SFT_RE.search(line):
        updates = _step(m.group(1))
        return ("train", *_fields(m.group(3), max(0, updates - 1), segment))
    if m := EVAL_RE.search(line):
        return "eval", [("val_bpb", _step(m.group(1)), segment, _value(m.group(2)), None)], []
    if m := RL_STEP_RE.search(line):
        step = _step(m.group(1))
        return "rl", [("reward", step, segment, _value(m.group(3)), None),
                      ("sequence_length", step, segment, _value(m.group(4)), None)], []
    if RL_PASS_RE.search(line) or CORE_STEP_RE.search(line) or CHATCORE_STEP_RE.search(line) \
            or RL_EVAL_RE.search(line):
        return "other", [], []
    if LOOKS_LIKE.search(line):
        raise ValueError("looks like a step line but does not parse (cut off?)")
    return "other", [], []


@dataclasses.dataclass
class Section:
    """One script's output inside a log."""
    first_line: int
    script: str | None = None
    saved_dirs: list[str] = dataclasses.field(default_factory=list)
    loaded: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    points: list[Point] = dataclasses.field(default_factory=list)
    evals: list[EvalRow] = dataclasses.field(default_factory=list)
    eval_step: int | None = None
    pending: list[tuple[str, str, float | None, int | None]] = dataclasses.field(default_factory=list)
    last_total: int | None = None


class LogParser:
    """Feeds lines; collects per script section the metric points, evaluations and run folders."""

    def __init__(self, segment: int = 1):
        self.segment = segment
        self.sections = [Section(1)]
        self.counts = {"train": 0, "eval": 0, "rl": 0, "other": 0, "evaluation": 0}
        self.malformed, self.examples, self.ignored = 0, [], set()

    @property
    def current(self) -> Section:
        return self.sections[-1]

    def _claim(self, script: str) -> Section:
        sec = self.current
        if sec.script is None:
            sec.script = script
        return sec

    def feed(self, number: int, raw: str) -> None:
        for piece in raw.split("\r"):  # chat_eval's in-place progress lines
            self._line(number, clean(piece))

    def _line(self, number: int, line: str) -> None:
        sec = self.current
        if WORLD_RE.search(line):
            if sec.script is not None or sec.points or sec.evals or sec.saved_dirs or sec.loaded:
                self.sections.append(Section(number))
            return
        if m := LOADING_RE.search(line):
            if sec.script == "base_train":
                sec = Section(number)
                self.sections.append(sec)
            sec.loaded.append((m.group(1).strip(), int(m.group(2))))
            sec.eval_step = int(m.group(2)) if sec.eval_step is None else sec.eval_step
            return
        if m := SAVED_RE.search(line):
            d = m.group(1).strip()
            if d not in sec.saved_dirs:
                sec.saved_dirs.append(d)
            return
        if self._evaluation(line, sec):
            self.counts["evaluation"] += 1
            return
        try:
            kind, points, ignored = parse_log_line(line, self.segment)
        except ValueError as e:
            self.malformed += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append((number, f"{line.strip()[:160]}  <- {e}"))
            return
        self.counts[kind] += 1
        if kind == "train":
            self._claim("base_train" if TRAIN_RE.search(line) else "chat_sft")
        elif kind == "rl":
            self._claim("chat_rl")
        sec.points += points
        self.ignored.update(ignored)

    def _evaluation(self, line: str, sec: Section) -> bool:
        """Evaluation lines; True when the line was one."""
        def add(step, task, metric, value, n=None, script=None):
            sec.evals.append(EvalRow(step, task, metric, value, n, script or sec.script or "unknown"))

        if m := CORE_TASK_RE.search(line):
            sec.pending += [(m.group(1), "accuracy", _value(m.group(2)), None),
                            (m.group(1), "centered", _value(m.group(3)), None)]
        elif m := CORE_STEP_RE.search(line):
            self._claim("base_train")
            self._flush(sec, int(m.group(1)))
            add(int(m.group(1)), "CORE", "core", _value(m.group(2)))
        elif m := EVAL_HEADER_RE.search(line):
            self._claim("base_eval")
            sec.eval_step = int(m.group(1))
        elif m := CORE_TOTAL_RE.search(line):
            self._claim("base_eval")
            if sec.eval_step is not None:
                self._flush(sec, sec.eval_step)
                add(sec.eval_step, "CORE", "core", _value(m.group(1)))
        elif (m := BPB_RE.search(line)) and sec.eval_step is not None:
            self._claim("base_eval")
            add(sec.eval_step, "bpb", f"{m.group(1)}_bpb", _value(m.group(2)))
        elif m := FINAL_RE.search(line):
            sec.last_total = int(m.group(2))
        elif m := SFT_TASK_RE.search(line):
            sec.pending.append((m.group(1), "accuracy", _pct(m.group(2)), sec.last_total))
            sec.last_total = None
        elif m := CHATCORE_STEP_RE.search(line):
            self._claim("chat_sft")
            step = int(m.group(1))
            self._flush(sec, step)
            add(step, "ChatCORE", "chatcore", _value(m.group(2)))
            add(step, "ChatCORE", "chatcore_cat", _value(m.group(3)))
        elif m := CHAT_ACC_RE.search(line):
            self._claim("chat_eval")
            if sec.eval_step is not None:
                add(sec.eval_step, m.group(1), "accuracy", _pct(m.group(2)), sec.last_total)
            sec.last_total = None
        elif m := CHATCORE_RE.search(line):
            self._claim("chat_eval")
            if sec.eval_step is not None:
                add(sec.eval_step, "ChatCORE", "chatcore", _value(m.group(1)))
        elif m := RL_EVAL_RE.search(line):
            self._claim("chat_rl")
            for part in m.group(2).split(", "):
                k, _, v = part.partition(": ")
                add(int(m.group(1)), "GSM8K", k.lower(), _value(v))
        else:
            return False
        return True

    def _flush(self, sec: Section, step: int) -> None:
        for task, metric, value, n in sec.pending:
            sec.evals.append(EvalRow(step, task, metric, value, n, sec.script or "unknown"))
        sec.pending = []

    def finish(self) -> list[Section]:
        for sec in self.sections:
            if sec.pending and sec.eval_step is not None:
                self._flush(sec, sec.eval_step)
        return [s for s in self.sections if s.points or s.evals]


def _pct(text: str) -> float | None:
    v = _value(text)
    return None if v is None else v / 100.0


# ---------------------------------------------------------------------- import


def _run_for_folder(store, folder: str):
    """The indexed run of a folder a log names: by path, else by phase/tag (the log may come from another
    machine). RunNotFoundError (AmbiguousRunError included) when there is none or several."""
    from nanochat.checkpoint_manager import phase_and_tag

    try:
        return store.resolve_run(folder)
    except RunNotFoundError:
        pass
    phase, tag = phase_and_tag(folder)
    return store.resolve_run(f"{phase}/{tag}")


def _section_target(store, sec: Section) -> tuple[object | None, str | None]:
    """(run, None) or (None, why not)."""
    if sec.script in TRAINING_SCRIPTS or (sec.saved_dirs and not sec.loaded):
        folders, what = sec.saved_dirs, "'Saved model parameters to:'"
    else:
        folders, what = list(dict.fromkeys(d for d, _ in sec.loaded)), "'Loading model from'"
    if not folders:
        return None, f"no {what} line says which run it is"
    if len(folders) > 1:
        return None, f"it names several run folders ({', '.join(folders)})"
    try:
        return _run_for_folder(store, folders[0]), None
    except RunNotFoundError as e:
        return None, f"{folders[0]}: {e}"


def import_log(store, path, run=None, segment: int = 1) -> ImportReport:
    """Parse an upstream console log (or a base_eval CSV) into the registry; `run` (id, tag, phase/tag or
    folder) says whose it is, else the file does (module docstring)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LogImportError(f"{p} does not exist")
    if not p.is_file():
        raise LogImportError(f"{p} is not a file")
    if not isinstance(segment, int) or not 1 <= segment <= MAX_STEP:
        raise LogImportError(f"segment must be a positive integer up to {MAX_STEP}, not {segment!r}")
    target = store.resolve_run(run) if run is not None else None
    if CSV_RE.match(p.name):
        return _import_csv(store, p, target)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogImportError(f"cannot read {p}: {e.strerror or e}") from None
    parser = LogParser(segment)
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        parser.feed(i, line)
    sections = parser.finish()
    c = parser.counts
    if c["train"] + c["eval"] + c["rl"] + c["evaluation"] + parser.malformed == 0:
        raise LogImportError(f"{p} holds no nanochat training or evaluation lines (expected lines like "
                             "'step 00001/00300 (0.33%) | loss: 7.62 | ...', 'Step 00050 | Validation bpb: 2.47' or "
                             "'CORE metric: 0.12')")
    by_run: dict[int, tuple[object, list[Point], list[EvalRow]]] = {}
    unmatched = []
    for sec in sections:
        r, why = (target, None) if target is not None else _section_target(store, sec)
        if r is None:
            unmatched.append(f"lines {sec.first_line}+ ({sec.script or 'unknown script'}): {why}")
            continue
        entry = by_run.setdefault(r.id, (r, [], []))
        entry[1].extend(sec.points)
        entry[2].extend(sec.evals)
    if not by_run:
        if target is None and sections:
            raise LogImportError(f"cannot tell which run {p.name} belongs to ({unmatched[0]}): give it with --run RUN")
        raise LogImportError(f"{p} holds no metric or evaluation this registry can store")
    new, existing, evals_new, evals_updated = _write(store, p, by_run, parser)
    first = next(iter(by_run.values()))[0]
    return ImportReport(run_id=first.id, run_label=first.label, path=str(p), lines=len(lines),
                        train_lines=c["train"] + c["rl"], eval_lines=c["eval"] + c["evaluation"], points_new=new,
                        points_existing=existing, malformed=parser.malformed,
                        malformed_examples=tuple(parser.examples), ignored_fields=tuple(sorted(parser.ignored)),
                        evals_new=evals_new, evals_updated=evals_updated,
                        runs=tuple(r.label for r, _, _ in by_run.values()), unmatched=tuple(unmatched))


def _write(store, p: Path, by_run: dict, parser: LogParser | None) -> tuple[int, int, int, int]:
    db = store.db
    source = str(p.resolve())

    def write(s):
        db.lock_runs(s, list(by_run))
        new = existing = evals_new = evals_updated = 0
        st = p.stat()
        for run_id, (_, points, evals) in by_run.items():
            if points:
                src = metric_source(s, db, run_id, source, "log")
                src.size, src.mtime_ns, src.inode, src.offset = st.st_size, st.st_mtime_ns, st.st_ino, st.st_size
                if parser is not None:
                    src.lines = parser.counts["train"] + parser.counts["eval"] + parser.counts["rl"]
                    src.bad_lines = parser.malformed
                src.updated_at = time.time()
                n, e = ingest_points(s, db, run_id, points)
                new, existing = new + n, existing + e
            n, u = _store_evals(s, run_id, source, evals)
            evals_new, evals_updated = evals_new + n, evals_updated + u
        return new, existing, evals_new, evals_updated

    return db.write(write)


def _store_evals(s, run_id: int, source: str, evals: list[EvalRow]) -> tuple[int, int]:
    """Insert or refresh (same run, source, step, task, metric); the last occurrence in a file wins."""
    wanted = {(e.step, e.task[:100], e.metric[:64]): e for e in evals}
    if not wanted:
        return 0, 0
    have = {(r.step, r.task, r.metric): r for r in s.scalars(sa.select(EvalResult).where(
        EvalResult.run_id == run_id, EvalResult.source == source))}
    now, new, updated = time.time(), 0, 0
    for key, e in wanted.items():
        row = have.get(key)
        if row is None:
            s.add(EvalResult(run_id=run_id, step=e.step, task=key[1], metric=key[2], value=e.value,
                             n_examples=e.n_examples, script=e.script, source=source, recorded_at=now))
            new += 1
        else:
            row.value, row.n_examples, row.script, row.recorded_at = e.value, e.n_examples, e.script, now
            updated += 1
    return new, updated


def parse_base_eval_csv(text: str, step: int) -> list[EvalRow]:
    """`Task , Accuracy , Centered` rows (fixed-width padded); the CORE row has no accuracy."""
    rows = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or [c.strip() for c in lines[0].split(",")] != ["Task", "Accuracy", "Centered"]:
        raise ValueError("the first line is not 'Task, Accuracy, Centered'")
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.split(",")]
        if len(cells) != 3 or not cells[0]:
            raise ValueError(f"row {ln.strip()[:80]!r} does not have 3 cells")
        task, acc, centered = cells
        if task == "CORE":
            rows.append(EvalRow(step, "CORE", "core", _value(centered), None, "base_eval"))
            continue
        if acc:
            rows.append(EvalRow(step, task, "accuracy", _value(acc), None, "base_eval"))
        if centered:
            rows.append(EvalRow(step, task, "centered", _value(centered), None, "base_eval"))
    return rows


def _import_csv(store, p: Path, target) -> ImportReport:
    step = int(CSV_RE.match(p.name).group(1))
    try:
        rows = parse_base_eval_csv(p.read_text(encoding="utf-8", errors="replace"), step)
    except OSError as e:
        raise LogImportError(f"cannot read {p}: {e.strerror or e}") from None
    except ValueError as e:
        raise LogImportError(f"{p} is not a base_eval CSV: {e}") from None
    if target is None:
        target = _csv_run(store, p, step)
    _, _, evals_new, evals_updated = _write(store, p, {target.id: (target, [], rows)}, None)
    return ImportReport(run_id=target.id, run_label=target.label, path=str(p), lines=len(rows), train_lines=0,
                        eval_lines=len(rows), points_new=0, points_existing=0, malformed=0, malformed_examples=(),
                        ignored_fields=(), evals_new=evals_new, evals_updated=evals_updated, runs=(target.label,))


def _csv_run(store, p: Path, step: int):
    """The one base run under the CSV's base dir with a checkpoint at `step` (the file names no tag)."""
    base = p.resolve().parent.parent
    prefix = str(base / "base_checkpoints") + os.sep
    with store.db.session() as s:
        rows = s.execute(sa.select(Run.id, Run.tag).join(Checkpoint, Checkpoint.run_id == Run.id).where(
            Run.path.startswith(prefix, autoescape=True), Checkpoint.step == step).distinct()).all()
    if len(rows) != 1:
        found = ", ".join(sorted(f"base/{t}" for _, t in rows)) or "none is indexed"
        raise LogImportError(f"{p.name} names no model tag, and {len(rows)} runs under {base} have a step-{step} "
                             f"checkpoint ({found}): import it with --run RUN")
    return store.get_run(rows[0].id)


def find_logs(folder: Path, max_depth: int = 6) -> list[Path]:
    """`*.log` files and base_eval CSVs (`base_eval/base_model_NNNNNN.csv`) up to max_depth folders down."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        depth = len(Path(dirpath).relative_to(folder).parts)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.endswith(".log") or (Path(dirpath).name == "base_eval" and CSV_RE.match(name)):
                found.append(Path(dirpath) / name)
    return sorted(found)


def import_logs(store, path, progress=None) -> LogsImport:
    """Import one log or CSV, or every one found under a folder (find_logs), each run found from the file
    itself. Files that cannot be imported are reported, not raised: the others still go in."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LogImportError(f"{p} does not exist")
    files = [p] if p.is_file() else find_logs(p)
    reports, failures = [], []
    for i, f in enumerate(files):
        if progress:
            progress(i, len(files), f.name)
        try:
            reports.append(import_log(store, f))
        except (LogImportError, RunNotFoundError) as e:
            failures.append((str(f), str(e)))
    if p.is_file() and failures:
        raise LogImportError(failures[0][1])
    return LogsImport(str(p), tuple(reports), tuple(failures))
