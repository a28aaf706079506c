"""Generate: sample from a checkpoint and see, token by token, how sure the model was and what else it could
have said; branch from any alternative and keep both continuations side by side."""

from __future__ import annotations

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.sampling import SamplingError
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, traces, ui

TOP_N = 20  # alternatives traced per step (the bars); the grid shows the first `alternatives` of them
WINDOW = 20  # generated steps per chart view
DEFAULT_PROMPT = "To be, or not to be, that is the"

ui.header("Generate", "What does this checkpoint say, how sure is it at each token, and what else could it have said?")
url = ui.registry_url()
runs = ui.load_runs(url)
choices = ui.load_model_choices(url)

# ---------------------------------------------------------------------- what to sample from, and how
loadable = [r for r in runs if r.id in set(choices["run_id"])]
names = frames.run_names(runs)
c_run, c_step, c_chat = st.columns([3, 2, 1.3], vertical_alignment="bottom")
run_id = ui.run_picker(loadable, container=c_run)
steps = [int(s) for s in choices[choices["run_id"] == run_id].sort_values("step", ascending=False)["step"]]
step = c_step.selectbox("Step", steps, format_func=lambda s: f"step {s:,}", key="step", bind="query-params",
                        help="Complete checkpoints of this run, newest first")
row = choices[(choices["run_id"] == run_id) & (choices["step"] == step)].iloc[0]
phase = next(r.phase for r in runs if r.id == run_id)
chat = c_chat.toggle("Chat prompt", value=phase in ("sft", "rl"), key="chat", bind="query-params",
                     help="Wrap the prompt as a user turn (<|user_start|>…<|assistant_start|>), as SFT/RL models expect")
prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=80, key="prompt", bind="query-params")

sampling = ui.sampling_controls()
settings, max_tokens, alternatives = sampling.settings, sampling.max_tokens, sampling.alternatives
with st.sidebar:
    st.markdown("**Display**")
    shading = st.segmented_control("Shade tokens by", list(traces.SHADINGS), default="likely", key="shade",
                                   bind="query-params", format_func={"likely": "likelihood", "surprise": "surprise"}.get,
                                   help="likelihood: darker = more probable under the model; surprise: darker = less "
                                        "probable (−log₂ p), so the unexpected tokens stand out") or "likely"
    show_p = st.toggle("Probabilities in the grid", key="show_p", bind="query-params",
                       help="Print each cell's model probability under its token")

if not prompt.strip():
    st.info("Type a prompt to generate from.", icon=":material/edit:")
    st.stop()
directory, stamp = str(row["directory"]), data.model_stamp(str(row["directory"]), step)
base_key = (directory, step, stamp, prompt, chat, settings, int(max_tokens))
# Branches belong to one generation (same checkpoint, prompt and settings); they live in the session.
branches = st.session_state.setdefault("branches", {}).setdefault(repr(base_key), [])  # [{"name", "from", "step", ...}]


def run(forced: tuple = ()) -> traces.Generation:
    return data.generate(directory, step, stamp, prompt, chat, settings, int(max_tokens), TOP_N, forced)


try:
    with st.spinner(f"Loading {names[run_id]} @ step {step:,} and generating…"):
        main = run()
        gens = [("main", main)] + [(b["name"], run(b["forced"])) for b in branches]
except (RegistryError, CheckpointError, TokenizerError, SamplingError) as e:
    ui.show_error(e, "The prompt is longer than this model's context: shorten it." if "context" in str(e) else None)
    st.stop()

# ---------------------------------------------------------------------- the answer first
view = "main"
if len(gens) > 1:
    options = [n for n, _ in gens]
    if st.session_state.get("view_next") in options:  # a token clicked in another generation's text
        st.session_state["view"] = st.session_state.pop("view_next")
    if st.session_state.get("view") not in options:
        st.session_state["view"] = options[-1]
    view = st.radio("Charts show", options, horizontal=True, key="view",
                    format_func=lambda n: "main generation" if n == "main" else n)
