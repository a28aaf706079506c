"""Checkpoints: one run's checkpoint history with filters, one checkpoint in detail, and config diffs."""

from __future__ import annotations

import streamlit as st

from registry.errors import RegistryError
from streamlit_app import charts, data, frames, ui

ui.header("Checkpoints", "Which checkpoints does this run have, are they intact, and what changed between them?")
url = ui.registry_url()
runs = ui.load_runs(url)
names = frames.run_names(runs)
by_id = {r.id: r for r in runs}

top = st.columns([3, 5])
run_id = ui.run_picker(runs, container=top[0])
run = by_id[run_id]
try:
    df = data.checkpoints_table(url, run_id)
except RegistryError as e:
    ui.show_error(e)
    st.stop()
top[1].markdown(f"<div style='padding-top:2.1rem;color:#6b7280'>{ui.status_label(run.status)} · "
                f"<code>{run.path}</code></div>", unsafe_allow_html=True)
if df.empty:
    st.info(f"{names[run_id]} has no checkpoints in the registry (only metrics so far). Rescan its folder when it saves one.",
            icon=":material/inbox:")
    st.stop()

# ---------------------------------------------------------------------- the answer first
present = df[df["state"] != "missing"]
scored = present.dropna(subset=["val_bpb"])
best = scored.loc[scored["val_bpb"].idxmin()] if not scored.empty else None
counts = df["state"].value_counts()
trusted = int(counts.get("verified", 0) + counts.get("quick_ok", 0))
bad = int(counts.get("problems", 0) + counts.get("incomplete", 0))
t1, t2, t3, t4 = st.columns([1, 1, 1, 1.5])  # the last holds "not verified yet"
t1.metric("Checkpoints on disk", len(present), f"{int(counts.get('missing', 0))} deleted since indexed"
          if counts.get("missing") else f"{int(present['size_mb'].sum()):,} MB in total", delta_color="off", delta_arrow="off",
          border=True)
t2.metric("Best val bpb", f"{best['val_bpb']:.4f}" if best is not None else "—",
          f"at step {int(best['step']):,}" if best is not None else None, delta_color="off", delta_arrow="off", border=True)
latest = present["step"].max() if not present.empty else None
t3.metric("Latest step", f"{int(latest):,}" if latest == latest and latest is not None else "—",
          f"of {run.num_iterations:,} target" if run.num_iterations else "target unknown", delta_color="off",
          delta_arrow="off", border=True)
t4.metric("Integrity", f"{bad} with problems" if bad else ("no problems" if trusted else "not verified yet"),
          f"{trusted} of {len(present)} verified by a check",
          delta_color="off", delta_arrow="off", border=True,
          help="Problems found by the scan or the latest check of each checkpoint; verify them on the Integrity page.")

