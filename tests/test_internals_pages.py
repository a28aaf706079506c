"""The Attention, LR finder and Sweeps pages under AppTest on the shared demo registry (and small real trees
built beside it): each renders without an exception, shows its answer, and bad input is a message."""

from __future__ import annotations

import pytest

from tests.test_app_pages import assert_clean, charts, fresh_caches, metric, open_app, registry  # noqa: F401  (fixtures)


def chart_with(at, column: str, without: str = "\0"):
    """The first dataset of any chart on the page that has `column` (and not `without`)."""
    return next(d for _, data in charts(at) for d in data if column in d and without not in d)


@pytest.mark.usefixtures("registry")
def test_attention_page_shows_every_head_the_lens_and_one_token():
    at = open_app("attention", {"run": "base/d2", "prompt": "KING HENRY. What"})
    assert_clean(at)
    tokens = int(metric(at, "Tokens").value)
    assert metric(at, "Heads").value == "2 × 2"  # the test demo's d2: 2 layers, 2 heads of 32
    grid = chart_with(at, "outside")
    assert set(grid["layer"]) == {0, 1} and set(grid["head"]) == {0, 1}
    # the thumbnails' rows sum to 1 (exact prompt: no downsampling at this size)
    sums = grid.groupby(["layer", "head", "q"])["weight"].sum()
    assert ((sums - 1).abs() < 1e-4).all() and len(sums) == 4 * tokens
    lens = chart_with(at, "rank")
    assert set(lens["layer"]) == {0, 1} and set(lens["rank"]) == {1, 2, 3, 4, 5}
    token = chart_with(at, "k_label", without="q")
    assert token["k"].max() == tokens - 1  # the last token by default, all keys before it
    at.select_slider(key="pos").set_value(2).run()
    assert_clean(at)
    assert chart_with(at, "k_label", without="q")["k"].max() == 2


@pytest.mark.usefixtures("registry")
def test_attention_page_across_checkpoints_and_a_continuation():
    at = open_app("attention", {"run": "base/d2", "prompt": "KING", "gen": "5"})
    assert "5 generated" in metric(at, "Tokens").delta
    at.toggle(key="evolve").set_value(True).run()
    assert_clean(at)
    evo = chart_with(at, "share")
    assert evo["step"].nunique() >= 2 and evo["value"].between(0, 1).all()


@pytest.mark.usefixtures("registry")
def test_attention_page_refuses_a_prompt_beyond_the_context():
    at = open_app("attention", {"run": "base/d2", "prompt": "word " * 200})
    assert any("context" in e.value for e in at.error), [e.value for e in at.error]
    at.text_area(key="prompt").set_value("  ").run()
    assert_clean(at)
    assert any("Type a prompt" in i.value for i in at.info)


# ---------------------------------------------------------------------- LR finder and Sweeps


@pytest.fixture
def finder_base(demo_base, tmp_path, monkeypatch):
    """The demo's tokenizer, data and d2 run, one real tiny find (scripts.lr_find), and a 2 x 2 'grid': copies
    of d2's last checkpoint whose meta says they trained at 0.5x and 2x the find's LRs with seeds 1 and 2."""
    import json
    import shutil

    from registry import open_store
    from scripts import lr_find

    base = tmp_path / "base"
    for part in ("tokenizer", "base_data"):
        shutil.copytree(demo_base / part, base / part)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    flags = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--device-batch-size", "2",
             "--total-batch-size", "64", "--device", "cpu"]
    assert lr_find.main(flags + ["--steps", "8", "--min-lr-mult", "0.1", "--max-lr-mult", "100"]) == 0
    user = json.loads((base / "lrfind" / "d1-all" / "lr_find.json").read_text())["user_config"]
    src = demo_base / "base_checkpoints" / "d2"
    last = max(int(p.stem.split("_")[1]) for p in src.glob("meta_*.json"))
    for mult, seed, bpb in [(0.5, 1, 2.6), (0.5, 2, 2.5), (2.0, 1, 2.2), (2.0, 2, 2.3)]:
        dst = base / "base_checkpoints" / f"grid-x{mult:g}-s{seed}"
        dst.mkdir(parents=True)
        shutil.copy(src / f"model_{last:06d}.pt", dst)
        meta = json.loads((src / f"meta_{last:06d}.json").read_text())
        meta["user_config"] = {**user, **{k: user[k] * mult for k in ("matrix_lr", "embedding_lr", "unembedding_lr",
                                                                        "scalar_lr")}, "seed": seed, "model_tag": dst.name}
        meta["val_bpb"] = bpb
        (dst / f"meta_{last:06d}.json").write_text(json.dumps(meta))
    with open_store(base / "registry.sqlite") as s:
        s.scan(base)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(base / "registry.sqlite"))
    return base


def test_lr_finder_page_shows_the_curve_both_suggestions_and_the_grid(finder_base):
    at = open_app("lr_finder")
    assert metric(at, "Suggestion (min/10)").value.startswith("× ")
    assert metric(at, "Suggestion (steepest)").value.startswith("× ") or metric(at, "Suggestion (steepest)").value == "—"
    assert metric(at, "Grid best").value == "× 2"
    curve = chart_with(at, "smooth_loss")
    assert len(curve) == 8 and curve["lr_mult"].is_monotonic_increasing
    marks = chart_with(at, "suggestion")
    assert {"min/10", "grid best"} <= set(marks["suggestion"])
    assert any("starting point" in w.value for w in at.warning)
    grid = chart_with(at, "seed")
    assert sorted(grid["value"].unique()) == [0.5, 2.0]


def test_sweeps_page_groups_the_grid_with_a_seed_band(finder_base):
    at = open_app("sweeps")
    assert metric(at, "Best matrix_lr").value != "—"
    assert metric(at, "Seed spread").value == "0.1000"
    summary = chart_with(at, "low")
    assert list(summary["runs"]) == [2, 2] and list(summary["mean"]) == pytest.approx([2.55, 2.25])


@pytest.mark.usefixtures("registry")
def test_lr_finder_and_sweeps_pages_teach_when_empty():
    at = open_app("lr_finder")
    assert any("No learning-rate find" in i.value for i in at.info)
    at = open_app("sweeps")  # the demo: d1 and d2 differ in depth (and steps), the crashed run in its schedule
    assert_clean(at)
