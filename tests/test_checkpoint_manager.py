"""Checkpoint discovery, safe loading, atomic saving, and one clear error per bad input."""

import json
import os
import pickle
import shutil

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPTConfig
from tests.modelkit import RunsCode, random_model, tiny_tokenizer, write_checkpoint

CFG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=48, window_pattern="SL")


@pytest.fixture
def run_dir(tmp_path):
    """<base>/base_checkpoints/d2 with steps 10 and 20 and the tokenizer in <base>/tokenizer."""
    d = tmp_path / "base" / "base_checkpoints" / "d2"
    model = random_model(CFG, seed=0)
    write_checkpoint(d, model, step=10, tokenizer=tiny_tokenizer(300))
    write_checkpoint(d, random_model(CFG, seed=1), step=20)
    return d


def test_upstream_fixtures_discovered_as_complete(upstream_dir):
    for gen, optim in (("classic", "optim_000300.pt"), ("current", "optim_000300_rank0.pt")):
        run = upstream_dir / gen / "base_checkpoints" / "d2"
        (ckpt,) = cm.list_checkpoints(run)
        assert ckpt.step == 300 and ckpt.layout == "upstream"
        assert ckpt.optimizer_shards[0].name == optim
        assert cm.quick_problems(ckpt) == []
        assert cm.phase_and_tag(run) == ("base", "d2")
        assert cm.find_tokenizer_dir(run) == (upstream_dir / gen / "tokenizer").resolve()
        meta = cm.read_meta(ckpt)
        assert meta["step"] == 300 and meta["model_config"]["n_layer"] == 2
        shapes = cm.state_dict_shapes(ckpt)
        assert shapes["lm_head.weight"].shape == (2048, 64 if gen == "current" else 128)


def test_load_model_from_dir_file_and_base_dir(run_dir):
    by_dir = cm.load_model(run_dir)
    assert by_dir.checkpoint.step == 20 and by_dir.phase == "base" and by_dir.tag == "d2"
    assert cm.load_model(run_dir / "model_000010.pt").checkpoint.step == 10
    assert cm.load_model(run_dir, step=10).checkpoint.step == 10
    assert cm.load_model(run_dir.parent.parent).checkpoint.step == 20  # a base dir with one run
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(by_dir.model(ids), random_model(CFG, seed=1)(ids))


def test_orig_mod_prefix_and_bf16_embeddings_load(tmp_path):
    model = random_model(CFG, seed=3)
    d = tmp_path / "b" / "base_checkpoints" / "x"
    write_checkpoint(d, model, step=1, tokenizer=tiny_tokenizer(300))
    state = {f"_orig_mod.{k}": (v.bfloat16() if "wte" in k else v) for k, v in model.state_dict().items()}
    cm.save_model(d, 1, state)
    torch.save(state, d / "model_000001.pt")  # really keep the prefix on disk
    loaded = cm.load_model(d)
    assert loaded.model.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(loaded.model.transformer.wte.weight, model.transformer.wte.weight.bfloat16().float())


def test_single_file_layout(tmp_path):
    model = random_model(CFG, seed=4)
    d = tmp_path / "single"
    d.mkdir()
    meta = {"step": 7, "val_bpb": 2.5, "model_config": CFG.upstream_dict(), "user_config": {}}
    torch.save({"model": model.state_dict(), "metadata": meta, "optimizers": [{"state": {}, "param_groups": []}]},
               d / "checkpoint.pt")
    tiny_tokenizer(300).save(d / "tokenizer")
    (ckpt,) = cm.list_checkpoints(d)
    assert ckpt.layout == "single_file" and ckpt.step == 7
    assert cm.read_meta(ckpt)["val_bpb"] == 2.5
    assert cm.quick_problems(ckpt) == []
    loaded = cm.load_model(d / "checkpoint.pt")
    assert loaded.meta["step"] == 7


def test_save_is_atomic_and_meta_marks_completion(run_dir, monkeypatch):
    """A crash in the middle of writing leaves no partial file under the real name and no new meta."""
    model = random_model(CFG, seed=5)

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash during write")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(run_dir, 30, model.state_dict(), {"step": 30, "model_config": CFG.upstream_dict()})
    monkeypatch.undo()
    assert not (run_dir / "model_000030.pt").exists()
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert cm.find_last_complete(run_dir).step == 20


