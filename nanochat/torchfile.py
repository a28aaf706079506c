"""
Files written by `torch.save`, read without torch and without running their pickle: the one reader
of their zip archives and the one restricted unpickler (and its allow table) of the project.

A torch.save file is a zip archive: `<prefix>/data.pkl` (the object tree as a pickle whose tensors
point at storages by persistent id), `<prefix>/data/<key>` (raw storage bytes), `byteorder`, `version`.
`Archive` reads it with positioned reads (`os.pread`): the end of the file (its central directory,
and for a small file everything), then only the members asked for. Locating the pickle walks the
central directory with one struct call per entry and decodes no names, so opening a checkpoint costs
one open and usually one or two reads: the scanner opens tens of thousands of them. Deflated members
(a re-zipped checkpoint) are inflated, zip64 archives (files over 4 GB) and data prepended to the
archive are handled, and every member read is checked against its CRC-32, as `zipfile` does.

The pickle is read by an unpickler that rebuilds tensors as `TensorStub`s (shape, dtype, storage key)
and containers as plain dicts, lists and tuples; every other global is refused (`UnsafePickleError`).
So key names, shapes and a single-file checkpoint's metadata come in milliseconds, without torch and
without trusting the file. `pickle_globals` lists a pickle's globals statically (the `unsafe_pickle`
check), following the memo as the unpickler would. Every failure is a `TorchFileError` whose `code`
is the integrity problem code (`registry.integrity.PROBLEM_CODES`).

What this module does not do: load real tensors (`checkpoint_manager` does, with torch), or check
the CRC-32 of stored tensor data (the deep integrity check streams it).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zlib
from typing import NamedTuple

from nanochat.common import open_regular

# Storage classes by dtype, as torch.save names them (torch.FloatStorage -> float32).
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}
DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
               "complex64", "complex128", "float", "double", "half", "long", "int"}


class TorchFileError(ValueError):
    """A file that is not a readable torch.save archive; `code` is the integrity problem code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class UnsafePickleError(TorchFileError):
    def __init__(self, message: str):
        super().__init__("unsafe_pickle", message)


# ---------------------------------------------------------------------- the zip reader

TAIL = 1 << 14  # the end of the file read at once: a state dict's central directory usually fits in it
_MAX_COMMENT_TAIL = 22 + 0xFFFF  # the most an end record with the longest comment takes
_SLACK = 1 << 10  # bytes of name and extra field read with a member's local header before a second read is needed
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
# A central directory entry's fixed part: signature, method, crc, compressed and uncompressed size,
# name/extra/comment lengths, local header offset; and just what walking from entry to entry needs.
_CENTRAL_ENTRY = struct.Struct("<4s6xH4xIIIHHH8xI")
_CENTRAL_LENGTHS = struct.Struct("<4s24xHHH")
_STORED, _DEFLATED = 0, 8


class Member(NamedTuple):
    """One zip member as its central directory entry describes it (offsets already include any
    bytes prepended to the archive)."""
    name: str
    header_offset: int
    compressed_size: int
    size: int
    method: int
    crc: int


_new_member = tuple.__new__  # a NamedTuple built without its Python-level __new__


