"""
Fine-tune a base checkpoint into a chat model on local conversation files, with exact, crash-proof resume.

    python -m scripts.chat_sft --model-tag d4 --conversations chats.jsonl
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_sft -- --model-tag d4 --conversations chats.jsonl
    python -m scripts.chat_sft --model-tag d4 --resume        # continue the latest resumable step

Reads `$NANOCHAT_BASE_DIR/base_checkpoints/<tag>/` (ours or upstream's; `--model-step`, default its newest
usable step) and `$NANOCHAT_BASE_DIR/tokenizer/`; writes `$NANOCHAT_BASE_DIR/chatsft_checkpoints/<tag>/` in
upstream's layout (model, meta, one optimizer shard per rank, which upstream's loaders read) plus our
`trainstate_*` files and metrics.jsonl. Nothing is downloaded.

As upstream's chat_sft: its flag names and defaults; max_seq_len, device_batch_size, total_batch_size and
the three LRs inherited from the base checkpoint when not given ("Inherited ..." lines); upstream's
optimizer groups without batch scaling, warm-started from the base optimizer (`--load-optimizer 1`: its
state and Muon weight decay, fresh LRs) times `--init-lr-frac`; Muon momentum 0.85 -> 0.95 over 300
steps; the linear warmup / constant / warmdown schedule of `--warmup-ratio`, `--warmdown-ratio`,
`--final-lr-frac` (in steps: progress = step / num_iterations); upstream's BOS-aligned best-fit packing
with padding and masked targets (nanochat/sft_data.py). Unlike upstream, conversations longer than a row
are cut to it (upstream never packs them and its loss can go NaN), `--num-iterations -1` (one epoch) is
counted before training so the schedule and ETA are known, and ChatCORE / MMLU / GSM8K (downloads) are
not offered: val bpb on held-out conversations (`--val-conversations` or `--val-fraction`) instead.

The guarantees are base_train's, from the same code (nanochat/training.py): atomic saves in a safe order,
SIGTERM/SIGINT save and print the resume command, bit-exact resume after SIGKILL (same world size, device
and thread count; the conversation files must render as before), retention, refusals in one line (exit 2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint_manager as cm
from nanochat import distributed, training
from nanochat.common import get_base_dir
from nanochat.conversation import ChatTemplate, ConversationError
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_config import GPTConfig
from nanochat.optim import LearningRates, MuonAdamW, OptimizerStateError, param_groups_for
from nanochat.schedule import schedule_from_user_config
from nanochat.sft_data import SftDataError, SftDataset, SftLoader, check_paths, epoch_batches, read_conversation_files
from nanochat.tokenizer import Tokenizer
from nanochat.train_config import (
    OUR_CHAT_SFT,
    CompileDecision,
    RunShape,
    compile_decision,
    memory_problem,
)
from nanochat.training import (
    LoopState,
    MetricsLog,
    StopRequest,
    TrainError,
    check_new_run_dir,
    exact_kernels,
    find_resume_point,
    next_segment,
    record_eval,
    restore_checkpoint,
    run_main,
    run_trainee,
)

build_parser = OUR_CHAT_SFT.build_parser  # the flags, their defaults and help: nanochat/train_config.py
parse_args = OUR_CHAT_SFT.parse_args
# Upstream chat_sft's inheritance: (flag, where in the base meta, fallback when the meta lacks it)
INHERITED = (("max_seq_len", "meta", 2048), ("device_batch_size", "meta", 32), ("total_batch_size", "meta", 524288),
             ("embedding_lr", "user_config", 0.3), ("unembedding_lr", "user_config", 0.004),
             ("matrix_lr", "user_config", 0.02))
SCALAR_LR = 0.5  # upstream's setup_optimizer default, which chat_sft does not pass
MOMENTUM_WARMUP = 300  # Muon momentum 0.85 -> 0.95 over these steps (upstream chat_sft)


def sft_muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_WARMUP, 1)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------- launch planning (reads only)


@dataclass(frozen=True)
class Source:
    """The base checkpoint a run fine-tunes (on a resume: as the run's meta recorded it)."""

    phase: str
    tag: str
    step: int
    path: str

    def label(self) -> str:
        return f"{self.phase}/{self.tag}@{self.step}"


@dataclass
class Plan:
    args: object  # argparse.Namespace: inherited values resolved, the checkpoint's flags merged in on a resume
    user_config: dict
    config: GPTConfig
    source: Source
    source_ckpt: cm.CheckpointFiles | None  # None on a resume (the weights come from our checkpoint)
    checkpoint_dir: Path
    resume: cm.CheckpointFiles | None
    resume_meta: dict | None
    segment: int
    train: SftDataset
    val: SftDataset
    skipped_lines: int
    num_iterations: int
    grad_accum: int
    compile: CompileDecision
    notes: list[str]

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume is not None else 0

    @property
    def total_batch_size(self) -> int:
        return self.args.total_batch_size


def plan_run(args, explicit: set[str], world_size: int, base_dir: Path, tokenizer: Tokenizer, master: bool = True,
             device_type: str = "cpu") -> Plan:
    """Everything decided before the first write. Raises TrainError with a one-line reason."""
    if args.resume and args.resume_from_step >= 0:
        raise TrainError("use either --resume or --resume-from-step, not both")
    if not args.model_tag:
        raise TrainError("--model-tag is required: the base_checkpoints/ tag to fine-tune (and the chatsft_checkpoints/ "
                         "tag written)")
    ckpt_dir = base_dir / "chatsft_checkpoints" / args.model_tag
    notes: list[str] = []
    resume, meta, source_ckpt = None, None, None
    if args.resume or args.resume_from_step >= 0:
        resume, meta = find_resume_point(ckpt_dir, args.resume_from_step, world_size, master, OUR_CHAT_SFT.script)
        for k, v in OUR_CHAT_SFT.inherited(meta.get("user_config") or {}, explicit).items():
            setattr(args, k, v)
        src = meta.get("source") or {}
        source = Source(str(src.get("phase", "base")), str(src.get("tag", args.model_tag)), int(src.get("step", 0)),
                        str(src.get("path", "")))
        base_config = _source_config(resume, meta)  # the run's own model, its context length included
    else:
        source_ckpt, base_meta = _find_source(base_dir, args)
        source = Source("base", args.model_tag, source_ckpt.step, str(source_ckpt.directory))
        notes += _inherit(args, explicit, base_meta)
        base_config = _source_config(source_ckpt, base_meta)
    if problems := OUR_CHAT_SFT.problems(vars(args)):
        raise TrainError(problems[0] + (f" (from {resume.label}'s user_config)" if resume is not None else ""))
    if not args.conversations:
        raise TrainError("no --conversations file given: SFT trains on local conversation files (JSONL, one "
                         "conversation per line)")
    try:
        args.conversations = check_paths(args.conversations)
        args.val_conversations = check_paths(args.val_conversations) if args.val_conversations else None
    except SftDataError as e:
        raise TrainError(str(e)) from None
    # The model trained is the base's with the SFT context length: what the meta's model_config says, so
    # any loader of the checkpoint (ours, upstream's) builds the model that was trained.
    config = dataclasses.replace(base_config, sequence_len=args.max_seq_len)
    if meta is not None:
        _check_same_model(resume, meta, config)
    if config.vocab_size != tokenizer.get_vocab_size():
        raise TrainError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but {source.label()} expects "
                         f"{config.vocab_size}: wrong tokenizer for this checkpoint")
    train, val, skipped = _datasets(args, tokenizer)
    per_step = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % per_step:
        raise TrainError(f"--total-batch-size {args.total_batch_size:,} is not a multiple of device batch × sequence × "
                         f"processes ({args.device_batch_size} × {args.max_seq_len} × {world_size} = {per_step:,})")
    grad_accum = args.total_batch_size // per_step
    num_iterations = args.num_iterations
    if num_iterations <= 0:  # one epoch: upstream stops once a rank has consumed its share
        batches = max(epoch_batches(train, args.device_batch_size, args.max_seq_len, r, world_size)
                      for r in range(world_size))
        num_iterations = max(1, math.ceil(batches / grad_accum))
    user_config = dict(vars(args))
    shape = RunShape(config, False, args.total_batch_size, num_iterations, per_step, grad_accum, ())
    if why := memory_problem(shape, distributed.device_memory_bytes(device_type),
                             "the CUDA device's memory" if device_type == "cuda" else "the machine's RAM"):
        raise TrainError(why)
    if resume is None:
        check_new_run_dir(ckpt_dir)
    segment = next_segment(ckpt_dir, meta) if meta else 1
    saved = meta.get("compiled") if meta else None
    decision = compile_decision(args.compile, device_type, shape, num_iterations - (resume.step if resume else 0),
                                saved=saved)
    return Plan(args, user_config, config, source, source_ckpt, ckpt_dir, resume, meta, segment, train, val, skipped,
                num_iterations, grad_accum, decision, notes)


