"""The learning-rate finder: its arithmetic (sweep, debiased smoothing, divergence, both suggestions), the
sweep on a tiny real model (all groups or one), the script end to end as a registry run, bad input as one
line, the grid check at tiny size, and sweeps found from run configs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nanochat import lr_range
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import LearningRates, MuonAdamW, param_groups_for
from scripts import lr_find
from streamlit_app.internals import find_sweeps, sweep_frame, sweep_summary
from tests.modelkit import write_training_base

TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--device-batch-size", "2",
        "--total-batch-size", "64", "--device", "cpu"]


# ---------------------------------------------------------------------- arithmetic


def test_sweep_is_exponential_and_bounds_are_checked():
    m = lr_range.multipliers(0.01, 100, 5)
    assert m == pytest.approx([0.01, 0.1, 1, 10, 100])
    for lo, hi, steps, msg in [(1, 0.5, 10, "must be larger"), (0, 1, 10, "outside"), (1e-9, 1, 10, "outside"),
                               (0.1, math.inf, 10, "outside"), (0.1, 1, 2, "--steps 2")]:
        with pytest.raises(lr_range.LRFindError, match=msg):
            lr_range.multipliers(lo, hi, steps)


def test_smoothing_is_upstreams_debiased_ema():
    losses = [5.0, 4.0, 3.0]
    ema, out = 0.0, []
    for i, x in enumerate(losses):  # base_train: smooth = 0.9 * smooth + 0.1 * loss; debiased / (1 - 0.9^(i+1))
        ema = 0.9 * ema + 0.1 * x
        out.append(ema / (1 - 0.9 ** (i + 1)))
    assert lr_range.smoothed(losses) == pytest.approx(out)
    assert lr_range.smoothed([7.0])[0] == pytest.approx(7.0)  # debiased: the first value is the loss itself


def test_divergence_rules():
    assert not lr_range.diverged([6.0, 5.9, 6.01])  # noise near the start, nothing learned yet
    assert lr_range.diverged([6.0, 5.0, 6.1])  # learned 17%, now worse than at the start
    assert lr_range.diverged([1.0, 0.5, 2.1])  # above 4x the minimum
    assert lr_range.diverged([6.0, math.nan])


def test_suggestions_on_a_known_curve():
    mults = lr_range.multipliers(0.001, 1000, 61)
    # loss falls fastest at x=0.1 (a tanh step in log10), is lowest at x=10, then rises
    loss = [3 - math.tanh(2 * (math.log10(m) + 1)) + max(0.0, math.log10(m) - 1) ** 2 for m in mults]
    s = lr_range.suggest(mults, loss)
    assert s.min_loss_mult == pytest.approx(10, rel=0.3)
    assert s.min_over_10 == pytest.approx(s.min_loss_mult / 10)
    assert s.steepest == pytest.approx(0.1, rel=0.3)
    assert "starting point" in s.caveat
    assert lr_range.suggest([1, 2], [3, 2]).min_over_10 is None


# ---------------------------------------------------------------------- the sweep on a tiny real model


def tiny_model(seed=0):
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights(seed=seed)
    return model


def fixed_batch_step(model, optimizer):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (4, 32), generator=g)
    y = torch.roll(x, -1, dims=1)  # learnable: the next token is in the input

    def step():
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()
    return step


def test_one_group_alone_leaves_the_others_at_their_rate():
    model = tiny_model()
    opt = MuonAdamW(model, param_groups_for(model, LearningRates()))
    sweep = lr_find.run_sweep(model, opt, fixed_batch_step(model, opt), lr_range.multipliers(0.1, 10, 6), "matrix", 0.1)
    assert len(sweep.losses) == 6
    for g in opt.param_groups:
        expected = g["initial_lr"] * (10 if g["kind"] == "muon" else 1)
        assert g["lr"] == pytest.approx(expected)
    assert {g["name"] for g in opt.param_groups if lr_find.in_group(g, "scalar")} == {"resid_lambdas", "x0_lambdas", "smear"}
    assert {g["name"] for g in opt.param_groups if lr_find.in_group(g, "embedding")} == {"embedding", "value_embeds"}


def test_a_sweep_into_absurd_rates_learns_then_stops_at_divergence():
    model = tiny_model(1)
    opt = MuonAdamW(model, param_groups_for(model, LearningRates()))
    mults = lr_range.multipliers(0.3, 1e5, 24)
    sweep = lr_find.run_sweep(model, opt, fixed_batch_step(model, opt), mults, "all", 0.1)
    assert sweep.stopped == "diverged" and len(sweep.losses) < len(mults)
    assert min(sweep.smooth) < sweep.smooth[0] * 0.9  # it learned before it diverged
    s = lr_range.suggest(sweep.multipliers, sweep.smooth)
    assert s.min_over_10 is not None and s.min_over_10 < s.min_loss_mult


# ---------------------------------------------------------------------- the script, as a run in the registry


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_training_base(tmp_path_factory.mktemp("lrfind_base"), limit_chars=200_000, vocab_size=300)


def test_script_writes_a_registry_run_and_never_overwrites(tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    argv = TINY + ["--steps", "6", "--min-lr-mult", "0.1", "--max-lr-mult", "10", "--json"]
    assert lr_find.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    run = tiny_base / "lrfind" / "d1-all"
    saved = json.loads((run / "lr_find.json").read_text())
    assert saved == result and saved["steps_run"] == len(saved["multipliers"]) <= 6
    assert saved["user_config"]["depth"] == 1 and saved["model_config"]["n_layer"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows))) and {"lr_mult", "train_loss", "smooth_loss"} <= set(rows[0])
    assert "suggestion (min/10)" in out and "suggestion (steepest)" in out
    assert lr_find.main(argv[:-1] + ["--group", "matrix"]) == 0
    assert lr_find.main(argv[:-1]) == 0
    assert (tiny_base / "lrfind" / "d1-all-2" / "lr_find.json").exists() and (tiny_base / "lrfind" / "d1-matrix").exists()

    from nanochat.checkpoint_manager import PHASE_DIRS
    from registry import open_store
    from registry.store import PHASES

    assert set(PHASES) == set(PHASE_DIRS.values())
    with open_store(tiny_base / "registry.sqlite") as store:
        store.scan(tiny_base)
        finds = store.list_runs(where={"phase": "lrfind"})
        assert sorted(r.tag for r in finds) == ["d1-all", "d1-all-2", "d1-matrix"]
        assert store.resolve_run("lrfind/d1-all").tag == "d1-all"
        assert {k.key for k in store.metric_keys(finds[0].id)} >= {"lr_mult", "smooth_loss", "train_loss"}


@pytest.mark.parametrize("extra, message", [
    (["--min-lr-mult", "10", "--max-lr-mult", "1"], "must be larger than --min-lr-mult"),
    (["--max-lr-mult", "1e9"], "outside"),
    (["--steps", "1"], "--steps 1"),
    (["--diverge-factor", "0.5"], "--diverge-factor"),
    (["--checkpoint", "/nonexistent/run"], "--checkpoint"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_base, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    before = sorted(p.name for p in (tiny_base / "lrfind").iterdir()) if (tiny_base / "lrfind").exists() else []
    assert lr_find.main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    after = sorted(p.name for p in (tiny_base / "lrfind").iterdir()) if (tiny_base / "lrfind").exists() else []
    assert after == before


def test_grid_of_real_runs_at_tiny_size(tiny_base, tmp_path):
    """The bench's grid: real base_train runs per multiplier and seed, read back as a sweep."""
    import dataclasses
    import shutil

    from bench import lr_find as bench
    from registry import open_store
    from scripts.demo import PROFILES

    base = tmp_path / "base"
    shutil.copytree(tiny_base / "tokenizer", base / "tokenizer")
    shutil.copytree(tiny_base / "base_data", base / "base_data")
    profile = dataclasses.replace(PROFILES["test"], vocab_size=300, seq_len=32, device_batch_size=2,
                                  total_batch_size=64, eval_tokens=128)
    results = bench.grid(base, profile, 1, [0.5, 2.0], [1], steps=2, progress=lambda _: None)
    assert set(results) == {0.5, 2.0} and all(math.isfinite(v[0]) for v in results.values())
    assert bench.grid_best(results) in (0.5, 2.0)
    with open_store(base / "registry.sqlite") as store:
        store.scan(base)
        runs = store.list_runs()
    sweeps = find_sweeps(runs)
    assert len(sweeps) == 1 and sweeps[0].keys[0] == "matrix_lr" and len(sweeps[0].run_ids) == 2
    assert set(sweeps[0].keys) == {"matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr"}


