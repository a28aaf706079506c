"""
The resume planner: after a crash, which checkpoint of a run can be trusted, and what exactly to run.

`plan_resume(run_dir)` walks a run's checkpoints newest first and takes the first one that passes the
integrity checks (`integrity.py`: complete, CRCs and weights when deep, every optimizer shard, our
training states when the meta says `train_state`), listing every newer one it skipped and why. The
report (`ResumePlan`, frozen) says where the run stands at that step: val_bpb against the best so far
(with a warning and a better step after a loss spike), target steps resolved exactly as training does
(`nanochat.schedule.resolve_from_meta`), the LR multiplier and schedule phase at the resume step from
the same `schedule_from_user_config` the training script calls, an ETA from measured step times,
whether the resume is exact (our checkpoints carry every RNG state and the data position) or
approximate (upstream's), and the command, rebuilt from the run's own `user_config`.

It reads files only (metas, metrics.jsonl, the checks' results) and writes nothing: storing check
results is the caller's business (`registry verify/resume` pass a `check` that records them). It does
not run the training either; `format_plan` renders the report as text for both CLIs.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat import checkpoint_manager as cm
from nanochat import torchfile
from nanochat.checkpoint_manager import CheckpointFiles, Problem
from nanochat.common import DEFAULT_BASE_DIR
from nanochat.schedule import Schedule, is_classic_user_config, resolve_from_meta, schedule_from_user_config
from registry import integrity
from registry.errors import NothingResumableError, ResumePlanError
from registry.integrity import IntegrityResult

SPIKE_RATIO = 1.05  # the latest val_bpb this much above the best so far is called a loss spike
STEP_TIME_WINDOW = 50  # median of the last this many measured step times
PHASE_SCRIPTS = {"base": "scripts.base_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}
# user_config keys that are not flags to repeat on a resume
NOT_REPEATED = {"resume_from_step", "resume"}


@dataclass(frozen=True)
class SkippedCheckpoint:
    step: int | None
    problems: tuple[Problem, ...]

    @property
    def reason(self) -> str:
        return "; ".join(f"{p.code}: {p.message}" for p in self.problems)


@dataclass(frozen=True)
class ResumePlan:
    run_dir: str
    phase: str  # base, sft or rl
    tag: str
    base_dir: str | None  # the nanochat base dir holding the run, when the layout says so
    step: int  # the checkpoint to resume from = optimizer steps already done
    segment: int  # the resume segment that wrote it (meta resume_segment; 1 for upstream); the command starts segment + 1
    integrity_level: str  # the check that cleared it: quick or deep
    files: tuple[str, ...]
    val_bpb: float | None
    best_val_bpb: float | None
    best_val_step: int | None
    better_step: int | None  # a resumable checkpoint with a clearly better val_bpb (after a spike)
    better_command: str | None  # the command that resumes from better_step instead
    model_config: dict
    training_config: dict  # the run's user_config (its command-line flags)
    world_size: int
    target_steps: int | None
    target_source: str  # "meta" (recorded by training), "user_config" (recomputed like upstream), "override"
    run_num_iterations: int | None  # what the run itself was set to train for
    remaining_steps: int | None
    progress: float | None  # 0..1
    finished: bool
    schedule: Schedule | None
    lr_multiplier: float | None  # at the resume step: the next optimizer step the command runs
    schedule_phase: str | None  # warmup, constant, warmdown or done
    step_time_s: float | None
    step_time_source: str | None
    eta_s: float | None
    reached_step: int | None  # the last step metrics.jsonl saw: work past the checkpoint is redone
    mode: str  # exact, approximate, restart or unsupported
    mode_note: str
    command: str | None
    command_argv: tuple[str, ...]
    command_env: dict
    script: str | None
    script_note: str | None
    warnings: tuple[str, ...]
    skipped: tuple[SkippedCheckpoint, ...]

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    @property
    def resumable(self) -> bool:
        return self.command is not None

    def lr_curve(self, points: int = 200) -> list[tuple[int, float]]:
        """(step, LR multiplier) along the whole schedule, the resume step and the corners included."""
        return lr_curve(self.schedule, points, marks=(self.step,)) if self.schedule else []

    def to_dict(self) -> dict:
        """The `--json` shape (see the README's integrity section)."""
        d = asdict(self)
        d["exact"], d["resumable"] = self.exact, self.resumable
        d["schedule"] = asdict(self.schedule) if self.schedule else None
        d["skipped"] = [{"step": s.step, "problems": [asdict(p) for p in s.problems]} for s in self.skipped]
        d["command_argv"] = list(self.command_argv)
        d["files"] = list(self.files)
        d["warnings"] = list(self.warnings)
        return d


def lr_curve(schedule: Schedule, points: int = 200, marks: tuple[int, ...] = ()) -> list[tuple[int, float]]:
    """The LR multiplier sampled at about `points` steps from 0 to num_iterations, plus the corners of
    the schedule (end of warmup, start of warmdown) and `marks`, so a chart of it is exact there."""
    n = schedule.num_iterations
    steps = {round(i * n / max(points - 1, 1)) for i in range(points)} if n > 0 else {0}
    steps |= {0, n, schedule.warmup_steps - 1, schedule.warmup_steps, schedule.warmdown_start,
              schedule.warmdown_start + 1, *marks}
    return [(s, schedule.lr_multiplier(s)) for s in sorted(x for x in steps if 0 <= x <= max(n, *marks, 0))]


# ---------------------------------------------------------------------- inputs


def find_run_dir(path: str | os.PathLike) -> Path:
    """The run directory a user means: itself, the directory of a checkpoint file, or the only run
    under a base directory."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise ResumePlanError(f"{p} does not exist")
    if not p.is_dir():
        raise ResumePlanError(f"{p} is not a directory")
    try:
        if cm.list_checkpoints(p):
            return p
    except cm.CheckpointError as e:
        raise ResumePlanError(str(e)) from None
    runs = cm.find_run_dirs(p)
    if len(runs) == 1:
        return runs[0]
    if runs:
        shown = ", ".join(str(r.relative_to(p)) for r in runs[:4]) + (" …" if len(runs) > 4 else "")
        raise ResumePlanError(f"{p} holds {len(runs)} runs ({shown}); name one of them")
    raise ResumePlanError(f"no checkpoints in {p}")


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of the run's metrics.jsonl (a torn or garbled line is skipped; a missing file is empty)."""
    rows = []
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    except OSError:
        pass
    return rows


def _val_history(checkpoints: list[CheckpointFiles], metrics: list[dict]) -> dict[int, float]:
    """step -> val_bpb from every meta and every metrics row (metrics win: they are per evaluation)."""
    out: dict[int, float] = {}
    for c in checkpoints:
        try:
            v = cm.read_meta(c).get("val_bpb")
        except cm.CheckpointError:
            continue
        if isinstance(v, (int, float)) and math.isfinite(v) and c.step is not None:
            out[c.step] = float(v)
    for row in metrics:
        v = row.get("val_bpb")
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[row["step"]] = float(v)
    return out


def _step_time(meta: dict, metrics: list[dict], step: int) -> tuple[float | None, str | None]:
    times = [r["dt_ms"] for r in metrics if r["step"] <= step and isinstance(r.get("dt_ms"), (int, float)) and r["dt_ms"] > 0]
    if times:
        recent = times[-STEP_TIME_WINDOW:]
        return statistics.median(recent) / 1000, f"median dt_ms of the last {len(recent)} steps in metrics.jsonl"
    total = (meta.get("loop_state") or {}).get("total_training_time")
    if isinstance(total, (int, float)) and total > 0 and step > 0:
        # upstream starts its training-time clock after the first 10 (compilation) steps
        timed = step - 10 if step > 10 else step
        return total / timed, f"loop_state.total_training_time over {timed} timed steps"
    return None, None


# ---------------------------------------------------------------------- the command


def _flag(key: str, value, classic: bool) -> str | None:
    name = key if classic else key.replace("_", "-")
    if value is None or value is False:
        return None
    if value is True:
        return f"--{name}"
    if isinstance(value, float):
        return f"--{name}={value!r}"
    return f"--{name}={value}"


def build_command(meta: dict, phase: str, tag: str, step: int, world_size: int, base_dir: Path | None,
                  num_iterations: int | None = None) -> tuple[list[str], dict, str, str, str | None]:
    """(argv, env, mode, mode_note, script_note) of the training invocation that continues this run:
    its own flags from user_config, `--resume-from-step`, torchrun for several processes."""
    user = dict(meta.get("user_config") or {})
    script = PHASE_SCRIPTS.get(phase, PHASE_SCRIPTS["base"])
    classic = is_classic_user_config(user)
    script_note = None
    if phase == "base":
        user["model_tag"] = tag  # the directory the script will look in, whatever the run called it
        if num_iterations is not None:
            user["num_iterations"] = num_iterations
    flags = [f for k, v in user.items() if k not in NOT_REPEATED if (f := _flag(k, v, classic))]
    if phase == "base":
        flags.append(f"--resume-from-step={step}")
    else:
        script_note = (f"{script} is upstream nanochat's script (the workbench trains base models only) and has no "
                       "resume flag: this command restarts the phase from the checkpoint it started from")
    launcher = ["python", "-m", script] if world_size <= 1 else \
        ["torchrun", "--standalone", f"--nproc_per_node={world_size}", "-m", script, "--"]
    env = {}
    if base_dir is not None and base_dir.expanduser().resolve() != DEFAULT_BASE_DIR.expanduser().resolve():
        env["NANOCHAT_BASE_DIR"] = str(base_dir)
    if phase != "base":
        return launcher + flags, env, "restart", f"{phase.upper()} restarts from its starting checkpoint", script_note
    if meta.get("train_state"):
        return launcher + flags, env, "exact", ("every rank's RNG states and data-loader position are restored: the "
                                                "continued run matches an uninterrupted one (same world size, device and "
                                                "thread count)"), None
    loader = meta.get("dataloader_state_dict")
    where = (f"the data loader continues from the saved position (shard {loader.get('pq_idx')}, row group "
             f"{loader.get('rg_idx')})" if isinstance(loader, dict) else "no data-loader position: data restarts from the first shard")
    return launcher + flags, env, "approximate", f"upstream checkpoint without RNG state; {where}", (
        f"run this in the upstream nanochat checkout that wrote the run: its {script} resumes upstream "
        "checkpoints; the workbench's trainer resumes only its own (exactly)")


def cpu_threads(ckpt: CheckpointFiles) -> int | None:
    """CPU threads per process a run of ours was trained with (recorded in its training state, read
    without running the pickle); None for upstream checkpoints and for CUDA runs."""
    path = ckpt.train_states.get(0)
    if path is None:
        return None
    try:
        state = torchfile.read_structure(path)
    except torchfile.TorchFileError:
        return None
    if not isinstance(state, dict) or (isinstance(state.get("rng"), dict) and "torch_cuda" in state["rng"]):
        return None
    n = state.get("cpu_threads")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def command_line(argv: list[str] | tuple[str, ...], env: Mapping[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


# ---------------------------------------------------------------------- the planner


def plan_resume(run_dir: str | os.PathLike, *, target_steps: int | None = None, deep: bool = False,
                known: Mapping[int, IntegrityResult] | None = None,
                check: Callable[[CheckpointFiles, bool], IntegrityResult] | None = None) -> ResumePlan:
    """The latest resumable checkpoint of a run and how to continue from it.

    `known`: step -> an earlier IntegrityResult (e.g. from the registry), used while its files are
    unchanged and it is at least as thorough as asked (`deep`). `check(ckpt, deep)` runs a check
    (default `integrity.check_checkpoint`; the registry passes one that also stores the result).
    `target_steps` overrides the run's num_iterations (the command then passes --num-iterations)."""
    run = find_run_dir(run_dir).resolve()
    check = check or (lambda c, d: integrity.check_checkpoint(c, deep=d))
    checkpoints = cm.list_checkpoints(run)
    skipped: list[SkippedCheckpoint] = []
    results: dict[int | None, IntegrityResult] = {}

    def result_for(ckpt: CheckpointFiles) -> IntegrityResult:
        if ckpt.step not in results:
            prior = (known or {}).get(ckpt.step)
            usable = prior is not None and prior.is_current() and (prior.level == "deep" or not deep)
            results[ckpt.step] = prior if usable else check(ckpt, deep)
        return results[ckpt.step]

    chosen = None
    for ckpt in reversed(checkpoints):
        result = result_for(ckpt)
        if result.ok:
            chosen = ckpt
            break
        skipped.append(SkippedCheckpoint(ckpt.step, result.problems))
    if chosen is None:
        raise NothingResumableError(f"no resumable checkpoint in {run}: all {len(checkpoints)} failed the "
                                    f"{'deep' if deep else 'quick'} check", tuple(skipped))
    meta = cm.read_meta(chosen)
    phase, tag = cm.phase_and_tag(run)
    base_dir = run.parent.parent if run.parent.name in cm.PHASE_DIRS else None
    step = chosen.step if chosen.step is not None else int(meta.get("step", 0))
    user = meta.get("user_config") or {}
    warnings = [f"skipped newer step {s.step}: {s.reason}" for s in skipped]

    # how far the run is, in its own terms
    run_iters = resolve_from_meta(meta)
    target, source = run_iters, ("meta" if isinstance(meta.get("num_iterations"), int) else "user_config")
    if target_steps is not None:
        target, source = int(target_steps), "override"
    schedule = schedule_from_user_config(user, target) if target else None
    if target_steps is not None and run_iters and target != run_iters and step < target:
        before = schedule_from_user_config(user, run_iters).lr_multiplier(step)
        warnings.append(f"target {target} differs from the run's {run_iters} steps: the command passes "
                        f"--num-iterations={target}, which moves the LR schedule (multiplier at step {step}: "
                        f"{before:.4f} -> {schedule.lr_multiplier(step):.4f}, warmdown from step {schedule.warmdown_start})")
    remaining = max(target - step, 0) if target else None
    finished = bool(target) and step >= target
    if finished:
        warnings.append(f"the run is complete ({step} of {target} steps): to train longer pass a larger --target-steps")

    # val_bpb: the latest against the best so far
    metrics = read_metrics(run)
    history = _val_history(checkpoints, metrics)
    so_far = {s: v for s, v in history.items() if s <= step}
    val = meta.get("val_bpb") if isinstance(meta.get("val_bpb"), (int, float)) else None
    best_step = min(so_far, key=lambda s: (so_far[s], -s)) if so_far else None
    best = so_far[best_step] if best_step is not None else None
    latest_val = val if val is not None else (so_far[max(so_far)] if so_far else None)
    better_step = None
    if best is not None and latest_val is not None and latest_val > best * SPIKE_RATIO:
        better_step = _best_resumable(checkpoints, history, step, result_for)
        hint = (f"; step {better_step} (val_bpb {history[better_step]:.4f}) is resumable: pass --resume-from-step="
                f"{better_step} to continue from before the spike") if better_step is not None else ""
        warnings.append(f"loss spike: val_bpb {latest_val:.4f} at step {step} is {100 * (latest_val / best - 1):.0f}% "
                        f"worse than the best so far ({best:.4f} at step {best_step}){hint}")
    # a train row of step s trains step s (s+1 steps done); an eval row at s sees s steps done
    reached = max((r["step"] + (1 if "dt_ms" in r or "train_loss" in r else 0) for r in metrics), default=None)
    if reached is not None and reached > step:
        warnings.append(f"training had reached step {reached} (metrics.jsonl): {reached - step} steps after the "
                        "checkpoint will be trained again")

    step_time, time_source = _step_time(meta, metrics, step)
    world = cm.expected_world_size(chosen, meta) or 1
    argv, env, mode, note, script_note = [], {}, "unsupported", "", None
    if chosen.layout == "single_file":
        note = "single-file checkpoints come from other training scripts; no nanochat script resumes them"
    elif phase == "base" and is_classic_user_config(user):
        note = ("classic nanochat (before --resume-from-step existed) cannot resume, and current base_train builds "
                "a different architecture: the weights load for evaluation and sampling only")
    else:
        argv, env, mode, note, script_note = build_command(
            meta, phase, tag, step, world, base_dir, target if source == "override" else None)
        threads = cpu_threads(chosen) if mode == "exact" else None
        if threads is not None:
            # CPU kernels reduce in an order that depends on the thread count: same count, same bits
            env["OMP_NUM_THREADS"] = str(threads)
            note += f"; OMP_NUM_THREADS={threads} as when it was trained"
    better_command = None
    if better_step is not None and argv:
        better_argv = [f"--resume-from-step={better_step}" if a == f"--resume-from-step={step}" else a for a in argv]
        better_command = command_line(better_argv, env)
    if base_dir is None and argv:
        warnings.append(f"{run} is not inside a nanochat base dir (<base>/base_checkpoints/<tag>): the training "
                        "script only finds checkpoints there")
    if mode == "unsupported":
        warnings.append(note)
    return ResumePlan(
        run_dir=str(run), phase=phase, tag=tag, base_dir=str(base_dir) if base_dir else None, step=step,
        segment=int(meta["resume_segment"]) if isinstance(meta.get("resume_segment"), int) else 1,
        integrity_level=results[chosen.step].level, files=tuple(p.name for p in chosen.files),
        val_bpb=val, best_val_bpb=best, best_val_step=best_step, better_step=better_step, better_command=better_command,
        model_config=dict(meta.get("model_config") or {}), training_config=dict(user), world_size=world,
        target_steps=target, target_source=source, run_num_iterations=run_iters, remaining_steps=remaining,
        progress=(min(step / target, 1.0) if target else None), finished=finished, schedule=schedule,
        lr_multiplier=schedule.lr_multiplier(step) if schedule else None,
        schedule_phase=schedule.phase(step) if schedule else None,
        step_time_s=step_time, step_time_source=time_source,
        eta_s=(remaining * step_time if step_time is not None and remaining is not None else None),
        reached_step=reached, mode=mode, mode_note=note,
        command=command_line(argv, env) if argv else None, command_argv=tuple(argv), command_env=env,
        script=argv[argv.index("-m") + 1] if argv else None, script_note=script_note,
        warnings=tuple(warnings), skipped=tuple(skipped),
    )


def _best_resumable(checkpoints, history, step, result_for) -> int | None:
    """The resumable checkpoint at or before `step` with the lowest val_bpb, if clearly better."""
    candidates = sorted((history[c.step], -c.step, c) for c in checkpoints
                        if c.step is not None and c.step < step and c.step in history)
    for _, _, ckpt in candidates:
        if result_for(ckpt).ok:
            return ckpt.step
    return None


# ---------------------------------------------------------------------- the text report


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: ResumePlan) -> str:
    """The report both CLIs print (`python -m registry resume`, `tools/training_resume_helper.py`)."""
    mc = plan.model_config
    keys = ("n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len", "vocab_size", "window_pattern")
    lines = [f"Resume plan for {plan.phase}/{plan.tag}  ({plan.run_dir})",
             f"  checkpoint     step {plan.step} (segment {plan.segment}), passed the {plan.integrity_level} integrity "
             f"check ({len(plan.files)} files)"]
    for s in plan.skipped:
        lines.append(f"  skipped        step {s.step}: {s.reason}")
    if plan.val_bpb is not None or plan.best_val_bpb is not None:
        val = f"{plan.val_bpb:.4f}" if plan.val_bpb is not None else "not evaluated at this step"
        best = f" (best so far {plan.best_val_bpb:.4f} at step {plan.best_val_step})" if plan.best_val_bpb is not None else ""
        lines.append(f"  val_bpb        {val}{best}")
    lines.append("  model          " + " ".join(f"{k}={mc[k]}" for k in keys if k in mc))
    shown = ("device_batch_size", "total_batch_size", "max_seq_len", "matrix_lr", "embedding_lr", "unembedding_lr",
             "warmup_steps", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "device_type")
    tc = plan.training_config
    lines.append("  training       " + (" ".join(f"{k}={tc[k]}" for k in shown if k in tc) or "(no user_config)"))
    source = {"meta": "recorded by training", "user_config": "recomputed from user_config as upstream resolves it",
              "override": "--target-steps"}[plan.target_source]
    if plan.target_steps:
        lines.append(f"  target steps   {plan.target_steps} ({source})")
        lines.append(f"  progress       {plan.step} / {plan.target_steps} ({100 * plan.progress:.1f}%), "
                     f"{plan.remaining_steps} steps remaining")
    else:
        lines.append("  target steps   unknown (the run's flags do not determine it: pass --target-steps)")
    if plan.schedule is not None:
        s = plan.schedule
        lines.append(f"  LR schedule    multiplier {plan.lr_multiplier:.4f} at step {plan.step}, phase {plan.schedule_phase} "
                     f"(warmup {s.warmup_steps} steps, constant to step {s.warmdown_start}, then down to {s.final_lr_frac})")
    if plan.step_time_s is not None:
        eta = f"; ETA {_duration(plan.eta_s)}" if plan.eta_s is not None else ""
        lines.append(f"  step time      {1000 * plan.step_time_s:.1f} ms ({plan.step_time_source}){eta}")
    else:
        lines.append("  step time      unknown (no metrics.jsonl dt_ms and no loop_state): no ETA")
    lines.append(f"  world size     {plan.world_size}")
    lines.append(f"  resume         {plan.mode}: {plan.mode_note}")
    shown = [w for w in plan.warnings if not w.startswith("skipped newer step")]  # listed above already
    if shown:
        lines.append("warnings:")
        lines += [f"  ! {w}" for w in shown]
    if plan.script_note:
        lines.append(f"note: {plan.script_note}")
    lines.append("command:" if plan.command else "command: none (nothing can resume this run)")
    if plan.command:
        lines.append(f"  {plan.command}")
    if plan.better_command:
        lines += [f"or, from step {plan.better_step} before the loss spike:", f"  {plan.better_command}"]
    return "\n".join(lines)


__all__ = ["ResumePlan", "SkippedCheckpoint", "ResumePlanError", "NothingResumableError", "plan_resume", "format_plan",
           "lr_curve", "find_run_dir", "read_metrics", "build_command", "command_line"]
