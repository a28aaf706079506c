"""
Small shared facts of the nanochat world that need no torch: where the base directory is, and how a
file that must be a regular file is opened for reading.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

DEFAULT_BASE_DIR = Path("~/.cache/nanochat")
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def get_base_dir() -> Path:
    """$NANOCHAT_BASE_DIR, else ~/.cache/nanochat (upstream's default). Not created here."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env).expanduser() if env else DEFAULT_BASE_DIR.expanduser()


class NotARegularFileError(OSError):
    """A path that names a FIFO, device, socket or directory where a file was expected (an OSError, so
    every reader's `except OSError` already reports it in one line: `strerror` says what it is)."""


def _refuse(mode: int, path) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), f"type {stat.S_IFMT(mode):o}")
        raise NotARegularFileError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of `path`, which must be a regular file, and its stat (callers need its size:
    one fstat serves both). Opening a FIFO for reading blocks until a writer appears (forever, for a FIFO
    named meta_000012.json), and a device can stream without end: the open is non-blocking and the
    descriptor's own type is checked (no race with a rename). O_NONBLOCK is left set: it changes nothing for
    a regular file, and clearing it would cost two more system calls on the scanner's path. Every reader of
    checkpoint files, metas and metrics opens through here."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            _refuse(st.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class TooLargeError(Exception):
    """A file larger than its reader takes (`read_regular`'s max_bytes): refused before it is read."""


def read_regular(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file (a meta, a small JSON): `open_regular`, then plain reads.
    A file over `max_bytes` (by the descriptor's fstat: no second stat) raises TooLargeError."""
    fd, st = open_regular(path)
    try:
        chunks, size = [], st.st_size
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(f"{os.path.basename(path)} is {size} bytes, more than {max_bytes}")
        while chunk := os.read(fd, max(size + 1, 1 << 16)):  # one read for a file that did not grow
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular_file(path: str | os.PathLike, mode: str = "rb", **kwargs):
    """`open(path, mode)` for reading ("rb" or "r", with open's keyword arguments) through `open_regular`."""
    assert mode in ("r", "rb", "rt"), f"open_regular_file only reads, not {mode!r}"
    return os.fdopen(open_regular(path)[0], mode, **kwargs)

