"""
The model's configuration and its arithmetic, without torch.

`GPTConfig` describes one upstream generation (classic, current, or a 2026 intermediate: features
detected from a checkpoint's state-dict keys). The functions here count parameters and FLOPs and
derive a config from training flags exactly as upstream does, in plain Python, so the registry and the
app can answer "how big is this model, how long is this run" without importing torch. `gpt.py` builds
the module from the same config, and a test checks that both count the same parameters.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

# Keys of upstream's GPTConfig; only these go into a checkpoint's meta["model_config"], because
# upstream's loader calls GPTConfig(**model_config) and would reject anything else.
UPSTREAM_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")

SOFTCAP = 15.0
SMEAR_CHANNELS = 24  # smear_gate reads the first 24 channels of the normalized embedding
VE_GATE_CHANNELS = 12  # ve_gate reads the first 12 channels of the attention input
QK_SCALE_CURRENT = 1.2


class ArchitectureError(ValueError):
    """A state dict or config that does not describe a model we can build."""


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; the last layer is always L (full context)
    # Architecture generation. Not part of upstream's config: detected from the checkpoint.
    resid_lambdas: bool = True  # resid_lambdas and x0_lambdas, one per layer
    smear: bool = True  # smear_gate and smear_lambda
    value_embeds: bool = True  # value_embeds.{i} and attn.ve_gate on alternating layers
    backout: bool = True  # backout_lambda
    vocab_pad: int = 64  # embedding rows padded up to a multiple of this (1 = no padding)
    rotary_base: float = 100000.0
    rotary_bf16_tables: bool = False  # classic rounded cos/sin to bfloat16
    qk_scale: float = QK_SCALE_CURRENT  # q and k multiplied by this after QK-norm (classic: 1.0)

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in UPSTREAM_CONFIG_KEYS[:-1]}
        if wrong := [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool)]:
            raise ArchitectureError(f"{wrong[0]} must be an integer, got {sizes[wrong[0]]!r:.40}")
        if not isinstance(self.window_pattern, str):
            raise ArchitectureError(f"window_pattern must be a string of S and L, got {self.window_pattern!r:.40}")
        if min(self.n_head, self.n_embd) < 1:
            raise ArchitectureError(f"n_head and n_embd must be positive (got {self.n_head}, {self.n_embd})")
        if self.n_embd % self.n_head != 0:
            raise ArchitectureError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ArchitectureError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ArchitectureError(f"window_pattern must be a string of S and L, got {self.window_pattern!r}")
        if min(self.sequence_len, self.vocab_size, self.n_layer) < 1:
            raise ArchitectureError("sequence_len, vocab_size and n_layer must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad) * self.vocab_pad

    @property
    def is_classic(self) -> bool:
        return self.rotary_bf16_tables

    def window_sizes(self) -> list[int]:
        """Per-layer attention window: query i sees key j iff 0 <= i - j <= window."""
        long = self.sequence_len
        short = math.ceil(self.sequence_len / 4 / 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = long
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def upstream_dict(self) -> dict:
        """The meta["model_config"] upstream writes and reads (classic has no window_pattern)."""
        d = {k: getattr(self, k) for k in UPSTREAM_CONFIG_KEYS}
        if self.is_classic:
            del d["window_pattern"]
        return d

    def features(self) -> dict:
        """The architecture flags that are not upstream config keys, for display and our own meta."""
        upstream = set(UPSTREAM_CONFIG_KEYS)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in upstream}

    @classmethod
    def classic(cls, **kw) -> GPTConfig:
        base = dict(window_pattern="L", resid_lambdas=False, smear=False, value_embeds=False, backout=False,
                    vocab_pad=1, rotary_base=10000.0, rotary_bf16_tables=True, qk_scale=1.0)
        return cls(**{**base, **kw})

    @classmethod
    def from_checkpoint(cls, model_config: dict, state_shapes: dict) -> GPTConfig:
        """Build the config from a meta's model_config plus the {key: shape} of its state dict.

        A checkpoint with none of the 2026 keys and no window_pattern is classic; any 2026 key or a
        window_pattern marks the current numerics (rotary base 100000, float32 tables, QK x 1.2), and
        each 2026 feature is then on only if its keys are present. Vocabulary padding is read from the
        embedding's row count.
        """
        shapes = {k.removeprefix("_orig_mod."): tuple(v) for k, v in state_shapes.items()}
        unknown = sorted(k for k in shapes if not _is_known_key(k))
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
            raise ArchitectureError(f"unknown state-dict keys for a nanochat GPT: {shown}")
        base = {k: model_config[k] for k in UPSTREAM_CONFIG_KEYS if k in model_config}
        missing = [k for k in UPSTREAM_CONFIG_KEYS[:-1] if k not in base]
        if missing:
            raise ArchitectureError(f"model_config lacks {', '.join(missing)}")
        features = dict(
            resid_lambdas="resid_lambdas" in shapes,
            smear="smear_gate.weight" in shapes,
            value_embeds=any(k.startswith("value_embeds.") for k in shapes),
            backout="backout_lambda" in shapes,
        )
        if not any(features.values()) and "window_pattern" not in model_config:
            return cls.classic(**base)
        rows = shapes.get("transformer.wte.weight", (None,))[0]
        pad = 64 if rows is not None and rows != base["vocab_size"] else 1
        return cls(**{"window_pattern": "L", **base}, **features, vocab_pad=pad)


def is_state_dict_key(key: str) -> bool:
    """Whether a state-dict key (without `_orig_mod.`) is one any nanochat GPT generation can have."""
    return _is_known_key(key.removeprefix("_orig_mod."))


def expected_state_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the GPT this config builds, with its shape (what `GPT(cfg).state_dict()`
    holds), computed without torch so integrity checks can compare a checkpoint's pickle against it."""
    c, v = cfg.n_embd, cfg.padded_vocab_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, c)}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        out.update({h + "attn.c_q.weight": (q, c), h + "attn.c_k.weight": (kv, c), h + "attn.c_v.weight": (kv, c),
                    h + "attn.c_proj.weight": (c, c)})
        if cfg.has_value_embed(i):
            out[h + "attn.ve_gate.weight"] = (cfg.n_kv_head, VE_GATE_CHANNELS)
        out.update({h + "mlp.c_fc.weight": (4 * c, c), h + "mlp.c_proj.weight": (c, 4 * c)})
    out["lm_head.weight"] = (v, c)
    if cfg.resid_lambdas:
        out.update({"resid_lambdas": (cfg.n_layer,), "x0_lambdas": (cfg.n_layer,)})
    if cfg.smear:
        out.update({"smear_gate.weight": (1, SMEAR_CHANNELS), "smear_lambda": (1,)})
    if cfg.backout:
        out["backout_lambda"] = (1,)
    for i in range(cfg.n_layer):
        if cfg.has_value_embed(i):
            out[f"value_embeds.{i}.weight"] = (v, kv)
    return out


