"""
Every chart of the app, as pure functions DataFrame -> Altair chart (testable without Streamlit).

Conventions (APP_UX.md): a run keeps one colour everywhere (`run_color`: by registry id, not by
position in a selection); resume segments share their run's colour and get a dashed rule at the
resume step; every mark has a tooltip; curves zoom (an interval selection bound to the scales); axes
carry units and numbers are formatted (1.2M, 3.45). The frames come from `frames.py` / `traces.py`;
this module does no I/O and knows nothing about the registry or the engine.
"""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd

from streamlit_app.frames import CHECKPOINT_STATES, STATE_COLORS
from streamlit_app.traces import visible

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# x axes of the run curves: frame column, axis title, d3 format
X_AXES = {
    "step": ("step", "step", ",d"),
    "tokens": ("tokens", "tokens seen", "~s"),
    "flops": ("flops", "training FLOPs", "~s"),
    "time": ("elapsed_s", "wall time since the run started", None),
}
METRIC_TITLES = {  # known keys first, in the order the Runs page offers them
    "val_bpb": "val bpb (bits/byte)",
    "train_loss": "train loss (nats/token)",
    "train_loss_ema": "train loss EMA, upstream's (nats/token)",  # imported logs print the smoothed loss
    "lrm": "LR multiplier",
    "tok_per_sec": "throughput (tokens/s)",
    "dt_ms": "step time (ms)",
    "mfu": "MFU (%)",
    "grad_norm": "gradient norm",
}
DEFAULT_METRICS = ("val_bpb", "train_loss")
# Logged every step and noisy: the EMA slider applies to these. Evaluations are sparse and the LR
# multiplier is a schedule, so they are drawn as logged.
SMOOTHED_METRICS = frozenset({"train_loss", "tok_per_sec", "dt_ms", "mfu", "grad_norm"})


def metric_order(keys) -> list[str]:
    """Known metrics in METRIC_TITLES order, then any other key alphabetically."""
    known = [k for k in METRIC_TITLES if k in set(keys)]
    return known + sorted(set(keys) - set(known))


def metric_label(key: str) -> str:
    return METRIC_TITLES.get(key, key)


def metric_name(key: str) -> str:
    """The short name a picker shows (and a URL carries): the title without its unit."""
    return METRIC_TITLES[key].split(" (")[0] if key in METRIC_TITLES else key
SI = "replace(replace(format(datum.value, '~s'), 'G', 'B'), 'P', 'Q')"  # tokens/FLOPs: 1.2M, 3.4B


def run_color(run_id: int) -> str:
    return PALETTE[(int(run_id) - 1) % len(PALETTE)]


def run_scale(df: pd.DataFrame) -> alt.Scale:
    """Colour scale mapping each run's name to its fixed colour (df has run_id and run columns)."""
    pairs = df[["run_id", "run"]].drop_duplicates().sort_values("run_id")
    return alt.Scale(domain=list(pairs["run"]), range=[run_color(i) for i in pairs["run_id"]])


def smooth(df: pd.DataFrame, weight: float) -> pd.Series:
    """TensorBoard's debiased EMA (weight 0 = raw, 0.99 = very smooth) per run, across resume segments.

    A resumed segment continues the history it resumed from: its EMA runs over the run's points before its
    first step (each step's value from the newest earlier segment that logged it), then over its own. So
    the curve says what training did: no restart (and no drop, while the EMA lags a falling loss) at a resume
    line, and the steps a crash lost keep the EMA they showed before it. df has run_id, segment, step, value."""
    if weight <= 0 or df.empty:
        return df["value"]
    alpha = 1 - weight
    out = pd.Series(index=df.index, dtype=float)
    for _, run in df.groupby("run_id", sort=False):
        for seg, own in run.groupby("segment", sort=True):
            own = own.sort_values("step", kind="stable")
            before = run[(run["segment"] < seg) & (run["step"] < own["step"].iloc[0])]
            before = before.sort_values(["step", "segment"], kind="stable").drop_duplicates("step", keep="last")
            history = pd.concat([before["value"], own["value"]], ignore_index=True)
            ema = history.ewm(alpha=alpha, adjust=True).mean()
            out.loc[own.index] = ema.iloc[len(before):].to_numpy()
    return out


def _time_unit(seconds: pd.Series) -> tuple[float, str]:
    top = float(seconds.max()) if len(seconds) else 0.0
    if top >= 2 * 3600:
        return 3600.0, "h"
    if top >= 120:
        return 60.0, "min"
    return 1.0, "s"


def _x(df: pd.DataFrame, x: str, unit: tuple[float, str] | None = None) -> tuple[pd.DataFrame, alt.X]:
    column, title, fmt = X_AXES[x]
    df = df.copy()
    if x == "time":
        div, name = unit or _time_unit(df[column])
        df["x"] = df[column] / div
        return df, alt.X("x:Q", title=f"{title} ({name})", axis=alt.Axis(format="~f"))
    df["x"] = df[column]
    axis = alt.Axis(labelExpr=SI) if fmt == "~s" else alt.Axis(format=fmt, tickMinStep=1, tickCount=8)
    return df, alt.X("x:Q", title="optimizer step" if x == "step" else title, axis=axis)


