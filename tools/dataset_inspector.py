"""
Dataset inspector: what a folder of nanochat parquet shards holds, before you train on it.

    python tools/dataset_inspector.py ~/.cache/nanochat                       # base_data_climbmix/ or base_data/
    python tools/dataset_inspector.py DIR --tokenizer ~/.cache/nanochat/tokenizer --exact --world-size 8
    python tools/dataset_inspector.py DIR --step-of ~/.cache/nanochat/base_checkpoints/d20 --step 1200
    python tools/dataset_inspector.py ~/.cache/nanochat/identity_conversations.jsonl --seq-len 2048   # SFT data

Per shard: rows, row groups, documents, characters, tokens (sampled, or exact with --exact), empty,
duplicate and noisy documents, errors (unreadable file, no text column); which shard is validation and
whether it has a row group for each of --world-size ranks; near-duplicates on a sample (MinHash);
with --run-steps/--run-batch, how many epochs a run makes. --step-of RUN --step N lists the documents
rank 0 trained on at step N of a run of our trainer (exact), or says where an upstream run was.

Conversation files (SFT data: a `.jsonl` file, or a folder of them without parquet shards): count, token
lengths against --seq-len, the share too long for an SFT row (never trained on; they make the loss NaN),
the share of supervised tokens and of conversations with tool use, per file and together. Rendering and
the summary are `nanochat.conversation` / `nanochat.conversation_file`'s (the conversation builder's).

A front end over `registry.datasets` (results are cached in the registry, so a second run reads only
changed shards) and `nanochat.shards`, the same code as the app's Dataset page. Progress with an ETA
goes to stderr; Ctrl-C stops a pass (shards finished before it stay cached).

Exit codes: 0 inspected, nothing that stops training; 1 a finding that stops training (an unreadable
shard, a validation shard with fewer row groups than ranks, a conversation file with invalid lines or
conversations too long for an SFT row) or a step that cannot be replayed;
2 bad arguments or a folder, tokenizer or registry that cannot be used; 130 stopped. Errors: one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
DEFAULT_SEQ_LEN = 2048  # upstream chat_sft's --max-seq-len


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dataset_inspector", description="Inspect a folder of nanochat parquet shards.")
    p.add_argument("dir", metavar="DIR", help="a base dir (its base_data_climbmix/ or base_data/), a folder of *.parquet, "
                                              "or conversation files: a FILE.jsonl or a folder of them")
    p.add_argument("--tokenizer", metavar="DIR", help="count tokens under this tokenizer (tokenizer.json or tokenizer.pkl)")
    p.add_argument("--exact", action="store_true", help="count every token (one streaming pass, all cores), not a sample")
    p.add_argument("--world-size", type=int, default=1, metavar="W",
                   help="ranks you will train with: the validation shard needs at least W row groups (default 1)")
    p.add_argument("--near-dup-sample", type=int, default=2000, metavar="N",
                   help="documents sampled for near-duplicate detection (0 = skip; default 2000)")
    p.add_argument("--run-steps", type=int, metavar="N", help="with --run-batch: epochs a run of N steps makes")
    p.add_argument("--run-batch", type=int, metavar="TOKENS", help="tokens per optimizer step (total batch size)")
    p.add_argument("--step-of", metavar="RUN_DIR", help="a run's checkpoint folder: show what step --step trained on")
    p.add_argument("--step", type=int, metavar="N", help="the optimizer step for --step-of (0-based)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="N",
                   help="conversation files: the SFT sequence length; a conversation longer than N + 1 tokens never "
                        f"fits a row (default {DEFAULT_SEQ_LEN}, upstream chat_sft's --max-seq-len)")
    p.add_argument("--db", metavar="URL", help="registry that caches results (default: $NANOCHAT_REGISTRY_URL, else "
                                               "$NANOCHAT_BASE_DIR/registry.sqlite); 'none' keeps nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object (shape documented in README)")
    return p


class Ticker:
    """Progress lines on stderr, at most one a second."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or p.rows_done >= p.rows_total:
            self.last = now
            print(p.line(), file=sys.stderr, flush=True)