# Cached: the same few dozen names recur in every checkpoint of every run (the registry derives a
# config per run it indexes: GPTConfig.from_checkpoint 23 -> 10 us for a 4-layer state dict).
@functools.lru_cache(maxsize=4096)
def _is_known_key(key: str) -> bool:
    parts = key.split(".")
    if key in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "smear_gate.weight",
               "transformer.wte.weight", "lm_head.weight"):
        return True
    if parts[0] == "value_embeds":
        return len(parts) == 3 and parts[1].isdigit() and parts[2] == "weight"
    if parts[:2] == ["transformer", "h"] and len(parts) == 6 and parts[2].isdigit():
        return ".".join(parts[3:]) in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight",
                                       "attn.c_proj.weight", "attn.ve_gate.weight", "mlp.c_fc.weight",
                                       "mlp.c_proj.weight")
    return False


# ---------------------------------------------------------------------- arithmetic


def current_config(depth: int, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
                   vocab_size: int = 32768, window_pattern: str = "SSSL") -> GPTConfig:
    """The model current upstream base_train builds from its flags."""
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern)


def classic_config(depth: int, max_seq_len: int = 2048, vocab_size: int = 65536) -> GPTConfig:
    """The model classic upstream base_train built from --depth."""
    n_embd = depth * 64
    n_head = max(1, math.ceil(n_embd / 128))
    return GPTConfig.classic(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                             n_kv_head=n_head, n_embd=n_embd)


