"""The scanner's fast path agrees with the reference implementation (nanochat.torchfile and
checkpoint_manager.quick_problems) on intact and broken archives and checkpoints, and never runs a
pickle's code."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import torchfile
from registry import archive, inspection
from registry.inspection import file_kind, inspect_checkpoint
from registry.scanner import group_slots, list_run_dir
from tests.modelkit import touch_payload
from tests.registry_kit import make_checkpoint, tiny_model


def rewrite_pickle(path: Path, data: bytes) -> None:
    """Replace the data.pkl member of a torch.save archive, keeping everything else."""
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, content in members:
            z.writestr(info, data if info.filename.endswith("/data.pkl") else content)


def flat_shapes(tree, prefix: str = "") -> dict[str, tuple]:
    """archive.read_tree's tensors (tuples of ints) by dotted key, as torchfile.tensor_shapes lists them."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, tuple) and all(isinstance(x, int) for x in v):
            out[key] = v
        elif isinstance(v, (dict, list, tuple)):
            out.update(flat_shapes(v, key + "."))
    return out


@pytest.fixture
def archives(tmp_path, upstream_dir):
    """name -> path of intact and broken torch.save files."""
    out = {}
    for gen in ("classic", "current"):
        for p in (upstream_dir / gen / "base_checkpoints" / "d2").glob("*.pt"):
            out[f"{gen}/{p.name}"] = p
    torch.save(tiny_model().state_dict(), tmp_path / "state.pt")
    out["state"] = tmp_path / "state.pt"
    torch.save({"model": tiny_model().state_dict(), "metadata": {"step": 3, "model_config": {}}}, tmp_path / "single.pt")
    out["single"] = tmp_path / "single.pt"
    big = tmp_path / "deflated.pt"  # re-zipped with compression
    with zipfile.ZipFile(tmp_path / "state.pt") as src, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), zipfile.ZIP_DEFLATED)
    out["deflated"] = big
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    out["truncated"] = tmp_path / "truncated.pt"
    (tmp_path / "empty.pt").write_bytes(b"")
    out["empty"] = tmp_path / "empty.pt"
    (tmp_path / "text.pt").write_text("not a zip file at all" * 10)
    out["text"] = tmp_path / "text.pt"
    with zipfile.ZipFile(tmp_path / "plain.zip.pt", "w") as z:
        z.writestr("readme.txt", "a zip, not torch.save")
    out["plain zip"] = tmp_path / "plain.zip.pt"
    shutil.copy(tmp_path / "state.pt", tmp_path / "evil.pt")
    rewrite_pickle(tmp_path / "evil.pt", pickle.dumps(touch_payload(tmp_path / "PWNED"), protocol=2))
    out["evil"] = tmp_path / "evil.pt"
    shutil.copy(tmp_path / "state.pt", tmp_path / "garbage.pt")
    rewrite_pickle(tmp_path / "garbage.pt", b"\x80\x02garbage that is no pickle")
    out["garbage"] = tmp_path / "garbage.pt"
    return out


def test_archive_reader_agrees_with_torchfile(archives, tmp_path):
    for name, path in archives.items():
        try:
            zf, _ = torchfile.open_archive(path)
            zf.close()
            ref_ok = True
        except torchfile.TorchFileError:
            ref_ok = False
        try:
            archive.check_archive(path)
            fast_ok = True
        except archive.ArchiveError:
            fast_ok = False
        assert fast_ok == ref_ok, name
        try:
            ref_tree = torchfile.read_structure(path)
        except torchfile.TorchFileError:
            ref_tree = None
        try:
            tree = archive.read_tree(path)
        except archive.ArchiveError:
            tree = None
        assert (tree is None) == (ref_tree is None), name
        if tree is not None:  # the same tensors (shapes) at the same places of the tree
            ref_shapes = {k: v.shape for k, v in torchfile.tensor_shapes(ref_tree).items()}
            assert ref_shapes and flat_shapes(tree) == ref_shapes, name
    assert not (tmp_path / "PWNED").exists()  # neither reader ran the pickle's code
    with pytest.raises(archive.ArchiveError, match="posix.system|os.system|allow-list"):
        archive.read_tree(archives["evil"])
    assert archive.read_tree(archives["single"])["metadata"] == {"step": 3, "model_config": {}}


def _break(run: Path, step: int, how: str) -> None:
    m = run / f"model_{step:06d}.pt"
    meta = run / f"meta_{step:06d}.json"
    if how == "truncate_model":
        m.write_bytes(m.read_bytes()[:100])
    elif how == "empty_model":
        m.write_bytes(b"")
    elif how == "no_meta":
        meta.unlink()
    elif how == "bad_json":
        meta.write_text("{oops")
    elif how == "json_list":
        meta.write_text("[1, 2]")
    elif how == "no_model_config":
        d = json.loads(meta.read_text())
        del d["model_config"]
        meta.write_text(json.dumps(d))
    elif how == "step_mismatch":
        d = json.loads(meta.read_text())
        meta.write_text(json.dumps({**d, "step": step + 1}))
    elif how == "world_2":
        d = json.loads(meta.read_text())
        meta.write_text(json.dumps({**d, "world_size": 2}))
    elif how == "no_optimizer":
        (run / f"optim_{step:06d}_rank0.pt").unlink()
    elif how == "truncated_optimizer":
        (run / f"optim_{step:06d}_rank0.pt").write_bytes(b"PK\x03\x04")
    elif how == "train_state_claimed":
        d = json.loads(meta.read_text())
        meta.write_text(json.dumps({**d, "train_state": True}))
    elif how == "no_model":
        m.unlink()
    elif how == "unsafe_model":
        rewrite_pickle(m, pickle.dumps(touch_payload(run / "PWNED"), protocol=2))


