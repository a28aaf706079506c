"""Attention: what each layer and head of a checkpoint looks at for a prompt, which heads attend to BOS, the
previous token or earlier copies of the same token, where in depth the prediction forms (logit lens), and
how one head's pattern formed over a run's checkpoints."""

from __future__ import annotations

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.sampling import SamplingError
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, internals, traces, ui

DEFAULT_PROMPT = "To be, or not to be, that is the question"

ui.header("Attention", "What does each head look at, which heads copy or look back, and where in depth does the "
          "prediction form?")
url = ui.registry_url()
runs = ui.load_runs(url)
choices = ui.load_model_choices(url)

# ---------------------------------------------------------------------- checkpoint and prompt
names = frames.run_names(runs)
c_run, c_step, c_more = st.columns([3, 2, 1.4], vertical_alignment="bottom")
picked = ui.checkpoint_picker(runs, choices, c_run, c_step)
run_id, step, directory, stamp = picked.run_id, picked.step, picked.directory, picked.stamp
more = c_more.number_input("Continue greedily", 0, 256, 0, key="gen", bind="query-params",
                           help="Append this many greedily generated tokens to the prompt, to see attention over a "
                                "generation (0 = the prompt alone)")
prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=70, key="prompt", bind="query-params",
                      help="<|bos|> is prepended. At most the model's context (its sequence length) in tokens.")
if not prompt.strip():
    st.info("Type a prompt to look inside the model.", icon=":material/edit:")
    st.stop()

try:
    with st.spinner(f"Loading {picked.label} and capturing every head's attention…"):
        att = data.attention(directory, step, stamp, prompt, int(more))
except (RegistryError, CheckpointError, TokenizerError, SamplingError) as e:
    ui.show_error(e, "Shorten the prompt (or the continuation)." if "context" in str(e) else None)
    st.stop()

n = len(att.tokens)
scores = att.scores
summary = internals.pattern_summary(scores)
count = dict(zip(summary["pattern"], summary["heads"]))
t1, t2, t3, t4 = st.columns(4)
t1.metric("Tokens", f"{n}", f"{att.generated} generated" if att.generated else "prompt only", delta_color="off",
          delta_arrow="off", border=True)
t2.metric("Heads", f"{att.n_layer} × {att.n_head}", f"{att.n_kv_head} KV groups" + (" (GQA)" if att.n_kv_head < att.n_head else ""),
          delta_color="off", delta_arrow="off", border=True, help="layers × query heads")
windows = sorted(set(att.windows))
t3.metric("Windows", " / ".join(str(w) for w in windows), "sliding windows cut in" if min(att.windows) < n - 1 else
          "the prompt fits every window", delta_color="off", delta_arrow="off", border=True,
          help=f"per layer: {list(att.windows)} (a query sees at most window + 1 keys)")
t4.metric("Look-back heads", f"{count['previous token'] + count['same token']}", f"{count['BOS']} park on BOS",
          delta_color="off", delta_arrow="off", border=True,
          help="heads whose attention is mostly (> 50%) on the previous token or an earlier copy of the same token")
if att.factor > 1 or att.grid_factor > 1:
    st.caption(f"{n} tokens are more than the charts can show one by one: the large views average blocks of "
               f"{att.factor} × {att.factor} positions and the grid {att.grid_factor} × {att.grid_factor} (each cell is the "
               "mean over its queries of their total attention to its keys, so rows still sum to 1).")

# ---------------------------------------------------------------------- the grid
st.subheader("Every layer and head")
st.altair_chart(charts.attention_grid_chart(internals.grid_frame(att), att.grid.shape[-1]), width="content")
st.caption("Rows are layers, columns heads; in each map the queries run down and the keys across (darker = more "
           "attention). Light red: keys a sliding-window layer cannot see from that query.")