class Archive:
    """An open torch.save archive: `Archive(path)` reads the central directory and locates the pickle;
    use it as a context manager. Errors are `TorchFileError`s with the problem code a user sees."""

    __slots__ = ("path", "fd", "size", "shift", "pickle", "prefix", "_tail", "_tail_start", "_cd", "_count")

    def __init__(self, path: str | os.PathLike):
        self.path = path
        try:
            self.fd, st = open_regular(path)  # a FIFO or device named like a checkpoint is refused, not waited on
        except FileNotFoundError:
            raise TorchFileError("missing_file", f"{self.name} does not exist") from None
        except OSError as e:
            raise TorchFileError("unreadable", f"{self.name}: {e.strerror}") from None
        try:
            self._open(st.st_size)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _truncated(self, why: str) -> TorchFileError:
        return TorchFileError("truncated", f"{self.name} has no zip central directory (truncated or not a "
                                           f"torch.save file: {why})")

    def _pread(self, n: int, offset: int) -> bytes:
        """n bytes at offset, from the tail already read when it holds them."""
        at = offset - self._tail_start
        if at >= 0:
            return self._tail[at:at + n]
        try:
            return os.pread(self.fd, n, offset)
        except OSError as e:
            raise TorchFileError("unreadable", f"{self.name}: {e.strerror}") from None

    def _open(self, size: int) -> None:
        try:
            self.size = size
            if size == 0:
                raise TorchFileError("empty_file", f"{self.name} is empty")
            start = max(0, size - TAIL)
            tail = os.pread(self.fd, size - start, start)
            at = tail.rfind(_EOCD)
            if at < 0 and start > 0:  # a long archive comment: look as far back as zipfile does
                start = max(0, size - _MAX_COMMENT_TAIL)
                tail = os.pread(self.fd, size - start, start)
                at = tail.rfind(_EOCD)
        except OSError as e:
            raise TorchFileError("unreadable", f"{self.name}: {e.strerror or e}") from None
        self._tail, self._tail_start = tail, start
        if at < 0 or at + 22 > len(tail):
            raise self._truncated("no end of central directory")
        _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", tail, at)
        end_record = start + at  # where the central directory ends, in the file as it is
        loc = at - 20
        if loc >= 0 and tail[loc:loc + 4] == _EOCD64_LOCATOR:
            # The record is found back from the end, like zipfile does, so prepended data is allowed.
            rec = self._pread(56, end_record - 76) if end_record >= 76 else b""
            if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
                raise self._truncated("zip64 end record missing")
            count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
            end_record -= 76
        elif 0xFFFF == count or 0xFFFFFFFF in (cd_size, cd_offset):
            raise self._truncated("zip64 locator missing")
        # Bytes prepended to the archive (a self-extractor, a header) shift every offset, as zipfile allows.
        self.shift = shift = end_record - cd_size - cd_offset
        if shift < 0:
            raise self._truncated("central directory beyond the end of the file")
        cd = self._pread(cd_size, cd_offset + shift)
        if len(cd) != cd_size:
            raise self._truncated("short central directory")
        self._cd, self._count = cd, count
        self.pickle = self._find_pickle()
        self.prefix = self.pickle.name[: -len("/data.pkl")]

    def _find_pickle(self) -> Member:
        """`<prefix>/data.pkl`. Every entry is walked (a damaged one anywhere means a damaged archive),
        reading only what locates the next; the pickle's entry, found by searching the names, is read in full."""
        cd = self._cd
        ends, at = set(), cd.find(b"/data.pkl")
        while at >= 0:
            ends.add(at + 9)
            at = cd.find(b"/data.pkl", at + 1)
        pos, found, unpack, last = 0, None, _CENTRAL_LENGTHS.unpack_from, len(cd) - 46
        for _ in range(self._count):
            if pos > last:
                raise self._truncated("short central directory entry")
            sig, nlen, elen, clen = unpack(cd, pos)
            if sig != _CENTRAL:
                raise self._truncated("bad central directory entry")
            name_end = pos + 46 + nlen
            if name_end in ends and nlen >= 9 and cd.count(b"/", pos + 46, name_end) == 1:
                if found is not None:
                    raise TorchFileError("not_torch_file", f"{self.name} holds two pickles: not a torch.save archive")
                found = pos
            pos = name_end + elen + clen
        if found is None:
            raise TorchFileError("not_torch_file", f"{self.name} is a zip file but not a torch.save archive")
        return self._entry(found)

    def _entry(self, pos: int) -> Member:
        cd = self._cd
        _, method, crc, csize, usize, nlen, elen, _, offset = _CENTRAL_ENTRY.unpack_from(cd, pos)
        name = cd[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, usize, offset):
            extra = pos + 46 + nlen
            usize, csize, offset = self._zip64_sizes(cd[extra:extra + elen], usize, csize, offset)
        return _new_member(Member, (name, offset + self.shift, csize, usize, method, crc))

    def _zip64_sizes(self, extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
        pos = 0
        while pos + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, pos)
            if tag == 1:
                values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
                try:
                    if usize == 0xFFFFFFFF:
                        usize = values.pop(0)
                    if csize == 0xFFFFFFFF:
                        csize = values.pop(0)
                    if offset == 0xFFFFFFFF:
                        offset = values.pop(0)
                except IndexError:
                    break
                return usize, csize, offset
            pos += 4 + length
        raise self._truncated("zip64 sizes missing")

    def members(self) -> list[Member]:
        """Every member, in central directory order."""
        out, pos, unpack = [], 0, _CENTRAL_LENGTHS.unpack_from
        for _ in range(self._count):
            _, nlen, elen, clen = unpack(self._cd, pos)
            out.append(self._entry(pos))
            pos += 46 + nlen + elen + clen
        return out

    def data_start(self, member: Member) -> int:
        """Where the member's (compressed) data starts: after its local header, name and extra field."""
        header = self._pread(30, member.header_offset)
        if len(header) < 30 or header[:4] != _LOCAL:
            raise TorchFileError("corrupt_zip", f"{self.name}: local header of {member.name} is damaged")
        nlen, elen = struct.unpack_from("<HH", header, 26)
        start = member.header_offset + 30 + nlen + elen
        if start + member.compressed_size > self.size:
            raise TorchFileError("corrupt_zip", f"{self.name}: {member.name} ends past the end of the file")
        return start

    def read(self, member: Member) -> bytes:
        """A member's bytes, inflated and checked against its CRC-32 (meant for small members: the pickle)."""
        # The local header, its name and extra field, then the data: read at once with room for an
        # extra field of up to _SLACK bytes (torch pads it to align the data), else read again.
        local = self._pread(30 + _SLACK + member.compressed_size, member.header_offset)
        if len(local) < 30 or local[:4] != _LOCAL:
            raise self._unreadable(member, "bad local header")
        nlen, elen = struct.unpack_from("<HH", local, 26)
        if local[30:30 + nlen].decode("utf-8", "replace") != member.name:
            raise self._unreadable(member, "local header names another file")
        at = 30 + nlen + elen
        data = local[at:at + member.compressed_size]
        if len(data) != member.compressed_size:
            data = self._pread(member.compressed_size, member.header_offset + at)
        if len(data) != member.compressed_size:
            raise self._unreadable(member, "data cut short")
        if member.method == _DEFLATED:
            try:
                data = zlib.decompressobj(-15).decompress(data)
            except zlib.error as e:
                raise self._unreadable(member, f"bad deflate stream: {e}") from None
        elif member.method != _STORED:
            raise TorchFileError("not_torch_file", f"{self.name}: {member.name} uses compression method "
                                                   f"{member.method}, which torch.load cannot read")
        if len(data) != member.size or zlib.crc32(data) != member.crc:
            raise self._unreadable(member, "Bad CRC-32" if len(data) == member.size else "size mismatch")
        return data

    def _unreadable(self, member: Member, why: str) -> TorchFileError:
        return TorchFileError("truncated", f"{self.name}: cannot read {member.name} ({why})")

    def crc_ok(self, member: Member, chunk: int = 8 << 20) -> bool:
        """Stream a member (inflating a compressed one) and compare its CRC-32; memory stays one chunk."""
        start, left, crc = self.data_start(member), member.compressed_size, 0
        inflate = zlib.decompressobj(-15) if member.method == _DEFLATED else None
        if member.method not in (_STORED, _DEFLATED):
            return False
        try:
            while left > 0:
                part = self._pread(min(chunk, left), start)
                if not part:
                    return False
                start, left = start + len(part), left - len(part)
                crc = zlib.crc32(inflate.decompress(part) if inflate else part, crc)
            if inflate is not None:
                crc = zlib.crc32(inflate.flush(), crc)
        except zlib.error:
            return False
        return crc == member.crc

    def read_pickle(self) -> bytes:
        return self.read(self.pickle)

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members() if m.name == name), None)


