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

import argparse
import ctypes
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BOOL_FLAGS = ("resume",)
NOT_INHERITED = ("resume", "resume_from_step", "device_type")  # per launch, never taken from a checkpoint
FAULT_ENV = "NANOCHAT_FAULT_KILL_AFTER"
B_REF = 2 ** 19  # upstream's reference batch in tokens (tuned at d12)
EXIT_USAGE = 2
FLAG_NAMES = {"device_type": "--device"}  # dests whose preferred flag is not --<dest with dashes>


class TrainError(Exception):
    """A launch that cannot go ahead; the message is the one line the user sees. Most are found alike by
    every rank and printed by rank 0; `local` ones (a rank's own file) are printed by that rank, and
    `quiet` ones end the ranks that only learned that another rank failed."""

    def __init__(self, message: str, local: bool = False, quiet: bool = False):
        super().__init__(message)
        self.local, self.quiet = local, quiet


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description="Pretrain a nanochat base model.")

    def add(*names, default=None, **kw):
        p.add_argument(*names, default=argparse.SUPPRESS if suppress_defaults else default, **kw)

    add("--run", type=str, default="dummy", help="run name, recorded in the meta (upstream's wandb name; no wandb here)")
    add("--device", "--device-type", dest="device_type", type=str, default="auto", choices=["auto", "", "cpu", "cuda"],
        help="auto (CUDA if present, else CPU), cpu or cuda")
    add("--seed", type=int, default=42, help="seed for the initial weights and every RNG")
    add("--compile", type=str, default="auto", choices=["auto", "on", "off"],
        help="torch.compile the model: auto = on for CUDA, off on CPU (pays back after ~2,300 steps there: bench/train.py)")
    # Model architecture
    add("--depth", type=int, default=20, help="number of transformer layers")
    add("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to head_dim)")
    add("--head-dim", type=int, default=128, help="attention head dimension")
    add("--max-seq-len", type=int, default=2048, help="context length in tokens")
    add("--window-pattern", type=str, default="SSSL", help="sliding-window pattern tiled over layers (L = full, S = quarter)")
    # Training horizon (first that applies)
    add("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive from the rules below)")
    add("--target-flops", type=float, default=-1.0, help="derive steps from a FLOPs budget (-1 = disable)")
    add("--target-param-data-ratio", type=float, default=12, help="derive steps from tokens:params (-1 = disable)")
    # Optimization
    add("--device-batch-size", type=int, default=32, help="sequences per forward pass per process")
    add("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = upstream's rule)")
    add("--embedding-lr", type=float, default=0.3, help="AdamW LR of the embeddings")
    add("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head")
    add("--weight-decay", type=float, default=0.28, help="Muon's cautious weight decay (scaled, cosine to 0)")
    add("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    add("--scalar-lr", type=float, default=0.5, help="AdamW LR of the per-layer scalars")
    add("--warmup-steps", type=int, default=40, help="steps of linear LR warmup")
    add("--warmdown-ratio", type=float, default=0.65, help="fraction of the run spent in the linear LR warmdown")
    add("--final-lr-frac", type=float, default=0.05, help="LR at the end as a fraction of the peak")
    add("--resume-from-step", type=int, default=-1, help="resume from this step's checkpoint (-1 = disable)")
    add("--resume", action="store_true", default=False,
        help="resume from the latest complete, resumable checkpoint of this model tag")
    # Evaluation and output
    add("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = disable)")
    add("--eval-tokens", type=int, default=80 * 524288, help="tokens per val bpb evaluation")
    add("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    add("--keep-last", type=int, default=-1,
        help="keep only the N newest checkpoints, plus the best-val_bpb one and the resume point (-1 = keep all)")
    add("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    argv = list(argv)
    if argv and argv[0] == "--":  # `torchrun ... -m scripts.base_train -- --depth 4`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return args, explicit


# ---------------------------------------------------------------------- launch planning (reads only)


@dataclass
class Plan:
    args: argparse.Namespace
    user_config: dict
    config: object  # GPTConfig
    checkpoint_dir: Path
    total_batch_size: int
    num_iterations: int
    grad_accum: int
    resume: object | None  # CheckpointFiles
    resume_meta: dict | None
    segment: int


def plan_run(args: argparse.Namespace, explicit: set[str], world_size: int, base_dir: Path, vocab_size: int,
             master: bool = True) -> Plan:
    """Everything decided before the first write: which checkpoint to resume, the merged flags, the
    model, the batch arithmetic. Raises TrainError with a one-line reason."""
    from nanochat import checkpoint_manager as cm
    from nanochat.model_config import ArchitectureError, current_config
    from nanochat.schedule import derive_total_batch_size, resolve_num_iterations

    if args.resume and args.resume_from_step >= 0:
        raise TrainError("use either --resume or --resume-from-step, not both")
    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = base_dir / "base_checkpoints" / tag
    resume, meta = None, None
    if args.resume or args.resume_from_step >= 0:
        resume, meta = _find_resume_point(ckpt_dir, args, world_size, master)
        inherited = {k: v for k, v in (meta.get("user_config") or {}).items()
                     if k not in explicit and k not in NOT_INHERITED and hasattr(args, k)}
        for k, v in inherited.items():
            setattr(args, k, v)
    try:
        config = current_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, vocab_size,
                                args.window_pattern)
    except (ArchitectureError, ZeroDivisionError) as e:
        raise TrainError(f"invalid model flags: {e}") from None
    if meta is not None:
        saved = meta.get("model_config") or {}
        wanted = config.upstream_dict()
        diff = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise TrainError(f"{resume.label} was trained with a different model ({', '.join(diff)}); "
                             "drop the changed flags to resume, or start a new --model-tag")
    user_config = dict(vars(args))
    tbs = args.total_batch_size if args.total_batch_size > 0 else derive_total_batch_size(user_config, config)
    num_iterations = resolve_num_iterations(user_config, config, tbs)
    if not num_iterations or num_iterations <= 0:
        raise TrainError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    per_step = args.device_batch_size * args.max_seq_len * world_size
    if args.device_batch_size <= 0 or tbs % per_step != 0:
        raise TrainError(f"--total-batch-size {tbs} is not a multiple of device batch x seq len x processes "
                         f"({args.device_batch_size} x {args.max_seq_len} x {world_size} = {per_step})")
    if resume is None:
        existing = cm.list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if existing or (ckpt_dir / "metrics.jsonl").exists():
            steps = ", ".join(str(c.step) for c in existing[-4:]) or "none"
            raise TrainError(f"{ckpt_dir} already holds a run (checkpoint steps: {steps}); continue it with --resume, "
                             "or choose another --model-tag")
    segment = next_segment(ckpt_dir, meta) if meta else 1
    return Plan(args, user_config, config, ckpt_dir, tbs, num_iterations, tbs // per_step, resume, meta, segment)


def next_segment(ckpt_dir: Path, meta: dict) -> int:
    """One more than any segment this run has logged, so segments grow per launch even when a resume
    goes back to an older checkpoint (readers take each step's newest segment)."""
    seen = [int(meta.get("resume_segment") or 1)]
    path = ckpt_dir / "metrics.jsonl"
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    seg = json.loads(line).get("segment")
                except (json.JSONDecodeError, AttributeError):
                    continue  # a torn last line
                if isinstance(seg, int):
                    seen.append(seg)
    return max(seen) + 1


def _find_resume_point(ckpt_dir: Path, args, world_size: int, master: bool):
    from nanochat import checkpoint_manager as cm

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
        try:
            ckpt = cm.find_last_complete(ckpt_dir, resumable=True)
        except cm.CheckpointError as e:
            raise TrainError(f"nothing to resume: {e}") from None
        for newer in (c for c in found if master and c.step is not None and c.step > ckpt.step):
            problems = cm.quick_problems(newer)
            reason = problems[0].message if problems else "not resumable"
            print(f"note: skipping step {newer.step} ({reason})", file=sys.stderr, flush=True)
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


def resume_command(user_config: dict, world_size: int, step: int) -> str:
    """The command that continues this run from `step` (flags that differ from the defaults only)."""
    defaults = vars(build_parser().parse_args([]))
    parts = []
    for k, v in user_config.items():
        if k in ("resume", "resume_from_step") or v is None or v == defaults.get(k):
            continue
        parts += [FLAG_NAMES.get(k, f"--{k.replace('_', '-')}"), shlex.quote(str(v))]
    parts += ["--resume-from-step", str(step)]
    if world_size > 1:
        cmd = f"torchrun --standalone --nproc_per_node={world_size} -m scripts.base_train -- " + " ".join(parts)
    else:
        cmd = "python -m scripts.base_train " + " ".join(parts)
    if os.environ.get("NANOCHAT_BASE_DIR"):
        cmd = f"NANOCHAT_BASE_DIR={shlex.quote(os.environ['NANOCHAT_BASE_DIR'])} " + cmd
    return cmd


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
    from nanochat import checkpoint_manager as cm

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
    from nanochat import distributed

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


def train(args, explicit: set[str], dist_info) -> int:
    import torch

    from nanochat import checkpoint_manager as cm
    from nanochat import distributed
    from nanochat.common import get_base_dir
    from nanochat.dataloader import BosBestFitLoader, DataError, find_data_dir, list_parquet_files, split_files
    from nanochat.gpt import GPT
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.model_config import current_config, param_counts
    from nanochat.optim import LearningRates, MuonAdamW, OptimizerStateError, muon_momentum, muon_weight_decay, param_groups_for
    from nanochat.schedule import schedule_from_user_config
    from nanochat.tokenizer import Tokenizer, TokenizerError
    from nanochat.train_state import TrainStateError, check_train_state, make_train_state, restore_rng

    print0 = distributed.print0
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    base_dir = get_base_dir()
    try:
        tokenizer = Tokenizer.from_directory(base_dir / "tokenizer")
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
        data_dir = find_data_dir(base_dir)
        files = list_parquet_files(data_dir)
        train_files, val_files = split_files(files, "train"), split_files(files, "val")
    except (TokenizerError, DataError) as e:
        raise TrainError(str(e)) from None

    plan = plan_run(args, explicit, world, base_dir, tokenizer.get_vocab_size(), dist_info.master)
    args, config = plan.args, plan.config
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # exact resume needs run-to-run identical kernels
    torch.manual_seed(args.seed)

    model = GPT(config).to(device)
    model.init_weights(seed=args.seed)
    counts = param_counts(config)
    scale_lr = (plan.total_batch_size / B_REF) ** 0.5  # sqrt batch scaling, as upstream (B_ref = 2**19)
    d12 = param_counts(current_config(12, args.aspect_ratio, args.head_dim, args.max_seq_len, config.vocab_size,
                                      args.window_pattern))["scaling"]
    wd = args.weight_decay * scale_lr * (d12 / counts["scaling"])  # constant T_epoch across sizes (upstream)
    lrs = LearningRates(embedding=args.embedding_lr * scale_lr, unembedding=args.unembedding_lr * scale_lr,
                        matrix=args.matrix_lr * scale_lr, scalar=args.scalar_lr * scale_lr, weight_decay=wd)
    optimizer = MuonAdamW(model, param_groups_for(model, lrs), rank=rank, world_size=world)
    loader = BosBestFitLoader(train_files, tokenizer, args.device_batch_size, args.max_seq_len, rank, world, device)

    step, val_bpb, min_val_bpb, smooth_loss, total_time, last_eval_step = 0, None, float("inf"), 0.0, 0.0, None
    if plan.resume is not None:
        ckpt, meta = plan.resume, plan.resume_meta
        failure, shared = None, False
        try:
            state = cm.load_state_dict(ckpt, device)
            cm.config_from_checkpoint(meta, {k: v.shape for k, v in state.items()})
            model.load_state_dict(state, strict=True)
            optimizer.load_shards([cm.torch_load(ckpt.optimizer_shards[r]) for r in range(world)])
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
        step = ckpt.step
        loop = meta.get("loop_state") or {}
        val_bpb, min_val_bpb = meta.get("val_bpb"), float(loop.get("min_val_bpb", float("inf")))
        smooth_loss, total_time = float(loop.get("smooth_train_loss", 0.0)), float(loop.get("total_training_time", 0.0))
        last_eval_step = ts["last_eval_step"] if ts["last_eval_step"] >= 0 else None
        restore_rng(ts["rng"])
        threads = ts.get("cpu_threads")
        if device.type == "cpu" and threads and threads != torch.get_num_threads():
            # CPU reductions depend on the thread count: match the checkpoint unless the user chose one.
            if "OMP_NUM_THREADS" in os.environ:
                if dist_info.master:
                    print(f"note: {ckpt.label} was trained with {threads} CPU thread(s) per process and "
                          f"OMP_NUM_THREADS asks for {torch.get_num_threads()}: the continuation will differ in the "
                          f"last bits (OMP_NUM_THREADS={threads} makes the resume bit-exact)", file=sys.stderr, flush=True)
            else:
                torch.set_num_threads(threads)
                print0(f"using {threads} CPU thread(s) per process, as when {ckpt.label} was written (bit-exact resume)")
    start_step = step
    resumed = plan.resume is not None
    if resumed and step >= plan.num_iterations:
        if step > plan.num_iterations:
            raise TrainError(f"{plan.resume.label} is already past --num-iterations {plan.num_iterations}")
        print0(f"{plan.resume.label} is the last step of this run ({plan.num_iterations}); nothing to do "
               "(raise --num-iterations to train longer)")
        return 0

    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    schedule = schedule_from_user_config(plan.user_config, plan.num_iterations)
    n, tbs = plan.num_iterations, plan.total_batch_size
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))

    # From here on we write: the checkpoint directory, metrics.jsonl, checkpoints.
    ckpt_dir = plan.checkpoint_dir
    if dist_info.master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    metrics = MetricsLog(ckpt_dir / "metrics.jsonl", plan.segment) if dist_info.master else None
    stop = StopRequest()
    stop.install()

    print0(f"model {ckpt_dir.name}: {counts['total']:,} parameters (depth {config.n_layer}, width {config.n_embd}, "
           f"vocab {config.vocab_size}), {n} steps of {tbs:,} tokens, {plan.grad_accum} micro-step(s) x {world} "
           f"process(es), {device.type}{', compiled' if use_compile else ''}")
    if resumed:
        print0(f"resuming {plan.resume.label} (segment {plan.segment})")

    def save(at_step: int) -> None:
        if dist_info.master:
            cm.invalidate_step(ckpt_dir, at_step)
        distributed.barrier()
        if dist_info.master:
            cm.save_model(ckpt_dir, at_step, model.state_dict())
            fault_point("model", at_step, rank)
        cm.save_optimizer_shard(ckpt_dir, at_step, rank, optimizer.state_dict())
        fault_point("optim", at_step, rank)
        cm.save_train_state(ckpt_dir, at_step, rank, make_train_state(
            rank=rank, world_size=world, step=at_step, loader_state=loader.state_dict(), last_eval_step=last_eval_step))
        fault_point("trainstate", at_step, rank)
        distributed.barrier()  # every shard is on disk before the meta says the step is complete
        if dist_info.master:
            cm.write_meta(ckpt_dir, at_step, {
                "step": at_step,
                "val_bpb": val_bpb,
                "model_config": config.upstream_dict(),
                "user_config": plan.user_config,
                "device_batch_size": args.device_batch_size,
                "max_seq_len": args.max_seq_len,
                "total_batch_size": tbs,
                "dataloader_state_dict": loader.upstream_state(),
                "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_loss,
                               "total_training_time": total_time},
                "world_size": world,
                "num_iterations": n,
                "resume_segment": plan.segment,
                "train_state": True,
                "workbench_version": 1,
            })
            fault_point("meta", at_step, rank)
            protected = {at_step} | ({start_step} if resumed else set())
            deleted = apply_retention(ckpt_dir, args.keep_last, protected)
            print0(f"saved step {at_step} to {ckpt_dir}" + (f" (removed steps {deleted})" if deleted else ""))
        distributed.barrier()

    seg_times: list[float] = []
    while True:
        last_step = step == n
        stopping = stop.signal_name is not None and step > start_step
        if args.eval_every > 0 and not stopping and (last_step or step % args.eval_every == 0) \
                and not (step == start_step and last_eval_step == step):
            model.eval()
            val_loader = BosBestFitLoader(val_files, tokenizer, args.device_batch_size, args.max_seq_len, rank, world,
                                          device)
            val_bpb = evaluate_bpb(model, iter(val_loader), eval_steps, token_bytes)  # eager: no recompile
            model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            last_eval_step = step
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            if metrics:
                metrics.write(step, val_bpb=val_bpb)
        if last_step or stopping or (step > 0 and not (resumed and step == start_step) and args.save_every > 0
                                     and step % args.save_every == 0):
            save(step)
        if last_step:
            break
        if stopping:
            print0(f"stopped by {stop.signal_name} at step {step}; checkpoint saved. Resume with:\n"
                   f"  {resume_command(plan.user_config, world, step)}")
            if metrics:
                metrics.close()
            return 0

        t0 = time.time()
        lrm = schedule.lr_multiplier(step)
        optimizer.set_schedule(lrm, muon_momentum(step, n, schedule.warmdown_ratio), muon_weight_decay(step, n, wd))
        loss = train_step(fwd, optimizer, loader, plan.grad_accum)
        # One collective per step: the mean loss over ranks and whether any rank was asked to stop.
        shared = torch.stack([loss, torch.tensor(float(stop.signal_name is not None), device=device)])
        distributed.all_reduce_sum(shared)
        train_loss = shared[0].item() / world
        if shared[1].item() > 0 and stop.signal_name is None:
            stop.signal_name = "a stop request on another rank"
        dt = time.time() - t0

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        if step > 10:
            total_time += dt
        if step > start_step:  # the first step of a launch pays for warm-up (and compilation)
            seg_times.append(dt)
        avg = sum(seg_times) / len(seg_times) if seg_times else dt
        eta = (n - step - 1) * avg
        tok_per_sec = tbs / dt
        if metrics:  # the file first: whoever sees the console line can rely on the row being on disk
            metrics.write(step, train_loss=train_loss, lrm=lrm, tok_per_sec=tok_per_sec, dt_ms=dt * 1000)
        print0(f"step {step:05d}/{n:05d} ({100 * (step + 1) / n:5.1f}%) | loss {debiased:.4f} | lrm {lrm:.2f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | eta {_fmt_duration(eta)}")
        step += 1

    print0(f"done: {n} steps, val bpb {val_bpb if val_bpb is None else round(val_bpb, 4)}, "
           f"checkpoints in {ckpt_dir}")
    if metrics:
        metrics.close()
    return 0


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
