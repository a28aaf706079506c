"""Tokenizer: how a run's tokenizer splits text, how it compares with others, its vocabulary, chat tokens,
and whether its token_bytes.pt is right (which decides whether two runs' val_bpb are comparable)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import streamlit as st

from nanochat.dataloader import DataError
from nanochat.tokenizer import TokenizerError
from streamlit_app import charts, data, ui

SAMPLE_TEXT = ("<|bos|>KING HENRY.\nOnce more unto the breach, dear friends, once more;\n"
               "Or close the wall up with our English dead.\n\tCafé, naïve — 1234567 ✓")
OTHER = "another folder…"
TYPED, SHARD_DOC = "typed", "a shard document"
COLORS = ("#dbeafe", "#fef3c7")  # alternating token backgrounds


def token_html(pieces: pd.DataFrame) -> str:
    """Tokens as alternating coloured chips; id, kind and bytes on hover; specials dark, byte pieces dashed."""
    spans = []
    for k, p in enumerate(pieces.itertuples()):
        style = f"background:{COLORS[k % 2]};"
        if p.kind == "special":
            style = "background:#374151;color:#fff;"
        elif p.kind == "partial":
            style += "border:1px dashed #d97706;"
        tip = f"id {p.id} · {p.kind} · {p.bytes} byte(s)"
        spans.append(f'<span title="{tip}" style="{style}padding:1px 2px;margin:1px;border-radius:3px;'
                     f'font-family:monospace;white-space:pre">{html.escape(p.shown)}</span>')
        if p.shown.endswith("↵"):
            spans.append("<br>")
    return f'<div style="line-height:1.9;font-size:0.95rem">{"".join(spans)}</div>'


ui.header("Tokenizer", "How does this tokenizer split text, how does it compare with another, and is its token_bytes.pt right?")
url = ui.registry_url()
choices = data.tokenizer_choices(url)
sample_dirs = data.dataset_choices(url)
c_tok, c_src = st.columns([3, 3], vertical_alignment="bottom")
picked = c_tok.selectbox("Tokenizer", choices + [OTHER], key="tok", bind="query-params",
                         help="The tokenizer/ folder of each base dir the registry's runs live in; or type any folder "
                              "with tokenizer.json (ours) or tokenizer.pkl (upstream's, read without running it).")
source = c_src.segmented_control("Text", [TYPED, SHARD_DOC], default=TYPED, key="source", bind="query-params",
                                 help="Type or paste a text, or take a document from a parquet shard of the registry's "
                                      "data folders (encoded as training encodes it).") or TYPED
directory = picked
if picked == OTHER or not choices:
    directory = ui.typed_folder("Tokenizer folder", "tok_dir", "~/.cache/nanochat/tokenizer",
                                "No tokenizer known to this registry yet. Type a folder that holds tokenizer.json or "
                                "tokenizer.pkl (a nanochat base dir's `tokenizer/`), or scan a base dir on the Runs page.")
stamp = data.tokenizer_stamp(directory)
try:
    info = data.tokenizer_info(directory, stamp)
    check = data.token_bytes_check(directory, stamp)
except TokenizerError as e:
    ui.show_error(e, "Pick another folder: it must hold tokenizer.json or tokenizer.pkl (and token_bytes.pt beside it).")
    st.stop()

specials = True  # typed text: <|bos|> typed is the special token, as in a rendered conversation
shard_files = data.shard_files(tuple(sample_dirs)) if source == SHARD_DOC else []
if source == SHARD_DOC and not shard_files:
    st.info("No parquet shard in the registry's data folders: type a text instead (the command line takes any shard: "
            "`tools/tokenizer_playground.py --shard-doc SHARD:N`).", icon=":material/info:")
if shard_files:
    s1, s2 = st.columns([4, 1], vertical_alignment="bottom")
    shard = s1.selectbox("Shard", shard_files, key="shard", format_func=lambda f: f"{Path(f).parent.name}/{Path(f).name}",
                         help="The last shard of a folder is validation, as training has it.")
    index = int(s2.number_input("Document", min_value=0, value=0, key="doc", help="0-based, counting across row groups"))
    try:
        doc, count = data.shard_document(shard, data.file_stamp(shard), index)
    except ValueError as e:
        ui.show_error(e, "Pick a document number inside the shard.")
        st.stop()
    text, specials = doc.text, False
    st.caption(f"Document {index:,} of {count:,}: {doc.ref.label()} · {len(text):,} characters. Encoded as the training "
               "loader encodes it: special-token names in it are plain text (training puts one <|bos|> before it).")
else:
    text = st.text_area("Text", value=SAMPLE_TEXT, key="text", height=110,
                        help="Special tokens typed here (<|bos|>, <|user_start|>, ...) count as special tokens, as in a "
                             "rendered conversation. Training documents are encoded as plain text.")
pieces = data.token_pieces(directory, stamp, text, specials)
n_bytes = int(pieces["bytes"][pieces["kind"] != "special"].sum()) if not pieces.empty else 0

# ---------------------------------------------------------------------- the answer first
t1, t2, t3, t4 = st.columns(4)
t1.metric("Vocabulary", f"{info['vocab_size']:,}", f"{info['file']} · {info['fingerprint'][:8]}", delta_color="off",
          delta_arrow="off", border=True)
t2.metric("Tokens in the text", f"{len(pieces):,}", f"{n_bytes:,} bytes, {len(text):,} characters", delta_color="off",
          delta_arrow="off", border=True)
t3.metric("Bytes per token", f"{n_bytes / max(len(pieces), 1):.2f}", "higher: fewer tokens per text", delta_color="off",
          delta_arrow="off", border=True)
if check.ok is None:
    t4.metric("token_bytes.pt", "absent", "bpb is computed from the tokenizer", delta_color="off", delta_arrow="off", border=True)
elif check.ok:
    t4.metric("token_bytes.pt", "right", f"sum {check.correct_sum:,} bytes", delta_color="off", delta_arrow="off", border=True)
else:
    t4.metric("token_bytes.pt", f"{len(check.wrong)} wrong", f"sum {check.stored_sum:,}, right {check.correct_sum:,}",
              delta_color="inverse", delta_arrow="off", border=True)

st.html(token_html(pieces))
st.caption("Alternating colours are token boundaries; hover a token for its id. `·` space, `→` tab, `↵` newline; "
           "dark chips are special tokens; dashed `<XX>` chips are bytes that are not a whole UTF-8 character.")
if check.ok is False:
    how = (" It was built the old way (before upstream's fix 2ce972a, which counted U+FFFD's 3 bytes for every token "
           "that is not valid UTF-8 alone).") if check.old_method else ""
    st.warning(f"**token_bytes.pt disagrees with the tokenizer for {len(check.wrong)} of {check.vocab_size:,} tokens.**{how} "
               "Every val_bpb computed with it is slightly off, so it is comparable only with runs that used the same file. "
               "Rebuild it with `Tokenizer.save_token_bytes` (or upstream's current tok_train).", icon=":material/warning:")
    with st.expander(f"The {len(check.wrong)} wrong ids"):
        st.dataframe(pd.DataFrame([{"id": d.id, "token": d.token, "stored": d.stored, "right": d.correct} for d in check.wrong]),
                     hide_index=True, width="stretch")

# ---------------------------------------------------------------------- compare
st.subheader("Compare tokenizers")
others = st.multiselect("Compare with", [c for c in choices if c != directory], key="compare",
                        help="Other tokenizer folders the registry knows; add any folder below.")
extra = st.text_input("More tokenizer folders (comma-separated)", key="compare_dirs").strip()
dirs = [directory, *others, *[str(Path(d.strip()).expanduser()) for d in extra.split(",") if d.strip()]]
on_sample = st.toggle("On a sample of the validation shard", value=bool(sample_dirs), key="on_sample",
                      disabled=not sample_dirs, help="300 documents of the last shard of the registry's data folder; "
                                                     "off: the text above")
try:
    if on_sample and sample_dirs:
        texts, specials = tuple(data.validation_sample(sample_dirs[0], data.shard_stamps(sample_dirs[0]))), False
        where = f"300 validation documents of {sample_dirs[0]}"
    else:
        texts, where = (text,), "the text above"
    comp = data.tokenizer_comparison(tuple(dirs), tuple(data.tokenizer_stamp(d) for d in dirs), texts, specials)
except (TokenizerError, DataError, ValueError) as e:
    ui.show_error(e, "Check the tokenizer folders: each must hold tokenizer.json or tokenizer.pkl.")
else:
    comp["name"] = [f"{Path(d).parent.name}/{Path(d).name}" for d in comp["tokenizer"]]
    st.altair_chart(charts.bytes_per_token_chart(comp), width="stretch")
    st.dataframe(comp, hide_index=True, width="stretch", column_order=["name", "tokens", "bytes", "bytes_per_token", "bpb_factor"],
                 column_config={"bytes_per_token": st.column_config.NumberColumn("bytes/token", format="%.3f"),
                                "bpb_factor": st.column_config.NumberColumn(
                                    "bpb per equal token loss", format="%.3f",
                                    help="bits per byte = loss per token / ln 2 / bytes per token: the same per-token loss "
                                         "is worth this much bpb relative to the first tokenizer")})
    st.caption(f"On {where}. val_bpb is the figure to compare between runs with different tokenizers; per-token loss is not.")

# ---------------------------------------------------------------------- vocabulary
st.subheader("Vocabulary")
v1, v2, v3 = st.columns([3, 2, 2], vertical_alignment="bottom")
needle = v1.text_input("Search tokens", key="vocab_search", placeholder="e.g. the, ·of, ↵")
order = v2.segmented_control("Order", ["by id", "longest"], default="by id", key="vocab_order") or "by id"
usage = v3.toggle("Mark tokens unused on the sample", key="unused", disabled=not sample_dirs,
                  help="Encode 300 validation documents and mark every token that never occurs")
try:
    sample = tuple(data.validation_sample(sample_dirs[0], data.shard_stamps(sample_dirs[0]))) if usage and sample_dirs else ()
    vocab = data.vocabulary_table(directory, stamp, (sample_dirs[0],) if sample else (), sample)
except (DataError, ValueError) as e:
    ui.show_error(e)
    st.stop()
if needle:
    vocab = vocab[vocab["token"].str.contains(needle, regex=False)]
if order == "longest":
    vocab = vocab[vocab["kind"] != "special"].sort_values(["bytes", "id"], ascending=[False, True])
if usage and sample:
    unused = vocab[vocab["used_on_sample"] == False]  # noqa: E712 - a pandas mask
    st.caption(f"{len(unused):,} of these {len(vocab):,} tokens never occur in the sample.")
st.dataframe(vocab, hide_index=True, width="stretch", height=280,
             column_config={"token": st.column_config.TextColumn("token", width="medium"),
                            "used_on_sample": st.column_config.CheckboxColumn("used on sample")})

with st.expander("Chat template: the special tokens", icon=":material/forum:"):
    st.dataframe(info["special"], hide_index=True, width="stretch")
    st.caption("A conversation renders as <|bos|>, then <|user_start|> text <|user_end|>, <|assistant_start|> text "
               "<|assistant_end|> per turn; the model is trained on the assistant's text and its <|assistant_end|> only.")