def _find_source(base_dir: Path, args) -> tuple[cm.CheckpointFiles, dict]:
    run = base_dir / "base_checkpoints" / args.model_tag
    if not run.is_dir():
        have = sorted(p.name for p in (base_dir / "base_checkpoints").glob("*") if p.is_dir()) \
            if (base_dir / "base_checkpoints").is_dir() else []
        raise TrainError(f"no base checkpoint tagged {args.model_tag!r} in {base_dir / 'base_checkpoints'} "
                         f"(tags there: {', '.join(have) or 'none'})")
    try:
        ckpt = (cm.resolve_checkpoint(run, args.model_step) if args.model_step is not None
                else cm.find_last_usable(run).checkpoint)
        problems = [p for p in cm.quick_problems(ckpt) if p.blocks == "load"]
        if problems:
            raise TrainError(f"cannot fine-tune {ckpt.label}: {problems[0].message}")
        return ckpt, cm.read_meta(ckpt)
    except cm.CheckpointError as e:
        raise TrainError(f"cannot fine-tune base/{args.model_tag}: {e}") from None


def _source_config(ckpt: cm.CheckpointFiles, meta: dict) -> GPTConfig:
    try:
        return cm.config_from_checkpoint(meta, {k: tuple(v.shape) for k, v in cm.state_dict_shapes(ckpt).items()})
    except cm.CheckpointError as e:
        raise TrainError(f"cannot fine-tune {ckpt.label}: {e}") from None