gen = dict(gens)[view]
stats = traces.stats(gen)
t1, t2, t3, t4 = st.columns(4)
t1.metric("Generated", f"{stats['tokens']} tokens", "stopped at end token" if gen.finish_reason == "stop" else "reached max tokens",
          delta_color="off", delta_arrow="off", border=True, help=f"after a {gen.prompt_tokens}-token prompt")
t2.metric("Mean log-probability", f"{stats['mean_logprob']:.3f}" if stats["mean_logprob"] is not None else "—",
          f"perplexity {stats['perplexity']:.2f}" if stats["perplexity"] else None, delta_color="off", delta_arrow="off",
          border=True, help="Of the generated tokens under the model (temperature 1, no filters), nats per token")
t3.metric("Mean entropy", f"{stats['mean_entropy']:.3f} nats" if stats["mean_entropy"] is not None else "—",
          "average over the steps", delta_color="off", delta_arrow="off", border=True)
t4.metric("Distinct bigrams", f"{stats['distinct_2']:.0%}" if stats["distinct_2"] is not None else "—",
          f"{stats['repeated_3grams']} repeated trigrams", delta_color="off", delta_arrow="off", border=True)

text_cols = st.columns(min(len(gens), 3))
scroll_to = st.session_state.pop("scroll_to_branch", None)
for i, (name, g) in enumerate(gens):
    with text_cols[i % len(text_cols)].container(border=True):
        b = next((b for b in branches if b["name"] == name), None)
        if name == scroll_to:
            ui.scroll_here(key=f"scroll_{name}")
        st.markdown(f"**{'Main generation' if b is None else name.capitalize()}**" + ("" if b is None else
                    f" · from {b['from']} at step {b['step'] + 1}: `{traces.visible(b['token'])}`"))
        clicked = ui.clickable_text(traces.shaded_html(g, prompt, since=None if b is None else b["step"], shading=shading),
                                    key=f"text_{name}")
        if clicked:  # a token clicked in the text: show this generation and select its step, as a grid click does
            st.session_state["inspect"] = clicked
            if st.session_state.get("view") != name and len(gens) > 1:
                st.session_state["view_next"] = name  # the radio above is drawn already: set it on the rerun
                st.rerun()
st.caption(f"{traces.settings_label(gen.settings)} · {traces.SHADINGS[shading]}; hover a token for its probabilities, "
           "click it to inspect its step below" + (" · underlined: the branch's own continuation" if branches else ""))

# ---------------------------------------------------------------------- per-step alternatives
st.subheader("Per-step alternatives")
n_steps = len(gen.steps)


