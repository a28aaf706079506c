"""
`python -m registry`: the command-line face of the run registry.

The CLI parses, calls the store (or the scanner / log importer), and prints either a table or, with
`--json`, the same data as JSON (shapes documented in the README's registry section). Every
`RegistryError` or `CheckpointError` becomes `error: <one line>` on stderr and exit code 1; usage
errors exit 2 (argparse); Ctrl-C exits 130. Global options `--db URL|PATH` and `--json` go before or
after the subcommand.

Adding a subcommand: write `def cmd_x(args, ctx) -> Output` and decorate it with
`@command("x", help=..., args=[arg("NAME", help=...), ...])`; the parser, `--help` and the README test
(tests/test_registry_cli.py) pick it up from COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from nanochat.checkpoint_manager import CheckpointError
from registry.entities import CHECKPOINT_STATES, to_jsonable
from registry.errors import RegistryError

PROG = "python -m registry"


@dataclass
class Output:
    data: object  # what --json prints (dataclasses become objects)
    text: str  # what the table mode prints
    warnings: list[str] = field(default_factory=list)
    exit_code: int = 0
    streamed: bool = False  # the command printed its output as it went (scan --watch)


@dataclass
class Command:
    name: str
    help: str
    description: str
    args: list[tuple[tuple, dict]]
    run: Callable[[argparse.Namespace, Context], Output]
    opens_store: str = "existing"  # "read" (must exist; opened read-only), "existing" (must exist), "create", or "none"


COMMANDS: dict[str, Command] = {}


def arg(*names, **kwargs) -> tuple[tuple, dict]:
    return names, kwargs


def command(name: str, help: str, args: list | None = None, description: str | None = None, opens_store: str = "existing"):
    def register(fn):
        COMMANDS[name] = Command(name, help, description or fn.__doc__ or help, args or [], fn, opens_store)
        return fn
    return register


class Context:
    """Lazily opened store for the command being run."""

    def __init__(self, args: argparse.Namespace, opens_store: str):
        self.args, self.opens_store, self._store = args, opens_store, None

    def store(self):
        if self._store is None:
            from registry.store import open_store

            self._store = open_store(self.args.db, create=self.opens_store == "create", read_only=self.opens_store == "read",
                                     origin=self.args.origin)
        return self._store

    def close(self):
        if self._store is not None:
            self._store.close()


# ---------------------------------------------------------------------- formatting


def table(headers: list[str], rows: list[list], empty: str = "(none)") -> str:
    if not rows:
        return empty
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def fmt_num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_count(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_time(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M") if t else "-"


# ---------------------------------------------------------------------- commands


def _scan_text(report) -> list[str]:
    return [f"scanned {report.root}{f' (origin {report.origin})' if report.origin else ''} in {report.duration_s or 0:.2f}s",
            f"  runs: {report.runs_found} found, {report.runs_new} new, {report.runs_missing} gone",
            f"  checkpoints: {report.checkpoints_seen} found, {report.checkpoints_new} new, {report.checkpoints_changed} changed, "
            f"{report.checkpoints_unchanged} unchanged, {report.checkpoints_missing} gone",
            f"  metrics lines: {report.metric_lines} ingested, {report.metric_bad_lines} malformed"]


@command("scan", "index the runs under a folder (a nanochat base dir, a run dir, any folder)", opens_store="create", args=[
    arg("path", metavar="PATH", help="folder to scan; runs are found up to 6 levels deep"),
    arg("--no-progress", action="store_true", help="do not show the progress bar (stderr)"),
    arg("--watch", action="store_true", help="keep indexing PATH (new checkpoints, metrics lines) until Ctrl-C or "
        "SIGTERM; a pass over an unchanged tree costs a stat per file and writes nothing"),
    arg("--interval", type=float, default=10.0, metavar="SECONDS", help="with --watch: seconds between passes (default 10)"),
])
def cmd_scan(args, ctx) -> Output:
    """Walk PATH, index every run's checkpoints (metadata only, never torch.load) and ingest metrics.jsonl.
    Re-scans are incremental: unchanged files cost one stat. Vanished files are marked missing, for runs
    of this origin only (--origin, default the host name): other machines' runs at the same paths are
    left alone. --watch keeps going until stopped and prints each pass that found changes."""
    from tqdm import tqdm

    from registry.scanner import scan_path

    if args.watch:
        return _watch(args, ctx)
    if args.interval != 10.0:
        raise RegistryError("--interval goes with --watch")
    with tqdm(total=0, unit="ckpt", file=sys.stderr, disable=True if args.no_progress else None, leave=False) as bar:
        def progress(done, total, message):
            bar.total, bar.n = total, done
            bar.set_description(message[:48], refresh=False)
            bar.refresh()

        report = scan_path(ctx.store(), args.path, progress)
    text = _scan_text(report)
    if report.problems:
        text.append(f"  problems ({len(report.problems)}):")
        text += [f"    {p.code}: {p.message}" for p in report.problems[:50]]
        if len(report.problems) > 50:
            text.append(f"    ... {len(report.problems) - 50} more (use --json)")
    return Output(report, "\n".join(text))


def _watch(args, ctx) -> Output:
    """scan --watch: one pass now, then every --interval seconds; the first SIGINT/SIGTERM stops after the
    pass in progress (exit 0), a second Ctrl-C interrupts it (exit 130; finished batches are kept)."""
    import signal
    import threading

    from registry.scanner import watch

    if not args.interval > 0:
        raise RegistryError("--interval must be a positive number of seconds")
    store, stop = ctx.store(), threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    def on_scan(report) -> None:
        if report is None:
            line = {"root": args.path, "status": "empty"} if args.json else f"no checkpoints under {args.path} yet"
        else:
            line = to_jsonable(report) if args.json else "\n".join(_scan_text(report))
        print(json.dumps(line) if args.json else f"[{datetime.now():%H:%M:%S}] {line}", flush=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"watching {args.path} every {args.interval:g}s as origin {store.origin} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        scans = watch(store, args.path, args.interval, on_scan,
                      on_error=lambda e: print(f"warning: {str(e).splitlines()[0]} (trying again)", file=sys.stderr, flush=True),
                      should_stop=stop.is_set, wait=stop.wait)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"stopped watching {args.path} after {scans} scan(s)", file=sys.stderr)
    return Output(None, "", streamed=True)


@command("import-log", "import upstream's console logs and base_eval CSVs (metrics and evaluations) into runs", args=[
    arg("file", metavar="FILE|DIR", help="a log (what `tee` saved from base_train, chat_sft, chat_rl, base_eval, "
        "chat_eval, or all of them), a base_eval/base_model_NNNNNN.csv, or a folder: every *.log and base_eval CSV in it"),
    arg("--run", metavar="RUN", help="the run it belongs to: id, tag, phase/tag or folder path (default: the file says, "
        "from its 'Saved model parameters to' / 'Loading model from' lines; a CSV: the one run with that step)"),
    arg("--segment", type=int, default=1, metavar="N", help="resume segment these lines belong to (default 1)"),
])
def cmd_import_log(args, ctx) -> Output:
    """Step lines (base_train's `step N/T`, chat_sft's `step N (p%)`, chat_rl's rewards) into train_loss_ema
    (upstream prints a debiased EMA), lrm, dt_ms, tok_per_sec, grad_norm, mfu, reward, sequence_length;
    `Validation bpb` into val_bpb; CORE, ChatCORE, per-task accuracies, bpb and pass@k into evaluation
    results. Points and evaluations already present are not added twice; malformed lines are counted and shown."""
    from pathlib import Path

    from registry.logimport import import_log, import_logs

    if Path(args.file).expanduser().is_dir():
        if args.run is not None:
            raise RegistryError("--run goes with one file, not a folder (each file in a folder says its own run)")
        done = import_logs(ctx.store(), args.file)
        reports, failures = list(done.reports), list(done.failures)
    else:
        reports, failures = [import_log(ctx.store(), args.file, args.run, segment=args.segment)], []
    text, warnings = [], []
    for r in reports:
        text += [f"imported {r.path} into {', '.join(r.runs) or r.run_label}",
                 f"  lines: {r.lines} ({r.train_lines} step lines, {r.eval_lines} evaluation lines, {r.malformed} malformed)",
                 f"  points: {r.points_new} new, {r.points_existing} already present; "
                 f"evaluations: {r.evals_new} new, {r.evals_updated} already present"]
        if r.ignored_fields:
            text.append(f"  ignored fields: {', '.join(r.ignored_fields)}")
        text += [f"  malformed line {n}: {t}" for n, t in r.malformed_examples]
        text += [f"  not imported: {u}" for u in r.unmatched]
        if r.malformed:
            warnings.append(f"{r.malformed} malformed line(s) in {r.path} were skipped")
        warnings += [f"{r.path}: not imported: {u}" for u in r.unmatched]
    text += [f"not imported {f}: {why}" for f, why in failures]
    warnings += [f"{f}: {why}" for f, why in failures]
    if not reports and not failures:
        text.append(f"no *.log or base_eval CSV under {args.file}")
    data = reports[0] if len(reports) == 1 and not failures and not Path(args.file).expanduser().is_dir() else \
        {"reports": reports, "failures": [{"path": f, "error": why} for f, why in failures]}
    return Output(data, "\n".join(text), warnings)


def _where(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RegistryError(f"--where needs KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@command("runs", "list runs: status, progress, best and last val_bpb", opens_store="read", args=[
    arg("--where", action="append", metavar="KEY=VALUE",
        help="only runs whose field or config value matches, e.g. depth=20, phase=sft, status=training, "
             "user_config.device_batch_size=8 (repeatable: all must match)"),
])
def cmd_runs(args, ctx) -> Output:
    """Every indexed run, most recently updated first."""
    runs = ctx.store().list_runs(where=_where(args.where))
    rows = [[r.id, r.label, r.status, r.depth, fmt_count(r.n_params),
             f"{fmt_num(r.latest_step)}/{fmt_num(r.num_iterations)}",
             f"{fmt_num(r.best_val_bpb)}@{fmt_num(r.best_val_bpb_step)}" if r.best_val_bpb is not None else "-",
             fmt_num(r.last_val_bpb), f"{r.complete_checkpoint_count}/{r.checkpoint_count}",
             r.token_bytes.label if r.token_bytes else "-", fmt_time(r.last_update), r.origin or "-", r.path]
            for r in runs]
    return Output(runs, table(["id", "run", "status", "depth", "params", "step/target", "best_bpb@step", "last_bpb",
                               "ckpts ok/all", "token_bytes", "updated", "origin", "path"], rows,
                              "no runs (scan a folder: python -m registry scan PATH)"))


@command("checkpoints", "list a run's checkpoints with completeness and problems", opens_store="read", args=[
    arg("run", metavar="RUN", help="id, tag, phase/tag or folder path"),
    arg("--present", action="store_true", help="hide checkpoints whose files are gone"),
])
def cmd_checkpoints(args, ctx) -> Output:
    """The checkpoint history of one run, oldest step first."""
    ckpts = ctx.store().checkpoints(args.run, include_missing=not args.present)
    rows = []
    for c in ckpts:
        rows.append([c.id, fmt_num(c.step) if c.step is not None else "?", c.segment, fmt_num(c.val_bpb),
                     CHECKPOINT_STATES[c.state],
                     c.layout, fmt_bytes(c.size_bytes), fmt_time(c.mtime),
                     "; ".join(f"{p.code}: {p.message}" for p in c.problems) or "-"])
    return Output(ckpts, table(["id", "step", "segment", "val_bpb", "state", "layout", "size", "modified", "problems"], rows))


@command("show", "one checkpoint in detail: meta, files, hashes, integrity history", opens_store="read", args=[
    arg("checkpoint", metavar="CHECKPOINT", help="RUN@STEP (STEP may be `latest` or `best`) or a checkpoint file path"),
])
def cmd_show(args, ctx) -> Output:
    """Everything the registry knows about one checkpoint."""
    d = ctx.store().checkpoint_detail(args.checkpoint)
    c = d.checkpoint
    text = [f"{c.label} (id {c.id}) in {c.directory}",
            f"  step {c.step}, segment {c.segment}, val_bpb {fmt_num(c.val_bpb)}, layout {c.layout}, "
            f"{CHECKPOINT_STATES[c.state]}{'' if c.resumable or c.missing else ', not resumable'}"
            f"{f': {c.resume_note}' if c.resume_note and not c.missing else ''}"]
    text += [f"  problem {p.code}: {p.message}" for p in c.problems]
    text += ["", table(["file", "kind", "rank", "size", "modified", "sha256", "state"],
                       [[f.name, f.kind, f.rank, fmt_bytes(f.size), fmt_time(f.mtime), (f.sha256 or "-")[:16],
                         "missing" if f.missing else "present"] for f in d.files])]
    if d.integrity:
        text += ["", table(["checked", "mode", "ok", "seconds", "problems"],
                           [[fmt_time(i.checked_at), i.mode, i.ok, f"{i.duration_s:.2f}",
                             ", ".join(p.code for p in i.problems) or "-"] for i in d.integrity])]
    text += ["", "meta:", json.dumps(d.meta, indent=2, sort_keys=True) if d.meta is not None else "(unreadable)"]
    return Output(d, "\n".join(text))


@command("history", "metric history of a run, downsampled on the server", opens_store="read", args=[
    arg("run", metavar="RUN", help="id, tag, phase/tag or folder path"),
    arg("--key", action="append", metavar="K", help="metric to show, e.g. val_bpb or train_loss (repeatable; default: all)"),
    arg("--max-points", type=int, default=100, metavar="N",
        help="at most N points per series; minima and maxima are kept (default 100)"),
    arg("--from", dest="step_min", type=int, metavar="STEP", help="first step to include"),
    arg("--to", dest="step_max", type=int, metavar="STEP", help="last step to include"),
    arg("--evals", action="store_true", help="the run's evaluation results instead (CORE, ChatCORE, per-task "
        "accuracies, bpb, pass@k: task, metric, value, examples, step, source)"),
])
def cmd_history(args, ctx) -> Output:
    """Points of each metric series (step, value, resume segment, wall time); with --evals, evaluation results."""
    if args.evals:
        found = [e for e in ctx.store().eval_results(args.run)
                 if (args.step_min is None or e.step >= args.step_min) and (args.step_max is None or e.step <= args.step_max)]
        rows = [[e.step, e.key, fmt_num(e.value, 6), fmt_num(e.n_examples), e.script, e.source] for e in found]
        return Output(found, table(["step", "evaluation", "value", "examples", "script", "source"], rows,
                                   "no evaluations for this run (import upstream's logs: python -m registry import-log)"))
    if args.max_points < 1:
        raise RegistryError("--max-points must be at least 1")
    series = ctx.store().metric_history(args.run, args.key, max_points=args.max_points, step_min=args.step_min,
                                        step_max=args.step_max)
    rows = [[s.key, p.segment, p.step, fmt_num(p.value, 6),
             datetime.fromtimestamp(p.wall_time).strftime("%Y-%m-%d %H:%M:%S") if p.wall_time else "-"]
            for s in series for p in s.points]
    notes = [f"{s.key}: {len(s.points)} of {s.total_points} points{' (downsampled)' if s.downsampled else ''}" for s in series]
    return Output(series, table(["key", "segment", "step", "value", "wall_time"], rows, "no metrics for this run")
                  + ("\n\n" + "\n".join(notes) if notes else ""))


@command("best", "the best complete checkpoint of a run by a metric", opens_store="read", args=[
    arg("run", metavar="RUN", help="id, tag, phase/tag or folder path"),
    arg("--metric", default="val_bpb", help="metric to rank by (default val_bpb): a metric series, or an evaluation "
        "TASK:METRIC such as CORE:core, ChatCORE:chatcore or ARC-Easy:accuracy (history RUN --evals lists them)"),
    arg("--max", action="store_true", help="higher is better (default: lower is better)"),
])
def cmd_best(args, ctx) -> Output:
    """Among complete checkpoints on disk, the one with the lowest (or, with --max, highest) metric value."""
    b = ctx.store().best_checkpoint(args.run, args.metric, "max" if args.max else "min")
    c = b.checkpoint
    return Output(b, f"{c.label} (id {c.id}): {b.metric} = {fmt_num(b.value, 6)} "
                     f"({CHECKPOINT_STATES[c.state]}) in {c.directory}")


@command("diff", "compare the configs of two runs or two checkpoints", opens_store="read", args=[
    arg("a", metavar="A", help="RUN, or RUN@STEP for a checkpoint's whole meta"),
    arg("b", metavar="B", help="RUN, or RUN@STEP"),
    arg("--all", action="store_true", help="also list keys whose values are equal"),
])
def cmd_diff(args, ctx) -> Output:
    """Flattened configs (model_config.*, user_config.*, ...) side by side; differences only unless --all."""
    from registry.entities import ConfigDiff

    d = ctx.store().diff(args.a, args.b)
    shown = ConfigDiff(d.a, d.b, d.rows if args.all else d.changed)
    show = lambda v: v if isinstance(v, str) else json.dumps(v)
    rows = [[r.key, show(r.a) if r.status != "only_b" else "(absent)", show(r.b) if r.status != "only_a" else "(absent)",
             r.status] for r in shown.rows]
    return Output(shown, table(["key", d.a, d.b, "status"], rows, f"no differences between {d.a} and {d.b}"))


@command("summary", "counts: runs by status, checkpoints, metric points, last scan", opens_store="read")
def cmd_summary(args, ctx) -> Output:
    """What the registry holds."""
    s = ctx.store().summary()
    text = [f"registry {s.url} (schema {s.schema_version}{f', read-only: {s.read_only}' if s.read_only else ''})",
            f"  roots scanned: {s.roots}",
            f"  runs: {s.runs} ({', '.join(f'{k} {v}' for k, v in sorted(s.runs_by_status.items())) or 'none'})",
            f"  checkpoints: {s.checkpoints} on disk ({s.complete_checkpoints} complete, {s.incomplete_checkpoints} incomplete), "
            f"{s.missing_checkpoints} gone",
            f"  metrics: {s.metric_points} points in {s.metric_series} series",
            f"  integrity results: {s.integrity_results}"]
    if s.last_scan:
        text.append(f"  last scan: {s.last_scan.root} at {fmt_time(s.last_scan.started_at)} ({s.last_scan.status})")
    return Output(s, "\n".join(text))


@command("migrate", "upgrade an older registry database to this code's schema", opens_store="none")
def cmd_migrate(args, ctx) -> Output:
    """Apply the schema migrations in one transaction (SQLite: after a backup copy beside the file)."""
    from registry.db import Database

    db = Database(args.db, create=False)
    try:
        old, new, backup = db.migrate()
    finally:
        db.close()
    data = {"from_version": old, "to_version": new, "backup": str(backup) if backup else None}
    if old == new:
        return Output(data, f"{db.display_url} is already at schema version {new}; nothing to do")
    return Output(data, f"migrated {db.display_url} from schema {old} to {new}" + (f" (backup: {backup})" if backup else ""))


# ---------------------------------------------------------------------- integrity (registry/verify.py, resume.py)


@command("verify", "integrity checks (quick, or --deep) on a run or folder; results are stored", opens_store="create", args=[
    arg("target", metavar="RUN|PATH", help="a base dir, a run's checkpoint dir, one checkpoint file, or an indexed RUN"),
    arg("--deep", action="store_true", help="read every byte: CRC-32 of every zip member, sha256, NaN/Inf, weights-only "
        "load, changes since the last deep check (default: quick checks, no tensor data read)"),
    arg("--no-progress", action="store_true", help="do not show the progress bar (stderr)"),
])
def cmd_verify(args, ctx) -> Output:
    """Check every checkpoint under RUN|PATH and record each result (time, duration, problems; deep: file
    hashes). PATH needs no prior scan: it is indexed first. Exit code 3 when any problem is found."""
    from tqdm import tqdm

    from registry import verify

    store = ctx.store()
    _, checkpoints = verify.resolve_target(store, args.target)
    unit = dict(unit="B", unit_scale=True, unit_divisor=1024) if args.deep else dict(unit="ckpt")
    with tqdm(total=verify.total_units(checkpoints, args.deep), file=sys.stderr, leave=False,
              disable=True if args.no_progress else None, **unit) as bar:
        report = verify.verify(store, args.target, args.deep, progress=bar.update,
                               on_result=lambda r: bar.set_description(r.result.label[-40:], refresh=False),
                               checkpoints=checkpoints)
    rows = [[r.run, fmt_num(r.result.step) if r.result.step is not None else "?",
             CHECKPOINT_STATES[r.state],
             f"{r.result.duration_s:.2f}", "; ".join(f"{p.code}: {p.message}" for p in r.result.problems) or "-"]
            for r in report.results]
    counts = ", ".join(f"{code} x{n}" for code, n in report.codes.items())
    summary = (f"{report.level} check of {report.checked} checkpoint(s) under {report.target}: "
               f"{report.checked - report.with_problems} passed, {report.with_problems} with problems"
               + (f" ({counts})" if counts else "") + f"; {fmt_bytes(report.bytes_read)} read in {report.duration_s:.2f}s")
    text = table(["run", "step", "state", "seconds", "problems"], rows) + "\n\n" + summary
    return Output(report.to_dict(), text, exit_code=3 if report.with_problems else 0)


@command("resume", "the latest resumable checkpoint of a run and the command that continues it", opens_store="create", args=[
    arg("run", metavar="RUN", help="id, tag, phase/tag or folder path (a folder is indexed first)"),
    arg("--target-steps", type=int, metavar="N", help="train to N steps instead of the run's own num_iterations"),
    arg("--deep", action="store_true", help="clear checkpoints with the deep check (stored deep results are reused "
        "while their files are unchanged)"),
])
def cmd_resume(args, ctx) -> Output:
    """The resume planner's report (the same tools/training_resume_helper.py prints): newer checkpoints
    skipped and why, val_bpb vs the best, target and remaining steps, LR multiplier and schedule phase at
    the resume step, ETA, exact or approximate, and the command. Exit code 3 when nothing is resumable."""
    from registry.errors import NothingResumableError
    from registry.resume import format_plan
    from registry.verify import plan_indexed_resume

    if args.target_steps is not None and args.target_steps <= 0:
        raise RegistryError("--target-steps must be a positive number of steps")
    try:
        plan = plan_indexed_resume(ctx.store(), args.run, target_steps=args.target_steps, deep=args.deep)
    except NothingResumableError as e:
        data = {"resumable": False, "error": str(e), "skipped": [
            {"step": s.step, "problems": [p.__dict__ for p in s.problems]} for s in e.skipped]}
        text = "\n".join([f"nothing to resume: {e}", *(f"  step {s.step}: {s.reason}" for s in e.skipped)])
        return Output(data, text, exit_code=3)
    return Output(plan.to_dict(), format_plan(plan), exit_code=0 if plan.resumable else 3)



# ---------------------------------------------------------------------- entry point


ORIGIN_HELP = ("the machine this command speaks for (default: the host name): scans record their runs under it and "
               "mark missing only its own; a folder path means this origin's run when several machines have one there")
DB_HELP = ("registry database: a SQLite path or an SQLAlchemy URL (postgresql+psycopg://...); "
           "default $NANOCHAT_REGISTRY_URL, else $NANOCHAT_BASE_DIR/registry.sqlite, else ~/.cache/nanochat/registry.sqlite")
JSON_HELP = "print JSON (shape per command in the README) instead of a table"


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the subcommand; SUPPRESS keeps a subparser
    # from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="URL|PATH", help=DB_HELP)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
    common.add_argument("--origin", default=argparse.SUPPRESS, metavar="NAME", help=ORIGIN_HELP)
    parser = argparse.ArgumentParser(
        prog=PROG, description="The nanochat run registry: index checkpoints and metrics, then query them.",
        epilog="RUN is a run id, its model tag (d20), phase/tag when a tag is ambiguous (sft/d20), or its folder. "
               "Examples: python -m registry scan ~/.cache/nanochat; python -m registry runs --where depth=20; "
               "python -m registry history d20 --key val_bpb --max-points 50")
    parser.add_argument("--db", default=None, metavar="URL|PATH", help=DB_HELP)
    parser.add_argument("--json", action="store_true", default=False, help=JSON_HELP)
    parser.add_argument("--origin", default=None, metavar="NAME", help=ORIGIN_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, parents=[common], help=cmd.help, description=" ".join(cmd.description.split()))
        for names, kwargs in cmd.args:
            p.add_argument(*names, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = COMMANDS[args.command]
    ctx = Context(args, cmd.opens_store)
    try:
        out = cmd.run(args, ctx)
        if out.streamed:
            pass
        elif args.json:
            print(json.dumps(to_jsonable(out.data), indent=2))
        else:
            print(out.text)
        for w in out.warnings:
            print(f"warning: {w}", file=sys.stderr)
        return out.exit_code
    except (RegistryError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (every finished batch is saved; scan again to continue)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # the CLI's outer boundary: a bug still gets one line, unless debugging
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: internal error {type(e).__name__}: {e} (set NANOCHAT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:
        ctx.close()
