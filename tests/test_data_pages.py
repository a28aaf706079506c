"""The Tokenizer and Dataset pages under AppTest on the demo registry: they render with useful defaults,
their main interactions work (type text, compare, count tokens exactly, stop and resume, search, step N),
and bad input gives a message, never a traceback."""

from __future__ import annotations

import pytest

from tests.test_app_pages import assert_clean, charts, copy_registry, fresh_caches, metric, open_app  # noqa: F401 (fresh_caches: the same autouse fixture)


@pytest.fixture
def registry(demo_base, tmp_path, monkeypatch):
    url = copy_registry(demo_base, tmp_path / "reg")
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(url))
    return url


def test_tokenizer_page_splits_text_checks_token_bytes_and_compares(registry, demo_base, upstream_dir):
    at = open_app("tokenizer")
    assert metric(at, "Vocabulary").value == "512"
    assert metric(at, "token_bytes.pt").value == "right"
    at.text_area(key="text").set_value("<|bos|>Hello\nworld").run()
    assert_clean(at)
    html = at.get("html")[0].proto.body
    assert "<|bos|>" in html.replace("&lt;", "<").replace("&gt;", ">") and "↵" in html and 'title="id ' in html
    assert int(metric(at, "Tokens in the text").value) >= 3
    at.text_input(key="compare_dirs").set_value(str(upstream_dir / "classic" / "tokenizer")).run()
    assert_clean(at)
    compared = charts(at)[0][1][0]
    assert len(compared) == 2 and (compared["bytes_per_token"] > 0).all()
    at.text_input(key="vocab_search").set_value("the").run()
    at.toggle(key="unused").set_value(True).run()
    assert_clean(at)
    vocab = at.dataframe[-2].value if len(at.dataframe) > 2 else at.dataframe[-1].value
    assert len(vocab) and vocab["token"].str.contains("the").all()


def test_tokenizer_page_flags_an_old_token_bytes_and_a_bad_folder(registry, upstream_dir, tmp_path):
    at = open_app("tokenizer", {"tok": "another folder…"})
    at.text_input(key="tok_dir").set_value(str(upstream_dir / "classic" / "tokenizer")).run()
    assert_clean(at)
    assert metric(at, "token_bytes.pt").value == "128 wrong"
    assert any("built the old way" in w.value for w in at.warning)
    at.text_input(key="tok_dir").set_value(str(tmp_path)).run()
    assert_clean(at)
    assert any("no tokenizer.json or tokenizer.pkl" in e.value for e in at.error)


def test_dataset_page_inspects_counts_exactly_and_replays_a_step(registry):
    at = open_app("dataset")
    assert metric(at, "Shards").value == "2"
    assert metric(at, "Ready for 1 rank(s)").value == "yes"
    assert "estimated" in metric(at, "Tokens").delta
    hist = charts(at)[0][1][0]
    assert hist["docs"].sum() == int(metric(at, "Documents").value.replace(",", ""))
    at.button(key="exact").click().run()
    assert_clean(at)
    assert metric(at, "Tokens").delta == "exact count"
    at.number_input(key="world").set_value(4).run()
    assert_clean(at)
    assert metric(at, "Ready for 4 rank(s)").value == "no"
    assert any("validation shard" in e.value and "4 ranks" in e.value for e in at.error)
    at.text_input(key="doc_search").set_value("king").run()
    assert_clean(at)
    at.number_input(key="step").set_value(5).run()
    assert_clean(at)
    segs = at.dataframe[-1].value
    assert {"micro_batch", "row", "source", "text"} <= set(segs.columns) and len(segs)


def test_dataset_page_stop_and_bad_folder(registry, tmp_path):
    at = open_app("dataset")
    at.button(key="stop").click().run()
    assert any("Inspection stopped" in i.value for i in at.info)
    at.button(key="resume").click().run()
    assert_clean(at)
    assert metric(at, "Shards").value == "2"
    at = open_app("dataset", {"data": "another folder…"})
    at.text_input(key="data_dir").set_value(str(tmp_path)).run()
    assert_clean(at)
    assert any("no *.parquet shards" in e.value for e in at.error)


def test_runs_page_shows_each_runs_token_bytes_and_warns_where_val_bpb_is_not_comparable(upstream_copy, tmp_path,
                                                                                        monkeypatch):
    from registry import open_store

    url = tmp_path / "registry.sqlite"
    with open_store(url) as s:
        for g in ("classic", "current"):  # the classic tokenizer's token_bytes.pt was built the old way
            s.scan(upstream_copy(g))
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(url))
    at = open_app()
    table = at.dataframe[-1].value
    assert sorted(table["token_bytes"]) == ["WRONG: 128", "right"]
    assert not any("not comparable" in w.value for w in at.warning)  # one run plotted: nothing to compare
    at.multiselect(key="runs").set_value(list(table["id"])).run()
    assert_clean(at)
    assert any(w.value.startswith("val_bpb not comparable") and "128 tokens wrong" in w.value for w in at.warning)


def test_dataset_page_summarises_conversation_files(registry, tmp_path):
    from tests.test_dataset_inspector import conversation_folder

    d = conversation_folder(tmp_path / "sft")
    at = open_app("dataset", {"data": "another folder…"})
    at.text_input(key="data_dir").set_value(str(d)).run()
    assert_clean(at)
    assert metric(at, "Conversations").value == "33"
    assert metric(at, "Too long for a row").value == "0.0%"  # 2048 by default: the 400-word one fits
    at.number_input(key="seq_len").set_value(256).run()
    assert_clean(at)
    assert metric(at, "Too long for a row").value == "3.0%" and metric(at, "Tool use").value == "3.0%"
    assert any("NaN" in e.value for e in at.error)
    hist = charts(at)[0][1][0]
    assert hist["count"].sum() == 33
    assert list(at.dataframe[-1].value["file"]) == ["a.jsonl", "b.jsonl"]


def test_tokenizer_page_takes_a_document_from_a_shard(registry):
    at = open_app("tokenizer", {"source": "a shard document"})
    assert not at.text_area  # the text comes from the shard
    assert any(c.value.startswith("Document 0 of ") for c in at.caption)
    first = metric(at, "Tokens in the text").value
    at.number_input(key="doc").set_value(7).run()
    assert_clean(at)
    assert any(c.value.startswith("Document 7 of ") for c in at.caption) and int(metric(at, "Tokens in the text").value) > 0
    at.number_input(key="doc").set_value(10**8).run()
    assert_clean(at)
    assert any("documents (0.." in e.value for e in at.error)
    assert first