# A fragment: moving the window redraws the grid alone; a clicked cell reruns the page (the step below changes).
@st.fragment
def alternatives_grid() -> None:
    first = 0
    if n_steps > WINDOW:
        wanted = int(st.session_state.get("inspect", 1))
        shown_from = int(st.session_state.get("from", 1))
        if not shown_from <= wanted < shown_from + WINDOW:  # a token clicked in the text outside the window: move it
            st.session_state["from"] = min(max(1, wanted - WINDOW // 2), n_steps - WINDOW + 1)
        first = st.slider("First step shown", 1, n_steps - WINDOW + 1, 1, key="from") - 1
    picked = (st.session_state.get("gen_chart") or {}).get("selection", {}).get("cell") or []
    if picked and picked != st.session_state.get("gen_last_pick"):
        # a clicked cell selects its step below, and an alternative's cell preselects it for branching
        st.session_state["gen_last_pick"] = picked
        clicked_step, row_name = int(picked[0]["step"]), str(picked[0].get("row", "sampled"))
        st.session_state["inspect"] = clicked_step
        if row_name.startswith("#") and 1 <= clicked_step <= len(gen.steps):
            st_ = gen.steps[clicked_step - 1]
            ids = [a.token_id for a in st_.alternatives if a.token_id != st_.token_id][:10]
            rank = int(row_name[1:])
            if rank <= len(st_.alternatives) and st_.alternatives[rank - 1].token_id in ids:
                st.session_state[f"branch_alt_{clicked_step}"] = ids.index(st_.alternatives[rank - 1].token_id)
        st.rerun(scope="app")  # the inspected step lives outside this fragment (once per click: the pick is kept)
    st.session_state["inspect"] = min(max(1, int(st.session_state.get("inspect", 1))), max(n_steps, 1))
    alts = traces.alternatives_frame(gen, alternatives, first, first + WINDOW)
    st.altair_chart(charts.generation_chart(alts, selected_step=st.session_state["inspect"], shading=shading,
                                            probabilities=show_p),
                    on_select="rerun", key="gen_chart", selection_mode="cell", width="stretch")
    shade_note = "darker blue = more probable under the model" if shading == "likely" else "darker red = more surprising"
    st.caption("Columns are generated steps; the top row is the token sampled, the rows below the most likely tokens "
               f"({shade_note}, grey = removed by top-k/top-p, red outline = the one sampled). Click a cell to inspect "
               "that step below" + ("" if show_p else "; turn on “Probabilities in the grid” in the sidebar to print them")
               + ".")
    st.markdown("**Entropy per step** (how spread the model's distribution is, in nats)")
    st.altair_chart(charts.entropy_chart(traces.steps_frame(gen).iloc[first:first + WINDOW]), width="stretch")


alternatives_grid()

# ---------------------------------------------------------------------- one step, and branching
if not n_steps:
    st.stop()
st.subheader("Inspect a step and branch")
inspect = st.columns([1, 4])[0].number_input("Step", 1, n_steps, key="inspect")
s = gen.steps[inspect - 1]
left, right = st.columns([3, 2])
with left:
    st.markdown(f"Step {inspect}: sampled **`{traces.visible(gen.token_text(s.token_id))}`** with model p = {s.model_prob:.3f} (sampling "
                f"p = {s.sampled_prob:.3f}, rank {s.rank}{', forced by the branch' if s.forced else ''}); entropy "
                f"{s.entropy:.3f} nats.")
    st.altair_chart(charts.distribution_chart(traces.distribution_frame(gen, inspect - 1)), width="stretch")
    st.caption(f"The top {len(s.alternatives)} tokens by model probability: blue as the model sees them, orange as "
               "sampling saw them after temperature and filters; faded bars were filtered out.")
with right:
    others = [a for a in s.alternatives if a.token_id != s.token_id][:10]
    if not others:
        st.caption("No alternative was traced at this step.")
    else:
        pick = st.radio("Continue instead with", list(range(len(others))), key=f"branch_alt_{inspect}",
                        format_func=lambda i: f"`{traces.visible(gen.token_text(others[i].token_id))}`  p={others[i].model_prob:.3f}"
                        + ("" if others[i].kept else " (filtered out)"))
        if st.button("Branch from here", type="primary", icon=":material/call_split:"):
            alt_token = others[pick]
            prefix = tuple((j, t.token_id) for j, t in enumerate(gen.steps[:inspect - 1]))
            branches.append({"name": f"branch {len(branches) + 1}", "from": view, "step": inspect - 1,
                             "token": gen.token_text(alt_token.token_id), "forced": prefix + ((inspect - 1, alt_token.token_id),)})
            st.session_state["view"] = branches[-1]["name"]
            st.session_state["scroll_to_branch"] = branches[-1]["name"]  # the new text is at the top of the page
            st.rerun()
        st.caption("The branch keeps this generation's tokens up to the step, emits the chosen token there, and "
                   "continues with the same settings and seed. Every branch stays listed above.")
        if branches and st.button("Clear branches", icon=":material/delete_sweep:"):
            branches.clear()
            st.rerun()
