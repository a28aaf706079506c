"""
What exact resume needs beyond the weights and the optimizer: every random number generator and the
data position, per rank, in a form `torch.load(weights_only=True)` accepts.

`capture_rng()` / `restore_rng(state)` cover torch's CPU generator, every CUDA device's generator (when
CUDA is initialised), Python's `random` and NumPy's legacy global generator. NumPy's state is a tuple
holding a uint32 array; it is stored as ("MT19937", int64 tensor, pos, has_gauss, cached_gaussian) made
of tensors and plain numbers, because the weights-only unpickler refuses NumPy objects.

`make_train_state` bundles one rank's file: RNG, the data loader's `state_dict()`, the CPU thread count
(reductions depend on it) and the loop state that is not in the meta (the step of the last evaluation,
so a resume does not evaluate the resume step twice).

It does not decide what is saved when (the training script) nor where (checkpoint_manager).
"""

from __future__ import annotations

import random

import numpy as np
import torch

STATE_FORMAT = "nanochat-workbench-trainstate"


class TrainStateError(ValueError):
    """A training-state file that cannot be used for this process."""


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": _python_state_to_plain(random.getstate()),
        "numpy": {"kind": str(np_state[0]), "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [t for t in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_python_state_from_plain(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch_cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["torch_cuda"]):
            raise TrainStateError("the training state holds CUDA generator states but this process has fewer GPUs")
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def _python_state_to_plain(st) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_plain(d: dict):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def make_train_state(*, rank: int, world_size: int, step: int, loader_state: dict, last_eval_step: int | None) -> dict:
    # CPU kernels reduce in an order that depends on the thread count: a resume is bit-exact only with
    # the same count, so it is recorded (the trainer warns when it differs).
    return {"format": STATE_FORMAT, "version": 1, "rank": rank, "world_size": world_size, "step": step,
            "rng": capture_rng(), "loader": loader_state, "cpu_threads": torch.get_num_threads(),
            "last_eval_step": -1 if last_eval_step is None else int(last_eval_step)}


def check_train_state(state, *, rank: int, world_size: int, step: int) -> dict:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainStateError("the training-state file was not written by this trainer")
    if (state.get("rank"), state.get("world_size"), state.get("step")) != (rank, world_size, step):
        raise TrainStateError(f"the training-state file is rank {state.get('rank')} of {state.get('world_size')} at "
                              f"step {state.get('step')}, expected rank {rank} of {world_size} at step {step}")
    return state
