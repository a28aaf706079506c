"""
Checkpoints on disk in upstream nanochat's formats: discover, check, load, save.

Layouts:
- upstream: `model_{step:06d}.pt` + `meta_{step:06d}.json` + `optim_{step:06d}_rank{r}.pt` (classic:
  `optim_{step:06d}.pt`), one step per checkpoint, in `<base>/{base,chatsft,chatrl}_checkpoints/<tag>/`;
  our own training adds `trainstate_{step:06d}_rank{r}.pt` (RNG and data-loader state for exact resume)
  and a few top-level meta keys (`world_size`, `num_iterations`, `resume_segment`, `train_state`).
- single file: `checkpoint.pt` holding {"model", "metadata", "optimizers"}.

Discovery and the quick checks read only names, sizes, zip directories and JSON, so the registry can
call them without torch. Loading and saving import torch lazily; loading always uses
`weights_only=True`, so a checkpoint from a stranger cannot run code. Saves are atomic (temporary
name in the same directory, fsync, rename) and the meta file, written last, marks a step complete:
a truncated or meta-less step is never "the last step".

This module does not scan whole trees or keep history (see `registry/`), and knows nothing of
sampling (see `engine.py`).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import bounds, torchfile
from nanochat.atomic_file import atomic_write_bytes, fsync_dir, remove_stale_temp_files
from nanochat.common import TooLargeError, read_regular

PHASE_DIRS = {"base_checkpoints": "base", "chatsft_checkpoints": "sft", "chatrl_checkpoints": "rl",
              "lrfind": "lrfind"}  # learning-rate range tests (scripts/lr_find.py): metrics only, no checkpoints
SINGLE_FILE = "checkpoint.pt"
MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
META_RE = re.compile(r"^meta_(\d+)\.json$")
OPTIM_RE = re.compile(r"^optim_(\d+)(?:_rank(\d+))?\.pt$")
TRAIN_STATE_RE = re.compile(r"^trainstate_(\d+)_rank(\d+)\.pt$")
# A meta must describe the model. The step is the file name's (upstream's chat_rl writes no "step"); a meta
# that has one must agree. A single file has no name to take the step from, so its metadata needs it.
REQUIRED_META_KEYS = ("model_config",)
REQUIRED_SINGLE_FILE_KEYS = ("step", "model_config")


class CheckpointError(Exception):
    """A checkpoint problem with a one-line message; `code` is a stable problem code."""

    code = "checkpoint_error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class CheckpointNotFoundError(CheckpointError):
    code = "not_found"


class IncompleteCheckpointError(CheckpointError):
    code = "incomplete"


class UnsafeCheckpointError(CheckpointError):
    code = "unsafe_pickle"


class CheckpointMismatchError(CheckpointError):
    """Files that disagree: state dict vs meta, tokenizer vs model, resume config vs checkpoint."""
    code = "mismatch"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. `blocks` says what it prevents: "load" or only "resume"."""
    code: str
    message: str
    blocks: str = "load"
    file: str | None = None


@dataclass(frozen=True)
class CheckpointFiles:
    directory: Path
    step: int | None
    layout: str  # "upstream" or "single_file"
    model: Path | None = None
    meta: Path | None = None
    optimizer_shards: dict[int, Path] = field(default_factory=dict)  # rank -> file
    train_states: dict[int, Path] = field(default_factory=dict)  # rank -> file (our checkpoints)

    @property
    def files(self) -> list[Path]:
        out = [p for p in (self.model, self.meta) if p is not None]
        return out + [self.optimizer_shards[r] for r in sorted(self.optimizer_shards)] + \
            [self.train_states[r] for r in sorted(self.train_states)]

    @property
    def label(self) -> str:
        return f"{self.directory.name}@{self.step}" if self.step is not None else str(self.directory)


# ---------------------------------------------------------------------- discovery (no torch)


