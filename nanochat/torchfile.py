"""
Files written by `torch.save`, read without torch and without running their pickle.

A torch.save file is a zip archive: `<prefix>/data.pkl` (the object tree as a pickle whose tensors
point at storages by persistent id), `<prefix>/data/<key>` (raw storage bytes), `byteorder`, `version`.
This module reads the pickle with an unpickler that rebuilds tensors as `TensorStub`s (shape, dtype,
storage key) and containers as plain dicts, lists and tuples; every other global is refused. So the
registry can read a checkpoint's key names, shapes and a single-file checkpoint's metadata in
milliseconds, without torch and without trusting the file. It also lists a pickle's globals
statically (the `unsafe_pickle` check). Loading real tensors is `checkpoint_manager`'s job.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Storage classes by dtype, as torch.save names them (torch.FloatStorage -> float32).
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}
DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
               "complex64", "complex128", "float", "double", "half", "long", "int"}

# Globals that torch's weights_only loader accepts in the checkpoints nanochat writes and that we
# know how to stub. Anything else in a checkpoint's pickle is reported as unsafe and never run.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"),
    *(("torch", s) for s in STORAGE_DTYPES),
    *(("torch", d) for d in DTYPE_NAMES),
}


class TorchFileError(ValueError):
    """A file that is not a readable torch.save archive; `code` is the integrity problem code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class UnsafePickleError(TorchFileError):
    def __init__(self, message: str):
        super().__init__("unsafe_pickle", message)


@dataclass(frozen=True)
class StorageStub:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class TensorStub:
    """A tensor as described by the pickle: enough to check keys and shapes without its data."""
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


@dataclass(frozen=True)
class _StorageType:
    dtype: str


class _OrderedDict(dict):
    """A dict that accepts BUILD state, as torch state dicts carry a `_metadata` attribute."""


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    if not isinstance(storage, StorageStub):
        raise TorchFileError("bad_pickle", "tensor rebuilt from something that is not a storage")
    return TensorStub(tuple(int(s) for s in size), storage.dtype, storage.key, int(storage_offset),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_rest):
    return data


def _inert(*args, **kwargs):
    # torch.device("cpu"), torch.Size([..]) and friends: keep their arguments, they are data.
    return args[0] if len(args) == 1 else args


_STUBS = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
}


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _STUBS:
            return _STUBS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPE_NAMES:
            return name  # a dtype stored as a value (e.g. in metadata): keep its name
        if (module, name) in SAFE_GLOBALS:
            return _inert
        raise UnsafePickleError(f"pickle references {module}.{name}, which a weights-only checkpoint never needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError("bad_pickle", f"unexpected persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else "uint8"
        return StorageStub(dtype, str(key), int(numel))


def open_archive(path: str | Path) -> tuple[zipfile.ZipFile, str]:
    """Open a torch.save archive and return it with its member prefix; errors carry a problem code."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise TorchFileError("empty_file", f"{path.name} is empty")
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise TorchFileError("missing_file", f"{path.name} does not exist") from None
    except zipfile.BadZipFile:
        raise TorchFileError("truncated", f"{path.name} has no zip central directory (truncated or not a torch.save file)") from None
    except OSError as e:
        raise TorchFileError("unreadable", f"{path.name}: {e.strerror}") from None
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        zf.close()
        raise TorchFileError("not_torch_file", f"{path.name} is a zip file but not a torch.save archive")
    return zf, pkl[0][: -len("/data.pkl")]


def read_pickle_bytes(path: str | Path) -> bytes:
    zf, prefix = open_archive(path)
    with zf:
        try:
            return zf.read(f"{prefix}/data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError("truncated", f"{Path(path).name}: cannot read its pickle ({e})") from None


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """Every global a pickle references, found statically (nothing is executed)."""
    found: set[tuple[str, str]] = set()
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                found.add((module, name))
            elif op.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    found.add(("?", "?"))  # a global whose name is computed: treat as unknown
                else:
                    found.add((strings[-2], strings[-1]))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("INST", "OBJ"):
                found.add(tuple(str(arg).split(" ", 1)) if arg else ("?", "?"))
    except Exception as e:  # pickletools raises ValueError and others on garbage; all mean "not a pickle"
        raise TorchFileError("bad_pickle", f"pickle is malformed ({e})") from None
    return found


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals in the file's pickle that are outside the weights-only allow-list, as 'module.name'."""
    return sorted(f"{m}.{n}" for m, n in pickle_globals(read_pickle_bytes(path)) - SAFE_GLOBALS)


def read_structure(path: str | Path):
    """The object tree of a torch.save file with tensors as TensorStub; no tensor data is read."""
    data = read_pickle_bytes(path)
    try:
        return _StubUnpickler(io.BytesIO(data)).load()
    except TorchFileError:
        raise
    except Exception as e:  # garbage inside a valid zip: any unpickling error
        raise TorchFileError("bad_pickle", f"{Path(path).name}: pickle is malformed ({type(e).__name__}: {e})") from None


def tensor_shapes(tree, prefix: str = "") -> dict[str, TensorStub]:
    """Flatten a state dict (possibly nested) to {dotted key: TensorStub}."""
    out: dict[str, TensorStub] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, TensorStub):
                out[key] = v
            elif isinstance(v, (dict, list, tuple)):
                out.update(tensor_shapes(v, key + "."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(tensor_shapes({str(i): v}, prefix))
    return out


_NUMPY_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "int16": "<i2",
                 "int8": "i1", "uint8": "u1", "bool": "?"}


def read_array(path: str | Path):
    """The one tensor a small torch.save file holds (e.g. token_bytes.pt), as a NumPy array, without torch.

    Only a top-level tensor of a NumPy-representable dtype, little-endian, is accepted; anything else
    raises TorchFileError (load such files with torch.load(weights_only=True) instead)."""
    import numpy as np

    stub = read_structure(path)
    if not isinstance(stub, TensorStub):
        raise TorchFileError("not_a_tensor", f"{Path(path).name} does not hold a single tensor")
    if stub.dtype not in _NUMPY_DTYPES:
        raise TorchFileError("bad_dtype", f"{Path(path).name} holds a {stub.dtype} tensor")
    zf, prefix = open_archive(path)
    with zf:
        try:
            order = zf.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in zf.namelist() else "little"
            raw = zf.read(f"{prefix}/data/{stub.storage_key}")
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
            raise TorchFileError("truncated", f"{Path(path).name}: cannot read its tensor data ({e})") from None
    if order != "little":
        raise TorchFileError("bad_byteorder", f"{Path(path).name} was written on a {order}-endian machine")
    storage = np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[stub.dtype]))
    last = stub.storage_offset + sum((n - 1) * s for n, s in zip(stub.shape, stub.stride)) if stub.numel else -1
    if len(stub.shape) != len(stub.stride) or min(stub.stride, default=0) < 0 or stub.storage_offset < 0 \
            or last >= len(storage):  # as_strided does not check bounds: never read past the storage
        raise TorchFileError("truncated", f"{Path(path).name}: the tensor does not fit its storage")
    return np.lib.stride_tricks.as_strided(storage[stub.storage_offset:], shape=stub.shape,
                                           strides=tuple(s * storage.itemsize for s in stub.stride)).copy()
