"""Chat: talk to a checkpoint turn by turn, with the calculator tool, and see for every reply how sure the model was
at each token and what else it could have said; branch from any alternative, edit or delete any turn and regenerate
from there, and save the conversation to a file the Conversation builder and chat_sft read.

The conversation lives in the session (`chat_state`): a system message and turns; an assistant turn keeps every
version generated for it (the first reply, regenerations, branches) with its traced generation. The next reply's
prompt is the conversation rendered with the chat template (as a saved file would render it). Generation runs
through `data.ReplyStream` (the engine's stream with its tool loop), shown as it is produced, then drawn with the
Generate page's pieces (`ui.token_details`, traces.py, charts.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.conversation import ConversationError
from nanochat.conversation_file import ConversationFileError
from nanochat.sampling import SamplingError
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import data, frames, traces, ui

TOP_N = 20  # alternatives traced per step
CHAT_PHASES = ("sft", "rl")  # runs trained on the chat template, listed first
ERRORS = (RegistryError, CheckpointError, TokenizerError, SamplingError, ConversationError)

ui.header("Chat", "What does this checkpoint answer, how sure is it at each token of a reply, and what else could it "
                  "have said?")
url = ui.registry_url()
runs = ui.load_runs(url)
choices = ui.load_model_choices(url)

# ---------------------------------------------------------------------- who to talk to, and how
names = frames.run_names(runs)
c_run, c_step = st.columns([3, 2], vertical_alignment="bottom")
# chat runs first, each newest first
picked = ui.checkpoint_picker(runs, choices, c_run, c_step, first=lambda r: r.phase not in CHAT_PHASES)
run_id, step, phase, directory, stamp = picked.run_id, picked.step, picked.phase, picked.directory, picked.stamp
choice = ui.sampling_controls(max_tokens=64, seed_help="Regenerating a reply adds 1 to the seed per earlier version.")
display = ui.display_controls()
model_label = picked.label
if phase not in CHAT_PHASES:
    st.info(f"**{names[run_id]} is a base model**: it never saw the chat template, so it continues the conversation's "
            "text rather than answering it. Chat with an SFT run (`python -m scripts.chat_sft`) for real replies.",
            icon=":material/info:")

state = st.session_state.setdefault("chat_state", {"turns": [], "versions": 0})
turns: list[dict] = state["turns"]  # {"role", "content"} (+ "versions", "current" for generated assistant turns)
pending = st.session_state.get("chat_pending")  # a reply to generate on this run: {"turn", "settings", ...}
system = st.session_state.get("chat_system", "")


def history(upto: int) -> list[dict]:
    """The conversation before turn `upto`, as messages (the system message first when there is one)."""
    lead = [{"role": "system", "content": system}] if system.strip() else []
    return lead + [{"role": t["role"], "content": t["content"]} for t in turns[:upto]]


def ask_reply(turn: int, settings, max_tokens: int, forced: tuple = (), branch: dict | None = None) -> None:
    """Generate turn `turn` on the next run (a new turn, or a new version of an assistant turn)."""
    st.session_state["chat_pending"] = {"turn": turn, "settings": settings, "max_tokens": max_tokens,
                                        "forced": forced, "branch": branch}
    st.session_state.pop("chat_editing", None)
    st.rerun()


def as_text(content) -> str:
    return content if isinstance(content, str) else "".join(
        p["text"] if p["type"] == "text" else f"[{p['type']}: {p['text']}]" for p in content)


# ---------------------------------------------------------------------- the answer first
try:
    context = data.model_context(directory, step, stamp)
    used = data.chat_tokens(directory, step, stamp, history(len(turns))) if turns else 0
except ERRORS as e:
    ui.show_error(e)
    st.stop()
last = next((t for t in reversed(turns) if t["role"] == "assistant" and t.get("versions")), None)
last_gen = last["versions"][last["current"]]["reply"].generation if last else None
t1, t2, t3, t4 = st.columns(4)
t1.metric("Turns", f"{sum(t['role'] == 'user' for t in turns)} asked", f"{len(turns)} messages", delta_color="off",
          delta_arrow="off", border=True)
t2.metric("Context used", f"{used:,} / {context:,}", f"{max(context - used, 0):,} tokens left for the next reply",
          delta_color="off", delta_arrow="off", border=True,
          help="Tokens of the conversation rendered with the chat template, against the model's sequence length")
if last_gen is not None:
    stats = traces.stats(last_gen)
    t3.metric("Last reply", f"{stats['tokens']} tokens", "ended by the model" if last_gen.finish_reason == "stop"
              else "reached max tokens", delta_color="off", delta_arrow="off", border=True)
    t4.metric("Mean entropy (last reply)", f"{stats['mean_entropy']:.3f} nats" if stats["mean_entropy"] is not None
              else "—", f"mean log-p {stats['mean_logprob']:.3f}" if stats["mean_logprob"] is not None else None,
              delta_color="off", delta_arrow="off", border=True)
else:
    t3.metric("Last reply", "—", "nothing generated yet", delta_color="off", delta_arrow="off", border=True)
    t4.metric("Mean entropy (last reply)", "—", border=True)

c_sys, c_file, c_save, c_new = st.columns([3, 3, 1, 1], vertical_alignment="bottom")
c_sys.text_input("System message (optional)", key="chat_system", placeholder="merged into the first user turn",
                 help="Upstream's template merges a system message into the first user turn")
default_file = str(Path(data.registry_target().scan_default).expanduser() / "chat_conversations.jsonl")
save_to = c_file.text_input("Save to", default_file, key="chat_file",
                            help="A JSONL conversation file: the conversation is added as its last line (the file is "
                                 "created if absent; nothing in it changes). The Conversation builder and chat_sft read it.")
if c_save.button("Save", icon=":material/save:", width="stretch", disabled=not turns):
    try:
        line = data.append_conversation(save_to, history(len(turns)))
        st.success(f"Saved as line {line} of `{save_to}`: open it in the Conversation builder.", icon=":material/check:")
    except (ConversationFileError, ConversationError) as e:
        ui.show_error(e, "Pick a file in an existing folder (a .jsonl file), then save again.")
if c_new.button("New chat", icon=":material/add_comment:", width="stretch", disabled=not turns):
    turns.clear()
    st.session_state.pop("chat_pending", None)
    st.rerun()

if not turns and not pending:
    st.info("Type a message below to start. Every reply shows each token's probability; open its token view to see "
            "the alternatives and branch from one.", icon=":material/chat:")

# ---------------------------------------------------------------------- the conversation
editing = st.session_state.get("chat_editing")
stop_at = pending["turn"] if pending else len(turns)  # a turn being regenerated is drawn by the stream below
for i, turn in enumerate(turns[:stop_at]):
    role = turn["role"]
    with st.chat_message(role):
        if editing == i:
            new = st.text_area("Edit", as_text(turn["content"]), key=f"chat_edit_{i}", label_visibility="collapsed")
            b1, b2, _ = st.columns([2, 1, 4])
            if b1.button("Save and regenerate" if role == "user" else "Save", key=f"chat_edit_save_{i}", type="primary"):
                if not new.strip():
                    st.warning("A turn cannot be empty: type something, or delete the turn.", icon=":material/edit:")
                else:
                    turns[i] = {"role": role, "content": new}  # an edited reply is plain text, with no token view
                    del turns[i + 1:]
                    st.session_state.pop("chat_editing", None)
                    if role == "user":
                        ask_reply(i + 1, choice.settings, choice.max_tokens)
                    st.rerun()
            if b2.button("Cancel", key=f"chat_edit_cancel_{i}"):
                st.session_state.pop("chat_editing", None)
                st.rerun()
            continue
        versions = turn.get("versions") or []
        if role == "assistant" and versions:
            if len(versions) > 1 and i == len(turns) - 1:
                cur = st.segmented_control("Version", list(range(len(versions))), default=turn["current"],
                                           key=f"chat_version_{i}_{len(versions)}", format_func=lambda k, vs=versions: vs[k]["label"])
                if cur is not None and cur != turn["current"]:
                    turn["current"], turn["content"] = cur, versions[cur]["reply"].content
            v = versions[turn["current"]]
            gen = v["reply"].generation
            since = v["branch"]["step"] if v["branch"] else None
            st.markdown(traces.shaded_html(gen, since=since, shading=display.shading), unsafe_allow_html=True)
            tools = v["reply"].tool_calls
            st.caption(f"{v['label']} · {v['model']} · {traces.settings_label(gen.settings)} · {len(gen.token_ids)} tokens"
                       f"{', stopped by the model' if gen.finish_reason == 'stop' else ', reached max tokens'}"
                       + (f" · {tools} calculator call{'s' if tools > 1 else ''}" if tools else "")
                       + (f" · underlined: the branch from step {since + 1}" if since is not None else ""))
            # keyed by the conversation's length too: the newest reply opens, older ones close when a turn is added
            if st.toggle("Tokens, alternatives and branching", value=i == len(turns) - 1,
                         key=f"chat_view_{v['id']}_{len(turns)}"):
                branch = ui.token_details(gen, f"chat_{v['id']}", choice.alternatives, display)
                if branch is not None:
                    prefix = tuple((j, t.token_id) for j, t in enumerate(gen.steps[:branch.step]))
                    ask_reply(i, v["settings"], v["max_tokens"], prefix + ((branch.step, branch.token_id),),
                              {"from": v["label"], "step": branch.step, "token": branch.token})
        else:
            st.markdown(as_text(turn["content"]))
            if role == "assistant":
                st.caption("Written by hand (no token view)")
        actions = st.container(horizontal=True)
        if role == "assistant" and actions.button("Regenerate", key=f"chat_regen_{i}", icon=":material/refresh:",
                                               help="A new version of this reply with the sidebar's settings (later turns "
                                                    "are removed)"):
            ask_reply(i, dataclasses.replace(choice.settings, seed=choice.settings.seed + len(versions)), choice.max_tokens)
        if actions.button("Edit", key=f"chat_edit_btn_{i}", icon=":material/edit:",
                       help="Change this turn; later turns are removed" + (" and the reply is regenerated" if role == "user"
                                                                           else "")):
            st.session_state["chat_editing"] = i
            st.rerun()
        if actions.button("Delete", key=f"chat_delete_{i}", icon=":material/delete:", help="Delete this turn and every later one"):
            del turns[i:]
            st.session_state.pop("chat_editing", None)
            st.rerun()

# ---------------------------------------------------------------------- a reply being generated
def generate(pending: dict) -> None:
    """Stream the pending reply under the conversation, keep it as the turn's newest version, and rerun."""
    i = pending["turn"]
    try:
        with st.spinner(f"Loading {model_label}…"):
            stream = data.ReplyStream(directory, step, stamp, history(i), pending["settings"], pending["max_tokens"], TOP_N,
                                      pending["forced"])
    except ERRORS as e:  # nothing was generated; the conversation is drawn again as it was, with the error below it
        st.session_state["chat_error"] = e
        st.rerun()
    with st.chat_message("assistant"):
        st.write_stream(stream)
    reply = stream.reply
    state["versions"] += 1
    turn = turns[i] if i < len(turns) else None
    n = len(turn["versions"]) if turn and turn.get("versions") else 0
    b = pending["branch"]
    version = {"id": state["versions"], "reply": reply, "model": model_label, "settings": pending["settings"],
               "max_tokens": pending["max_tokens"], "branch": b,
               "label": "reply" if n == 0 else (f"branch {n} (from {b['from']}, step {b['step'] + 1}: "
                                                f"{traces.visible(b['token'])})" if b else f"regenerated {n}")}
    if n == 0:
        turns[i:] = [{"role": "assistant", "content": reply.content, "versions": [version], "current": 0}]
    else:
        turn["versions"].append(version)
        turn["current"], turn["content"] = n, reply.content
        del turns[i + 1:]
    st.rerun()


if pending:
    st.session_state.pop("chat_pending")
    generate(pending)
failed = st.session_state.pop("chat_error", None)
if failed is not None:
    ui.show_error(failed, "The conversation no longer fits this model's context: delete or shorten earlier turns, or lower "
                          "Max new tokens." if "context" in str(failed) or "positions" in str(failed) else None)

if turns and turns[-1]["role"] == "user" and editing is None:
    if st.button("Generate a reply", type="primary", icon=":material/reply:"):
        ask_reply(len(turns), choice.settings, choice.max_tokens)

message = st.chat_input("Message the model", key="chat_message")
if message is not None:
    if not message.strip():
        st.warning("The message is empty: type something to send.", icon=":material/edit:")
    elif turns and turns[-1]["role"] == "user":
        st.warning("The last message has no reply yet: generate one, or delete it, before sending another.",
                   icon=":material/reply:")
    else:
        turns.append({"role": "user", "content": message})
        ask_reply(len(turns), choice.settings, choice.max_tokens)
