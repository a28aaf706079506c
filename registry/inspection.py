"""
Inspecting one checkpoint for the scanner: which files it has, its metadata, its quick-check
problems, and what it says about its run (configs, target steps, model size). Metadata only: never
torch, never tensor data, never the pickle's code.

The problems are `nanochat.quick_check`'s, the one quick check (the same the integrity check's quick
level and checkpoint discovery run); this module keeps what the check read on the way (the meta, read
and bounded by `checkpoint_manager.read_meta`; the state dict's shapes; the world size), so nothing is
read twice. The run-level columns it derives are bounded too (`nanochat.bounds`), as they go to SQL.

This module writes nothing (scanner.py does) and does not walk folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import bounds
from nanochat import checkpoint_manager as cm
from nanochat.model_config import GPTConfig, classic_flops_per_token, flops_per_token, param_counts
from nanochat.quick_check import quick_check
from nanochat.schedule import resolve_from_meta

METRICS_FILE = "metrics.jsonl"


_KIND_CODES = {"model": 1, "meta": 2, "optimizer": 3, "train_state": 4, "single_file": 5}
# checkpoint_manager's four file-name patterns (MODEL_RE, META_RE, OPTIM_RE, TRAIN_STATE_RE) as one
# regex, so classifying the 30,000 names of a big tree costs one match each (a test checks they agree).
_NAME_RE = re.compile(r"^(?:model_(\d+)\.pt|meta_(\d+)\.json|optim_(\d+)(?:_rank(\d+))?\.pt|trainstate_(\d+)_rank(\d+)\.pt)$")


def file_kind(name: str) -> tuple[str, int | None, int | None] | None:
    """(kind, step, rank) of a checkpoint file name, None for other files: `cm.classify_name`'s answer,
    ("out_of_range", None, None) included, one match per name."""
    m = _NAME_RE.match(name)
    if m is None:
        return ("single_file", None, None) if name == cm.SINGLE_FILE else None
    model, meta, optim, optim_rank, state, state_rank = m.groups()
    if model is not None:
        return cm.numbered("model", model)
    if meta is not None:
        return cm.numbered("meta", meta)
    if optim is not None:
        return cm.numbered("optimizer", optim, optim_rank)
    return cm.numbered("train_state", state, state_rank)


def is_run_file(name: str) -> bool:
    return name == METRICS_FILE or file_kind(name) is not None


@dataclass
class Slot:
    """The files of one checkpoint as found on disk: key ("upstream", step) or ("single_file", None)."""
    layout: str
    step: int | None
    files: dict[str, tuple[str, int | None, int, int]] = field(default_factory=dict)  # name -> (kind, rank, size, mtime_ns)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.layout, self.step

    def signature(self) -> str:
        """A fingerprint of the files (kind, rank, size, mtime_ns): equal fingerprints mean nothing to re-read.
        Built from ints only, whose hashes CPython does not randomise, so it is stable across processes;
        a Python whose hash differs just re-inspects everything once."""
        return str(hash(frozenset((_KIND_CODES[f[0]], -1 if f[1] is None else f[1], f[2], f[3]) for f in self.files.values())))

    def parts(self) -> tuple[str | None, str | None, dict[int, str], dict[int, str]]:
        """File names: (model or checkpoint.pt, meta, {rank: optimizer shard}, {rank: training state})."""
        model = meta = None
        shards: dict[int, str] = {}
        states: dict[int, str] = {}
        for name, (kind, rank, _, _) in self.files.items():
            if kind in ("model", "single_file"):
                model = name
            elif kind == "meta":
                meta = name
            elif kind == "optimizer":
                shards[rank] = name
            elif kind == "train_state":
                states[rank] = name
        return model, meta, shards, states

    def checkpoint_files(self, directory: Path, step: int | None = None) -> cm.CheckpointFiles:
        parts: dict = {"optimizer_shards": {}, "train_states": {}}
        for name, (kind, rank, _, _) in self.files.items():
            if kind in ("model", "single_file"):
                parts["model"] = directory / name
            elif kind == "meta":
                parts["meta"] = directory / name
            elif kind == "optimizer":
                parts["optimizer_shards"][rank] = directory / name
            elif kind == "train_state":
                parts["train_states"][rank] = directory / name
        return cm.CheckpointFiles(directory=directory, step=self.step if step is None else step, layout=self.layout, **parts)


@dataclass
class Inspection:
    slot: Slot
    step: int  # -1 when unknown (a single file whose metadata cannot be read)
    meta: dict | None
    problems: list[dict]  # [{code, message, blocks, file}] as checkpoint_manager.Problem
    shapes: dict | None = None  # state-dict shapes, when the quick check read the model's pickle
    world: int | None = None  # the world size expected for the optimizer shards, when inspection worked it out
    not_resumable: str | None = None  # why no script resumes it however intact (cm.why_not_resumable)

    @property
    def complete(self) -> bool:
        return not self.problems or not any(p["blocks"] == "load" for p in self.problems)

    @property
    def resumable(self) -> bool:
        return not self.problems and self.not_resumable is None

    @property
    def val_bpb(self) -> float | None:
        """The meta's val_bpb; None when the meta contradicts its file name (whose step would it be?)."""
        if self.problems and any(p["code"] in ("step_mismatch", "bad_meta") for p in self.problems):
            return None
        v = (self.meta or {}).get("val_bpb")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def segment(self) -> int:
        seg = (self.meta or {}).get("resume_segment")
        return seg if isinstance(seg, int) and not isinstance(seg, bool) and seg >= 1 else 1

    def world_size(self, directory: Path) -> int | None:
        if self.slot.layout != "upstream":
            return None
        world = self.world
        if world is None:
            world = cm.expected_world_size(self.slot.checkpoint_files(directory), self.meta)
        return world if world > 0 else None

    @property
    def has_train_state(self) -> bool:
        return bool(self.meta and self.meta.get("train_state") and any(f[0] == "train_state" for f in self.slot.files.values()))


