"""
Dataset inspector benchmark: the exact token count of one large shard against a bare tiktoken loop.

    python -m bench.dataset                  # a 1 GB shard (generated once into --work, then reused)
    python -m bench.dataset --size-mb 20     # a quick run

The shard is the bundled corpus's documents (scripts.demo's) repeated until it holds --size-mb of UTF-8
text, written row group by row group (1,024 documents each, as upstream's shards are). The tokenizer is
a 2,048-token BPE trained on the corpus. Each pass runs in its own fresh process, so its peak RSS above
that process's baseline is its own:
- bare: per row group, `read_row_group(..).to_pylist()` then `encode_ordinary_batch(num_threads=cores)`;
- inspector: `nanochat.shards.scan_shard` with the tokenizer (statistics, duplicates, histogram and the
  exact count in the same pass), then `registry.datasets` re-opening the inspected shard.

Targets (issue 13): throughput >= 0.8x the bare loop; peak RSS above baseline <= 300 MB; re-opening an
inspected shard <= 50 ms of data work. Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROW_GROUP_DOCS = 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def reset_peak() -> None:
    """Linux: make the peak RSS (VmHWM) restart from the current RSS, so a pass's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux


def make_shard(path: Path, size_mb: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scripts.demo import corpus_documents

    docs = [d for _, d in corpus_documents()]
    target, written, k = size_mb * 1_000_000, 0, 0
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as w:
        while written < target:
            batch = []
            while len(batch) < ROW_GROUP_DOCS and written < target:
                d = docs[k % len(docs)] + ("" if k < len(docs) else f" [{k // len(docs)}]")  # not all exact duplicates
                batch.append(d)
                written += len(d.encode("utf-8"))
                k += 1
            w.write_table(pa.table({"text": batch}), row_group_size=ROW_GROUP_DOCS)
    os.replace(tmp, path)


def make_tokenizer(directory: Path) -> None:
    from nanochat.tokenizer import Tokenizer
    from scripts.demo import corpus_documents

    docs = [d for _, d in corpus_documents(1_000_000)]
    Tokenizer.train_from_iterator(docs, 2048).save(directory)


def child(mode: str, shard: Path, tokenizer_dir: Path, db: Path) -> dict:
    from nanochat.tokenizer import Tokenizer, encode_threads

    tok = Tokenizer.from_directory(tokenizer_dir)
    cores = encode_threads()  # what the inspector uses
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    if mode == "bare":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(shard)
        tokens = 0
        for i in range(pf.num_row_groups):
            texts = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            tokens += sum(map(len, tok.enc.encode_ordinary_batch(texts, num_threads=cores)))
        return {"tokens": tokens, "seconds": time.perf_counter() - t0, "peak_above_mb": peak_mb() - base}
    from registry import open_store

    with open_store(db) as store:
        report = store.inspect_dataset(shard.parent, tokenizer_dir, exact=True)
        seconds = time.perf_counter() - t0
        peak = peak_mb() - base
        t1 = time.perf_counter()
        again = store.inspect_dataset(shard.parent, tokenizer_dir, exact=True)
        reopen = time.perf_counter() - t1
    assert again.inspected == 0, "the re-opened shard was read again"
    return {"tokens": report.tokens, "seconds": seconds, "peak_above_mb": peak, "reopen_ms": reopen * 1000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__.splitlines()[1])
    p.add_argument("--size-mb", type=int, default=1024, help="text in the generated shard, MB (default 1024)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nanochat-bench-dataset",
                   help="where the shard and tokenizer are generated (and reused by later runs)")
    p.add_argument("--child", nargs=4, metavar=("MODE", "SHARD", "TOKENIZER", "DB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, shard, tok, db = args.child
        print(json.dumps(child(mode, Path(shard), Path(tok), Path(db))))
        return 0
    data = args.work / f"shards_{args.size_mb}mb"
    data.mkdir(parents=True, exist_ok=True)
    shard = data / "shard_00000.parquet"
    if not shard.exists():
        print(f"generating a {args.size_mb} MB shard in {shard} ...", file=sys.stderr, flush=True)
        make_shard(shard, args.size_mb)
    tok_dir = args.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        make_tokenizer(tok_dir)
    db = args.work / f"bench_{os.getpid()}.sqlite"
    results = {}
    for mode in ("bare", "inspector"):
        out = subprocess.run([sys.executable, "-m", "bench.dataset", "--child", mode, str(shard), str(tok_dir), str(db)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    for f in db.parent.glob(db.name + "*"):
        f.unlink()
    bare, insp = results["bare"], results["inspector"]
    assert bare["tokens"] == insp["tokens"], (bare["tokens"], insp["tokens"])
    mb = shard.stat().st_size / 1e6
    print(f"shard_file_mb: {mb:.1f}")
    print(f"text_mb: {args.size_mb}")
    print(f"cores: {os.cpu_count()}")
    print(f"tokens: {insp['tokens']}")
    print(f"bare_encode_s: {bare['seconds']:.2f}")
    print(f"inspector_exact_s: {insp['seconds']:.2f}")
    print(f"inspector_text_mb_per_s: {args.size_mb / insp['seconds']:.2f}")
    print(f"throughput_vs_bare: {bare['seconds'] / insp['seconds']:.3f}")
    print(f"bare_peak_rss_above_baseline_mb: {bare['peak_above_mb']:.1f}")
    print(f"inspector_peak_rss_above_baseline_mb: {insp['peak_above_mb']:.1f}")
    print(f"reopen_inspected_ms: {insp['reopen_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