def test_last_complete_step_skips_truncated_and_metaless(run_dir):
    model = random_model(CFG, seed=6)
    write_checkpoint(run_dir, model, step=30)
    write_checkpoint(run_dir, model, step=40)
    data = (run_dir / "model_000040.pt").read_bytes()
    (run_dir / "model_000040.pt").write_bytes(data[: len(data) // 2])  # truncated
    (run_dir / "meta_000030.json").unlink()  # crashed before the meta
    assert cm.find_last_complete(run_dir).step == 20
    problems = {c.step: [p.code for p in cm.quick_problems(c)] for c in cm.list_checkpoints(run_dir)}
    assert problems == {10: [], 20: [], 30: ["missing_meta"], 40: ["truncated"]}
    with pytest.raises(cm.IncompleteCheckpointError, match="no complete checkpoint|not usable") as e:
        cm.load_model(run_dir, step=40)
    assert e.value.code == "truncated"


def test_resumable_requires_every_optimizer_shard(run_dir):
    meta = json.loads((run_dir / "meta_000020.json").read_text())
    meta["world_size"] = 2
    (run_dir / "meta_000020.json").write_text(json.dumps(meta))
    ckpt = cm.list_checkpoints(run_dir)[-1]
    assert [(p.code, p.blocks) for p in cm.quick_problems(ckpt)] == [("missing_optimizer_shard", "resume")]
    assert cm.find_last_complete(run_dir).step == 20
    assert cm.find_last_complete(run_dir, resumable=True).step == 10



@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_malicious_checkpoint_never_runs(run_dir, tmp_path, how):
    marker = tmp_path / "pwned"
    payload = RunsCode(os.system, f"touch {marker}") if how == "os.system" else \
        RunsCode(exec, f"open({str(marker)!r}, 'w').write('x')")
    torch.save({"lm_head.weight": payload}, run_dir / "model_000020.pt")
    with pytest.raises(cm.UnsafeCheckpointError, match="references code, not just tensors: .* the file is refused"):
        cm.load_model(run_dir)
    with pytest.raises(cm.CheckpointError) as e:  # the metadata reader refuses too, without torch
        cm.state_dict_shapes(cm.list_checkpoints(run_dir)[-1])
    assert e.value.code == "unsafe_pickle"
    assert not marker.exists()
    # a raw pickle (not even a zip) is refused as well
    (run_dir / "model_000020.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(cm.CheckpointError):
        cm.load_model(run_dir, step=20)
    assert not marker.exists()


def test_unknown_architecture_keys(run_dir):
    state = random_model(CFG).state_dict()
    state["transformer.h.0.attn.rotary_scale"] = torch.ones(3)
    cm.save_model(run_dir, 20, state)
    with pytest.raises(cm.CheckpointMismatchError, match="unknown state-dict keys.*rotary_scale") as e:
        cm.load_model(run_dir)
    assert e.value.code == "unexpected_keys"


def test_shape_mismatch_with_meta(run_dir):
    meta = json.loads((run_dir / "meta_000020.json").read_text())
    meta["model_config"]["n_embd"] = 64
    (run_dir / "meta_000020.json").write_text(json.dumps(meta))
    with pytest.raises(cm.CheckpointMismatchError, match=r"has shape \[.*\] but model_config implies") as e:
        cm.load_model(run_dir)
    assert e.value.code == "shape_mismatch"


def test_extra_layer_in_state_dict(run_dir):
    meta = json.loads((run_dir / "meta_000020.json").read_text())
    meta["model_config"]["n_layer"] = 1
    (run_dir / "meta_000020.json").write_text(json.dumps(meta))
    with pytest.raises(cm.CheckpointMismatchError, match="does not explain"):
        cm.load_model(run_dir)


def test_vocab_mismatch_between_tokenizer_and_model(run_dir):
    shutil.rmtree(run_dir.parent.parent / "tokenizer")
    tiny_tokenizer(320).save(run_dir.parent.parent / "tokenizer")
    with pytest.raises(cm.CheckpointMismatchError, match="tokenizer has 320 tokens but the model expects 300") as e:
        cm.load_model(run_dir)
    assert e.value.code == "vocab_mismatch"


def test_missing_files_and_empty_dirs(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    with pytest.raises(cm.CheckpointNotFoundError, match="does not exist"):
        cm.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cm.CheckpointNotFoundError, match="no checkpoints in"):
        cm.load_model(tmp_path / "empty")
    with pytest.raises(cm.CheckpointNotFoundError, match="no step 15 .*steps there: 10, 20"):
        cm.load_model(run_dir, step=15)
    shutil.rmtree(run_dir.parent.parent / "tokenizer")
    with pytest.raises(cm.CheckpointNotFoundError, match="no tokenizer found") as e:
        cm.load_model(run_dir)
    assert e.value.code == "missing_tokenizer"
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(cm.CheckpointNotFoundError, match="not a checkpoint file"):
        cm.load_model(tmp_path / "notes.txt")


def test_tokenizer_found_through_base_dir_env(run_dir, tmp_path, monkeypatch):
    alone = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, alone)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run_dir.parent.parent))
    assert cm.load_model(alone).tokenizer.get_vocab_size() == 300