def phase_and_tag(directory: str | os.PathLike) -> tuple[str, str]:
    """("base"|"sft"|"rl", model tag) from `<base>/<phase>_checkpoints/<tag>`; other folders: ("base", name)."""
    # Plain string handling: the registry calls this for every checkpoint it lists (10,000 Path objects
    # cost the app's integrity page ~0.3 s).
    d = os.path.normpath(os.fspath(directory))
    parent, name = os.path.split(d)
    return PHASE_DIRS.get(os.path.basename(parent), "base"), name


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointFiles]:
    """Every step found in one run directory, oldest first, complete or not."""
    d = Path(directory)
    if not d.exists():
        raise CheckpointNotFoundError(f"{d} does not exist", "missing_file")
    if not d.is_dir():
        raise CheckpointNotFoundError(f"{d} is not a directory")
    try:
        names = os.listdir(d)
    except OSError as e:
        raise CheckpointNotFoundError(f"cannot list {d}: {e.strerror}", "unreadable") from None
    steps: dict[int, dict] = {}

    def slot(step: int) -> dict:
        return steps.setdefault(step, {"optimizer_shards": {}, "train_states": {}})

    for name in names:
        kind = classify_name(name)
        if kind is None or kind[0] in ("single_file", "out_of_range"):
            continue  # a step or rank past the bounds is not a checkpoint file (the scanner reports it)
        kind, step, rank = kind
        if kind in ("model", "meta"):
            slot(step)[kind] = d / name
        else:
            slot(step)["optimizer_shards" if kind == "optimizer" else "train_states"][rank] = d / name
    out = [CheckpointFiles(directory=d, step=s, layout="upstream", **steps[s]) for s in sorted(steps)]
    if SINGLE_FILE in names:
        out.append(_single_file_checkpoint(d / SINGLE_FILE))
    return out


def classify_name(name: str) -> tuple[str, int | None, int | None] | None:
    """(kind, step, rank) of a checkpoint file name (kind: model, meta, optimizer, train_state,
    single_file), ("out_of_range", None, None) for a checkpoint name whose step or rank is past
    `bounds`, None for other files."""
    if name == SINGLE_FILE:
        return "single_file", None, None
    for kind, rx in (("model", MODEL_RE), ("meta", META_RE), ("optimizer", OPTIM_RE), ("train_state", TRAIN_STATE_RE)):
        if m := rx.match(name):
            return numbered(kind, *m.groups())
    return None


def numbered(kind: str, step: str, rank: str | None = None) -> tuple[str, int | None, int | None]:
    """classify_name's answer from the digits a file-name pattern matched."""
    n = bounds.name_number(step)
    r = bounds.name_number(rank, bounds.MAX_WORLD_SIZE - 1) if rank is not None else (0 if kind == "optimizer" else None)
    if n is None or (rank is not None and r is None):
        return "out_of_range", None, None
    return kind, n, r