def param_counts(cfg: GPTConfig) -> dict[str, int]:
    """Parameters by group, as GPT.param_counts() reports them for the built module.

    `scaling` (transformer blocks + lm_head) is what current upstream's data-ratio rule counts.
    """
    c, v = cfg.n_embd, cfg.padded_vocab_size
    kv = cfg.n_kv_head * cfg.head_dim
    attn = c * cfg.n_head * cfg.head_dim + 2 * c * kv + c * c
    mlp = 2 * 4 * c * c
    ve_layers = sum(cfg.has_value_embed(i) for i in range(cfg.n_layer))
    counts = {
        "wte": v * c,
        "value_embeds": ve_layers * v * kv,
        "lm_head": v * c,
        "transformer_matrices": cfg.n_layer * (attn + mlp) + ve_layers * VE_GATE_CHANNELS * cfg.n_kv_head,
        "scalars": (2 * cfg.n_layer if cfg.resid_lambdas else 0) + (SMEAR_CHANNELS + 1 if cfg.smear else 0)
        + (1 if cfg.backout else 0),
    }
    counts["total"] = sum(counts.values())
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


def linear_weights(cfg: GPTConfig) -> int:
    """Weights of every Linear layer: blocks (with ve_gate), lm_head and smear_gate."""
    counts = param_counts(cfg)
    return counts["transformer_matrices"] + counts["lm_head"] + (SMEAR_CHANNELS if cfg.smear else 0)


def flops_per_token(cfg: GPTConfig) -> int:
    """Current upstream's training FLOPs per token: 6 x Linear weights + attention over each window."""
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
    return 6 * linear_weights(cfg) + attn


def classic_flops_per_token(cfg: GPTConfig) -> int:
    """Classic upstream's estimate: 6 x (all parameters but the token embedding) + 12*L*H*D*T."""
    counts = param_counts(cfg)
    return 6 * (counts["total"] - counts["wte"]) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len


def training_memory_bytes(cfg: GPTConfig, device_batch_size: int, dtype_bytes: int = 4,
                          flash_attention: bool = True) -> dict[str, int]:
    """Rough training memory in bytes: fp32 weights and gradients, optimizer state (AdamW keeps 2 values
    per embedding/lm_head/scalar parameter, Muon 1 momentum per matrix entry), the activations kept
    for backward (34*C bytes per token and layer at 16 bits, Korthikanti et al. 2022, scaled to
    dtype_bytes; plus 5*H*T for the attention matrix unless flash attention, which never keeps it, as
    upstream uses) and the float32 logits with their gradient."""
    counts = param_counts(cfg)
    matrices = counts["transformer_matrices"]
    adam = counts["total"] - matrices
    tokens = device_batch_size * cfg.sequence_len
    attention_matrix = 0 if flash_attention else 5 * cfg.n_head * cfg.sequence_len
    activations = cfg.n_layer * tokens * (34 * cfg.n_embd + attention_matrix) * dtype_bytes // 2
    logits = tokens * cfg.padded_vocab_size * 4 * 2
    out = {
        "weights": counts["total"] * 4,
        "gradients": counts["total"] * 4,
        "optimizer": (2 * adam + matrices) * 4,
        "activations": activations + logits,
    }
    out["total"] = sum(out.values())
    return out
