"""The dataset inspector and the tokenizer playground on real shards made from the corpus: statistics,
exact token counts (against a bare tiktoken loop), planted duplicates and noise, a corrupt file, a shard
without a text column, a validation shard with too few row groups for 2 ranks (each reported, never a
traceback), the registry cache (unchanged shards are not read again), the token_bytes check (a
token_bytes.pt built the old way is flagged, a right one passes), and "what did step N see" against the
batches the training loop itself used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import shards
from nanochat import tokenizer_inspect as ti
from nanochat.tokenizer import Tokenizer
from registry import open_store
from tests.modelkit import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "tests" / "fixtures" / "upstream"


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{name}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base dir: corpus shards (scripts.demo's writer) and a tokenizer trained on the corpus."""
    from scripts.demo import write_shards

    b = tmp_path_factory.mktemp("data_base")
    write_shards(b / "base_data", 300_000)
    tiny_tokenizer(300).save(b / "tokenizer")
    return b


def texts_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


@pytest.fixture
def messy(base, tmp_path) -> Path:
    """The corpus shards plus: planted duplicates, noise and an empty document; a corrupt file; a shard
    without a text column; and a validation shard of one row group."""
    d = tmp_path / "messy"
    shutil.copytree(base / "base_data", d)
    docs = texts_of(d / "shard_00000.parquet")[:300]
    near = docs[10].replace(" the ", " a ", 1) + " Amen."
    planted = docs + docs[:5] + ["", "bell\x07 rings", "broken \ufffd text", near]
    pq.write_table(pa.table({"text": planted}), d / "shard_00000a.parquet", row_group_size=64)
    (d / "shard_00000b.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"id": [1, 2, 3]}), d / "shard_00000c.parquet")
    val = texts_of(d / "shard_00001.parquet")
    pq.write_table(pa.table({"text": val}), d / "shard_00001.parquet", row_group_size=len(val))  # one row group
    return d


# ---------------------------------------------------------------------- statistics and findings


def test_scan_counts_documents_and_exact_tokens_like_a_bare_loop(base):
    tok = Tokenizer.from_directory(base / "tokenizer")
    path = base / "base_data" / "shard_00000.parquet"
    seen = []
    stats = shards.scan_shard(path, tok, threads=2, progress=seen.append, tokenizer_key="k")
    docs = texts_of(path)
    bare = sum(len(tok.enc.encode_ordinary(t)) for t in docs)
    assert (stats.rows, stats.docs, stats.chars, stats.tokens, stats.error) == (len(docs), len(docs), sum(map(len, docs)), bare, None)
    assert stats.row_groups == pq.ParquetFile(path).num_row_groups and sum(stats.hist) == len(docs)
    assert len(seen) == stats.row_groups and seen[-1].rows_done == len(docs) and seen[-1].bytes_done == seen[-1].bytes_total
    estimate = shards.estimate_tokens(stats, tok)
    assert abs(estimate - bare) / bare < 0.1


def test_planted_problems_are_each_reported(messy):
    stats = [shards.scan_shard(f) for f in sorted(messy.glob("*.parquet"))]
    by = {s.name: s for s in stats}
    planted = by["shard_00000a.parquet"]
    assert (planted.duplicates, planted.empty, planted.noisy) == (5, 1, 2)
    assert "not a readable parquet file" in by["shard_00000b.parquet"].error
    assert by["shard_00000c.parquet"].error == "no 'text' column (columns: id)"
    one = shards.dataset_findings(stats, world_size=1)
    assert one.validation == "shard_00001.parquet" and "shard_00000b.parquet" in one.train
    messages = [f.message for f in one.findings if f.level == "error"]
    assert len(messages) == 2 and all("training would stop" in m for m in messages)
    two = shards.dataset_findings(stats, world_size=2)
    assert any("validation shard shard_00001.parquet has 1 row group(s): with 2 ranks" in f.message
               for f in two.findings if f.level == "error")
    assert any("5 exact duplicate" in f.message for f in two.findings)


def test_near_duplicates_found_on_a_sample(messy):
    docs = shards.sample_documents([messy / "shard_00000a.parquet"], max_docs=1000, groups_per_shard=10)
    pairs = shards.near_duplicates(docs)
    rows = {(p.a.row_group * 64 + p.a.row, p.b.row_group * 64 + p.b.row) for p in pairs}
    assert (10, 308) in rows  # the edited copy of document 10
    assert all(p.similarity >= 0.7 for p in pairs)


def test_search_random_and_read_documents(base):
    files = sorted((base / "base_data").glob("*.parquet"))
    hits = list(shards.search(files, "thou", limit=3))
    assert len(hits) == 3 and all("thou" in h.text.lower() for h in hits)
    d = hits[0].ref
    assert shards.read_document(files[0], d.row_group, d.row).text == hits[0].text
    assert shards.random_documents(files, 2, seed=1) == shards.random_documents(files, 2, seed=1)
    with pytest.raises(ValueError, match="row groups"):
        shards.read_document(files[0], 99, 0)


# ---------------------------------------------------------------------- the registry cache


def test_registry_reads_only_changed_shards_and_keeps_exact_counts(base, tmp_path):
    data = tmp_path / "base_data"
    shutil.copytree(base / "base_data", data)
    with open_store(tmp_path / "reg.sqlite") as s:
        first = s.inspect_dataset(data, base / "tokenizer")
        assert (first.inspected, first.reused, first.tokens_exact) == (2, 0, False)
        exact = s.inspect_dataset(data, base / "tokenizer", exact=True)
        assert exact.tokens_exact and exact.inspected == 2
        again = s.inspect_dataset(data, base / "tokenizer")  # a sampled request keeps the exact counts
        assert (again.inspected, again.reused, again.tokens, again.tokens_exact) == (0, 2, exact.tokens, True)
        val = data / "shard_00001.parquet"
        pq.write_table(pa.table({"text": texts_of(val)[:50]}), val, row_group_size=10)
        changed = s.inspect_dataset(data, base / "tokenizer")
        assert (changed.inspected, changed.reused) == (1, 1)
        assert changed.shards[-1].stats.docs == 50 and changed.shards[-1].stats.row_groups == 5
        assert changed.shards[-1].tokens(changed.tokenizer).exact is False  # the old exact count went with the old file


def test_migration_from_schema_1_adds_the_dataset_tables(tmp_path):
    import sqlalchemy as sa

    from registry import db as regdb
    from tests.registry_kit import make_version_1

    path = tmp_path / "old.sqlite"
    with open_store(path):
        pass
    make_version_1(path)
    database = regdb.Database(path, create=False)
    assert database.migrate()[:2] == (1, regdb.SCHEMA_VERSION)
    database.close()
    engine = sa.create_engine(f"sqlite:///{path}")
    assert {"dataset_shards", "shard_token_counts"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
    with open_store(path) as s:  # the migrated registry opens at the current version
        assert s.db.schema_version() == regdb.SCHEMA_VERSION


# ---------------------------------------------------------------------- the tools


def test_dataset_inspector_cli_reports_problems_without_traceback(messy, base, tmp_path):
    r = tool("dataset_inspector", str(messy), "--tokenizer", str(base / "tokenizer"), "--db", str(tmp_path / "r.sqlite"),
             "--world-size", "2", "--json", "--run-steps", "100", "--run-batch", "4096")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    errors = [f["message"] for f in out["findings"] if f["level"] == "error"]
    assert len(errors) == 3 and "Traceback" not in r.stderr
    assert out["validation"] == "shard_00001.parquet" and out["epochs"]["epochs"] > 0
    assert {s["name"]: s["duplicates"] for s in out["shards"]}["shard_00000a.parquet"] == 5
    assert "rows" in r.stderr and "MB" in r.stderr  # progress
    text = tool("dataset_inspector", str(base), "--db", "none")
    assert text.returncode == 0 and "ok for 1 rank(s)" in text.stdout
    for bad in ([str(tmp_path / "nowhere")], [str(base), "--tokenizer", str(tmp_path)]):
        r = tool("dataset_inspector", *bad, "--db", "none")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def old_way_token_bytes(tok: Tokenizer) -> list[int]:
    """token_bytes.pt as upstream built it before 2ce972a (UPSTREAM_OUTPUTS.md §6), written out here."""
    specials = set(tok.enc._special_tokens.values())
    return [0 if i in specials else len(tok.enc.decode([i]).encode("utf-8")) for i in range(tok.get_vocab_size())]


def test_token_bytes_check_flags_the_old_build_and_passes_a_right_one(base, tmp_path):
    import torch

    right = tmp_path / "right"
    shutil.copytree(base / "tokenizer", right)
    old = tmp_path / "old"
    shutil.copytree(base / "tokenizer", old)
    tok = Tokenizer.from_directory(old)
    torch.save(torch.tensor(old_way_token_bytes(tok), dtype=torch.int32), old / "token_bytes.pt")
    expected = [i for i, (a, b) in enumerate(zip(old_way_token_bytes(tok), tok.computed_token_bytes())) if a != b]
    assert expected and set(range(128, 256)) <= set(expected)
    r = tool("tokenizer_playground", "--tokenizer", str(old), "--check-token-bytes", "--json")
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)["token_bytes"]
    assert out["wrong_ids"] == expected and out["old_method"] is True and out["ok"] is False
    r = tool("tokenizer_playground", "--tokenizer", str(right), "--check-token-bytes")
    assert r.returncode == 0 and "token_bytes.pt is right" in r.stdout
    classic = ti.check_token_bytes(Tokenizer.from_directory(UPSTREAM / "classic" / "tokenizer"))
    assert classic.wrong_ids == list(range(128, 256)) and classic.old_method  # as UPSTREAM_OUTPUTS.md §6 says
    (right / "token_bytes.pt").unlink()
    r = tool("tokenizer_playground", "--tokenizer", str(right), "--check-token-bytes")
    assert r.returncode == 1 and r.stderr.startswith("error: no token_bytes.pt")


def test_tokenizer_playground_splits_and_compares(base):
    r = tool("tokenizer_playground", "--tokenizer", str(base / "tokenizer"), "--text", "<|bos|>Hi é\n",
             "--compare", str(UPSTREAM / "current" / "tokenizer"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    kinds = [t["kind"] for t in out["text"]["tokens"]]
    assert kinds[0] == "special" and "partial" in kinds  # é is two byte tokens in a 300-token vocabulary
    assert "".join(t["text"] for t in out["text"]["tokens"] if t["kind"] != "partial").startswith("<|bos|>Hi")
    assert [t["tokens"] for t in out["compare"]["tokenizers"]][0] == len(out["text"]["tokens"])
    sample = tool("tokenizer_playground", "--tokenizer", str(base / "tokenizer"), "--compare", str(base / "tokenizer"))
    assert sample.returncode == 0 and "validation shard" in sample.stdout
    assert tool("tokenizer_playground", "--tokenizer", "/nonexistent").returncode == 1


# ---------------------------------------------------------------------- what did step N see


def test_step_n_replay_matches_the_batches_the_training_loop_used(base, tmp_path, monkeypatch):
    """Train in-process, recording every micro-batch the loop takes from its loader; the replay of a step
    before the first checkpoint (fresh loader) and after it (restored state) must give the same tokens."""
    import torch

    from nanochat.data_replay import ReplayError, step_batch
    from scripts import base_train

    run_base = tmp_path / "base"
    run_base.mkdir()
    os.symlink(base / "base_data", run_base / "base_data")
    os.symlink(base / "tokenizer", run_base / "tokenizer")
    seen: list[torch.Tensor] = []
    original = base_train.train_step

    def recording(fwd, optimizer, loader, grad_accum):
        inner = loader.next_batch

        def next_batch():
            x, y = inner()
            seen.append(torch.cat([x, y[:, -1:]], dim=1).clone())
            return x, y

        loader.next_batch = next_batch
        try:
            return original(fwd, optimizer, loader, grad_accum)
        finally:
            del loader.next_batch

    monkeypatch.setattr(base_train, "train_step", recording)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run_base))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = ["--model-tag", "t", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
             "--window-pattern", "L", "--device-batch-size", "2", "--total-batch-size", "128", "--num-iterations", "6",
             "--eval-every", "-1", "--save-every", "3", "--device", "cpu", "--compile", "off", "--warmup-steps", "1"]
    assert base_train.main(flags) == 0
    grad_accum = 2
    assert len(seen) == 6 * grad_accum
    run_dir = run_base / "base_checkpoints" / "t"
    for step in (1, 4, 5):
        b = step_batch(run_dir, step)
        assert b.grad_accum == grad_accum and b.restored_from == (3 if step >= 3 else None)
        for k, micro in enumerate(b.micro_batches):
            assert torch.equal(torch.tensor(micro.rows), seen[step * grad_accum + k]), (step, k)
            assert sum(s.length for s in micro.segments) == 2 * 33
            for s in micro.segments:
                if s.shard is not None:  # a document read after the restore: its source row holds its text
                    doc = shards.read_document(base / "base_data" / s.shard, s.row_group, s.doc_row).text
                    assert ("<|bos|>" + doc).startswith(s.text)
    with pytest.raises(ReplayError, match="outside this run"):
        step_batch(run_dir, 6)


def test_upstream_run_gets_its_approximate_position(upstream_copy):
    from nanochat.data_replay import ReplayError, step_batch

    run = upstream_copy("current") / "base_checkpoints" / "d2"
    with pytest.raises(ReplayError, match="not trained by our trainer"):
        step_batch(run, 10)


# ---------------------------------------------------------------------- conversation files (SFT data)

CHAT_TOKENIZER = UPSTREAM / "current" / "tokenizer"


def conversation_folder(d: Path) -> Path:
    """Two files: short plain conversations, one with a tool call and one far too long; and a file with an
    invalid line."""
    d.mkdir()
    lines = [json.dumps([{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}])
             for i in range(30)]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
        {"type": "text", "text": "5."}]}]}))
    lines.append(json.dumps([{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]))
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "b.jsonl").write_text("not json\n" + lines[0] + "\n")
    return d


