"""
What did the model see at step N? The documents, and their packing into rows, of any step of a run.

For a run of our trainer the answer is exact: its checkpoints hold the data loader's exact state
(`trainstate_{step}_rank{r}.pt`, see `dataloader.BosBestFitLoader.state_dict`), so `step_batch` restores
the newest one at or before N (or starts a fresh loader when there is none), skips the micro-batches of
the steps in between and returns the `grad_accum` micro-batches of step N, built by the training loader
itself with provenance on (`track=True`): every row segment says which shard, row group and row it came
from, and whether it was cropped. Documents that sat in the loader's buffer at the restored checkpoint
have no recorded origin; their text is still exact (decoded from the saved tokens).

For an upstream run only `dataloader_state_dict` is saved (the last row group read, as of the *next*
batch): `approximate_position` says where that is. A run our trainer continued from an upstream
checkpoint (`--allow-approximate`, the meta's `approximate_resume`) replays exactly from that step on:
the continuation started from upstream's saved position with an empty buffer, which the meta records.

Needs the run's tokenizer and the same shards on disk. torch is imported by the loader and to read
training states; nothing here trains or evaluates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nanochat import checkpoint_manager as cm
from nanochat.dataloader import BosBestFitLoader, DataError, RowSegment, find_data_dir, list_parquet_files, split_files


class ReplayError(ValueError):
    """A step that cannot be replayed, with a one-line reason."""


@dataclass(frozen=True)
class Segment:
    row: int  # row within the micro-batch
    offset: int
    length: int
    doc_tokens: int
    shard: str | None  # None: the document was already in the loader's buffer at the restored checkpoint
    row_group: int | None
    doc_row: int | None
    epoch: int | None
    text: str  # the tokens placed in the row, decoded (BOS shown as <|bos|>)

    @property
    def cropped(self) -> bool:
        return self.length < self.doc_tokens


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[tuple[int, ...], ...]  # B rows of T + 1 ids: inputs row[:-1], targets row[1:]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class StepBatch:
    run_dir: str
    step: int
    rank: int
    world_size: int
    grad_accum: int
    batch_size: int
    seq_len: int
    restored_from: int | None  # the checkpoint step whose loader state was restored (None: from the start)
    micro_batches: tuple[MicroBatch, ...]


def _latest_meta(checkpoints: list) -> dict:
    for ckpt in reversed(checkpoints):
        if ckpt.meta is not None and ckpt.meta.exists():
            try:
                return cm.read_meta(ckpt)
            except cm.CheckpointError:
                continue
    raise ReplayError("no readable meta file in this run: nothing says how it was trained")


def approximate_position(meta: dict) -> str | None:
    """Upstream's saved loader position, in words (None when the meta has none)."""
    d = meta.get("dataloader_state_dict")
    if not isinstance(d, dict):
        return None
    return (f"at step {meta.get('step')}, the loader had last read train shard #{d.get('pq_idx')} (in name order, validation "
            f"excluded), row group {d.get('rg_idx')} of rank 0, epoch {d.get('epoch', 1)}; the step's documents come from "
            "the ~1000 documents buffered up to there (upstream saves no exact position)")


def step_batch(run_dir: str | os.PathLike, step: int, rank: int = 0, base_dir: str | os.PathLike | None = None) -> StepBatch:
    """The micro-batches rank `rank` trained on at optimizer step `step` (0-based, as the logs count)."""
    from nanochat.tokenizer import TokenizerError
    from nanochat.train_state import TrainStateError, check_train_state

    run = Path(run_dir)
    try:
        checkpoints = [c for c in cm.list_checkpoints(run) if c.layout == "upstream" and c.step is not None]
    except cm.CheckpointError as e:
        raise ReplayError(str(e)) from None
    if not checkpoints:
        raise ReplayError(f"no checkpoints in {run}")
    meta = _latest_meta(checkpoints)
    if not meta.get("train_state"):
        where = approximate_position(meta)
        raise ReplayError("this run was not trained by our trainer, so its exact data position was not saved"
                          + (f"; {where}" if where else ""))
    uc = meta.get("user_config") or {}
    world = int(meta.get("world_size") or 1)
    B, T = int(meta.get("device_batch_size") or uc["device_batch_size"]), int(meta.get("max_seq_len") or uc["max_seq_len"])
    tbs = int(meta.get("total_batch_size") or uc["total_batch_size"])
    grad_accum = tbs // (B * T * world)
    n = meta.get("num_iterations")
    if step < 0 or (n is not None and step >= n):
        raise ReplayError(f"step {step} is outside this run (steps 0..{n - 1 if n else '?'})")
    if not 0 <= rank < world:
        raise ReplayError(f"rank {rank} does not exist in a run of {world} process(es)")
    base = Path(base_dir) if base_dir is not None else run.parent.parent
    try:
        tokenizer = cm.load_tokenizer_for(checkpoints[-1], base / "tokenizer" if (base / "tokenizer").is_dir() else None)
        train_files = split_files(list_parquet_files(find_data_dir(base)), "train")
        loader = BosBestFitLoader(train_files, tokenizer, B, T, rank, world, track=True)
    except (cm.CheckpointError, DataError, TokenizerError) as e:
        raise ReplayError(str(e)) from None
    restored = None
    usable = [c for c in checkpoints if c.step <= step and rank in c.train_states]
    approx = meta.get("approximate_resume")
    if isinstance(approx, dict) and isinstance(approx.get("from_step"), int):
        first = approx["from_step"]
        if step < first:
            raise ReplayError(f"step {step} was trained by upstream nanochat, before our trainer continued this run at "
                              f"step {first} (--allow-approximate): its exact data position was not saved")
        if not usable or usable[-1].step < first:
            try:  # none saved (older upstream): the continuation started from the first shard, as a fresh loader
                if approx.get("dataloader_state_dict") is not None:
                    loader.resume_upstream(approx["dataloader_state_dict"])
            except DataError as e:
                raise ReplayError(f"cannot restore the data position of step {first}: {e}") from None
            restored, usable = first, []
    if usable:
        ckpt = usable[-1]
        try:
            state = check_train_state(cm.torch_load(ckpt.train_states[rank]), rank=rank, world_size=world, step=ckpt.step)
            loader.load_state_dict(state["loader"])
        except (cm.CheckpointError, TrainStateError, DataError) as e:
            raise ReplayError(f"cannot restore the data position of step {ckpt.step}: {e}") from None
        restored = ckpt.step
    start = restored or 0
    for _ in range((step - start) * grad_accum):
        loader.next_rows()
    names = [f.name for f in train_files]
    micro = []
    for _ in range(grad_accum):
        rows = loader.next_rows()
        segs = [_segment(r, s, rows[r], tokenizer, names) for r, row_segments in enumerate(loader.last_packing)
                for s in row_segments]
        micro.append(MicroBatch(tuple(tuple(row) for row in rows), tuple(segs)))
    return StepBatch(str(run), step, rank, world, grad_accum, B, T, restored, tuple(micro))


def _segment(row: int, s: RowSegment, ids: list[int], tokenizer, names: list[str]) -> Segment:
    src = s.source
    return Segment(row, s.offset, s.length, s.doc_tokens, names[src.pq_idx] if src.pq_idx is not None else None,
                   src.rg_idx, src.row, src.epoch, tokenizer.enc.decode(ids[s.offset:s.offset + s.length]))