# ---------------------------------------------------------------------- sweeps from configs


def fake_run(rid, val, **cfg):
    base = {"depth": 4, "matrix_lr": 0.02, "embedding_lr": 0.3, "seed": 1, "model_tag": f"r{rid}", "num_iterations": 100}
    return SimpleNamespace(id=rid, label=f"base/r{rid}", last_val_bpb=val, best_val_bpb=val, user_config={**base, **cfg})


def test_sweeps_group_runs_by_the_one_setting_they_differ_in():
    runs = [fake_run(1, 2.0, matrix_lr=0.01, embedding_lr=0.15), fake_run(2, 1.9, matrix_lr=0.01, embedding_lr=0.15, seed=2),
            fake_run(3, 1.8), fake_run(4, 1.85, seed=2),
            fake_run(5, 1.7, depth=6), fake_run(6, 1.6, depth=8),
            fake_run(7, 3.0, depth=2, num_iterations=50), fake_run(8, None, depth=12)]
    sweeps = {s.label: s for s in find_sweeps(runs)}
    lr = sweeps["matrix_lr (with embedding_lr)"]
    assert lr.run_ids == (1, 2, 3, 4)
    depth = sweeps["depth"]
    assert depth.run_ids == (3, 4, 5, 6)  # run 7 also changes num_iterations; run 8 has no val_bpb
    assert not any(7 in s.run_ids and 3 in s.run_ids and len(s.keys) == 1 for s in sweeps.values())
    summary = sweep_summary(sweep_frame(lr, runs))
    assert list(summary["value"]) == [0.01, 0.02] and list(summary["runs"]) == [2, 2]
    assert summary.loc[0, "low"] == 1.9 and summary.loc[0, "high"] == 2.0


def test_readme_documents_the_finders_and_the_visualizers_flags():
    from pathlib import Path

    from scripts import base_train
    from tools import attention_visualizer

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("<!-- section: internals -->"):readme.index("<!-- end section: internals -->")]
    trainer = {f for a in base_train.build_parser()._actions for f in a.option_strings}  # the training section's
    for parser in (lr_find.build_parser(), attention_visualizer.build_parser()):
        for action in parser._actions:
            for flag in set(action.option_strings) - trainer - {"-h", "--help"}:
                assert f"`{flag}" in section or f" {flag} " in section, f"{flag} is not documented in the internals section"
    assert "python -m bench.lr_find" in readme and "python -m bench.attention" in readme
