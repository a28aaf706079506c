"""Sweeps: runs that differ in one setting (a learning rate, depth, batch size...: found from their configs in
the registry), as final or best val_bpb against that setting, with the seeds' spread as a band."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from streamlit_app import charts, data, internals, ui

ui.header("Sweeps", "How does val_bpb move with the one setting these runs differ in?")
url = ui.registry_url()
runs = ui.load_runs(url)
found = data.sweeps(url)
if not found:
    ui.empty_state(url, "**No sweep in this registry.** A sweep is two or more runs with a val_bpb whose flags differ in one setting "
                   "(or a few that move together, like all four learning rates), besides the seed. Train a small grid, e.g. "
                   "`python -m bench.lr_find --base-dir DIR` (5 multipliers × 2 seeds), and scan it.", "sweep_scan")

c_sweep, c_metric, c_log = st.columns([4, 2, 1.2], vertical_alignment="bottom")
labels = {i: f"{s.label} · {len(s.run_ids)} runs" for i, s in enumerate(found)}
pick = c_sweep.selectbox("Sweep", list(labels), format_func=labels.get, key="sweep", bind="query-params",
                         help="Largest first. Runs are grouped when everything but this setting (and the seed) is equal.")
metric = c_metric.radio("val_bpb", ["last_val_bpb", "best_val_bpb"], horizontal=True, key="metric", bind="query-params",
                        format_func=lambda m: "final" if m == "last_val_bpb" else "best")
sweep = found[pick]
df = internals.sweep_frame(sweep, runs, metric)
summary = internals.sweep_summary(df)
numeric = pd.api.types.is_numeric_dtype(summary["value"]) and len(summary) > 0
positive = numeric and (summary["value"] > 0).all()
log_x = c_log.toggle("Log x", value=bool(positive and summary["value"].max() / summary["value"].min() >= 4), key="logx",
                     disabled=not positive)

best = summary.loc[summary["mean"].idxmin()] if len(summary) else None
t1, t2, t3 = st.columns(3)
shown = "—" if best is None else (f"{best['value']:.4g}" if numeric else str(best["value"]))
t1.metric(f"Best {sweep.keys[0]}", shown,
          f"of {len(summary)} values", delta_color="off", delta_arrow="off", border=True)
t2.metric("Its val_bpb", f"{best['mean']:.4f}" if best is not None else "—",
          f"mean of {int(best['runs'])} run(s)" if best is not None else None, delta_color="off", delta_arrow="off", border=True)
spread = (summary["high"] - summary["low"]).max() if len(summary) else None
t3.metric("Seed spread", f"{spread:.4f}" if spread else "one seed",
          "largest max − min at one value" if spread else "run more seeds for a band", delta_color="off",
          delta_arrow="off", border=True)
if numeric:
    st.altair_chart(charts.sweep_chart(df, summary, sweep.label, log_x), width="stretch")
    st.caption("Line: the mean over the runs at each value; band: from the best to the worst seed; dots: each run.")
st.dataframe(df.sort_values(["value", "seed"]), hide_index=True, width="stretch",
             column_config={"run_id": None, "value": st.column_config.NumberColumn(sweep.keys[0], format="%.4g")
                            if numeric else sweep.keys[0], "val_bpb": st.column_config.NumberColumn(format="%.4f")})
with st.expander("What these runs share"):
    st.dataframe(pd.DataFrame(sweep.fixed, columns=["setting", "value"]).astype(str), hide_index=True, width="stretch")
