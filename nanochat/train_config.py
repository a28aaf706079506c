"""
The trainers' flags and everything that follows from them, without torch: one table, read by everyone.

`BASE_TRAIN` is scripts/base_train's flag table (`Flag`: name, type, default, help). The trainer's
argparse is built from it, the app's calculator takes its defaults from it, and the trainer and the
resume planner build the resume command from it (`resume_command`), so the three cannot drift apart.
The quantities derived from the flags live here too, as upstream base_train derives them: the model
(`model_for`), the total batch, the number of steps and the gradient accumulation (`run_shape`), the
batch-scaled learning rates (`scaled_learning_rates`) and whether `--compile auto` compiles
(`compile_decision`). Classic upstream's rules (its older base_train) are covered for reading its
checkpoints and for the calculator; our trainer trains the current generation only.

A new trainer (chat_sft, lr_find) declares a `Trainer` from the shared flag groups plus its own
`Flag`s; its argparse, defaults, what a resume inherits and its resume command then come for free:

    CHAT_SFT = Trainer("scripts.chat_sft", "Fine-tune a chat model.", RUN_FLAGS + OPTIM_FLAGS + RESUME_FLAGS
                       + (Flag("mmlu_epochs", int, 3, "epochs over MMLU's auxiliary train set"),))

This module parses no command line itself, reads no files and does not import torch.
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import DEFAULT_BASE_DIR
from nanochat.model_config import (
    GPTConfig,
    classic_config,
    classic_flops_per_token,
    current_config,
    flops_per_token,
    param_counts,
    training_memory_bytes,
)

B_REF = 2 ** 19  # upstream's reference batch in tokens (tuned at d12), for the batch-size and LR rules


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a trainer. `dest` is its key in `user_config` (what a checkpoint records)."""

    dest: str
    type: type  # int, float, str; bool = a switch (store_true)
    default: object
    help: str
    aliases: tuple[str, ...] = ()  # other option strings after --<dest with dashes>
    choices: tuple | None = None
    inherit: bool = True  # a resume takes the checkpoint's value unless the flag is given again
    repeat: bool = True  # the resume command repeats it
    # What a value may be (numbers are always finite): at least `low` (above it when `low_open`), at most
    # `high`, or exactly `off`, the value that disables the flag; `name`: one folder name, never a path.
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    off: float | None = None
    name: bool = False
    many: bool = False  # given once per value (--conversations A --conversations B): the value is a list

    @property
    def option_strings(self) -> tuple[str, ...]:
        return ("--" + self.dest.replace("_", "-"), *self.aliases)

    def problem(self, value) -> str | None:
        """Why `value` is not one this flag takes ("must be ..., got ..."), or None. Checked on the command
        line and on the values a resume inherits from a checkpoint: a NaN learning rate, zero steps or a
        tag that climbs out of base_checkpoints/ never reach training."""
        if self.many and isinstance(value, list):
            return next((why for v in value if (why := self.problem(v)) is not None), None)
        if value is None or self.type is bool or (self.off is not None and value == self.off):
            return None
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {value!r}"
            if not math.isfinite(value):
                return f"must be a finite number, got {value}"
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            if too_low or (self.high is not None and value > self.high):
                return f"must be {self._allowed()}, got {value}"
        if self.name and (not isinstance(value, str) or value in ("", ".", "..") or value != Path(value).name
                          or any(c in value for c in "\\/\0")):
            return f"must be a name (one folder under base_checkpoints/), not a path: {value!r}"
        return None

    def _allowed(self) -> str:
        show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
        if self.low is not None and self.high is not None:
            rule = f"from {show(self.low)} to {show(self.high)}"
        elif self.low is not None:
            rule = f"{'above' if self.low_open else 'at least'} {show(self.low)}"
        else:
            rule = f"at most {show(self.high)}"
        return f"{show(self.off)} or {rule}" if self.off is not None else rule

    def argparse_type(self):
        """argparse's `type`: the value, or one line saying why it is refused (a ValueError from int() or
        float() still reads "invalid int value: 'x'": argparse names the type by the function's name)."""
        def parse(text: str):
            value = self.type(text)
            if (why := self.problem(value)) is not None:
                raise argparse.ArgumentTypeError(why)
            return value

        parse.__name__ = self.type.__name__
        return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag (its own repeats the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Trainer:
    """A training script and its flags, in the order --help lists them."""

    script: str  # the module run with `python -m`
    description: str
    flags: tuple[Flag, ...] = ()
    # Only the declared flags go into its commands: an upstream script we do not ship refuses any other
    # (a key its user_config records that it no longer takes). Ours: unknown keys pass, as upstream's names.
    closed: bool = False
    _by_dest: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_dest", {f.dest: f for f in self.flags})
        assert len(self._by_dest) == len(self.flags), f"{self.script}: a flag is declared twice"

    def flag(self, dest: str) -> Flag | None:
        return self._by_dest.get(dest)

    def defaults(self) -> dict:
        return {f.dest: f.default for f in self.flags}

    def build_parser(self, suppress_defaults: bool = False) -> argparse.ArgumentParser:
        """The script's argparse; with `suppress_defaults`, flags not given are absent from the result."""
        p = OneLineParser(prog=f"python -m {self.script}", description=self.description)
        for f in self.flags:
            default = argparse.SUPPRESS if suppress_defaults else f.default
            if f.type is bool:
                p.add_argument(*f.option_strings, dest=f.dest, action="store_true", default=default, help=f.help)
            elif f.many:
                p.add_argument(*f.option_strings, dest=f.dest, action="append", type=f.argparse_type(),
                               default=default, help=f.help)
            else:
                p.add_argument(*f.option_strings, dest=f.dest, type=f.argparse_type(), default=default, help=f.help,
                               choices=list(f.choices) if f.choices else None)
        return p

    def problems(self, values: Mapping) -> list[str]:
        """One line per value its flag does not take ("--warmup-steps must be at least 0, got -5"): for
        values that did not come through the parser, such as those a resume inherits from a checkpoint."""
        return [f"{f.option_strings[0]} {why}" for k, v in values.items()
                if (f := self.flag(k)) is not None and (why := f.problem(v)) is not None]

    def parse_args(self, argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
        """(every flag's value, the dests given on the command line); a leading `--` (torchrun's) is dropped."""
        argv = list(argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        args = self.build_parser().parse_args(argv)
        explicit = set(vars(self.build_parser(suppress_defaults=True).parse_args(argv)))
        return args, explicit

    def inherited(self, saved: Mapping, explicit: set[str]) -> dict:
        """The values a resume takes from the checkpoint's user_config: flags not given again."""
        return {k: v for k, v in saved.items()
                if k not in explicit and (f := self.flag(k)) is not None and f.inherit}


# ---------------------------------------------------------------------- the flag table

RUN_FLAGS = (
    Flag("run", str, "dummy", "run name, recorded in the meta (upstream's wandb name; no wandb here)"),
    # --device-type is upstream's name: commands use it, so the planner's work for upstream's script too
    Flag("device_type", str, "auto", "auto (CUDA if present, else CPU), cpu or cuda", aliases=("--device",),
         choices=("auto", "", "cpu", "cuda"), inherit=False),
    Flag("seed", int, 42, "seed for the initial weights and every RNG", low=0),
    Flag("compile", str, "auto", "torch.compile the model: auto = on for CUDA; on CPU only where compiling pays "
         "back within the run's planned steps (nanochat.train_config.compile_decision; a resume keeps the "
         "checkpoint's choice)", choices=("auto", "on", "off")),
)
MODEL_FLAGS = (
    Flag("depth", int, 20, "number of transformer layers", low=1),
    Flag("aspect_ratio", int, 64, "model_dim = depth * aspect_ratio (rounded up to head_dim)", low=1),
    Flag("head_dim", int, 128, "attention head dimension", low=1),
    Flag("max_seq_len", int, 2048, "context length in tokens", low=1),
    Flag("window_pattern", str, "SSSL", "sliding-window pattern tiled over layers (L = full, S = quarter)"),
)
HORIZON_FLAGS = (  # the first that applies sets the number of steps
    Flag("num_iterations", int, -1, "optimizer steps (-1 = derive from the rules below)", low=1, off=-1),
    Flag("target_flops", float, -1.0, "derive steps from a FLOPs budget (-1 = disable)", low=0, low_open=True, off=-1),
    Flag("target_param_data_ratio", float, 12, "derive steps from tokens:params (-1 = disable)", low=0, low_open=True,
         off=-1),
)
OPTIM_FLAGS = (
    Flag("device_batch_size", int, 32, "sequences per forward pass per process", low=1),
    Flag("total_batch_size", int, -1, "tokens per optimizer step (-1 = upstream's rule)", low=1, off=-1),
    Flag("embedding_lr", float, 0.3, "AdamW LR of the embeddings", low=0),
    Flag("unembedding_lr", float, 0.008, "AdamW LR of lm_head", low=0),
    Flag("weight_decay", float, 0.28, "Muon's cautious weight decay (scaled, cosine to 0)", low=0),
    Flag("matrix_lr", float, 0.02, "Muon LR of the transformer matrices", low=0),
    Flag("scalar_lr", float, 0.5, "AdamW LR of the per-layer scalars", low=0),
    Flag("warmup_steps", int, 40, "steps of linear LR warmup", low=0),
    Flag("warmdown_ratio", float, 0.65, "fraction of the run spent in the linear LR warmdown", low=0, high=1),
    Flag("final_lr_frac", float, 0.05, "LR at the end as a fraction of the peak", low=0, high=1),
)
RESUME_FLAGS = (
    Flag("resume_from_step", int, -1, "resume from this step's checkpoint (-1 = disable)", inherit=False, repeat=False),
    Flag("resume", bool, False, "resume from the latest complete, resumable checkpoint of this model tag",
         inherit=False, repeat=False),
)
RESUME_DESTS = {f.dest for f in RESUME_FLAGS}
# base_train's alone (its resume of upstream-written checkpoints): not in RESUME_FLAGS, which other trainers share
ALLOW_APPROXIMATE = Flag("allow_approximate", bool, False,
                         "with --resume/--resume-from-step: continue a checkpoint upstream nanochat wrote, which holds no "
                         "RNG state or exact data position, as upstream's own resume would (weights, optimizer, step, "
                         "loop state, upstream's data position); checkpoints from then on resume exactly",
                         inherit=False, repeat=False)
OUTPUT_FLAGS = (
    Flag("eval_every", int, 250, "evaluate val bpb every N steps (-1 = disable)"),
    Flag("eval_tokens", int, 80 * 524288, "tokens per val bpb evaluation", low=1),
    Flag("save_every", int, -1, "checkpoint every N steps (-1 = only at the end)"),
    Flag("keep_last", int, -1, "keep only the N newest checkpoints, plus the best-val_bpb one and the resume point "
         "(-1 = keep all)"),
    Flag("model_tag", str, None, "checkpoint directory name (default d<depth>): a name, not a path", name=True),
)

BASE_TRAIN = Trainer("scripts.base_train", "Pretrain a nanochat base model.",
                     RUN_FLAGS + MODEL_FLAGS + HORIZON_FLAGS + OPTIM_FLAGS + RESUME_FLAGS + (ALLOW_APPROXIMATE,)
                     + OUTPUT_FLAGS)
# Upstream's later phases: the workbench does not train them, but the planner builds their commands, which
# take exactly upstream's argparse flags at 92d63d4 (tests/fixtures/upstream/script_flags.json holds the list).
_SOURCE = (Flag("run", str, "dummy", "wandb run name ('dummy' disables wandb logging)"),
           Flag("device_type", str, "", "cuda|cpu|mps (empty = autodetect)"),
           Flag("model_tag", str, None, "model tag to load from"),
           Flag("model_step", int, None, "model step to load from"))
CHAT_SFT = Trainer("scripts.chat_sft", "upstream nanochat's SFT", _SOURCE + (
    Flag("load_optimizer", int, 1, "warm-start optimizer from pretrained checkpoint (0=no, 1=yes)"),
    Flag("num_iterations", int, -1, "number of optimization steps (-1 = full epoch)"),
    Flag("max_seq_len", int, None, "max context length (default: inherit from pretrain)"),
    Flag("device_batch_size", int, None, "per-device batch size (default: inherit from pretrain)"),
    Flag("total_batch_size", int, None, "total batch size in tokens (default: inherit from pretrain)"),
    Flag("embedding_lr", float, None, "learning rate for embedding parameters (Adam) (default: inherit from pretrain)"),
    Flag("unembedding_lr", float, None, "learning rate for unembedding parameters (Adam) (default: inherit from pretrain)"),
    Flag("matrix_lr", float, None, "learning rate for matrix parameters (Muon) (default: inherit from pretrain)"),
    Flag("init_lr_frac", float, 0.8, "initial LR as fraction of base LR"),
    Flag("warmup_ratio", float, 0.0, "ratio of iterations for LR warmup"),
    Flag("warmdown_ratio", float, 0.5, "ratio of iterations for LR warmdown"),
    Flag("final_lr_frac", float, 0.0, "final LR as fraction of initial LR"),
    Flag("eval_every", int, 200, "evaluate val bpb every N steps (-1 = disable)"),
    Flag("eval_tokens", int, 40 * 524288, "number of tokens to evaluate val loss on"),
    Flag("chatcore_every", int, 200, "evaluate ChatCORE metric every N steps (-1 = disable)"),
    Flag("chatcore_max_cat", int, -1, "max problems per categorical task for ChatCORE"),
    Flag("chatcore_max_sample", int, 24, "max problems per generative task for ChatCORE"),
    Flag("mmlu_epochs", int, 3, "number of epochs of MMLU in training mixture (teaches Multiple Choice)"),
    Flag("gsm8k_epochs", int, 4, "number of epochs of GSM8K in training mixture (teaches Math and Tool Use)")),
    closed=True)
CHAT_RL = Trainer("scripts.chat_rl", "upstream nanochat's RL", _SOURCE + (
    Flag("num_epochs", int, 1, "number of epochs over GSM8K"),
    Flag("device_batch_size", int, 8, "max batch size per forward pass"),
    Flag("examples_per_step", int, 16, "total examples per optimization step across all ranks"),
    Flag("num_samples", int, 16, "number of samples per example/question"),
    Flag("max_new_tokens", int, 256, "max tokens to generate per sample"),
    Flag("temperature", float, 1.0, "sampling temperature"),
    Flag("top_k", int, 50, "top-k sampling (0 = disabled)"),
    Flag("embedding_lr", float, 0.2, "learning rate for embedding parameters (Adam)"),
    Flag("unembedding_lr", float, 0.004, "learning rate for unembedding parameters (Adam)"),
    Flag("matrix_lr", float, 0.02, "learning rate for matrix parameters (Muon)"),
    Flag("weight_decay", float, 0.0, "weight decay for embedding/unembedding parameters (Adam)"),
    Flag("init_lr_frac", float, 0.05, "initial LR as fraction of base LR"),
    Flag("eval_every", int, 60, "evaluate pass@k every N steps"),
    Flag("eval_examples", int, 400, "number of examples for pass@k evaluation"),
    Flag("save_every", int, 60, "save checkpoint every N steps")),
    closed=True)
UPSTREAM_SCRIPTS = {"base": BASE_TRAIN, "sft": CHAT_SFT, "rl": CHAT_RL}

# Our SFT trainer (scripts/chat_sft.py): upstream chat_sft's flags where they exist, with its defaults
# (None = inherit from the base checkpoint's meta, as upstream), plus the local data and our guarantees.
# Its user_config records the inherited values resolved, so a resume never needs the base checkpoint.
_INHERITED = " (default: inherit from the base checkpoint, as upstream)"
OUR_CHAT_SFT = Trainer("scripts.chat_sft", "Fine-tune a base checkpoint into a chat model on local conversation files, "
                       "with exact, crash-proof resume.", (
    Flag("model_tag", str, None, "tag of the base checkpoint (base_checkpoints/TAG) to fine-tune, and of the run "
         "written (chatsft_checkpoints/TAG): a name, not a path", name=True),
    Flag("model_step", int, None, "step of the base checkpoint (default: its newest usable step)", low=0),
    Flag("conversations", str, None, "conversation file (JSONL: one CustomJSON array of {role, content} messages, or "
         "{\"messages\": [...]}, per line); repeat for several files", many=True),
    Flag("val_conversations", str, None, "conversation file(s) for val bpb (repeatable; default: hold out "
         "--val-fraction of --conversations)", many=True),
    Flag("val_fraction", float, 0.05, "share of the conversations held out for val bpb when no --val-conversations "
         "(the last ones, at least 1)", low=0, high=0.5),
    Flag("skip_invalid", bool, False, "leave out lines that are not a valid conversation (default: stop at the first, "
         "naming its line)"),
    *RUN_FLAGS,
    Flag("load_optimizer", int, 1, "warm-start the optimizer from the base checkpoint's (0=no, 1=yes)", choices=(0, 1)),
    Flag("num_iterations", int, -1, "optimizer steps (-1 = one epoch over the conversations, counted before training)",
         low=1, off=-1),
    Flag("max_seq_len", int, None, "context length in tokens; a conversation longer than it + 1 is cut" + _INHERITED,
         low=1),
    Flag("device_batch_size", int, None, "rows per forward pass per process" + _INHERITED, low=1),
    Flag("total_batch_size", int, None, "tokens per optimizer step" + _INHERITED, low=1),
    Flag("embedding_lr", float, None, "AdamW LR of the embeddings" + _INHERITED, low=0),
    Flag("unembedding_lr", float, None, "AdamW LR of lm_head" + _INHERITED, low=0),
    Flag("matrix_lr", float, None, "Muon LR of the transformer matrices" + _INHERITED, low=0),
    Flag("init_lr_frac", float, 0.8, "initial LR as a fraction of the LRs above", low=0, low_open=True),
    Flag("warmup_ratio", float, 0.0, "fraction of the steps in linear LR warmup", low=0, high=1),
    Flag("warmdown_ratio", float, 0.5, "fraction of the steps in the linear LR warmdown", low=0, high=1),
    Flag("final_lr_frac", float, 0.0, "LR at the end as a fraction of the initial LR", low=0, high=1),
    Flag("eval_every", int, 200, "evaluate val bpb every N steps (-1 = disable)"),
    Flag("eval_tokens", int, 40 * 524288, "tokens per val bpb evaluation", low=1),
    Flag("save_every", int, -1, "checkpoint every N steps (-1 = only at the end)"),
    Flag("keep_last", int, -1, "keep only the N newest checkpoints, plus the best-val_bpb one and the resume point "
         "(-1 = keep all)"),
    *RESUME_FLAGS))
OUR_TRAINERS = {"base": BASE_TRAIN, "sft": OUR_CHAT_SFT}  # phase -> the trainer that resumes our runs of it exactly

# Classic upstream (Oct-Nov 2025) had no --warmup-steps, a 65,536-token vocabulary and an explicit batch.
CLASSIC_DEFAULTS = {"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0, "total_batch_size": 524288,
                    "target_param_data_ratio": 20.0}
VOCAB_SIZE = {"current": 32768, "classic": 65536}  # upstream tokenizers' sizes (tok_train's default is current's)


def is_classic_user_config(user_config: Mapping) -> bool:
    return "warmup_ratio" in user_config and "warmup_steps" not in user_config


def flag_values(user_config: Mapping) -> dict:
    """A run's flags with the defaults of its trainer (ours, or classic upstream's) for any it does not
    record; None counts as missing."""
    defaults = BASE_TRAIN.defaults()
    if is_classic_user_config(user_config):
        defaults = {**{k: v for k, v in defaults.items() if k != "warmup_steps"}, **CLASSIC_DEFAULTS}
    return {**defaults, **{k: v for k, v in user_config.items() if v is not None}}


# ---------------------------------------------------------------------- derived quantities


def model_for(user_config: Mapping, vocab_size: int) -> GPTConfig:
    """The model these flags build (classic: from --depth alone). Raises ArchitectureError."""
    v = flag_values(user_config)
    if is_classic_user_config(user_config):
        return classic_config(int(v["depth"]), int(v["max_seq_len"]), vocab_size)
    return current_config(int(v["depth"]), int(v["aspect_ratio"]), int(v["head_dim"]), int(v["max_seq_len"]),
                          vocab_size, v["window_pattern"] or "L")


def derive_total_batch_size(user_config: Mapping, config: GPTConfig) -> int:
    """Current upstream's batch size when --total-batch-size=-1: scale 2**19 tokens (tuned for d12)
    by (target tokens / d12's target tokens) ** 0.383, rounded to a power of two."""
    v = flag_values(user_config)
    ratio = float(v["target_param_data_ratio"])
    d12 = current_config(12, int(v["aspect_ratio"]), int(v["head_dim"]), config.sequence_len, config.vocab_size,
                         config.window_pattern)
    d_ref = ratio * param_counts(d12)["scaling"]
    target_tokens = ratio * param_counts(config)["scaling"]
    return 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))


def resolve_num_iterations(user_config: Mapping, config: GPTConfig, total_batch_size: int | None = None) -> int | None:
    """Steps a run trains for, exactly as upstream base_train resolves them; None when the flags
    do not determine it (e.g. a data ratio of 0 with no other rule)."""
    num = user_config.get("num_iterations")
    if isinstance(num, (int, float)) and num > 0:
        return int(num)
    tbs = total_batch_size or user_config.get("total_batch_size")
    if not tbs or tbs <= 0:
        if is_classic_user_config(user_config):
            return None
        tbs = derive_total_batch_size(user_config, config)
    target_flops = user_config.get("target_flops") or -1
    classic = is_classic_user_config(user_config) or config.is_classic
    if target_flops > 0:
        fpt = classic_flops_per_token(config) if classic else flops_per_token(config)
        return round(target_flops / (fpt * tbs))
    ratio = user_config.get("target_param_data_ratio")
    if ratio is None or ratio <= 0:
        return None
    counts = param_counts(config)
    params = counts["total"] if classic else counts["scaling"]
    return int(ratio * params) // tbs


@dataclass(frozen=True)
class RunShape:
    """What a set of flags trains: the model, the batch arithmetic and the horizon. `problems` says,
    one line each, why the trainer would refuse these flags (empty: it trains)."""

    config: GPTConfig
    classic: bool
    total_batch_size: int | None  # tokens per optimizer step
    num_iterations: int | None
    tokens_per_micro_step: int  # device batch x sequence x processes
    grad_accum: int | None  # micro-steps per optimizer step (None: the total is not a multiple)
    problems: tuple[str, ...]

    @property
    def flops_per_token(self) -> int:
        return classic_flops_per_token(self.config) if self.classic else flops_per_token(self.config)

    @property
    def params(self) -> dict[str, int]:
        return param_counts(self.config)

    @property
    def tokens(self) -> int | None:
        return self.num_iterations * self.total_batch_size if self.num_iterations and self.total_batch_size else None

    @property
    def tokens_per_param(self) -> float | None:
        """Training tokens over the parameters the data-ratio rule counts (classic: all of them)."""
        return self.tokens / self.params["total" if self.classic else "scaling"] if self.tokens else None


def run_shape(user_config: Mapping, *, vocab_size: int, world_size: int = 1) -> RunShape:
    """The model, total batch, steps and gradient accumulation these flags give, as the trainer derives
    them. Raises ArchitectureError when the model flags describe no buildable model."""
    classic = is_classic_user_config(user_config)
    v = flag_values(user_config)
    config = model_for(user_config, vocab_size)
    tbs = v["total_batch_size"] if v["total_batch_size"] > 0 else (
        None if classic else derive_total_batch_size(user_config, config))
    steps = resolve_num_iterations(v, config, tbs) if tbs else None
    per_step = int(v["device_batch_size"]) * config.sequence_len * world_size
    problems = []
    if tbs is None:
        problems.append("classic nanochat needs an explicit --total-batch-size")
    elif per_step <= 0 or tbs % per_step:
        problems.append(f"--total-batch-size {tbs:,} is not a multiple of device batch × sequence × processes "
                        f"({v['device_batch_size']} × {config.sequence_len} × {world_size} = {per_step:,})")
    if not steps or steps <= 0:
        problems.append("no training horizon: set --num-iterations, --target-flops or a positive "
                        "--target-param-data-ratio")
    grad_accum = tbs // per_step if tbs and per_step > 0 and tbs % per_step == 0 else None
    return RunShape(config, classic, tbs, steps if steps and steps > 0 else None, per_step, grad_accum, tuple(problems))


def memory_problem(shape: RunShape, memory_bytes: int | None, device: str) -> str | None:
    """Why a run cannot fit its device, or None: refused only when the weights, gradients and optimizer
    state alone (float32, a floor under any real run's memory) exceed the device's memory, so a model
    that fits is never refused, and --depth 100000 gets a figure instead of an allocator traceback."""
    need = training_memory_bytes(shape.config, 1)
    floor = need["weights"] + need["gradients"] + need["optimizer"]
    if not memory_bytes or floor <= memory_bytes:
        return None
    return (f"this model ({shape.params['total']:,} parameters) needs at least {_gib(floor)} for its weights, "
            f"gradients and optimizer state alone, more than {device} ({_gib(memory_bytes)}): lower --depth")


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


@dataclass(frozen=True)
class ScaledRates:
    """Learning rates and Muon's weight decay after upstream's batch and model-size scaling."""

    embedding: float
    unembedding: float
    matrix: float
    scalar: float
    weight_decay: float


def scaled_learning_rates(user_config: Mapping, shape: RunShape) -> ScaledRates:
    """LRs x sqrt(total batch / 2**19), as upstream; the weight decay also x (d12's scaling params /
    this model's), which keeps upstream's T_epoch constant across sizes."""
    v = flag_values(user_config)
    cfg = shape.config
    scale = (shape.total_batch_size / B_REF) ** 0.5
    d12 = param_counts(current_config(12, int(v["aspect_ratio"]), int(v["head_dim"]), cfg.sequence_len,
                                      cfg.vocab_size, cfg.window_pattern))["scaling"]
    return ScaledRates(embedding=v["embedding_lr"] * scale, unembedding=v["unembedding_lr"] * scale,
                       matrix=v["matrix_lr"] * scale, scalar=v["scalar_lr"] * scale,
                       weight_decay=v["weight_decay"] * scale * (d12 / param_counts(cfg)["scaling"]))


# ---------------------------------------------------------------------- --compile auto

# torch.compile on CPU (torch 2.13, 2 threads of a quiet 2-core machine, empty inductor cache). Compiling the
# training step costs a fixed part plus a part per layer, once per launch (dynamo unrolls the layers; ~20 s
# measured at the fixture's depth 2, 26-27 s at the demo's depth 4). It then saves COMPILE_CPU_SAVING of each
# eager step. bench/train.py measured (2026-11-30, quiet): 1.35x at the demo's scale (saving 0.26; compiling
# paid back after 305 steps, 356 in an earlier session) and 1.17-1.23x at the fixture's tiny scale, where the
# matmuls are too small for the fused elementwise work to matter as much. The demo's figure is used: it is the
# scale where the choice costs real time, and at tiny scales a wrong choice costs seconds. The eager step
# time is estimated from FLOPs at CPU_EAGER_FLOPS, the rate of our eager step at the demo's scale (12,382
# tok/s x 7.28 MFLOPs/token). bench/train.py prints what these come from (compile_s, compiled_speedup,
# compile_breakeven_steps): re-measure there when torch or the model changes.
COMPILE_CPU_S, COMPILE_CPU_S_PER_LAYER = 10.0, 5.0
COMPILE_CPU_SAVING = 0.25
CPU_EAGER_FLOPS = 9e10


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str  # one line for the trainer's start-up message


def compile_decision(mode: str, device_type: str, shape: RunShape, steps_left: int,
                     saved: bool | None = None) -> CompileDecision:
    """Whether to torch.compile the model. `on`/`off` are the user's; `auto` compiles on CUDA, and on CPU
    where the estimated saving over the steps this launch runs exceeds the compile time. A resume
    (`saved`: what the checkpoint's launch chose) keeps that choice, so the continuation runs the same
    kernels as an uninterrupted run would (bit-exact resume)."""
    if mode in ("on", "off"):
        return CompileDecision(mode == "on", f"--compile {mode}")
    if saved is not None:
        return CompileDecision(saved, "as the checkpoint's launch chose")
    if device_type == "cuda":
        return CompileDecision(True, "auto: CUDA")
    step_s = shape.flops_per_token * (shape.total_batch_size or 0) / CPU_EAGER_FLOPS
    saving = steps_left * step_s * COMPILE_CPU_SAVING
    cost = COMPILE_CPU_S + COMPILE_CPU_S_PER_LAYER * shape.config.n_layer
    pays = saving > cost
    return CompileDecision(pays, f"auto: ~{saving:.0f} s saved over {steps_left:,} steps "
                                 f"{'>' if pays else '<='} ~{cost:.0f} s to compile")


# ---------------------------------------------------------------------- the resume command


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: dict[str, str]

    @property
    def line(self) -> str:
        """The shell line: environment assignments, then the quoted argv."""
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.quote(a) for a in self.argv])