def _single_file_checkpoint(path: Path) -> CheckpointFiles:
    step = None
    try:
        meta = torchfile.read_structure(path, shapes_only=True).get("metadata") or {}
        step = int(meta["step"]) if isinstance(meta.get("step"), int) else None
    except (torchfile.TorchFileError, AttributeError):
        pass  # reported by quick_problems; discovery never fails on a bad file
    return CheckpointFiles(directory=path.parent, step=step, layout="single_file", model=path)


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> CheckpointFiles:
    """The checkpoint a user means by a path: a model/meta file, `checkpoint.pt`, a run directory
    (latest complete step unless `step`), or a base directory that holds exactly one run."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name == SINGLE_FILE:
            ckpt = _single_file_checkpoint(p)
        elif (kind := classify_name(p.name)) and kind[0] in ("model", "meta"):
            found = [c for c in list_checkpoints(p.parent) if c.step == kind[1] and c.layout == "upstream"]
            ckpt = found[0]
        elif kind and kind[0] == "out_of_range":
            raise CheckpointNotFoundError(f"{p.name}: its step is out of range (at most {bounds.MAX_STEP})")
        else:
            raise CheckpointNotFoundError(
                f"{p.name} is not a checkpoint file (expected model_NNNNNN.pt, meta_NNNNNN.json or {SINGLE_FILE})")
        if step is not None and ckpt.step != step:
            raise CheckpointNotFoundError(f"{p.name} is step {ckpt.step}, not step {step}")
        _raise_if_incomplete(ckpt)
        return ckpt
    if not p.exists():
        raise CheckpointNotFoundError(f"{p} does not exist", "missing_file")
    found = list_checkpoints(p)
    if not found:
        runs = find_run_dirs(p)
        if len(runs) == 1:
            return resolve_checkpoint(runs[0], step)
        if runs:
            shown = ", ".join(str(r.relative_to(p)) for r in runs[:4])
            raise CheckpointNotFoundError(f"{p} holds {len(runs)} runs ({shown}); point at one of them")
        raise CheckpointNotFoundError(f"no checkpoints in {p}")
    if step is None:
        return find_last_complete(p)
    matches = [c for c in found if c.step == step]
    if not matches:
        have = ", ".join(str(c.step) for c in found[-5:])
        raise CheckpointNotFoundError(f"no step {step} in {p} (steps there: {have})")
    _raise_if_incomplete(matches[0])
    return matches[0]


def find_run_dirs(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """Directories under root (root included) that contain checkpoint files, sorted."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames.clear()
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        if any(MODEL_RE.match(f) for f in filenames) or SINGLE_FILE in filenames:
            out.append(Path(dirpath))
    return sorted(out)


def _file_problems(ckpt: CheckpointFiles) -> list[Problem]:
    """The quick check's findings on whether a save finished and its files are whole (see
    `quick_check.QuickCheck.file_problems`): what makes a checkpoint complete here."""
    from nanochat import quick_check

    return quick_check.quick_check(ckpt).file_problems


def _raise_if_incomplete(ckpt: CheckpointFiles) -> None:
    blocking = [p for p in _file_problems(ckpt) if p.blocks == "load"]
    if blocking:
        raise IncompleteCheckpointError(f"{ckpt.label} is not usable: {blocking[0].message}", blocking[0].code)


def find_last_complete(directory: str | os.PathLike, resumable: bool = False) -> CheckpointFiles:
    """The newest step whose save finished with whole files (the quick check's file problems; and, if
    `resumable`, with every optimizer shard and training state). Upstream picks the largest model file
    even when truncated; we never do. A finished save whose contents are wrong is still found, so that
    loading it says what is wrong instead of quietly loading an older step."""
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointNotFoundError(f"no checkpoints in {directory}")
    for ckpt in reversed(found):
        if not any(p.blocks == "load" or resumable for p in _file_problems(ckpt)):
            return ckpt
    what = "resumable" if resumable else "complete"
    raise IncompleteCheckpointError(f"no {what} checkpoint in {directory} ({len(found)} incomplete steps)")


@dataclass(frozen=True)
class Usable:
    """The checkpoint to use, and the newer steps passed over with the first problem of each."""
    checkpoint: CheckpointFiles
    skipped: tuple[tuple[CheckpointFiles, Problem], ...] = ()

    def notes(self) -> list[str]:
        """One line per skipped step, worded as the resume planner words them."""
        return [f"skipped newer step {c.step if c.step is not None else c.model.name}: {p.code}: {p.message}"
                for c, p in self.skipped]


def find_last_usable(directory: str | os.PathLike, resumable: bool = False) -> Usable:
    """The newest step that passes the one quick check (no problem that blocks loading; with `resumable`,
    no problem at all), and the newer ones it passed over. Unlike `find_last_complete`, a finished save
    whose contents are wrong (an unsafe pickle, a state dict its config does not explain, a meta out of
    bounds) is skipped too: what a trainer resumes from, or a tool loads, when no step is named; the
    caller says which steps were skipped and why (`Usable.notes`)."""
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointNotFoundError(f"no checkpoints in {directory}")
    skipped = []
    for ckpt in reversed(found):
        blocking = [p for p in quick_problems(ckpt) if resumable or p.blocks == "load"]
        if not blocking:
            return Usable(ckpt, tuple(skipped))
        skipped.append((ckpt, blocking[0]))
    what = "resumable" if resumable else "usable"
    first = skipped[0][1]
    raise IncompleteCheckpointError(f"no {what} checkpoint in {directory}: all {len(found)} fail the quick check "
                                    f"(newest: {first.code}: {first.message})", first.code)