def _problems(items) -> list[dict]:
    return [{"code": p.code, "message": p.message, "blocks": p.blocks, "file": p.file} for p in items]


def inspect_checkpoint(slot: Slot, directory: Path) -> Inspection:
    """Read one checkpoint's metadata and run the quick check (which reads the meta: one reader, one
    set of bounds, `checkpoint_manager.read_meta`)."""
    check = quick_check(slot.checkpoint_files(directory))
    step = slot.step
    if slot.layout == "single_file":
        step = check.meta["step"] if check.meta is not None and isinstance(check.meta.get("step"), int) else -1
    return Inspection(slot, step, check.meta, _problems(check.problems), check.shapes, check.world,
                      cm.why_not_resumable(slot.layout, directory, check.meta))


def run_config(ins: Inspection, directory: Path) -> dict:
    """Run-level columns from a checkpoint: configs, target steps, world size, model size."""
    meta = ins.meta or {}
    mc = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else {}
    uc = meta.get("user_config") if isinstance(meta.get("user_config"), dict) else {}
    try:
        num = resolve_from_meta(meta)
    except (TypeError, ValueError, KeyError, ArithmeticError):
        num = None
    if not (isinstance(num, int) and 0 < num <= bounds.MAX_STEP):
        num = None  # e.g. a data ratio of 1e300 in user_config: no step count a column (or a run) holds
    tbs = meta.get("total_batch_size") or uc.get("total_batch_size")
    world = meta.get("world_size")
    out = {"model_config": mc, "user_config": uc, "config_step": ins.step, "num_iterations": num,
           "world_size": world if isinstance(world, int) and world > 0 else ins.world_size(directory),
           "total_batch_size": tbs if isinstance(tbs, int) and tbs > 0 else None,
           "depth": mc.get("n_layer") if isinstance(mc.get("n_layer"), int) else None,
           "n_params": None, "flops_per_token": None, "generation": None}
    if ins.complete:
        try:  # the architecture generation needs the state dict's key names, read from the pickle only
            config = GPTConfig.from_checkpoint(mc, ins.shapes)
            out.update(n_params=param_counts(config)["total"], generation="classic" if config.is_classic else "current",
                       flops_per_token=classic_flops_per_token(config) if config.is_classic else flops_per_token(config))
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # an unusual architecture: sizes stay unknown, the run is still indexed
    return out