def report_json(report, dups, sample_n: int, epochs) -> dict:
    from nanochat.shards import HIST_EDGES

    shards = []
    for r in report.shards:
        s, t = r.stats, r.tokens(report.tokenizer)
        shards.append({"name": s.name, "path": s.path, "size": s.size, "rows": s.rows, "row_groups": s.row_groups,
                       "docs": s.docs, "chars": s.chars, "utf8_bytes": s.utf8_bytes, "empty": s.empty,
                       "duplicates": s.duplicates, "noisy": s.noisy, "invalid_utf8": s.invalid_utf8, "error": s.error,
                       "tokens": t.tokens if t else None, "tokens_exact": t.exact if t else None,
                       "validation": s.name == report.findings.validation, "cached": r.reused, "hist": list(s.hist)})
    return {"kind": "shards", "data_dir": report.data_dir, "world_size": report.world_size,
            "tokenizer": {"dir": report.tokenizer_dir, "fingerprint": report.tokenizer} if report.tokenizer else None,
            "tokens": report.tokens, "train_tokens": report.train_tokens, "tokens_exact": report.tokens_exact,
            "validation": report.findings.validation, "inspected": report.inspected, "reused": report.reused,
            "hist_edges": list(HIST_EDGES), "shards": shards,
            "findings": [{"level": f.level, "shard": f.shard, "message": f.message} for f in report.findings.findings],
            "near_duplicates": {"sample": sample_n, "pairs": [{"a": d.a.label(), "b": d.b.label(),
                                                               "similarity": round(d.similarity, 3)} for d in dups]},
            "epochs": epochs}


def report_lines(out: dict) -> list[str]:
    lines = [f"{out['data_dir']}: {len(out['shards'])} shards ({out['inspected']} read, {out['reused']} unchanged since the "
             f"last inspection)"]
    head = f"{'shard':<28} {'rows':>9} {'groups':>6} {'chars':>13} {'tokens':>13} {'empty':>6} {'dups':>6} {'noisy':>6}"
    lines.append(head)
    for s in out["shards"]:
        tokens = "-" if s["tokens"] is None else f"{s['tokens']:,}" + ("" if s["tokens_exact"] else "~")
        mark = " (validation)" if s["validation"] else ""
        if s["error"]:
            lines.append(f"{s['name']:<28} error: {s['error']}{mark}")
            continue
        lines.append(f"{s['name']:<28} {s['rows']:>9,} {s['row_groups']:>6} {s['chars']:>13,} {tokens:>13} {s['empty']:>6,} "
                     f"{s['duplicates']:>6,} {s['noisy']:>6,}{mark}")
    if out["tokens"] is not None:
        lines.append(f"tokens: {out['tokens']:,} in all, {out['train_tokens'] or 0:,} for training "
                     f"({'exact' if out['tokens_exact'] else 'estimated from samples (~); --exact counts every token'})")
    if out["epochs"] is not None:
        lines.append(f"a run of {out['epochs']['steps']:,} steps x {out['epochs']['batch']:,} tokens reads "
                     f"{out['epochs']['epochs']:.2f} epochs of the train shards")
    nd = out["near_duplicates"]
    if nd["sample"]:
        lines.append(f"near-duplicates (similarity >= 0.7) in a sample of {nd['sample']:,} documents: {len(nd['pairs'])} pairs")
        lines += [f"  {p['similarity']:.2f}  {p['a']}  ~  {p['b']}" for p in nd["pairs"][:10]]
    for f in out["findings"]:
        lines.append(f"{f['level']}: {f['message']}")
    if not any(f["level"] == "error" for f in out["findings"]):
        lines.append(f"ok for {out['world_size']} rank(s): validation is {out['validation']}")
    return lines


