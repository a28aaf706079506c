"""
Running our trainers as real subprocesses in tests (tests/test_train_resume.py, tests/test_chat_sft.py):
the environment a launch gets, its command line (one process, or several under torchrun), running it,
and comparing two runs' tensors bit for bit. What each trainer's tests train is theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def trainer_env(base: Path, **extra) -> dict:
    """This process's environment without a fault hook or a torchrun rank of its own, on `base`, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_FAULT_KILL_AFTER", "RANK", "WORLD_SIZE")}
    return {**env, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def trainer_argv(module: str, args: list[str], nproc: int = 1) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", module, "--", *args]
    return [sys.executable, "-m", module, *args]


def run_trainer(cmd: list[str], base: Path, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=trainer_env(base, **extra_env), capture_output=True, text=True, timeout=300)


def assert_bit_identical(a: dict, b: dict) -> None:
    """Same keys, and every value equal: tensors with torch.equal (bit for bit), anything else with ==."""
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
        assert same, f"{k} differs"
