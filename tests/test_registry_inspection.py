"""The scanner's inspection, checkpoint discovery and the integrity check's quick level run one quick
check (nanochat.quick_check) and agree on intact, broken and hostile checkpoints, and never run a
pickle's code."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import torch

from nanochat import checkpoint_manager as cm
from nanochat import torchfile
from registry import integrity
from registry.inspection import file_kind, inspect_checkpoint
from registry.scanner import group_slots, list_run_dir
from tests.modelkit import touch_payload
from tests.registry_kit import make_checkpoint, tiny_model
from tests.test_torchfile import MEMO_HIDDEN, rewrite_pickle


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
    elif how == "memo_hidden_global":
        rewrite_pickle(m, MEMO_HIDDEN)
    elif how == "unsafe_optimizer":  # the quick check reads only the model's pickle: the deep check finds this
        rewrite_pickle(run / f"optim_{step:06d}_rank0.pt", pickle.dumps(touch_payload(run / "PWNED"), protocol=2))
    elif how == "garbage_pickle":
        rewrite_pickle(m, b"\x80\x02garbage that is no pickle")
    elif how == "not_a_state_dict":
        torch.save([1, 2, 3], m)
    elif how == "empty_state_dict":
        torch.save({}, m)
    elif how == "wrong_shapes":
        d = json.loads(meta.read_text())
        meta.write_text(json.dumps({**d, "model_config": {**d["model_config"], "vocab_size": 999}}))
    elif how == "flipped_pickle_bit":
        with torchfile.Archive(m) as a:
            at = a.data_start(a.pickle) + 5
        data = bytearray(m.read_bytes())
        data[at] ^= 1
        m.write_bytes(bytes(data))


# how -> the codes the quick check finds
BREAKS = {
    "intact": [], "truncate_model": ["truncated"], "empty_model": ["empty_file"], "no_meta": ["missing_meta"],
    "bad_json": ["bad_meta_json"], "json_list": ["bad_meta_json"], "no_model_config": ["bad_meta"],
    "step_mismatch": ["step_mismatch"], "world_2": ["missing_optimizer_shard"], "no_optimizer": ["missing_optimizer_shard"],
    "truncated_optimizer": ["truncated"], "train_state_claimed": ["missing_train_state"], "no_model": ["missing_model"],
    "unsafe_model": ["unsafe_pickle"], "memo_hidden_global": ["unsafe_pickle"], "unsafe_optimizer": [],
    "garbage_pickle": ["bad_pickle"], "not_a_state_dict": ["bad_state_dict"], "empty_state_dict": ["empty_state_dict"],
    "wrong_shapes": ["shape_mismatch"], "flipped_pickle_bit": ["truncated"],
}


def test_one_quick_check_for_scanner_discovery_and_integrity(tmp_path, upstream_copy):
    """Every caller of the quick check gets the same problems: the scanner (inspection, handed the meta
    it parsed), checkpoint discovery (cm.quick_problems) and the integrity check's quick level."""
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
            ref = cm.quick_problems(by_step[step])
            assert ins.problems == [vars(p) for p in ref], (d.name, step)
            assert [p.code for p in integrity.quick_check(by_step[step]).problems] == [p.code for p in ref], (d.name, step)
            if d == run:
                assert [p.code for p in ref] == BREAKS[list(BREAKS)[step // 10 - 1]], (step, ref)
            try:  # the world size the inspection works out is the reference's, too
                meta = json.loads(by_step[step].meta.read_text())
            except (AttributeError, OSError, ValueError):
                meta = None
            world = cm.expected_world_size(by_step[step], meta if isinstance(meta, dict) else None)
            assert ins.world_size(d) == (world if world > 0 else None), (d.name, step)
    slots = group_slots(list_run_dir(run)[0])[0]
    intact = inspect_checkpoint(slots[("upstream", 10)], run)
    assert intact.problems == [] and intact.complete and intact.resumable
    memo = inspect_checkpoint(slots[("upstream", 10 * (list(BREAKS).index("memo_hidden_global") + 1))], run)
    assert "posix.system" in memo.problems[0]["message"] and not memo.complete
    assert not (run / "PWNED").exists()


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
             "model_x.pt", "meta_000300.json.bak", "optim_000300_rank.pt", "trainstate_000010.pt", "tokenizer.json",
             f"model_{2 ** 31}.pt", f"model_{2 ** 31 - 1}.pt", "model_99999999999999999999.pt", "optim_000300_rank65536.pt"]
    for name in names:
        ref = cm.classify_name(name)
        assert file_kind(name) == ref, name
    assert file_kind(f"model_{2 ** 31 - 1}.pt") == ("model", 2 ** 31 - 1, None)
    assert file_kind(f"model_{2 ** 31}.pt") == file_kind("optim_000300_rank65536.pt") == ("out_of_range", None, None)
