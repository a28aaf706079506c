"""Model calculator: what base_train builds and runs from its flags (parameters, FLOPs per token, memory,
steps and tokens), with the same functions training calls, checked against what a run recorded."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from nanochat.model_config import ArchitectureError
from nanochat.train_config import BASE_TRAIN, CLASSIC_DEFAULTS, VOCAB_SIZE, is_classic_user_config
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, ui

FLAGS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "device_batch_size", "total_batch_size",
         "target_param_data_ratio", "num_iterations")
# base_train's defaults (its flag table), typed as the widgets hold them; upstream trains on 8 GPUs
CURRENT = {**{k: BASE_TRAIN.flag(k).type(BASE_TRAIN.flag(k).default) for k in FLAGS},
           "vocab_size": VOCAB_SIZE["current"], "world_size": 8}
CLASSIC = {**CURRENT, "vocab_size": VOCAB_SIZE["classic"], "total_batch_size": CLASSIC_DEFAULTS["total_batch_size"],
           "target_param_data_ratio": float(CLASSIC_DEFAULTS["target_param_data_ratio"])}
PARTS = {"wte": "token embedding", "value_embeds": "value embeddings", "lm_head": "lm_head", "transformer_matrices": "blocks",
         "scalars": "scalars"}


def apply(values: dict) -> None:
    for k, v in values.items():
        st.session_state[k] = v


def prefill(run) -> None:
    """Load a run's flags into the inputs (a callback: runs before the widgets are drawn)."""
    if run is None:
        return
    user, mc = run.user_config or {}, run.model_config or {}
    classic = is_classic_user_config(user)
    apply({"gen": "classic" if classic else "current", **(CLASSIC if classic else CURRENT)})
    for k in FLAGS:
        if isinstance(user.get(k), (int, float, str)) and not isinstance(user.get(k), bool):
            st.session_state[k] = type(CURRENT[k])(user[k])
    if mc.get("vocab_size"):
        st.session_state["vocab_size"] = int(mc["vocab_size"])
    if run.total_batch_size:
        st.session_state["total_batch_size"] = int(run.total_batch_size)
    st.session_state["world_size"] = int(run.world_size or 1)


ui.header("Model calculator", "How big is a model of this depth, what does a step cost, and how long is the run?")
runs = []
target = data.registry_target()
if not target.problem:
    try:
        runs = data.runs(target.url)
    except RegistryError:
        runs = []  # the calculator works without a registry
names = frames.run_names(runs)
by_id = {r.id: r for r in runs}
st.session_state.setdefault("gen", "current")
st.session_state.setdefault("precision", "bf16")
for key, value in CURRENT.items():  # widgets take their values from here (a run or the architecture resets them)
    st.session_state.setdefault(key, value)

with st.sidebar:
    st.markdown("**Model flags** (base_train's)")
    if runs:
        st.selectbox("Start from a run", [None] + list(by_id), format_func=lambda i: "— defaults —" if i is None else names[i],
                     key="from_run", on_change=lambda: prefill(by_id.get(st.session_state["from_run"])),
                     help="Fill the flags from a run's recorded user_config, to check the numbers against what it reported")
    gen = st.segmented_control("Architecture", ["current", "classic"], key="gen", help="current or classic upstream nanochat",
                               on_change=lambda: apply(CLASSIC if st.session_state.get("gen") == "classic" else CURRENT)) \
        or "current"
    classic = gen == "classic"
    depth = st.slider("--depth", 1, 64, key="depth")
    aspect = st.number_input("--aspect-ratio", 1, 1024, key="aspect_ratio", disabled=classic,
                             help="model width = depth × aspect ratio, rounded up to a multiple of the head dim (classic: 64)")
    head_dim = st.number_input("--head-dim", 8, 1024, step=8, key="head_dim", disabled=classic)
    seq = st.number_input("--max-seq-len", 16, 1 << 17, key="max_seq_len")
    vocab = st.number_input("vocab size (tokenizer)", 64, 1 << 20, key="vocab_size")
    window = st.text_input("--window-pattern", key="window_pattern", disabled=classic)
    st.markdown("**Training flags**")
    dbs = st.number_input("--device-batch-size", 1, 4096, key="device_batch_size")
    tbs = st.number_input("--total-batch-size (-1 = auto)", -1, 1 << 30, key="total_batch_size")
    ratio = st.number_input("--target-param-data-ratio", 0.0, 10_000.0, key="target_param_data_ratio")
    iters = st.number_input("--num-iterations (-1 = from the ratio)", -1, 1 << 30, key="num_iterations")
    world = st.number_input("processes (GPUs)", 1, 4096, key="world_size")
    precision = st.segmented_control("Activations", ["bf16", "fp32"], key="precision",
                                     help="bf16: autocast on GPU (upstream's CUDA setting); fp32: CPU training") or "bf16"

flags = {"depth": int(depth), "max_seq_len": int(seq), "device_batch_size": int(dbs), "total_batch_size": int(tbs),
         "target_param_data_ratio": float(ratio), "num_iterations": int(iters),
         **({"warmup_ratio": CLASSIC_DEFAULTS["warmup_ratio"]} if classic else
            {"aspect_ratio": int(aspect), "head_dim": int(head_dim), "window_pattern": window or "L"})}
