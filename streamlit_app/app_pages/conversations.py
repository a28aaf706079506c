"""Conversation builder: write SFT conversations turn by turn, see exactly which tokens SFT trains on, and check a
whole file of them against a run's sequence length (feature 10 of the guide)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from nanochat.conversation import ConversationError
from nanochat.conversation_file import ConversationFileError, Entry
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, ui

DEFAULT_SEQ_LEN = 2048  # upstream chat_sft's --max-seq-len
SAMPLE = [{"role": "user", "content": "What is 12 divided by 60?"},
          {"role": "assistant", "content": [{"type": "text", "text": "Let me compute it: "},
                                            {"type": "python", "text": "12/60"},
                                            {"type": "python_output", "text": "0.2"},
                                            {"type": "text", "text": "It is 0.2."}]}]
PART_LABELS = {"text": "text", "python": "tool call", "python_output": "tool output"}  # text and tool call are trained
TURNS, NEXT, EDITING = "cb_turns", "cb_next", "cb_editing"  # session keys of the draft

ui.header("Conversation builder", "How is this conversation tokenized, which tokens does SFT train on, and does my "
          "conversation file fit the run's sequence length?")
ss = st.session_state


# ---------------------------------------------------------------------- the draft, kept in the session
# A turn is {"id", "role", "parts": None | [part ids]}; its text lives in the widget keys cb_text_{id}, and a part's in
# cb_ptype_{pid} / cb_ptext_{pid}, so reordering moves the widgets with their turns. Every change is a button callback:
# it runs before the widgets of the next run are made, the one moment their state may be set.


def _new_id() -> int:
    ss[NEXT] = ss.get(NEXT, 0) + 1
    return ss[NEXT]


def _make_turn(role: str, content) -> dict:
    tid = _new_id()
    if isinstance(content, str):
        ss[f"cb_text_{tid}"] = content
        return {"id": tid, "role": role, "parts": None}
    pids = []
    for p in content:
        pid = _new_id()
        ss[f"cb_ptype_{pid}"], ss[f"cb_ptext_{pid}"] = p["type"], p["text"]
        pids.append(pid)
    return {"id": tid, "role": role, "parts": pids}


def load_draft(messages: list[dict], line: int | None) -> None:
    ss[TURNS] = [_make_turn(m["role"], m["content"]) for m in messages]
    ss[EDITING] = line


def draft_messages() -> list[dict]:
    out = []
    for t in ss[TURNS]:
        if t["parts"] is None:
            out.append({"role": t["role"], "content": ss.get(f"cb_text_{t['id']}", "")})
        else:
            out.append({"role": t["role"], "content": [{"type": ss.get(f"cb_ptype_{p}", "text"),
                                                         "text": ss.get(f"cb_ptext_{p}", "")} for p in t["parts"]]})
    return out


def add_turn(role: str) -> None:
    turn = _make_turn(role, "")
    if role == "system":
        ss[TURNS].insert(0, turn)
    else:
        ss[TURNS].append(turn)


def move_turn(i: int, delta: int) -> None:
    turns = ss[TURNS]
    j = i + delta
    if 0 <= j < len(turns):
        turns[i], turns[j] = turns[j], turns[i]


def delete_turn(i: int) -> None:
    del ss[TURNS][i]


def toggle_parts(i: int) -> None:
    t = ss[TURNS][i]
    if t["parts"] is None:  # plain text becomes one text part
        pid = _new_id()
        ss[f"cb_ptype_{pid}"], ss[f"cb_ptext_{pid}"] = "text", ss.get(f"cb_text_{t['id']}", "")
        t["parts"] = [pid]
    else:  # only text parts can go back to plain text: they join without loss
        ss[f"cb_text_{t['id']}"] = "".join(ss.get(f"cb_ptext_{p}", "") for p in t["parts"])
        t["parts"] = None


def add_part(i: int, kind: str) -> None:
    pid = _new_id()
    ss[f"cb_ptype_{pid}"], ss[f"cb_ptext_{pid}"] = kind, ""
    ss[TURNS][i]["parts"].append(pid)


def delete_part(i: int, pid: int) -> None:
    ss[TURNS][i]["parts"].remove(pid)


if TURNS not in ss:
    load_draft(SAMPLE, None)


# ---------------------------------------------------------------------- tokenizer, sequence length, file
def registry_runs() -> tuple[list, str | None]:
    target = data.registry_target()
    if target.problem:
        return [], target.scan_default
    try:
        return data.runs(target.url), target.scan_default
    except RegistryError:
        return [], target.scan_default


runs, base_dir = registry_runs()
names = frames.run_names(runs) if runs else {}
with st.sidebar:
    st.markdown("**Tokenizer and sequence length**")
    run_id = st.selectbox("Run", [r.id for r in runs] + [None], key="run", bind="query-params",
                          format_func=lambda i: names[i] if i is not None else "none: a tokenizer folder",
                          help="Its tokenizer renders the conversations and its sequence length sizes the SFT rows")
    run = next((r for r in runs if r.id == run_id), None)
    tok_default = (data.tokenizer_dir_for(run.path) if run else None) or str(Path(base_dir or ".") / "tokenizer")
    if run is None:
        tokenizer_dir = st.text_input("Tokenizer folder", tok_default, key="tok", bind="query-params",
                                      help="Holds tokenizer.json or upstream's tokenizer.pkl")
    else:
        tokenizer_dir = tok_default
        st.caption(f"Tokenizer: `{tokenizer_dir}`")
    run_seq = int((run.model_config or {}).get("sequence_len") or DEFAULT_SEQ_LEN) if run else DEFAULT_SEQ_LEN
    seq_len = int(st.number_input("Sequence length", 1, 1 << 20, run_seq, key=f"seq_{run_id}",
                                  help="SFT packs whole conversations into rows of sequence length + 1 tokens "
                                       f"(default: the run's, else {DEFAULT_SEQ_LEN}, upstream chat_sft's)"))
capacity = seq_len + 1

path = st.text_input("Conversation file", data.default_conversation_file(base_dir), key="file", bind="query-params",
                     help="JSONL: one conversation per line, a CustomJSON array of {role, content} or {\"messages\": "
                          "[...]}. It is only read; Save writes it (atomically), keeping every other line as it was.")

try:
    data.chat_tokenizer(tokenizer_dir)
except TokenizerError as e:
    ui.show_error(e, "Pick a run whose tokenizer is beside its checkpoints, or give the folder that holds tokenizer.json "
                     "or upstream's tokenizer.pkl (for example `$NANOCHAT_BASE_DIR/tokenizer`).")
    st.stop()

entries, table, summary, file_problem = [], None, None, None
stamp = data.file_stamp(path)
if stamp:
    try:
        with st.spinner("Reading and rendering the conversations…"):
            entries = list(data.conversation_entries(path, stamp))
            table, summary = data.conversation_table(path, stamp, tokenizer_dir, seq_len)
    except ConversationFileError as e:
        file_problem = str(e)

# ---------------------------------------------------------------------- the answer first
if file_problem:
    st.error(file_problem, icon=":material/error:")
elif summary is None:
    st.info(f"No file at `{path}` yet: write a conversation below and **Append to file** creates it.",
            icon=":material/note_add:")
else:
    t1, t2, t3, t4 = st.columns(4)
    t1.metric("Conversations", f"{summary.conversations:,}", f"{summary.tool_use:,} with tool use", delta_color="off",
              delta_arrow="off", border=True)
    t2.metric("Invalid lines", f"{summary.invalid:,}", "listed under Browse" if summary.invalid else "none",
              delta_color="inverse" if summary.invalid else "off", delta_arrow="off", border=True)
    t3.metric("Too long for SFT", f"{summary.too_long_share:.1%}", f"{summary.too_long:,} over {capacity:,} tokens",
              delta_color="inverse" if summary.too_long else "off", delta_arrow="off", border=True,
              help="Longer than a row of sequence length + 1: upstream's SFT loader never trains on them")
    t4.metric("Trained tokens", f"{summary.supervised_share:.1%}", f"{summary.supervised_tokens:,} of {summary.tokens:,}",
              delta_color="off", delta_arrow="off", border=True, help="Tokens with mask 1 (assistant text and tool calls)")
    if summary.too_long:
        st.warning(f"{summary.too_long:,} conversations are longer than the SFT row of {capacity:,} tokens: upstream's "
                   "SFT loader never packs them, and once its buffer holds only such conversations every row is "
                   "padding and the loss is NaN. Shorten or drop them, or train with a longer sequence length.",
                   icon=":material/warning:")

edit_tab, browse_tab, summary_tab = st.tabs(["Edit a conversation", "Browse the file", "Dataset summary"])

# ---------------------------------------------------------------------- editor
with edit_tab:
    editing = ss.get(EDITING)
    left, right = st.columns([1, 1], gap="large")
    with left:
        st.caption(f"Editing line {editing} of the file" if editing else "A new conversation (not in the file yet)")
        turns = ss[TURNS]
        for i, t in enumerate(turns):
            with st.container(border=True):
                head = st.columns([3, 1, 1, 1, 1.6], vertical_alignment="center")
                head[0].markdown(f"**{i + 1}. {t['role']}**")
                head[1].button("", key=f"up_{t['id']}", icon=":material/arrow_upward:", help="Move up",
                               on_click=move_turn, args=(i, -1), disabled=i == 0)
                head[2].button("", key=f"down_{t['id']}", icon=":material/arrow_downward:", help="Move down",
                               on_click=move_turn, args=(i, 1), disabled=i == len(turns) - 1)
                head[3].button("", key=f"del_{t['id']}", icon=":material/delete:", help="Delete this turn",
                               on_click=delete_turn, args=(i,))
                if t["role"] == "assistant":
                    plain_ok = t["parts"] is None or all(ss.get(f"cb_ptype_{p}") == "text" for p in t["parts"])
                    head[4].button("Parts" if t["parts"] is None else "Plain", key=f"parts_{t['id']}",
                                   on_click=toggle_parts, args=(i,), disabled=not plain_ok,
                                   help="Split into parts (text, tool call, tool output), or back to plain text "
                                        "(only when every part is text)")
                if t["parts"] is None:
                    st.text_area("content", key=f"cb_text_{t['id']}", label_visibility="collapsed", height=68)
                    continue
                for pid in t["parts"]:
                    c_type, c_text, c_del = st.columns([2.4, 4, 0.6], vertical_alignment="top")
                    c_type.selectbox("part", list(PART_LABELS), key=f"cb_ptype_{pid}", label_visibility="collapsed",
                                     format_func=PART_LABELS.get, help="text and tool call are trained on; a tool "
                                     "output is not (at inference the tool writes it)")
                    c_text.text_area("text", key=f"cb_ptext_{pid}", label_visibility="collapsed", height=68)
                    c_del.button("", key=f"pdel_{pid}", icon=":material/close:", help="Delete this part",
                                 on_click=delete_part, args=(i, pid))
                adds = st.columns(3)
                for col, kind in zip(adds, PART_LABELS):
                    col.button(f"+ {PART_LABELS[kind]}",
                               key=f"padd_{t['id']}_{kind}", on_click=add_part, args=(i, kind), width="stretch")
        b1, b2, b3, b4 = st.columns(4)
        b1.button("User turn", icon=":material/add:", on_click=add_turn, args=("user",), width="stretch")
        b2.button("Assistant turn", icon=":material/add:", on_click=add_turn, args=("assistant",), width="stretch")
        b3.button("System message", icon=":material/add:", on_click=add_turn, args=("system",), width="stretch",
                  disabled=bool(turns) and turns[0]["role"] == "system",
                  help="A leading system message; upstream merges it into the first user turn")
        b4.button("Clear", icon=":material/restart_alt:", on_click=load_draft,
                  args=([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], None), width="stretch")

    messages = draft_messages()
    with right:
        try:
            view = data.render_conversation(tokenizer_dir, messages, seq_len)
        except ConversationError as e:
            view = None
            st.error(f"This conversation cannot be rendered: {e}", icon=":material/error:")
        if view is not None:
            r, f = view["rendered"], view["fit"]
            m1, m2, m3 = st.columns(3)
            m1.metric("Tokens", f"{r.length:,}", f"row: {capacity:,}", delta_color="inverse" if not f.fits else "off",
                      delta_arrow="off", border=True, help="Rendered length against the SFT row (sequence length + 1)")
            m2.metric("Trained", f"{r.supervised:,}", f"{r.supervised / max(len(r.ids), 1):.0%}", delta_color="off",
                      delta_arrow="off", border=True, help="Tokens with mask 1, and their share of the tokens")
            m3.metric("Tool calls", sum(1 for m in view["conversation"].messages if m.has_tool_use), "turns",
                      delta_color="off", delta_arrow="off", border=True, help="Assistant turns that call the tool")
            if f.describe():
                st.warning(f.describe(), icon=":material/warning:")
            empty = [i + 1 for i, m in enumerate(messages) if isinstance(m["content"], str) and not m["content"].strip()]
            if empty:
                st.warning(f"Turn{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} "
                           f"{'are' if len(empty) > 1 else 'is'} empty: it renders, but teaches the model nothing.",
                           icon=":material/edit_note:")
            if not any(m["role"] == "assistant" for m in messages):
                st.info("No assistant turn: nothing in this conversation is trained on.", icon=":material/info:")
            st.markdown(charts.conversation_tokens_html(view["tokens"], capacity if not f.fits else None),
                        unsafe_allow_html=True)
            st.caption("Green: trained on (mask 1). Grey: context, not trained (user turns, tool outputs). Dark blue: "
                       "chat special tokens (green underline: trained, as <|assistant_end|>). Hover a token for its id. "
                       "A red rule marks the end of the SFT row.")
            with st.expander("Token ids and mask"):
                st.dataframe(view["tokens"], hide_index=True, width="stretch", height=260)

        s1, s2, s3 = st.columns(3)
        can_save = view is not None and not file_problem
        replace_line = editing if editing and any(e.line == editing for e in entries) else None
        save_replace = s1.button(f"Save to line {replace_line}" if replace_line else "Save to line", type="primary",
                                 icon=":material/save:", disabled=not (can_save and replace_line), width="stretch",
                                 help="Replace the line this conversation was opened from; every other line is kept as is")
        save_append = s2.button("Append to file", icon=":material/playlist_add:", disabled=not can_save, width="stretch",
                                help="Add it as a new last line (creates the file if there is none)")
        s3.button("New", icon=":material/note_add:", help="Start a new conversation (the file is not changed)", on_click=load_draft,
                  args=([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], None), width="stretch")
        if save_replace or save_append:
            conv = view["conversation"]
            shape = next((e.shape for e in entries if e.valid and e.shape), "list")
            new = list(entries)
            if save_replace:
                i = next(k for k, e in enumerate(new) if e.line == replace_line)
                new[i] = Entry.from_conversation(conv, new[i].shape or shape)
            else:
                new.append(Entry.from_conversation(conv, shape))
                i = len(new) - 1
            try:
                n = data.save_conversations(path, new)
            except ConversationFileError as e:
                ui.show_error(e, "Check that the folder exists and is writable, or give another file.")
            else:
                ss[EDITING] = i + 1  # saved files have no blank lines: entry i is line i + 1
                ss["cb_saved"] = f"Saved {n:,} lines to {path} (this conversation is line {i + 1})."
                st.rerun()
        if "cb_saved" in ss:
            st.success(ss.pop("cb_saved"), icon=":material/check_circle:")

# ---------------------------------------------------------------------- browse
with browse_tab:
    if table is None or table.empty:
        st.caption("No conversations to browse: give a conversation file above.")
    else:
        f1, f2, f3, f4 = st.columns([1, 1, 1, 2])
        show = f1.selectbox("Lines", ["all", "valid", "invalid"], key="cb_show")
        tools = f2.selectbox("Tool use", ["any", "with", "without"], key="cb_tools")
        fits = f3.selectbox("Fit", ["any", "too long", "fits"], key="cb_fit")
        longest = int(table["length"].max()) if table["valid"].any() else 0
        lo, hi = f4.slider("Length (tokens)", 0, max(longest, 1), (0, max(longest, 1)), key="cb_len")
        view_df = table
        if show != "all":
            view_df = view_df[view_df["valid"] == (show == "valid")]
        if tools != "any":
            view_df = view_df[view_df["tool_use"] == (tools == "with")]
        if fits != "any":
            view_df = view_df[view_df["fits"] == (fits == "fits")]
        if (lo, hi) != (0, max(longest, 1)):
            view_df = view_df[view_df["length"].between(lo, hi)]
        st.caption(f"{len(view_df):,} of {len(table):,} lines")
        st.dataframe(view_df, hide_index=True, width="stretch", height=380, column_config={
            "line": st.column_config.NumberColumn("line", format="%d"),
            "valid": st.column_config.CheckboxColumn("valid"),
            "error": st.column_config.TextColumn("why invalid", width="large"),
            "length": st.column_config.NumberColumn("tokens", format="%d", help="Rendered length before the 2048 cut"),
            "trained": st.column_config.NumberColumn("trained", format="%d"),
            "tool_use": st.column_config.CheckboxColumn("tool use"),
            "fits": st.column_config.CheckboxColumn("fits a row"),
            "cut": st.column_config.CheckboxColumn("cut at 2048"),
            "preview": st.column_config.TextColumn("first user turn (or the raw line)", width="large")})
        valid_lines = table.loc[table["valid"], "line"].astype(int).tolist()
        if valid_lines:
            o1, o2 = st.columns([1, 3], vertical_alignment="bottom")
            line = int(o1.number_input("Line", min(valid_lines), max(valid_lines), valid_lines[0], key="cb_line"))
            if o2.button("Open in the editor", icon=":material/edit:"):
                entry = next((e for e in entries if e.line == line and e.valid), None)
                if entry is None:
                    st.error(f"Line {line} is not a valid conversation (see the table).", icon=":material/error:")
                else:
                    load_draft(entry.conversation.to_messages(), line)
                    st.rerun()

# ---------------------------------------------------------------------- dataset summary
with summary_tab:
    if summary is None or not summary.conversations:
        st.caption("No valid conversations to summarise.")
    else:
        hist = pd.DataFrame([{"start": b.start, "end": b.end, "count": b.count} for b in summary.histogram])
        st.altair_chart(charts.length_histogram(hist, capacity), width="stretch")
        d = summary.as_dict()
        st.caption(f"Rendered length per conversation (before the {summary.max_tokens:,}-token cut). The red rule is the "
                   f"SFT row of {capacity:,} tokens: conversations right of it are never trained on. Lengths "
                   f"{d['length_min']:,}–{d['length_max']:,}, mean {d['length_mean']:,.1f}; cut at "
                   f"{summary.max_tokens:,}: {summary.cut:,}; no assistant turn: {summary.no_assistant:,}; tool use "
                   f"{summary.tool_use_share:.1%}.")
        st.caption("The same summary on the command line: "
                   f"`python tools/conversation_builder.py {path} --tokenizer {tokenizer_dir} --seq-len {seq_len}`")