def resolve_usable(path: str | os.PathLike, step: int | None = None) -> Usable:
    """`resolve_checkpoint`, except that a run directory (or a base dir holding one run) without a step
    means its newest step that passes the quick check (`find_last_usable`)."""
    p = Path(path).expanduser()
    if step is None and p.is_dir():
        runs = [p] if list_checkpoints(p) else find_run_dirs(p)
        if len(runs) == 1:
            return find_last_usable(runs[0])
    return Usable(resolve_checkpoint(p, step))


def read_meta(ckpt: CheckpointFiles) -> dict:
    """The checkpoint's metadata dict, read from JSON (or from the single file's pickle, stubbed)."""
    if ckpt.layout == "single_file":
        try:
            tree = torchfile.read_structure(ckpt.model, shapes_only=True)
        except torchfile.TorchFileError as e:
            raise CheckpointError(about(ckpt.model.name, e), e.code) from None
        return single_file_meta(tree, ckpt.model.name)
    if ckpt.meta is None:
        raise CheckpointError(f"step {ckpt.step} has no meta_{ckpt.step:06d}.json", "missing_meta")
    try:
        # Upstream writes `Infinity` for loop_state.min_val_bpb when evaluation is off (Python's json.dump
        # allows it; strict JSON, PostgreSQL's json type and browsers do not): non-finite numbers read as
        # null, so a meta is plain JSON everywhere after this; readers that need upstream's meaning map it back.
        text = read_regular(ckpt.meta, bounds.MAX_META_BYTES).decode("utf-8")
        meta = bounds.loads(text, parse_constant=_non_finite_as_null)
    except TooLargeError:
        raise CheckpointError(f"{ckpt.meta.name} is larger than {bounds.MAX_META_BYTES >> 20} MB: not a meta",
                              "bad_meta_json") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {ckpt.meta.name}: {e.strerror}", "unreadable") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too deep, an integer of too many digits
        raise CheckpointError(f"{ckpt.meta.name} is not valid JSON ({e})", "bad_meta_json") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt.meta.name} is not a JSON object", "bad_meta_json")
    return check_meta(meta, ckpt.meta.name, text)


def _non_finite_as_null(_constant: str) -> None:
    return None


def check_meta(meta: dict, name: str, text: str | None = None) -> dict:
    """The meta, if its numbers are within `bounds` (CheckpointError "bad_meta" otherwise): every reader
    of a meta goes through here before a number from it drives memory, a loop or SQL. `text`: the JSON
    it was just parsed from with `bounds.loads` (a shortcut for the check, see `bounds.meta_problem`)."""
    if why := bounds.meta_problem(meta, text):
        raise CheckpointError(f"{name}: {why}", "bad_meta")
    return meta


def writer_of(ckpt: CheckpointFiles, meta: dict | None) -> str:
    """Which script wrote a checkpoint: "chat_rl" (upstream's RL: a meta with no step, in
    chatrl_checkpoints/ or not), "chat_sft", "base_train" (ours or upstream's), or "other" (a single
    file). The resume command takes this script's flags; whether a checkpoint can be resumed at all
    starts here (`why_not_resumable`)."""
    return _writer(ckpt.layout, ckpt.directory, meta)


def _writer(layout: str, directory: str | os.PathLike, meta: dict | None) -> str:
    if layout == "single_file":
        return "other"
    phase = phase_and_tag(directory)[0]
    if phase == "rl" or (isinstance(meta, dict) and "step" not in meta and "user_config" not in meta):
        return "chat_rl"
    return "chat_sft" if phase == "sft" else "base_train"