# ---------------------------------------------------------------------- one head, and one token across heads
st.subheader("One head")
c_l, c_h, _ = st.columns([1, 1, 3])
layer = c_l.selectbox("Layer", list(range(att.n_layer)), index=att.n_layer - 1, key="layer", bind="query-params")
head = c_h.selectbox("Head", list(range(att.n_head)), key="head", bind="query-params",
                     format_func=lambda h: internals.head_label(layer, h, h // (att.n_head // att.n_kv_head), att.n_head,
                                                                att.n_kv_head))
sc = scores[(scores["layer"] == layer) & (scores["head"] == head)].iloc[0]
left, right = st.columns([3, 2])
with left:
    st.altair_chart(charts.attention_head_chart(internals.head_frame(att, layer, head)), width="content")
with right:
    st.markdown(f"**Layer {layer}, head {head}** (KV group {sc['kv_group']}, window {sc['window']}): "
                f"**{sc['pattern']}**")
    st.markdown(f"- entropy {sc['entropy']:.2f} nats (uniform over the prompt: higher)\n"
                f"- mean look-back {sc['mean_distance']:.1f} tokens\n"
                f"- on BOS {sc['bos']:.0%} · on the previous token {sc['previous']:.0%} · on earlier copies of the "
                f"same token {sc['same_token']:.0%}")

st.subheader("What does this token attend to?")
position = st.select_slider("Token", list(range(n)), value=n - 1, key="pos",
                            format_func=lambda i: f"{i} {traces.visible(att.tokens[i])}")
st.altair_chart(charts.token_attention_chart(internals.token_frame(att, position)), width="stretch")
st.caption(f"Each row is one head (by layer); the columns are the positions up to {position}"
           + (" (in blocks, as above)" if att.factor > 1 else "") + ".")

# ---------------------------------------------------------------------- summaries and the logit lens
st.subheader("Head summary")
a, b, c = st.columns([2, 2, 3])
a.altair_chart(charts.head_scores_chart(scores, "entropy", "entropy (nats)"), width="content")
b.altair_chart(charts.head_scores_chart(scores, "mean_distance", "mean look-back (tokens)", ".1f"), width="content")
c.dataframe(summary, hide_index=True, width="stretch",
            column_config={"pattern": "pattern (> 50% of attention)", "heads": st.column_config.NumberColumn("heads")})

st.subheader("Where in depth does the prediction form?")
try:
    lens = data.logit_lens(directory, step, stamp, prompt, int(more), position)
except SamplingError as e:
    ui.show_error(e)
    st.stop()
st.altair_chart(charts.logit_lens_chart(lens), width="stretch")
st.caption(f"What the model would predict after token {position} (`{traces.visible(att.tokens[position])}`) if it stopped "
           "after each layer: that layer's residual stream through the final norm and lm_head. The last row is the "
           "model's own prediction.")

# ---------------------------------------------------------------------- across the run's checkpoints
st.subheader(f"How L{layer} H{head} formed during training")
run_steps = data.evolution_steps([int(s) for s in choices[choices["run_id"] == run_id]["step"]])
if len(run_steps) < 2:
    st.info("This run has one loadable checkpoint: nothing to compare across training.", icon=":material/timeline:")
    st.stop()
if st.toggle(f"Read {len(run_steps)} checkpoints of {names[run_id]}", key="evolve",
             help="Loads each checkpoint (evenly spaced over the run) and captures this head for the prompt alone"):
    bar = st.progress(0.0, text="Loading checkpoints…")
    cells, per_step, factor = data.head_over_steps(
        directory, tuple(run_steps), prompt, layer, head,
        lambda i, total, what: bar.progress(i / total, text=f"Capturing {what} ({i + 1}/{total})"))
    bar.empty()
    st.altair_chart(charts.head_evolution_chart(cells, int(cells["q"].max()) + 1 if len(cells) else 1), width="content")
    st.altair_chart(charts.head_scores_over_steps_chart(per_step), width="stretch")
    if factor > 1:
        st.caption(f"Patterns averaged over blocks of {factor} × {factor} positions.")