def check_archive(path: str | os.PathLike) -> None:
    """Raise TorchFileError unless the file is a non-empty zip whose central directory reads and holds
    exactly one pickle (the quick check of an archive: its data is not read)."""
    with Archive(path):
        pass


def read_pickle_bytes(path: str | os.PathLike) -> bytes:
    with Archive(path) as a:
        return a.read_pickle()


# ---------------------------------------------------------------------- the restricted unpickler


class StorageStub(NamedTuple):
    dtype: str
    key: str
    numel: int


class TensorStub(NamedTuple):
    """A tensor as described by the pickle: enough to check keys and shapes without its data.
    A NamedTuple, not a dataclass: a state dict holds hundreds and each is built during unpickling."""
    shape: tuple[int, ...]
    dtype: str
    storage_key: str
    storage_offset: int
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _StorageType(NamedTuple):
    dtype: str


class _OrderedDict(dict):
    """A dict that accepts BUILD state, as torch state dicts carry a `_metadata` attribute."""


_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__: one per tensor


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    if type(storage) is not StorageStub:
        raise TorchFileError("bad_pickle", "tensor rebuilt from something that is not a storage")
    # int() each: what the stubs say is used to find bytes (deep check, read_array); garbage is a bad pickle
    return _new_tuple(TensorStub, (tuple(int(s) for s in size), storage.dtype, storage.key, int(storage_offset),
                                   tuple(int(s) for s in stride)))


