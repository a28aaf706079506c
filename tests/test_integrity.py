"""Fault injection: real checkpoints (ours and upstream's) broken in many ways, each found with its code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import torchfile
from nanochat.gpt import GPT
from nanochat.model_config import GPTConfig, expected_state_shapes
from registry import integrity
from tests.modelkit import random_model, touch_payload, write_checkpoint

CFG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=48, window_pattern="SL")


@pytest.fixture
def run(tmp_path):
    """<base>/base_checkpoints/d2 with step 10: our layout, world size 2 (two optimizer shards) and a
    training state per rank, exactly like our training script writes for two processes."""
    d = tmp_path / "base" / "base_checkpoints" / "d2"
    model = random_model(CFG, seed=0)
    write_checkpoint(d, model, step=10, extra_meta={"world_size": 2, "train_state": True, "num_iterations": 50})
    cm.invalidate_step(d, 10)  # rewrite the step in the safe order, as two ranks would
    for rank in (0, 1):
        cm.save_optimizer_shard(d, 10, rank, {"state": {0: {"momentum_buffer": torch.randn(4, 4)}},
                                              "param_groups": [{"lr": 0.02, "params": [0]}]})
        cm.save_train_state(d, 10, rank, {"torch_rng": torch.get_rng_state(), "python_rng": [3, [1, 2, 3], None],
                                          "loader": {"pq_idx": 0, "rg_idx": rank, "epoch": 1}})
    meta = {"step": 10, "val_bpb": 3.0, "model_config": CFG.upstream_dict(), "user_config": {"depth": 2},
            "world_size": 2, "train_state": True, "num_iterations": 50}
    cm.write_meta(d, 10, meta)
    return d


def ckpt_of(d: Path, step: int = 10) -> cm.CheckpointFiles:
    return next(c for c in cm.list_checkpoints(d) if c.step == step)


def codes(result) -> list[str]:
    return [p.code for p in result.problems]


def both(d: Path, step: int = 10):
    ckpt = ckpt_of(d, step)
    return integrity.quick_check(ckpt), integrity.deep_check(ckpt)


def member_range(path: Path, suffix: str) -> tuple[int, int]:
    """Byte range of a zip member's stored data, read from its local header."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
    return start, start + info.compress_size


def storage_of(path: Path, key: str) -> str:
    from nanochat import torchfile
    return "data/" + torchfile.read_structure(path)[key].storage_key


def rewrite_model(d: Path, state: dict, step: int = 10) -> None:
    torch.save(state, d / f"model_{step:06d}.pt")


def edit_meta(d: Path, changes: dict, file_step: int = 10) -> None:
    path = d / f"meta_{file_step:06d}.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------- intact checkpoints


def test_intact_checkpoint_has_no_problem_and_records_hashes(run):
    quick, deep = both(run)
    assert quick.ok and deep.ok, (quick.problems, deep.problems)
    assert quick.level == "quick" and deep.level == "deep"
    names = [f.name for f in deep.files]
    assert names == ["model_000010.pt", "meta_000010.json", "optim_000010_rank0.pt", "optim_000010_rank1.pt",
                     "trainstate_000010_rank0.pt", "trainstate_000010_rank1.pt"]
    for f in deep.files:
        assert f.sha256 == hashlib.sha256((run / f.name).read_bytes()).hexdigest()
        assert f.size == (run / f.name).stat().st_size
    assert all(f.sha256 is None for f in quick.files)
    assert deep.bytes_read == sum(f.size for f in deep.files)
    assert deep.is_current() and quick.is_current()
    assert json.loads(json.dumps(deep.to_dict()))["files"][0]["name"] == "model_000010.pt"


@pytest.mark.parametrize("generation", ["classic", "current"])
def test_upstream_fixtures_are_intact(upstream_dir, generation):
    (ckpt,) = cm.list_checkpoints(upstream_dir / generation / "base_checkpoints" / "d2")
    assert integrity.quick_check(ckpt).problems == ()
    deep = integrity.deep_check(ckpt)
    assert deep.problems == ()
    assert len(deep.files) == 3 and all(len(f.sha256) == 64 for f in deep.files)


