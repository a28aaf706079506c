"""Runs (home): the registry at a glance, the runs table, and the curves of the selected runs."""

from __future__ import annotations

from urllib.parse import quote

import streamlit as st

from registry.entities import bpb_comparability
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, ui

LIVE_EVERY_S = 5
X_LABELS = {"step": "step", "tokens": "tokens", "flops": "FLOPs", "time": "wall time"}

ui.header("Runs", "Which runs are training, which is best, and how are their curves going?")
url = ui.registry_url()
runs = ui.load_runs(url)
try:
    summary = data.summary(url)
    table = data.runs_table(url)
except RegistryError as e:
    ui.show_error(e)
    st.stop()

# ---------------------------------------------------------------------- the answer first
by_id = {r.id: r for r in runs}
names = frames.run_names(runs)
scored = [r for r in runs if r.best_val_bpb is not None]
best = min(scored, key=lambda r: r.best_val_bpb) if scored else None
training = summary.runs_by_status.get("training", 0)
t1, t2, t3, t4 = st.columns(4)
t1.metric("Runs", summary.runs, f"{training} training now" if training else "none training", delta_color="off",
          delta_arrow="off", border=True)
t2.metric("Best val bpb", f"{best.best_val_bpb:.4f}" if best else "—",
          f"{names[best.id]} @ step {best.best_val_bpb_step:,}" if best and best.best_val_bpb_step is not None else None,
          delta_color="off", delta_arrow="off", border=True, help="Lowest validation bits per byte of any run (lower is better).")
t3.metric("Checkpoints", f"{summary.complete_checkpoints:,}",
          f"{summary.incomplete_checkpoints} incomplete" if summary.incomplete_checkpoints else "all complete",
          delta_color="inverse" if summary.incomplete_checkpoints else "off", delta_arrow="off", border=True,
          help="Complete checkpoints on disk; incomplete ones (crash while saving) cannot be loaded.")
last = summary.last_scan
t4.metric("Last scan", frames.age(last.finished_at) if last else "never",
          f"{summary.metric_points:,} metric points indexed", delta_color="off", delta_arrow="off", border=True)

if summary.read_only:
    st.caption(f"Read-only registry ({summary.read_only}): browsing works; scans and checks need a registry you can write.")
with st.expander("Scan a folder for new runs and checkpoints, or import a log", icon=":material/folder_open:", expanded=ui.scan_pending()):
    ui.scan_control(url)

# ---------------------------------------------------------------------- curves
ids = [r.id for r in runs]
c_runs, c_live = st.columns([5, 1], vertical_alignment="bottom")
chosen = c_runs.multiselect("Runs to plot", ids, default=ids[:1], format_func=lambda i: names[i], key="runs",
                            bind="query-params", max_selections=12, placeholder="Pick runs to plot")
live = c_live.toggle("Live refresh", value=any(by_id[i].status == "training" for i in chosen), key="live", bind="query-params",
                     help=f"Re-scan the selected runs and redraw every {LIVE_EVERY_S} s while they train")
if why := bpb_comparability([by_id[i] for i in chosen if i in by_id], names):
    st.warning(why + ". The token_bytes column of the table below has each run's verdict; the Tokenizer page lists the "
               "wrong ids.", icon=":material/warning:")


