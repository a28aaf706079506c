"""
Registry results as the tables the pages show: plain functions from the registry's frozen dataclasses
(`registry.entities`, `registry.resume.ResumePlan`) to pandas DataFrames and short labels.

A checkpoint's state words and labels are the registry's (`registry.entities.CHECKPOINT_STATES`, the
CLI prints the same); this module adds only the icons and colours. Pure and torch-free: no Streamlit,
no database, no files. `data.py` calls these inside its cached functions; tests call them directly.
Charts are drawn from these frames by `charts.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import pandas as pd

from registry import entities

STATUS_LABELS = {
    "training": "● training",
    "finished": "✓ finished",
    "stopped": "‖ stopped",
    "incomplete": "⚠ incomplete",
    "missing": "✗ folder gone",
}
# A checkpoint's state: the registry's words and labels (worst first), each with an icon for the pages.
STATE_ICONS = {"missing": "✗", "incomplete": "✗", "problems": "⚠", "verified": "✔", "quick_ok": "✓", "unchecked": "○"}
CHECKPOINT_STATES = {state: f"{STATE_ICONS[state]} {label}" for state, label in entities.CHECKPOINT_STATES.items()}
STATE_COLORS = {
    "missing": "#d1d5db",
    "incomplete": "#d62728",
    "problems": "#ff7f0e",
    "verified": "#2ca02c",
    "quick_ok": "#98df8a",
    "unchecked": "#9ca3af",
}


def run_names(runs: Iterable) -> dict[int, str]:
    """id -> the name the app shows for a run: its phase/tag; where two runs share it, the machine it came
    from ("base/d20 on box-a") when that tells them apart, else the id (two base dirs with the same tag).
    Names are also what the URL carries."""
    runs = list(runs)
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    with_origin = [f"{r.label} on {r.origin}" for r in runs if seen[r.label] > 1 and r.origin]
    out = {}
    for r in runs:
        named = f"{r.label} on {r.origin}" if r.origin else None
        out[r.id] = r.label if seen[r.label] == 1 else named if named and with_origin.count(named) == 1 else f"{r.label} #{r.id}"
    return out


def runs_frame(runs: Iterable, names: Mapping[int, str]) -> pd.DataFrame:
    rows = []
    for r in runs:
        target = r.num_iterations
        done = r.latest_step
        rows.append({
            "id": r.id, "run": names[r.id], "phase": r.phase, "tag": r.tag, "depth": r.depth, "parameters": r.n_params,
            "steps": f"{done if done is not None else '–'} / {target if target else '?'}",
            "progress": r.progress, "best_val_bpb": r.best_val_bpb, "best_step": r.best_val_bpb_step,
            "last_val_bpb": r.last_val_bpb, "checkpoints": r.checkpoint_count, "segments": r.segments,
            "status": STATUS_LABELS.get(r.status, r.status), "last_update": r.last_update, "origin": r.origin,
            "path": r.path, "token_bytes": r.token_bytes.label if r.token_bytes is not None else "unknown",
        })
    columns = ["id", "run", "phase", "tag", "depth", "parameters", "steps", "progress", "best_val_bpb", "best_step",
               "last_val_bpb", "checkpoints", "segments", "status", "last_update", "origin", "path", "token_bytes"]
    return pd.DataFrame(rows, columns=columns)


def metric_frame(series: Iterable, runs_by_id: Mapping[int, object], names: Mapping[int, str]) -> pd.DataFrame:
    """Long format, one row per point: run, key, segment, step, value, and the other x axes
    (tokens = steps x tokens per step, FLOPs = tokens x FLOPs per token, seconds since the run's first point)."""
    rows = []
    for s in series:
        run = runs_by_id[s.run_id]
        tbs = run.total_batch_size or None
        fpt = run.flops_per_token or None
        for p in s.points:
            if p.value is None or not math.isfinite(p.value):
                continue
            tokens = p.step * tbs if tbs else None
            rows.append((s.run_id, names[s.run_id], s.key, p.segment, p.step, p.value, p.wall_time, tokens,
                         tokens * fpt if (tokens is not None and fpt) else None))
    df = pd.DataFrame(rows, columns=["run_id", "run", "key", "segment", "step", "value", "wall_time", "tokens", "flops"])
    df["elapsed_s"] = df["wall_time"] - df.groupby("run_id")["wall_time"].transform("min")
    return df.sort_values(["run_id", "key", "segment", "step"], kind="stable").reset_index(drop=True)


def resume_points(metrics: pd.DataFrame) -> pd.DataFrame:
    """Where each resumed segment starts: run, segment, step (and the other x axes), one row per resume."""
    if metrics.empty:
        return metrics.iloc[0:0][["run_id", "run", "segment", "step", "tokens", "flops", "elapsed_s"]]
    later = metrics[metrics["segment"] > metrics.groupby("run_id")["segment"].transform("min")]
    first = later.sort_values("step").groupby(["run_id", "segment"], as_index=False).first()
    return first[["run_id", "run", "segment", "step", "tokens", "flops", "elapsed_s"]].reset_index(drop=True)


def _problems(c) -> tuple:
    latest = c.latest_integrity
    found = {(p.code, p.message) for p in c.problems}
    if latest is not None:
        found |= {(p.code, p.message) for p in latest.problems}
    return tuple(sorted(found))


def checkpoints_frame(records: Iterable, names: Mapping[int, str] | None = None) -> pd.DataFrame:
    rows = []
    for c in records:
        latest = c.latest_integrity
        problems = _problems(c)
        state = entities.checkpoint_state(c)
        rows.append({
            "id": c.id, "run_id": c.run_id, "run": (names or {}).get(c.run_id, c.run_label), "step": c.step,
            "segment": c.segment, "val_bpb": c.val_bpb, "state": state, "integrity": CHECKPOINT_STATES[state],
            "resumable": c.resumable and not c.missing, "train_state": c.has_train_state, "size_mb": c.size_bytes / 1e6,
            "saved": c.mtime, "checked": latest.checked_at if latest else None, "check": latest.mode if latest else None,
            "problems": ", ".join(sorted({code for code, _ in problems})),
            "messages": "; ".join(f"{code}: {msg}" for code, msg in problems), "label": c.label,
            "directory": c.directory, "layout": c.layout,
        })
    columns = ["id", "run_id", "run", "step", "segment", "val_bpb", "state", "integrity", "resumable", "train_state",
               "size_mb", "saved", "checked", "check", "problems", "messages", "label", "directory", "layout"]
    return pd.DataFrame(rows, columns=columns)


def files_frame(files: Iterable, on_disk: Mapping[str, bool]) -> pd.DataFrame:
    rows = [{"file": f.name, "kind": f.kind + (f" (rank {f.rank})" if f.rank is not None else ""),
             "size_mb": f.size / 1e6, "modified": f.mtime,
             "on_disk": "✓" if on_disk.get(f.name, not f.missing) else "✗ gone",
             "sha256": f.sha256 or "not hashed yet (run a deep check)", "hashed": f.sha256_at} for f in files]
    return pd.DataFrame(rows, columns=["file", "kind", "size_mb", "modified", "on_disk", "sha256", "hashed"])


def integrity_history_frame(history: Iterable) -> pd.DataFrame:
    rows = [{"checked": r.checked_at, "level": r.mode, "result": "✓ ok" if r.ok else "⚠ problems",
             "duration_s": r.duration_s, "problems": ", ".join(p.code for p in r.problems),
             "messages": "; ".join(p.message for p in r.problems)} for r in history]
    return pd.DataFrame(rows, columns=["checked", "level", "result", "duration_s", "problems", "messages"])


def _shown(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def diff_frame(diff, changed_only: bool = True) -> pd.DataFrame:
    marks = {"changed": "≠ changed", "only_a": "only in A", "only_b": "only in B", "same": "= same"}
    rows = [{"key": r.key, "A": _shown(r.a), "B": _shown(r.b), "status": marks[r.status]}
            for r in diff.rows if not changed_only or r.status != "same"]
    return pd.DataFrame(rows, columns=["key", "A", "B", "status"])


def config_frame(config: Mapping) -> pd.DataFrame:
    return pd.DataFrame([{"key": k, "value": _shown(v)} for k, v in sorted(config.items())], columns=["key", "value"])


def lr_frame(plan) -> pd.DataFrame:
    """The plan's LR schedule (step, multiplier, phase) from the planner's own curve."""
    if plan.schedule is None:
        return pd.DataFrame(columns=["step", "lr_multiplier", "phase"])
    pts = plan.lr_curve(300)
    return pd.DataFrame([{"step": s, "lr_multiplier": m, "phase": plan.schedule.phase(s)} for s, m in pts])


def own_lr_frame(plan) -> pd.DataFrame:
    """The run's own LR schedule (step, lr_multiplier) when the plan's target moves it, else empty: with
    it a chart shows the jump at the resume step that the planner's warning describes."""
    from nanochat.schedule import schedule_from_user_config
    from registry.resume import lr_curve

    own = plan.run_num_iterations
    if plan.schedule is None or not own or own == plan.schedule.num_iterations:
        return pd.DataFrame(columns=["step", "lr_multiplier"])
    schedule = schedule_from_user_config(plan.training_config, own)
    return pd.DataFrame(lr_curve(schedule, 300, marks=(plan.step,)), columns=["step", "lr_multiplier"])


def schedule_phases(plan) -> pd.DataFrame:
    """The warmup / constant / warmdown spans of the plan's schedule, for shading a chart."""
    s = plan.schedule
    if s is None:
        return pd.DataFrame(columns=["phase", "start", "end"])
    spans = [("warmup", 0, s.warmup_steps), ("constant", s.warmup_steps, s.warmdown_start),
             ("warmdown", s.warmdown_start, s.num_iterations)]
    return pd.DataFrame([{"phase": p, "start": a, "end": b} for p, a, b in spans if b > a])


def age(when: datetime | None, now: datetime | None = None) -> str:
    """'3 min ago', '2 h ago', '5 d ago' (or 'never')."""
    if when is None:
        return "never"
    now = now or datetime.now(UTC)
    s = max(0.0, (now - when).total_seconds())
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def compact(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (B for billions, T for trillions); None -> '—'."""
    if n is None:
        return "—"
    if abs(n) >= 1e15:
        return f"{n:.2e}{unit}".replace("e+", "e")
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
