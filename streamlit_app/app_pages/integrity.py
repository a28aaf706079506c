"""Integrity: run quick or deep checks on a run or on everything, see what was found, and the history."""

from __future__ import annotations

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, ui

ALL = 0  # the "every run" choice of the target box

ui.header("Integrity", "Which checkpoints can I trust? Check them quickly or deeply, and see every problem found.")
url = ui.registry_url()
runs = ui.load_runs(url)
names = frames.run_names(runs)
by_id = {r.id: r for r in runs}

c_target, c_level, c_go = st.columns([3, 3, 1.4], vertical_alignment="bottom")
target = c_target.selectbox("Check", [ALL] + [r.id for r in runs], format_func=lambda i: "every run" if i == ALL else names[i],
                            key="run", bind="query-params")
level = c_level.segmented_control("Level", ["quick", "deep"], default="quick", key="level", bind="query-params",
                                  help="quick: metadata, zip directories and file sets, milliseconds, no tensor read; deep: "
                                       "every byte (CRCs, NaN/Inf, safe pickle, sha256 compared with the last deep check)") \
    or "quick"
if c_go.button("Run checks", type="primary", icon=":material/play_arrow:", width="stretch"):
    ids = [r.id for r in runs if not r.missing] if target == ALL else [target]
    bar = st.progress(0.0, text="Listing checkpoints…")

    def progress(done: int, total: int, text: str) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=text)

    try:
        results = data.verify_runs(url, ids, deep=level == "deep", progress=progress)
    except (RegistryError, CheckpointError) as e:
        bar.empty()
        ui.show_error(e)
    else:
        bar.empty()
        st.session_state["last_check"] = (target, level, results)

try:
    df = data.all_checkpoints(url)
except RegistryError as e:
    ui.show_error(e)
    st.stop()
if target != ALL:
    df = df[df["run_id"] == target]

# ---------------------------------------------------------------------- the answer first
counts = df["state"].value_counts()
present = int(len(df) - counts.get("missing", 0))
bad = df[df["state"].isin(["problems", "incomplete"])]
t1, t2, t3, t4 = st.columns(4)
t1.metric("Checkpoints", f"{present:,}", f"{int(counts.get('missing', 0))} deleted" if counts.get("missing") else "all on disk",
          delta_color="off", delta_arrow="off", border=True)
t2.metric("Passed", f"{int(counts.get('verified', 0) + counts.get('quick_ok', 0)):,}",
          f"{int(counts.get('verified', 0))} deep-verified", delta_color="off", delta_arrow="off", border=True)
t3.metric("With problems", f"{len(bad):,}", ", ".join(sorted({c for p in bad["problems"] for c in p.split(", ") if c})) or "none",
          delta_color="inverse" if len(bad) else "off", delta_arrow="off", border=True)
checked = df["checked"].dropna()
t4.metric("Not checked yet", f"{int(counts.get('unchecked', 0)):,}",
          f"last check {frames.age(checked.max())}" if not checked.empty else "no check run yet", delta_color="off",
          delta_arrow="off", border=True)

last = st.session_state.get("last_check")
if last is None and counts.get("unchecked", 0):
    st.info(f"{int(counts['unchecked'])} checkpoints have not been verified yet (the scan read only their metadata). A quick "
            "check takes milliseconds per checkpoint; a deep one reads every byte. Pick a level and press **Run checks**.",
            icon=":material/info:")
if last is not None:
    l_target, l_level, results = last
    failed = results[results["result"] != "✓ ok"]
    scope = "every run" if l_target == ALL else names.get(l_target, "?")
    if failed.empty:
        st.success(f"{l_level.capitalize()} check of {scope}: all {len(results)} checkpoints passed "
                   f"({results['mb_read'].sum():,.1f} MB read in {results['duration_s'].sum():.1f} s).", icon=":material/check_circle:")
    else:
        st.warning(f"{l_level.capitalize()} check of {scope}: {len(failed)} of {len(results)} checkpoints have problems.",
                   icon=":material/warning:")
        st.dataframe(failed, hide_index=True, width="stretch", column_order=["run", "step", "problems", "messages", "level"],
                     column_config={"step": st.column_config.NumberColumn("step", format="%d"),
                                    "messages": st.column_config.TextColumn("what is wrong", width="large")})

# ---------------------------------------------------------------------- the map and the problems
st.subheader("Every checkpoint")
if df.empty:
    st.info("No checkpoints indexed for this choice.", icon=":material/inbox:")
    st.stop()
st.altair_chart(charts.integrity_map(df), width="stretch")
st.caption("One square per checkpoint, coloured by its latest check. Hover for the problems; drag to pan, scroll to zoom.")
if not bad.empty:
    st.subheader(f"Problems ({len(bad)})")
    st.dataframe(bad, hide_index=True, width="stretch", column_order=["run", "step", "integrity", "messages", "checked", "check"],
                 column_config={"step": st.column_config.NumberColumn("step", format="%d"),
                                "messages": st.column_config.TextColumn("what is wrong", width="large"),
                                "checked": st.column_config.DatetimeColumn("checked", format="distance"),
                                "check": st.column_config.TextColumn("level")})

# ---------------------------------------------------------------------- history
st.subheader("History of one checkpoint")
choices = df.dropna(subset=["step"]).sort_values(["run_id", "step"], ascending=[True, False])
if choices.empty:
    st.stop()
labels = {row.id: f"{row.run} @ step {int(row.step)}" for row in choices.itertuples()}
first_bad = next((i for i, row in enumerate(choices.itertuples()) if row.state in ("problems", "incomplete")), 0)
ckpt = st.selectbox("Checkpoint", list(labels), index=first_bad, format_func=labels.get, key="history",
                    help="The first checkpoint with problems is preselected")
hist = data.integrity_history(url, ckpt)
if hist.empty:
    st.caption("Never checked.")
else:
    st.dataframe(hist, hide_index=True, width="stretch", column_config={
        "checked": st.column_config.DatetimeColumn("checked", format="YYYY-MM-DD HH:mm:ss"),
        "duration_s": st.column_config.NumberColumn("duration (s)", format="%.3f"),
        "messages": st.column_config.TextColumn("what was wrong", width="large")})
with st.expander("What the problem codes mean", icon=":material/help:"):
    st.dataframe(data.problem_codes(), hide_index=True, width="stretch")
