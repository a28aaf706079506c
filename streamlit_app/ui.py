"""
Rendering pieces every page shares: the page header, opening the registry (or explaining why it cannot
be opened), the empty-registry state with its scan control, the scan control itself, the run picker,
and named errors turned into `st.error` with what to do next.

It calls `data.py` and Streamlit only; no SQL, no torch, no caching of its own.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from registry.errors import RegistryError
from streamlit_app import data, frames

SCAN_REPORT = "scan_report"  # session key: the last scan's report, shown once after the rerun it causes
# What to do next, by the `code` of a nanochat.checkpoint_manager.CheckpointError.
CHECKPOINT_HINTS = {
    "missing_file": "It was deleted or moved after the last scan: rescan its folder on the Runs page, or pick another checkpoint.",
    "missing_model": "Its model file is gone (deleted after the last scan, or a save that never finished): rescan its folder on "
                     "the Runs page, or pick another step.",
    "missing_meta": "Its meta file is missing (a save that never finished, or files deleted after the last scan): rescan its "
                    "folder on the Runs page, or pick another step.",
    "missing_tokenizer": "Put the run's tokenizer in <base dir>/tokenizer/ (tokenizer.json, or upstream's tokenizer.pkl), "
                         "or set NANOCHAT_BASE_DIR to the base dir that holds it, then reload.",
    "bad_tokenizer": "The tokenizer files are damaged: copy the run's tokenizer/ folder again.",
    "vocab_mismatch": "This tokenizer belongs to another model: use the tokenizer the run was trained with.",
    "truncated": "The file is damaged or still being written: run a deep check on the Integrity page, or pick an earlier step.",
    "unsafe_pickle": "The file references code, so it is never loaded: run a deep check on the Integrity page for details.",
}


def scan_pending() -> bool:
    """A scan just finished and its report is waiting to be shown (keep its control open)."""
    return SCAN_REPORT in st.session_state


def header(title: str, question: str) -> None:
    st.title(title)
    st.caption(question)


def show_error(e: BaseException, what_next: str | None = None) -> None:
    """One named error as st.error: its one-line message, then what to do next."""
    message = str(e).strip() or type(e).__name__
    hint = what_next or CHECKPOINT_HINTS.get(getattr(e, "code", None) or "", "")
    if not hint and isinstance(e, CheckpointError):
        hint = "Pick another checkpoint, or rescan its folder on the Runs page if its files changed after the last scan."
    st.error(f"{message}" + (f"\n\n{hint}" if hint else ""), icon=":material/error:")


def registry_url() -> str:
    """The URL of the open registry; renders the problem and stops the page when there is none."""
    target = data.registry_target()
    if target.problem:
        st.error(target.problem, icon=":material/folder_off:")
        st.stop()
    try:
        data.store(target.url)
    except RegistryError as e:
        show_error(e, f"Registry: {target.url} (from {target.source}). Point the app at another one with "
                      "`-- --base-dir DIR` or `-- --db URL`.")
        st.stop()
    return target.url


def scan_control(url: str, key: str = "scan", label: str = "Folder to scan") -> None:
    """A folder box (default: the base dir) and a Scan button with a progress bar; reruns the page after
    a scan so everything shows the new index, and reports what the scan found."""
    target = data.registry_target()
    left, right = st.columns([6, 1], vertical_alignment="bottom")
    path = left.text_input(label, value=target.scan_default, key=f"{key}_path",
                           help="A nanochat base dir (with base_checkpoints/, chatsft_checkpoints/...), one run's "
                                "checkpoint folder, or any folder above them. Only metadata is read. Upstream console "
                                "logs (*.log) and base_eval CSVs found there are imported too; a log file alone works.")
    if right.button("Scan", key=f"{key}_go", type="primary", width="stretch"):
        bar = st.progress(0.0, text="Looking for checkpoints…")

        def progress(done: int, total: int, message: str) -> None:
            bar.progress(min(1.0, done / max(total, 1)), text=f"scanned {done}/{total} · {message}")

        try:
            report = data.scan_or_import(url, path, progress)
        except RegistryError as e:
            bar.empty()
            show_error(e, "Give a folder that holds nanochat checkpoints (model_NNNNNN.pt + meta_NNNNNN.json) "
                          "or a base dir above them.")
            return
        bar.empty()
        st.session_state[SCAN_REPORT] = report
        st.rerun()
    report, logs = st.session_state.pop(SCAN_REPORT, (None, None))
    if logs is not None:
        for r in logs.reports:
            st.success(f"Imported {Path(r.path).name} into {', '.join(r.runs)}: {r.points_new:,} new metric points, "
                       f"{r.evals_new} new evaluations.", icon=":material/article:")
            for u in r.unmatched:
                st.warning(f"{Path(r.path).name}: not imported: {u}")
        for f, why in logs.failures:
            st.warning(f"{Path(f).name}: not imported: {why}")
    if report is not None:
        st.success(f"Scanned {report.root} in {report.duration_s or 0:.1f} s: {report.runs_found} runs ({report.runs_new} new), "
                   f"{report.checkpoints_seen} checkpoints ({report.checkpoints_new} new, {report.checkpoints_changed} changed, "
                   f"{report.checkpoints_missing} gone), {report.metric_lines:,} metric lines.", icon=":material/check_circle:")
        for p in report.problems[:5]:
            st.warning(f"{p.path}: {p.code}: {p.message}")
        if len(report.problems) > 5:
            st.caption(f"… and {len(report.problems) - 5} more problems (see `python -m registry checkpoints RUN`).")


def empty_registry(url: str) -> None:
    """What a page shows when the registry has no run: how to fill it, with the scan control."""
    st.info("**No runs in this registry yet.** Scan a folder that holds nanochat checkpoints: a base dir "
            "(`~/.cache/nanochat` or `$NANOCHAT_BASE_DIR`) or any run folder.", icon=":material/inbox:")
    scan_control(url, key="empty_scan")
    st.caption(f"Registry: `{url}`. From a shell: `python -m registry scan DIR --db {url}`.")
    st.stop()


def load_runs(url: str) -> list:
    """The registry's runs, or the empty state (which stops the page)."""
    try:
        found = data.runs(url)
    except RegistryError as e:
        show_error(e)
        st.stop()
    if not found:
        empty_registry(url)
    return found


def load_model_choices(url: str):
    """The loadable checkpoints (a DataFrame), or stop the page with a message saying how to get one."""
    try:
        choices = data.model_choices(url)
    except RegistryError as e:
        show_error(e)
        st.stop()
    if choices.empty:
        st.info("No loadable checkpoint in the registry (every one is incomplete or deleted). Scan a folder with complete "
                "checkpoints on the Runs page.", icon=":material/inbox:")
        st.stop()
    return choices


def run_picker(runs: list, key: str = "run", label: str = "Run", container=None, index: int = 0) -> int:
    """A selectbox of runs (newest activity first; `index` preselected), kept in the URL as ?run=NAME."""
    names = frames.run_names(runs)
    where = container or st
    return where.selectbox(label, [r.id for r in runs], index=index, format_func=lambda i: names[i], key=key,
                           bind="query-params",
                           help="Runs are listed by last activity, newest first.")


def status_label(status: str) -> str:
    return frames.STATUS_LABELS.get(status, status)
