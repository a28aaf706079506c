"""The app served by a real `streamlit run` for the tests that need a server (browser, local-only): started
from another folder with the app's own config (no STREAMLIT_* overrides), waited for, and stopped."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "streamlit_app" / "app.py"


@dataclass(frozen=True)
class Served:
    url: str
    port: int
    log: Path  # the server's stdout and stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cwd: Path, env: dict[str, str], timeout_s: float = 60) -> Iterator[Served]:
    """Run the app from `cwd` with `env` (STREAMLIT_* variables dropped, so only the app's config decides
    where it listens) until its health check answers; stop it on exit."""
    port, log = free_port(), cwd / "streamlit.log"
    env = {k: v for k, v in env.items() if not k.startswith("STREAMLIT_")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port)],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("streamlit did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
        yield Served(url, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
