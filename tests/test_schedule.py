"""LR schedule and num_iterations, by upstream's rules, on hand-computed values and the fixtures."""

import json

import pytest

from nanochat.model_config import GPTConfig
from nanochat.schedule import Schedule, resolve_from_meta, schedule_from_user_config
from nanochat.train_config import resolve_num_iterations


def test_current_schedule_shape():
    s = Schedule(num_iterations=100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.1)
    assert s.lr_multiplier(0) == pytest.approx(0.1)
    assert s.lr_multiplier(9) == pytest.approx(1.0) and s.phase(9) == "warmup"
    assert s.lr_multiplier(10) == 1.0 and s.phase(10) == "constant"
    assert s.lr_multiplier(50) == 1.0 and s.phase(50) == "constant"  # 100 - round(0.5*100)
    assert s.phase(51) == "warmdown" and s.lr_multiplier(51) == pytest.approx(49 / 50 + (1 / 50) * 0.1)
    assert s.lr_multiplier(100) == pytest.approx(0.1) and s.phase(100) == "done"


def test_fixture_schedules(upstream_dir):
    for gen, phase, lrm in (("current", "warmdown", (300 - 299) / 195 + (1 - 1 / 195) * 0.05), ("classic", "warmdown", 1 / 60)):
        meta = json.loads((upstream_dir / gen / "base_checkpoints/d2/meta_000300.json").read_text())
        n = resolve_from_meta(meta)
        assert n == 300
        s = schedule_from_user_config(meta["user_config"], n)
        assert s.phase(299) == phase and s.lr_multiplier(299) == pytest.approx(lrm)
        assert s.phase(300) == "done"
    classic = schedule_from_user_config({"warmup_ratio": 0.1, "warmdown_ratio": 0.2, "final_lr_frac": 0.0}, 200)
    assert classic.warmup_steps == 20 and classic.lr_multiplier(0) == pytest.approx(1 / 20)


def test_num_iterations_rules(upstream_dir):
    meta = json.loads((upstream_dir / "current/base_checkpoints/d2/meta_000300.json").read_text())
    user = {**meta["user_config"], "num_iterations": -1}
    # data ratio: int(12 * scaling params) // 2048, scaling = blocks (98,328) + lm_head (131,072)
    assert resolve_from_meta({**meta, "user_config": user}) == int(12 * (98_328 + 131_072)) // 2048
    cfg = GPTConfig(**meta["model_config"])
    fpt = 6 * (98_328 + 131_072 + 24) + 2 * 12 * 2 * 32 * 128
    assert resolve_num_iterations({**user, "target_flops": 1e12}, cfg, 2048) == round(1e12 / (fpt * 2048))
    assert resolve_from_meta({**meta, "num_iterations": 77}) == 77  # our meta records it
    classic = json.loads((upstream_dir / "classic/base_checkpoints/d2/meta_000300.json").read_text())
    cuser = {**classic["user_config"], "num_iterations": -1}
    assert resolve_from_meta({**classic, "user_config": cuser}) == (20 * 917_504) // 2048  # classic counts all params


def test_derived_batch_size_is_a_power_of_two(upstream_dir):
    meta = json.loads((upstream_dir / "current/base_checkpoints/d2/meta_000300.json").read_text())
    user = {**meta["user_config"], "num_iterations": -1, "total_batch_size": -1}
    n = resolve_num_iterations(user, GPTConfig(**meta["model_config"]))
    assert n is not None and n > 0
