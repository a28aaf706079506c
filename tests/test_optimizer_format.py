"""Our optimizer files are upstream's: compared key by key, group by group and shape by shape with the
optimizer file upstream itself wrote for the same config (tests/fixtures/upstream/current), for one
process and for upstream's split over 2 ranks; our earlier per-name layout is still read."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT
from nanochat.model_config import current_config
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from tests.modelkit import v1_optimizer_files

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "upstream" / "current"
FIXTURE_OPTIM = FIXTURE / "base_checkpoints" / "d2" / "optim_000300_rank0.pt"
# The fixture run's config (its meta's user_config), run for a few steps of the same 300-step schedule.
FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "8",
         "--total-batch-size", "2048", "--num-iterations", "300", "--eval-every", "-1", "--save-every", "2",
         "--device", "cpu", "--compile", "off"]
SAVED_AT = 2
# Upstream's groups by parameter name (UPSTREAM_OUTPUTS.md §1.1 for d2), written out here independently of
# nanochat/optim.py so that a wrong order there cannot pass.
UPSTREAM_GROUPS = [
    ["lm_head.weight"], ["transformer.wte.weight"], ["value_embeds.1.weight"], ["resid_lambdas"], ["x0_lambdas"],
    ["smear_gate.weight", "smear_lambda", "backout_lambda"],
    ["transformer.h.1.attn.ve_gate.weight"],
    [f"transformer.h.{i}.attn.{m}.weight" for i in (0, 1) for m in ("c_q", "c_k", "c_v", "c_proj")],
    ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"],
    ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"],
]


@pytest.fixture(scope="module")
def upstream():
    return torch.load(FIXTURE_OPTIM, weights_only=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Upstream's own tokenizer (vocab 2048, as in the fixture run) and a few parquet shards."""
    from scripts.demo import write_shards

    base = tmp_path_factory.mktemp("optim_base")
    shutil.copytree(FIXTURE / "tokenizer", base / "tokenizer")
    write_shards(base / "base_data", 200_000)
    return base


def train_until_saved(base: Path, tag: str, nproc: int = 1) -> Path:
    """Start the fixture config's 300-step run and stop it once step SAVED_AT is on disk."""
    flags = [*FLAGS, "--model-tag", tag]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.base_train", "--", *flags]
    else:
        cmd = [sys.executable, "-m", "scripts.base_train", *flags]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_FAULT_KILL_AFTER", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    meta = base / "base_checkpoints" / tag / f"meta_{SAVED_AT:06d}.json"
    deadline = time.time() + 240
    try:
        while not meta.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert meta.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return meta.parent


def upstream_schedule(group: dict, fixture_group: dict, step: int, n: int = 300) -> dict:
    """The values upstream saves after step `step` (0-based, the last one executed), from its formulas
    (UPSTREAM_OUTPUTS.md §1.1 and NANOCHAT_FORMAT.md §6) and the fixture's own initial values."""
    warmup, warmdown = 40, round(0.65 * n)
    lrm = (step + 1) / warmup if step < warmup else 1.0
    if step >= n - warmdown:
        lrm = (n - step) / warmdown + (1 - (n - step) / warmdown) * 0.05
    out = {"lr": fixture_group["initial_lr"] * lrm}
    if group["kind"] == "muon":
        out["momentum"] = 0.85 + 0.12 * step / 400
        wd_scaled = fixture_group["weight_decay"] / (0.5 * (1 + math.cos(math.pi * (n - 1) / n)))
        out["weight_decay"] = wd_scaled * 0.5 * (1 + math.cos(math.pi * step / n))
    return out


def assert_same_structure(ours: dict, theirs: dict, step: int) -> None:
    assert list(ours) == list(theirs) == ["state", "param_groups"]
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for i, (g, u) in enumerate(zip(ours["param_groups"], theirs["param_groups"])):
        assert list(g) == list(u), f"group {i}: keys {list(g)} != upstream's {list(u)}"
        for k in g:
            assert type(g[k]) is type(u[k]), f"group {i}.{k}: {type(g[k])} != {type(u[k])}"
            if k in ("kind", "params", "betas", "eps", "ns_steps", "beta2"):
                assert g[k] == u[k], f"group {i}.{k}: {g[k]!r} != upstream's {u[k]!r}"
        assert g["initial_lr"] == pytest.approx(u["initial_lr"], rel=1e-12)
        for k, v in upstream_schedule(g, u, step - 1).items():
            assert g[k] == pytest.approx(v, rel=1e-9), f"group {i}.{k} at step {step}"
        if g["kind"] == "adamw":
            assert g["weight_decay"] == u["weight_decay"]
    assert list(ours["state"]) == list(theirs["state"])


@pytest.mark.slow
def test_our_trainer_writes_upstreams_optimizer_file(base, upstream):
    ours = torch.load(train_until_saved(base, "one") / f"optim_{SAVED_AT:06d}_rank0.pt", weights_only=True)
    assert_same_structure(ours, upstream, SAVED_AT)
    for idx, u in upstream["state"].items():
        s = ours["state"][idx]
        assert list(s) == list(u), f"state[{idx}] keys {list(s)} != upstream's {list(u)}"
        for k, v in u.items():
            if torch.is_tensor(v):
                assert (s[k].shape, s[k].dtype) == (v.shape, v.dtype), f"state[{idx}].{k}"
            else:
                assert type(s[k]) is type(v) and s[k] == SAVED_AT, f"state[{idx}].{k} = {s[k]!r}"


