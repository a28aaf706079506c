"""Dataset: what a folder of parquet shards holds before training on it (documents, tokens, lengths,
duplicates, noise, the validation split against the number of ranks, epochs of a run), documents at
random or by search, and what the model saw at any step of a run of ours. For conversation files (SFT
data): token lengths against the sequence length, the share too long for a row, supervised tokens, tool use."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from nanochat.data_replay import ReplayError
from nanochat.dataloader import DataError
from nanochat.shards import ScanStopped, fmt_duration
from nanochat.tokenizer import TokenizerError
from registry.errors import RegistryError
from streamlit_app import charts, data, ui

NO_TOKENIZER = "no tokenizer (no token counts)"
OTHER = "another folder…"
PAUSED = "dataset_paused"  # session key: the user stopped a pass; nothing is read until they resume

ui.header("Dataset", "What do these shards (or SFT conversation files) hold, is the split right for my ranks, and what did "
          "the model see at step N?")
url = ui.registry_url()
folders = data.dataset_choices(url) + data.conversation_choices(url)
toks = data.tokenizer_choices(url)

c_dir, c_tok, c_world = st.columns([4, 3, 1.3], vertical_alignment="bottom")
picked = c_dir.selectbox("Data folder", folders + [OTHER], key="data", bind="query-params",
                         help="base_data_climbmix/ or base_data/ of each base dir the registry's runs live in, and the "
                              "conversation files (*.jsonl, SFT data) beside them; or any folder of *.parquet shards with "
                              "a text column, a conversation file or a folder of them.")
data_dir = picked
if picked == OTHER or not folders:
    data_dir = ui.typed_folder("Folder of parquet shards", "data_dir", "~/.cache/nanochat",
                               "No data folder known to this registry yet. Type a base dir (with base_data_climbmix/ or "
                               "base_data/) or any folder of *.parquet shards.")
tok_pick = c_tok.selectbox("Tokenizer", toks + [NO_TOKENIZER], key="dtok", bind="query-params",
                           help="Token counts are sampled (a few row groups per shard) until you ask for exact ones.")
tokenizer_dir = None if tok_pick == NO_TOKENIZER else tok_pick


def show_conversations(files: tuple[str, ...], tokenizer_dir: str | None, seq_len: int) -> None:
    """Conversation files: what upstream's SFT makes of them at this sequence length."""
    if tokenizer_dir is None:
        st.info("Conversation files are measured in tokens: pick a tokenizer above.", icon=":material/info:")
        return
    try:
        with st.spinner(f"Rendering the conversations of {len(files)} file(s) with the chat template…"):
            r = data.conversation_summaries(files, data.file_stamps(files), tokenizer_dir, data.tokenizer_stamp(tokenizer_dir),
                                            seq_len)
    except TokenizerError as e:
        ui.show_error(e, "Pick a tokenizer that has the chat tokens (<|user_start|>, <|assistant_start|>, ...).")
        return
    s = r["summary"]
    t1, t2, t3, t4 = st.columns(4)
    t1.metric("Conversations", f"{s.conversations:,}", f"{s.invalid:,} invalid line(s) · {len(files)} file(s)",
              delta_color="inverse" if s.invalid else "off", delta_arrow="off", border=True)
    t2.metric("Too long for a row", f"{s.too_long_share:.1%}", f"{s.too_long:,} over {seq_len + 1:,} tokens",
              delta_color="inverse" if s.too_long else "off", delta_arrow="off", border=True,
              help="Upstream's SFT loader packs whole conversations into rows of sequence length + 1 tokens; a longer one "
                   "never fits, stays in its buffer, and once the buffer holds only such conversations the loss is NaN.")
    t3.metric("Supervised tokens", f"{s.supervised_share:.1%}", f"of {s.tokens:,} rendered tokens", delta_color="off",
              delta_arrow="off", border=True, help="Tokens with mask 1: the assistant's text, tool calls and <|assistant_end|>")
    t4.metric("Tool use", f"{s.tool_use_share:.1%}", f"{s.tool_use:,} with a tool call", delta_color="off",
              delta_arrow="off", border=True)
    for f in r["findings"]:
        (st.error if f.level == "error" else st.warning)(f.message, icon=":material/error:" if f.level == "error"
                                                         else ":material/warning:")
    st.subheader("Token lengths against the sequence length")
    st.altair_chart(charts.length_histogram(r["histogram"], seq_len + 1), width="stretch")
    lengths = s.lengths
    st.caption(f"Rendered with upstream's chat template (cut at {s.max_tokens:,} tokens); lengths before the cut, "
               f"{min(lengths, default=0):,} to {max(lengths, default=0):,} tokens. Red: longer than an SFT row of "
               f"{seq_len + 1:,} tokens. Tokenizer {tokenizer_dir}.")
    st.subheader("Files")
    st.dataframe(r["files"], hide_index=True, width="stretch",
                 column_config={"too_long_share": st.column_config.NumberColumn("too long", format="percent"),
                                "too_long": st.column_config.NumberColumn("too long (n)"),
                                "supervised_share": st.column_config.NumberColumn("supervised", format="percent"),
                                "tool_use_share": st.column_config.NumberColumn("tool use", format="percent"),
                                "mean_tokens": st.column_config.NumberColumn("mean tokens", format="%.0f"),
                                "max_tokens": st.column_config.NumberColumn("max tokens", format="%d"),
                                "error": st.column_config.TextColumn("error", width="medium")})
    st.caption("Per line: `python tools/conversation_builder.py FILE --seq-len N`. "
               "The same summary: `python tools/dataset_inspector.py FILE --seq-len N --json`.")


