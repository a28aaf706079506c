"""
Conversation files on the command line: validate, render (as SFT trains on them) and summarise.

A front end over `nanochat.conversation` (upstream's chat template) and
`nanochat.conversation_file` (reading JSONL, fitting SFT rows, the dataset summary); the app's
Conversation builder page shows the same data. It never writes the file.

    python tools/conversation_builder.py data/chat.jsonl --tokenizer ~/.cache/nanochat/tokenizer
    python tools/conversation_builder.py data/chat.jsonl --show-tokens | less
    python tools/conversation_builder.py data/chat.jsonl --json > renders.json

Exit codes: 0 every line is a valid conversation; 1 the file or tokenizer cannot be used or a value
is out of range (one line `error: ...`); 2 unusable arguments; 3 the file has invalid lines (listed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (python tools/conversation_builder.py) as well as with -m
    sys.path.insert(0, str(ROOT))

from nanochat.common import get_base_dir  # noqa: E402
from nanochat.conversation import UPSTREAM_MAX_TOKENS, ConversationError  # noqa: E402
from nanochat.conversation_file import ConversationFileError, check_seq_len, fit, read_conversations, summarize  # noqa: E402
from nanochat.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from tools.generation_explorer import VISIBLE, OneLineParser  # noqa: E402

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_INVALID_LINES = 0, 1, 2, 3
DEFAULT_SEQ_LEN = 2048  # upstream chat_sft's --max-seq-len default
RENDER_BLOCK = 8192  # conversations per render_batch call: about a second's work, so the ETA moves


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="conversation_builder",
                       description="Validate, render and summarise a JSONL file of chat conversations "
                                   "(CustomJSON arrays or {\"messages\": [...]} lines).")
    ap.add_argument("file", metavar="FILE", help="the conversation file (JSONL: one conversation per line)")
    ap.add_argument("--tokenizer", metavar="DIR",
                    help="tokenizer directory (tokenizer.json or upstream's tokenizer.pkl); "
                         "default $NANOCHAT_BASE_DIR/tokenizer")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                    help=f"the SFT sequence length to check against: a conversation longer than seq-len + 1 tokens "
                         f"never fits a training row (default {DEFAULT_SEQ_LEN}, upstream chat_sft's --max-seq-len)")
    ap.add_argument("--max-tokens", type=int, default=UPSTREAM_MAX_TOKENS,
                    help=f"where rendering cuts a conversation (default {UPSTREAM_MAX_TOKENS}, as upstream)")
    ap.add_argument("--show-tokens", action="store_true",
                    help="print every token of every valid conversation: position, id, mask (1 = trained) and text")
    ap.add_argument("--json", action="store_true", help="one JSON object (see the README) instead of text")
    return ap


def load_tokenizer(directory: str | None) -> Tokenizer:
    d = Path(directory).expanduser() if directory else get_base_dir() / "tokenizer"
    if not d.is_dir():
        raise TokenizerError(f"no tokenizer directory {d} (pass --tokenizer DIR)")
    return Tokenizer.from_directory(d)


class Progress:
    """Rendering progress with an ETA on stderr, only when stderr is a terminal."""

    def __init__(self, total: int):
        self.total, self.start, self.last = total, time.monotonic(), 0.0
        self.on = sys.stderr.isatty() and total > 0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.on or now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate else 0
        print(f"\rrendering {done:,}/{self.total:,} conversations, ETA {eta:.0f} s ", end="", file=sys.stderr)

    def close(self) -> None:
        if self.on and self.last:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.id_to_token(token_id).translate(VISIBLE)


def run(args) -> int:
    check_seq_len(args.seq_len)
    if args.max_tokens < 1:
        raise ConversationError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    entries = read_conversations(args.file)
    tok = load_tokenizer(args.tokenizer)
    template = tok.chat_template()
    valid = [e.conversation for e in entries if e.valid]
    renders, progress = [], Progress(len(valid))
    for i in range(0, len(valid), RENDER_BLOCK):  # blocks, each rendered on every core, so progress can be told
        renders += template.render_batch(valid[i:i + RENDER_BLOCK], args.max_tokens)
        progress.update(len(renders))
    progress.close()
    summary = summarize(entries, template, args.seq_len, args.max_tokens, renders)
    code = EXIT_INVALID_LINES if summary.invalid else EXIT_OK
    rendered = iter(renders)
    rows = []
    for e in entries:
        if not e.valid:
            rows.append({"line": e.line, "error": e.error})
            continue
        r = next(rendered)
        f = fit(r, args.seq_len)
        row = {"line": e.line, "length": r.length, "trained": r.supervised, "cut": r.truncated, "fits": f.fits,
               "tool_use": e.conversation.has_tool_use, "ids": r.ids, "mask": r.mask}
        if args.show_tokens:
            row["tokens"] = [tok.id_to_token(i) for i in r.ids]
        rows.append(row)
    if args.json:
        doc = {"file": str(args.file), "tokenizer": str(tok.directory), "seq_len": args.seq_len,
               "max_tokens": args.max_tokens, "conversations": rows, "summary": summary.as_dict()}
        print(json.dumps(doc, ensure_ascii=False))
        return code
    print_text(args, tok, rows, summary)
    return code


def print_text(args, tok: Tokenizer, rows: list[dict], summary) -> None:
    out = sys.stdout
    print(f"{args.file}: {summary.conversations} valid conversations, {summary.invalid} invalid lines "
          f"(tokenizer {tok.directory}, seq-len {args.seq_len}: rows of {args.seq_len + 1} tokens)", file=out)
    for row in rows:
        if "error" in row:
            print(f"line {row['line']}: invalid: {row['error']}", file=out)
    print(f"{'line':>6} {'tokens':>7} {'trained':>7} {'tools':>5}  note", file=out)
    for row in rows:
        if "error" in row:
            continue
        note = "TOO LONG: never trained on" if not row["fits"] else ("cut at --max-tokens" if row["cut"] else "")
        print(f"{row['line']:>6} {row['length']:>7} {row['trained']:>7} {'yes' if row['tool_use'] else '':>5}  {note}",
              file=out)
        if args.show_tokens:
            for pos, (i, m) in enumerate(zip(row["ids"], row["mask"])):
                print(f"{'':>6} {pos:>5} {i:>6} {m} {token_text(tok, i)}", file=out)
    s = summary.as_dict()
    print(f"summary: {s['conversations']} conversations, {s['invalid']} invalid lines", file=out)
    print(f"  lengths: min {s['length_min']}, mean {s['length_mean']:.1f}, max {s['length_max']} tokens", file=out)
    print(f"  too long for a row of {args.seq_len + 1}: {s['too_long']} ({s['too_long_share']:.1%}); "
          f"cut at {args.max_tokens}: {s['cut']}", file=out)
    print(f"  trained tokens: {s['supervised_tokens']:,} of {s['tokens']:,} ({s['supervised_share']:.1%}); "
          f"tool use: {s['tool_use']} ({s['tool_use_share']:.1%}); no assistant turn: {s['no_assistant']}", file=out)
    peak = max((b["count"] for b in s["histogram"]), default=0) or 1
    for b in s["histogram"]:
        marker = " <- row capacity" if b["start"] <= args.seq_len + 1 < b["end"] else ""
        print(f"  {b['start']:>7}-{b['end'] - 1:<7} {b['count']:>7} {'#' * round(40 * b['count'] / peak)}{marker}",
              file=out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConversationFileError, ConversationError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
