"""
Checkpoint integrity: can these files be trusted, and for what (loading the weights, or resuming)?

Two levels, both over one `nanochat.checkpoint_manager.CheckpointFiles`:
- quick (milliseconds, torch-free, no tensor data read): `nanochat.quick_check`, the one quick check
  that the scanner and checkpoint discovery run too (files present and non-empty, zip central
  directories readable, meta parses with the right step, optimizer shards and training states for the
  world size, and "the model config explains the state dict": key names and shapes read from the
  pickle alone, never executed, against `nanochat.model_config.expected_state_shapes`).
- deep (one sequential pass over every byte): sha256 of each file and the CRC-32 of every zip member
  computed in the same streaming read, with every floating storage checked for NaN/Inf in the same
  chunks (IEEE exponent bits, so bfloat16 too); a static scan of each pickle for globals outside the
  weights-only allow-list (ours and torch's own `get_unsafe_globals_in_checkpoint`); then
  `torch.load(weights_only=True, mmap=True)` of the model (keys and shapes checked again on what torch
  really built), of each optimizer shard and training state; finally the sha256s are compared with the
  ones recorded by an earlier check (`changed_since_indexed`). Memory stays bounded by the chunk size:
  nothing is read whole and the mmap'ed tensors are never touched.

Every finding is a `checkpoint_manager.Problem` with a stable code from `PROBLEM_CODES`, a one-line
message, the file it concerns and what it blocks ("load" or only "resume"). This module neither stores
results (the registry store does) nor picks a checkpoint to resume from (see `resume.py`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat import checkpoint_manager as cm
from nanochat import torchfile
from nanochat.checkpoint_manager import CheckpointError, CheckpointFiles, Problem
from nanochat.common import open_regular_file
from nanochat.quick_check import dedupe, shape_problems, unsafe_problem
from nanochat.quick_check import quick_check as quick_checked

CHUNK_BYTES = 8 << 20  # the streaming buffer: the deep check's memory does not grow with the file
LEVELS = ("quick", "deep")

# Stable problem codes -> what they mean. The app and the README list them from here.
PROBLEM_CODES: dict[str, str] = {
    "missing_model": "a step has a meta or optimizer file but no model_NNNNNN.pt",
    "missing_file": "a file of the checkpoint does not exist (any more)",
    "empty_file": "a file is zero bytes long",
    "unreadable": "the operating system refused to read a file (permissions, I/O error), or it is not a regular file (a FIFO, a device)",
    "truncated": "a .pt file has no zip central directory (cut short while writing, or copied partially)",
    "not_torch_file": "a zip file that is not a torch.save archive",
    "corrupt_zip": "a zip member's local header is damaged or its data lies outside the file",
    "crc_mismatch": "a zip member's bytes fail their CRC-32: silent corruption that torch.load does not notice",
    "missing_meta": "no meta_NNNNNN.json (upstream writes it last: the save did not finish)",
    "bad_meta_json": "the meta file is not valid JSON or not a JSON object",
    "bad_meta": "the meta lacks a required key (step, model_config) or model_config is not an object",
    "step_mismatch": "the meta's step differs from the step in its file name",
    "bad_model_config": "model_config does not describe a model (e.g. n_embd not divisible by n_head)",
    "bad_pickle": "a pickle inside a .pt file is malformed",
    "unsafe_pickle": "a pickle references code outside the weights-only allow-list (never executed)",
    "bad_state_dict": "the model file does not hold a state dict",
    "empty_state_dict": "the model's state dict has no tensors",
    "unexpected_keys": "the state dict has keys the model config does not explain",
    "missing_keys": "the state dict lacks keys the model config needs",
    "shape_mismatch": "a tensor's shape differs from the one the model config implies",
    "nonfinite_weights": "a model tensor holds NaN or Inf",
    "nonfinite_optimizer_state": "an optimizer shard holds NaN or Inf (resuming would diverge)",
    "load_failed": "torch's weights-only loader refused a file that passed the static checks",
    "bad_optimizer_state": "an optimizer shard or training state does not hold the expected object",
    "missing_optimizer_shard": "an optimizer shard of the recorded world size is missing: weights load, training cannot resume",
    "missing_train_state": "meta says train_state but a rank's trainstate file (RNG, data position) is missing",
    "changed_since_indexed": "a file's sha256 differs from the one recorded by an earlier deep check",
    "missing_tokenizer": "no tokenizer for the run (tokenizer/ beside the checkpoints, or in $NANOCHAT_BASE_DIR): "
                         "no checkpoint of it can be used",
    "bad_tokenizer": "the run's tokenizer cannot be read, or the restricted reader refused its tokenizer.pkl (it "
                     "references code): no checkpoint of it can be used",
    "vocab_mismatch": "the run's tokenizer has another vocabulary size than the model: the wrong tokenizer",
}


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class FileDigest:
    """One file as the check saw it. `sha256` is None after a quick check."""
    name: str
    size: int
    mtime_ns: int
    sha256: str | None = None


@dataclass(frozen=True)
class IntegrityResult:
    directory: str
    step: int | None
    layout: str
    level: str  # "quick" or "deep"
    problems: tuple[Problem, ...]
    files: tuple[FileDigest, ...]
    checked_at: float  # unix seconds when the check started
    duration_s: float
    bytes_read: int = 0
    not_resumable: str | None = None  # why no script resumes it however intact (checkpoint_manager.why_not_resumable)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def loadable(self) -> bool:
        return not any(p.blocks == "load" for p in self.problems)

    @property
    def resumable(self) -> bool:
        return not self.problems and self.not_resumable is None

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(sorted({p.code for p in self.problems}))

    @property
    def label(self) -> str:
        return f"{Path(self.directory).name}@{self.step}" if self.step is not None else self.directory

    def is_current(self) -> bool:
        """True while every file still has the size and mtime it had when checked (a cheap stat)."""
        for f in self.files:
            try:
                st = os.stat(Path(self.directory) / f.name)
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                return False
        return True

    def to_dict(self) -> dict:
        """The `--json` shape of one checked checkpoint (see the README's integrity section)."""
        return {
            "directory": self.directory, "step": self.step, "layout": self.layout, "level": self.level,
            "ok": self.ok, "loadable": self.loadable, "resumable": self.resumable, "resume_note": self.not_resumable,
            "checked_at": self.checked_at, "duration_s": round(self.duration_s, 6), "bytes_read": self.bytes_read,
            "problems": [asdict(p) for p in self.problems],
            "files": [asdict(f) for f in self.files],
        }


# ---------------------------------------------------------------------- quick (no torch, no tensor data)


def checkpoint_files(ckpt: CheckpointFiles) -> list[tuple[Path, str]]:
    """(path, role) of every file of a checkpoint; role is model, meta, optimizer or train_state."""
    out = [(ckpt.model, "model")] if ckpt.model is not None else []
    if ckpt.meta is not None:
        out.append((ckpt.meta, "meta"))
    out += [(ckpt.optimizer_shards[r], "optimizer") for r in sorted(ckpt.optimizer_shards)]
    out += [(ckpt.train_states[r], "train_state") for r in sorted(ckpt.train_states)]
    return out


def checkpoint_bytes(ckpt: CheckpointFiles) -> int:
    """Bytes a deep check reads (for progress bars); files that vanished count zero."""
    total = 0
    for path, _ in checkpoint_files(ckpt):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def _stat_files(ckpt: CheckpointFiles) -> tuple[FileDigest, ...]:
    out = []
    for path, _ in checkpoint_files(ckpt):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append(FileDigest(path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def quick_check(ckpt: CheckpointFiles, tokenizer: bool = False) -> IntegrityResult:
    started, t0 = time.time(), time.perf_counter()
    check = quick_checked(ckpt)
    problems = dedupe([*check.problems, *(tokenizer_problems(ckpt, check.meta) if tokenizer else ())])
    return IntegrityResult(str(ckpt.directory), ckpt.step, ckpt.layout, "quick", tuple(problems), _stat_files(ckpt),
                           started, time.perf_counter() - t0,
                           not_resumable=cm.why_not_resumable(ckpt.layout, ckpt.directory, check.meta))


# ---------------------------------------------------------------------- the run's tokenizer (both levels)


def tokenizer_problems(ckpt: CheckpointFiles, meta: dict | None) -> list[Problem]:
    """The tokenizer the checkpoint needs (`checkpoint_manager.find_tokenizer_dir`, as loading finds it): present,
    readable by our readers (upstream's tokenizer.pkl only through the restricted unpickler) and of the
    model's vocabulary size. It is the run's, so every checkpoint of the run gets the same problem; it is
    read once per tokenizer folder while its files are unchanged."""
    if ckpt.model is None:
        return []
    found = cm.find_tokenizer_dir(ckpt.directory)
    if found is None:
        return [Problem("missing_tokenizer", f"no tokenizer for {ckpt.directory.name} (looked for tokenizer/ beside "
                        "the checkpoints and in $NANOCHAT_BASE_DIR): no checkpoint of this run can be used", "load")]
    stamp = []
    for name in ("tokenizer.json", "tokenizer.pkl"):
        try:
            st = (found / name).stat()
            stamp.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            pass
    vocab = _tokenizer_vocab(str(found), tuple(stamp))
    if isinstance(vocab, str):
        return [Problem("bad_tokenizer", f"the tokenizer in {found} cannot be used: {vocab}", "load")]
    expected = (meta or {}).get("model_config", {}).get("vocab_size") if isinstance((meta or {}).get("model_config"), dict) \
        else None
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != vocab:
        return [Problem("vocab_mismatch", f"the tokenizer in {found} has {vocab} tokens but the model expects {expected}: "
                        "wrong tokenizer for this run", "load")]
    return []


@functools.lru_cache(maxsize=32)
def _tokenizer_vocab(directory: str, _stamp: tuple) -> int | str:
    """The vocabulary size of the tokenizer in `directory` (as its files are at `_stamp`), or why it cannot be read."""
    from nanochat.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.from_directory(directory).get_vocab_size()
    except TokenizerError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"


# ---------------------------------------------------------------------- deep: one streaming pass per file


@dataclass
class _Member:
    name: str
    start: int
    end: int
    crc_expected: int
    crc: int = 0
    dtype: str | None = None  # floating storages only: checked for NaN/Inf
    carry: bytes = b""  # bytes of an element split across two chunks
    nonfinite: int = 0


_FLOAT_VIEWS = {  # storage dtype -> (numpy dtype code, exponent mask or None for np.isfinite)
    "float32": ("f4", None), "float64": ("f8", None), "float16": ("f2", None),
    "complex64": ("f4", None), "complex128": ("f8", None), "bfloat16": ("u2", 0x7F80),
}


def _count_nonfinite(np, seg, dtype: str, big_endian: bool) -> int:
    code, mask = _FLOAT_VIEWS[dtype]
    arr = np.frombuffer(seg, dtype=np.dtype((">" if big_endian else "<") + code))
    if mask is None:
        finite = np.isfinite(arr)
        return 0 if finite.all() else int(arr.size - np.count_nonzero(finite))
    # bfloat16 has no numpy type: an all-ones exponent means Inf or NaN
    bad = (arr & mask) == mask
    return int(np.count_nonzero(bad)) if bad.any() else 0


def _check_floats(np, m: _Member, seg, big_endian: bool) -> None:
    size = int(_FLOAT_VIEWS[m.dtype][0][1])
    if m.carry:
        need = size - len(m.carry)
        if len(seg) < need:
            m.carry += bytes(seg)
            return
        m.nonfinite += _count_nonfinite(np, m.carry + bytes(seg[:need]), m.dtype, big_endian)
        seg, m.carry = seg[need:], b""
    tail = len(seg) % size
    if tail:
        m.carry, seg = bytes(seg[len(seg) - tail:]), seg[:len(seg) - tail]
    if len(seg):
        m.nonfinite += _count_nonfinite(np, seg, m.dtype, big_endian)


def _zip_layout(path: Path, blocks: str) -> tuple[list[_Member], dict, bool, list[Problem]]:
    """Members with their data ranges (from the local headers), the pickle's tensors, byte order."""
    problems: list[Problem] = []
    try:
        archive = torchfile.Archive(path)
    except torchfile.TorchFileError:
        return [], {}, False, []  # reported by the quick check with its code
    members, stubs = [], {}
    with archive:
        big_endian = False
        if (byteorder := archive.member(f"{archive.prefix}/byteorder")) is not None:
            try:
                big_endian = archive.read(byteorder).strip() == b"big"
            except torchfile.TorchFileError:
                pass
        for info in archive.members():
            try:
                start = archive.data_start(info)
            except torchfile.TorchFileError as e:
                problems.append(Problem(e.code, str(e), blocks, path.name))
                continue
            if info.method != 0:  # torch.save stores; a re-zipped file's members are inflated to check them
                if not archive.crc_ok(info, CHUNK_BYTES):
                    problems.append(Problem("crc_mismatch", f"{path.name}: {info.name} fails its CRC-32", blocks, path.name))
                continue
            members.append(_Member(info.name, start, start + info.compressed_size, info.crc))
        try:
            stubs = torchfile.tensor_shapes(torchfile.load_pickle(archive.read_pickle(), path.name))
        except torchfile.TorchFileError:
            pass  # an unsafe or malformed pickle is reported by the pickle scan; no float check then
    dtypes = {s.storage_key: s.dtype for s in stubs.values()}
    for m in members:
        key = m.name.rsplit("/data/", 1)[-1] if "/data/" in m.name else None
        if key is not None and dtypes.get(key) in _FLOAT_VIEWS:
            m.dtype = dtypes[key]
    members.sort(key=lambda m: m.start)
    return members, stubs, big_endian, problems


def _tensor_names(stubs: Mapping[str, torchfile.TensorStub], member: str) -> list[str]:
    key = member.rsplit("/data/", 1)[-1]
    return sorted(k for k, s in stubs.items() if s.storage_key == key)


def scan_file(path: Path, role: str, progress: Callable[[int], None] | None = None) -> tuple[str, int, list[Problem]]:
    """Read one file once, in fixed-size chunks: its sha256 and, for a .pt file, every member's CRC-32
    and every floating storage's NaN/Inf count. Returns (sha256 hex, bytes read, problems)."""
    import numpy as np

    blocks = "load" if role in ("model", "meta") else "resume"
    members, stubs, big_endian, problems = ([], {}, False, []) if role == "meta" else _zip_layout(path, blocks)
    sha = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    pos, first = 0, 0
    with open_regular_file(path, "rb", buffering=0) as f:  # a FIFO or device is refused, never waited on
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            chunk = view[:n]
            sha.update(chunk)
            end = pos + n
            while first < len(members) and members[first].end <= pos:
                first += 1
            i = first
            while i < len(members) and members[i].start < end:
                m = members[i]
                a, b = max(m.start, pos) - pos, min(m.end, end) - pos
                if b > a:
                    seg = chunk[a:b]
                    m.crc = zlib.crc32(seg, m.crc)
                    if m.dtype is not None:
                        _check_floats(np, m, seg, big_endian)
                i += 1
            pos = end
            if progress is not None:
                progress(n)
    bad_crc = [m for m in members if m.crc != m.crc_expected]
    if bad_crc:
        names = _tensor_names(stubs, bad_crc[0].name)
        what = f" ({', '.join(names[:2])})" if names else ""
        more = f" (+{len(bad_crc) - 1} more)" if len(bad_crc) > 1 else ""
        problems.append(Problem("crc_mismatch", f"{path.name}: {len(bad_crc)} member(s) fail their CRC-32: "
                                f"{bad_crc[0].name}{what}{more}", blocks, path.name))
    nonfinite = [m for m in members if m.nonfinite and m not in bad_crc]
    if nonfinite:
        per_tensor = {n: m.nonfinite for m in nonfinite for n in _tensor_names(stubs, m.name) or [m.name]}
        worst = sorted(per_tensor, key=lambda n: (-per_tensor[n], n))
        count = sum(m.nonfinite for m in nonfinite)
        if len(worst) == 1:
            where = worst[0]
        else:  # the total, then the tensors that hold most of it with their own counts
            more = f" (+{len(worst) - 3} more)" if len(worst) > 3 else ""
            where = f"{len(worst)} tensors: " + ", ".join(f"{n} ({per_tensor[n]})" for n in worst[:3]) + more
        code = "nonfinite_weights" if role == "model" else "nonfinite_optimizer_state"
        problems.append(Problem(code, f"{path.name}: {count} NaN/Inf value(s) in {where}", blocks, path.name))
    return sha.hexdigest(), pos, problems


# ---------------------------------------------------------------------- deep: pickles and torch.load


def unsafe_pickle_globals(path: Path) -> list[str]:
    """Globals a file's pickle references outside the weights-only allow-list, found statically by
    our scanner and by torch's own (`torch.serialization.get_unsafe_globals_in_checkpoint`)."""
    import torch

    found = set(torchfile.unsafe_globals(path))
    try:
        found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 -- torch's scan is a second opinion on a possibly hostile file: whatever it
        pass  # raises (e.g. UnpicklingError "Unsupported operand 140" on protocol-4 memo opcodes) only means it
        # could not parse it; our own scan, which understands every opcode, ran first and its verdict stands
    return sorted(found)


def _pickle_problems(path: Path, role: str) -> list[Problem]:
    blocks = "load" if role == "model" else "resume"
    try:
        unsafe = unsafe_pickle_globals(path)
    except torchfile.TorchFileError as e:
        return [Problem(e.code, cm.about(path.name, e), blocks, path.name)]
    return [unsafe_problem(path.name, unsafe, blocks)] if unsafe else []


def _load_problems(ckpt: CheckpointFiles, meta: dict | None, path: Path, role: str) -> list[Problem]:
    """torch.load(weights_only=True, mmap=True): the model's keys and shapes as torch built them,
    and optimizer shards / training states of the expected kind. No tensor data is touched."""
    blocks = "load" if role == "model" else "resume"
    try:
        if role == "model":
            state = cm.load_state_dict(ckpt)
            shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
            del state
            return shape_problems((meta or {}).get("model_config"), shapes, path.name) if meta is not None else []
        obj = cm.torch_load(path)
    except CheckpointError as e:
        code = e.code if e.code in PROBLEM_CODES else "load_failed"
        return [Problem(code, cm.about(path.name, e), blocks, path.name)]
    ok = isinstance(obj, (dict, list)) and bool(obj)
    if not ok:
        kind = "optimizer shard" if role == "optimizer" else "training state"
        return [Problem("bad_optimizer_state", f"{path.name} does not hold a {kind} (got {type(obj).__name__})",
                        blocks, path.name)]
    return []


def deep_check(ckpt: CheckpointFiles, previous: Mapping[str, FileDigest | str] | None = None,
               progress: Callable[[int], None] | None = None, tokenizer: bool = False) -> IntegrityResult:
    """Every check there is, on every file of one checkpoint. `previous` maps a file name to what an
    earlier deep check recorded (its FileDigest, or just the sha256); a different hash now is
    `changed_since_indexed`.
    `progress(n)` is called with the bytes read after each chunk."""
    import numpy  # noqa: F401  (imported before the clock starts: a result's duration is the check's own)
    import torch  # noqa: F401

    started, t0 = time.time(), time.perf_counter()
    check = quick_checked(ckpt)
    problems, meta = [*check.problems, *(tokenizer_problems(ckpt, check.meta) if tokenizer else ())], check.meta
    broken = {p.file for p in problems if p.code in ("truncated", "empty_file", "missing_file", "not_torch_file",
                                                     "unreadable", "unsafe_pickle", "bad_pickle")}
    digests, total = [], 0
    for path, role in checkpoint_files(ckpt):
        try:
            st = path.stat()
            sha, n, found = scan_file(path, role, progress)
        except OSError as e:
            problems.append(Problem("unreadable" if path.exists() else "missing_file",
                                    f"{path.name}: {e.strerror or e}", "load" if role in ("model", "meta") else "resume",
                                    path.name))
            continue
        total += n
        digests.append(FileDigest(path.name, st.st_size, st.st_mtime_ns, sha))
        problems += found
        if role == "meta" or path.name in broken:
            continue
        pickle_found = _pickle_problems(path, role)
        problems += pickle_found
        if not pickle_found and not any(p.file == path.name and p.code in ("corrupt_zip",) for p in found):
            problems += _load_problems(ckpt, meta, path, role)
    roles = {p.name: r for p, r in checkpoint_files(ckpt)}
    for d in digests:
        if problem := _changed(d, (previous or {}).get(d.name), roles.get(d.name)):
            problems.append(problem)
    return IntegrityResult(str(ckpt.directory), ckpt.step, ckpt.layout, "deep", tuple(dedupe(problems)), tuple(digests),
                           started, time.perf_counter() - t0, total,
                           not_resumable=cm.why_not_resumable(ckpt.layout, ckpt.directory, meta))


def _changed(now: FileDigest, before: FileDigest | str | None, role: str | None) -> Problem | None:
    """`changed_since_indexed` when the bytes differ from the recorded hash; the recorded size and
    mtime, when known, tell a silent change (bit rot, tampering) from an ordinary rewrite."""
    sha = before.sha256 if isinstance(before, FileDigest) else before
    if not sha or sha == now.sha256:
        return None
    how = ""
    if isinstance(before, FileDigest):
        same = (before.size, before.mtime_ns) == (now.size, now.mtime_ns)
        how = ": same size and mtime, different bytes (silent corruption or tampering)" if same else \
            (": rewritten (same size, new mtime)" if before.size == now.size else f": rewritten ({before.size} -> {now.size} bytes)")
    return Problem("changed_since_indexed", f"{now.name} changed since it was indexed (sha256 {sha[:12]}… then, "
                   f"{now.sha256[:12]}… now){how}", "load" if role in ("model", "meta") else "resume", now.name)


def check_checkpoint(ckpt: CheckpointFiles, deep: bool = False, previous: Mapping[str, FileDigest | str] | None = None,
                     progress: Callable[[int], None] | None = None, tokenizer: bool = False) -> IntegrityResult:
    """The quick or the deep check of one checkpoint (see the module docstring); with `tokenizer`, also the
    tokenizer its run needs (`tokenizer_problems`: what `verify` and `registry resume` ask for)."""
    return deep_check(ckpt, previous, progress, tokenizer) if deep else quick_check(ckpt, tokenizer)
