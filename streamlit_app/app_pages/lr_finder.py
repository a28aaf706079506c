"""LR finder: the learning-rate range tests in the registry (scripts/lr_find.py), loss against the LR
multiplier with both classic suggestions, and a grid of real runs beside them when the registry has one."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from streamlit_app import charts, data, frames, internals, ui

LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")
MODEL_KEYS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "device_batch_size", "total_batch_size")

ui.header("LR finder", "Which learning-rate multiplier should this model train with, and does a grid of real runs agree?")
url = ui.registry_url()
runs = ui.load_runs(url)
finds = data.lr_finds(url)
if not finds:
    ui.empty_state(url, "**No learning-rate find in this registry.** Run one with base_train's model and batch flags, then scan "
                   "the base dir:\n\n`python -m scripts.lr_find --depth 4 --aspect-ratio 32 --head-dim 32 --max-seq-len 256 "
                   "--device-batch-size 16 --total-batch-size 4096 --steps 100`", "lr_scan")
names = frames.run_names(runs)
picked = st.multiselect("Finds", [r.id for r in finds], default=[finds[0].id], format_func=lambda i: names[i], key="finds",
                        bind="query-params", help="Overlay several finds (e.g. each group alone, or two seeds)")
if not picked:
    st.info("Pick a find above.", icon=":material/touch_app:")
    st.stop()
curves, suggestions = data.lr_find_curves(url, tuple(picked))
by_id = {r.id: r for r in finds}
first = by_id[picked[0]]
settings = data.lr_find_settings(first.path)
user = settings.get("user_config") or {}
s = suggestions.get(first.id)

# ---------------------------------------------------------------------- a grid of real runs with the same model
grid, grid_sweep = None, None
if user.get("matrix_lr"):
    for sw in data.sweeps(url):
        fixed = dict(sw.fixed)
        if "matrix_lr" in sw.keys and set(sw.keys) <= set(LR_KEYS) and all(
                fixed.get(k) == user.get(k) for k in MODEL_KEYS if k in fixed and k in user):
            grid_sweep = sw
            break
if grid_sweep is not None:
    grid = internals.sweep_frame(grid_sweep, runs)
    grid["value"] = grid["value"] / float(user["matrix_lr"])  # as a multiplier of the find's learning rates
    grid_summary = internals.sweep_summary(grid)
    grid_best = float(grid_summary.loc[grid_summary["mean"].idxmin(), "value"])

t1, t2, t3, t4 = st.columns(4)
fmt = lambda v: f"× {v:.3g}" if v else "—"  # noqa: E731
t1.metric("Suggestion (min/10)", fmt(s.min_over_10 if s else None), "lowest loss ÷ 10", delta_color="off", delta_arrow="off",
          border=True, help="The multiplier where the smoothed loss was lowest, divided by 10 (the classic rule)")
t2.metric("Suggestion (steepest)", fmt(s.steepest if s else None), "fastest fall", delta_color="off", delta_arrow="off",
          border=True, help="Where the smoothed loss falls fastest against log(multiplier)")
t3.metric("Sweep", f"{settings.get('steps_run', '?')} steps", f"{settings.get('stopped', '?')} · group {settings.get('group', '?')}",
          delta_color="off", delta_arrow="off", border=True)
if grid is not None:
    ratio = s.min_over_10 / grid_best if s and s.min_over_10 else None
    t4.metric("Grid best", fmt(grid_best), f"suggestion / grid = {ratio:.2f}" if ratio else None, delta_color="off",
              delta_arrow="off", border=True, help=f"The lowest mean val_bpb of {len(grid)} real runs ({grid_sweep.label})")
else:
    t4.metric("Grid best", "—", "no grid of runs with this model", delta_color="off", delta_arrow="off", border=True,
              help="python -m bench.lr_find --base-dir DIR trains one (5 multipliers × 2 seeds) and scans it")

marks = []
for rid, sg in suggestions.items():
    for name, v in (("min/10", sg.min_over_10), ("steepest", sg.steepest)):
        if v:
            marks.append({"run_id": rid, "run": names[rid], "suggestion": name, "mult": v})
if grid is not None:
    marks.append({"run_id": first.id, "run": names[first.id], "suggestion": "grid best", "mult": grid_best})
st.altair_chart(charts.lr_find_chart(curves, pd.DataFrame(marks, columns=["run_id", "run", "suggestion", "mult"])),
                width="stretch")
st.caption("Multipliers of the learning rates the find was given (base_train's flags, after its batch scaling). Thick "
           "line: the loss smoothed as base_train smooths it; faint: each step's loss.")
if s:
    st.warning(s.caveat, icon=":material/info:")

rows = []
for rid in picked:
    cfg = data.lr_find_settings(by_id[rid].path)
    sg = suggestions.get(rid)
    rows.append({"find": names[rid], "group": cfg.get("group"), "from": cfg.get("start"),
                 "range": f"{cfg.get('min_lr_mult', '?')} → {cfg.get('max_lr_mult', '?')}",
                 "steps": cfg.get("steps_run"), "stopped": cfg.get("stopped"),
                 "min/10": sg.min_over_10 if sg else None, "steepest": sg.steepest if sg else None,
                 "lowest loss": sg.min_loss if sg else None})
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
             column_config={k: st.column_config.NumberColumn(format="%.4g") for k in ("min/10", "steepest", "lowest loss")})

if grid is not None:
    st.subheader("Check against the grid")
    st.altair_chart(charts.sweep_chart(grid, grid_summary, "learning-rate multiplier", True), width="stretch")
    st.caption(f"{len(grid)} real runs with this find's model and batch, each with all learning rates × the multiplier "
               "(the same step budget each): final val_bpb, the band spans the seeds.")
