"""
Learning-rate range test for nanochat: how the loss responds as one multiplier sweeps base_train's learning
rates from tiny to too large.

    python -m scripts.lr_find --depth 4 --aspect-ratio 32 --head-dim 32 --max-seq-len 256 \\
        --device-batch-size 16 --total-batch-size 4096 --min-lr-mult 0.01 --max-lr-mult 100 --steps 100
    python -m scripts.lr_find ... --group matrix       # only Muon's matrices; the other groups keep 1x
    python -m scripts.lr_find --checkpoint PATH ...    # from a checkpoint's weights instead of a fresh init

It takes base_train's model and batch flags (same names, defaults and help) and builds exactly what
base_train would: the model, the total batch and gradient accumulation, the batch-scaled learning rates
and Muon + AdamW over their parameter groups. Step i multiplies the chosen groups' learning rates by an
exponential sweep from --min-lr-mult to --max-lr-mult (`all`: every group together; `embedding`,
`unembedding`, `matrix` (Muon) or `scalar` alone), records the loss, smooths it as base_train does
(EMA 0.9, debiased) and stops once it diverges (above --diverge-factor x its minimum, or back above where
it started after having improved: `nanochat.lr_range.diverged`). It then
prints the curve's two classic suggestions, both named: min/10 and steepest descent (nanochat/lr_range.py,
with the caveat).

The find is a run like any other: `$NANOCHAT_BASE_DIR/lrfind/<tag>/metrics.jsonl` (per step: lr_mult,
train_loss, smooth_loss; the registry indexes it as phase `lrfind`) and `lr_find.json` beside it (flags,
model, base learning rates, the whole curve and the suggestion). A tag already used gets a -2, -3, ...
suffix: a find never overwrites another. No checkpoint is written (the weights after a divergence are
of no use).

Exit status: 0 done (also when the sweep stopped at divergence); 2 it could not start (bad flags or
bounds, no data or tokenizer, a checkpoint that cannot load), with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import lr_range

RESULT_FILE = "lr_find.json"
PHASE_DIR = "lrfind"  # <base>/lrfind/<tag>/ (checkpoint_manager.PHASE_DIRS maps it to the phase "lrfind")
EXIT_USAGE = 2
# base_train's flags that decide the model, the batch and the learning rates: the finder takes exactly these.
BASE_TRAIN_FLAGS = ("run", "device_type", "seed", "depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern",
                    "target_param_data_ratio", "device_batch_size", "total_batch_size", "embedding_lr", "unembedding_lr",
                    "weight_decay", "matrix_lr", "scalar_lr", "model_tag")
# Which optimizer groups (nanochat.optim.param_groups_for) each --group scales.
GROUP_MEMBERS = {
    "embedding": ("embedding", "value_embeds"),
    "unembedding": ("lm_head",),
    "scalar": ("resid_lambdas", "x0_lambdas", "smear"),
}


class FindError(Exception):
    """A find that cannot start; the message is the one line the user sees."""


def build_parser() -> argparse.ArgumentParser:
    from nanochat.train_config import BASE_TRAIN

    p = argparse.ArgumentParser(prog="python -m scripts.lr_find",
                                description="Learning-rate range test over base_train's optimizer groups.")
    # base_train's own flags from its one flag table (names, defaults, help, choices): nanochat/train_config.py
    for action in BASE_TRAIN.build_parser()._actions:
        if action.dest in BASE_TRAIN_FLAGS:
            p._add_action(action)
    p.add_argument("--min-lr-mult", type=float, default=0.01, help="first multiplier of the learning rates (default 0.01)")
    p.add_argument("--max-lr-mult", type=float, default=100.0, help="last multiplier, reached at --steps (default 100)")
    p.add_argument("--steps", type=int, default=100, help="sweep length in optimizer steps (default 100; stops early on divergence)")
    p.add_argument("--group", choices=lr_range.GROUPS, default="all",
                   help="which learning rates the multiplier scales: all (default), embedding (and value embeddings), "
                        "unembedding (lm_head), matrix (Muon) or scalar (lambdas, smear); the others stay at 1x")
    p.add_argument("--diverge-factor", type=float, default=lr_range.DIVERGE_FACTOR,
                   help=f"stop when the smoothed loss exceeds this x its minimum (default {lr_range.DIVERGE_FACTOR:g}); it also "
                        "stops when the loss climbs back above where the sweep started")
    p.add_argument("--checkpoint", type=Path, help="start from this checkpoint's weights (run dir or model file); its "
                                                   "model replaces the model flags")
    p.add_argument("--json", action="store_true", help="print the result (lr_find.json's content) as JSON at the end")
    return p


def in_group(group: dict, which: str) -> bool:
    if which == "all":
        return True
    if which == "matrix":
        return group["kind"] == "muon"
    return group["name"] in GROUP_MEMBERS[which]


@dataclass
class Sweep:
    """The curve so far; `stopped` says why it ended ("diverged" or "completed")."""
    multipliers: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smooth: list[float] = field(default_factory=list)
    stopped: str = "completed"


def run_sweep(model, optimizer, next_loss, mults: list[float], group: str, weight_decay: float,
              diverge_factor: float = lr_range.DIVERGE_FACTOR, on_step=None) -> Sweep:
    """The range test's loop: set each step's multiplier on the chosen groups, take one optimizer step
    (`next_loss()` runs the forward/backward passes and the step, returning the mean loss), smooth, stop
    on divergence. Muon's momentum follows base_train's warm-up ramp; its weight decay stays at step 0's."""
    from nanochat.optim import muon_momentum

    sweep = Sweep()
    model.train()
    for i, mult in enumerate(mults):
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * (mult if in_group(g, group) else 1.0)
            if g["kind"] == "muon":
                g["momentum"] = muon_momentum(i, len(mults), 0.0)
                g["weight_decay"] = weight_decay
        loss = float(next_loss())
        sweep.multipliers.append(mult)
        sweep.losses.append(loss)
        sweep.smooth = lr_range.smoothed(sweep.losses)
        if on_step:
            on_step(i, mult, loss, sweep.smooth[-1])
        if i >= lr_range.MIN_STEPS and lr_range.diverged(sweep.smooth, diverge_factor) or not math.isfinite(loss):
            sweep.stopped = "diverged"
            break
    return sweep


