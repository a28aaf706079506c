"""
torch.save archives read at scan speed: is the zip whole, and what does its pickle say (metadata,
state-dict key names and shapes), without torch, without tensor data and without running the pickle.

`nanochat.torchfile` is the reference reader (zipfile + a stub unpickler); the scanner calls it, via
`checkpoint_manager.quick_problems`, whenever this module reports anything unusual, so every problem
message still comes from there. This module exists because a scan of 10,000 checkpoints spends most
of its time opening archives: here one archive costs one open, two positioned reads (the end of the
file with the central directory, then the pickle with its local header) and one C-unpickler pass
whose callbacks return plain tuples, about a third of the reference path. The allow-list of globals is torchfile's: anything else
raises `ArchiveError` (and the reference reader then reports `unsafe_pickle`). Deflated members
(a re-zipped checkpoint) are inflated; zip64 archives (files over 4 GB) are handled.

What this module does not do: CRC checks or reading tensor data (the deep integrity check does).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib

from nanochat.torchfile import DTYPE_NAMES, SAFE_GLOBALS, STORAGE_DTYPES

TAIL = 1 << 14  # the end of the file read at once: a state dict's central directory usually fits in it
_SLACK = 1 << 10  # bytes of name and extra field read with a pickle's local header before a second read is needed
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
# A central directory entry's fixed part: signature, method, compressed and uncompressed size,
# name/extra/comment lengths, local header offset; and just what walking from entry to entry needs.
_CENTRAL_ENTRY = struct.Struct("<4s6xH8xIIHHH8xI")
_CENTRAL_LENGTHS = struct.Struct("<4s24xHHH")


class ArchiveError(ValueError):
    """Anything unexpected: the caller falls back to the reference reader for the exact problem."""


def _central_directory(fd: int, size: int) -> tuple[bytes, bytes, int, int]:
    """(central directory bytes, the tail read, the tail's offset in the file, entry count)."""
    if size < 22:
        raise ArchiveError("too small for a zip archive")
    start = max(0, size - TAIL)
    tail = os.pread(fd, size - start, start)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        raise ArchiveError("no end of central directory (truncated?)")
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", tail, at)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = at - 20
        if loc < 0 or tail[loc:loc + 4] != _EOCD64_LOCATOR:
            raise ArchiveError("zip64 locator missing")
        (rec_offset,) = struct.unpack_from("<Q", tail, loc + 8)
        rec = os.pread(fd, 56, rec_offset)
        if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
            raise ArchiveError("zip64 end record missing")
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
    if cd_offset + cd_size > size:
        raise ArchiveError("central directory beyond the end of the file")
    if cd_offset >= start:
        cd = tail[cd_offset - start:cd_offset - start + cd_size]
    else:
        cd = os.pread(fd, cd_size, cd_offset)
    if len(cd) != cd_size:
        raise ArchiveError("short central directory")
    return cd, tail, start, count


def _find_pickle(cd: bytes, count: int, size: int) -> tuple[int, int, int, int]:
    """(local header offset, compressed size, uncompressed size, method) of `<prefix>/data.pkl`.
    Every entry is walked (a damaged one anywhere sends the caller to the reference reader), reading
    only what locates the next; the pickle's entry, found by searching the names, is read in full."""
    ends, at = set(), cd.find(b"/data.pkl")
    while at >= 0:
        ends.add(at + 9)
        at = cd.find(b"/data.pkl", at + 1)
    if not ends:
        raise ArchiveError("not a torch.save archive")
    pos, found, unpack = 0, None, _CENTRAL_LENGTHS.unpack_from
    for _ in range(count):
        sig, nlen, elen, clen = unpack(cd, pos)
        if sig != _CENTRAL:
            raise ArchiveError("bad central directory entry")
        name_end = pos + 46 + nlen
        if name_end in ends and nlen >= 9 and cd.count(b"/", pos + 46, name_end) == 1:
            if found is not None:
                raise ArchiveError("two pickles")
            found = pos
        pos = name_end + elen + clen
    if found is None:
        raise ArchiveError("not a torch.save archive")
    _, method, csize, usize, nlen, elen, _, offset = _CENTRAL_ENTRY.unpack_from(cd, found)
    if 0xFFFFFFFF in (csize, usize, offset):
        extra = found + 46 + nlen
        usize, csize, offset = _zip64_sizes(cd[extra:extra + elen], usize, csize, offset)
    if offset + 30 + csize > size:
        raise ArchiveError("pickle beyond the end of the file")
    return offset, csize, usize, method


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF:
                offset = values.pop(0)
            return usize, csize, offset
        pos += 4 + length
    raise ArchiveError("zip64 sizes missing")


def check_archive(path: str | os.PathLike) -> None:
    """Raise ArchiveError unless the file is a non-empty zip whose central directory reads and holds
    exactly one pickle (what torchfile.open_archive accepts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            cd, _, _, count = _central_directory(fd, size)
            _find_pickle(cd, count, size)
        finally:
            os.close(fd)
    except (OSError, struct.error) as e:
        raise ArchiveError(str(e)) from None


def read_pickle(path: str | os.PathLike) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            cd, tail, start, count = _central_directory(fd, size)
            offset, csize, usize, method = _find_pickle(cd, count, size)
            # The local header, its name and extra field, then the data: read at once with room for an
            # extra field of up to _SLACK bytes (torch pads it to align the data), else read again.
            if offset >= start:
                local = tail[offset - start:]
            else:
                local = os.pread(fd, 30 + _SLACK + csize, offset)
            if len(local) < 30 or local[:4] != _LOCAL:
                raise ArchiveError("bad local header")
            nlen, elen = struct.unpack_from("<HH", local, 26)
            at = 30 + nlen + elen
            data = local[at:at + csize]
            if len(data) != csize and at + csize > len(local) and offset + at + csize <= size:
                data = os.pread(fd, csize, offset + at)
        finally:
            os.close(fd)
    except (OSError, struct.error) as e:
        raise ArchiveError(str(e)) from None
    if len(data) != csize:
        raise ArchiveError("short pickle")
    if method == 8:
        try:
            data = zlib.decompressobj(-15).decompress(data)
        except zlib.error as e:
            raise ArchiveError(f"bad deflate stream: {e}") from None
    elif method != 0:
        raise ArchiveError(f"compression method {method}")
    if len(data) != usize:
        raise ArchiveError("pickle size mismatch")
    return data


class _StateDict(dict):
    """OrderedDict stand-in that accepts BUILD (torch state dicts carry a `_metadata` attribute)."""


def _tensor_shape(_storage, _offset, size, *_rest):
    return tuple(size)


def _first(data, *_rest):
    return data


def _inert(*args):
    return args[0] if len(args) == 1 else args


_MAP = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_shape,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("torch._utils", "_rebuild_parameter_with_state"): _first,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
}


class _ShapeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise ArchiveError(f"global {module}.{name} is outside the weights-only allow-list")
        if (module, name) in _MAP:
            return _MAP[(module, name)]
        if module == "torch" and (name in STORAGE_DTYPES or name in DTYPE_NAMES):
            return name
        return _inert

    def persistent_load(self, pid):
        return None  # storages: the data is never read here


def read_tree(path: str | os.PathLike):
    """The object tree of a torch.save file with every tensor replaced by its shape (a tuple)."""
    data = read_pickle(path)
    try:
        # BufferedReader: the C unpickler then reads ahead through peek() instead of one read() call per
        # opcode on a bare BytesIO, which made unpickling a state dict 4x slower.
        return _ShapeUnpickler(io.BufferedReader(io.BytesIO(data))).load()
    except ArchiveError:
        raise
    except Exception as e:  # any malformed pickle: the reference reader will name it
        raise ArchiveError(f"pickle does not load: {type(e).__name__}") from None


def state_dict_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{key without `_orig_mod.`: shape} of a state dict tree (tuples of ints are tensors here)."""
    if not isinstance(tree, dict):
        raise ArchiveError("not a state dict")
    return {str(k).removeprefix("_orig_mod."): v for k, v in tree.items()
            if isinstance(v, tuple) and all(isinstance(x, int) for x in v)}
