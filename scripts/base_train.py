"""
Pretrain a base model with exact, crash-proof resume.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- --depth 4 ...
    python -m scripts.base_train --model-tag d4 --resume          # continue the latest resumable step

Upstream's flags and defaults (nanochat's current base_train), plus `--resume`, `--keep-last`, `--device`,
`--seed` and `--compile`. Data: parquet shards in `$NANOCHAT_BASE_DIR/base_data_climbmix/` or `base_data/`;
tokenizer: `$NANOCHAT_BASE_DIR/tokenizer/`; checkpoints: `$NANOCHAT_BASE_DIR/base_checkpoints/<tag>/`.

Each checkpoint is upstream's (model, meta, one optimizer shard per rank) plus `trainstate_{step}_rank{r}.pt`
(RNG states and the data loader's exact position). Files are written atomically in the order model,
optimizer shards and training states (every rank), then the meta by rank 0 last, which marks the step
complete. A resume restores weights, optimizer, RNG, data position and loop state, so the final weights
are bit-identical to an uninterrupted run (same world size and device).

When resuming, flags not given on the command line take the checkpoint's values (`user_config`); flags
that would change the model, a different world size, or a missing shard stop with one line on stderr
and exit code 2 before anything on disk is touched. SIGTERM or SIGINT: finish the step, save, print the
resume command, exit 0; a second signal (more than a second later) exits at once.

Per-step metrics are appended to `<checkpoint dir>/metrics.jsonl` (rank 0). Training never needs the
registry database. Test hook: NANOCHAT_FAULT_KILL_AFTER="<model|optim|trainstate|meta>:<step>[:<rank>]"
makes that rank SIGKILL itself right after writing that file, to prove saves are crash-safe.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint_manager as cm
from nanochat import distributed
from nanochat.common import get_base_dir
from nanochat.dataloader import BosBestFitLoader, DataError, find_data_dir, list_parquet_files, split_files
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_config import ArchitectureError, GPTConfig
from nanochat.optim import LearningRates, MuonAdamW, OptimizerStateError, muon_momentum, muon_weight_decay, param_groups_for
from nanochat.schedule import schedule_from_user_config
from nanochat.tokenizer import Tokenizer, TokenizerError
from nanochat.train_config import (
    BASE_TRAIN,
    CompileDecision,
    RunShape,
    compile_decision,
    launch_env,
    memory_problem,
    resume_command,
    run_shape,
    scaled_learning_rates,
)
from nanochat.train_state import TrainStateError, check_train_state, make_train_state, restore_rng

FAULT_ENV = "NANOCHAT_FAULT_KILL_AFTER"
EXIT_USAGE = 2
build_parser = BASE_TRAIN.build_parser  # the flags, their defaults and help: nanochat/train_config.py
parse_args = BASE_TRAIN.parse_args


class TrainError(Exception):
    """A launch that cannot go ahead; the message is the one line the user sees. Most are found alike by
    every rank and printed by rank 0; `local` ones (a rank's own file) are printed by that rank, and
    `quiet` ones end the ranks that only learned that another rank failed."""

    def __init__(self, message: str, local: bool = False, quiet: bool = False):
        super().__init__(message)
        self.local, self.quiet = local, quiet


# ---------------------------------------------------------------------- launch planning (reads only)


@dataclass
class Plan:
    args: object  # argparse.Namespace, the checkpoint's flags merged in on a resume
    user_config: dict
    shape: RunShape
    checkpoint_dir: Path
    resume: cm.CheckpointFiles | None
    resume_meta: dict | None
    segment: int
    compile: CompileDecision

    @property
    def config(self) -> GPTConfig:
        return self.shape.config

    @property
    def num_iterations(self) -> int:
        return self.shape.num_iterations

    @property
    def total_batch_size(self) -> int:
        return self.shape.total_batch_size

    @property
    def grad_accum(self) -> int:
        return self.shape.grad_accum

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume is not None else 0


def plan_run(args, explicit: set[str], world_size: int, base_dir: Path, vocab_size: int, master: bool = True,
             device_type: str = "cpu") -> Plan:
    """Everything decided before the first write: which checkpoint to resume, the merged flags, the
    model, the batch arithmetic, whether to compile. Raises TrainError with a one-line reason."""
    if args.resume and args.resume_from_step >= 0:
        raise TrainError("use either --resume or --resume-from-step, not both")
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = base_dir / "base_checkpoints" / tag
    resume, meta = None, None
    if args.resume or args.resume_from_step >= 0:
        resume, meta = _find_resume_point(ckpt_dir, args, world_size, master)
        for k, v in BASE_TRAIN.inherited(meta.get("user_config") or {}, explicit).items():
            setattr(args, k, v)
    user_config = dict(vars(args))
    if problems := BASE_TRAIN.problems(user_config):  # the flags' own rules, for values a checkpoint gave too
        raise TrainError(problems[0] + (f" (from {resume.label}'s user_config)" if resume is not None else ""))
    try:
        shape = run_shape(user_config, vocab_size=vocab_size, world_size=world_size)
    except (ArchitectureError, ZeroDivisionError) as e:
        raise TrainError(f"invalid model flags: {e}") from None
    if why := memory_problem(shape, distributed.device_memory_bytes(device_type),
                             "the CUDA device's memory" if device_type == "cuda" else "the machine's RAM"):
        raise TrainError(why)
    if meta is not None:
        _check_same_model(resume, meta, shape.config)
    if shape.problems:
        raise TrainError(shape.problems[0])
    if resume is None:
        _check_new_run_dir(ckpt_dir)
    segment = next_segment(ckpt_dir, meta) if meta else 1
    saved = meta.get("compiled", device_type == "cuda") if meta else None  # before "compiled" was recorded: auto's rule
    decision = compile_decision(args.compile, device_type, shape, shape.num_iterations - (resume.step if resume else 0),
                                saved=saved)
    return Plan(args, user_config, shape, ckpt_dir, resume, meta, segment, decision)


def _check_same_model(resume, meta: dict, config: GPTConfig) -> None:
    saved = meta.get("model_config") or {}
    wanted = config.upstream_dict()
    diff = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise TrainError(f"{resume.label} was trained with a different model ({', '.join(diff)}); "
                         "drop the changed flags to resume, or start a new --model-tag")


def _check_new_run_dir(ckpt_dir: Path) -> None:
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


def _find_resume_point(ckpt_dir: Path, args, world_size: int, master: bool) -> tuple[cm.CheckpointFiles, dict]:
    """The checkpoint --resume or --resume-from-step names, and its meta, checked for an exact resume."""
    try:
        found = cm.list_checkpoints(ckpt_dir)
    except cm.CheckpointError:
        found = []
    if not found:
        raise TrainError(f"nothing to resume: no checkpoints in {ckpt_dir}")
    if args.resume_from_step >= 0:
        matches = [c for c in found if c.step == args.resume_from_step and c.layout == "upstream"]
        if not matches:
            have = ", ".join(str(c.step) for c in found[-6:])
            raise TrainError(f"no step {args.resume_from_step} in {ckpt_dir} (steps there: {have})")
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
        raise TrainError(f"{ckpt.label} has no training state (RNG, data position): it was not written by this "
                         "trainer, so it cannot be resumed exactly")
    saved_world = cm.expected_world_size(ckpt, meta)
    if saved_world != world_size:
        how = (f"torchrun --standalone --nproc_per_node={saved_world} -m scripts.base_train -- ..."
               if saved_world > 1 else "python -m scripts.base_train ... (one process)")
        raise TrainError(f"{ckpt.label} was trained by {saved_world} process(es) but this launch has {world_size}; "
                         f"resume it with {how}")
    return ckpt, meta


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


# ---------------------------------------------------------------------- training


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


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        device_type = distributed.resolve_device_type(args.device_type)
        dist_info = distributed.init_distributed(device_type)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return train(args, explicit, dist_info)
    except TrainError as e:
        if e.local and dist_info.is_distributed:
            print(f"error: rank {dist_info.rank}: {e}", file=sys.stderr, flush=True)
        elif dist_info.master and not e.quiet:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        distributed.cleanup()


def exact_kernels(device_type: str) -> None:
    """Run-to-run identical kernels, which exact resume needs (on CPU; CUDA runs are as exact as upstream's)."""
    if device_type != "cpu":
        return
    torch.use_deterministic_algorithms(True)
    # ... without its debugging aid of filling every new tensor with NaN: no kernel of ours reads memory it
    # did not write, and those fills are 4 in 5 of a step's fill_ calls (profiled at the demo's scale)
    torch.utils.deterministic.fill_uninitialized_memory = False


@dataclass(frozen=True)
class Inputs:
    """What training reads besides checkpoints: the tokenizer and the data shards."""

    base_dir: Path
    tokenizer: Tokenizer
    token_bytes: torch.Tensor  # bytes per token id, for val bpb
    train_files: list
    val_files: list


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


@dataclass
class Trainee:
    """The model and what trains it, for one process."""

    plan: Plan
    dist: distributed.DistInfo
    inputs: Inputs
    model: GPT
    optimizer: MuonAdamW
    loader: BosBestFitLoader
    weight_decay: float  # Muon's at step 0, after scaling
    fwd: object = None  # the model or its torch.compile'd wrapper

    @property
    def master(self) -> bool:
        return self.dist.master


def train(args, explicit: set[str], dist_info) -> int:
    """One launch: plan (reads only), build the model, restore a checkpoint, then train and save."""
    inputs = open_inputs(get_base_dir(), dist_info.device)
    plan = plan_run(args, explicit, dist_info.world_size, inputs.base_dir, inputs.tokenizer.get_vocab_size(),
                    dist_info.master, dist_info.device.type)
    exact_kernels(dist_info.device.type)
    torch.manual_seed(plan.args.seed)
    t = build_trainee(plan, inputs, dist_info)
    state = restore(t) if plan.resume is not None else LoopState()
    if plan.resume is not None and state.step >= plan.num_iterations:
        if state.step > plan.num_iterations:
            raise TrainError(f"{plan.resume.label} is already past --num-iterations {plan.num_iterations}")
        distributed.print0(f"{plan.resume.label} is the last step of this run ({plan.num_iterations}); nothing to do "
                           "(raise --num-iterations to train longer)")
        return 0
    t.fwd = torch.compile(t.model, dynamic=False) if plan.compile.compile else t.model
    # From here on we write: the checkpoint directory, metrics.jsonl, checkpoints.
    if dist_info.master:
        plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    metrics = MetricsLog(plan.checkpoint_dir / "metrics.jsonl", plan.segment) if dist_info.master else None
    stop = StopRequest()
    stop.install()
    announce(t)
    try:
        return training_loop(t, state, stop, metrics)
    finally:
        if metrics:
            metrics.close()


def open_inputs(base_dir: Path, device) -> Inputs:
    try:
        tokenizer = Tokenizer.from_directory(base_dir / "tokenizer")
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
        files = list_parquet_files(find_data_dir(base_dir))
        return Inputs(base_dir, tokenizer, token_bytes, split_files(files, "train"), split_files(files, "val"))
    except (TokenizerError, DataError) as e:
        raise TrainError(str(e)) from None


def build_trainee(plan: Plan, inputs: Inputs, dist_info) -> Trainee:
    """A freshly initialised model, its optimizer with upstream's scaled learning rates, and the data loader."""
    args, rank, world, device = plan.args, dist_info.rank, dist_info.world_size, dist_info.device
    model = GPT(plan.config).to(device)
    model.init_weights(seed=args.seed)
    rates = scaled_learning_rates(plan.user_config, plan.shape)
    lrs = LearningRates(embedding=rates.embedding, unembedding=rates.unembedding, matrix=rates.matrix,
                        scalar=rates.scalar, weight_decay=rates.weight_decay)
    optimizer = MuonAdamW(model, param_groups_for(model, lrs), rank=rank, world_size=world)
    loader = BosBestFitLoader(inputs.train_files, inputs.tokenizer, args.device_batch_size, args.max_seq_len, rank,
                              world, device)
    return Trainee(plan, dist_info, inputs, model, optimizer, loader, rates.weight_decay)


def restore(t: Trainee) -> LoopState:
    """Weights, optimizer shard, data position, RNG and loop state of the checkpoint being resumed."""
    ckpt, meta = t.plan.resume, t.plan.resume_meta
    rank, world, device = t.dist.rank, t.dist.world_size, t.dist.device
    failure, shared = None, False
    try:
        weights = cm.load_state_dict(ckpt, device)
        cm.config_from_checkpoint(meta, {k: v.shape for k, v in weights.items()})
        t.model.load_state_dict(weights, strict=True)
        t.optimizer.load_shards([cm.torch_load(ckpt.optimizer_shards[r]) for r in range(world)])
        ts = check_train_state(cm.torch_load(ckpt.train_states[rank]), rank=rank, world_size=world, step=ckpt.step)
        t.loader.load_state_dict(ts["loader"])
    except (cm.CheckpointError, OptimizerStateError, TrainStateError, DataError, RuntimeError) as e:
        failure = f"cannot resume from {ckpt.label}: {str(e).splitlines()[0]}"
        shared = isinstance(e, OptimizerStateError)  # every rank reads every optimizer file: rank 0 says it
    # Each rank reads its own shard: all must agree before anyone waits for the others in a collective.
    failed = distributed.all_reduce_sum(torch.tensor([float(failure is not None)], device=device)).item()
    if failure is not None:
        raise TrainError(failure, local=not shared)
    if failed:
        raise TrainError("another rank could not resume", quiet=True)
    restore_rng(ts["rng"])
    if device.type == "cpu":
        match_cpu_threads(ts.get("cpu_threads"), ckpt.label, t.master)
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


def announce(t: Trainee) -> None:
    plan, cfg = t.plan, t.plan.config
    distributed.print0(
        f"model {plan.checkpoint_dir.name}: {plan.shape.params['total']:,} parameters (depth {cfg.n_layer}, width "
        f"{cfg.n_embd}, vocab {cfg.vocab_size}), {plan.num_iterations} steps of {plan.total_batch_size:,} tokens, "
        f"{plan.grad_accum} micro-step(s) x {t.dist.world_size} process(es), {t.dist.device.type}"
        f"{', compiled' if plan.compile.compile else ''} ({plan.compile.reason})")
    if plan.resume is not None:
        distributed.print0(f"resuming {plan.resume.label} (segment {plan.segment})")


def stop_command(user_config: dict, checkpoint_dir: Path, world_size: int, cpu_threads: int | None, step: int) -> str:
    """The command that resumes this run from `step`, built as the registry's resume planner builds it
    (same builder, same inputs: the base dir and tag from the checkpoint directory), so both say the same."""
    return resume_command(BASE_TRAIN, user_config, world_size=world_size, resume_step=step,
                          env=launch_env(checkpoint_dir.parent.parent, cpu_threads),
                          overrides={"model_tag": checkpoint_dir.name}).line


def training_loop(t: Trainee, state: LoopState, stop: StopRequest, metrics: MetricsLog | None) -> int:
    """Evaluate, save and step until the last step or a stop request; each decision reads the loop state."""
    plan, args = t.plan, t.plan.args
    n, start = plan.num_iterations, plan.start_step
    resumed = plan.resume is not None
    schedule = schedule_from_user_config(plan.user_config, n)
    step_times: list[float] = []  # this launch's, for the ETA
    while True:
        step = state.step
        last_step = step == n
        stopping = stop.signal_name is not None and step > start
        if args.eval_every > 0 and not stopping and (last_step or step % args.eval_every == 0) \
                and not (step == start and state.last_eval_step == step):
            evaluate(t, state, metrics)
        if last_step or stopping or (step > 0 and not (resumed and step == start) and args.save_every > 0
                                     and step % args.save_every == 0):
            save_checkpoint(t, state)
        if last_step:
            break
        if stopping:
            threads = torch.get_num_threads() if t.dist.device.type == "cpu" else None
            distributed.print0(f"stopped by {stop.signal_name} at step {step}; checkpoint saved. Resume with:\n"
                               f"  {stop_command(plan.user_config, plan.checkpoint_dir, t.dist.world_size, threads, step)}")
            return 0
        t0 = time.time()
        lrm = schedule.lr_multiplier(step)
        t.optimizer.set_schedule(lrm, muon_momentum(step, n, schedule.warmdown_ratio),
                                 muon_weight_decay(step, n, t.weight_decay))
        train_loss = shared_loss(t, train_step(t.fwd, t.optimizer, t.loader, plan.grad_accum), stop)
        dt = time.time() - t0
        if step > start:  # the first step of a launch pays for warm-up (and compilation)
            step_times.append(dt)
        log_step(t, state, train_loss, lrm, dt, step_times, metrics)
        state.step += 1
    distributed.print0(f"done: {n} steps, val bpb {state.val_bpb if state.val_bpb is None else round(state.val_bpb, 4)}, "
                       f"checkpoints in {plan.checkpoint_dir}")
    return 0


def shared_loss(t: Trainee, loss: torch.Tensor, stop: StopRequest) -> float:
    """One collective per step: the mean loss over ranks, and whether any rank was asked to stop."""
    shared = torch.stack([loss, torch.tensor(float(stop.signal_name is not None), device=t.dist.device)])
    distributed.all_reduce_sum(shared)
    if shared[1].item() > 0 and stop.signal_name is None:
        stop.signal_name = "a stop request on another rank"
    return shared[0].item() / t.dist.world_size


def log_step(t: Trainee, state: LoopState, train_loss: float, lrm: float, dt: float, step_times: list[float],
             metrics: MetricsLog | None) -> None:
    step, n, tbs = state.step, t.plan.num_iterations, t.plan.total_batch_size
    state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * train_loss
    debiased = state.smooth_loss / (1 - 0.9 ** (step + 1))
    if step > 10:
        state.total_time += dt
    avg = sum(step_times) / len(step_times) if step_times else dt
    tok_per_sec = tbs / dt
    if metrics:  # the file first: whoever sees the console line can rely on the row being on disk
        metrics.write(step, train_loss=train_loss, lrm=lrm, tok_per_sec=tok_per_sec, dt_ms=dt * 1000)
    distributed.print0(f"step {step:05d}/{n:05d} ({100 * (step + 1) / n:5.1f}%) | loss {debiased:.4f} | lrm {lrm:.2f} | "
                       f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | eta {_fmt_duration((n - step - 1) * avg)}")


def evaluate(t: Trainee, state: LoopState, metrics: MetricsLog | None) -> None:
    args, rank, world = t.plan.args, t.dist.rank, t.dist.world_size
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    t.model.eval()
    val_loader = BosBestFitLoader(t.inputs.val_files, t.inputs.tokenizer, args.device_batch_size, args.max_seq_len,
                                  rank, world, t.dist.device)
    state.val_bpb = evaluate_bpb(t.model, iter(val_loader), eval_steps, t.inputs.token_bytes)  # eager: no recompile
    t.model.train()
    state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
    state.last_eval_step = state.step
    distributed.print0(f"step {state.step:05d} | val bpb {state.val_bpb:.4f}")
    if metrics:
        metrics.write(state.step, val_bpb=state.val_bpb)


def save_checkpoint(t: Trainee, state: LoopState) -> None:
    """Model, every rank's optimizer shard and training state, then the meta (rank 0, last: it marks the
    step complete), then retention. Barriers keep the order across ranks."""
    plan, rank, world, at = t.plan, t.dist.rank, t.dist.world_size, state.step
    ckpt_dir = plan.checkpoint_dir
    if t.master:
        cm.invalidate_step(ckpt_dir, at)
    distributed.barrier()
    if t.master:
        cm.save_model(ckpt_dir, at, t.model.state_dict())
        fault_point("model", at, rank)
    cm.save_optimizer_shard(ckpt_dir, at, rank, t.optimizer.state_dict())
    fault_point("optim", at, rank)
    cm.save_train_state(ckpt_dir, at, rank, make_train_state(
        rank=rank, world_size=world, step=at, loader_state=t.loader.state_dict(), last_eval_step=state.last_eval_step))
    fault_point("trainstate", at, rank)
    distributed.barrier()  # every shard is on disk before the meta says the step is complete
    if t.master:
        cm.write_meta(ckpt_dir, at, checkpoint_meta(t, state))
        fault_point("meta", at, rank)
        protected = {at} | ({plan.start_step} if plan.resume is not None else set())
        deleted = apply_retention(ckpt_dir, plan.args.keep_last, protected)
        distributed.print0(f"saved step {at} to {ckpt_dir}" + (f" (removed steps {deleted})" if deleted else ""))
    distributed.barrier()


def checkpoint_meta(t: Trainee, state: LoopState) -> dict:
    """Upstream's meta keys (so upstream's loader reads our checkpoints) plus what an exact resume needs."""
    plan, args = t.plan, t.plan.args
    return {
        "step": state.step,
        "val_bpb": state.val_bpb,
        "model_config": plan.config.upstream_dict(),
        "user_config": plan.user_config,
        "device_batch_size": args.device_batch_size,
        "max_seq_len": args.max_seq_len,
        "total_batch_size": plan.total_batch_size,
        "dataloader_state_dict": t.loader.upstream_state(),
        "loop_state": state.meta(),
        "world_size": t.dist.world_size,
        "num_iterations": plan.num_iterations,
        "resume_segment": plan.segment,
        "compiled": plan.compile.compile,  # a resume runs the same kernels (see train_config.compile_decision)
        "train_state": True,
        "workbench_version": 1,
    }


def train_step(fwd, optimizer, loader, grad_accum: int):
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss (a tensor).
    Batches are fetched here, not prefetched, so the loader's saved position is exactly the next batch."""
    loss_sum = None
    for _ in range(grad_accum):
        x, y = loader.next_batch()
        loss = fwd(x, y)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        (loss / grad_accum).backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss_sum / grad_accum


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    sys.exit(main())
