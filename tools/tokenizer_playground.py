"""
Tokenizer playground: how a nanochat tokenizer splits text, how tokenizers compare, and whether its
token_bytes.pt is right.

    python tools/tokenizer_playground.py --tokenizer ~/.cache/nanochat/tokenizer --text "Hello world"
    python tools/tokenizer_playground.py --tokenizer A --compare B C            # on a validation-shard sample
    python tools/tokenizer_playground.py --tokenizer A --shard-doc ~/.cache/nanochat/base_data/shard_00000.parquet:42
    python tools/tokenizer_playground.py --tokenizer A --check-token-bytes --json

A front end over `nanochat.tokenizer_inspect` (the same code as the app's Tokenizer page): it parses,
calls, formats. A tokenizer directory holds our tokenizer.json or upstream's tokenizer.pkl (read by the
restricted unpickler, never executed). Without --text, --compare uses a sample of the validation shard
of the data folder (--data; default: the base dir the tokenizer lives in).

--shard-doc SHARD:N takes the text from the N-th document of a parquet shard (encoded as training does:
special-token names in it stay text); --json adds "document": {shard, index, count, row_group, row}.

Exit codes: 0 done (with --check-token-bytes: token_bytes.pt is right); 3 token_bytes.pt differs from the
tokenizer (--json lists the wrong ids); 1 a tokenizer, data folder or shard document that cannot be read, or no
token_bytes.pt to check; 2 bad arguments. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WRONG_TOKEN_BYTES = 0, 1, 2, 3
SAMPLE_DOCS = 500


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def shard_doc_spec(spec: str) -> tuple[Path, int]:
    path, sep, index = spec.rpartition(":")
    if not sep or not path or not index.strip().isdigit():
        raise argparse.ArgumentTypeError(f"takes SHARD.parquet:N (N a document number from 0), got {spec!r}")
    return Path(path).expanduser(), int(index)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tokenizer_playground", description="Split text into tokens, compare tokenizers, check "
                      "token_bytes.pt.")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json or tokenizer.pkl")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to split into tokens (special tokens such as <|bos|> typed in it count as such)")
    src.add_argument("--shard-doc", metavar="SHARD:N", type=shard_doc_spec,
                     help="split the N-th document (0-based, across row groups) of a parquet shard, encoded as "
                          "training encodes it (no special tokens)")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=[],
                   help="more tokenizer folders: tokens, bytes and bytes per token of each on --text, else on a "
                        f"sample of {SAMPLE_DOCS} validation documents")
    p.add_argument("--data", metavar="DIR", help="data folder for the --compare sample (default: the tokenizer's base dir)")
    p.add_argument("--check-token-bytes", action="store_true",
                   help="recompute token_bytes from the tokenizer and report ids whose stored value differs (exit 3)")
    p.add_argument("--search", metavar="TEXT", help="vocabulary entries containing TEXT")
    p.add_argument("--longest", type=int, default=0, metavar="N", help="the N longest tokens (in bytes)")
    p.add_argument("--json", action="store_true", help="print one JSON object (shape documented in README)")
    return p


def _load(directory: str):
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer_inspect import fingerprint, tokenizer_file

    tok = Tokenizer.from_directory(directory)
    return tok, {"dir": str(Path(directory).resolve()), "file": tokenizer_file(directory).name,
                 "fingerprint": fingerprint(directory), "vocab_size": tok.get_vocab_size()}


def _sample_texts(args) -> tuple[list[str], str]:
    from nanochat import shards

    folder = Path(args.data) if args.data else Path(args.tokenizer).resolve().parent
    _, files = shards.resolve_data_dir(folder)
    docs = shards.sample_documents(files[-1:], max_docs=SAMPLE_DOCS)
    if not docs:
        raise ValueError(f"the validation shard {files[-1]} has no readable documents")
    return [d.text for d in docs], f"{len(docs)} documents of the validation shard {files[-1].name}"


def _shard_document(spec: tuple[Path, int]) -> tuple[str, dict]:
    from nanochat import shards

    path, index = spec
    doc, count = shards.document_at(path, index)
    return doc.text, {"shard": str(path.resolve()), "index": index, "count": count, "row_group": doc.ref.row_group,
                      "row": doc.ref.row}


def run(args) -> tuple[dict, list[str], int]:
    from nanochat import tokenizer_inspect as ti

    tok, info = _load(args.tokenizer)
    out: dict = {"tokenizer": info}
    lines = [f"tokenizer {info['dir']} ({info['file']}, {info['vocab_size']:,} tokens, digest {info['fingerprint']})"]
    code = EXIT_OK
    specials = args.shard_doc is None  # a training document's "<|bos|>" is seven characters, as the loader encodes it
    if args.shard_doc is not None:
        args.text, out["document"] = _shard_document(args.shard_doc)
        lines.append(f"document {out['document']['index']} of {out['document']['count']:,} in {out['document']['shard']} "
                     f"(row group {out['document']['row_group']}, row {out['document']['row']})")
    if args.text is not None:
        pieces = ti.split(tok, args.text, specials_in_text=specials)
        c = ti.counts(tok, [args.text], specials_in_text=specials)
        out["text"] = {"tokens": [{"id": p.id, "text": p.text, "shown": p.shown, "kind": p.kind, "bytes": len(p.raw)}
                                  for p in pieces],
                       "counts": {"tokens": len(pieces), "bytes": c.bytes, "chars": c.chars,
                                  "bytes_per_token": round(c.bytes / len(pieces), 4) if pieces else 0.0}}
        lines.append(" ".join(f"[{p.id}]{p.shown}" for p in pieces))
        lines.append(f"{len(pieces)} tokens, {c.bytes} bytes, {c.chars} characters, "
                     f"{out['text']['counts']['bytes_per_token']:.2f} bytes/token")
    if args.compare:
        texts, on = ([args.text], "the --text" if specials else "the --shard-doc") if args.text is not None \
            else _sample_texts(args)
        toks = {info["dir"]: tok, **{str(Path(d).resolve()): _load(d)[0] for d in args.compare}}
        result = ti.compare(toks, texts, specials_in_text=args.text is not None and specials)
        base_bpt = next(iter(result.values())).bytes_per_token
        out["compare"] = {"on": on, "tokenizers": [
            {"dir": d, "tokens": c.tokens, "bytes": c.bytes, "chars": c.chars, "bytes_per_token": round(c.bytes_per_token, 4),
             "bpb_factor": round(base_bpt / c.bytes_per_token, 4) if c.bytes_per_token else None}
            for d, c in result.items()]}
        lines.append(f"on {on}:")
        lines += [f"  {t['tokens']:>9,} tokens  {t['bytes_per_token']:6.3f} bytes/token  x{t['bpb_factor']} bpb per equal "
                  f"token loss  {t['dir']}" for t in out["compare"]["tokenizers"]]
    if args.search is not None or args.longest:
        vocab = ti.vocabulary(tok)
        hits = [v for v in vocab if args.search is not None and args.search.encode("utf-8") in v.raw]
        longest = ti.longest(vocab, args.longest) if args.longest else []
        out["vocabulary"] = {"search": [{"id": v.id, "shown": v.shown, "bytes": len(v.raw)} for v in hits],
                             "longest": [{"id": v.id, "shown": v.shown, "bytes": len(v.raw)} for v in longest]}
        if args.search is not None:
            lines.append(f"{len(hits)} tokens contain {args.search!r}: " + " ".join(f"[{v.id}]{v.shown}" for v in hits[:50]))
        if longest:
            lines.append("longest: " + " ".join(f"[{v.id}]{v.shown}" for v in longest))
    if args.check_token_bytes:
        check = ti.check_token_bytes(tok)
        if not check.present:
            raise FileNotFoundError(f"no token_bytes.pt in {info['dir']} to check")
        out["token_bytes"] = {"path": check.path, "ok": check.ok, "old_method": check.old_method,
                              "stored_sum": check.stored_sum, "correct_sum": check.correct_sum,
                              "wrong_ids": check.wrong_ids,
                              "wrong": [{"id": d.id, "token": d.token, "stored": d.stored, "correct": d.correct}
                                        for d in check.wrong]}
        if check.ok:
            lines.append(f"token_bytes.pt is right ({check.vocab_size:,} entries, sum {check.correct_sum:,})")
        else:
            code = EXIT_WRONG_TOKEN_BYTES
            how = " (built the old way, before upstream's fix 2ce972a)" if check.old_method else ""
            lines.append(f"token_bytes.pt is WRONG for {len(check.wrong)} of {check.vocab_size:,} tokens{how}: sum "
                         f"{check.stored_sum:,} instead of {check.correct_sum:,}; val_bpb of runs that used it is not "
                         f"comparable with runs that used a right one. Wrong ids: "
                         + ", ".join(str(i) for i in check.wrong_ids[:40]) + (" ..." if len(check.wrong) > 40 else ""))
    if len(out) == 1:  # nothing asked: the chat template's special tokens
        out["special_tokens"] = [{"name": n, "id": i, "role": r} for n, i, r in ti.special_tokens(tok)]
        lines += [f"  {n:<20} {i if i is not None else '-':>6}  {r}" for n, i, r in ti.special_tokens(tok)]
    return out, lines, code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.dataloader import DataError
    from nanochat.tokenizer import TokenizerError

    try:
        out, lines, code = run(args)
    except (TokenizerError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(out, ensure_ascii=False) if args.json else "\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
