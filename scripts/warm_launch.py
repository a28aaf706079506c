"""
Training subprocesses started ahead of their turn, for the demo builder (scripts/demo.py).

Each `python -m scripts.base_train` (or `scripts.chat_sft`) spends ~4 s of a core before its first step,
nearly all of it importing torch (and, for the exact mode, torch._inductor). A warm launch starts the process
early with the same command line, lets it import, and holds it before `main` until `go()`: the import overlaps
work that is going on anyway (writing the shards and training the tokenizer; the last steps of the run it
follows, once the other lane is done) instead of adding to the lane's time. A launch that is never given `go()` exits without doing
anything when `cancel()` closes its stdin.

The process is the training process itself (same PID, same signals, same stdout), so a SIGKILL the demo sends
is still a real crash. `Launches` holds the ones started ahead, keyed by their exact command and thread count:
a prediction that turns out wrong (the build needed another command) costs only the idle import.
This module knows nothing about what the runs are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The child: import the script's module (torch and all), wait for "go", then run its main with the flags.
# torch._inductor too: the trainers' exact mode calls torch.use_deterministic_algorithms, which imports it (and
# dynamo, sympy): 1.85 s of the 1.9 s from main to the model line, profiled.
WARM_START = (
    "import importlib, sys\n"
    "main = importlib.import_module(sys.argv[1]).main\n"
    "import torch._inductor  # noqa: F401\n"
    "if sys.stdin.readline().strip() != 'go':\n"
    "    sys.exit(0)  # cancelled: the build went another way, nothing was written\n"
    "sys.stdin.close()\n"
    "sys.exit(main(sys.argv[2:]))\n")


class Launch:
    """One training process, started (importing) and waiting for go()."""

    def __init__(self, module: str, args: list[str], base_dir: Path, threads: int):
        # One lane per core with its own threads: several OpenMP threads spinning on a busy 2-core machine
        # are up to 50x slower than one (measured), and two lanes keep both cores busy anyway.
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(threads)}
        env.pop("NANOCHAT_FAULT_KILL_AFTER", None)
        self.proc = subprocess.Popen([sys.executable, "-c", WARM_START, module, *args], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def go(self) -> subprocess.Popen:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except OSError:  # it died importing: its output says why, and the caller reads it and the exit code
            pass
        return self.proc

    def cancel(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.stdout.close()
        self.proc.wait()


class Launches:
    """Warm launches by (command, threads): `start` one ahead of time, `take` it (or a new one) when its turn comes."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._waiting: dict[tuple, Launch] = {}
        self._lock = threading.Lock()

    def start(self, module: str, args: list[str], threads: int) -> None:
        key = (module, tuple(args), threads)
        with self._lock:
            if key not in self._waiting:
                self._waiting[key] = Launch(module, args, self.base_dir, threads)

    def take(self, module: str, args: list[str], threads: int) -> subprocess.Popen:
        """The running process for this command: the one started ahead, or a new one (started and told go)."""
        with self._lock:
            launch = self._waiting.pop((module, tuple(args), threads), None)
        return (launch or Launch(module, args, self.base_dir, threads)).go()

    def cancel_all(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for launch in waiting:
            launch.cancel()