try:
    est = data.model_estimate(flags, int(vocab), int(world), 2 if precision == "bf16" else 4)
except (ArchitectureError, ValueError) as e:
    st.error(f"These flags do not describe a model base_train can build: {e}", icon=":material/straighten:")
    st.stop()

# ---------------------------------------------------------------------- the answer first
p, cfg, mem = est["params"], est["config"], est["memory"]
t1, t2, t3, t4 = st.columns(4)
t1.metric("Parameters", frames.compact(p["total"]), f"{frames.compact(p['scaling'])} scaling (blocks + head)",
          delta_color="off", delta_arrow="off", border=True, help=f"{p['total']:,} parameters")
t2.metric("FLOPs per token", frames.compact(est["flops_per_token"]), "training (forward + backward)", delta_color="off",
          delta_arrow="off", border=True, help=f"{est['flops_per_token']:,} FLOPs per token")
t3.metric("Memory per process", f"{mem['total'] / 2**30:,.1f} GiB", "with flash attention",
          delta_color="off", delta_arrow="off", border=True,
          help="fp32 weights, gradients and optimizer state, plus the activations kept for backward and the fp32 logits "
               "(nanochat.model_config.training_memory_bytes). Activations assume flash attention, as upstream "
               "trains (no T×T attention matrix is kept); a rough estimate, not a measurement.")
steps = est["num_iterations"]
t4.metric("Training run", f"{steps:,} steps" if steps else "—",
          f"{frames.compact(est['tokens'])} tokens · {est['total_flops']:.2g} FLOPs" if est["tokens"] else None,
          delta_color="off", delta_arrow="off", border=True,
          help=f"{est['tokens_per_param']:.1f} tokens per parameter" if est["tokens_per_param"] else None)
for note in est["notes"]:
    st.warning(note, icon=":material/warning:")

run_id = st.session_state.get("from_run")
if run_id in by_id:
    run = by_id[run_id]
    checks = [("parameters", run.n_params, p["total"]), ("FLOPs per token", run.flops_per_token, est["flops_per_token"]),
              ("target steps", run.num_iterations, steps)]
    diffs = [f"{name}: recorded {rec:,}, calculated {calc:,}" for name, rec, calc in checks if rec is not None and rec != calc]
    if diffs:
        st.warning(f"Differs from what {names[run_id]} recorded ({'; '.join(diffs)}): a flag above is not the run's.",
                   icon=":material/search:")
    else:
        st.success(f"Matches what {names[run_id]} recorded: {run.n_params:,} parameters"
                   + (f", {run.flops_per_token:,} FLOPs/token" if run.flops_per_token else "")
                   + (f", {run.num_iterations:,} steps" if run.num_iterations else "") + ".", icon=":material/check_circle:")

left, right = st.columns(2)
with left:
    st.markdown("**Parameters by group**")
    parts = pd.DataFrame([{"part": PARTS.get(k, k), "value": v, "shown": frames.compact(v)} for k, v in p.items()
                          if k not in ("total", "scaling") and v > 0])
    st.altair_chart(charts.breakdown_chart(parts, "parameters"), width="stretch")
    st.markdown("**Training memory per process**")
    parts = pd.DataFrame([{"part": k, "value": v / 2**30, "shown": f"{v / 2**30:,.2f} GiB"} for k, v in mem.items()
                          if k != "total"])
    st.altair_chart(charts.breakdown_chart(parts, "GiB", fmt=",.2~f"), width="stretch")  # small models: 0.25 GiB, not "0"
with right:
    st.markdown("**Parameters and training tokens by depth**")
    sweep, impossible = [], []
    for dd in range(max(1, depth - 12), depth + 13):
        try:
            e = data.model_estimate({**flags, "depth": dd}, int(vocab), int(world))
        except ArchitectureError:
            impossible.append(dd)  # e.g. classic's head count does not divide the width at odd depths
            continue
        sweep.append({"depth": dd, "parameters": e["params"]["total"], "training tokens": e["tokens"]})
    st.altair_chart(charts.depth_chart(pd.DataFrame(sweep), int(depth)), width="stretch")
    if impossible:
        st.caption(f"Not drawn: depth {', '.join(map(str, impossible))} (base_train cannot build these: the width is "
                   "not divisible by the head count).")
    st.markdown("**The model base_train builds**")
    shown = {"n_layer": cfg["n_layer"], "n_embd (width)": cfg["n_embd"], "n_head": cfg["n_head"], "head dim": est["head_dim"],
             "sequence_len": cfg["sequence_len"], "vocab_size": cfg["vocab_size"], "window_pattern": cfg["window_pattern"],
             "total batch (tokens/step)": est["total_batch_size"], "grad accumulation steps": est["grad_accum"]}
    st.dataframe(frames.config_frame(shown), hide_index=True, width="stretch")
st.caption("Computed by nanochat.train_config and nanochat.model_config, the functions base_train itself calls: "
           "the numbers match what training prints and records.")
