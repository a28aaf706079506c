"""
Atomic file writes, the one way nanochat replaces a file (checkpoints, metas, tokenizers, conversation
files): a temporary file beside the target named after this host and process, fsynced, renamed over the
target, and the directory fsynced. A save killed mid-write leaves only a temporary file, which
`remove_stale_temp_files` recognises by its name. Standard library only (no torch).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^.]+)\.(?P<pid>\d+)$")


def _temp_name(path: Path) -> Path:
    # Host and pid in the name: a save killed mid-write leaves a file that can be told apart from a live
    # one, also when ranks on several hosts share the directory.
    host = socket.gethostname().split(".")[0].replace("-", "_") or "host"
    return path.with_name(f".{path.name}.tmp-{host}.{os.getpid()}")


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves on this host whose process is gone (killed mid-write)."""
    d = Path(directory)
    host = _temp_name(d / "x").name.split(".tmp-")[1].split(".")[0]
    removed = []
    for name in os.listdir(d) if d.is_dir() else []:
        m = TEMP_RE.match(name)
        if not m or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        try:
            (d / name).unlink()
            removed.append(d / name)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists (a save's or a scan's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, flushed to disk before the
    rename (and the directory after it): a crash leaves the old file or the new one, never a torn one."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