if conversations := data.conversation_files(data_dir):
    seq_len = int(c_world.number_input("Sequence length", min_value=1, max_value=2**20, value=2048, key="seq_len",
                                       bind="query-params", help="The SFT run's --max-seq-len (upstream's default 2048): "
                                                                 "rows hold sequence length + 1 tokens"))
    show_conversations(conversations, tokenizer_dir, seq_len)
    st.stop()
world = int(c_world.number_input("Ranks", min_value=1, max_value=4096, value=1, key="world", bind="query-params",
                                 help="GPUs you will train with: the validation shard needs a row group per rank"))

b1, b2, _ = st.columns([1.6, 1, 4])
exact = b1.button("Count every token", key="exact", icon=":material/functions:", disabled=tokenizer_dir is None,
                  help="One streaming pass per shard on every core; results are stored, so it runs once per shard")
if b2.button("Stop", key="stop", icon=":material/stop:", help="Stop a running pass (shards finished so far are kept)"):
    st.session_state[PAUSED] = True
if st.session_state.get(PAUSED):
    st.info("Inspection stopped. Shards finished before the stop are stored and will not be read again.",
            icon=":material/pause_circle:")
    if st.button("Resume inspection", key="resume", type="primary", icon=":material/play_arrow:"):
        st.session_state.pop(PAUSED)
        st.rerun()
    st.stop()

bar = None


def progress(p) -> None:
    global bar
    if bar is None:
        bar = st.progress(0.0)
    eta = f", {fmt_duration(p.eta_s)} left" if p.eta_s is not None else ""
    bar.progress(min(1.0, p.bytes_done / max(p.bytes_total, 1)),
                 text=f"Reading {Path(p.path).name}: {p.rows_done:,}/{p.rows_total:,} rows, "
                      f"{p.bytes_done / 1e6:,.1f}/{p.bytes_total / 1e6:,.1f} MB{eta}")


try:
    report = data.inspect_dataset(url, data_dir, tokenizer_dir, exact=exact, world_size=world, progress=progress)
except (RegistryError, DataError) as e:
    ui.show_error(e, "Pick a folder with *.parquet shards (or a base dir above base_data/), and a tokenizer folder.")
    st.stop()
except ScanStopped:
    st.stop()
if bar is not None:
    bar.empty()

# ---------------------------------------------------------------------- the answer first
stats = [r.stats for r in report.shards]
errors = [f for f in report.findings.findings if f.level == "error"]
warnings = [f for f in report.findings.findings if f.level != "error"]
t1, t2, t3, t4 = st.columns(4)
t1.metric("Shards", f"{len(stats)}", f"{len(report.findings.train)} train + validation" if report.findings.validation
          else "no validation split", delta_color="off", delta_arrow="off", border=True)
t2.metric("Documents", f"{sum(s.docs for s in stats):,}", f"{sum(s.chars for s in stats) / 1e6:,.1f} M characters",
          delta_color="off", delta_arrow="off", border=True)
if report.tokens is not None:
    t3.metric("Tokens", f"{report.tokens:,}", "exact count" if report.tokens_exact else "estimated from samples",
              delta_color="off", delta_arrow="off", border=True)
else:
    t3.metric("Tokens", "–", "pick a tokenizer", delta_color="off", delta_arrow="off", border=True)
t4.metric(f"Ready for {world} rank(s)", "no" if errors else "yes", f"{len(errors)} error(s), {len(warnings)} warning(s)",
          delta_color="inverse" if errors else "off", delta_arrow="off", border=True)
for f in errors:
    st.error(f.message, icon=":material/error:")
for f in warnings[:8]:
    st.warning(f.message, icon=":material/warning:")
st.caption(f"{report.data_dir} · validation: {report.findings.validation or 'none'} (the last shard, as training "
           f"uses it) · {report.train_tokens or 0:,} train tokens · {report.inspected} shard(s) read now, "
           f"{report.reused} unchanged since their last inspection (taken from the registry) · "
           f"{report.duration_s * 1000:,.0f} ms")

