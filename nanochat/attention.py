"""
Inside the model: every layer's and head's attention weights for one prompt, and what each layer would
predict (the logit lens).

`capture(model, ids)` runs the model's own forward (`gpt.GPT.forward`: smear, x0/residual lambdas, value
embeddings, QK-norm, GQA, backout, all unchanged) once, with each attention layer's fused SDPA call
replaced by an explicit softmax(q k^T / sqrt(D)) over the same visibility rule
(`CausalSelfAttention.visible`: causal and inside the layer's sliding window). The replacement is
installed on the modules for that one call and removed afterwards (`CausalSelfAttention.probe`), so the
normal forward never pays for it; tests check the logits through this path equal the fast path's within
1e-5 on both upstream fixtures with windows active, and that every row sums to 1 and is 0 outside its
window.

Also here, because the CLI, the app and the bench read them alike: per-head summaries (entropy, mean
attention distance, the share of attention on BOS, the previous token and earlier copies of the same
token), honest downsampling of long prompts, and the per-layer logit lens. Not here: loading
(`checkpoint_manager`), tokenizing, drawing (`tools/attention_visualizer.py`, `streamlit_app/charts.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, SOFTCAP, CausalSelfAttention, norm
from nanochat.sampling import SamplingError

PATTERN_THRESHOLD = 0.5  # a head "is" a BOS / previous-token / same-token head when that share exceeds this


class AttentionInputError(SamplingError):
    """A prompt the visualizer cannot capture (empty, or longer than the model's context). A SamplingError,
    so the app catches it by the torch-free name (nanochat.sampling) as it catches the engine's."""


@dataclass
class AttentionCapture:
    """One prompt's attention: weights[layer] is (n_head, T, T), float32, rows = query positions,
    columns = key positions; hidden[layer] is the residual stream after that block (T, C)."""
    token_ids: list[int]
    weights: list[torch.Tensor]
    windows: list[int]  # per layer: query i sees key j iff 0 <= i - j <= window
    n_head: int
    n_kv_head: int
    logits: torch.Tensor  # (T, vocab_size): the model's output through the explicit path
    hidden: list[torch.Tensor] = field(repr=False)

    @property
    def n_layer(self) -> int:
        return len(self.weights)

    def kv_group(self, head: int) -> int:
        """The key/value head a query head shares (GQA): query head h uses kv head h // (H / Hkv)."""
        return head // (self.n_head // self.n_kv_head)


@dataclass(frozen=True)
class HeadScores:
    layer: int
    head: int
    kv_group: int
    window: int
    entropy: float  # mean over query rows, nats
    mean_distance: float  # mean over query rows of the expected (query - key) distance, in tokens
    bos: float  # mean share of attention on position 0 (queries from position 2 on, see head_scores)
    previous: float  # mean share on the immediately preceding token (likewise)
    same_token: float  # mean share on earlier copies of the query's own token (queries that have one)

    @property
    def pattern(self) -> str:
        """The head's dominant pattern: 'BOS', 'previous token', 'same token', or 'mixed'."""
        best = max((self.bos, "BOS"), (self.previous, "previous token"), (self.same_token, "same token"))
        return best[1] if best[0] > PATTERN_THRESHOLD else "mixed"


@dataclass(frozen=True)
class LensRow:
    """What layer `layer` would predict at one position: its top tokens and their probabilities."""
    layer: int
    token_ids: tuple[int, ...]
    probs: tuple[float, ...]


def explicit_attention(module: CausalSelfAttention, q, k, v, start: int, record: list) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) over visible keys) v for one layer, appending the weights to `record`.
    q is (B, H, Tq, D), k and v (B, Hkv, Tk, D); `start` is the first query's position relative to k[0]."""
    group = module.n_head // module.n_kv_head
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    visible = module.visible(start, q.size(2), k.size(2), q.device)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    record.append(weights.detach())
    return weights @ v


