"""The training pieces in process: the resumable loader, the sharded optimizer (also under gloo with 2
processes), RNG capture, bits per byte, retention and the command-line plumbing of base_train."""

from __future__ import annotations

import io
import json
import os
import random
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import checkpoint_manager as cm
from nanochat.common import DEFAULT_BASE_DIR
from nanochat.dataloader import BosBestFitLoader, DataError, DocumentStream, find_data_dir, list_parquet_files, split_files
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_config import current_config
from nanochat.optim import LearningRates, MuonAdamW, OptimizerStateError, assign_owners, param_groups_for
from nanochat.tokenizer import Tokenizer
from nanochat.train_config import BASE_TRAIN, compile_decision, launch_env, resume_command, run_shape
from nanochat.train_state import capture_rng, restore_rng
from scripts import base_train
from tests.modelkit import random_model, write_checkpoint, write_training_base

CFG = current_config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=32, vocab_size=512, window_pattern="SL")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_training_base(tmp_path_factory.mktemp("trainbase"))


@pytest.fixture(scope="module")
def tokenizer(base):
    return Tokenizer.from_directory(base / "tokenizer")


def train_files(base):
    return split_files(list_parquet_files(find_data_dir(base)), "train")


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------- data loader


def test_loader_rows_start_with_bos_and_targets_shift_inputs(base, tokenizer):
    loader = BosBestFitLoader(train_files(base), tokenizer, batch_size=4, seq_len=48)
    bos = tokenizer.get_bos_token_id()
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 48) and x.dtype == torch.long
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x < tokenizer.get_vocab_size()).all() and (x >= 0).all()


def test_loader_state_restores_exactly_the_next_batches(base, tokenizer):
    files = train_files(base)
    a = BosBestFitLoader(files, tokenizer, batch_size=16, seq_len=48, buffer_size=64)
    for _ in range(7):
        a.next_batch()
    state = roundtrip(a.state_dict())  # weights_only: the state is plain tensors and numbers
    expected = [a.next_batch() for _ in range(40)]  # crosses row groups, shards and an epoch boundary
    assert a.stream.epoch >= 2
    b = BosBestFitLoader(files, tokenizer, batch_size=16, seq_len=48, buffer_size=64)
    b.load_state_dict(state)
    for xa, ya in expected:
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_upstream_state_names_the_last_row_group(base, tokenizer):
    loader = BosBestFitLoader(train_files(base), tokenizer, batch_size=2, seq_len=32, rank=1, world_size=2,
                              buffer_size=8)
    loader.next_batch()
    st = loader.upstream_state()
    assert set(st) == {"epoch", "pq_idx", "rg_idx"} and st["rg_idx"] % 2 == 1 and st["epoch"] == 1


def test_ranks_read_disjoint_row_groups(base):
    files = train_files(base)
    seen = {0: [], 1: []}
    for rank in (0, 1):
        s = DocumentStream(files, rank, 2)
        for _ in range(3):
            s.next_texts()
            seen[rank].append((s.last["pq_idx"], s.last["rg_idx"]))
    assert not set(seen[0]) & set(seen[1])
    assert all(rg % 2 == 0 for _, rg in seen[0]) and all(rg % 2 == 1 for _, rg in seen[1])


def test_too_few_row_groups_for_the_ranks_is_a_clear_error(base):
    val = split_files(list_parquet_files(find_data_dir(base)), "val")
    with pytest.raises(DataError, match="gets no data"):
        DocumentStream(val, rank=5, world_size=6)


def test_missing_data_and_single_shard_are_clear_errors(tmp_path, base):
    with pytest.raises(DataError, match="no parquet shards"):
        find_data_dir(tmp_path)
    with pytest.raises(DataError, match="at least 2"):
        split_files(list_parquet_files(find_data_dir(base))[:1], "train")


def test_bits_per_byte_matches_a_hand_computation(base, tokenizer):
    torch.manual_seed(0)
    model = random_model(CFG, seed=1)
    val = split_files(list_parquet_files(find_data_dir(base)), "val")
    token_bytes = torch.tensor(tokenizer.token_bytes())
    bpb = evaluate_bpb(model, iter(BosBestFitLoader(val, tokenizer, 2, 32)), 3, token_bytes)
    nats = nbytes = 0.0
    loader = BosBestFitLoader(val, tokenizer, 2, 32)
    for _ in range(3):
        x, y = loader.next_batch()
        with torch.no_grad():
            losses = model(x, y, loss_reduction="none").reshape(-1)
        for loss, t in zip(losses.tolist(), y.reshape(-1).tolist()):
            if token_bytes[t] > 0:
                nats += loss
                nbytes += int(token_bytes[t])
    assert bpb == pytest.approx(nats / (np.log(2) * nbytes), rel=1e-9)
    assert 0 < bpb < 20