def test_bad_meta_json_and_step_mismatch(run_dir):
    (run_dir / "meta_000020.json").write_text("{oops")
    (run_dir / "meta_000010.json").write_text(json.dumps({"step": 11, "model_config": CFG.upstream_dict()}))
    codes = {c.step: [p.code for p in cm.quick_problems(c)] for c in cm.list_checkpoints(run_dir)}
    assert codes == {10: ["step_mismatch"], 20: ["bad_meta_json"]}
    with pytest.raises(cm.IncompleteCheckpointError, match="no complete checkpoint"):
        cm.load_model(run_dir)


def test_multiple_runs_under_a_base_dir_must_be_named(run_dir):
    write_checkpoint(run_dir.parent / "d4", random_model(CFG), step=5)
    with pytest.raises(cm.CheckpointNotFoundError, match="holds 2 runs"):
        cm.load_model(run_dir.parent.parent)


def test_our_meta_keeps_upstream_keys_and_types(upstream_dir, run_dir):
    ours = json.loads((run_dir / "meta_000020.json").read_text())
    upstream = json.loads((upstream_dir / "classic" / "base_checkpoints" / "d2" / "meta_000300.json").read_text())
    for k, v in upstream.items():
        assert k in ours and type(ours[k]) is type(v), k
    assert set(ours["model_config"]) == set(CFG.upstream_dict())  # upstream's GPTConfig(**model_config) accepts it


def test_single_file_with_unreadable_pickle_is_not_complete(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    torch.save({"model": {"w": RunsCode(os.system, f"touch {tmp_path / 'pwned'}")}, "metadata": {"step": 1}},
               d / "checkpoint.pt")
    (ckpt,) = cm.list_checkpoints(d)
    assert [p.code for p in cm.quick_problems(ckpt)] == ["unsafe_pickle"]
    torch.save(["not", "a", "dict"], d / "checkpoint.pt")
    assert [p.code for p in cm.quick_problems(cm.list_checkpoints(d)[0])] == ["missing_meta"]
    (d / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert [p.code for p in cm.quick_problems(cm.list_checkpoints(d)[0])] == ["truncated"]
    assert not (tmp_path / "pwned").exists()


def test_temp_files_of_killed_saves_are_cleaned_before_the_next_save(run_dir):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().split(".")[0].replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run_dir / f".model_000030.pt.tmp-{host}.{int(dead.stdout)}"
    live = run_dir / f".optim_000030_rank1.pt.tmp-{host}.{os.getpid()}"  # a save in progress (this process)
    other_host = run_dir / f".optim_000030_rank9.pt.tmp-otherhost.{int(dead.stdout)}"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    cm.save_checkpoint(run_dir, 30, random_model(CFG).state_dict(), {"step": 30, "model_config": CFG.upstream_dict()})
    assert not stale.exists() and live.exists() and other_host.exists()
    assert [c.step for c in cm.list_checkpoints(run_dir)] == [10, 20, 30]