class Shape(tuple):
    """A tensor read with `shapes_only`: its shape, a tuple that says it is a tensor's."""


def _tensor_shape(_storage, _storage_offset, size, *_rest):
    return _new_tuple(Shape, size)


def _rebuild_parameter(data, *_rest):
    return data


def _inert(*args, **kwargs):
    # torch.device("cpu"), torch.serialization._get_layout(...): keep their arguments, they are data.
    return args[0] if len(args) == 1 else args


_TENSOR = object()  # in the table below: each unpickler rebuilds tensors its own way

# The allow table: every global a weights-only checkpoint of ours or upstream's needs, with what it
# becomes here. Anything else in a pickle is refused (and reported as unsafe), never run.
_STUBS = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TENSOR,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): _inert,
    ("torch.serialization", "_get_layout"): _inert,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    **{("torch", s): _StorageType(d) for s, d in STORAGE_DTYPES.items()},
    **{("torch", d): d for d in DTYPE_NAMES},  # a dtype stored as a value (e.g. in metadata): keep its name
}
SAFE_GLOBALS = frozenset(_STUBS)


class _StubUnpickler(pickle.Unpickler):
    """Tensors as TensorStub (shape, dtype, storage key): what the deep check needs to find a tensor's bytes."""
    rebuild_tensor = staticmethod(_rebuild_tensor)

    def find_class(self, module, name):
        try:
            stub = _STUBS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"pickle references {module}.{name}, which a weights-only checkpoint never needs") from None
        return self.rebuild_tensor if stub is _TENSOR else stub

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError("bad_pickle", f"unexpected persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if type(storage_type) is _StorageType else "uint8"
        return _new_tuple(StorageStub, (dtype, str(key), numel))


class _ShapeUnpickler(_StubUnpickler):
    """Tensors as bare shapes (`Shape`, a tuple), storages not even described: the scanner reads tens of
    thousands of state dicts and wants their keys and shapes only (about half the time of TensorStubs)."""
    rebuild_tensor = staticmethod(_tensor_shape)

    def persistent_load(self, pid):
        return None


def load_pickle(data: bytes, name: str | None = None, shapes_only: bool = False):
    """Unpickle with the stub unpickler: the object tree, tensors as TensorStub (or, with `shapes_only`,
    as their `Shape`), nothing executed."""
    unpickler = _ShapeUnpickler if shapes_only else _StubUnpickler
    try:
        # BufferedReader: the C unpickler then reads ahead through peek() instead of one read() call per
        # opcode on a bare BytesIO, which made unpickling a state dict 4x slower.
        return unpickler(io.BufferedReader(io.BytesIO(data))).load()
    except TorchFileError:
        raise
    except Exception as e:  # garbage inside a valid zip: any unpickling error
        where = f"{name}: " if name else ""
        raise TorchFileError("bad_pickle", f"{where}pickle is malformed ({type(e).__name__}: {e})") from None


def read_structure(path: str | os.PathLike, shapes_only: bool = False):
    """The object tree of a torch.save file with tensors as TensorStub (or shapes); no tensor data is read."""
    return load_pickle(read_pickle_bytes(path), os.path.basename(path), shapes_only)


# Opcodes that push a string the unpickler may take as a module or global name.
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_UNKNOWN = ("?", "?")  # a global whose name the scan cannot tell: unsafe


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """Every global a pickle references, found statically (nothing is executed). The stack is followed
    symbolically, memo included (PUT/MEMOIZE then GET), so STACK_GLOBAL is named from the two values the
    unpickler would really take, not from the last two strings written."""
    found: set[tuple[str, str]] = set()
    stack: list = []  # strings where known, None for other values, _MARK for marks
    memo: dict[int, object] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            value = None
            if name == "GLOBAL" or name == "INST":
                module, _, attr = str(arg).partition(" ")
                found.add((module, attr))
            elif name == "STACK_GLOBAL":
                top = stack[-2:]
                ok = len(top) == 2 and all(isinstance(x, str) for x in top)
                found.add((top[0], top[1]) if ok else _UNKNOWN)
            elif name in ("OBJ", "EXT1", "EXT2", "EXT4"):
                found.add(_UNKNOWN)  # a class taken from the stack or the copyreg extension registry
            elif name in _STRING_OPS:
                value = arg
            elif name in _GET_OPS:
                value = memo.get(arg)
            elif name in _PUT_OPS:
                memo[arg] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            _apply_stack_effect(op, stack, value)
    except Exception as e:  # pickletools raises ValueError and others on garbage; all mean "not a pickle"
        raise TorchFileError("bad_pickle", f"pickle is malformed ({e})") from None
    return found


_MARK = object()


def _apply_stack_effect(op, stack: list, value) -> None:
    """pickletools' stack picture of one opcode (as its `dis` follows it), with known strings kept."""
    if op.name == "MEMOIZE":
        return  # it names the top of the stack and leaves it there
    before, after = op.stack_before, op.stack_after
    pop = len(before)
    if pickletools.markobject in before or (op.name == "POP" and stack and stack[-1] is _MARK):
        while stack and stack.pop() is not _MARK:
            pass
        pop = before.index(pickletools.markobject) if pickletools.markobject in before else 0
    if pop:
        top = stack[-1] if op.name == "DUP" and stack else None
        del stack[-pop:]
        if op.name == "DUP":
            stack.extend([top, top])
            return
    for item in after:
        stack.append(_MARK if item is pickletools.markobject else value)


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Globals in the file's pickle that are outside the weights-only allow-list, as 'module.name'."""
    return sorted(f"{m}.{n}" for m, n in pickle_globals(read_pickle_bytes(path)) - SAFE_GLOBALS)


def tensor_shapes(tree, prefix: str = "") -> dict[str, TensorStub]:
    """Flatten a state dict (possibly nested) to {dotted key: TensorStub}."""
    out: dict[str, TensorStub] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if type(v) is TensorStub:
                out[key] = v
            elif isinstance(v, (dict, list, tuple)):
                out.update(tensor_shapes(v, key + "."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(tensor_shapes({str(i): v}, prefix))
    return out


def state_dict_shapes(tree) -> dict[str, tuple[int, ...]] | None:
    """{key without `_orig_mod.`: shape} of a state dict's top level read with `shapes_only`, None
    when it is not a dict."""
    if not isinstance(tree, dict):
        return None
    return {str(k).removeprefix("_orig_mod."): v for k, v in tree.items() if type(v) is Shape}


_NUMPY_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "int16": "<i2",
                 "int8": "i1", "uint8": "u1", "bool": "?"}


def read_array(path: str | os.PathLike):
    """The one tensor a small torch.save file holds (e.g. token_bytes.pt), as a NumPy array, without torch.

    Only a top-level tensor of a NumPy-representable dtype, little-endian, is accepted; anything else
    raises TorchFileError (load such files with torch.load(weights_only=True) instead)."""
    import numpy as np

    name = os.path.basename(path)
    with Archive(path) as archive:
        stub = load_pickle(archive.read_pickle(), name)
        if not isinstance(stub, TensorStub):
            raise TorchFileError("not_a_tensor", f"{name} does not hold a single tensor")
        if stub.dtype not in _NUMPY_DTYPES:
            raise TorchFileError("bad_dtype", f"{name} holds a {stub.dtype} tensor")
        members = {m.name: m for m in archive.members()}
        byteorder = members.get(f"{archive.prefix}/byteorder")
        order = archive.read(byteorder).decode(errors="replace").strip() if byteorder is not None else "little"
        data = members.get(f"{archive.prefix}/data/{stub.storage_key}")
        if data is None:
            raise TorchFileError("truncated", f"{name}: its tensor data is missing")
        raw = archive.read(data)
    if order != "little":
        raise TorchFileError("bad_byteorder", f"{name} was written on a {order}-endian machine")
    storage = np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[stub.dtype]))
    last = stub.storage_offset + sum((n - 1) * s for n, s in zip(stub.shape, stub.stride)) if stub.numel else -1
    if len(stub.shape) != len(stub.stride) or min(stub.stride, default=0) < 0 or stub.storage_offset < 0 \
            or last >= len(storage):  # as_strided does not check bounds: never read past the storage
        raise TorchFileError("truncated", f"{name}: the tensor does not fit its storage")
    return np.lib.stride_tricks.as_strided(storage[stub.storage_offset:], shape=stub.shape,
                                           strides=tuple(s * storage.itemsize for s in stub.stride)).copy()