# ---------------------------------------------------------------------- optimizer


def fresh(seed=0):
    torch.manual_seed(seed)
    m = GPT(CFG)
    m.init_weights(seed=seed)
    return m


def train_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, CFG.vocab_size, (2, 32), generator=gen)
        model(x, x.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()


def test_every_parameter_has_one_group_and_matrices_go_to_muon():
    model = fresh()
    groups = param_groups_for(model, LearningRates())
    kinds = {n: g["kind"] for g in groups for n in g["params"]}
    assert set(kinds) == set(dict(model.named_parameters()))
    assert all(k == "muon" for n, k in kinds.items() if n.startswith("transformer.h."))
    assert kinds["lm_head.weight"] == kinds["transformer.wte.weight"] == kinds["smear_lambda"] == "adamw"
    lm = next(g for g in groups if g["name"] == "lm_head")
    assert lm["lr"] == pytest.approx(0.008 * (CFG.n_embd / 768) ** -0.5)  # upstream's width scaling


def test_optimizer_state_roundtrip_continues_bit_identically():
    a = fresh()
    opt_a = MuonAdamW(a, param_groups_for(a, LearningRates()))
    train_steps(a, opt_a, 3, seed=1)
    b = fresh()
    b.load_state_dict(a.state_dict())
    opt_b = MuonAdamW(b, param_groups_for(b, LearningRates()))
    opt_b.load_shards([roundtrip(opt_a.state_dict())])
    train_steps(a, opt_a, 3, seed=2)
    train_steps(b, opt_b, 3, seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_optimizer_state_for_another_model_is_refused_in_one_line():
    a = fresh()
    opt = MuonAdamW(a, param_groups_for(a, LearningRates()))
    train_steps(a, opt, 1, seed=0)
    sd = opt.state_dict()
    bigger = GPT(current_config(3, 32, 32, 32, 512, "SL"))
    with pytest.raises(OptimizerStateError, match="changed model config"):
        MuonAdamW(bigger, param_groups_for(bigger, LearningRates())).load_shards([sd])
    with pytest.raises(OptimizerStateError, match="classic upstream"):
        opt.load_shards([[{"state": {}, "param_groups": []}, {"state": {}, "param_groups": []}]])
    with pytest.raises(OptimizerStateError, match="not an optimizer state"):
        opt.load_shards([{"weights": 1}])


def test_owner_assignment_is_deterministic_balanced_and_total():
    sizes = {f"p{i}": s for i, s in enumerate([1000, 10, 400, 400, 300, 5, 5, 900])}
    owners = assign_owners(sizes, 3)
    assert owners == assign_owners(dict(reversed(list(sizes.items()))), 3)
    assert set(owners) == set(sizes) and set(owners.values()) == {0, 1, 2}
    loads = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = fresh()
        opt = MuonAdamW(model, param_groups_for(model, LearningRates()), rank=rank, world_size=world)
        train_steps(model, opt, 3, seed=5)  # the same batch on every rank: the averaged gradient is exact
        torch.save({"params": model.state_dict(), "opt": opt.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_optimizer_under_gloo_matches_one_process(tmp_path):
    """Two gloo processes, each owning part of the optimizer state, end with the weights one process
    computes alone, and their two files (upstream's split) hold exactly the one-process state."""
    torch.set_num_threads(1)
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = fresh()
    opt = MuonAdamW(single, param_groups_for(single, LearningRates()))
    train_steps(single, opt, 3, seed=5)
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, p in single.state_dict().items():
        for s in shards:
            assert torch.equal(s["params"][name], p), name
    # Each rank wrote upstream's rank file; together they rebuild the one-process state exactly.
    rebuilt = MuonAdamW(fresh(), param_groups_for(fresh(), LearningRates()))
    rebuilt.load_shards([s["opt"] for s in shards])
    assert rebuilt.state.keys() == opt.state.keys()
    for name, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, rebuilt.state[name][k]) if torch.is_tensor(v) else v == rebuilt.state[name][k]


# ---------------------------------------------------------------------- RNG, retention, CLI plumbing


def test_rng_capture_restores_torch_python_and_numpy():
    state = roundtrip(capture_rng())
    first = (torch.rand(3), random.random(), np.random.rand(2))
    restore_rng(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_retention_keeps_newest_best_and_protected(tmp_path):
    d = tmp_path / "base_checkpoints" / "r"
    model = random_model(CFG, seed=0)
    bpbs = {10: 3.0, 20: 2.0, 30: 2.5, 40: 2.6, 50: 2.7, 60: 2.8}
    for step, bpb in bpbs.items():
        write_checkpoint(d, model, step=step, extra_meta={"val_bpb": bpb})
    (d / "model_000070.pt").write_bytes(b"partial")  # an incomplete step is not retention's business
    deleted = base_train.apply_retention(d, keep_last=2, protected={30})
    assert sorted(deleted) == [10, 40]
    left = {c.step: c for c in cm.list_checkpoints(d)}
    assert sorted(left) == [20, 30, 50, 60, 70]
    assert base_train.apply_retention(d, keep_last=-1, protected=set()) == []


def test_parse_args_accepts_torchrun_separator_and_tracks_explicit_flags():
    args, explicit = base_train.parse_args(["--", "--depth", "3", "--device", "cpu", "--resume"])
    assert args.depth == 3 and args.device_type == "cpu" and args.resume and args.max_seq_len == 2048
    assert explicit == {"depth", "device_type", "resume"}


def test_resume_command_repeats_the_runs_flags_in_one_syntax():
    args, _ = base_train.parse_args(["--depth", "4", "--device", "cpu", "--run", "x y", "--resume"])
    env = launch_env("/data/my base", cpu_threads=2)
    cmd = resume_command(BASE_TRAIN, vars(args), world_size=1, resume_step=17, env=env,
                         overrides={"model_tag": "d4"}).line
    assert cmd.startswith("NANOCHAT_BASE_DIR='/data/my base' OMP_NUM_THREADS=2 python -m scripts.base_train "
                          "'--run=x y' --device-type=cpu --seed=42 --compile=auto --depth=4 ")
    assert cmd.endswith(" --model-tag=d4 --resume-from-step=17")
    assert "--resume " not in cmd and "--target-flops=-1.0" in cmd  # per-launch flags dropped, floats as typed
    reparsed, _ = base_train.parse_args(shlex.split(cmd)[5:])  # what the trainer reads back is the run's flags
    assert {**vars(args), "model_tag": "d4", "resume": False, "resume_from_step": 17} == vars(reparsed)
    multi = resume_command(BASE_TRAIN, vars(args), world_size=4, resume_step=17).line
    assert multi.startswith("torchrun --standalone --nproc_per_node=4 -m scripts.base_train -- '--run=x y'")
    assert launch_env(DEFAULT_BASE_DIR) == {}


def test_readme_documents_every_training_flag():
    from scripts import demo, tok_train

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("<!-- section: training -->"):readme.index("<!-- end section: training -->")]
    for module in (base_train, tok_train, demo):
        for action in module.build_parser()._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f" {flag} " in section or f"[{flag}" in section, \
                        f"{module.__name__} {flag} is not documented in the README's training section"
    assert "python -m bench.train" in readme


def test_segments_grow_per_launch_even_when_resuming_an_older_step(tmp_path):
    rows = [{"step": 1, "segment": 1}, {"step": 9, "segment": 3}, {"step": 5, "segment": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "segm')
    assert base_train.next_segment(tmp_path, {"resume_segment": 1}) == 4  # resuming a segment-1 checkpoint
    assert base_train.next_segment(tmp_path / "empty", {"resume_segment": 2}) == 3


def test_compile_auto_compiles_where_it_pays_back_within_the_planned_steps():
    demo = run_shape({"depth": 4, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 256, "device_batch_size": 16,
                      "total_batch_size": 4096, "num_iterations": 250}, vocab_size=2048)
    assert not compile_decision("auto", "cpu", demo, 250).compile  # the demo's run: compiling would not pay
    long_run = compile_decision("auto", "cpu", demo, 20_000)
    assert long_run.compile and "s saved over 20,000 steps" in long_run.reason
    assert compile_decision("auto", "cuda", demo, 10).compile
    assert not compile_decision("off", "cuda", demo, 10**6).compile and compile_decision("on", "cpu", demo, 1).compile
    # a resume keeps what the checkpoint's launch chose, so it runs the same kernels (bit-exact)
    assert compile_decision("auto", "cpu", demo, 20_000, saved=False).compile is False