def step_report(run_dir: str, step: int, base_dir: str | None) -> tuple[dict, list[str]]:
    from nanochat.data_replay import step_batch

    b = step_batch(run_dir, step, base_dir=base_dir)
    micro = [{"rows": [list(r) for r in m.rows],
              "segments": [{"row": s.row, "offset": s.offset, "length": s.length, "doc_tokens": s.doc_tokens,
                            "shard": s.shard, "row_group": s.row_group, "doc_row": s.doc_row, "epoch": s.epoch,
                            "cropped": s.cropped, "text": s.text} for s in m.segments]} for m in b.micro_batches]
    out = {"run_dir": b.run_dir, "step": b.step, "rank": b.rank, "world_size": b.world_size, "grad_accum": b.grad_accum,
           "batch_size": b.batch_size, "seq_len": b.seq_len, "restored_from": b.restored_from, "micro_batches": micro}
    lines = [f"step {b.step} of {b.run_dir}, rank {b.rank} of {b.world_size}: {b.grad_accum} micro-batch(es) of "
             f"{b.batch_size} x {b.seq_len + 1} tokens (loader restored from step {b.restored_from})"]
    for k, m in enumerate(micro):
        for s in m["segments"]:
            src = f"{s['shard']} rg {s['row_group']} row {s['doc_row']}" if s["shard"] else "buffered at the checkpoint"
            crop = f", cropped from {s['doc_tokens']}" if s["cropped"] else ""
            text = s["text"].replace("\n", "↵")[:80]
            lines.append(f"  micro {k} row {s['row']} @{s['offset']:>4} {s['length']:>4} tokens{crop} [{src}] {text}")
    return out, lines


def conversation_tokenizer_dir(args) -> Path:
    """--tokenizer, else the tokenizer/ beside the files, else $NANOCHAT_BASE_DIR's."""
    from nanochat.common import get_base_dir

    if args.tokenizer:
        return Path(args.tokenizer).expanduser()
    p = Path(args.dir).expanduser()
    here = (p.parent if p.is_file() else p) / "tokenizer"
    return here if here.is_dir() else get_base_dir() / "tokenizer"


def conversations_report(args, files: list[Path]) -> tuple[dict, list[str]]:
    from nanochat import conversation_file as cf
    from nanochat.tokenizer import Tokenizer
    from nanochat.tokenizer_inspect import fingerprint

    tok_dir = conversation_tokenizer_dir(args)
    template = Tokenizer.from_directory(tok_dir).chat_template()
    per_file, total = cf.summarize_files(files, template, args.seq_len)
    found = cf.findings(per_file, total)
    out = {"kind": "conversations", "path": str(Path(args.dir).expanduser().resolve()),
           "tokenizer": {"dir": str(tok_dir.resolve()), "fingerprint": fingerprint(tok_dir)}, "seq_len": args.seq_len,
           "files": [{"path": f.path, "error": f.error, "summary": f.summary.as_dict() if f.summary else None}
                     for f in per_file],
           "summary": total.as_dict(), "findings": [{"level": f.level, "file": f.file, "message": f.message} for f in found]}
    lines = [f"{out['path']}: {len(files)} conversation file(s), tokenizer {out['tokenizer']['dir']}, sequence length "
             f"{args.seq_len} (SFT rows of {args.seq_len + 1} tokens)",
             f"{'file':<32} {'convs':>8} {'invalid':>7} {'too long':>8} {'cut':>5} {'tool use':>8} {'supervised':>10} "
             f"{'tokens min/mean/max':>22}"]
    for f in per_file:
        name = Path(f.path).name
        if f.error:
            lines.append(f"{name:<32} error: {f.error}")
            continue
        d = f.summary.as_dict()
        lines.append(f"{name:<32} {d['conversations']:>8,} {d['invalid']:>7,} {d['too_long']:>8,} {d['cut']:>5,} "
                     f"{d['tool_use_share']:>8.1%} {d['supervised_share']:>10.1%} "
                     f"{d['length_min']:>6,}/{d['length_mean']:>6,.0f}/{d['length_max']:>6,}")
    s = out["summary"]
    lines.append(f"together: {s['conversations']:,} conversations, {s['tokens']:,} tokens rendered, "
                 f"{s['supervised_share']:.1%} of them supervised (trained on); tool use in {s['tool_use_share']:.1%}; "
                 f"too long for a row of {args.seq_len + 1}: {s['too_long']:,} ({s['too_long_share']:.1%})")
    peak = max((b["count"] for b in s["histogram"]), default=0)
    for b in s["histogram"]:
        mark = "  <- row capacity" if b["start"] <= args.seq_len + 1 < b["end"] else ""
        lines.append(f"  {b['start']:>7,}-{b['end'] - 1:<7,} {b['count']:>7,} {'#' * round(40 * b['count'] / peak) if peak else ''}{mark}")
    lines += [f"{f['level']}: {f['message']}" for f in out["findings"]]
    if not any(f["level"] == "error" for f in out["findings"]):
        lines.append(f"ok for SFT at sequence length {args.seq_len}")
    return out, lines


