"""
Pretrain a base model with exact, crash-proof resume.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- --depth 4 ...
    python -m scripts.base_train --model-tag d4 --resume          # continue the latest resumable step
    python -m scripts.base_train --model-tag d20 --resume --allow-approximate   # a run upstream nanochat wrote

Upstream's flags and defaults (nanochat's current base_train), plus `--resume`, `--keep-last`, `--device`,
`--seed` and `--compile`. Data: parquet shards in `$NANOCHAT_BASE_DIR/base_data_climbmix/` or `base_data/`;
tokenizer: `$NANOCHAT_BASE_DIR/tokenizer/`; checkpoints: `$NANOCHAT_BASE_DIR/base_checkpoints/<tag>/`.

Each checkpoint is upstream's (model, meta, one optimizer shard per rank) plus `trainstate_{step}_rank{r}.pt`
(RNG states and the data loader's exact position). Files are written atomically in the order model,
optimizer shards and training states (every rank), then the meta by rank 0 last, which marks the step
complete. A resume restores weights, optimizer, RNG, data position and loop state, so the final weights
are bit-identical to an uninterrupted run (same world size and device).

A checkpoint upstream nanochat wrote has no RNG state and no exact data position: `--resume
--allow-approximate` continues it as upstream's own resume would (weights, optimizer from any world size,
step, loop state, and upstream's `dataloader_state_dict` position; no RNG), says so once, and records
`approximate_resume` in every later meta; the checkpoints it writes resume exactly.

When resuming, flags not given on the command line take the checkpoint's values (`user_config`); flags
that would change the model, a different world size, or a missing shard stop with one line on stderr
and exit code 2 before anything on disk is touched. SIGTERM or SIGINT: finish the step, save, print the
resume command, exit 0; a second signal (more than a second later) exits at once.

Per-step metrics are appended to `<checkpoint dir>/metrics.jsonl` (rank 0). Training never needs the
registry database. The guarantees (save order, signals, resume checks, the loop, the test hook
NANOCHAT_FAULT_KILL_AFTER) live in `nanochat/training.py`, shared with scripts/chat_sft.py.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint_manager as cm
from nanochat import distributed, training
from nanochat.common import get_base_dir
from nanochat.dataloader import BosBestFitLoader, DataError, find_data_dir, list_parquet_files, split_files
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_config import ArchitectureError, GPTConfig
from nanochat.optim import LearningRates, MuonAdamW, muon_momentum, muon_weight_decay, param_groups_for
from nanochat.schedule import schedule_from_user_config
from nanochat.tokenizer import Tokenizer, TokenizerError
from nanochat.train_config import (
    BASE_TRAIN,
    CompileDecision,
    RunShape,
    compile_decision,
    memory_problem,
    run_shape,
    scaled_learning_rates,
)
from nanochat.training import (  # the machinery every trainer of ours shares (also imported from here)
    LoopState,
    MetricsLog,
    StopRequest,
    TrainError,
    apply_retention,  # noqa: F401
    check_new_run_dir,
    exact_kernels,
    find_resume_point,
    keep_freed_memory,  # noqa: F401
    next_segment,
    record_eval,
    restore_checkpoint,
    run_main,
    run_trainee,
)

build_parser = BASE_TRAIN.build_parser  # the flags, their defaults and help: nanochat/train_config.py
parse_args = BASE_TRAIN.parse_args


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

    @property
    def approximate(self) -> bool:
        """Resuming a checkpoint upstream wrote (`--allow-approximate`): no RNG state, no exact data position."""
        return self.resume is not None and not self.resume_meta.get("train_state")


def plan_run(args, explicit: set[str], world_size: int, base_dir: Path, vocab_size: int, master: bool = True,
             device_type: str = "cpu") -> Plan:
    """Everything decided before the first write: which checkpoint to resume, the merged flags, the
    model, the batch arithmetic, whether to compile. Raises TrainError with a one-line reason."""
    if args.resume and args.resume_from_step >= 0:
        raise TrainError("use either --resume or --resume-from-step, not both")
    if args.allow_approximate and not (args.resume or args.resume_from_step >= 0):
        raise TrainError("--allow-approximate applies to a resume: add --resume (or --resume-from-step N)")
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = base_dir / "base_checkpoints" / tag
    resume, meta = None, None
    if args.resume or args.resume_from_step >= 0:
        resume, meta = _find_resume_point(ckpt_dir, args, world_size, master)
        saved_flags = meta.get("user_config") or {}
        for k, v in BASE_TRAIN.inherited(saved_flags, explicit).items():
            setattr(args, k, v)
        if master and not meta.get("train_state") and (unknown := [k for k in saved_flags if BASE_TRAIN.flag(k) is None]):
            print(f"note: {resume.label}'s user_config has upstream flags this trainer does not have, left out: "
                  f"{', '.join(unknown)}", file=sys.stderr, flush=True)
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
        check_new_run_dir(ckpt_dir)
    segment = next_segment(ckpt_dir, meta) if meta else 1
    # a resume keeps its launch's choice (before "compiled" was recorded: auto's rule); upstream's: ours decides
    saved = meta.get("compiled", device_type == "cuda") if meta and meta.get("train_state") else None
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


def _find_resume_point(ckpt_dir: Path, args, world_size: int, master: bool) -> tuple[cm.CheckpointFiles, dict]:
    """The checkpoint --resume or --resume-from-step names, and its meta, checked for an exact resume."""
    return find_resume_point(ckpt_dir, args.resume_from_step, world_size, master, BASE_TRAIN.script,
                             allow_approximate=args.allow_approximate)


# ---------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(args.device_type, lambda dist_info: train(args, explicit, dist_info))


@dataclass(frozen=True)
class Inputs:
    """What training reads besides checkpoints: the tokenizer and the data shards."""

    base_dir: Path
    tokenizer: Tokenizer
    token_bytes: torch.Tensor  # bytes per token id, for val bpb
    train_files: list
    val_files: list


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
    """Weights, optimizer shard, data position, RNG and loop state of the checkpoint being resumed (of an
    upstream checkpoint: the weights, optimizer, loop state and upstream's data position; it has no RNG)."""
    return restore_checkpoint(t.plan.resume, t.plan.resume_meta, t.model, t.optimizer, t.loader, t.dist,
                              approximate=t.plan.approximate)


def announce(t: Trainee) -> None:
    plan, cfg = t.plan, t.plan.config
    distributed.print0(
        f"model {plan.checkpoint_dir.name}: {plan.shape.params['total']:,} parameters (depth {cfg.n_layer}, width "
        f"{cfg.n_embd}, vocab {cfg.vocab_size}), {plan.num_iterations} steps of {plan.total_batch_size:,} tokens, "
        f"{plan.grad_accum} micro-step(s) x {t.dist.world_size} process(es), {t.dist.device.type}"
        f"{', compiled' if plan.compile.compile else ''} ({plan.compile.reason})")
    if plan.resume is not None:
        distributed.print0(f"resuming {plan.resume.label} (segment {plan.segment})")
    if plan.approximate:
        pos = t.loader.stream.position()
        distributed.print0(
            f"approximate resume (--allow-approximate): {approximate_reason(plan.resume.label, plan.resume_meta)}. "
            f"Restored: weights, optimizer, step, val bpb and loop state; data continues at train shard #{pos['pq_idx']}, "
            f"row group {pos['rg_idx']} (rank 0), epoch {pos['epoch']}, as upstream's own resume would. "
            "Checkpoints written from here on resume exactly.")


def approximate_reason(label: str, meta: dict) -> str:
    """Why resuming an upstream checkpoint is approximate: printed once, and recorded in every later meta."""
    where = meta.get("dataloader_state_dict")
    saved = (f"only the last row group its loader read (train shard #{where.get('pq_idx')}, row group "
             f"{where.get('rg_idx')}, epoch {where.get('epoch', 1)}), so the documents it had buffered are skipped"
             if isinstance(where, dict) else "no data position at all, so data starts again from the first shard")
    return f"{label} was written by upstream nanochat, which saves no RNG state and no exact data position, {saved}"


stop_command = functools.partial(training.stop_command, BASE_TRAIN)


def training_loop(t: Trainee, state: LoopState, stop: StopRequest, metrics: MetricsLog | None) -> int:
    """Evaluate, save and step until the last step or a stop request (nanochat.training.run_trainee)."""
    plan, n = t.plan, t.plan.num_iterations
    schedule = schedule_from_user_config(plan.user_config, n)
    return run_trainee(
        t, BASE_TRAIN, state, stop, metrics,
        hyper=lambda step: (schedule.lr_multiplier(step), muon_momentum(step, n, schedule.warmdown_ratio),
                            muon_weight_decay(step, n, t.weight_decay)),
        train_one=lambda: train_step(t.fwd, t.optimizer, t.loader, plan.grad_accum),
        evaluate=lambda s: evaluate(t, s, metrics), meta=lambda s: checkpoint_meta(t, s))


def evaluate(t: Trainee, state: LoopState, metrics: MetricsLog | None) -> None:
    args, rank, world = t.plan.args, t.dist.rank, t.dist.world_size
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    t.model.eval()
    val_loader = BosBestFitLoader(t.inputs.val_files, t.inputs.tokenizer, args.device_batch_size, args.max_seq_len,
                                  rank, world, t.dist.device)
    val_bpb = evaluate_bpb(t.model, iter(val_loader), eval_steps, t.inputs.token_bytes)  # eager: no recompile
    t.model.train()
    record_eval(state, val_bpb, "step {step:05d} | val bpb {val_bpb:.4f}", metrics)


def checkpoint_meta(t: Trainee, state: LoopState) -> dict:
    """Upstream's meta keys (so upstream's loader reads our checkpoints) plus what an exact resume needs."""
    plan, args = t.plan, t.plan.args
    # the segment that continued an upstream checkpoint (--allow-approximate), carried by every later meta
    approx = (plan.resume_meta or {}).get("approximate_resume")
    if plan.approximate:
        approx = {"from_step": plan.start_step, "segment": plan.segment,
                  "reason": approximate_reason(plan.resume.label, plan.resume_meta),
                  "dataloader_state_dict": plan.resume_meta.get("dataloader_state_dict")}  # where the data restarted
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
        **({"approximate_resume": approx} if approx else {}),
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


if __name__ == "__main__":
    sys.exit(main())
