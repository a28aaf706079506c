"""
Each run's token_bytes verdict: is the token_bytes.pt its val_bpb was computed with right?

Upstream built token_bytes.pt wrongly before 2ce972a (a few hundred of 32k tokens, every bpb shifted a
little); `nanochat.tokenizer_inspect.check_token_bytes` recomputes it from the tokenizer. The check is
the tokenizer module's; this module stores its outcome per tokenizer folder (`tokenizer_checks`) and
links every run to its folder (`runs.tokenizer_check_id`), after each scan:

- a run's tokenizer folder is `checkpoint_manager.find_tokenizer_dir` (beside the run, its base dir's
  `tokenizer/`, then $NANOCHAT_BASE_DIR's);
- a folder whose stamp (name, size and mtime_ns of its tokenizer file and of token_bytes.pt) equals the
  stored one costs those two stats; otherwise the check runs once for the folder, however many runs
  share it, and replaces the stored row;
- a tokenizer that cannot be read is stored as verdict "unreadable" with its one-line reason: a scan
  never fails on it. A run without a tokenizer folder keeps no verdict (None: cannot tell).

Verdicts: "right" (token_bytes.pt agrees with the tokenizer), "absent" (no file: bpb is computed from
the tokenizer, which is right), "wrong", "unreadable". Whether two runs' val_bpb compare is
`entities.bpb_comparability`. Nothing here writes unless a check or a link changed.
"""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from pathlib import Path

import sqlalchemy as sa

from registry import writer
from registry.entities import TokenBytesVerdict, utc
from registry.models import Run, TokenizerCheck


def folder_stamp(folder: Path) -> str:
    """name:size:mtime_ns of the tokenizer file and of token_bytes.pt ("-" when absent); raises OSError."""
    from nanochat.tokenizer import OUR_FILE, TOKEN_BYTES_FILE, UPSTREAM_FILE

    parts = []
    for names in ((OUR_FILE, UPSTREAM_FILE), (TOKEN_BYTES_FILE,)):
        for name in names:
            try:
                st = os.stat(folder / name)
            except FileNotFoundError:
                continue
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            break
        else:
            parts.append("-")
    return ";".join(parts)


def check_folder(folder: Path) -> dict:
    """The columns of a tokenizer_checks row for one folder (runs the tokenizer module's check)."""
    from nanochat.tokenizer import Tokenizer, TokenizerError
    from nanochat.tokenizer_inspect import check_token_bytes, fingerprint

    try:
        tok = Tokenizer.from_directory(folder)
        check = check_token_bytes(tok)
        values = tok.token_bytes()  # what bpb is computed with: the stored file, else the computed lengths
        digest = hashlib.sha256(array("q", values).tobytes()).hexdigest()[:16]
        return dict(verdict="right" if check.ok else "wrong" if check.present else "absent", fingerprint=fingerprint(folder),
                    vocab_size=check.vocab_size, wrong=len(check.wrong), old_method=check.old_method,
                    stored_sum=check.stored_sum, correct_sum=check.correct_sum, values_digest=digest, error=None)
    except (TokenizerError, OSError) as e:
        return dict(verdict="unreadable", fingerprint=None, vocab_size=None, wrong=0, old_method=False, stored_sum=None,
                    correct_sum=None, values_digest=None, error=str(e).splitlines()[0] if str(e) else type(e).__name__)


def to_verdict(row: TokenizerCheck | None) -> TokenBytesVerdict | None:
    if row is None:
        return None
    return TokenBytesVerdict(tokenizer_dir=row.path, verdict=row.verdict, wrong=row.wrong, old_method=row.old_method,
                             vocab_size=row.vocab_size, stored_sum=row.stored_sum, correct_sum=row.correct_sum,
                             values_digest=row.values_digest, error=row.error, checked_at=utc(row.checked_at))


def refresh_under(store, root: str, origin: str | None = None) -> int:
    """Bring the verdicts of the runs under `root` up to date (see the module docstring); returns how many
    folders were checked (0 when every stamp matched)."""
    from nanochat.checkpoint_manager import find_tokenizer_dir

    db = store.db
    with db.session() as s:
        runs = writer.runs_under(s, db, root, store.origin if origin is None else origin)
        ids = [r.id for r in runs.values()]
        links = dict(s.execute(sa.select(Run.id, Run.tokenizer_check_id).where(Run.id.in_(ids))).all()) if ids else {}
        known = {r.path: (r.id, r.stamp) for r in s.execute(sa.select(TokenizerCheck.path, TokenizerCheck.id, TokenizerCheck.stamp))}
    folders: dict[str, str | None] = {}  # folder -> its stamp now (None: unreadable folder)
    run_folder: dict[int, str] = {}
    for path, run in runs.items():
        if run.missing:
            continue
        found = find_tokenizer_dir(path)
        if found is None:
            continue
        folder = str(found.resolve())
        run_folder[run.id] = folder
        if folder not in folders:
            try:
                folders[folder] = folder_stamp(Path(folder))
            except OSError:
                folders[folder] = None
    stale = {f: st for f, st in folders.items() if f not in known or st is None or known[f][1] != st}
    checked = {f: check_folder(Path(f)) for f in stale}
    if not checked and all(links.get(rid) == known[f][0] for rid, f in run_folder.items()):
        return 0  # every stamp and link as stored: nothing to write

    def write(s):
        ids_by_folder = {}
        for folder, stamp in folders.items():
            row = s.execute(sa.select(TokenizerCheck).where(TokenizerCheck.path == folder)).scalar_one_or_none()
            if folder in checked:
                if row is None:
                    row = TokenizerCheck(path=folder, stamp="", verdict="", checked_at=0.0)
                    s.add(row)
                row.stamp, row.checked_at = stamp or "-", time.time()
                for k, v in checked[folder].items():
                    setattr(row, k, v)
                s.flush()
            ids_by_folder[folder] = row.id
        for rid, folder in run_folder.items():
            if links.get(rid) != ids_by_folder[folder]:
                s.execute(sa.update(Run).where(Run.id == rid).values(tokenizer_check_id=ids_by_folder[folder]))

    db.write(write)
    return len(checked)