def test_dataset_inspector_summarises_conversation_files_against_the_sequence_length(tmp_path):
    from nanochat import conversation_file as cf

    d = conversation_folder(tmp_path / "sft")
    r = tool("dataset_inspector", str(d), "--tokenizer", str(CHAT_TOKENIZER), "--seq-len", "256", "--json")
    assert r.returncode == 1, r.stderr  # conversations too long for a row (NaN) and an invalid line stop SFT
    out = json.loads(r.stdout)
    template = Tokenizer.from_directory(CHAT_TOKENIZER).chat_template()
    expected = cf.summarize(cf.read_conversations(d / "a.jsonl") + cf.read_conversations(d / "b.jsonl"), template, 256)
    s = out["summary"]
    assert out["kind"] == "conversations" and [Path(f["path"]).name for f in out["files"]] == ["a.jsonl", "b.jsonl"]
    assert (s["conversations"], s["invalid"], s["too_long"], s["tool_use"]) == (33, 1, 1, 1)
    assert s == json.loads(json.dumps(expected.as_dict()))  # the conversation builder's summary, not a second one
    assert s["too_long_share"] == pytest.approx(1 / 33) and 0 < s["supervised_share"] < 1
    levels = {f["level"] for f in out["findings"]}
    assert levels == {"error"} and any("NaN" in f["message"] for f in out["findings"])
    text = tool("dataset_inspector", str(d / "a.jsonl"), "--tokenizer", str(CHAT_TOKENIZER), "--seq-len", "4096")
    assert text.returncode == 0 and "ok for SFT at sequence length 4096" in text.stdout and "a.jsonl" in text.stdout
    bad = tool("dataset_inspector", str(d / "a.jsonl"), "--tokenizer", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_a_base_dir_with_shards_and_a_conversation_file_is_inspected_as_shards(base, tmp_path):
    from nanochat.conversation_file import conversation_files

    d = tmp_path / "b"
    shutil.copytree(base, d)
    (d / "identity_conversations.jsonl").write_text('[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]\n')
    assert conversation_files(d) == [] and conversation_files(d / "identity_conversations.jsonl")


def test_tokenizer_playground_takes_a_shard_document_as_the_text(base):
    shard = base / "base_data" / "shard_00000.parquet"
    pf = pq.ParquetFile(shard)
    index = pf.metadata.row_group(0).num_rows + 3  # the 4th document of the second row group
    r = tool("tokenizer_playground", "--tokenizer", str(base / "tokenizer"), "--shard-doc", f"{shard}:{index}", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["document"]["row_group"], out["document"]["row"], out["document"]["count"]) == (1, 3, pf.metadata.num_rows)
    text = shards.read_document(shard, 1, 3).text
    tok = Tokenizer.from_directory(base / "tokenizer")
    assert [t["id"] for t in out["text"]["tokens"]] == tok.encode(text)  # as the training loader encodes it
    r = tool("tokenizer_playground", "--tokenizer", str(base / "tokenizer"), "--shard-doc", f"{shard}:{10**9}")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "documents" in r.stderr
    r = tool("tokenizer_playground", "--tokenizer", str(base / "tokenizer"), "--shard-doc", "no-index")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