# ---------------------------------------------------------------------- filters, chart, table
# A fragment: the filters redraw the chart and the table, not the page.
@st.fragment
def history() -> None:
    steps = df["step"].dropna()
    f1, f2, f3 = st.columns([3, 3, 4])
    lo, hi = (int(steps.min()), int(steps.max())) if not steps.empty else (0, 0)
    step_range = f1.slider("Steps", lo, hi, (lo, hi), key="steps", bind="query-params") if hi > lo else (lo, hi)
    vals = df["val_bpb"].dropna()
    if len(vals) > 1 and vals.max() > vals.min():
        vmin, vmax = float(vals.min()), float(vals.max())
        val_range = f2.slider("val bpb", vmin, vmax, (vmin, vmax), step=max((vmax - vmin) / 200, 1e-4), format="%.3f", key="bpb")
    else:
        val_range = None
    states = [s for s in frames.CHECKPOINT_STATES if s in set(df["state"])]
    # keyed by the states this run has: a selection remembered from a run with other states would hide
    # every checkpoint here while the pills (options that exist) still looked all selected
    picked = f3.pills("Integrity state", states, default=states, selection_mode="multi", format_func=frames.CHECKPOINT_STATES.get,
                      key=f"states_{'_'.join(states)}") or []
    shown = df[df["state"].isin(picked) & (df["step"].isna() | df["step"].between(*step_range))]
    if val_range is not None and val_range != (float(vals.min()), float(vals.max())):
        shown = shown[shown["val_bpb"].between(*val_range)]

    st.altair_chart(charts.checkpoint_chart(shown, charts.run_color(run_id)), width="stretch")
    st.dataframe(
        shown.sort_values("step", ascending=False), hide_index=True, width="stretch",
        column_order=["step", "val_bpb", "integrity", "problems", "segment", "resumable", "train_state", "size_mb", "saved", "checked",
                      "check"],
        column_config={
            "step": st.column_config.NumberColumn("step", format="%d", pinned=True),
            "val_bpb": st.column_config.NumberColumn("val bpb", format="%.4f"),
            "integrity": st.column_config.TextColumn("integrity"),
            "problems": st.column_config.TextColumn("problems", help="problem codes (README: integrity)"),
            "segment": st.column_config.NumberColumn("segment", format="%d", help="which launch of the run wrote it"),
            "resumable": st.column_config.CheckboxColumn("resumable", help="a script can continue training from it: no "
                                                         "problem, and not classic, single-file or chat_rl (no optimizer)"),
            "train_state": st.column_config.CheckboxColumn("exact resume", help="RNG states and data position saved"),
            "size_mb": st.column_config.NumberColumn("size (MB)", format="%.1f"),
            "saved": st.column_config.DatetimeColumn("saved", format="YYYY-MM-DD HH:mm"),
            "checked": st.column_config.DatetimeColumn("last check", format="distance"),
            "check": st.column_config.TextColumn("level"),
        })
    st.caption(f"{len(shown)} of {len(df)} checkpoints shown, newest first.")


history()

# ---------------------------------------------------------------------- one checkpoint
st.subheader("Checkpoint details")
options = list(df.sort_values("step", ascending=False)["id"])
labels = {row.id: f"step {int(row.step)}" if row.step == row.step else "checkpoint.pt" for row in df.itertuples()}
ckpt_id = st.selectbox("Checkpoint", options, format_func=labels.get, key="step", bind="query-params")
try:
    view = data.checkpoint_detail(url, ckpt_id)
except RegistryError as e:
    ui.show_error(e)
    st.stop()
detail = view.detail
if view.gone:
    st.warning(f"{', '.join(view.gone)} no longer on disk: deleted or moved after the last scan. Rescan to mark it in the "
               "registry (its history is kept).", icon=":material/delete:")
    if st.button("Rescan this run", icon=":material/sync:"):
        try:
            data.scan(url, run.path)
        except RegistryError as e:
            ui.show_error(e)
        else:
            st.rerun()
c = detail.checkpoint
meta = detail.meta or {}
d1, d2, d3, d4 = st.columns(4)
d1.metric("val bpb", f"{c.val_bpb:.4f}" if c.val_bpb is not None else "—", border=True)
d2.metric("Size", f"{c.size_bytes / 1e6:,.1f} MB", f"{len(detail.files)} files", delta_color="off", delta_arrow="off", border=True)
d3.metric("Segment", c.segment, "exact resume data" if c.has_train_state else "no RNG/data state", delta_color="off",
          delta_arrow="off", border=True)
latest_check = detail.integrity[0] if detail.integrity else None
d4.metric("Last check", "✓ ok" if latest_check and latest_check.ok else ("⚠ problems" if latest_check else "never"),
          f"{latest_check.mode}, {frames.age(latest_check.checked_at)}" if latest_check else "see the Integrity page",
          delta_color="off", delta_arrow="off", border=True)
for p in c.problems:
    st.warning(f"**{p.code}**: {p.message}" + (f" ({p.file})" if p.file else ""))