def test_single_file_layout(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    state = random_model(CFG, seed=4).state_dict()
    meta = {"step": 7, "val_bpb": 2.5, "model_config": CFG.upstream_dict(), "user_config": {}}
    torch.save({"model": state, "metadata": meta, "optimizers": [{"state": {}, "param_groups": []}]}, d / "checkpoint.pt")
    (ckpt,) = cm.list_checkpoints(d)
    assert integrity.quick_check(ckpt).ok and integrity.deep_check(ckpt).ok
    state["lm_head.weight"][3, 3] = float("inf")
    torch.save({"model": state, "metadata": meta}, d / "checkpoint.pt")
    assert codes(integrity.deep_check(ckpt)) == ["nonfinite_weights"]


def test_expected_shapes_match_the_built_module():
    for cfg in (CFG, GPTConfig.classic(sequence_len=32, vocab_size=200, n_layer=3, n_head=1, n_kv_head=1, n_embd=64),
                GPTConfig(sequence_len=64, vocab_size=100, n_layer=5, n_head=4, n_kv_head=2, n_embd=32, smear=False)):
        with torch.device("meta"):
            built = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
        assert expected_state_shapes(cfg) == built


# ---------------------------------------------------------------------- the faults


def test_truncated_model_file(run):
    data = (run / "model_000010.pt").read_bytes()
    (run / "model_000010.pt").write_bytes(data[: len(data) * 2 // 3])
    quick, deep = both(run)
    assert codes(quick) == ["truncated"] and codes(deep) == ["truncated"]
    assert not deep.loadable and deep.problems[0].file == "model_000010.pt"
    assert "central directory" in deep.problems[0].message


def test_flipped_byte_in_tensor_data_only_the_crc_notices(run):
    path = run / "model_000010.pt"
    start, end = member_range(path, storage_of(path, "transformer.h.1.mlp.c_fc.weight"))
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    loaded = torch.load(path, weights_only=True)  # torch does not verify CRCs: it loads, silently different
    assert not torch.equal(loaded["transformer.h.1.mlp.c_fc.weight"], random_model(CFG, seed=0).transformer.h[1].mlp.c_fc.weight)
    quick, deep = both(run)
    assert quick.ok  # no tensor data read: cannot see it
    assert codes(deep) == ["crc_mismatch"]
    assert "transformer.h.1.mlp.c_fc.weight" in deep.problems[0].message and deep.problems[0].blocks == "load"


def test_flipped_byte_in_an_optimizer_shard_blocks_resume_only(run):
    path = run / "optim_000010_rank1.pt"
    start, end = member_range(path, "data/0")
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    deep = integrity.deep_check(ckpt_of(run))
    assert codes(deep) == ["crc_mismatch"] and deep.loadable and not deep.resumable


def test_deleted_meta(run):
    (run / "meta_000010.json").unlink()
    quick, deep = both(run)
    assert codes(quick) == ["missing_meta"] and codes(deep) == ["missing_meta"]


def test_corrupt_meta_json(run):
    text = (run / "meta_000010.json").read_text()
    (run / "meta_000010.json").write_text(text[: len(text) // 2])
    quick, deep = both(run)
    assert codes(quick) == ["bad_meta_json"] and codes(deep) == ["bad_meta_json"]


def test_changed_meta_step(run):
    edit_meta(run, {"step": 11})
    quick, deep = both(run)
    assert codes(quick) == ["step_mismatch"] and codes(deep) == ["step_mismatch"]
    assert "meta says step 11" in quick.problems[0].message


def test_deleted_optimizer_shard_of_two(run):
    (run / "optim_000010_rank1.pt").unlink()
    quick, deep = both(run)
    assert codes(quick) == ["missing_optimizer_shard"] and codes(deep) == ["missing_optimizer_shard"]
    assert quick.loadable and not quick.resumable and "rank 1 of 2" in quick.problems[0].message


def test_deleted_train_state(run):
    (run / "trainstate_000010_rank0.pt").unlink()
    quick = integrity.quick_check(ckpt_of(run))
    assert codes(quick) == ["missing_train_state"] and quick.loadable


def test_missing_model_file(run):
    (run / "model_000010.pt").unlink()
    quick, deep = both(run)
    assert codes(quick) == ["missing_model"] and "missing_model" in codes(deep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_written_into_a_weight(run, dtype, value):
    state = random_model(CFG, seed=0).state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"].to(dtype)
    state["transformer.wte.weight"][17, 5] = value
    rewrite_model(run, state)
    quick, deep = both(run)
    assert quick.ok
    assert codes(deep) == ["nonfinite_weights"]
    assert "1 NaN/Inf value(s) in transformer.wte.weight" in deep.problems[0].message


def test_nan_in_optimizer_state(run):
    cm.save_optimizer_shard(run, 10, 0, {"state": {0: {"momentum_buffer": torch.full((3,), float("nan"))}},
                                         "param_groups": []})
    deep = integrity.deep_check(ckpt_of(run))
    assert codes(deep) == ["nonfinite_optimizer_state"] and deep.loadable


def test_changed_tensor_shape(run):
    state = random_model(CFG, seed=0).state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.randn(4 * 48 + 8, 48)
    rewrite_model(run, state)
    quick, deep = both(run)
    assert codes(quick) == ["shape_mismatch"] and codes(deep) == ["shape_mismatch"]
    assert "transformer.h.0.mlp.c_fc.weight has shape [200, 48] but model_config implies [192, 48]" in quick.problems[0].message


def test_unexpected_and_missing_keys(run):
    state = random_model(CFG, seed=0).state_dict()
    state["transformer.h.0.attn.c_q.bias"] = torch.zeros(48)
    rewrite_model(run, state)
    quick, deep = both(run)
    assert codes(quick) == ["unexpected_keys"] and codes(deep) == ["unexpected_keys"]
    assert "transformer.h.0.attn.c_q.bias" in quick.problems[0].message
    del state["transformer.h.0.attn.c_q.bias"], state["transformer.h.1.mlp.c_proj.weight"]
    rewrite_model(run, state)
    assert codes(integrity.quick_check(ckpt_of(run))) == ["missing_keys"]


def test_meta_config_that_describes_no_model(run):
    mc = CFG.upstream_dict()
    mc["n_head"] = 5  # 48 channels do not split into 5 heads
    edit_meta(run, {"model_config": mc})
    assert codes(integrity.quick_check(ckpt_of(run))) == ["bad_model_config"]


def test_empty_state_dict(run):
    rewrite_model(run, {})
    quick, deep = both(run)
    assert codes(quick) == ["empty_state_dict"] and codes(deep) == ["empty_state_dict"]



@pytest.mark.parametrize("target", ["model_000010.pt", "optim_000010_rank0.pt", "trainstate_000010_rank1.pt"])
def test_pickle_that_would_run_code_is_reported_never_run(run, tmp_path, target):
    marker = tmp_path / "pwned"
    torch.save({"lm_head.weight": touch_payload(marker)}, run / target)
    quick, deep = both(run)
    assert "unsafe_pickle" in codes(deep) and not marker.exists()
    problem = next(p for p in deep.problems if p.code == "unsafe_pickle")
    assert problem.file == target and "system" in problem.message and "not executed" in problem.message
    assert problem.blocks == ("load" if target.startswith("model") else "resume")
    if target.startswith("model"):
        assert codes(quick) == ["unsafe_pickle"]
    # Control, without ever unpickling the file: the file does reference os.system, and the same
    # payload unpickled from memory does create the marker, so the assertions above could have failed.
    assert ("posix", "system") in torchfile.pickle_globals(torchfile.read_pickle_bytes(run / target))
    pickle.loads(pickle.dumps(touch_payload(marker)))
    assert marker.exists()


def test_file_modified_after_its_hash_was_recorded(run):
    first = integrity.deep_check(ckpt_of(run))
    recorded = {f.name: f.sha256 for f in first.files}
    assert integrity.deep_check(ckpt_of(run), previous=recorded).ok
    rewrite_model(run, random_model(CFG, seed=99).state_dict())  # a valid file, just not the one indexed
    assert integrity.quick_check(ckpt_of(run)).ok and not first.is_current()
    deep = integrity.deep_check(ckpt_of(run), previous=recorded)
    assert codes(deep) == ["changed_since_indexed"]
    assert deep.problems[0].file == "model_000010.pt" and recorded["model_000010.pt"][:12] in deep.problems[0].message


# ---------------------------------------------------------------------- upstream fixtures, broken


def test_upstream_current_broken_three_ways(upstream_copy):
    d = upstream_copy("current") / "base_checkpoints" / "d2"
    optim = d / "optim_000300_rank0.pt"
    data = bytearray(optim.read_bytes())
    start, end = member_range(optim, "data/3")
    data[start + 1] ^= 0x01
    optim.write_bytes(bytes(data))
    deep = integrity.deep_check(ckpt_of(d, 300))
    assert codes(deep) == ["crc_mismatch"] and deep.loadable
    model = d / "model_000300.pt"
    model.write_bytes(model.read_bytes()[:-100])
    assert codes(integrity.quick_check(ckpt_of(d, 300))) == ["truncated"]
    (d / "meta_000300.json").write_text("{not json")
    assert codes(integrity.quick_check(ckpt_of(d, 300))) == ["truncated", "bad_meta_json"]


def test_upstream_classic_nan_and_shape(upstream_copy):
    d = upstream_copy("classic") / "base_checkpoints" / "d2"
    state = torch.load(d / "model_000300.pt", weights_only=True)
    state["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, d / "model_000300.pt")
    assert codes(integrity.deep_check(ckpt_of(d, 300))) == ["nonfinite_weights"]
    state["lm_head.weight"] = state["lm_head.weight"][:, :64]
    torch.save(state, d / "model_000300.pt")
    assert codes(integrity.quick_check(ckpt_of(d, 300))) == ["shape_mismatch"]


# ---------------------------------------------------------------------- the streaming pass itself


@pytest.mark.parametrize("chunk", [7, 1001, 4096])
def test_streaming_pass_is_chunk_size_independent(run, monkeypatch, chunk):
    """Tiny odd chunks split elements and zip members across reads: the CRCs must still match and a
    NaN straddling a chunk boundary must still be found, with exactly one value counted."""
    state = random_model(CFG, seed=0).state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].bfloat16()
    state["lm_head.weight"].view(-1)[1000] = float("nan")
    rewrite_model(run, state)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", chunk)
    seen = []
    path = run / "model_000010.pt"
    sha, n, problems = integrity.scan_file(path, "model", progress=seen.append)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and n == sum(seen) == path.stat().st_size
    assert max(seen) <= chunk
    assert [(p.code, p.message) for p in problems] == [
        ("nonfinite_weights", "model_000010.pt: 1 NaN/Inf value(s) in lm_head.weight")]


def test_problem_codes_are_documented():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- section: integrity -->")[1].split("<!-- end section: integrity -->")[0]
    for code in integrity.PROBLEM_CODES:
        assert f"`{code}`" in section, code


def test_silent_change_with_same_size_and_mtime_is_named_as_such(run):
    first = integrity.deep_check(ckpt_of(run))
    recorded = {f.name: f for f in first.files}
    path = run / "optim_000010_rank0.pt"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # the first local header's modification time: no CRC covers it, only the hash sees it
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert first.is_current()  # a stat cannot tell
    deep = integrity.deep_check(ckpt_of(run), previous=recorded)
    assert codes(deep) == ["changed_since_indexed"] and deep.problems[0].blocks == "resume"
    assert "same size and mtime, different bytes" in deep.problems[0].message


def test_single_file_checkpoint_that_would_run_code(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": touch_payload(marker)}, "metadata": {"step": 1}}, d / "checkpoint.pt")
    (ckpt,) = cm.list_checkpoints(d)
    quick, deep = integrity.quick_check(ckpt), integrity.deep_check(ckpt)
    assert codes(quick) == ["unsafe_pickle"] and codes(deep) == ["unsafe_pickle"] and not marker.exists()
    torch.save({"model": {}, "metadata": "not a dict"}, d / "checkpoint.pt")
    assert codes(integrity.quick_check(ckpt)) == ["missing_meta"]