def metric_chart(df: pd.DataFrame, key: str, x: str = "step", smoothing: float = 0.0, log: bool = False,
                 resumes: pd.DataFrame | None = None, height: int = 300) -> alt.LayerChart:
    """One metric of several runs against step / tokens / FLOPs / wall time. Each (run, segment) is its
    own line in the run's colour; resumes are dashed rules; with smoothing the raw curve stays faint."""
    data = df[df["key"] == key].dropna(subset=[X_AXES[x][0]])
    unit = _time_unit(df["elapsed_s"]) if x == "time" else None
    data, xenc = _x(data, x, unit)
    data["smoothed"] = smooth(data, smoothing)
    scale = run_scale(df) if not df.empty else alt.Scale()
    color = alt.Color("run:N", scale=scale, legend=None)  # one legend for all charts: `legend_html`
    ytitle = METRIC_TITLES.get(key, key) + (", log scale" if log else "")
    yscale = alt.Scale(type="log" if log else "linear", zero=False, nice=not log)
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("segment:Q", title="resume segment"), alt.Tooltip("step:Q", format=",d"),
               alt.Tooltip("value:Q", title=key, format=".4f"), alt.Tooltip("tokens:Q", format=",d"),
               alt.Tooltip("flops:Q", title="FLOPs", format=".3s"), alt.Tooltip("elapsed_s:Q", title="seconds since start", format=",.0f")]
    if smoothing > 0:
        tooltip.insert(4, alt.Tooltip("smoothed:Q", title=f"{key} (EMA {smoothing:g})", format=".4f"))
    base = alt.Chart(data).encode(x=xenc, color=color, detail="segment:N")
    zoom = alt.selection_interval(bind="scales", name=f"zoom_{key}")
    few = len(data) <= 60 * max(1, data["run_id"].nunique())
    # the bold line first: the shared legend takes its look from the first layer
    layers = [base.mark_line(strokeWidth=2, point=few).encode(y=alt.Y("smoothed:Q", scale=yscale, title=ytitle), tooltip=tooltip)]
    if smoothing > 0:
        layers.append(base.mark_line(opacity=0.25, strokeWidth=1).encode(y=alt.Y("value:Q", scale=yscale, title=ytitle),
                                                                          tooltip=tooltip))
    # invisible points: a tooltip wherever the pointer is near a point, not only on the thin line
    layers.append(base.mark_circle(size=70, opacity=0.001).encode(y=alt.Y("smoothed:Q", scale=yscale), tooltip=tooltip))
    if resumes is not None and not resumes.empty:
        r, _ = _x(resumes.dropna(subset=[X_AXES[x][0]]), x, unit)
        r = r[r["run_id"].isin(data["run_id"].unique())]
        rule = alt.Chart(r).mark_rule(strokeDash=[5, 4], strokeWidth=1.5).encode(
            x="x:Q", color=alt.Color("run:N", scale=scale, legend=None),
            tooltip=[alt.Tooltip("run:N"), alt.Tooltip("segment:Q", title="resume segment"),
                     alt.Tooltip("step:Q", title="resumed at step", format=",d")])
        label = alt.Chart(r).mark_text(align="left", dx=4, baseline="top", fontSize=11, y=4).encode(
            x="x:Q", text=alt.value("resumed"), color=alt.Color("run:N", scale=scale, legend=None))
        layers += [rule, label]
    return alt.layer(layers[0].add_params(zoom), *layers[1:]).properties(height=height)


def checkpoint_chart(df: pd.DataFrame, color: str, height: int = 300) -> alt.LayerChart:
    """val_bpb of a run's checkpoints by step, each point coloured by its integrity state."""
    data = df.dropna(subset=["step"])
    states = [s for s in CHECKPOINT_STATES if s in set(data["state"])] or list(CHECKPOINT_STATES)
    base = alt.Chart(data).encode(x=alt.X("step:Q", title="optimizer step", axis=alt.Axis(format=",d", tickMinStep=1, tickCount=8),
                                          scale=alt.Scale(padding=12, nice=False, zero=False)))
    line = base.transform_filter("isValid(datum.val_bpb)").mark_line(color=color, strokeWidth=2).encode(
        y=alt.Y("val_bpb:Q", title="val bpb (bits/byte)", scale=alt.Scale(zero=False)))
    points = base.transform_filter("isValid(datum.val_bpb)").mark_circle(size=110, opacity=1, stroke="white", strokeWidth=1).encode(
        y="val_bpb:Q",
        color=alt.Color("integrity:N", title="integrity", scale=alt.Scale(
            domain=[CHECKPOINT_STATES[s] for s in states], range=[STATE_COLORS[s] for s in states]),
            legend=alt.Legend(orient="bottom")),
        tooltip=[alt.Tooltip("step:Q", format=",d"), alt.Tooltip("val_bpb:Q", format=".4f"), "integrity:N",
                 alt.Tooltip("size_mb:Q", title="size (MB)", format=",.1f"), alt.Tooltip("saved:T", format="%Y-%m-%d %H:%M"),
                 "problems:N"])
    zoom = alt.selection_interval(bind="scales", encodings=["x"], name="zoom_ckpt")
    return alt.layer(line.add_params(zoom), points).properties(height=height)