# A fragment: choosing metrics, the x axis, smoothing or log scale redraws the charts, not the page.
@st.fragment(run_every=LIVE_EVERY_S if live else None)
def curves(chosen: list[int], live: bool) -> None:
    if not chosen:
        st.info("Pick one or more runs above to plot their curves.", icon=":material/touch_app:")
        return
    try:
        if live:
            data.refresh_runs(url, [by_id[i].path for i in chosen])
        available = charts.metric_order(data.metric_keys(url, tuple(chosen)))
    except RegistryError as e:
        ui.show_error(e)
        return
    if not available:
        st.info("The selected runs have no metrics yet (no metrics.jsonl, and no val_bpb in their metas). "
                "Import an upstream training log with `python -m registry import-log FILE --run RUN`.", icon=":material/trending_up:")
        return
    c_keys, c_x = st.columns([3, 2], vertical_alignment="bottom")
    keys = c_keys.multiselect("Metrics", available, default=[k for k in charts.DEFAULT_METRICS if k in available] or available[:1],
                              format_func=charts.metric_name, key="metrics", bind="query-params",
                              placeholder="Pick metrics to chart", help="One chart per metric, all on the same x axis")
    x = c_x.segmented_control("x axis", list(X_LABELS), default="step", format_func=X_LABELS.get, key="x",
                              bind="query-params") or "step"
    c_ema, c_log = st.columns([3, 2], vertical_alignment="center")
    ema = c_ema.slider("Smoothing (EMA)", 0.0, 0.99, 0.8, 0.01, key="ema", bind="query-params",
                       help="Exponential moving average of the per-step metrics (train loss, throughput, step time; "
                            "0 = raw), across resumes. The raw curve stays faint behind it.")
    log = c_log.toggle("Log-scale loss", key="log", bind="query-params", help="Logarithmic y axis for the train loss")
    if not keys:
        st.info("Pick one or more metrics above.", icon=":material/touch_app:")
        return
    try:
        df = data.metrics(url, tuple(chosen), tuple(keys))
    except RegistryError as e:
        ui.show_error(e)
        return
    resumes = frames.resume_points(df)
    st.markdown(charts.legend_html(df), unsafe_allow_html=True)
    grid = st.columns(2) if len(keys) > 1 else [st.container()]
    for i, key in enumerate(keys):
        with grid[i % len(grid)]:
            st.markdown(f"**{charts.metric_label(key)}**")
            if (df["key"] == key).any():
                smoothing = ema if key in charts.SMOOTHED_METRICS else 0.0
                st.altair_chart(charts.metric_chart(df, key, x, smoothing, log and key == "train_loss", resumes,
                                                    height=300 if len(keys) <= 2 else 220), width="stretch")
            else:
                st.info(f"No {key} points for these runs (upstream runs without metrics.jsonl only have val_bpb "
                        "from their checkpoints).", icon=":material/trending_down:")
    notes = []
    if not resumes.empty:
        notes.append("dashed rules mark resumes (a new segment of the same run, same colour)")
    if x in ("tokens", "flops") and df["tokens"].isna().any():
        notes.append("runs without a recorded batch size are left out of the token/FLOP axes")
    stored = df.attrs.get("stored_points")
    if stored and stored > len(df):
        notes.append(f"showing {len(df):,} of {stored:,} points (downsampled in the registry; minima and maxima kept)")
    notes.append("drag to pan, scroll to zoom, double-click to reset" + (f"; live: redrawn every {LIVE_EVERY_S} s" if live else ""))
    st.caption(" · ".join(notes).capitalize())


curves(chosen, live)

# ---------------------------------------------------------------------- the table
st.subheader("All runs")
table = table.assign(open=[f"checkpoints?run={quote(n, safe='')}" for n in table["run"]])
st.dataframe(
    table, hide_index=True, width="stretch",
    column_order=["run", "status", "depth", "parameters", "steps", "progress", "best_val_bpb", "last_val_bpb", "checkpoints",
                  "token_bytes", "last_update", "origin", "open"],
    column_config={
        "run": st.column_config.TextColumn("phase/tag", pinned=True, help="training phase (base, sft, rl) / model tag"),
        "status": st.column_config.TextColumn("status", width="small", help="training: files changed in the last 10 minutes; "
                                              "finished: reached its target steps; stopped: ended early (resumable); "
                                              "incomplete: the newest checkpoint is broken"),
        "depth": st.column_config.NumberColumn("depth", format="%d", width=56),
        "parameters": st.column_config.NumberColumn("params", format="compact", width="small"),
        "steps": st.column_config.TextColumn("steps", width="small", help="steps done / target steps"),
        "progress": st.column_config.ProgressColumn("progress", format="percent", min_value=0.0, max_value=1.0, width="small"),
        "best_val_bpb": st.column_config.NumberColumn("best bpb", format="%.4f", width="small",
                                                      help="best validation bits per byte (lower is better)"),
        "best_step": st.column_config.NumberColumn("at step", format="%d", width="small"),
        "last_val_bpb": st.column_config.NumberColumn("last bpb", format="%.4f", width="small"),
        "checkpoints": st.column_config.NumberColumn("ckpts", format="%d", width=56, help="checkpoints on disk"),
        "segments": st.column_config.NumberColumn("segments", format="%d", width="small",
                                                  help="launches: 2 or more means it was resumed"),
        "token_bytes": st.column_config.TextColumn(
            "token_bytes", width=100, help="Is the token_bytes.pt beside the run's tokenizer right? WRONG: N = N token ids "
            "with a wrong byte length (upstream's build before 2ce972a), which shifts every val_bpb: compare only runs whose "
            "verdicts are right; 'no file (ok)': bpb computed from the tokenizer"),
        "last_update": st.column_config.DatetimeColumn("updated", format="distance", width=105),  # leaves room for "open"
        "origin": st.column_config.TextColumn("origin", width=80, help="the machine whose scans index the run "
                                              "(scan --origin, default its host name); empty: indexed before origins"),
        "open": st.column_config.LinkColumn("open", display_text="↗", width=48, help="This run's checkpoints"),
    })
st.caption(f"{len(table)} runs, newest activity first. Registry `{url}`.")
