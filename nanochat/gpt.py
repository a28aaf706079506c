"""
The GPT of upstream nanochat, both generations, in one module.

One `GPT` class reproduces upstream's forward pass bit for bit for:
- classic (Oct-Nov 2025): rotary base 10000 with bfloat16 cos/sin tables, no extras;
- current (2026): rotary base 100000 in float32, QK scaled by 1.2 after QK-norm, per-layer residual
  and x0 lambdas, smear of the previous token's embedding, value embeddings on alternating layers,
  a backout of the middle layer's residual, sliding-window attention and a vocabulary padded to 64;
- the 2026 intermediates, which carry some of the current features: each feature is detected from
  the state-dict keys and a missing one takes its neutral value (lambdas 1 and 0, no smear, no value
  embedding, no backout).

It also owns the KV cache (keys, values and the smear state), parameter and FLOP counts and the
training initialisation. It knows nothing about tokenizers, files or sampling: see `tokenizer.py`,
`checkpoint_manager.py` and `engine.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import model_config
from nanochat.model_config import (  # noqa: F401  (re-exported: the config is part of the model's API)
    SMEAR_CHANNELS,
    SOFTCAP,
    VE_GATE_CHANNELS,
    ArchitectureError,
    GPTConfig,
)


def norm(x: torch.Tensor) -> torch.Tensor:
    # Weightless RMSNorm with eps=None (float32 machine epsilon), exactly as upstream.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head vector's halves by -theta; x is (B, T, H, D), cos/sin are (1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer for a batch of rows, plus the smear state.

    Keys are stored after rotary, QK-norm and the QK scale; values after the value embedding. The
    smear state is the last token's *unsmeared* normalized embedding, because smear mixes in the
    previous token's embedding, not its smeared version.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.prev_embedding: torch.Tensor | None = None  # (B, 1, C)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, Hkv, T, D) and return all keys and values so far."""
        t = k.size(2)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def expand(self, rows: int, max_len: int | None = None) -> KVCache:
        """A new cache with the single row of this one copied `rows` times (prefill once, decode K)."""
        if self.batch_size != 1:
            raise ValueError("expand() copies a single-row cache")
        new = KVCache.__new__(KVCache)
        max_len = max_len or self.max_len
        shape = list(self.k.shape)
        shape[1], shape[3] = rows, max_len
        new.k = self.k.new_zeros(shape)
        new.v = self.v.new_zeros(shape)
        new.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]
        new.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        new.pos, new.max_len = self.pos, max_len
        new.prev_embedding = None if self.prev_embedding is None else self.prev_embedding.expand(rows, -1, -1).clone()
        return new

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch and cost nothing more)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.index_select(0, rows)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_scale = config.qk_scale
        self.window = config.window_sizes()[layer]
        c = config.n_embd
        self.c_q = nn.Linear(c, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if config.has_value_embed(layer) else None
        # The attention visualizer's explicit path (nanochat/attention.py) sets this for the length of one
        # capture; None (always, outside a capture) keeps the fused SDPA kernel and costs one attribute test.
        self.probe = None

    def forward(self, x, ve, cos, sin, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # Rotary, QK-norm and the QK scale are per head vector: one pass over q and k side by side
        # computes exactly what two would, with half the (overhead-bound) kernel launches in decoding.
        qk = norm(apply_rotary(torch.cat([q, k], dim=2), cos, sin))
        if self.qk_scale != 1.0:
            qk = qk * self.qk_scale
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.insert(self.layer, k, v)
            if T == 1 and k.size(2) - 1 > self.window:
                # One query sees only the last window+1 keys: slice them instead of masking the rest.
                k, v = k[:, :, -(self.window + 1):], v[:, :, -(self.window + 1):]
                start = self.window
        if self.probe is not None:
            y = self.probe(self, q, k, v, start)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **self._mask_args(start, T, k.size(2), q.device),
                                               enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

    def _mask_args(self, start: int, t_q: int, t_k: int, device) -> dict:
        window_limits = t_k - 1 > self.window
        if not window_limits and start == 0:
            return {"is_causal": True}
        if not window_limits and t_q == 1:
            return {}
        return {"attn_mask": self.visible(start, t_q, t_k, device)}

    def visible(self, start: int, t_q: int, t_k: int, device=None) -> torch.Tensor:
        """(t_q, t_k) bool: query at position start+i sees key j iff 0 <= start+i-j <= window."""
        qpos = torch.arange(start, start + t_q, device=device)[:, None]
        kpos = torch.arange(t_k, device=device)[None, :]
        delta = qpos - kpos
        return (delta >= 0) & (delta <= self.window)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer) if config.has_value_embed(i)
        })
        # Rotary tables cover 10x the training context, like upstream; they are not saved.
        self.max_positions = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        if self.config.rotary_bf16_tables:
            cos, sin = cos.bfloat16(), sin.bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]

    # ---------------------------------------------------------------- training support

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fresh weights for training (upstream-like scales; the zero projections make every block
        start as the identity, so depth does not blow up the residual stream)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)

        def fill(t: torch.Tensor, fn):
            tmp = torch.empty(t.shape, dtype=torch.float32)
            fn(tmp)
            t.copy_(tmp)

        c = self.config.n_embd
        bound = math.sqrt(3.0) * c ** -0.5
        fill(self.transformer.wte.weight, lambda t: t.normal_(0.0, 1.0, generator=gen))
        fill(self.lm_head.weight, lambda t: t.normal_(0.0, 0.001, generator=gen))
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fill(lin.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.zero_()
        for emb in self.value_embeds.values():
            fill(emb.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
        if self.config.resid_lambdas:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        if self.config.smear:
            self.smear_gate.weight.zero_()
            self.smear_lambda.zero_()
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.max_positions, device=self.cos.device)
        self.cos, self.sin = cos, sin

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by group (see model_config.param_counts; a test checks they agree)."""
        return model_config.param_counts(self.config)

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 x the Linear weights plus attention over each layer's window."""
        return model_config.flops_per_token(self.config)

    # ---------------------------------------------------------------- forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean"):
        """Logits (B, T, vocab_size) as soft-capped float32, or the cross-entropy loss with targets
        (ignore_index -1). With a KV cache, idx holds only the new tokens and the cache advances."""
        cfg = self.config
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.max_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the rotary table ({self.max_positions})")
        cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]

        x = norm(self.transformer.wte(idx))
        if cfg.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            if cfg.resid_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if cfg.has_value_embed(i) else None
            x = block(x, ve, cos, sin, kv_cache)
            if i == cfg.n_layer // 2:
                x_mid = x
        if cfg.backout:
            x = x - self.backout_lambda * x_mid
        x = norm(x)
        if kv_cache is not None:
            kv_cache.pos += T

        logits = self.lm_head(x).float()
        logits = logits[..., :cfg.vocab_size]
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _smear(self, e: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        # x_t = e_t + lambda * sigmoid(gate(e_t[:24])) * e_{t-1}, with e_{t-1} the unsmeared embedding.
        # .contiguous() before the gate: a strided slice into F.linear rounds differently (~2e-6).
        prev_from_cache = kv_cache.prev_embedding if kv_cache is not None else None
        if prev_from_cache is not None:
            prev = torch.cat([prev_from_cache, e[:, :-1]], dim=1)
            gate = torch.sigmoid(self.smear_gate(e[..., :SMEAR_CHANNELS].contiguous()))
            x = e + self.smear_lambda * gate * prev
        else:
            cur = e[:, 1:]
            gate = torch.sigmoid(self.smear_gate(cur[..., :SMEAR_CHANNELS].contiguous()))
            x = torch.cat([e[:, :1], cur + self.smear_lambda * gate * e[:, :-1]], dim=1)
        if kv_cache is not None:
            kv_cache.prev_embedding = e[:, -1:].clone()
        return x

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, device=self.cos.device, dtype=self.lm_head.weight.dtype)