def lr_chart(lr: pd.DataFrame, phases: pd.DataFrame, resume_step: int | None, resume_lr: float | None,
             reached_step: int | None = None, height: int = 340, own: pd.DataFrame | None = None) -> alt.LayerChart:
    """The LR multiplier over the run, phases shaded, the resume step marked. `own`: the run's own
    schedule when the planned target moves it, drawn dashed, with the jump at the resume step."""
    phase_colors = alt.Scale(domain=["warmup", "constant", "warmdown"], range=["#fde68a", "#e5e7eb", "#bfdbfe"])
    bands = alt.Chart(phases).mark_rect(opacity=0.55).encode(
        x="start:Q", x2="end:Q", color=alt.Color("phase:N", scale=phase_colors, title="schedule phase",
                                                 legend=alt.Legend(orient="bottom")),
        tooltip=["phase:N", alt.Tooltip("start:Q", format=",d"), alt.Tooltip("end:Q", format=",d")])
    # The axis ends where the schedule does: Vega's "nice" rounding ran a 304-step run's axis out to 340.
    ends = [lr["step"].max(), phases["end"].max() if not phases.empty else None, resume_step, reached_step,
            own["step"].max() if own is not None and not own.empty else None]
    x_end = max((float(e) for e in ends if e is not None and pd.notna(e)), default=1.0)
    line = alt.Chart(lr).mark_line(color="#111827", strokeWidth=2).encode(
        x=alt.X("step:Q", title="optimizer step", axis=alt.Axis(format=",d", tickMinStep=1),
                scale=alt.Scale(domain=[0, max(x_end, 1.0)], nice=False)),
        y=alt.Y("lr_multiplier:Q", title="LR multiplier (× peak LR)", scale=alt.Scale(domain=[0, 1.05], clamp=True)),
        tooltip=[alt.Tooltip("step:Q", format=",d"), alt.Tooltip("lr_multiplier:Q", format=".4f"), "phase:N"])
    layers = [bands, line]
    if own is not None and not own.empty:
        own = own.assign(what="the run's own schedule")
        layers.insert(1, alt.Chart(own).mark_line(color="#6b7280", strokeDash=[4, 3], strokeWidth=1.5).encode(
            x="step:Q", y="lr_multiplier:Q", tooltip=[alt.Tooltip("what:N", title=""), alt.Tooltip("step:Q", format=",d"),
                                                      alt.Tooltip("lr_multiplier:Q", format=".4f")]))
        before = own.loc[(own["step"] - (resume_step or 0)).abs().idxmin(), "lr_multiplier"] if resume_step is not None else None
        if before is not None and resume_lr is not None and abs(before - resume_lr) > 1e-6:
            jump = pd.DataFrame([{"step": resume_step, "from": before, "to": resume_lr, "mid": (before + resume_lr) / 2,
                                  "label": f"LR jump ×{before:.2f} → ×{resume_lr:.2f}"}])
            layers.append(alt.Chart(jump).mark_rule(color="#dc2626", strokeWidth=3).encode(
                x="step:Q", y="from:Q", y2="to:Q", tooltip=[alt.Tooltip("label:N", title="")]))
            layers.append(alt.Chart(jump).mark_text(color="#dc2626", align="left", dx=8, fontWeight="bold").encode(
                x="step:Q", y="mid:Q", text="label:N"))  # beside the jump, clear of the resume label above it
    if reached_step is not None and resume_step is not None and reached_step > resume_step:
        lost = pd.DataFrame([{"start": resume_step, "end": reached_step, "what": "trained again after the resume"}])
        layers.append(alt.Chart(lost).mark_rect(color="#ef4444", opacity=0.18).encode(
            x="start:Q", x2="end:Q", tooltip=[alt.Tooltip("what:N", title=""), alt.Tooltip("start:Q", format=",d"),
                                              alt.Tooltip("end:Q", format=",d")]))
    if resume_step is not None:
        mark = pd.DataFrame([{"step": resume_step, "lr_multiplier": resume_lr if resume_lr is not None else 0.0,
                              "label": f"resume at step {resume_step:,}"}])
        layers.append(alt.Chart(mark).mark_rule(color="#dc2626", strokeDash=[6, 4], strokeWidth=2).encode(
            x="step:Q", tooltip=[alt.Tooltip("label:N", title=""), alt.Tooltip("lr_multiplier:Q", format=".4f")]))
        layers.append(alt.Chart(mark).mark_point(color="#dc2626", size=120, filled=True).encode(
            x="step:Q", y="lr_multiplier:Q", tooltip=[alt.Tooltip("label:N", title=""), alt.Tooltip("lr_multiplier:Q", format=".4f")]))
        right_half = resume_step > 0.6 * max(float(lr["step"].max()), 1.0)
        layers.append(alt.Chart(mark).mark_text(color="#dc2626", align="right" if right_half else "left",
                                                dx=-10 if right_half else 10, dy=-12, fontWeight="bold").encode(
            x="step:Q", y="lr_multiplier:Q", text="label:N"))
    return alt.layer(*layers).properties(height=height)