@torch.no_grad()
def capture(model: GPT, token_ids: list[int] | torch.Tensor, max_len: int | None = None) -> AttentionCapture:
    """Run one prompt through the explicit path; attention of every layer and head, and the residual
    stream after each block. max_len defaults to the model's training context (sequence_len)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    limit = model.config.sequence_len if max_len is None else max_len
    if ids.size(1) == 0:
        raise AttentionInputError("the prompt is empty")
    if ids.size(1) > limit:
        raise AttentionInputError(f"the prompt is {ids.size(1)} tokens, beyond this model's context of {limit}: "
                                  "shorten it")
    ids = ids.to(model.cos.device)
    records: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    attns = [block.attn for block in model.transformer.h]
    hooks = [block.register_forward_hook(lambda _m, _in, out: hidden.append(out[0].detach()))
             for block in model.transformer.h]
    for a in attns:
        a.probe = lambda m, q, k, v, start: explicit_attention(m, q, k, v, start, records)
    try:
        logits = model(ids)[0]
    finally:
        for a in attns:
            a.probe = None
        for h in hooks:
            h.remove()
    cfg = model.config
    return AttentionCapture(token_ids=ids[0].tolist(), weights=[w[0].float() for w in records],
                            windows=cfg.window_sizes(), n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                            logits=logits, hidden=hidden)


def head_scores(cap: AttentionCapture) -> list[HeadScores]:
    """Per layer and head: entropy, mean distance, and the BOS / previous / same-token shares. For query 1
    BOS *is* the previous token, so both shares count queries from position 2 on (when there are any)."""
    t = len(cap.token_ids)
    first = 2 if t > 2 else 1
    ids = torch.tensor(cap.token_ids)
    pos = torch.arange(t)
    distance = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    earlier_same = (ids[:, None] == ids[None, :]) & (pos[:, None] > pos[None, :])
    has_same = earlier_same.any(dim=1)
    out = []
    for layer, w in enumerate(cap.weights):
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1).mean(-1)  # (H,)
        dist = (w * distance).sum(-1).mean(-1)
        bos = w[:, first:, 0].mean(-1) if t > 1 else torch.zeros(cap.n_head)
        prev = w[:, pos[first:], pos[first:] - 1].mean(-1) if t > 1 else torch.zeros(cap.n_head)
        same = ((w * earlier_same).sum(-1)[:, has_same].mean(-1) if bool(has_same.any())
                else torch.zeros(cap.n_head))
        for h in range(cap.n_head):
            out.append(HeadScores(layer, h, cap.kv_group(h), cap.windows[layer], float(ent[h]), float(dist[h]),
                                  float(bos[h]), float(prev[h]), float(same[h])))
    return out


def downsample(matrix: torch.Tensor, max_size: int) -> tuple[torch.Tensor, int]:
    """A (T, T) attention matrix shrunk to at most max_size x max_size by blocks of b x b positions:
    each cell is the mean over the block's queries of the *total* attention they give the block's keys,
    so rows still sum to 1 and nothing is dropped. Returns (matrix, b); b == 1 means unchanged."""
    t = matrix.size(-1)
    b = max(1, math.ceil(t / max_size))
    if b == 1:
        return matrix, 1
    pad = (-t) % b
    m = F.pad(matrix, (0, pad, 0, pad))
    n = m.size(-1) // b
    summed_keys = m.reshape(*m.shape[:-1], n, b).sum(-1)  # (..., T', n)
    rows = summed_keys.reshape(*m.shape[:-2], n, b, n)
    counts = torch.full((n,), float(b))
    counts[-1] = b - pad  # the padded last block holds fewer real queries
    return rows.sum(-2) / counts[:, None], b


@torch.no_grad()
def logit_lens(model: GPT, cap: AttentionCapture, position: int, top: int = 5) -> list[LensRow]:
    """For each layer, the top tokens the model would predict at `position` if it stopped after that
    layer: the residual stream through the final norm, lm_head and soft-cap. Layers from the middle one
    on get the same backout the final output gets (x - backout_lambda * x_mid), so the last row is
    exactly the model's prediction; earlier layers have no x_mid yet and are read as they are."""
    cfg = model.config
    if not 0 <= position < len(cap.token_ids):
        raise AttentionInputError(f"position {position} is outside the prompt (0..{len(cap.token_ids) - 1})")
    mid = cfg.n_layer // 2
    rows = []
    for layer, x in enumerate(cap.hidden):
        h = x[position]
        if cfg.backout and layer >= mid:
            h = h - model.backout_lambda * cap.hidden[mid][position]
        logits = model.lm_head(norm(h)).float()[:cfg.vocab_size]
        probs = torch.softmax(SOFTCAP * torch.tanh(logits / SOFTCAP), dim=-1)
        p, i = probs.topk(min(top, probs.numel()))
        rows.append(LensRow(layer, tuple(i.tolist()), tuple(p.tolist())))
    return rows


def weights_array(cap: AttentionCapture, max_cells: int):
    """Every layer's and head's weights as one numpy array (n_layer, n_head, n, n), downsampled to at most
    max_cells a side (see `downsample`), and the positions per cell: what the app keeps (it has no torch)."""
    small, factor = downsample(torch.stack(cap.weights), max_cells)
    return small.numpy(), factor


def head_cells(cap: AttentionCapture, layer: int, head: int, max_cells: int):
    """One head's causal cells as numpy (query cell, key cell, weight) after downsampling, and the factor."""
    m, factor = downsample(cap.weights[layer][head], max_cells)
    q, k = torch.tril_indices(m.size(0), m.size(1))
    return q.numpy(), k.numpy(), m[q, k].numpy(), factor
