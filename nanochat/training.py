"""
What every trainer of ours shares (scripts/base_train.py, scripts/chat_sft.py): the guarantees, once.

- Launch: `run_main` turns `TrainError` into one line on stderr and exit code 2 (`EXIT_USAGE`), on
  the rank that knows (see TrainError), and tears the process group down.
- Resume: `find_resume_point` picks the checkpoint `--resume` / `--resume-from-step` names and checks
  it can be continued exactly (our training state, the same world size); `restore_checkpoint` loads
  weights, every optimizer shard, this rank's data-loader position and RNG, all ranks agreeing first;
  `LoopState` is what changes from step to step besides them; `next_segment` numbers the launch.
- Saving: `save_step` writes model, every rank's optimizer shard and training state, then the meta
  (rank 0, last: it marks the step complete), each atomically, then `apply_retention`.
- The loop: `run_loop` evaluates, saves, honours a stop request (`StopRequest`: SIGTERM/SIGINT save
  and exit 0 with the resume command) and steps, logging each step to metrics.jsonl (`MetricsLog`) and
  the console with an ETA; what differs per trainer comes in a `LoopHooks`. `run_trainee` fills the
  hooks every trainer fills alike (`stop_command`, `save_trainee`), `record_eval` stores an evaluation.
- Exactness on CPU: `exact_kernels`, `match_cpu_threads`; `keep_freed_memory` for speed.
- Test hook: NANOCHAT_FAULT_KILL_AFTER="<model|optim|trainstate|meta>:<step>[:<rank>]" makes that rank
  SIGKILL itself right after writing that file (`fault_point`), to prove saves are crash-safe.

It does not know any trainer's flags (nanochat/train_config.py), data (dataloader.py, sft_data.py)
or model building; it never reads the registry.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint_manager as cm
from nanochat import distributed
from nanochat.dataloader import DataError
from nanochat.optim import OptimizerStateError
from nanochat.train_config import Trainer, launch_env, resume_command
from nanochat.train_state import TrainStateError, check_train_state, make_train_state, restore_rng

FAULT_ENV = "NANOCHAT_FAULT_KILL_AFTER"
EXIT_USAGE = 2


class TrainError(Exception):
    """A launch that cannot go ahead; the message is the one line the user sees. Most are found alike by
    every rank and printed by rank 0; `local` ones (a rank's own file) are printed by that rank, and
    `quiet` ones end the ranks that only learned that another rank failed."""

    def __init__(self, message: str, local: bool = False, quiet: bool = False):
        super().__init__(message)
        self.local, self.quiet = local, quiet


def run_main(device_flag: str, train: Callable[[distributed.DistInfo], int]) -> int:
    """Join the process group, run `train(dist_info)`, and say a TrainError in one line (exit 2)."""
    keep_freed_memory()
    try:
        device_type = distributed.resolve_device_type(device_flag)
        dist_info = distributed.init_distributed(device_type)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return train(dist_info)
    except TrainError as e:
        if e.local and dist_info.is_distributed:
            print(f"error: rank {dist_info.rank}: {e}", file=sys.stderr, flush=True)
        elif dist_info.master and not e.quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------------- which checkpoint, which run directory


def check_new_run_dir(ckpt_dir: Path) -> None:
    existing = cm.list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    if existing or (ckpt_dir / "metrics.jsonl").exists():
        steps = ", ".join(str(c.step) for c in existing[-4:]) or "none"
        raise TrainError(f"{ckpt_dir} already holds a run (checkpoint steps: {steps}); continue it with --resume, "
                         "or choose another --model-tag")


def next_segment(ckpt_dir: Path, meta: dict) -> int:
    """One more than any segment this run has logged, so segments grow per launch even when a resume
    goes back to an older checkpoint (readers take each step's newest segment)."""
    from nanochat import bounds

    seen = [int(meta.get("resume_segment") or 1)]
    path = ckpt_dir / "metrics.jsonl"
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    seg = bounds.loads(line).get("segment")
                except (ValueError, AttributeError):
                    continue  # a torn last line, or one nested too deep to be ours
                if isinstance(seg, int) and 0 < seg < bounds.MAX_STEP:
                    seen.append(seg)
    return max(seen) + 1


def find_resume_point(ckpt_dir: Path, resume_from_step: int, world_size: int, master: bool,
                      script: str, allow_approximate: bool | None = None) -> tuple[cm.CheckpointFiles, dict]:
    """The checkpoint --resume (resume_from_step < 0) or --resume-from-step names, and its meta, checked
    for an exact resume by `script` (named in the advice on a world-size mismatch). `allow_approximate`
    (base_train's --allow-approximate; None: the trainer has no such flag): also take a checkpoint
    upstream wrote, which has no training state, from any world size (`restore_checkpoint(approximate=True)`)."""
    try:
        found = cm.list_checkpoints(ckpt_dir)
    except cm.CheckpointError:
        found = []
    if not found:
        raise TrainError(f"nothing to resume: no checkpoints in {ckpt_dir}")
    if resume_from_step >= 0:
        matches = [c for c in found if c.step == resume_from_step and c.layout == "upstream"]
        if not matches:
            have = ", ".join(str(c.step) for c in found[-6:])
            raise TrainError(f"no step {resume_from_step} in {ckpt_dir} (steps there: {have})")
        ckpt = matches[0]
        problems = cm.quick_problems(ckpt)
        if problems:
            raise TrainError(f"cannot resume from {ckpt.label}: {problems[0].message}")
    else:
        try:  # the newest step that passes the one quick check, as the resume planner picks it
            usable = cm.find_last_usable(ckpt_dir, resumable=True)
        except cm.CheckpointError as e:
            raise TrainError(f"nothing to resume: {e}") from None
        ckpt = usable.checkpoint
        for note in usable.notes() if master else ():
            print(f"note: {note}", file=sys.stderr, flush=True)
    try:
        meta = cm.read_meta(ckpt)
    except cm.CheckpointError as e:
        raise TrainError(f"cannot resume from {ckpt.label}: {e}") from None
    if not meta.get("train_state"):
        if not allow_approximate:
            advice = ("; add --allow-approximate to continue it as upstream's own resume would (weights, optimizer, "
                      "step and upstream's data position)" if allow_approximate is False else "")
            raise TrainError(f"{ckpt.label} has no training state (RNG, data position): it was not written by this "
                             f"trainer, so it cannot be resumed exactly{advice}")
        if (why := cm.why_not_resumable(ckpt.layout, ckpt.directory, meta)) is not None:
            raise TrainError(f"cannot resume {ckpt.label}, even approximately: {why}")
        return ckpt, meta  # upstream's optimizer files load onto any world size (MuonAdamW.load_shards)
    saved_world = cm.expected_world_size(ckpt, meta)
    if saved_world != world_size:
        how = (f"torchrun --standalone --nproc_per_node={saved_world} -m {script} -- ..."
               if saved_world > 1 else f"python -m {script} ... (one process)")
        raise TrainError(f"{ckpt.label} was trained by {saved_world} process(es) but this launch has {world_size}; "
                         f"resume it with {how}")
    return ckpt, meta


# ---------------------------------------------------------------------- the loop's state, restoring it


@dataclass
class LoopState:
    """What changes from step to step besides the weights, optimizer and RNG; saved with each checkpoint."""

    step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = math.inf
    smooth_loss: float = 0.0  # EMA of the train loss (debiased when printed)
    total_time: float = 0.0  # seconds of training after the first 10 steps, as upstream counts it
    last_eval_step: int | None = None

    def meta(self) -> dict:
        return {"min_val_bpb": self.min_val_bpb, "smooth_train_loss": self.smooth_loss,
                "total_training_time": self.total_time}

    @classmethod
    def from_checkpoint(cls, step: int, meta: dict, train_state: dict) -> LoopState:
        loop = meta.get("loop_state") or {}
        best = loop.get("min_val_bpb")  # the meta reader gives null for the Infinity written before any evaluation
        return cls(step=step, val_bpb=meta.get("val_bpb"), min_val_bpb=math.inf if best is None else float(best),
                   smooth_loss=float(loop.get("smooth_train_loss", 0.0)),
                   total_time=float(loop.get("total_training_time", 0.0)),
                   last_eval_step=train_state["last_eval_step"] if train_state["last_eval_step"] >= 0 else None)


def restore_checkpoint(ckpt: cm.CheckpointFiles, meta: dict, model, optimizer, loader,
                       dist_info: distributed.DistInfo, approximate: bool = False) -> LoopState:
    """Weights, optimizer shard, data position, RNG and loop state of the checkpoint being resumed.
    `loader` is any loader with `load_state_dict` (DataError when the state does not fit it).
    `approximate`: a checkpoint upstream wrote (no training state): the weights, the optimizer from its
    files of any world size, the loop state and upstream's data position (`loader.resume_upstream`); no RNG."""
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    failure, shared = None, False
    try:
        weights = cm.load_state_dict(ckpt, device)
        cm.config_from_checkpoint(meta, {k: v.shape for k, v in weights.items()})
        model.load_state_dict(weights, strict=True)
        saved_world = cm.expected_world_size(ckpt, meta) if approximate else world
        optimizer.load_shards([cm.torch_load(ckpt.optimizer_shards[r]) for r in range(saved_world)])
        if approximate:
            ts = {"last_eval_step": -1}  # upstream evaluates again at the step it resumes, so do we
            if meta.get("dataloader_state_dict") is not None:  # none (older upstream): from the first shard
                loader.resume_upstream(meta["dataloader_state_dict"])
        else:
            ts = check_train_state(cm.torch_load(ckpt.train_states[rank]), rank=rank, world_size=world, step=ckpt.step)
            loader.load_state_dict(ts["loader"])
    except (cm.CheckpointError, OptimizerStateError, TrainStateError, DataError, RuntimeError) as e:
        failure = f"cannot resume from {ckpt.label}: {str(e).splitlines()[0]}"
        shared = isinstance(e, OptimizerStateError)  # every rank reads every optimizer file: rank 0 says it
    # Each rank reads its own shard: all must agree before anyone waits for the others in a collective.
    failed = distributed.all_reduce_sum(torch.tensor([float(failure is not None)], device=device)).item()
    if failure is not None:
        raise TrainError(failure, local=not shared)
    if failed:
        raise TrainError("another rank could not resume", quiet=True)
    if not approximate:
        restore_rng(ts["rng"])
        if device.type == "cpu":
            match_cpu_threads(ts.get("cpu_threads"), ckpt.label, dist_info.master)
    return LoopState.from_checkpoint(ckpt.step, meta, ts)


def match_cpu_threads(threads: int | None, label: str, master: bool) -> None:
    """CPU reductions depend on the thread count: match the checkpoint's unless the user chose one."""
    if not threads or threads == torch.get_num_threads():
        return
    if "OMP_NUM_THREADS" in os.environ:
        if master:
            print(f"note: {label} was trained with {threads} CPU thread(s) per process and OMP_NUM_THREADS asks for "
                  f"{torch.get_num_threads()}: the continuation will differ in the last bits (OMP_NUM_THREADS={threads} "
                  "makes the resume bit-exact)", file=sys.stderr, flush=True)
    else:
        torch.set_num_threads(threads)
        distributed.print0(f"using {threads} CPU thread(s) per process, as when {label} was written (bit-exact resume)")


def exact_kernels(device_type: str) -> None:
    """Run-to-run identical kernels, which exact resume needs (on CPU; CUDA runs are as exact as upstream's)."""
    if device_type != "cpu":
        return
    torch.use_deterministic_algorithms(True)
    # ... without its debugging aid of filling every new tensor with NaN: no kernel of ours reads memory it
    # did not write, and those fills are 4 in 5 of a step's fill_ calls (profiled at the demo's scale)
    torch.utils.deterministic.fill_uninitialized_memory = False


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of unmapping it: the step's large tensors (logits and
    their gradients, tens of MB) are otherwise mapped, faulted in and unmapped again on every micro-step,
    which cost ~20% of a CPU step in the kernel (measured: 4.3 s of sys per 16 s of user, 0.5 s with this)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the top of the heap back
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the heap, not mmap
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


# ---------------------------------------------------------------------- signals, faults, metrics


class StopRequest:
    """SIGTERM/SIGINT: ask the loop to save and stop; a second signal a second later exits at once.
    (torchrun forwards a Ctrl-C to its workers as SIGTERM right after the terminal's SIGINT; that
    echo must not count as the second signal.)"""

    def __init__(self):
        self.signal_name: str | None = None
        self.at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.signal_name is not None:
            if now - self.at > 1.0:
                print(f"second signal ({signal.Signals(signum).name}): exiting now; the last complete checkpoint stands",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        self.signal_name, self.at = signal.Signals(signum).name, now
        print(f"{self.signal_name} received: finishing this step, then saving a checkpoint "
              "(signal again to exit at once)", file=sys.stderr, flush=True)


def fault_point(what: str, step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == what and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed, so a crash loses at most a line."""

    def __init__(self, path: Path, segment: int):
        self.f = open(path, "a", encoding="utf-8")
        self.segment = segment

    def write(self, step: int, **values) -> None:
        row = {"step": step, "segment": self.segment, "wall_time": time.time(), **values}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------- saving


def save_step(ckpt_dir: Path, step: int, dist_info: distributed.DistInfo, model, optimizer, loader,
              last_eval_step: int | None, meta: Callable[[], dict], keep_last: int, protected: set[int]) -> list[int]:
    """Model, every rank's optimizer shard and training state, then the meta (rank 0, last: it marks the
    step complete), then retention; returns the steps retention removed (rank 0). Barriers keep the
    order across ranks. `meta` is called on rank 0 only, after every shard is on disk."""
    rank, world, master = dist_info.rank, dist_info.world_size, dist_info.master
    if master:
        cm.invalidate_step(ckpt_dir, step)
    distributed.barrier()
    if master:
        cm.save_model(ckpt_dir, step, model.state_dict())
        fault_point("model", step, rank)
    cm.save_optimizer_shard(ckpt_dir, step, rank, optimizer.state_dict())
    fault_point("optim", step, rank)
    cm.save_train_state(ckpt_dir, step, rank, make_train_state(
        rank=rank, world_size=world, step=step, loader_state=loader.state_dict(), last_eval_step=last_eval_step))
    fault_point("trainstate", step, rank)
    distributed.barrier()  # every shard is on disk before the meta says the step is complete
    deleted = []
    if master:
        cm.write_meta(ckpt_dir, step, meta())
        fault_point("meta", step, rank)
        deleted = apply_retention(ckpt_dir, keep_last, protected)
        distributed.print0(f"saved step {step} to {ckpt_dir}" + (f" (removed steps {deleted})" if deleted else ""))
    distributed.barrier()
    return deleted


def apply_retention(ckpt_dir: Path, keep_last: int, protected: set[int]) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep_last`, never the best val_bpb one nor the
    protected steps (the resume point, the step just written). Meta goes first: a half-deleted step is
    incomplete, never a broken "complete" one."""
    if keep_last <= 0:
        return []
    complete = []
    for c in cm.list_checkpoints(ckpt_dir):
        if c.layout == "upstream" and not any(p.blocks == "load" for p in cm.quick_problems(c)):
            complete.append((c, cm.read_meta(c)))
    scored = [(m["val_bpb"], c.step) for c, m in complete if isinstance(m.get("val_bpb"), (int, float))
              and math.isfinite(m["val_bpb"])]
    keep = set(protected) | {c.step for c, _ in complete[-keep_last:]}
    if scored:
        keep.add(min(scored)[1])
    deleted = []
    for c, _ in complete:
        if c.step in keep:
            continue
        for path in [c.meta, *[p for p in c.files if p != c.meta]]:
            path.unlink(missing_ok=True)
        deleted.append(c.step)
    return deleted


# ---------------------------------------------------------------------- the loop


@dataclass
class LoopHooks:
    """What a trainer's loop does that another's does not; `run_loop` decides when."""

    num_iterations: int
    start_step: int  # the step this launch starts at (the resume point, or 0)
    resumed: bool
    eval_every: int
    save_every: int
    tokens_per_step: int  # for tok/s
    dist: distributed.DistInfo
    optimizer: object  # MuonAdamW: set_schedule(lrm, momentum, weight_decay)
    hyper: Callable[[int], tuple[float, float, float]]  # step -> (LR multiplier, Muon momentum, Muon weight decay)
    train_step: Callable[[], torch.Tensor]  # one optimizer step; this rank's mean loss
    evaluate: Callable[[LoopState], None]  # sets state.val_bpb (and logs it)
    save: Callable[[LoopState], None]
    resume_command: Callable[[int], str]  # the line that resumes from a step
    checkpoint_dir: Path


def run_loop(h: LoopHooks, state: LoopState, stop: StopRequest, metrics: MetricsLog | None) -> int:
    """Evaluate, save and step until the last step or a stop request; each decision reads the loop state."""
    n, start = h.num_iterations, h.start_step
    step_times: list[float] = []  # this launch's, for the ETA
    while True:
        step = state.step
        last_step = step == n
        stopping = stop.signal_name is not None and step > start
        if h.eval_every > 0 and not stopping and (last_step or step % h.eval_every == 0) \
                and not (step == start and state.last_eval_step == step):
            h.evaluate(state)
        if last_step or stopping or (step > 0 and not (h.resumed and step == start) and h.save_every > 0
                                     and step % h.save_every == 0):
            h.save(state)
        if last_step:
            break
        if stopping:
            distributed.print0(f"stopped by {stop.signal_name} at step {step}; checkpoint saved. Resume with:\n"
                               f"  {h.resume_command(step)}")
            return 0
        t0 = time.time()
        lrm, momentum, weight_decay = h.hyper(step)
        h.optimizer.set_schedule(lrm, momentum, weight_decay)
        train_loss = shared_loss(h.dist, h.train_step(), stop)
        dt = time.time() - t0
        if step > start:  # the first step of a launch pays for warm-up (and compilation)
            step_times.append(dt)
        log_step(state, n, h.tokens_per_step, train_loss, lrm, dt, step_times, metrics)
        state.step += 1
    distributed.print0(f"done: {n} steps, val bpb {state.val_bpb if state.val_bpb is None else round(state.val_bpb, 4)}, "
                       f"checkpoints in {h.checkpoint_dir}")
    return 0


def run_trainee(t, trainer: Trainer, state: LoopState, stop: StopRequest, metrics: MetricsLog | None,
                hyper: Callable[[int], tuple[float, float, float]], train_one: Callable[[], torch.Tensor],
                evaluate: Callable[[LoopState], None], meta: Callable[[LoopState], dict]) -> int:
    """`run_loop` for a trainer's `t` (its `plan`: args, num_iterations, start_step, resume,
    total_batch_size, user_config, checkpoint_dir; `dist`, `model`, `optimizer`, `loader`): what differs
    per trainer is the schedule (`hyper`), the step, the evaluation and the meta."""
    plan = t.plan
    threads = torch.get_num_threads() if t.dist.device.type == "cpu" else None
    hooks = LoopHooks(
        num_iterations=plan.num_iterations, start_step=plan.start_step, resumed=plan.resume is not None,
        eval_every=plan.args.eval_every, save_every=plan.args.save_every, tokens_per_step=plan.total_batch_size,
        dist=t.dist, optimizer=t.optimizer, hyper=hyper, train_step=train_one, evaluate=evaluate,
        save=lambda s: save_trainee(t, s, meta),
        resume_command=lambda step: stop_command(trainer, plan.user_config, plan.checkpoint_dir, t.dist.world_size,
                                                 threads, step),
        checkpoint_dir=plan.checkpoint_dir)
    return run_loop(hooks, state, stop, metrics)


def stop_command(trainer: Trainer, user_config: dict, checkpoint_dir: Path, world_size: int, cpu_threads: int | None,
                 step: int) -> str:
    """The command that resumes a run from `step`, built as the registry's resume planner builds it
    (same builder, same inputs: the base dir and tag from the checkpoint directory), so both say the same."""
    return resume_command(trainer, user_config, world_size=world_size, resume_step=step,
                          env=launch_env(checkpoint_dir.parent.parent, cpu_threads),
                          overrides={"model_tag": checkpoint_dir.name}).line


def save_trainee(t, state: LoopState, meta: Callable[[LoopState], dict]) -> None:
    """`save_step` for the loop's step; retention spares it and this launch's resume point."""
    plan = t.plan
    protected = {state.step} | ({plan.start_step} if plan.resume is not None else set())
    save_step(plan.checkpoint_dir, state.step, t.dist, t.model, t.optimizer, t.loader, state.last_eval_step,
              lambda: meta(state), plan.args.keep_last, protected)


def record_eval(state: LoopState, val_bpb: float, line: str, metrics: MetricsLog | None) -> None:
    """An evaluation at the loop's step: into the loop state (a non-finite val bpb is never the best),
    then `line` (formatted with step and val_bpb) on the console and the value in metrics.jsonl."""
    state.val_bpb = val_bpb
    if math.isfinite(val_bpb):
        state.min_val_bpb = min(state.min_val_bpb, val_bpb)
    state.last_eval_step = state.step
    distributed.print0(line.format(step=state.step, val_bpb=val_bpb))
    if metrics:
        metrics.write(state.step, val_bpb=val_bpb)


def shared_loss(dist_info: distributed.DistInfo, loss: torch.Tensor, stop: StopRequest) -> float:
    """One collective per step: the mean loss over ranks, and whether any rank was asked to stop."""
    shared = torch.stack([loss, torch.tensor(float(stop.signal_name is not None), device=dist_info.device)])
    distributed.all_reduce_sum(shared)
    if shared[1].item() > 0 and stop.signal_name is None:
        stop.signal_name = "a stop request on another rank"
    return shared[0].item() / dist_info.world_size


def log_step(state: LoopState, n: int, tokens_per_step: int, train_loss: float, lrm: float, dt: float,
             step_times: list[float], metrics: MetricsLog | None) -> None:
    step = state.step
    state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * train_loss
    debiased = state.smooth_loss / (1 - 0.9 ** (step + 1))
    if step > 10:
        state.total_time += dt
    avg = sum(step_times) / len(step_times) if step_times else dt
    tok_per_sec = tokens_per_step / dt
    if metrics:  # the file first: whoever sees the console line can rely on the row being on disk
        metrics.write(step, train_loss=train_loss, lrm=lrm, tok_per_sec=tok_per_sec, dt_ms=dt * 1000)
    distributed.print0(f"step {step:05d}/{n:05d} ({100 * (step + 1) / n:5.1f}%) | loss {debiased:.4f} | lrm {lrm:.2f} | "
                       f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | eta {fmt_duration((n - step - 1) * avg)}")


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