def launch_env(base_dir: str | Path | None, cpu_threads: int | None = None) -> dict[str, str]:
    """The environment a command needs: the base dir unless it is the default one, and the CPU thread
    count a run was trained with (reductions depend on it: same count, same bits)."""
    env = {}
    if base_dir is not None:
        resolved = Path(base_dir).expanduser().resolve()
        if resolved != DEFAULT_BASE_DIR.expanduser().resolve():
            env["NANOCHAT_BASE_DIR"] = str(resolved)
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def _flag_args(trainer: Trainer, key: str, value, classic: bool) -> list[str]:
    """The command-line arguments that give `key` this value: one per value of a `many` flag."""
    f = trainer.flag(key)
    if f is not None and f.many and isinstance(value, list):
        return [a for v in value if (a := _flag_arg(trainer, key, v, classic))]
    return [a] if (a := _flag_arg(trainer, key, value, classic)) else []


def _flag_arg(trainer: Trainer, key: str, value, classic: bool) -> str | None:
    f = trainer.flag(key)
    # which step to resume is the command's own choice, whatever script recorded the key
    if (f is not None and not f.repeat) or key in RESUME_DESTS or value is None or value is False:
        return None
    if f is None and trainer.closed:
        return None
    # classic upstream parsed --key=value with underscores (its configurator); others take argparse flags
    name = f"--{key}" if classic else (f.option_strings[0] if f is not None else "--" + key.replace("_", "-"))
    if value is True:
        return name
    return f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"


