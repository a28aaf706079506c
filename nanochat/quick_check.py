"""
The quick check of one checkpoint, written once: everything that can be found wrong without torch and
without reading tensor data, in milliseconds.

- files: the model present and non-empty, every zip central directory readable with one pickle;
- meta: parses (JSON, or a single file's `metadata` dict), has the required keys and the step of its
  file name;
- resume: optimizer shards for the world size, and a training state per rank when the meta says so;
- the model's pickle (read by `torchfile`'s restricted unpickler, never executed): no global outside
  the weights-only allow-list (`unsafe_pickle`), a state dict, and its keys and shapes the ones the
  meta's model_config implies.

Every caller runs this same check: checkpoint discovery and the trainer's resume
(`checkpoint_manager.find_last_complete`), the registry's scanner on every checkpoint it indexes, and
`registry.integrity`'s quick level. So a new quick check goes here, and only here. The scanner keeps
its speed because each file is opened once (`torchfile.Archive`: one open, usually one read), the model's
pickle is read with tensors as bare shapes, and a meta it has already parsed is passed in.

What this module does not do: hash files, check CRCs of tensor data, look for NaN/Inf or call
`torch.load` (the deep check in `registry.integrity` does).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from nanochat import torchfile
from nanochat.checkpoint_manager import (
    REQUIRED_META_KEYS,
    REQUIRED_SINGLE_FILE_KEYS,
    CheckpointError,
    CheckpointFiles,
    Problem,
    about,
    check_meta,
    expected_world_size,
    read_meta,
    saves_optimizer,
    single_file_meta,
)
from nanochat.model_config import ArchitectureError, GPTConfig, expected_state_shapes, is_state_dict_key


@dataclass(frozen=True)
class QuickCheck:
    """What the quick check found, with what it read on the way (so a caller need not read it again).

    `file_problems` say whether the save finished and its files are whole (files, archives, meta,
    resume files): checkpoint discovery judges "complete" by these alone, so that a finished save
    whose contents are wrong is still the one a path means and loading it says exactly what is wrong.
    `content_problems` are about what the model's pickle holds (unsafe, malformed, not the state dict
    its config implies)."""
    file_problems: list[Problem]
    content_problems: list[Problem]
    meta: dict | None  # None when it could not be read
    shapes: dict[str, tuple[int, ...]] | None  # the model's state dict {key: shape}, when its pickle was read
    world: int  # optimizer shards a resume needs (0 when none were saved)

    @property
    def problems(self) -> list[Problem]:
        return dedupe(self.file_problems + self.content_problems)


def quick_problems(ckpt: CheckpointFiles, meta: dict | None = None) -> list[Problem]:
    """The problems the quick check finds (see the module docstring); `meta` if already read."""
    return quick_check(ckpt, meta).problems


def quick_check(ckpt: CheckpointFiles, meta: dict | None = None) -> QuickCheck:
    problems: list[Problem] = []
    model_name = ckpt.model.name if ckpt.model is not None else None
    pickle_bytes, model_error = None, None
    if ckpt.model is None:
        problems.append(Problem("missing_model", f"step {ckpt.step} has no model_{ckpt.step:06d}.pt"))
    else:
        try:
            with torchfile.Archive(ckpt.model) as archive:
                try:  # read now, while the archive is open; whether it reads is a finding about its contents
                    pickle_bytes = archive.read_pickle()
                except torchfile.TorchFileError as e:
                    model_error = e
        except torchfile.TorchFileError as e:
            problems.append(Problem(e.code, str(e), "load", model_name))
            if ckpt.layout == "single_file":
                return QuickCheck(problems, [], None, None, 0)  # its metadata lives in the unreadable file
    state, tree = None, None  # (shapes, their key) of the state dict; a single file's whole tree
    if pickle_bytes is not None:
        try:
            if ckpt.layout == "single_file":
                tree = torchfile.load_pickle(pickle_bytes, shapes_only=True)
                state = _keyed(torchfile.state_dict_shapes(tree.get("model") if isinstance(tree, dict) else None))
            else:
                state = _state_dict(pickle_bytes)
        except torchfile.TorchFileError as e:
            model_error = e
    try:
        if meta is not None:  # parsed by the caller: its numbers are checked all the same
            meta = check_meta(meta, ckpt.meta.name if ckpt.meta else model_name)
        elif ckpt.layout == "single_file":
            if model_error is not None:
                raise CheckpointError(about(model_name, model_error), model_error.code)
            meta = single_file_meta(tree, model_name)
        else:
            meta = read_meta(ckpt)
    except CheckpointError as e:
        problems.append(Problem(e.code, str(e), "load", ckpt.meta.name if ckpt.meta else model_name))
        return QuickCheck(problems, [], None, None, expected_world_size(ckpt, None))
    required = REQUIRED_META_KEYS if ckpt.layout == "upstream" else REQUIRED_SINGLE_FILE_KEYS
    missing = [k for k in required if k not in meta]
    if missing:
        problems.append(Problem("bad_meta", f"meta lacks {', '.join(missing)}", "load",
                                ckpt.meta.name if ckpt.meta else None))
    elif ckpt.layout == "upstream" and "step" in meta and meta["step"] != ckpt.step:
        problems.append(Problem("step_mismatch", f"meta says step {meta['step']} but its file name says step {ckpt.step}",
                                "load", ckpt.meta.name))
    world = expected_world_size(ckpt, meta) if ckpt.layout == "upstream" else 0
    if ckpt.layout == "upstream":
        problems += _resume_problems(ckpt, meta, world)
    shapes, contents = None, []
    if ckpt.model is not None and not missing and not any(p.file == model_name and p.blocks == "load" for p in problems):
        if model_error is not None:
            contents.append(_pickle_problem(model_name, model_error, pickle_bytes))
        elif state is None:
            contents.append(Problem("bad_state_dict", f"{model_name}: {model_name} does not hold a state dict",
                                    "load", model_name))
        else:
            shapes = state[0]
            contents += _shape_problems(meta.get("model_config"), shapes, state[1], model_name)
    return QuickCheck(problems, contents, meta, shapes, world)


# The checkpoints of a run hold the same state-dict layout, so their pickles are byte for byte the
# same: each distinct one is unpickled once (unpickling is a pure function of the bytes; callers only
# read the result). Hashing a pickle costs a few microseconds, unpickling it tens to thousands.
@functools.lru_cache(maxsize=64)
def _state_dict(data: bytes) -> tuple[dict[str, tuple[int, ...]], frozenset | None] | None:
    return _keyed(torchfile.state_dict_shapes(torchfile.load_pickle(data, shapes_only=True)))


def _keyed(shapes: dict | None) -> tuple[dict, frozenset | None] | None:
    """Shapes with the key that finds what a config implies for them (None if unhashable, i.e. hostile)."""
    if shapes is None:
        return None
    try:
        return shapes, frozenset(shapes.items())
    except TypeError:
        return shapes, None


def _resume_problems(ckpt: CheckpointFiles, meta: dict, world: int) -> list[Problem]:
    """Optimizer shards for the world size, and training states when the meta says it saved them."""
    problems: list[Problem] = []
    if world == 0 and saves_optimizer(ckpt, meta):  # chat_rl saves none by design: not a problem, no resume
        problems.append(Problem("missing_optimizer_shard",
                                "no optimizer state saved: the weights load but training cannot resume", "resume"))
    wanted = [(ckpt.optimizer_shards, "missing_optimizer_shard", "optimizer shard of rank {rank} of {world} is missing")]
    if meta.get("train_state"):
        wanted.append((ckpt.train_states, "missing_train_state", "training state (RNG, data position) of rank {rank} is missing"))
    for files, code, message in wanted:
        for rank in range(world):
            path = files.get(rank)
            if path is None:
                problems.append(Problem(code, message.format(rank=rank, world=world), "resume"))
                continue
            try:
                torchfile.check_archive(path)
            except torchfile.TorchFileError as e:
                problems.append(Problem(e.code, str(e), "resume", path.name))
    return problems


def _pickle_problem(name: str, error: torchfile.TorchFileError, data: bytes | None) -> Problem:
    """The model's pickle could not be read: an unsafe one names every global outside the allow-list."""
    if error.code == "unsafe_pickle" and data is not None:
        try:
            return unsafe_problem(name, sorted(f"{m}.{n}" for m, n in torchfile.pickle_globals(data) - torchfile.SAFE_GLOBALS),
                                  "load")
        except torchfile.TorchFileError:
            pass  # the static scan could not parse what the unpickler refused: the unpickler's word stands
    return Problem(error.code, about(name, error), "load", name)