BREAKS = ["intact", "truncate_model", "empty_model", "no_meta", "bad_json", "json_list", "no_model_config",
          "step_mismatch", "world_2", "no_optimizer", "truncated_optimizer", "train_state_claimed", "no_model", "unsafe_model"]


def test_inspection_agrees_with_quick_problems(tmp_path, upstream_copy):
    run = tmp_path / "base_checkpoints" / "d1"
    for i, how in enumerate(BREAKS):
        make_checkpoint(run, 10 * (i + 1))
        _break(run, 10 * (i + 1), how)
    for gen in ("classic", "current"):  # and the real upstream files
        shutil.copytree(upstream_copy(gen) / "base_checkpoints" / "d2", tmp_path / gen)
    for d in (run, tmp_path / "classic", tmp_path / "current"):
        slots, _ = group_slots(list_run_dir(d)[0])
        by_step = {c.step: c for c in cm.list_checkpoints(d)}
        for (_layout, step), slot in slots.items():
            ins = inspect_checkpoint(slot, d)
            expected = [p.code for p in cm.quick_problems(by_step[step])]
            assert [p["code"] for p in ins.problems] == expected, (d.name, step)
            try:  # the world size the fast path works out is the reference's, too
                meta = json.loads(by_step[step].meta.read_text())
            except (AttributeError, OSError, ValueError):
                meta = None
            world = cm.expected_world_size(by_step[step], meta if isinstance(meta, dict) else None)
            assert ins.world_size(d) == (world if world > 0 else None), (d.name, step)
    intact = inspect_checkpoint(group_slots(list_run_dir(run)[0])[0][("upstream", 10)], run)
    assert intact.problems == [] and intact.complete and intact.resumable
    assert not (run / "PWNED").exists()


def test_expected_world_size_without_checkpoint_files(tmp_path):
    shards = {0: "optim_000010_rank0.pt", 1: "optim_000010_rank1.pt", 3: "optim_000010_rank3.pt"}
    ckpt = cm.CheckpointFiles(directory=tmp_path, step=10, layout="upstream",
                              optimizer_shards={r: tmp_path / n for r, n in shards.items()})
    for meta in ({}, {"world_size": 2}, {"world_size": 0}, {"world_size": -1}, {"world_size": "2"}, {"world_size": True},
                 {"world_size": 2.0}, {"world_size": None}):
        assert inspection._expected_world(meta, shards) == cm.expected_world_size(ckpt, meta), meta
    assert inspection._expected_world({}, {}) == cm.expected_world_size(cm.CheckpointFiles(tmp_path, 10, "upstream"), {})


def test_single_file_inspection(tmp_path):
    d = tmp_path / "guide"
    d.mkdir()
    meta = {"step": 5, "val_bpb": 2.0, "model_config": tiny_model().config.upstream_dict()}
    cases = {
        "ok": ({"model": tiny_model().state_dict(), "metadata": meta}, []),
        "no_model": ({"metadata": meta}, ["bad_state_dict"]),
        "empty_model": ({"model": {}, "metadata": meta}, ["empty_state_dict"]),
        "no_metadata": ({"model": tiny_model().state_dict()}, ["missing_meta"]),
        "meta_without_step": ({"model": tiny_model().state_dict(), "metadata": {"model_config": {}}}, ["bad_meta"]),
    }
    for name, (obj, codes) in cases.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        (d / "checkpoint.pt").write_bytes(buf.getvalue())
        [slot] = group_slots(list_run_dir(d)[0])[0].values()
        ins = inspect_checkpoint(slot, d)
        assert [p["code"] for p in ins.problems] == codes, name
        assert ins.step == (5 if name in ("ok", "no_model", "empty_model") else -1), name


def test_file_names_classified_like_checkpoint_manager():
    names = ["model_000300.pt", "model_1.pt", "meta_000300.json", "optim_000300.pt", "optim_000300_rank3.pt",
             "trainstate_000010_rank0.pt", "checkpoint.pt", "metrics.jsonl", "model_000300.pt.tmp", ".model_000300.pt.tmp-7",
             "model_x.pt", "meta_000300.json.bak", "optim_000300_rank.pt", "trainstate_000010.pt", "tokenizer.json"]
    for name in names:
        ref = None
        for kind, rx in (("model", cm.MODEL_RE), ("meta", cm.META_RE), ("optimizer", cm.OPTIM_RE),
                         ("train_state", cm.TRAIN_STATE_RE)):
            if m := rx.match(name):
                groups = [int(g) if g is not None else None for g in m.groups()]
                rank = (groups[1] or 0) if kind == "optimizer" else groups[1] if kind == "train_state" else None
                ref = (kind, groups[0], rank)
        if name == cm.SINGLE_FILE:
            ref = ("single_file", None, None)
        assert file_kind(name) == ref, name