def _inherit(args, explicit: set[str], base_meta: dict) -> list[str]:
    """Upstream's rule: a flag left at None takes the base meta's value (or the fallback); lines as upstream's."""
    user = base_meta.get("user_config") if isinstance(base_meta.get("user_config"), dict) else {}
    lines = []
    for name, where, fallback in INHERITED:
        saved = (base_meta if where == "meta" else user).get(name)
        given = getattr(args, name)
        if given is None:
            value = saved if saved is not None else fallback
            setattr(args, name, value)
            lines.append(f"Inherited {name}={value} from pretrained checkpoint")
        elif saved is not None and given != saved:
            lines.append(f"NOTE: --{name.replace('_', '-')}={given} overrides pretrained value of {saved}")
        else:
            lines.append(f"Using {name}={given}")
    return lines


def _check_same_model(resume, meta: dict, config: GPTConfig) -> None:
    saved = meta.get("model_config") or {}
    wanted = config.upstream_dict()
    diff = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise TrainError(f"{resume.label} was trained with a different model ({', '.join(diff)}); "
                         "drop the changed flags to resume, or start a new --model-tag")


def _datasets(args, tokenizer: Tokenizer) -> tuple[SftDataset, SftDataset, int]:
    """Train and val renders, each conversation cut to one row (max_seq_len + 1 tokens)."""
    try:
        template = ChatTemplate(tokenizer)
        train = read_conversation_files(args.conversations, args.skip_invalid)
        convs, skipped = train.conversations, train.skipped
        if args.val_conversations:
            val = read_conversation_files(args.val_conversations, args.skip_invalid)
            val_convs, skipped = val.conversations, skipped + val.skipped
        else:
            if len(convs) < 2:
                raise TrainError("one conversation cannot be split into train and validation: add conversations "
                                 "or give --val-conversations")
            held = min(len(convs) - 1, max(1, round(args.val_fraction * len(convs))))
            convs, val_convs = convs[:-held], convs[-held:]
        row = args.max_seq_len + 1
        train_set, val_set = SftDataset.build(convs, template, row), SftDataset.build(val_convs, template, row)
    except (SftDataError, ConversationError) as e:
        raise TrainError(str(e)) from None
    if not train_set.supervised:
        raise TrainError("no training conversation has an assistant turn: there is nothing to train on")
    if not val_set.supervised and args.eval_every > 0:
        raise TrainError("no validation conversation has an assistant turn, so val bpb is undefined: give "
                         "--val-conversations with some, or --eval-every -1")
    return train_set, val_set, skipped


# ---------------------------------------------------------------------- training


@dataclass
class Trainee:
    plan: Plan
    dist: distributed.DistInfo
    tokenizer: Tokenizer
    token_bytes: torch.Tensor
    model: GPT
    optimizer: MuonAdamW
    loader: SftLoader
    muon_weight_decay: float  # upstream keeps the base optimizer's last value (0 without --load-optimizer)
    optimizer_note: str
    fwd: object = None

    @property
    def master(self) -> bool:
        return self.dist.master


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(args.device_type, lambda dist_info: train(args, explicit, dist_info))