def integrity_map(df: pd.DataFrame, height_per_run: int = 26) -> alt.Chart:
    """Every checkpoint of every run as a square at (step, run), coloured by integrity state."""
    data = df.dropna(subset=["step"])
    states = [s for s in CHECKPOINT_STATES if s in set(data["state"])] or list(CHECKPOINT_STATES)
    zoom = alt.selection_interval(bind="scales", encodings=["x"], name="zoom_map")
    return alt.Chart(data).mark_square(size=90, opacity=0.95).encode(
        x=alt.X("step:Q", title="optimizer step", axis=alt.Axis(format=",d", tickMinStep=1, tickCount=8),
                scale=alt.Scale(padding=12, nice=False, zero=False)),
        y=alt.Y("run:N", title=None, sort=alt.EncodingSortField("run_id", order="descending")),
        color=alt.Color("integrity:N", title="integrity", scale=alt.Scale(
            domain=[CHECKPOINT_STATES[s] for s in states], range=[STATE_COLORS[s] for s in states])),
        tooltip=["run:N", alt.Tooltip("step:Q", format=",d"), "integrity:N", "problems:N",
                 alt.Tooltip("checked:T", title="last checked", format="%Y-%m-%d %H:%M"), alt.Tooltip("val_bpb:Q", format=".4f")],
    ).add_params(zoom).properties(height=alt.Step(height_per_run))


GRID_LABELS_PX = 64  # the y-axis label column of both generation charts, so their step columns line up


def generation_chart(alts: pd.DataFrame, selected_step: int | None = None, shading: str = "likely",
                     probabilities: bool = False) -> alt.LayerChart:
    """Per-step alternatives: one column per generated step, the sampled token on top, the top-N by
    model probability below; colour = model probability (`shading` "likely": darker blue = more probable)
    or surprisal ("surprise": darker red = less probable, −log₂ p), the sampled cell outlined in red, tokens
    the filters removed in grey; with `probabilities` each cell also prints its model probability.
    Clicking a cell selects (step, row) (selection "cell")."""
    order = ["sampled"] + sorted({r for r in alts["row"] if r != "sampled"}, key=lambda r: int(r[1:]))
    alts = alts.assign(surprise_bits=-np.log2(alts["model_prob"].clip(lower=1e-12)),
                       p_label=alts["model_prob"].map(lambda p: f"{p:.0%}" if p >= 0.01 else ("<1%" if p > 0 else "0")))
    x = alt.X("step:O", title=None, axis=alt.Axis(labelAngle=0, orient="top"))
    pick = alt.selection_point(fields=["step", "row"], name="cell", on="click", clear=False)
    tooltip = [alt.Tooltip("step:O"), alt.Tooltip("row:N", title="row"), alt.Tooltip("token:N"), alt.Tooltip("token_id:Q", title="id"),
               alt.Tooltip("model_prob:Q", title="model p (T=1)", format=".3f"),
               alt.Tooltip("surprise_bits:Q", title="surprise (bits)", format=".2f"),
               alt.Tooltip("sampled_prob:Q", title="sampling p", format=".3f"), alt.Tooltip("kept:N", title="kept by filters")]
    y = alt.Y("row:N", sort=order, title=None, axis=alt.Axis(minExtent=GRID_LABELS_PX, maxExtent=GRID_LABELS_PX))
    base = alt.Chart(alts).encode(x=x, y=y)
    outlined = "datum.is_sampled && datum.row != 'sampled'"
    if shading == "surprise":
        fill = alt.Color("surprise_bits:Q", scale=alt.Scale(scheme="reds", domain=[0, 8], clamp=True), legend=None)
        dark = "datum.kept && datum.surprise_bits > 5"
    else:
        fill = alt.Color("model_prob:Q", scale=alt.Scale(type="sqrt", scheme="blues", domain=[0, 1]), legend=None)
        dark = "datum.kept && datum.model_prob > 0.55"
    cells = base.mark_rect(cornerRadius=3).encode(
        color=alt.when("datum.kept").then(fill).otherwise(alt.value("#e5e7eb")),
        stroke=alt.when(outlined).then(alt.value("#dc2626")).otherwise(alt.value("white")),
        strokeWidth=alt.when(outlined).then(alt.value(2.5)).otherwise(alt.value(1)),
        tooltip=tooltip,
    ).add_params(pick)
    ink = alt.when(dark).then(alt.value("white")).when("datum.kept").then(alt.value("#111827")).otherwise(alt.value("#9ca3af"))
    text = base.mark_text(fontSize=11, limit=44, dy=-6 if probabilities else 0).encode(text="token:N", color=ink, tooltip=tooltip)
    layers = [cells, text]
    if probabilities:
        layers.append(base.mark_text(fontSize=9, dy=9, opacity=0.85).encode(text="p_label:N", color=ink, tooltip=tooltip))
    if selected_step is not None and selected_step in set(alts["step"]):
        sel = pd.DataFrame([{"step": selected_step}])
        layers.append(alt.Chart(sel).mark_rect(fill=None, stroke="#111827", strokeWidth=1.5, strokeDash=[3, 2]).encode(x="step:O"))
    return alt.layer(*layers).properties(width="container", height=alt.Step(40 if probabilities else 32))