def free_tag(parent: Path, tag: str) -> str:
    if not (parent / tag).exists():
        return tag
    n = 2
    while (parent / f"{tag}-{n}").exists():
        n += 1
    return f"{tag}-{n}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        lr_range.check_bounds(args.min_lr_mult, args.max_lr_mult, args.steps)
        if not args.diverge_factor > 1:
            raise lr_range.LRFindError(f"--diverge-factor {args.diverge_factor:g} must be > 1")
        result = find(args)
    except (FindError, lr_range.LRFindError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result))
    return 0


def find(args) -> dict:
    """Build what base_train would, sweep, write the run; the result dict (lr_find.json)."""
    import torch

    from nanochat import checkpoint_manager as cm
    from nanochat import distributed
    from nanochat.common import get_base_dir
    from nanochat.dataloader import BosBestFitLoader, DataError, find_data_dir, list_parquet_files, split_files
    from nanochat.gpt import GPT
    from nanochat.model_config import ArchitectureError
    from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
    from nanochat.tokenizer import Tokenizer, TokenizerError
    from nanochat.train_config import run_shape, scaled_learning_rates
    from scripts.base_train import MetricsLog, keep_freed_memory, train_step

    keep_freed_memory()
    try:
        device = torch.device(distributed.resolve_device_type(args.device_type))
    except distributed.DistributedError as e:
        raise FindError(str(e)) from None
    base_dir = get_base_dir()
    try:
        tokenizer = Tokenizer.from_directory(base_dir / "tokenizer")
        train_files = split_files(list_parquet_files(find_data_dir(base_dir)), "train")
    except (TokenizerError, DataError) as e:
        raise FindError(str(e)) from None

    start = None
    if args.checkpoint is not None:
        try:
            start = cm.load_model(args.checkpoint, device=device)
        except cm.CheckpointError as e:
            raise FindError(f"--checkpoint: {e}") from None
        cfg = start.model.config
        args.depth, args.max_seq_len = cfg.n_layer, cfg.sequence_len
    user_config = {k: v for k, v in vars(args).items() if k in BASE_TRAIN_FLAGS}
    try:
        shape = run_shape(user_config, vocab_size=tokenizer.get_vocab_size())
    except (ArchitectureError, ValueError) as e:
        raise FindError(f"invalid model or batch flags: {e}") from None
    batch_problems = [p for p in shape.problems if not p.startswith("no training horizon")]  # the sweep sets its own
    if batch_problems:
        raise FindError(f"invalid model or batch flags: {batch_problems[0]}")
    config, tbs, grad_accum = shape.config, shape.total_batch_size, shape.grad_accum
    if start is not None:
        config = start.model.config
    rates = scaled_learning_rates(user_config, shape)
    lrs = LearningRates(embedding=rates.embedding, unembedding=rates.unembedding, matrix=rates.matrix,
                        scalar=rates.scalar, weight_decay=rates.weight_decay)

    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    if start is not None:
        model.load_state_dict(start.model.state_dict())
    else:
        model.init_weights(seed=args.seed)
    optimizer = MuonAdamW(model, param_groups_for(model, lrs))
    loader = BosBestFitLoader(train_files, tokenizer, args.device_batch_size, config.sequence_len, 0, 1, device)
    mults = lr_range.multipliers(args.min_lr_mult, args.max_lr_mult, args.steps)

    parent = base_dir / PHASE_DIR
    tag = free_tag(parent, args.model_tag or f"d{config.n_layer}-{args.group}")
    run_dir = parent / tag
    run_dir.mkdir(parents=True, exist_ok=False)
    metrics = MetricsLog(run_dir / "metrics.jsonl", 1)
    print(f"lr_find {run_dir}: {len(mults)} steps of {tbs:,} tokens, multiplier {args.min_lr_mult:g} -> "
          f"{args.max_lr_mult:g} on {args.group} learning rate(s), "
          + (f"from {start.checkpoint.label}" if start else f"fresh init (seed {args.seed})"), flush=True)
    t0 = time.time()

    def on_step(i, mult, loss, smooth):
        metrics.write(i, lr_mult=mult, train_loss=loss, smooth_loss=smooth)
        eta = (time.time() - t0) / (i + 1) * (len(mults) - i - 1)
        print(f"step {i:4d}/{len(mults)} | lr x{mult:.4g} | loss {loss:.4f} | smoothed {smooth:.4f} | "
              f"eta {eta:.0f}s (sooner if it diverges)", flush=True)

    try:
        sweep = run_sweep(model, optimizer, lambda: train_step(model, optimizer, loader, grad_accum), mults, args.group,
                          lrs.weight_decay, args.diverge_factor, on_step)
    finally:
        metrics.close()
    suggestion = lr_range.suggest(sweep.multipliers, sweep.smooth)
    result = {
        "kind": "lr_find", "group": args.group, "min_lr_mult": args.min_lr_mult, "max_lr_mult": args.max_lr_mult,
        "steps_planned": args.steps, "steps_run": len(sweep.losses), "stopped": sweep.stopped,
        "diverge_factor": args.diverge_factor, "start": start.checkpoint.label if start else "fresh",
        "multipliers": sweep.multipliers, "losses": sweep.losses, "smooth": sweep.smooth,
        "suggestion": suggestion.as_dict(), "user_config": user_config, "model_config": config.upstream_dict(),
        "total_batch_size": tbs, "base_lrs": {g["name"]: g["initial_lr"] for g in optimizer.param_groups},
        "seconds": time.time() - t0,
    }
    cm.atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(result, indent=1).encode())
    print(summary(result))
    return result


def summary(result: dict) -> str:
    s = result["suggestion"]
    fmt = lambda v: "none (too few points before the minimum)" if v is None else f"x{v:.4g}"  # noqa: E731
    return "\n".join([
        f"{result['stopped']} after {result['steps_run']} of {result['steps_planned']} steps",
        f"lowest smoothed loss {s['min_loss']:.4f} at x{s['min_loss_mult']:.4g}" if s["min_loss"] is not None
        else "no finite loss",
        f"suggestion (min/10):   {fmt(s['min_over_10'])}",
        f"suggestion (steepest): {fmt(s['steepest'])}",
        f"multipliers of the learning rates given ({result['group']}); note: {s['caveat']}",
    ])


if __name__ == "__main__":
    sys.exit(main())