def train(args, explicit: set[str], dist_info) -> int:
    """One launch: plan (reads only), load the model, restore a checkpoint, then train and save."""
    base_dir = get_base_dir()
    tokenizer = _tokenizer(base_dir)
    plan = plan_run(args, explicit, dist_info.world_size, base_dir, tokenizer, dist_info.master,
                    dist_info.device.type)
    exact_kernels(dist_info.device.type)
    torch.manual_seed(plan.args.seed)
    t = build_trainee(plan, tokenizer, dist_info)
    state = restore_checkpoint(plan.resume, plan.resume_meta, t.model, t.optimizer, t.loader, t.dist) \
        if plan.resume is not None else LoopState()
    if plan.resume is not None and state.step >= plan.num_iterations:
        if state.step > plan.num_iterations:
            raise TrainError(f"{plan.resume.label} is already past --num-iterations {plan.num_iterations}")
        distributed.print0(f"{plan.resume.label} is the last step of this run ({plan.num_iterations}); nothing to do "
                           "(raise --num-iterations to train longer)")
        return 0
    t.fwd = torch.compile(t.model, dynamic=False) if plan.compile.compile else t.model
    if dist_info.master:  # from here on we write
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


def _tokenizer(base_dir: Path) -> Tokenizer:
    from nanochat.tokenizer import TokenizerError

    try:
        return Tokenizer.from_directory(base_dir / "tokenizer")
    except TokenizerError as e:
        raise TrainError(str(e)) from None


def build_trainee(plan: Plan, tokenizer: Tokenizer, dist_info) -> Trainee:
    """The model (the base weights, or any on a resume: restore overwrites them), its optimizer with
    upstream chat_sft's groups and LRs, and the loader."""
    args, rank, world, device = plan.args, dist_info.rank, dist_info.world_size, dist_info.device
    model = GPT(plan.config).to(device)
    lrs = LearningRates(embedding=args.embedding_lr, unembedding=args.unembedding_lr, matrix=args.matrix_lr,
                        scalar=SCALAR_LR, weight_decay=0.0)
    optimizer = MuonAdamW(model, param_groups_for(model, lrs), rank=rank, world_size=world)
    wd, note = 0.0, "fresh optimizer (--load-optimizer 0)"
    if plan.resume is not None:
        wd = float((plan.resume_meta.get("sft") or {}).get("muon_weight_decay", 0.0))
        note = f"optimizer from {plan.resume.label}"
    else:
        try:
            model.load_state_dict(cm.load_state_dict(plan.source_ckpt, device), strict=True)
        except (cm.CheckpointError, RuntimeError) as e:
            raise TrainError(f"cannot fine-tune {plan.source_ckpt.label}: {str(e).splitlines()[0]}") from None
        if args.load_optimizer:
            wd, note = _warm_start(optimizer, plan.source_ckpt)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] = g["lr"] * args.init_lr_frac
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
    loader = SftLoader(plan.train, tokenizer.get_bos_token_id(), args.device_batch_size, args.max_seq_len, rank,
                       world, device)
    return Trainee(plan, dist_info, tokenizer, token_bytes, model, optimizer, loader, wd, note)


def _warm_start(optimizer: MuonAdamW, ckpt: cm.CheckpointFiles) -> tuple[float, str]:
    """The base optimizer's state (every rank's file, any world size) and its last Muon weight decay, as
    upstream's load keeps it; the LRs stay ours. A base without optimizer files: upstream's warning."""
    world = cm.expected_world_size(ckpt, cm.read_meta(ckpt))
    if world < 1 or any(r not in ckpt.optimizer_shards for r in range(world)):
        return 0.0, "WARNING: optimizer checkpoint not found, starting with fresh optimizer (slightly worse)"
    try:
        shards = [cm.torch_load(ckpt.optimizer_shards[r]) for r in range(world)]
        optimizer.load_shards(shards)
    except (cm.CheckpointError, OptimizerStateError) as e:
        raise TrainError(f"cannot warm-start the optimizer from {ckpt.label}: {e} (pass --load-optimizer 0 to start "
                         "with a fresh one)") from None
    muon = [g for g in shards[0]["param_groups"] if isinstance(g, dict) and g.get("kind") == "muon"]
    wd = float(muon[0].get("weight_decay", 0.0)) if muon else 0.0
    return wd, "Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)"