def saves_optimizer(ckpt: CheckpointFiles, meta: dict | None) -> bool:
    """Whether the script that wrote it saves optimizer state: upstream's chat_rl does not, by design."""
    return writer_of(ckpt, meta) != "chat_rl"


def why_not_resumable(layout: str, directory: str | os.PathLike, meta: dict | None) -> str | None:
    """Why no script can continue training from a checkpoint, however intact its files (None: one can).
    The one rule behind a checkpoint's `resumable` (registry) and the resume plan's "unsupported"."""
    from nanochat.train_config import is_classic_user_config

    writer = _writer(layout, directory, meta)
    if writer == "other":
        return "single-file checkpoints come from other training scripts; no nanochat script resumes them"
    if writer == "chat_rl":
        return "cannot be resumed: upstream's chat_rl saves no optimizer (its checkpoints load and sample)"
    user = (meta or {}).get("user_config")
    if writer == "base_train" and isinstance(user, dict) and is_classic_user_config(user):
        return ("classic nanochat (before --resume-from-step existed) cannot resume, and current base_train builds "
                "a different architecture: the weights load for evaluation and sampling only")
    return None


def single_file_meta(tree, name: str) -> dict:
    """The `metadata` dict of a single-file checkpoint's object tree."""
    meta = tree.get("metadata") if isinstance(tree, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name} has no metadata dict", "missing_meta")
    return check_meta(meta, name)


def expected_world_size(ckpt: CheckpointFiles, meta: dict | None) -> int:
    """Optimizer shards a resume needs: our meta records it; for upstream, the ranks present say it."""
    if meta and isinstance(meta.get("world_size"), int) and meta["world_size"] > 0:
        return meta["world_size"]
    return max(ckpt.optimizer_shards, default=-1) + 1


def quick_problems(ckpt: CheckpointFiles, meta: dict | None = None) -> list[Problem]:
    """The quick check's problems: files, zips, meta, resume files and the model's pickle against its
    config, no torch and no tensor data (its one home is `nanochat.quick_check`; imported here lazily
    because it builds on this module)."""
    from nanochat import quick_check

    return quick_check.quick_problems(ckpt, meta)


def find_tokenizer_dir(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Where the tokenizer of a run lives: `<dir>/tokenizer`, the base directory that holds
    `<phase>_checkpoints/<tag>/`, then `$NANOCHAT_BASE_DIR/tokenizer`."""
    d = Path(checkpoint_dir).resolve()
    candidates = [d / "tokenizer"]
    if d.parent.name in PHASE_DIRS:
        candidates.append(d.parent.parent / "tokenizer")
    candidates += [d.parent / "tokenizer", d.parent.parent / "tokenizer"]
    if os.environ.get("NANOCHAT_BASE_DIR"):
        candidates.append(Path(os.environ["NANOCHAT_BASE_DIR"]) / "tokenizer")
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer.pkl").is_file():
            return c
    return None


def state_dict_shapes(ckpt: CheckpointFiles) -> dict[str, torchfile.TensorStub]:
    """Key -> TensorStub of the model's state dict, read from the pickle alone (no tensor data)."""
    try:
        tree = torchfile.read_structure(ckpt.model)
    except torchfile.TorchFileError as e:
        raise CheckpointError(str(e), e.code) from None
    if ckpt.layout == "single_file":
        tree = tree.get("model") if isinstance(tree, dict) else None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{ckpt.model.name} does not hold a state dict", "bad_state_dict")
    return {k.removeprefix("_orig_mod."): v for k, v in tree.items() if isinstance(v, torchfile.TensorStub)}


# ---------------------------------------------------------------------- loading (torch)


@dataclass
class LoadedModel:
    model: object  # nanochat.gpt.GPT, in eval mode
    tokenizer: object  # nanochat.tokenizer.Tokenizer
    meta: dict
    checkpoint: CheckpointFiles
    phase: str
    tag: str


def torch_load(path: Path, device="cpu"):
    """torch.load with weights_only=True, errors turned into one-line CheckpointErrors."""
    import pickle

    import torch

    try:  # our reader first: a FIFO is refused instead of waited on, and a file that is no torch.save archive
        torchfile.check_archive(path)  # gets our message, not torch's advice to save it again differently
    except torchfile.TorchFileError as e:
        if e.code == "missing_file":
            raise CheckpointNotFoundError(f"{path} does not exist", "missing_file") from None
        raise CheckpointError(about(path.name, e), e.code) from None
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=str(device) == "cpu")
    except pickle.UnpicklingError as e:
        raise refusal(path, str(e)) from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} does not exist", "missing_file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} cannot be read (truncated or corrupt?): {_first_sentence(e)}", "truncated") from None


