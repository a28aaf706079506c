"""
Process-group plumbing for training: one process, or W processes started by torchrun.

`init_distributed(device_type)` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), picks the
backend that works on the device (gloo on CPU, nccl on CUDA) and returns a `DistInfo`. The helpers
here (`print0`, `barrier`, `all_reduce_sum`) are no-ops or plain prints in a single
process, so the training loop is written once.

Only collectives that gloo implements in torch 2.13 are used: `all_reduce` (SUM/MAX; gloo has no AVG)
and `all_gather_into_tensor`. Upstream's `reduce_scatter_tensor(..., async_op=True).get_future()` is
not available under gloo, which is why `optim.py` shards its state with these two instead.

This module does not know about models, optimizers or checkpoints.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The launch environment cannot give us the process group that was asked for."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def autodetect_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_type(requested: str | None) -> str:
    """"auto" or "" -> what this machine has; "cuda" without CUDA is an error, not a silent fallback."""
    requested = (requested or "auto").lower()
    if requested in ("auto", ""):
        return autodetect_device_type()
    if requested not in ("cpu", "cuda"):
        raise DistributedError(f"unknown device {requested!r} (choose auto, cpu or cuda)")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DistributedError("--device cuda was asked for but torch sees no CUDA device")
    return requested


def device_memory_bytes(device_type: str) -> int | None:
    """Memory of this process's device: the CUDA device's total, or the machine's physical RAM (None: unknown)."""
    try:
        if device_type == "cuda":
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or run alone."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place; gloo has no AVG, so callers divide themselves."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_into(out: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """out (world * n,) <- every rank's local (n,), in rank order."""
    if is_initialized():
        dist.all_gather_into_tensor(out, local)
    else:
        out.copy_(local)
    return out


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """In place: every rank's t <- rank src's."""
    if is_initialized():
        dist.broadcast(t, src)
    return t


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def print0(*args, file=None, **kwargs) -> None:
    """print on rank 0 only, flushed (logs are read live by the demo and by people tailing them)."""
    if get_rank() == 0:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)