def announce(t: Trainee) -> None:
    plan, cfg, args = t.plan, t.plan.config, t.plan.args
    for line in plan.notes:
        distributed.print0(line)
    distributed.print0(t.optimizer_note)
    distributed.print0(
        f"data: {len(plan.train):,} train and {len(plan.val):,} val conversations ({plan.train.tokens:,} tokens, "
        f"{plan.train.supervised / max(plan.train.tokens, 1):.0%} trained on)"
        + (f"; {plan.skipped_lines} invalid line(s) skipped" if plan.skipped_lines else ""))
    cut = plan.train.truncated + plan.val.truncated
    if cut:
        distributed.print0(f"note: {cut} conversation(s) longer than a row of {args.max_seq_len + 1} tokens "
                           "(--max-seq-len + 1) are cut to it: their ends are never trained on")
    epoch = " (one epoch)" if args.num_iterations <= 0 else ""
    distributed.print0(
        f"model {plan.checkpoint_dir.name}: fine-tuning {plan.source.label()} ({cfg.n_layer} layers, width "
        f"{cfg.n_embd}, vocab {cfg.vocab_size}), {plan.num_iterations} steps{epoch} of {plan.total_batch_size:,} "
        f"tokens, {plan.grad_accum} micro-step(s) x {t.dist.world_size} process(es), {t.dist.device.type}"
        f"{', compiled' if plan.compile.compile else ''} ({plan.compile.reason})")
    if plan.resume is not None:
        distributed.print0(f"resuming {plan.resume.label} (segment {plan.segment})")


stop_command = functools.partial(training.stop_command, OUR_CHAT_SFT)


def training_loop(t: Trainee, state: LoopState, stop: StopRequest, metrics: MetricsLog | None) -> int:
    plan, n = t.plan, t.plan.num_iterations
    schedule = schedule_from_user_config(plan.user_config, n)  # warmup_ratio: the ratio rule, as the planner reads it
    return run_trainee(
        t, OUR_CHAT_SFT, state, stop, metrics,
        hyper=lambda step: (schedule.lr_multiplier(step), sft_muon_momentum(step), t.muon_weight_decay),
        train_one=lambda: train_step(t.fwd, t.optimizer, t.loader, plan.grad_accum),
        evaluate=lambda s: evaluate(t, s, metrics), meta=lambda s: checkpoint_meta(t, s))


def train_step(fwd, optimizer, loader: SftLoader, grad_accum: int) -> torch.Tensor:
    """One optimizer step; this rank's mean loss over the micro-batches that have a trained-on token (a
    batch of only user turns has none: its mean would be NaN, so it adds no gradient and no loss)."""
    loss_sum, counted = None, 0
    for _ in range(grad_accum):
        x, y = loader.next_batch()
        if not loader.supervised:
            continue
        loss = fwd(x, y)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        counted += 1
        (loss / grad_accum).backward()
    optimizer.step()
    optimizer.zero_grad()
    if loss_sum is None:
        return torch.zeros((), device=x.device)
    return loss_sum / counted


def evaluate(t: Trainee, state: LoopState, metrics: MetricsLog | None) -> None:
    args, rank, world = t.plan.args, t.dist.rank, t.dist.world_size
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    t.model.eval()
    val_loader = SftLoader(t.plan.val, t.tokenizer.get_bos_token_id(), args.device_batch_size, args.max_seq_len,
                           rank, world, t.dist.device)
    val_bpb = evaluate_bpb(t.model, iter(val_loader), eval_steps, t.token_bytes)  # eager: no recompile
    t.model.train()
    record_eval(state, val_bpb, "Step {step:05d} | Validation bpb: {val_bpb:.4f}", metrics)  # upstream's line


def checkpoint_meta(t: Trainee, state: LoopState) -> dict:
    """Upstream chat_sft's meta keys (step, val_bpb, model_config, user_config), what an exact resume
    needs, and the base checkpoint it fine-tuned."""
    plan, args = t.plan, t.plan.args
    val = state.val_bpb if state.val_bpb is None or math.isfinite(state.val_bpb) else None
    return {
        "step": state.step,
        "val_bpb": val,
        "model_config": plan.config.upstream_dict(),
        "user_config": plan.user_config,
        "device_batch_size": args.device_batch_size,
        "max_seq_len": args.max_seq_len,
        "total_batch_size": plan.total_batch_size,
        "loop_state": state.meta(),
        "world_size": t.dist.world_size,
        "num_iterations": plan.num_iterations,
        "resume_segment": plan.segment,
        "compiled": plan.compile.compile,
        "source": dataclasses.asdict(plan.source),
        "sft": {"train_conversations": len(plan.train), "val_conversations": len(plan.val),
                "train_tokens": plan.train.tokens, "supervised_tokens": plan.train.supervised,
                "truncated": plan.train.truncated + plan.val.truncated, "fingerprint": plan.train.fingerprint,
                "epoch": t.loader.epoch, "muon_weight_decay": t.muon_weight_decay},
        "train_state": True,
        "workbench_version": 1,
    }


if __name__ == "__main__":
    sys.exit(main())
