"""Generate: sample from a checkpoint and see, token by token, how sure the model was and what else it could
have said; branch from any alternative and keep both continuations side by side."""

from __future__ import annotations

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.sampling import SamplingError
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import data, traces, ui

TOP_N = 20  # alternatives traced per step (the bars); the grid shows the first `alternatives` of them
WINDOW = 20  # generated steps per chart view
TOKENS = "gen"  # the token view's widget keys (ui.token_details)
DEFAULT_PROMPT = "To be, or not to be, that is the"

ui.header("Generate", "What does this checkpoint say, how sure is it at each token, and what else could it have said?")
url = ui.registry_url()
runs = ui.load_runs(url)
choices = ui.load_model_choices(url)

# ---------------------------------------------------------------------- what to sample from, and how
c_run, c_step, c_chat = st.columns([3, 2, 1.3], vertical_alignment="bottom")
picked = ui.checkpoint_picker(runs, choices, c_run, c_step)
directory, step, stamp = picked.directory, picked.step, picked.stamp
chat = c_chat.toggle("Chat prompt", value=picked.phase in ("sft", "rl"), key="chat", bind="query-params",
                     help="Wrap the prompt as a user turn (<|user_start|>…<|assistant_start|>), as SFT/RL models expect")
prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=80, key="prompt", bind="query-params")

sampling = ui.sampling_controls()
settings, max_tokens, alternatives = sampling.settings, sampling.max_tokens, sampling.alternatives
display = ui.display_controls()
shading = display.shading

if not prompt.strip():
    st.info("Type a prompt to generate from.", icon=":material/edit:")
    st.stop()
base_key = (directory, step, stamp, prompt, chat, settings, int(max_tokens))
# Branches belong to one generation (same checkpoint, prompt and settings); they live in the session.
branches = st.session_state.setdefault("branches", {}).setdefault(repr(base_key), [])  # [{"name", "from", "step", ...}]


def run(forced: tuple = ()) -> traces.Generation:
    return data.generate(directory, step, stamp, prompt, chat, settings, int(max_tokens), TOP_N, forced)


try:
    with st.spinner(f"Loading {picked.label} and generating…"):
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
            st.session_state[ui.step_key(TOKENS)] = clicked
            if st.session_state.get("view") != name and len(gens) > 1:
                st.session_state["view_next"] = name  # the radio above is drawn already: set it on the rerun
                st.rerun()
st.caption(f"{traces.settings_label(gen.settings)} · {traces.SHADINGS[shading]}; hover a token for its probabilities, "
           "click it to inspect its step below" + (" · underlined: the branch's own continuation" if branches else ""))

# ---------------------------------------------------------------------- per-step alternatives, one step, branching
branch = ui.token_details(gen, TOKENS, alternatives, display, window=WINDOW, titled=True)
if branch is not None:
    prefix = tuple((j, t.token_id) for j, t in enumerate(gen.steps[:branch.step]))
    branches.append({"name": f"branch {len(branches) + 1}", "from": view, "step": branch.step, "token": branch.token,
                     "forced": prefix + ((branch.step, branch.token_id),)})
    st.session_state["view"] = branches[-1]["name"]
    st.session_state["scroll_to_branch"] = branches[-1]["name"]  # the new text is at the top of the page
    st.rerun()
if branches:
    st.caption("Every branch stays listed above.")
    if st.button("Clear branches", icon=":material/delete_sweep:"):
        branches.clear()
        st.rerun()
