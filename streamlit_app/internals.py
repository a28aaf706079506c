"""
Inside the model and its learning rate, as the tables the Attention and LR finder pages chart: pure
functions from `data.AttentionData` (plain numpy arrays of one prompt's attention) to long DataFrames
with labelled positions and the window each cell lies outside of.

Pure and torch-free: no Streamlit, no files, no model. `data.py` computes the attention (through
`nanochat.attention`) and caches it; `charts.py` draws these frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamlit_app.traces import visible


def head_label(layer: int, head: int, kv_group: int, n_head: int, n_kv_head: int) -> str:
    """'L1 H3' plus its KV group when heads share keys and values (GQA): 'L1 H3 · KV1'."""
    return f"L{layer} H{head}" + (f" · KV{kv_group}" if n_kv_head < n_head else "")


def position_labels(tokens: tuple[str, ...], factor: int) -> list[str]:
    """One label per cell: '12 ·be' when exact, '96–127' for a block of positions when downsampled."""
    n = len(tokens)
    if factor == 1:
        return [f"{i} {visible(t)}" for i, t in enumerate(tokens)]
    return [f"{i}–{min(i + factor, n) - 1}" for i in range(0, n, factor)]


def _cells(matrix: np.ndarray, factor: int, window: int, n: int) -> pd.DataFrame:
    """The causal cells of one (cells x cells) matrix: q, k, weight, and `outside` = the whole block is
    beyond the layer's window (the query cannot see any of those keys)."""
    q, k = np.tril_indices(matrix.shape[0])
    q_first = q * factor
    k_last = np.minimum(k * factor + factor, n) - 1
    return pd.DataFrame({"q": q, "k": k, "weight": matrix[q, k].astype(float), "outside": (q_first - k_last) > window})


def grid_frame(att) -> pd.DataFrame:
    """Every layer's and head's thumbnail: layer, head, label, q, k, weight, outside."""
    n = len(att.tokens)
    kv = att.n_head // att.n_kv_head
    parts = []
    for layer in range(att.n_layer):
        for head in range(att.n_head):
            df = _cells(att.grid[layer, head], att.grid_factor, att.windows[layer], n)
            df.insert(0, "label", head_label(layer, head, head // kv, att.n_head, att.n_kv_head))
            df.insert(0, "head", head)
            df.insert(0, "layer", layer)
            parts.append(df)
    return pd.concat(parts, ignore_index=True)


def head_frame(att, layer: int, head: int) -> pd.DataFrame:
    """One head at full resolution (or ATTENTION_CELLS): q, k, weight, outside, q_label, k_label."""
    labels = position_labels(att.tokens, att.factor)
    df = _cells(att.weights[layer, head], att.factor, att.windows[layer], len(att.tokens))
    df["q_label"] = [labels[i] for i in df["q"]]
    df["k_label"] = [labels[i] for i in df["k"]]
    return df


def token_frame(att, position: int) -> pd.DataFrame:
    """What the query at `position` attends to, in every layer and head: label, layer, head, k, k_label,
    weight (its cell's keys, for downsampled prompts the block holding `position`)."""
    labels = position_labels(att.tokens, att.factor)
    row = position // att.factor
    kv = att.n_head // att.n_kv_head
    parts = []
    for layer in range(att.n_layer):
        for head in range(att.n_head):
            w = att.weights[layer, head, row, :row + 1].astype(float)
            parts.append(pd.DataFrame({"label": head_label(layer, head, head // kv, att.n_head, att.n_kv_head),
                                       "layer": layer, "head": head, "k": np.arange(row + 1),
                                       "k_label": labels[:row + 1], "weight": w}))
    return pd.concat(parts, ignore_index=True)


def pattern_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """How many heads of each pattern, and which: pattern, heads, which."""
    rows = []
    for pattern in ("BOS", "previous token", "same token", "mixed"):
        sel = scores[scores["pattern"] == pattern]
        rows.append({"pattern": pattern, "heads": len(sel),
                     "which": ", ".join(f"L{r.layer} H{r.head}" for r in sel.itertuples()) or "—"})
    return pd.DataFrame(rows)
