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
approximate (upstream's), and the command, rebuilt from the run's own `user_config` by the builder the
trainer itself prints its resume command with (`nanochat.train_config.resume_command`). For a base run
upstream wrote, the command is upstream's own resume (run in the upstream checkout) and the
`workbench_command` beside it continues the run with this project's trainer (`--allow-approximate`:
approximate once, exact from its first checkpoint on). A target below the resume step is refused
(`TargetBelowStepError`).

It reads files only (metas, metrics.jsonl, the checks' results) and writes nothing: storing check
results is the caller's business (`registry verify/resume` pass a `check` that records them). It does
not run the training either; `format_plan` renders the report as text for both CLIs.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat import bounds, torchfile
from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import CheckpointFiles, Problem
from nanochat.common import open_regular_file
from nanochat.schedule import Schedule, resolve_from_meta, schedule_from_user_config
from nanochat.train_config import OUR_TRAINERS, UPSTREAM_SCRIPTS, Command, launch_env, resume_command
from registry import integrity
from registry.errors import NothingResumableError, ResumePlanError, TargetBelowStepError
from registry.integrity import IntegrityResult

SPIKE_RATIO = 1.05  # the latest val_bpb this much above the best so far is called a loss spike
STEP_TIME_WINDOW = 50  # median of the last this many measured step times
WARMUP_STEPS = 10  # steps after each (re)start whose times include compilation and warm-up (upstream skips 10 too)


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
    # an upstream-written base run: our trainer's command that continues it (--allow-approximate), and how
    workbench_command: str | None = None
    workbench_command_argv: tuple[str, ...] = ()
    workbench_command_env: dict | None = None
    workbench_note: str | None = None
    # a run of ours that once continued an upstream checkpoint: the meta's {from_step, segment, reason}
    approximate_resume: dict | None = None

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
        d["workbench_command_argv"] = list(self.workbench_command_argv)
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
        with open_regular_file(run_dir / "metrics.jsonl", "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = bounds.loads(line)
                except ValueError:  # not JSON, or nested too deep
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and 0 <= row["step"] <= bounds.MAX_STEP:
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


def steady_step_times(points: list[tuple[int, int, float]]) -> list[float]:
    """The dt_ms of steady-state steps from (step, segment, dt_ms) in the order written: the first
    WARMUP_STEPS after every (re)start (a new segment, or a step that does not follow the previous one)
    are left out, since they include torch.compile and warm-up (~13x a resumed upstream run's real rate)."""
    out, since, prev = [], 0, None
    for step, segment, dt in points:
        since = 0 if prev is None or segment != prev[1] or step != prev[0] + 1 else since + 1
        prev = (step, segment)
        if since >= WARMUP_STEPS and dt > 0:
            out.append(dt)
    return out


def _step_time(meta: dict, metrics: list[dict], step: int,
               imported: list[tuple[int, int, float]] | None = None) -> tuple[float | None, str | None]:
    for points, where in ((imported, "the registry's dt_ms (imported logs)"), (
            [(r["step"], r.get("segment", 1), r["dt_ms"]) for r in metrics
             if isinstance(r.get("dt_ms"), (int, float)) and not isinstance(r.get("dt_ms"), bool)], "metrics.jsonl")):
        points = [p for p in points or () if p[0] <= step]
        times = steady_step_times(points)
        if times:
            recent = times[-STEP_TIME_WINDOW:]
            return statistics.median(recent) / 1000, (f"median dt_ms of the last {len(recent)} steady steps in {where}, "
                                                      f"the first {WARMUP_STEPS} after each start left out")
        if warm := [p[2] for p in points if p[2] > 0]:  # a run shorter than its warm-up: better than no ETA
            return statistics.median(warm) / 1000, (f"median dt_ms of {len(warm)} steps in {where}, all in the first "
                                                    f"{WARMUP_STEPS} after a start (compile and warm-up: high)")
    total = (meta.get("loop_state") or {}).get("total_training_time")
    if isinstance(total, (int, float)) and total > 0 and step > 0:
        # upstream starts its training-time clock after the first 10 (compilation) steps, of the first launch only
        timed = step - 10 if step > 10 else step
        resumed = (meta.get("user_config") or {}).get("resume_from_step")
        caveat = (f"; includes the compile of the resume at step {resumed}, so it is high: import the run's logs "
                  "(registry import-log) for a steady-state figure") if isinstance(resumed, int) and resumed > 0 else ""
        return total / timed, f"loop_state.total_training_time over {timed} timed steps{caveat}"
    return None, None


# ---------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ResumeCommand:
    command: Command | None  # None: nothing can resume this run
    mode: str  # exact, approximate, restart or unsupported
    note: str
    script_note: str | None = None
    workbench: Command | None = None  # our base_train continuing an upstream run (--allow-approximate)
    workbench_note: str | None = None


def build_command(chosen: CheckpointFiles, meta: dict, phase: str, tag: str, step: int, base_dir: Path | None,
                  num_iterations: int | None = None) -> ResumeCommand:
    """The training invocation that continues this run (its own flags from user_config, the model tag,
    `--resume-from-step`, torchrun for several processes), and how faithful the continuation will be."""
    user = meta.get("user_config") or {}
    if (why := cm.why_not_resumable(chosen.layout, chosen.directory, meta)) is not None:
        return ResumeCommand(None, "unsupported", why)  # classic, a single file, chat_rl (no optimizer saved)
    trainer = UPSTREAM_SCRIPTS.get(phase, UPSTREAM_SCRIPTS["base"])
    world = cm.expected_world_size(chosen, meta) or 1
    ours = bool(meta.get("train_state")) and phase in OUR_TRAINERS
    if ours:
        trainer = OUR_TRAINERS[phase]  # our SFT runs resume exactly with our scripts.chat_sft
    elif phase != "base":
        return ResumeCommand(
            resume_command(trainer, user, world_size=world, resume_step=None, env=launch_env(base_dir)),
            "restart", f"{phase.upper()} restarts from its starting checkpoint",
            f"{trainer.script} is upstream nanochat's script (the workbench trains base models only) and has no "
            "resume flag: this command restarts the phase from the checkpoint it started from")
    overrides = {"model_tag": tag}  # the directory the script will look in, whatever the run called it
    if num_iterations is not None:
        overrides["num_iterations"] = num_iterations
    if ours:
        # CPU kernels reduce in an order that depends on the thread count: same count, same bits
        threads = cpu_threads(chosen)
        note = ("every rank's RNG states and data-loader position are restored: the continued run matches an "
                "uninterrupted one (same world size, device and thread count)")
        if threads is not None:
            note += f"; OMP_NUM_THREADS={threads} as when it was trained"
        return ResumeCommand(resume_command(trainer, user, world_size=world, resume_step=step,
                                            env=launch_env(base_dir, threads), overrides=overrides), "exact", note)
    loader = meta.get("dataloader_state_dict")
    where = (f"the data loader continues from the saved position (shard {loader.get('pq_idx')}, row group "
             f"{loader.get('rg_idx')})" if isinstance(loader, dict) else "no data-loader position: data restarts from "
             "the first shard")
    unknown = [k for k in user if trainer.flag(k) is None]
    return ResumeCommand(
        resume_command(trainer, user, world_size=world, resume_step=step, env=launch_env(base_dir), overrides=overrides),
        "approximate", f"upstream checkpoint without RNG state; {where}",
        f"run this in the upstream nanochat checkout that wrote the run: its {trainer.script} resumes upstream "
        "checkpoints; or continue it with the workbench's trainer (the command below)",
        resume_command(trainer, user, world_size=world, resume_step=step, env=launch_env(base_dir), overrides=overrides,
                       approximate=True),
        "the workbench's base_train continues this upstream checkpoint as upstream's own resume would (weights, "
        "optimizer, step, loop state and upstream's data position; no RNG state), says so once and records it in "
        "the meta; its own checkpoints from then on resume exactly"
        + (f". Upstream flags it does not have are left out: {', '.join(unknown)}" if unknown else ""))


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


# ---------------------------------------------------------------------- the planner


class _Checks:
    """Integrity results per step: an earlier result while its files are unchanged and it is thorough
    enough, else a fresh check (each checkpoint checked at most once per plan)."""

    def __init__(self, known: Mapping[int, IntegrityResult] | None, check, deep: bool):
        self.known, self.deep = known or {}, deep
        self.check = check or (lambda c, d: integrity.check_checkpoint(c, deep=d))
        self.results: dict[int | None, IntegrityResult] = {}

    def __call__(self, ckpt: CheckpointFiles) -> IntegrityResult:
        if ckpt.step not in self.results:
            prior = self.known.get(ckpt.step)
            usable = prior is not None and prior.is_current() and (prior.level == "deep" or not self.deep)
            self.results[ckpt.step] = prior if usable else self.check(ckpt, self.deep)
        return self.results[ckpt.step]


@dataclass(frozen=True)
class _Horizon:
    target: int | None
    source: str
    run_iters: int | None
    schedule: Schedule | None
    warnings: tuple[str, ...]

    def remaining(self, step: int) -> int | None:
        return max(self.target - step, 0) if self.target else None


@dataclass(frozen=True)
class _ValReport:
    val: float | None
    best: float | None
    best_step: int | None
    better_step: int | None
    warnings: tuple[str, ...]


def plan_resume(run_dir: str | os.PathLike, *, target_steps: int | None = None, deep: bool = False,
                known: Mapping[int, IntegrityResult] | None = None,
                check: Callable[[CheckpointFiles, bool], IntegrityResult] | None = None,
                step_times: list[tuple[int, int, float]] | None = None) -> ResumePlan:
    """The latest resumable checkpoint of a run and how to continue from it.

    `known`: step -> an earlier IntegrityResult (e.g. from the registry), used while its files are
    unchanged and it is at least as thorough as asked (`deep`). `check(ckpt, deep)` runs a check
    (default `integrity.check_checkpoint`; the registry passes one that also stores the result).
    `target_steps` overrides the run's num_iterations (the command then passes --num-iterations); one
    below the resume step raises TargetBelowStepError. A checkpoint file as `run_dir` plans from that
    checkpoint (NothingResumableError when it fails its check), a folder from its newest good one.
    `step_times`: (step, segment, dt_ms) measured elsewhere (the registry's imported logs)."""
    run = find_run_dir(run_dir).resolve()
    checks = _Checks(known, check, deep)
    checkpoints = cm.list_checkpoints(run)
    given = step_of_file(Path(run_dir).expanduser())
    if given is not None:
        checkpoints = [c for c in checkpoints if c.step == given and c.layout == "upstream"]
    chosen, skipped = _choose_checkpoint(run, checkpoints, checks)
    meta = cm.read_meta(chosen)
    phase, tag = cm.phase_and_tag(run)
    base_dir = run.parent.parent if run.parent.name in cm.PHASE_DIRS else None
    step = chosen.step if chosen.step is not None else int(meta.get("step", 0))
    user = meta.get("user_config") or {}

    horizon = _horizon(meta, step, target_steps, cm.why_not_resumable(chosen.layout, chosen.directory, meta) is None)
    metrics = read_metrics(run)
    vals = _val_report(cm.list_checkpoints(run), metrics, meta, step, checks)
    reached, reached_warnings = _reached(metrics, step)
    step_time, time_source = _step_time(meta, metrics, step, step_times)
    resume = build_command(chosen, meta, phase, tag, step, base_dir,
                           horizon.target if horizon.source == "override" else None)
    warnings = [f"skipped newer step {s.step}: {s.reason}" for s in skipped]
    warnings += [*horizon.warnings, *vals.warnings, *reached_warnings]
    if base_dir is None and resume.command:
        warnings.append(f"{run} is not inside a nanochat base dir (<base>/base_checkpoints/<tag>): the training "
                        "script only finds checkpoints there")
    if resume.mode == "unsupported":
        warnings.append(resume.note)
    cmd, schedule, target, remaining = resume.command, horizon.schedule, horizon.target, horizon.remaining(step)
    return ResumePlan(
        run_dir=str(run), phase=phase, tag=tag, base_dir=str(base_dir) if base_dir else None, step=step,
        segment=int(meta["resume_segment"]) if isinstance(meta.get("resume_segment"), int) else 1,
        integrity_level=checks(chosen).level, files=tuple(p.name for p in chosen.files),
        val_bpb=vals.val, best_val_bpb=vals.best, best_val_step=vals.best_step, better_step=vals.better_step,
        better_command=_command_from(cmd, vals.better_step, step),
        model_config=dict(meta.get("model_config") or {}), training_config=dict(user),
        world_size=cm.expected_world_size(chosen, meta) or 1,
        target_steps=target, target_source=horizon.source, run_num_iterations=horizon.run_iters,
        remaining_steps=remaining, progress=(min(step / target, 1.0) if target else None),
        finished=bool(target) and step >= target, schedule=schedule,
        lr_multiplier=schedule.lr_multiplier(step) if schedule else None,
        schedule_phase=schedule.phase(step) if schedule else None,
        step_time_s=step_time, step_time_source=time_source,
        eta_s=(remaining * step_time if step_time is not None and remaining is not None else None),
        reached_step=reached, mode=resume.mode, mode_note=resume.note,
        command=cmd.line if cmd else None, command_argv=cmd.argv if cmd else (), command_env=cmd.env if cmd else {},
        script=cmd.argv[cmd.argv.index("-m") + 1] if cmd else None, script_note=resume.script_note,
        warnings=tuple(warnings), skipped=tuple(skipped),
        workbench_command=resume.workbench.line if resume.workbench else None,
        workbench_command_argv=resume.workbench.argv if resume.workbench else (),
        workbench_command_env=resume.workbench.env if resume.workbench else None,
        workbench_note=resume.workbench_note,
        approximate_resume=meta["approximate_resume"] if isinstance(meta.get("approximate_resume"), dict) else None,
    )


def step_of_file(path: Path) -> int | None:
    """The step a checkpoint file names (model_, meta_, optim_, trainstate_), None for anything else."""
    if not path.is_file():
        return None
    for pattern in (cm.MODEL_RE, cm.META_RE, cm.OPTIM_RE, cm.TRAIN_STATE_RE):
        if m := pattern.match(path.name):
            return int(m.group(1))
    return None


def _choose_checkpoint(run: Path, checkpoints: list[CheckpointFiles], checks: _Checks):
    """The newest checkpoint that passes its check, and the newer ones skipped (newest first)."""
    skipped: list[SkippedCheckpoint] = []
    for ckpt in reversed(checkpoints):
        result = checks(ckpt)
        if result.ok:
            return ckpt, skipped
        skipped.append(SkippedCheckpoint(ckpt.step, result.problems))
    raise NothingResumableError(f"no resumable checkpoint in {run}: all {len(checkpoints)} failed the "
                                f"{'deep' if checks.deep else 'quick'} check", tuple(skipped))


def _horizon(meta: dict, step: int, target_steps: int | None, commandable: bool = True) -> _Horizon:
    """How far the run goes, in its own terms or to the asked target, and its LR schedule."""
    user = meta.get("user_config") or {}
    run_iters = resolve_from_meta(meta)
    target, source = run_iters, ("meta" if isinstance(meta.get("num_iterations"), int) else "user_config")
    if target_steps is not None:
        if target_steps < step:
            own = f" (the run's own target is {run_iters})" if run_iters else ""
            raise TargetBelowStepError(f"target {target_steps} steps is below the resume step {step}: the run has "
                                       f"already trained {step} steps; ask for {step} or more{own}")
        target, source = int(target_steps), "override"
    schedule = schedule_from_user_config(user, target) if target else None
    warnings = []
    if source == "override" and run_iters and target != run_iters and step < target and commandable:
        before = schedule_from_user_config(user, run_iters).lr_multiplier(step)
        warnings.append(f"target {target} differs from the run's {run_iters} steps: the command passes "
                        f"--num-iterations={target}, which moves the LR schedule (multiplier at step {step}: "
                        f"{before:.4f} -> {schedule.lr_multiplier(step):.4f}, warmdown from step {schedule.warmdown_start})")
    if target and step >= target and commandable:
        warnings.append(f"the run is complete ({step} of {target} steps): to train longer pass a larger --target-steps")
    return _Horizon(target, source, run_iters, schedule, tuple(warnings))


def _val_report(checkpoints, metrics: list[dict], meta: dict, step: int, checks: _Checks) -> _ValReport:
    """val_bpb at the resume step against the best so far, and a better resumable step after a spike."""
    history = _val_history(checkpoints, metrics)
    so_far = {s: v for s, v in history.items() if s <= step}
    val = meta.get("val_bpb") if isinstance(meta.get("val_bpb"), (int, float)) else None
    best_step = min(so_far, key=lambda s: (so_far[s], -s)) if so_far else None
    best = so_far[best_step] if best_step is not None else None
    latest = val if val is not None else (so_far[max(so_far)] if so_far else None)
    if best is None or latest is None or latest <= best * SPIKE_RATIO:
        return _ValReport(val, best, best_step, None, ())
    better = _best_resumable(checkpoints, history, step, checks)
    hint = (f"; step {better} (val_bpb {history[better]:.4f}) is resumable: pass --resume-from-step={better} to "
            "continue from before the spike") if better is not None else ""
    return _ValReport(val, best, best_step, better, (
        f"loss spike: val_bpb {latest:.4f} at step {step} is {100 * (latest / best - 1):.0f}% worse than the best so "
        f"far ({best:.4f} at step {best_step}){hint}",))


def _reached(metrics: list[dict], step: int) -> tuple[int | None, list[str]]:
    """The step training had reached: a train row of step s trains step s (s+1 steps done), an eval row
    at s sees s steps done. Work past the checkpoint is trained again."""
    reached = max((r["step"] + (1 if "dt_ms" in r or "train_loss" in r else 0) for r in metrics), default=None)
    if reached is not None and reached > step:
        return reached, [f"training had reached step {reached} (metrics.jsonl): {reached - step} steps after the "
                         "checkpoint will be trained again"]
    return reached, []


def _command_from(cmd: Command | None, other_step: int | None, step: int) -> str | None:
    """The same command resuming from `other_step` instead of `step`."""
    if cmd is None or other_step is None:
        return None
    argv = tuple(f"--resume-from-step={other_step}" if a == f"--resume-from-step={step}" else a for a in cmd.argv)
    return Command(argv, cmd.env).line


def _best_resumable(checkpoints, history, step, checks: _Checks) -> int | None:
    """The resumable checkpoint at or before `step` with the lowest val_bpb, if clearly better."""
    candidates = sorted((history[c.step], -c.step, c) for c in checkpoints
                        if c.step is not None and c.step < step and c.step in history)
    for _, _, ckpt in candidates:
        if checks(ckpt).ok:
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
    if plan.approximate_resume:
        a = plan.approximate_resume
        lines.append(f"note: segment {a.get('segment')} continued upstream's step {a.get('from_step')} approximately "
                     f"(--allow-approximate): {a.get('reason')}")
    lines.append("command:" if plan.command else "command: none (nothing can resume this run)")
    if plan.command:
        lines.append(f"  {plan.command}")
    if plan.workbench_command:
        lines += ["or with the workbench's trainer (approximate once, exact from its first checkpoint on):",
                  f"  {plan.workbench_command}", f"  ({plan.workbench_note})"]
    if plan.better_command:
        lines += [f"or, from step {plan.better_step} before the loss spike:", f"  {plan.better_command}"]
    return "\n".join(lines)


__all__ = ["ResumePlan", "SkippedCheckpoint", "ResumePlanError", "NothingResumableError", "plan_resume", "format_plan",
           "TargetBelowStepError", "lr_curve", "find_run_dir", "read_metrics", "build_command"]
