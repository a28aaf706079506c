"""
Train the BPE tokenizer on the pretraining shards (upstream's tok_train, our file format and upstream's).

    python -m scripts.tok_train --vocab-size 2048
    python -m scripts.tok_train --export-pickle     # add tokenizer.pkl to a tokenizer.json written before

Reads the train shards (all but the last, which is validation) of `$NANOCHAT_BASE_DIR/base_data_climbmix/`
or `base_data/`, cropping each document to `--doc-cap` characters and stopping after `--max-chars`, trains
with rustbpe (upstream's split pattern and special tokens) and writes `tokenizer.json`, upstream's
`tokenizer.pkl` and `token_bytes.pt` into `$NANOCHAT_BASE_DIR/tokenizer/`. It never overwrites an existing
tokenizer unless `--force` is given, because checkpoints trained with it would silently stop matching.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.dataloader import DataError, find_data_dir, iter_texts, list_parquet_files, split_files
from nanochat.tokenizer import OUR_FILE, UPSTREAM_FILE, Tokenizer, TokenizerError, check_vocab_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.tok_train", description="Train the BPE tokenizer on the train shards.")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters of text")
    p.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters of each document")
    p.add_argument("--vocab-size", type=int, default=32768, help="tokens in all, the 9 special tokens included")
    p.add_argument("--force", action="store_true", help="overwrite an existing tokenizer")
    p.add_argument("--export-pickle", action="store_true",
                   help="do not train: write upstream's tokenizer.pkl from the existing tokenizer.json (base dirs "
                        "made before we wrote it), so upstream's scripts can load them")
    return p


def capped_texts(files: list[Path], max_chars: int, doc_cap: int):
    total = 0
    for text in iter_texts(files):
        piece = text[:doc_cap]
        yield piece
        total += len(piece)
        if total >= max_chars:
            return


def train_tokenizer(base_dir: Path, vocab_size: int, max_chars: int, doc_cap: int) -> Tokenizer:
    files = split_files(list_parquet_files(find_data_dir(base_dir)), "train")
    tok = Tokenizer.train_from_iterator(capped_texts(files, max_chars, doc_cap), vocab_size)
    tok.save(base_dir / "tokenizer")
    return tok


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # the flags first: no data is read for a run that cannot succeed
        check_vocab_size(args.vocab_size)
        for flag, value in (("--max-chars", args.max_chars), ("--doc-cap", args.doc_cap)):
            if value < 1:
                raise TokenizerError(f"{flag} must be at least 1, got {value}")
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base_dir = get_base_dir()
    out = base_dir / "tokenizer"
    if args.export_pickle:
        return export_pickle(out)
    if not args.force and ((out / OUR_FILE).exists() or (out / UPSTREAM_FILE).exists()):
        print(f"error: {out} already holds a tokenizer; pass --force to replace it (checkpoints trained with the "
              "old one will no longer match)", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        tok = train_tokenizer(base_dir, args.vocab_size, args.max_chars, args.doc_cap)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sample = "To be, or not to be, that is the question."
    ids = tok.encode(sample)
    print(f"trained a {tok.get_vocab_size():,}-token tokenizer in {time.time() - t0:.1f}s -> {out}")
    print(f"{len(sample)} chars -> {len(ids)} tokens: {[tok.id_to_token(i) for i in ids]}")
    return 0


def export_pickle(directory: Path) -> int:
    if not (directory / OUR_FILE).is_file():
        print(f"error: no tokenizer in {directory} ({OUR_FILE} missing)", file=sys.stderr)
        return 2
    try:
        path = Tokenizer.from_directory(directory).save_upstream_pickle(directory)
    except (OSError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