def entropy_chart(steps: pd.DataFrame) -> alt.Chart:
    """The model's entropy at each generated step, columns aligned with `generation_chart`."""
    return alt.Chart(steps).mark_bar(color="#6b7280").encode(
        x=alt.X("step:O", title="generated step", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("entropy:Q", title="nats", axis=alt.Axis(minExtent=GRID_LABELS_PX, maxExtent=GRID_LABELS_PX, tickCount=3)),
        tooltip=[alt.Tooltip("step:O"), alt.Tooltip("token:N"), alt.Tooltip("entropy:Q", title="entropy (nats)", format=".3f"),
                 alt.Tooltip("entropy_bits:Q", title="entropy (bits)", format=".3f")],
    ).properties(width="container", height=130)


def distribution_chart(df: pd.DataFrame, height_per_token: int = 26) -> alt.Chart:
    """The traced top-N of one step: model vs sampling probability per token, filtered-out greyed."""
    order = list(dict.fromkeys(df.sort_values("rank")["token"]))
    return alt.Chart(df).mark_bar(cornerRadiusEnd=2).encode(
        y=alt.Y("token:N", sort=order, title=None),
        yOffset=alt.YOffset("distribution:N"),
        x=alt.X("prob:Q", title="probability", axis=alt.Axis(format=".1~%")),
        color=alt.Color("distribution:N", title=None, scale=alt.Scale(range=["#1f77b4", "#ff7f0e"]),
                        legend=alt.Legend(orient="bottom")),
        opacity=alt.condition("datum.kept", alt.value(1.0), alt.value(0.3)),
        stroke=alt.condition("datum.is_sampled", alt.value("#dc2626"), alt.value(None)),
        tooltip=["token:N", "distribution:N", alt.Tooltip("prob:Q", format=".4f"), alt.Tooltip("kept:N", title="kept by filters"),
                 alt.Tooltip("token_id:Q", title="id")],
    ).properties(height=max(120, len(order) * height_per_token))


def compare_chart(stats: pd.DataFrame, height: int = 260) -> alt.LayerChart:
    """Each column of a comparison as a point: diversity (distinct-2) against likelihood (mean log-prob)."""
    base = alt.Chart(stats).encode(
        x=alt.X("distinct_2:Q", title="distinct-2 (unique bigrams / bigrams)", scale=alt.Scale(zero=False, padding=20)),
        y=alt.Y("mean_logprob:Q", title="mean log-p (nats/token)", scale=alt.Scale(zero=False, padding=20)),
        tooltip=["column:N", alt.Tooltip("mean_logprob:Q", format=".3f"), alt.Tooltip("mean_entropy:Q", format=".3f"),
                 alt.Tooltip("distinct_2:Q", format=".3f"), alt.Tooltip("repeated_3grams:Q", title="repeated trigrams"),
                 alt.Tooltip("tokens:Q")])
    points = base.mark_circle(size=140, color="#1f77b4", opacity=0.85)
    labels = base.mark_text(align="left", dx=9, fontSize=12, color="#374151").encode(text="short:N")
    return alt.layer(points, labels).properties(height=height)


def breakdown_chart(parts: pd.DataFrame, title: str, fmt: str = "~s") -> alt.LayerChart:
    """Horizontal bars of named parts (columns part, value, shown)."""
    base = alt.Chart(parts).encode(y=alt.Y("part:N", sort="-x", title=None),
                                   x=alt.X("value:Q", title=title, axis=alt.Axis(labelExpr=SI) if fmt == "~s" else alt.Axis(format=fmt)),
                                   tooltip=["part:N", alt.Tooltip("shown:N", title=title)])
    return alt.layer(base.mark_bar(color="#1f77b4", cornerRadiusEnd=2),
                     base.mark_text(align="left", dx=4, color="#374151").encode(text="shown:N")).properties(
        height=alt.Step(30))


def depth_chart(sweep: pd.DataFrame, depth: int, height: int = 260) -> alt.LayerChart:
    """Parameters and training tokens by depth (log scale), the chosen depth marked."""
    long = sweep.melt(id_vars=["depth"], value_vars=["parameters", "training tokens"], var_name="quantity").dropna()
    base = alt.Chart(long).encode(
        x=alt.X("depth:Q", title="depth (layers)"),
        y=alt.Y("value:Q", title="count (log scale)", scale=alt.Scale(type="log"),
                axis=alt.Axis(labelExpr=SI, values=[10 ** k for k in range(3, 16)])),
        color=alt.Color("quantity:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["depth:Q", "quantity:N", alt.Tooltip("value:Q", format=".3s")])
    rule = alt.Chart(pd.DataFrame([{"depth": depth}])).mark_rule(color="#dc2626", strokeDash=[5, 4]).encode(
        x="depth:Q", tooltip=[alt.Tooltip("depth:Q", title="chosen depth")])
    return alt.layer(base.mark_line(point=True), rule).properties(height=height)


def legend_html(df: pd.DataFrame) -> str:
    """One legend for every chart of a page: each run's name in its colour (df has run_id and run)."""
    pairs = df[["run_id", "run"]].drop_duplicates().sort_values("run_id")
    items = "".join(f'<span style="margin-right:1.2rem;white-space:nowrap"><span style="display:inline-block;width:14px;'
                    f'height:3px;background:{run_color(i)};vertical-align:middle;margin-right:6px"></span>{html.escape(n)}</span>'
                    for i, n in zip(pairs["run_id"], pairs["run"]))
    return f'<div style="font-size:0.9rem;color:#374151;margin:0.2rem 0 0.4rem">{items}</div>'


# ---------------------------------------------------------------------- data: tokenizers and datasets


def length_histogram_chart(hist: pd.DataFrame, height: int = 240) -> alt.Chart:
    """Documents per length bin (columns split, bin, label, docs), log2 bins of characters."""
    shown = hist[hist["docs"] > 0] if not hist.empty else hist
    order = list(dict.fromkeys(shown.sort_values("bin")["label"])) if not shown.empty else []
    return alt.Chart(shown).mark_bar(cornerRadiusEnd=2).encode(
        x=alt.X("label:N", sort=order, title="document length (characters)", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("docs:Q", title="documents", stack=True),
        color=alt.Color("split:N", title=None, scale=alt.Scale(domain=["train", "validation"], range=["#1f77b4", "#ff7f0e"]),
                        legend=alt.Legend(orient="top")),
        tooltip=["split:N", alt.Tooltip("label:N", title="characters"), alt.Tooltip("docs:Q", format=",")],
    ).properties(height=height)


def bytes_per_token_chart(comparison: pd.DataFrame, height: int = 60) -> alt.LayerChart:
    """Bytes per token of each tokenizer on the same text (columns name, bytes_per_token, tokens)."""
    base = alt.Chart(comparison).encode(
        y=alt.Y("name:N", title=None, sort=None),
        x=alt.X("bytes_per_token:Q", title="bytes per token (higher: fewer tokens for the same text)"),
        tooltip=["name:N", alt.Tooltip("bytes_per_token:Q", format=".3f"), alt.Tooltip("tokens:Q", format=","),
                 alt.Tooltip("bpb_factor:Q", format=".3f", title="bpb of an equal per-token loss, relative")])
    return alt.layer(base.mark_bar(color="#1f77b4", cornerRadiusEnd=2),
                     base.mark_text(align="left", dx=4, color="#374151").encode(text=alt.Text("bytes_per_token:Q", format=".2f"))
                     ).properties(height=alt.Step(max(28, height // max(len(comparison), 1))))


# ---------------------------------------------------------------------- conversations (the builder page)

TOKEN_KIND_STYLES = {  # kind from ChatTemplate.token_kinds: trained (mask 1), context (mask 0), special (a chat token)
    "trained": "background:#dcfce7;color:#14532d",
    "context": "background:#f3f4f6;color:#4b5563",
    "special": "background:#1e3a8a;color:#ffffff;font-weight:600",
}


def conversation_tokens_html(tokens: pd.DataFrame, capacity: int | None = None) -> str:
    """Every token of a rendered conversation as a box: green = trained on (mask 1), grey = context (mask 0),
    dark blue = a chat special token (with a green underline when trained on, e.g. <|assistant_end|>).
    A red rule marks where a row of `capacity` tokens ends. Columns: position, id, text, mask, kind. Escaped."""
    out = []
    for pos, tid, text, mask, kind in zip(tokens["position"], tokens["id"], tokens["text"], tokens["mask"],
                                          tokens["kind"]):
        if capacity is not None and pos == capacity:
            out.append('<span title="the SFT row ends here" style="border-left:3px solid #dc2626;margin:0 3px"></span>')
        style = TOKEN_KIND_STYLES[kind] + (";box-shadow:inset 0 -3px 0 #22c55e" if kind == "special" and mask else "")
        shown = html.escape(visible(str(text)))
        title = f"position {pos} · id {tid} · {'trained (mask 1)' if mask else 'not trained (mask 0)'}"
        out.append(f'<span title="{title}" style="{style};border-radius:3px;padding:1px 2px;margin:1px;'
                   f'display:inline-block;font-family:monospace;font-size:0.85rem">{shown}</span>')
        if kind == "special" and text in ("<|user_end|>", "<|assistant_end|>"):
            out.append("<br>")
    return f'<div style="line-height:1.9">{"".join(out)}</div>'


def length_histogram(lengths: pd.DataFrame, capacity: int, height: int = 260) -> alt.LayerChart:
    """Bars of conversations per token-length bin (columns start, end, count) and a red rule at the SFT row
    capacity (sequence length + 1): bars right of it are never trained on."""
    df = lengths.assign(over=lengths["start"] >= capacity)
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("start:Q", title="rendered length (tokens)", bin="binned", axis=alt.Axis(format=",d")),
        x2="end:Q",
        y=alt.Y("count:Q", title="conversations"),
        color=alt.Color("over:N", scale=alt.Scale(domain=[False, True], range=["#1f77b4", "#d62728"]), legend=None),
        tooltip=[alt.Tooltip("start:Q", title="from", format=",d"), alt.Tooltip("end:Q", title="to (excl.)", format=",d"),
                 alt.Tooltip("count:Q", title="conversations")])
    rule = alt.Chart(pd.DataFrame({"capacity": [capacity]})).mark_rule(color="#d62728", strokeDash=[4, 3]).encode(
        x="capacity:Q", tooltip=[alt.Tooltip("capacity:Q", title="SFT row capacity (seq len + 1)", format=",d")])
    return alt.layer(bars, rule).properties(height=height)


# ---------------------------------------------------------------------- inside the model: attention and the logit lens
# Frames from streamlit_app/internals.py. Colour = attention weight on a sqrt scale (most weights are small);
# cells a sliding window hides are light red, so a short-window layer visibly cannot look further back.

OUTSIDE_WINDOW = "#fbd5d5"
ATTENTION_SCALE = alt.Scale(type="sqrt", scheme="blues", domain=[0, 1])


def _attention_color(legend: bool = True):
    return (alt.when("datum.outside").then(alt.value(OUTSIDE_WINDOW))
            .otherwise(alt.Color("weight:Q", scale=ATTENTION_SCALE, title="attention", legend=alt.Legend() if legend else None)))


def attention_grid_chart(grid: pd.DataFrame, cells: int, thumb_px: int = 110) -> alt.FacetChart:
    """A layer x head grid of small heatmaps (rows = layers, columns = heads); y = query, x = key cell."""
    # fixed pixel sizes: a discrete (Step) size inside a facet needs a data-derived signal the app's
    # CSP-safe Vega interpreter cannot evaluate (the grid rendered blank)
    side = min(thumb_px, max(cells, 1) * 12)
    heat = alt.Chart(grid).mark_rect().encode(
        x=alt.X("k:O", axis=None), y=alt.Y("q:O", axis=None), color=_attention_color(),
        tooltip=["label:N", alt.Tooltip("q:O", title="query cell"), alt.Tooltip("k:O", title="key cell"),
                 alt.Tooltip("weight:Q", format=".3f"), alt.Tooltip("outside:N", title="beyond the window")],
    ).properties(width=side, height=side)
    return heat.facet(row=alt.Row("layer:O", title="layer", header=alt.Header(labelAngle=0)),
                      column=alt.Column("head:O", title="head", header=alt.Header(labelOrient="top")), spacing=6)


def attention_head_chart(df: pd.DataFrame, size_px: int = 560) -> alt.Chart:
    """One head large, positions labelled with their tokens (queries down, keys across)."""
    order = list(dict.fromkeys(df.sort_values("q")["q_label"]))
    step = max(3, size_px // max(len(order), 1))
    label_axis = alt.Axis(labelLimit=110, labelFontSize=10 if step >= 10 else 8, labelOverlap=True)
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("k_label:N", sort=order, title="key (attended to)", axis=alt.Axis(orient="top", labelAngle=-60, labelLimit=110,
                                                                           labelOverlap=True)),
        y=alt.Y("q_label:N", sort=order, title="query (attending)", axis=label_axis),
        color=_attention_color(legend=False),  # the grid above carries the scale; a legend here overlaps the text beside it
        tooltip=[alt.Tooltip("q_label:N", title="query"), alt.Tooltip("k_label:N", title="key"),
                 alt.Tooltip("weight:Q", format=".4f"), alt.Tooltip("outside:N", title="beyond the window")],
    ).properties(width=alt.Step(step), height=alt.Step(step))


def token_attention_chart(df: pd.DataFrame) -> alt.Chart:
    """What one token attends to in every head: rows = heads (by layer), columns = the keys before it."""
    keys = list(dict.fromkeys(df.sort_values("k")["k_label"]))
    heads = list(dict.fromkeys(df.sort_values(["layer", "head"])["label"]))
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("k_label:N", sort=keys, title="key (attended to)", axis=alt.Axis(labelAngle=-60, labelLimit=110,
                                                                          labelOverlap=True)),
        y=alt.Y("label:N", sort=heads, title=None, axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("weight:Q", scale=ATTENTION_SCALE, title="attention"),
        tooltip=["label:N", alt.Tooltip("k_label:N", title="key"), alt.Tooltip("weight:Q", format=".4f")],
    ).properties(width="container", height=alt.Step(18))


def head_scores_chart(scores: pd.DataFrame, metric: str, title: str, fmt: str = ".2f") -> alt.LayerChart:
    """One per-head score as a layer x head heatmap with the value written in each cell."""
    base = alt.Chart(scores).encode(
        x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)), y=alt.Y("layer:O", title="layer"),
        tooltip=["layer:O", "head:O", alt.Tooltip("kv_group:O", title="KV group"), "pattern:N",
                 alt.Tooltip(f"{metric}:Q", title=title, format=fmt)])
    rect = base.mark_rect().encode(color=alt.Color(f"{metric}:Q", scale=alt.Scale(scheme="viridis"), title=None))
    text = base.mark_text(fontSize=11, color="white").encode(text=alt.Text(f"{metric}:Q", format=fmt))
    return alt.layer(rect, text).properties(title=title, height=alt.Step(26), width=alt.Step(44))


def logit_lens_chart(df: pd.DataFrame) -> alt.LayerChart:
    """Per layer (rows, first at the top), the top tokens it would predict (columns by rank), coloured
    by probability: where in depth the answer forms."""
    base = alt.Chart(df).encode(x=alt.X("rank:O", title="rank", axis=alt.Axis(orient="top", labelAngle=0)),
                                y=alt.Y("layer:O", title="after layer"),
                                tooltip=["layer:O", "rank:O", "token:N", alt.Tooltip("token_id:Q", title="id"),
                                         alt.Tooltip("prob:Q", format=".3f")])
    cells = base.mark_rect(cornerRadius=3).encode(color=alt.Color("prob:Q", scale=ATTENTION_SCALE, legend=None))
    text = base.mark_text(fontSize=12, limit=80).encode(
        text="token:N", color=alt.when("datum.prob > 0.5").then(alt.value("white")).otherwise(alt.value("#111827")))
    return alt.layer(cells, text).properties(width="container", height=alt.Step(30))


def head_evolution_chart(cells: pd.DataFrame, n_cells: int, thumb_px: int = 120) -> alt.FacetChart:
    """One head's pattern at each checkpoint, side by side (columns = training step)."""
    side = min(thumb_px, max(n_cells, 1) * 12)  # fixed pixels, as in attention_grid_chart
    heat = alt.Chart(cells).mark_rect().encode(
        x=alt.X("k:O", axis=None), y=alt.Y("q:O", axis=None),
        color=alt.Color("weight:Q", scale=ATTENTION_SCALE, title="attention"),
        tooltip=["step:O", alt.Tooltip("q:O", title="query cell"), alt.Tooltip("k:O", title="key cell"),
                 alt.Tooltip("weight:Q", format=".3f")],
    ).properties(width=side, height=side)
    return heat.facet(column=alt.Column("step:O", title="training step", header=alt.Header(labelOrient="top")), spacing=6)


def head_scores_over_steps_chart(scores: pd.DataFrame, height: int = 220) -> alt.Chart:
    """A head's BOS / previous-token / same-token shares against training step."""
    long = scores.melt(id_vars=["step"], value_vars=["bos", "previous", "same_token"], var_name="share")
    names = {"bos": "on BOS", "previous": "on previous token", "same_token": "on same token"}
    long["share"] = long["share"].map(names)
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("step:Q", title="training step"), y=alt.Y("value:Q", title="share of attention", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("share:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["step:Q", "share:N", alt.Tooltip("value:Q", format=".3f")],
    ).properties(height=height)


# ---------------------------------------------------------------------- learning-rate finds and sweeps


def lr_find_chart(curves: pd.DataFrame, marks: pd.DataFrame, height: int = 340) -> alt.LayerChart:
    """Loss against the LR multiplier (log scale), one colour per find: the smoothed loss as a line, the raw
    loss faint; `marks` (run_id, run, suggestion, mult) as vertical rules (min/10 dashed, steepest dotted)."""
    x = alt.X("lr_mult:Q", title="learning-rate multiplier (log scale)", scale=alt.Scale(type="log"))
    color = alt.Color("run:N", title=None, scale=run_scale(curves), legend=alt.Legend(orient="bottom"))
    tooltip = ["run:N", "step:Q", alt.Tooltip("lr_mult:Q", title="multiplier", format=".4g"),
               alt.Tooltip("train_loss:Q", title="loss", format=".4f"), alt.Tooltip("smooth_loss:Q", title="smoothed", format=".4f")]
    base = alt.Chart(curves).encode(x=x, color=color, tooltip=tooltip)
    raw = base.mark_line(opacity=0.25, strokeWidth=1).encode(y=alt.Y("train_loss:Q", title="train loss (nats/token)",
                                                                      scale=alt.Scale(zero=False)))
    smooth = base.mark_line(strokeWidth=2.5).encode(y="smooth_loss:Q")
    layers = [raw, smooth]
    if not marks.empty:
        layers.append(alt.Chart(marks).mark_rule(strokeWidth=2).encode(
            x="mult:Q", color=alt.Color("run:N", scale=run_scale(curves), legend=None),
            strokeDash=alt.StrokeDash("suggestion:N", title=None, scale=alt.Scale(domain=["min/10", "steepest", "grid best"],
                                                                                  range=[[6, 4], [2, 3], [1, 0]]),
                                      legend=alt.Legend(orient="bottom")),
            tooltip=["run:N", "suggestion:N", alt.Tooltip("mult:Q", title="multiplier", format=".4g")]))
    return alt.layer(*layers).properties(height=height)


def sweep_chart(runs: pd.DataFrame, summary: pd.DataFrame, setting: str, log_x: bool, height: int = 320) -> alt.LayerChart:
    """val_bpb against one setting: the mean over seeds as a line, the seeds' spread (min to max) as a band,
    every run as a point."""
    integer = bool(len(runs)) and all(float(v).is_integer() for v in runs["value"].dropna())
    axis = alt.Axis(format="d", tickMinStep=1) if integer and not log_x else alt.Axis()
    x = alt.X("value:Q", title=setting + (" (log scale)" if log_x else ""), axis=axis,
              scale=alt.Scale(type="log" if log_x else "linear", zero=False))
    band = alt.Chart(summary).mark_area(opacity=0.2, color="#1f77b4").encode(x=x, y="low:Q", y2="high:Q")
    line = alt.Chart(summary).mark_line(color="#1f77b4", point=True).encode(
        x=x, y=alt.Y("mean:Q", title="val bpb (bits/byte)", scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("value:Q", title=setting, format=".4g"), alt.Tooltip("mean:Q", format=".4f"),
                 alt.Tooltip("low:Q", title="best seed", format=".4f"), alt.Tooltip("high:Q", title="worst seed", format=".4f"),
                 "runs:Q"])
    points = alt.Chart(runs).mark_circle(size=60, color="#374151", opacity=0.7).encode(
        x=x, y="val_bpb:Q", tooltip=["run:N", alt.Tooltip("value:Q", title=setting, format=".4g"), "seed:N",
                                     alt.Tooltip("val_bpb:Q", format=".4f")])
    return alt.layer(band, line, points).properties(height=height)