st.subheader("Document lengths")
hist = data.length_histogram(report)
st.altair_chart(charts.length_histogram_chart(hist), width="stretch")

st.subheader("Shards")
st.dataframe(data.shards_table(report), hide_index=True, width="stretch",
             column_config={"size_mb": st.column_config.NumberColumn("size (MB)", format="%.1f"),
                            "tokens": st.column_config.NumberColumn("tokens", format="%d"),
                            "row_groups": st.column_config.NumberColumn("row groups"),
                            "noisy": st.column_config.NumberColumn("noisy", help="control characters, U+FFFD or invalid UTF-8"),
                            "error": st.column_config.TextColumn("error", width="medium"),
                            "inspected": st.column_config.DatetimeColumn("inspected", format="distance")})

# ---------------------------------------------------------------------- epochs of a run
runs = [r for r in data.runs(url) if r.total_batch_size and r.num_iterations]
if runs and report.train_tokens:
    with st.expander("Epochs: how much of this data a run reads", icon=":material/repeat:", expanded=True):
        names = {r.id: f"{r.tag} ({r.phase})" for r in runs}
        rid = st.selectbox("Run", list(names), format_func=names.get, key="epochs_run")
        run = next(r for r in runs if r.id == rid)
        consumed = run.total_batch_size * run.num_iterations
        st.markdown(f"**{run.tag}**: {run.num_iterations:,} steps × {run.total_batch_size:,} tokens = {consumed:,} tokens, "
                    f"**{consumed / report.train_tokens:.2f} epochs** of the {report.train_tokens:,} train tokens here.")

# ---------------------------------------------------------------------- near duplicates
stamps = data.shard_stamps(report.data_dir)
with st.expander("Near-duplicate documents (MinHash, on a sample)", icon=":material/content_copy:"):
    n_sample, dups = data.near_duplicates(report.data_dir, stamps)
    st.caption(f"{len(dups)} pair(s) with estimated Jaccard similarity ≥ 0.7 (word 5-grams) among {n_sample:,} sampled "
               "documents; exact duplicates within a shard are counted in the table above.")
    if not dups.empty:
        st.dataframe(dups, hide_index=True, width="stretch",
                     column_config={"similarity": st.column_config.ProgressColumn("similarity", min_value=0, max_value=1,
                                                                                  format="%.2f")})

# ---------------------------------------------------------------------- documents
st.subheader("Documents")
d1, d2 = st.columns([4, 1], vertical_alignment="bottom")
needle = d1.text_input("Search", key="doc_search", placeholder="a word or phrase (case-insensitive); empty: at random")
seed = st.session_state.get("doc_seed", 0)
if d2.button("Others at random", icon=":material/shuffle:", width="stretch"):
    st.session_state["doc_seed"] = seed = seed + 1
docs = data.documents(report.data_dir, stamps, needle.strip(), 5, seed)
if not docs:
    st.caption("No document found." if needle else "No readable document.")
for d in docs:
    with st.container(border=True):
        st.caption(d.ref.label() + f" · {len(d.text):,} characters")
        st.text(d.text[:1500] + ("…" if len(d.text) > 1500 else ""))

# ---------------------------------------------------------------------- what did step N see
st.subheader("What did the model see at step N?")
base_runs = [r for r in data.runs(url) if r.phase == "base" and not r.missing]
if not base_runs:
    st.caption("No base run in the registry.")
    st.stop()
names = {r.id: r.tag for r in base_runs}
s1, s2 = st.columns([3, 1], vertical_alignment="bottom")
rid = s1.selectbox("Run", list(names), format_func=names.get, key="step_run")
run = next(r for r in base_runs if r.id == rid)
step = int(s2.number_input("Step", min_value=0, max_value=max(0, (run.num_iterations or 1) - 1), value=0, key="step"))
try:
    with st.spinner(f"Replaying the data loader of {run.tag} to step {step}…"):
        batch = data.step_batch(run.path, step, data.run_stamp(run.path))
except ReplayError as e:
    where = data.approximate_position(run.path)
    st.warning(f"{e}" if where is None or where in str(e) else f"{e}. {where}", icon=":material/info:")
    st.stop()
segs = data.step_segments(batch)
st.caption(f"Rank 0 of {batch.world_size}: {batch.grad_accum} micro-batch(es) of {batch.batch_size} rows × "
           f"{batch.seq_len + 1} tokens, built by the training loader itself "
           + (f"from the state saved at step {batch.restored_from}." if batch.restored_from is not None
              else "from the start of training.")
           + f" {int(segs['cropped'].sum())} of {len(segs)} pieces are cropped documents (the rest of each is dropped).")
st.dataframe(segs, hide_index=True, width="stretch", height=320,
             column_config={"text": st.column_config.TextColumn("text", width="large"),
                            "doc_tokens": st.column_config.NumberColumn("document tokens")})
