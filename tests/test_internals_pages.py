"""The Attention, LR finder and Sweeps pages under AppTest on the shared demo registry (and small real trees
built beside it): each renders without an exception, shows its answer, and bad input is a message."""

from __future__ import annotations

import pytest

from tests.test_app_pages import assert_clean, charts, fresh_caches, metric, open_app, registry  # noqa: F401  (fixtures)


def chart_with(at, column: str, without: str = "\0"):
    return next(data[0] for _, data in charts(at) if data and column in data[0] and without not in data[0])


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