evals = data.checkpoint_evals(url, run_id, int(c.step)) if c.step is not None else None
if evals is not None and not evals.empty:
    with st.expander(f"Evaluations ({len(evals)})", icon=":material/fact_check:", expanded=True):
        st.dataframe(evals, hide_index=True, width="stretch", column_config={
            "evaluation": st.column_config.TextColumn("evaluation", help="TASK:METRIC (best --metric takes it)"),
            "value": st.column_config.NumberColumn("value", format="%.4f"),
            "examples": st.column_config.NumberColumn("examples", format="%d")})
with st.expander("Model and training config", icon=":material/tune:"):
    left, right = st.columns(2)
    left.markdown("**model_config**")
    left.dataframe(frames.config_frame(meta.get("model_config") or {}), hide_index=True, width="stretch")
    right.markdown("**user_config** (the training flags)")
    right.dataframe(frames.config_frame(meta.get("user_config") or {}), hide_index=True, width="stretch")
with st.expander(f"Files ({len(detail.files)})", icon=":material/description:"):
    st.dataframe(frames.files_frame(detail.files, view.on_disk), hide_index=True, width="stretch", column_config={
        "size_mb": st.column_config.NumberColumn("size (MB)", format="%.2f"),
        "modified": st.column_config.DatetimeColumn("modified", format="YYYY-MM-DD HH:mm:ss"),
        "hashed": st.column_config.DatetimeColumn("hashed", format="distance"),
        "sha256": st.column_config.TextColumn("sha256", width="large"),
    })
with st.expander(f"Integrity history ({len(detail.integrity)})", icon=":material/history:"):
    if detail.integrity:
        st.dataframe(frames.integrity_history_frame(detail.integrity), hide_index=True, width="stretch", column_config={
            "checked": st.column_config.DatetimeColumn("checked", format="YYYY-MM-DD HH:mm:ss"),
            "duration_s": st.column_config.NumberColumn("duration (s)", format="%.3f")})
    else:
        st.caption("Never checked. Run a quick or deep check on the Integrity page.")
with st.expander("meta.json", icon=":material/data_object:"):
    st.json(meta, expanded=1)

# ---------------------------------------------------------------------- config diff
st.subheader("Config diff")
mode = st.segmented_control("Compare", ["checkpoints", "runs"], default="checkpoints",
                            format_func={"checkpoints": "two checkpoints of this run", "runs": "two runs"}.get, key="diff") \
    or "checkpoints"
a_col, b_col, s_col = st.columns([3, 3, 2], vertical_alignment="bottom")
if mode == "checkpoints":
    steps_list = [int(s) for s in df.dropna(subset=["step"]).sort_values("step")["step"]]
    if len(steps_list) < 2:
        st.caption("This run has one checkpoint: compare it with another run instead.")
        st.stop()
    a = a_col.selectbox("A", steps_list, index=0, format_func=lambda s: f"step {s}", key="diff_a")
    b = b_col.selectbox("B", steps_list, index=len(steps_list) - 1, format_func=lambda s: f"step {s}", key="diff_b")
    ref_a, ref_b = f"{run_id}@{a}", f"{run_id}@{b}"
else:
    ids = [r.id for r in runs]
    if len(ids) < 2:
        st.caption("The registry has one run.")
        st.stop()
    other = next(i for i in ids if i != run_id)
    a = a_col.selectbox("A", ids, index=ids.index(run_id), format_func=names.get, key="diff_ra")
    b = b_col.selectbox("B", ids, index=ids.index(other), format_func=names.get, key="diff_rb")
    ref_a, ref_b = str(a), str(b)
show_same = s_col.toggle("Show unchanged keys", key="diff_same")
try:
    diff = data.config_diff(url, ref_a, ref_b)
except RegistryError as e:
    ui.show_error(e)
    st.stop()
table = frames.diff_frame(diff, changed_only=not show_same)
st.caption(f"A = {diff.a}, B = {diff.b}: {len(diff.changed)} of {len(diff.rows)} keys differ.")
if table.empty:
    st.success("Identical configs.", icon=":material/equal:")
else:
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "key": st.column_config.TextColumn("key", width="medium"), "A": st.column_config.TextColumn(f"A: {diff.a}"),
        "B": st.column_config.TextColumn(f"B: {diff.b}")})