def refusal(path: Path, torch_message: str) -> CheckpointError:
    """What torch's weights-only loader refused, said in our words, in one line: the globals outside the
    allow-list (our static scan names them), a malformed pickle, or else the one line of torch's message
    that says what it met. Never torch's advice to retry with weights_only=False: that runs the file."""
    from nanochat import quick_check  # it builds on this module

    try:
        unsafe = torchfile.unsafe_globals(path)
    except torchfile.TorchFileError as e:
        return CheckpointError(f"{about(path.name, e)}; the file is refused", e.code)
    if unsafe:
        return UnsafeCheckpointError(f"{quick_check.unsafe_problem(path.name, unsafe, 'load').message}; the file is refused")
    said = next((line.strip().removeprefix("WeightsUnpickler error:").strip() for line in torch_message.splitlines()
                 if "nsupported" in line), "") or "a construct it does not allow"
    return CheckpointError(f"{path.name} is refused by the weights-only loader ({_first_sentence(said)}); nothing in it "
                           "was run", "load_failed")


def about(name: str, error: BaseException) -> str:
    """An error's one-line message led by the file's name, once (many messages already start with it)."""
    text = str(error)
    return text if text.startswith(name) else f"{name}: {text}"


def _first_sentence(error: BaseException | str) -> str:
    """The first sentence of the first line of a library's message (torch appends paragraphs of advice)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.split(". ", 1)[0].rstrip(".")[:200]


def load_state_dict(ckpt: CheckpointFiles, device="cpu") -> dict:
    obj = torch_load(ckpt.model, device)
    if ckpt.layout == "single_file":
        obj = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{ckpt.model.name} does not hold a state dict", "bad_state_dict")
    if not obj:
        raise CheckpointError(f"{ckpt.model.name} holds an empty state dict", "empty_state_dict")
    return {k.removeprefix("_orig_mod."): v for k, v in obj.items()}


def config_from_checkpoint(meta: dict, shapes: dict):
    """The GPTConfig the meta and the state dict's shapes imply, with every shape checked."""
    import torch

    from nanochat.gpt import GPT, ArchitectureError, GPTConfig

    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise CheckpointMismatchError("meta has no model_config", "bad_meta")
    try:
        config = GPTConfig.from_checkpoint(model_config, shapes)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    except (ArchitectureError, TypeError) as e:
        raise CheckpointMismatchError(f"architecture: {e}", "unexpected_keys") from None
    got = {k: tuple(v) for k, v in shapes.items()}
    if extra := sorted(set(got) - set(expected)):
        raise CheckpointMismatchError(f"state dict has key(s) the config does not explain, e.g. {extra[0]}", "unexpected_keys")
    if missing := sorted(set(expected) - set(got)):
        raise CheckpointMismatchError(f"state dict lacks {len(missing)} key(s) the config needs, e.g. {missing[0]}", "missing_keys")
    for k, shape in expected.items():
        if got[k] != shape:
            raise CheckpointMismatchError(f"{k} has shape {list(got[k])} but model_config implies {list(shape)}", "shape_mismatch")
    return config