def main_conversations(args, files: list[Path]) -> int:
    from nanochat.conversation_file import ConversationFileError
    from nanochat.tokenizer import TokenizerError

    if args.seq_len < 1:
        build_parser().error("--seq-len must be at least 1")
    try:
        out, lines = conversations_report(args, files)
    except (TokenizerError, ConversationFileError) as e:
        hint = "" if args.tokenizer or not isinstance(e, TokenizerError) else " (pass --tokenizer DIR)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(out, ensure_ascii=False) if args.json else "\n".join(lines))
    return EXIT_FINDINGS if any(f["level"] == "error" for f in out["findings"]) else EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.conversation_file import conversation_files

    if files := conversation_files(args.dir):
        return main_conversations(args, files)
    if (args.step_of is None) != (args.step is None):
        build_parser().error("--step-of and --step go together")
    if (args.run_steps is None) != (args.run_batch is None):
        build_parser().error("--run-steps and --run-batch go together")
    if args.world_size < 1:
        build_parser().error("--world-size must be at least 1")
    from nanochat import shards
    from nanochat.data_replay import ReplayError
    from registry import open_store
    from registry.errors import RegistryError

    db = "sqlite://" if (args.db or "").lower() == "none" else args.db
    try:
        with open_store(db) as store:
            report = store.inspect_dataset(args.dir, args.tokenizer, exact=args.exact, world_size=args.world_size,
                                           progress=Ticker())
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except shards.ScanStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("stopped: shards finished before the interrupt stay cached", file=sys.stderr)
        return EXIT_STOPPED
    files = [Path(r.stats.path) for r in report.shards]
    dups = shards.near_duplicates(sample := shards.sample_documents(files, args.near_dup_sample)) \
        if args.near_dup_sample > 0 else []
    epochs = None
    if args.run_steps is not None:
        e = shards.epochs(report.train_tokens, args.run_batch, args.run_steps)
        epochs = {"steps": args.run_steps, "batch": args.run_batch, "epochs": e} if e is not None else None
    out = report_json(report, dups, len(sample) if args.near_dup_sample > 0 else 0, epochs)
    lines = report_lines(out)
    code = EXIT_FINDINGS if any(f["level"] == "error" for f in out["findings"]) else EXIT_OK
    if args.step_of is not None:
        try:
            out["step"], more = step_report(args.step_of, args.step, None)
            lines += more
        except ReplayError as e:
            out["step"] = {"error": str(e)}
            lines.append(f"error: step {args.step}: {e}")
            code = EXIT_FINDINGS
    print(json.dumps(out, ensure_ascii=False) if args.json else "\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
