"""Compare: outputs side by side for a grid of sampling settings, or for several checkpoints at one setting.
Each checkpoint's rows run in ONE batched engine call; every row has its own generator, so the same
seed gives the same column whatever else is in the grid."""

from __future__ import annotations

import itertools

import pandas as pd
import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.sampling import SamplingError, SamplingSettings
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, traces, ui

MAX_COLUMNS = 24
PER_ROW = 4  # checkpoint cards per row
DEFAULT_PROMPT = "To be, or not to be, that is the"


def numbers(text: str, kind, name: str) -> list:
    """'0.5, 0.8 1.2' -> [0.5, 0.8, 1.2]; 'off'/'none' -> None (top-k). ValueError with a clear message."""
    out = []
    for part in text.replace(",", " ").split():
        if kind is int and part.lower() in ("off", "none", "0"):
            out.append(None)
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not out:
        raise ValueError(f"{name}: give at least one value")
    return list(dict.fromkeys(out))


ui.header("Compare", "How do sampling settings, or different checkpoints, change what the model writes?")
url = ui.registry_url()
runs = ui.load_runs(url)
choices = ui.load_model_choices(url)
names = frames.run_names(runs)
labels = {row.id: f"{names.get(row.run_id, row.run)} @ step {int(row.step):,}" for row in choices.itertuples()}
rows_by_id = {row.id: row for row in choices.itertuples()}
latest = choices.sort_values("step").groupby("run_id").tail(1)
order = {r.id: i for i, r in enumerate(runs)}  # newest activity first
latest_ids = sorted(latest["id"], key=lambda cid: order.get(rows_by_id[cid].run_id, 1 << 30))

mode = st.segmented_control("Compare", ["settings", "checkpoints"], default="settings", key="mode", bind="query-params",
                            help="settings: a grid of temperatures × top-k × top-p × seeds on one checkpoint; checkpoints: "
                                 "several checkpoints at one setting") or "settings"
prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=68, key="prompt", bind="query-params")
try:
    if mode == "settings":
        c1, c2, c3, c4, c5 = st.columns([4, 2, 2, 2, 1.4])
        ckpts = [c1.selectbox("Checkpoint", latest_ids + [i for i in labels if i not in latest_ids], format_func=labels.get,
                              key="ckpt", bind="query-params")]
        temps = numbers(c2.text_input("Temperatures", "0, 0.5, 0.9, 1.3", key="temps", bind="query-params"), float, "temperatures")
        topks = numbers(c3.text_input("Top-k (off = none)", "50", key="topk", bind="query-params"), int, "top-k")
        topps = numbers(c4.text_input("Top-p", "1.0", key="topp", bind="query-params"), float, "top-p")
        seeds = numbers(c5.text_input("Seeds", "42", key="seeds", bind="query-params"), int, "seeds")
    else:
        # a row of its own: several "run @ step" chips need the width
        ckpts = st.multiselect("Checkpoints", list(labels), default=latest_ids[:3], format_func=labels.get, key="ckpts",
                               max_selections=8, bind="query-params", help="Shown left to right by training step")
        c2, c3, c4, c5 = st.columns(4)
        temps = [c2.number_input("Temperature", 0.0, 2.0, 0.8, 0.05, key="temp1")]
        k = c3.number_input("Top-k (0 = off)", 0, 100_000, 50, key="topk1")
        topks = [int(k) or None]
        topps = [c4.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="topp1")]
        seeds = [int(c5.number_input("Seed", 0, 2**31 - 1, 42, key="seed1"))]
except ValueError as e:
    st.error(f"{e}. Separate values with commas, e.g. 0.5, 0.8, 1.2.", icon=":material/pin:")
    st.stop()
max_tokens = int(st.slider("Max new tokens", 8, 256, 48, 8, key="n", bind="query-params"))
if not prompt.strip():
    st.info("Type a prompt to compare from.", icon=":material/edit:")
    st.stop()
if not ckpts:
    st.info("Pick at least one checkpoint.", icon=":material/touch_app:")
    st.stop()
if mode == "checkpoints":  # training order: earlier steps to the left
    ckpts = sorted(ckpts, key=lambda cid: (int(rows_by_id[cid].step), order.get(rows_by_id[cid].run_id, 1 << 30)))
grid = [SamplingSettings(temperature=float(t), top_k=k, top_p=float(p), seed=int(s))
        for t, k, p, s in itertools.product(temps, topks, topps, seeds)]
if len(grid) * len(ckpts) > MAX_COLUMNS:
    st.warning(f"{len(grid) * len(ckpts)} columns is more than {MAX_COLUMNS}: narrow the grid (fewer values per setting).",
               icon=":material/grid_on:")
    st.stop()

# ---------------------------------------------------------------------- generate: one batched call per checkpoint
columns = []  # (title, short, Generation)
try:
    with st.spinner(f"Generating {len(grid) * len(ckpts)} columns…"):
        for cid in ckpts:
            row = rows_by_id[cid]
            directory, step = str(row.directory), int(row.step)
            phase = next((r.phase for r in runs if r.id == row.run_id), "base")
            gens = data.compare(directory, step, data.model_stamp(directory, step), prompt, phase in ("sft", "rl"),
                                tuple(grid), max_tokens)
            for g in gens:
                title = labels[cid] if mode == "checkpoints" else g.label
                short = labels[cid] if mode == "checkpoints" else traces.settings_label(g.settings).replace(" · ", " ")
                columns.append((title, short, g))