def load_tokenizer_for(ckpt: CheckpointFiles, tokenizer_dir: str | os.PathLike | None = None):
    from nanochat.tokenizer import Tokenizer, TokenizerError

    tdir = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(ckpt.directory)
    if tdir is None:
        raise CheckpointNotFoundError(f"no tokenizer found for {ckpt.directory} (looked for tokenizer/ beside the "
                                      "checkpoints and in $NANOCHAT_BASE_DIR)", "missing_tokenizer")
    try:
        return Tokenizer.from_directory(tdir)
    except TokenizerError as e:
        raise CheckpointError(f"tokenizer: {e}", "bad_tokenizer") from None


def load_model(path: str | os.PathLike | CheckpointFiles, step: int | None = None, device="cpu",
               tokenizer_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Model (eval mode, float32 on CPU), tokenizer and meta of the checkpoint a path means."""
    from nanochat.gpt import GPT

    ckpt = path if isinstance(path, CheckpointFiles) else resolve_checkpoint(path, step)
    meta = read_meta(ckpt)
    tokenizer = load_tokenizer_for(ckpt, tokenizer_dir)
    state = load_state_dict(ckpt, device)
    config = config_from_checkpoint(meta, {k: v.shape for k, v in state.items()})
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointMismatchError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects "
                                      f"{config.vocab_size}: wrong tokenizer for this checkpoint", "vocab_mismatch")
    model = GPT(config).to(device)
    model.load_state_dict(state, strict=True)  # copies, casting bfloat16 embeddings to float32
    model.eval()
    phase, tag = phase_and_tag(ckpt.directory)
    return LoadedModel(model, tokenizer, meta, ckpt, phase, tag)


# ---------------------------------------------------------------------- saving (torch)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file in the same directory: a crash leaves the old file or none."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def invalidate_step(directory: str | os.PathLike, step: int) -> None:
    """Remove a step's meta before its files are rewritten, so a half-rewritten step is never complete;
    also clear what earlier saves killed mid-write left behind."""
    remove_stale_temp_files(directory)
    meta = Path(directory) / f"meta_{step:06d}.json"
    if meta.exists():
        meta.unlink()
        fsync_dir(meta.parent)


def save_model(directory: str | os.PathLike, step: int, state_dict: dict) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"model_{step:06d}.pt"
    atomic_torch_save({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}, path)
    return path


def save_optimizer_shard(directory: str | os.PathLike, step: int, rank: int, state) -> Path:
    path = Path(directory) / f"optim_{step:06d}_rank{rank:d}.pt"
    atomic_torch_save(state, path)
    return path


def save_train_state(directory: str | os.PathLike, step: int, rank: int, state: dict) -> Path:
    path = Path(directory) / f"trainstate_{step:06d}_rank{rank:d}.pt"
    atomic_torch_save(state, path)
    return path


def write_meta(directory: str | os.PathLike, step: int, meta: dict) -> Path:
    """Write meta_{step}.json last: its presence marks the checkpoint complete."""
    if meta.get("step") != step:
        raise ValueError(f"meta step {meta.get('step')} != {step}")
    path = Path(directory) / f"meta_{step:06d}.json"
    atomic_write_bytes(path, json.dumps(meta, indent=2).encode("utf-8"))
    return path


def save_checkpoint(directory: str | os.PathLike, step: int, model_state: dict, meta: dict,
                    optimizer_state=None, train_state: dict | None = None) -> CheckpointFiles:
    """Single-process save of a whole step in the safe order: model, optimizer, state, meta."""
    invalidate_step(directory, step)
    save_model(directory, step, model_state)
    if optimizer_state is not None:
        save_optimizer_shard(directory, step, 0, optimizer_state)
    if train_state is not None:
        save_train_state(directory, step, 0, train_state)
    write_meta(directory, step, meta)
    return next(c for c in list_checkpoints(directory) if c.step == step and c.layout == "upstream")
