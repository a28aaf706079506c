"""
Inside the model and its learning rate, as the tables the Attention and LR finder pages chart: pure
functions from `data.AttentionData` (plain numpy arrays of one prompt's attention) to long DataFrames
with labelled positions and the window each cell lies outside of.

Pure and torch-free: no Streamlit, no files, no model. `data.py` computes the attention (through
`nanochat.attention`) and caches it; `charts.py` draws these frames.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ---------------------------------------------------------------------- learning-rate finds

def find_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """A long metrics frame (data.metrics with lr_mult, train_loss, smooth_loss) as one row per find and
    step: run_id, run, step, lr_mult, train_loss, smooth_loss."""
    if metrics.empty:
        return pd.DataFrame(columns=["run_id", "run", "step", "lr_mult", "train_loss", "smooth_loss"])
    last = metrics.sort_values("segment").drop_duplicates(["run_id", "key", "step"], keep="last")
    wide = last.pivot_table(index=["run_id", "run", "step"], columns="key", values="value").reset_index()
    wide.columns.name = None
    return wide.dropna(subset=["lr_mult"]).sort_values(["run_id", "step"]).reset_index(drop=True)


# ---------------------------------------------------------------------- sweeps: runs that differ in one setting

# Keys that never make two runs different experiments: names, devices, bookkeeping and evaluation cadence.
IGNORED_KEYS = frozenset({"run", "model_tag", "device_type", "resume", "resume_from_step", "keep_last", "save_every",
                          "eval_every", "eval_tokens", "compile"})
REPLICATE_KEY = "seed"
MAX_AXIS_KEYS = 4  # a sweep's setting may be several flags that move together (a grid scales all four LRs)


@dataclass(frozen=True)
class Sweep:
    """Runs equal in everything but `keys` (which move together, one value per run) and the seed."""
    keys: tuple[str, ...]  # the first is the one plotted
    run_ids: tuple[int, ...]
    fixed: tuple[tuple[str, object], ...]  # what the runs share

    @property
    def label(self) -> str:
        extra = f" (with {', '.join(self.keys[1:])})" if len(self.keys) > 1 else ""
        return f"{self.keys[0]}{extra}"


def _settings(run) -> dict:
    return {k: v for k, v in (run.user_config or {}).items() if k not in IGNORED_KEYS and not isinstance(v, (dict, list))}


def find_sweeps(runs) -> list[Sweep]:
    """Every group of runs (registry RunSummary) that differ in one setting, or in a few that move
    together, besides the seed; runs without a val_bpb are left out. Largest sweeps first."""
    runs = [r for r in runs if r.last_val_bpb is not None and r.user_config]
    settings = {r.id: _settings(r) for r in runs}
    candidates = set()
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            sa, sb = settings[a.id], settings[b.id]
            diff = frozenset(k for k in sa.keys() | sb.keys() if k != REPLICATE_KEY and sa.get(k) != sb.get(k))
            if 0 < len(diff) <= MAX_AXIS_KEYS:
                candidates.add(diff)
    found: dict[frozenset, Sweep] = {}
    for axis in sorted(candidates, key=lambda a: (len(a), sorted(a))):
        groups: dict[tuple, list] = {}
        for r in runs:
            s = settings[r.id]
            rest = tuple(sorted((k, repr(v)) for k, v in s.items() if k not in axis and k != REPLICATE_KEY))
            groups.setdefault(rest, []).append(r)
        for rest, members in groups.items():
            values = {tuple(repr(settings[r.id].get(k)) for k in sorted(axis)) for r in members}
            # one axis: each key alone tells the point apart (the keys move together, not as a grid of their own)
            each = [len({repr(settings[r.id].get(k)) for r in members}) for k in sorted(axis)]
            if len(values) < 2 or any(n != len(values) for n in each):
                continue
            ids = frozenset(r.id for r in members)
            if ids in found:
                continue  # the same runs under a smaller axis already
            keys = tuple(sorted(axis, key=lambda k: (not k.endswith("_lr"), k != "matrix_lr", k)))
            fixed = tuple((k, settings[members[0].id].get(k)) for k, _ in rest)
            found[ids] = Sweep(keys, tuple(sorted(ids)), fixed)
    return sorted(found.values(), key=lambda s: (-len(s.run_ids), s.label))


def sweep_frame(sweep: Sweep, runs, metric: str = "last_val_bpb") -> pd.DataFrame:
    """One row per run of the sweep: run_id, run, value (the plotted setting), seed, val_bpb."""
    by_id = {r.id: r for r in runs}
    rows = []
    for rid in sweep.run_ids:
        r = by_id[rid]
        v = (r.user_config or {}).get(sweep.keys[0])
        rows.append({"run_id": rid, "run": r.label, "value": v, "seed": (r.user_config or {}).get(REPLICATE_KEY),
                     "val_bpb": getattr(r, metric)})
    return pd.DataFrame(rows, columns=["run_id", "run", "value", "seed", "val_bpb"])


def sweep_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting value: mean, min and max val_bpb over its runs (seeds) and how many."""
    g = df.dropna(subset=["val_bpb"]).groupby("value")["val_bpb"]
    out = pd.DataFrame({"mean": g.mean(), "low": g.min(), "high": g.max(), "runs": g.size()}).reset_index()
    return out.sort_values("value").reset_index(drop=True)