def unsafe_problem(name: str, unsafe: list[str], blocks: str) -> Problem:
    shown = ", ".join(unsafe[:3]) + (f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else "")
    return Problem("unsafe_pickle", f"{name} references code, not just tensors: {shown} (not executed)", blocks, name)


def shape_problems(model_config, shapes: Mapping[str, tuple[int, ...]], file: str | None = None) -> list[Problem]:
    """Does `model_config` (a meta's dict) explain a state dict's {key: shape}? Torch-free: the
    architecture generation is detected from the key names like `GPTConfig.from_checkpoint` does."""
    shapes = {k.removeprefix("_orig_mod."): tuple(v) for k, v in shapes.items()}
    keyed = _keyed(shapes)
    return _shape_problems(model_config, shapes, keyed[1] if keyed else None, file)


def _shape_problems(model_config, shapes: dict[str, tuple[int, ...]], key: frozenset | None, file: str | None) -> list[Problem]:
    if not isinstance(model_config, dict):
        return [Problem("bad_meta", "meta's model_config is not an object", "load", file)]
    if not shapes:
        return [Problem("empty_state_dict", f"{file or 'the model file'} holds an empty state dict", "load", file)]
    config = tuple(sorted(model_config.items()))
    try:
        expected = _expected_shapes(config, key) if key is not None else _expected_shapes.__wrapped__(config, shapes.items())
    except TypeError:  # a model_config with unhashable values: worked out without the cache
        expected = _expected_shapes.__wrapped__(config, shapes.items())
    if isinstance(expected, str):
        return [Problem("bad_model_config", f"model_config does not describe a model: {expected}", "load", file)]
    if shapes == expected:
        return []
    problems = []
    if extra := sorted(set(shapes) - set(expected)):
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        problems.append(Problem("unexpected_keys", f"state dict has {len(extra)} key(s) the model config does not explain: "
                                f"{extra[0]}{more}", "load", file))
    if missing := sorted(set(expected) - set(shapes)):
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(Problem("missing_keys", f"state dict lacks {len(missing)} key(s) the model config needs: "
                                f"{missing[0]}{more}", "load", file))
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        problems.append(Problem("shape_mismatch", f"{k} has shape {list(shapes[k])} but model_config implies "
                                f"{list(expected[k])}{more}", "load", file))
    return problems


# The checkpoints of a run share one config and one state-dict layout: what they imply is worked out once.
@functools.lru_cache(maxsize=256)
def _expected_shapes(config: tuple, shapes) -> dict[str, tuple[int, ...]] | str:
    """The {key: shape} a model_config (as sorted items) implies for a state dict with these
    (key, shape) items, or why it describes no model. Callers only read the dict."""
    known = {k: v for k, v in shapes if is_state_dict_key(k)}
    try:
        return expected_state_shapes(GPTConfig.from_checkpoint(dict(config), known))
    except (ArchitectureError, TypeError, ValueError, IndexError) as e:
        return str(e)


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.code, p.file) not in seen:
            seen.add((p.code, p.file))
            out.append(p)
    return out