except (RegistryError, CheckpointError, TokenizerError, SamplingError) as e:
    ui.show_error(e)
    st.stop()

# ---------------------------------------------------------------------- the answer first: statistics
stats = pd.DataFrame([{"column": title, "short": f"#{i + 1}", **traces.stats(g)} for i, (title, _, g) in enumerate(columns)])
best = stats.loc[stats["mean_logprob"].idxmax()] if stats["mean_logprob"].notna().any() else None
diverse = stats.loc[stats["distinct_2"].idxmax()] if stats["distinct_2"].notna().any() else None
t1, t2, t3, t4 = st.columns(4)
t1.metric("Columns", len(columns), f"{len(ckpts)} batched engine call{'s' if len(ckpts) > 1 else ''}", delta_color="off",
          delta_arrow="off", border=True)
t2.metric("Most likely text", best["short"] if best is not None else "—",
          f"mean log-prob {best['mean_logprob']:.3f}" if best is not None else None, delta_color="off", delta_arrow="off",
          border=True)
t3.metric("Most diverse", diverse["short"] if diverse is not None else "—",
          f"distinct-2 {diverse['distinct_2']:.0%}" if diverse is not None else None, delta_color="off", delta_arrow="off",
          border=True)
t4.metric("Repeated trigrams", int(stats["repeated_3grams"].sum()), "over all columns", delta_color="off",
          delta_arrow="off", border=True, help="Occurrences of a token trigram already seen earlier in the same column")
left, right = st.columns(2)
with left:
    st.altair_chart(charts.compare_chart(stats), width="stretch")
with right:
    st.dataframe(stats, hide_index=True, width="stretch",
                 column_order=["short", "mean_logprob", "mean_entropy", "distinct_2", "repeated_3grams", "tokens"],
                 column_config={"short": st.column_config.TextColumn("#", width="small", help="the column below"),
                                "tokens": st.column_config.NumberColumn("tokens", format="%d"),
                                "mean_logprob": st.column_config.NumberColumn("mean log-p", format="%.3f"),
                                "mean_entropy": st.column_config.NumberColumn("mean entropy", format="%.3f"),
                                "distinct_2": st.column_config.NumberColumn("distinct-2", format="percent"),
                                "repeated_3grams": st.column_config.NumberColumn("repeats", format="%d")})
st.caption("Log-probability and entropy under the model at temperature 1, in nats per token; distinct-2 = unique "
           "token bigrams / bigrams. Same seed, same column, whatever else is in the grid.")

# ---------------------------------------------------------------------- side by side


def card(i: int, title: str | None, g) -> None:
    s = traces.stats(g)
    with st.container(border=True):
        st.markdown(f"**#{i + 1}**" + (f" · {title}" if title else ""))
        st.caption(f"log-p {s['mean_logprob']:.2f} · entropy {s['mean_entropy']:.2f} · distinct-2 "
                   f"{s['distinct_2'] or 0:.0%} · {s['repeated_3grams']} repeats · {s['tokens']} tok"
                   + (" · stopped" if g.finish_reason == "stop" else ""))
        st.markdown(traces.shaded_html(g), unsafe_allow_html=True)


SETTING_LABELS = {"temperature": lambda v: f"T={v:g}", "top_k": lambda v: f"top-k {v or 'off'}",
                  "top_p": lambda v: f"top-p {v:g}", "seed": lambda v: f"seed {v}"}
if mode == "settings":
    # The grid as it is: one row per value of the first varied settings, one column per value of the last.
    values = {"temperature": temps, "top_k": topks, "top_p": topps, "seed": seeds}
    varied = [k for k, v in values.items() if len(v) > 1]
    col_key = varied[-1] if varied else None
    row_keys = varied[:-1]
    fixed = " · ".join(SETTING_LABELS[k](v[0]) for k, v in values.items() if len(v) == 1)
    if fixed:
        st.caption(f"Every column: {fixed}.")
    col_values = values[col_key] if col_key else [None]
    # columns come in `grid` order: itertools.product of the values in this order
    by_setting = {combo: (i, columns[i][2]) for i, combo in enumerate(itertools.product(*values.values()))}
    label_w = 1 if row_keys else 0.001
    header = st.columns([label_w] + [3] * len(col_values))
    if col_key:
        for cell, v in zip(header[1:], col_values):
            cell.markdown(f"**{SETTING_LABELS[col_key](v)}**")
    for row_vals in itertools.product(*(values[k] for k in row_keys)):
        cells = st.columns([label_w] + [3] * len(col_values))
        if row_keys:
            cells[0].markdown("**" + "<br>".join(SETTING_LABELS[k](v) for k, v in zip(row_keys, row_vals)) + "**",
                              unsafe_allow_html=True)
        for cell, cv in zip(cells[1:], col_values):
            setting = {**{k: v[0] for k, v in values.items()}, **dict(zip(row_keys, row_vals))}
            if col_key:
                setting[col_key] = cv
            i, g = by_setting[tuple(setting[k] for k in values)]
            with cell:
                card(i, None, g)
else:
    for start in range(0, len(columns), PER_ROW):
        cols = st.columns(min(PER_ROW, len(columns)))
        for col, (i, (title, _, g)) in zip(cols, enumerate(columns[start:start + PER_ROW], start)):
            with col:
                card(i, title, g)