def resume_command(trainer: Trainer, user_config: Mapping, *, world_size: int, resume_step: int | None,
                   env: Mapping[str, str] | None = None, overrides: Mapping | None = None,
                   approximate: bool = False) -> Command:
    """The command that continues a run: every flag of its user_config (so it means the same whatever
    the trainer's defaults become), `overrides` (e.g. the model tag, a new --num-iterations), then
    `--resume-from-step` (None: a script without resume restarts), launched by torchrun for several
    processes. The trainer prints it on a stop; the registry's resume planner shows it. `approximate`:
    our base_train continuing an upstream-written run (`--allow-approximate`); the user_config keys
    base_train has no flag for (upstream's --fp8, --core-metric-every, ...) are left out."""
    if approximate:
        user_config = {k: v for k, v in user_config.items() if trainer.flag(k) is not None}
    user = {**user_config, **(overrides or {})}
    # The syntax is the script's: only classic base_train parsed --key=value (its configurator). A chat_sft
    # user_config looks "classic" (warmup_ratio, no warmup_steps) but chat_sft takes argparse flags.
    classic = trainer is BASE_TRAIN and is_classic_user_config(user_config)
    flags = [a for k, v in user.items() for a in _flag_args(trainer, k, v, classic)]
    if resume_step is not None:
        flags.append(f"--resume-from-step={resume_step}")
    if approximate:
        flags.append(ALLOW_APPROXIMATE.option_strings[0])
    launcher = ["python", "-m", trainer.script] if world_size <= 1 else \
        ["torchrun", "--standalone", f"--nproc_per_node={world_size}", "-m", trainer.script, "--"]
    return Command(tuple(launcher + flags), dict(env or {}))