@pytest.mark.slow
def test_our_two_rank_files_are_upstreams_split(base, upstream):
    """UPSTREAM_OUTPUTS.md §1.4: param_groups identical in both files; AdamW state of params with >= 1024
    elements split by rows, smaller ones whole and equal on both ranks; Muon groups in chunks of ceil(K/2)
    params, zero-padded past the group's end."""
    run = train_until_saved(base, "two", nproc=2)
    files = [torch.load(run / f"optim_{SAVED_AT:06d}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for f in files:
        assert_same_structure(f, upstream, SAVED_AT)
    assert files[0]["param_groups"] == files[1]["param_groups"]
    for idx, u in upstream["state"].items():
        group = next(g for g in upstream["param_groups"] if idx in g["params"])
        for k, v in u.items():
            if not torch.is_tensor(v):
                continue
            if group["kind"] == "muon":
                chunk = -(-len(group["params"]) // 2)
                expected = (chunk, *v.shape[1:])
            elif v.numel() >= 1024:
                expected = (v.shape[0] // 2, *v.shape[1:])
            else:
                expected = tuple(v.shape)
                assert torch.equal(files[0]["state"][idx][k], files[1]["state"][idx][k]), f"state[{idx}].{k}"
            for r in (0, 1):
                assert tuple(files[r]["state"][idx][k].shape) == expected, f"rank {r} state[{idx}].{k}"
    ve_gate = upstream["param_groups"][6]["params"][0]  # one param, two ranks: rank 1 holds zeros
    assert not files[1]["state"][ve_gate]["momentum_buffer"].any()
    assert files[0]["state"][ve_gate]["momentum_buffer"].any()
    # Together the two files rebuild a state that any world size loads, and that writes back identically.
    model = GPT(current_config(2, 32, 32, 128, 2048, "SSSL"))
    opt = MuonAdamW(model, param_groups_for(model, LearningRates()), rank=0, world_size=1)
    opt.load_shards(files)
    again = opt.state_dict()
    mb = upstream["param_groups"][7]["params"][0]
    assert torch.equal(again["state"][mb]["momentum_buffer"],
                       torch.cat([f["state"][mb]["momentum_buffer"] for f in files]))


def test_torch_optimizer_with_upstreams_groups_gives_each_param_its_own_state(upstream):
    """What upstream's MuonAdamW (a torch.optim.Optimizer) does with our file: groups matched by position,
    state by index. The issue's crash came from smear_lambda receiving backout_lambda's moments."""
    model = GPT(current_config(2, 32, 32, 128, 2048, "SSSL"))
    model.init_weights(seed=0)
    ours = MuonAdamW(model, param_groups_for(model, LearningRates()))
    ours.load_shards([upstream])
    named = dict(model.named_parameters())
    stand_in = torch.optim.Optimizer([{"params": [named[n] for n in names]} for names in UPSTREAM_GROUPS], {})
    stand_in.load_state_dict(ours.state_dict())
    for names in UPSTREAM_GROUPS[:6]:
        for n in names:
            assert stand_in.state[named[n]]["exp_avg"].shape == named[n].shape, n
            assert torch.equal(stand_in.state[named[n]]["exp_avg"], ours.state[n]["exp_avg"]), n
    for names in UPSTREAM_GROUPS[6:]:
        first = stand_in.state[named[names[0]]]
        assert first["momentum_buffer"].shape == (len(names), *named[names[0]].shape)
        for j, n in enumerate(names):
            assert torch.equal(first["momentum_buffer"][j], ours.state[n]["momentum_buffer"]), n


def test_upstreams_file_roundtrips_exactly_through_our_optimizer(upstream):
    model = GPT(current_config(2, 32, 32, 128, 2048, "SSSL"))
    opt = MuonAdamW(model, param_groups_for(model, LearningRates()))
    opt.load_shards([upstream])
    ours = opt.state_dict()
    for idx, u in upstream["state"].items():
        for k, v in u.items():
            assert torch.equal(ours["state"][idx][k], v) if torch.is_tensor(v) else ours["state"][idx][k] == v


def test_earlier_per_name_layout_is_still_read(upstream):
    model = GPT(current_config(2, 32, 32, 128, 2048, "SSSL"))
    full = MuonAdamW(model, param_groups_for(model, LearningRates()))
    full.load_shards([upstream])
    for world in (1, 2):
        files = v1_optimizer_files(full, world, model)
        for r in range(world):
            opt = MuonAdamW(model, param_groups_for(model, LearningRates()), rank=r, world_size=world)
            opt.load_shards(files)
            assert set(opt.state) == set(opt.owned)
            for n in opt.owned:
                assert all(torch.equal(v, full.state[n][k]) if torch.is_tensor(v) else v == full.state[n][k]
                           for k, v in opt.state[n].items()), n
