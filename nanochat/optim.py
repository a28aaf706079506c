"""
The training optimizer: Muon for the transformer's matrices, AdamW for everything else, sharded over ranks.

`MuonAdamW` follows current upstream nanochat's recipe (parameter groups, learning rates scaled by
(n_embd/768)^-0.5 for AdamW, Nesterov momentum, Polar Express orthogonalization with row equilibration
and Frobenius renormalization, NorMuon's factored second moment, cautious weight decay), written for
exact, resumable runs under any backend:

- Every parameter is *owned* by one rank (whole tensors, assigned greedily by size, deterministically).
  A rank keeps optimizer state only for what it owns, so each rank saves its own shard
  (`optim_{step}_rank{r}.pt`) and the shards of one step together hold the whole state.
- A step is: all_reduce(SUM) the gradients once (one flat buffer), divide by the world size, update
  the owned parameters, then all_gather_into_tensor the updated parameters (padded to equal lengths).
  Both collectives exist in gloo, so 2 CPU processes under torchrun train the same way 8 GPUs do
  (upstream's reduce_scatter futures are NCCL-only).
- State is keyed by parameter name and stored as plain tensors and numbers, readable with
  `torch.load(weights_only=True)`; loading a shard checks rank, world size, names and shapes and
  fails with a one-line `OptimizerStateError` instead of silently training from zeros.

It does not choose learning-rate schedules (see `schedule.py`) or talk to the file system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanochat import distributed

STATE_FORMAT = "nanochat-workbench-optimizer"

# Polar Express coefficients (Amsel et al. 2025, arXiv:2505.16932; num_iters=5, safety 2e-2, cushion 2).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


class OptimizerStateError(ValueError):
    """An optimizer shard that does not belong to this model, rank or world size."""


@dataclass(frozen=True)
class LearningRates:
    embedding: float = 0.3
    unembedding: float = 0.008
    matrix: float = 0.02
    scalar: float = 0.5
    weight_decay: float = 0.28  # Muon's (cautious) weight decay at step 0


def param_groups_for(model: torch.nn.Module, lrs: LearningRates) -> list[dict]:
    """Upstream's grouping: one AdamW group per kind of parameter, one Muon group per matrix shape."""
    c = model.config.n_embd
    scale = (c / 768) ** -0.5  # AdamW LRs were tuned at n_embd 768
    named = dict(model.named_parameters())

    def names(pred):
        return [n for n in named if pred(n)]

    adamw = [
        dict(name="lm_head", params=names(lambda n: n == "lm_head.weight"), lr=lrs.unembedding * scale,
             betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
        dict(name="embedding", params=names(lambda n: n == "transformer.wte.weight"), lr=lrs.embedding * scale,
             betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
        dict(name="value_embeds", params=names(lambda n: n.startswith("value_embeds.")),
             lr=lrs.embedding * scale * 0.5, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(name="resid_lambdas", params=names(lambda n: n == "resid_lambdas"), lr=lrs.scalar * 0.01,
             betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(name="x0_lambdas", params=names(lambda n: n == "x0_lambdas"), lr=lrs.scalar,
             betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(name="smear", params=names(lambda n: n in ("smear_gate.weight", "smear_lambda", "backout_lambda")),
             lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
    ]
    groups = [dict(kind="adamw", **g) for g in adamw if g["params"]]
    matrices = names(lambda n: n.startswith("transformer.h."))
    for shape in sorted({tuple(named[n].shape) for n in matrices}):
        groups.append(dict(kind="muon", name=f"muon_{'x'.join(map(str, shape))}",
                           params=[n for n in matrices if tuple(named[n].shape) == shape],
                           lr=lrs.matrix, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=lrs.weight_decay))
    covered = {n for g in groups for n in g["params"]}
    assert covered == set(named), f"parameters without an optimizer group: {sorted(set(named) - covered)}"
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Whole parameters to ranks, largest first onto the least-loaded rank (ties: lowest rank).
    Deterministic in the names and sizes alone, so every rank computes the same map."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += sizes[name]
    return owners


class MuonAdamW:
    """Muon + AdamW over named parameters; with world_size > 1, sharded as described above."""

    def __init__(self, model: torch.nn.Module, groups: list[dict], rank: int = 0, world_size: int = 1):
        self.named = dict(model.named_parameters())
        self.param_groups = groups
        self.rank, self.world_size = rank, world_size
        self.owners = assign_owners({n: p.numel() for n, p in self.named.items()}, world_size)
        self.owned = [n for n in self.named if self.owners[n] == rank]
        self.state: dict[str, dict] = {}
        # Flat communication layout: every rank's owned parameters, in model order, padded to one length.
        by_rank = [[n for n in self.named if self.owners[n] == r] for r in range(world_size)]
        self._by_rank = by_rank
        self._gather_len = max(sum(self.named[n].numel() for n in names) for names in by_rank)

    # ------------------------------------------------------------------ stepping

    def zero_grad(self) -> None:
        for p in self.named.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.world_size > 1:
            self._average_gradients()
        owned = set(self.owned)
        for group in self.param_groups:
            names = [n for n in group["params"] if n in owned]
            if not names:
                continue
            if group["kind"] == "adamw":
                for n in names:
                    self._adamw(n, group)
            else:
                self._muon(names, group)
        if self.world_size > 1:
            self._gather_parameters()

    def _grad(self, name: str) -> torch.Tensor:
        p = self.named[name]
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _average_gradients(self) -> None:
        flat = torch.cat([self._grad(n).reshape(-1) for n in self.named])
        distributed.all_reduce_sum(flat)
        flat.div_(self.world_size)
        offset = 0
        for p in self.named.values():
            k = p.numel()
            p.grad = flat[offset:offset + k].view_as(p)
            offset += k

    def _gather_parameters(self) -> None:
        mine = [self.named[n].reshape(-1) for n in self._by_rank[self.rank]]
        local = torch.zeros(self._gather_len, dtype=torch.float32, device=self._device())
        if mine:
            packed = torch.cat(mine)
            local[:packed.numel()] = packed
        out = torch.empty(self._gather_len * self.world_size, dtype=local.dtype, device=local.device)
        distributed.all_gather_into(out, local)
        for r, names in enumerate(self._by_rank):
            if r == self.rank:
                continue
            offset = r * self._gather_len
            for n in names:
                p = self.named[n]
                p.copy_(out[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def _device(self) -> torch.device:
        return next(iter(self.named.values())).device

    def _adamw(self, name: str, group: dict) -> None:
        p, g = self.named[name], self._grad(name)
        state = self.state.get(name)
        if state is None:
            state = self.state[name] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        state["step"] += 1
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        p.mul_(1 - lr * wd)  # decoupled weight decay, before the update
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].lerp_(g.square(), 1 - beta2)
        bias1 = 1 - beta1 ** state["step"]
        bias2 = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
        p.add_(state["exp_avg"] / denom, alpha=-lr / bias1)

    def _muon(self, names: list[str], group: dict) -> None:
        params = [self.named[n] for n in names]
        shape = params[0].shape
        rows, cols = shape[-2], shape[-1]
        red_dim = -1 if rows >= cols else -2
        for n, p in zip(names, params):
            if n not in self.state:
                second = (rows, 1) if rows >= cols else (1, cols)
                self.state[n] = {"momentum_buffer": torch.zeros_like(p),
                                 "second_momentum_buffer": torch.zeros(second, dtype=p.dtype, device=p.device)}
        grads = torch.stack([self._grad(n) for n in names])
        stacked = torch.stack(params)
        momentum = torch.stack([self.state[n]["momentum_buffer"] for n in names])
        second = torch.stack([self.state[n]["second_momentum_buffer"] for n in names])
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        muon_update(grads, stacked, momentum, second, momentum=group["momentum"], lr=lr,
                    weight_decay=group["weight_decay"], beta2=group["beta2"], ns_steps=group["ns_steps"],
                    red_dim=red_dim)
        for i, (n, p) in enumerate(zip(names, params)):
            p.copy_(stacked[i])
            self.state[n]["momentum_buffer"].copy_(momentum[i])
            self.state[n]["second_momentum_buffer"].copy_(second[i])

    # ------------------------------------------------------------------ schedules

    def set_schedule(self, lr_multiplier: float, muon_momentum: float, muon_weight_decay: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """This rank's shard: plain tensors (cloned, on CPU) and numbers, keyed by parameter name."""
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "rank": self.rank,
            "world_size": self.world_size,
            "owned": list(self.owned),
            "state": {n: {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in s.items()}
                      for n, s in self.state.items()},
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                             for g in self.param_groups],
        }

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise OptimizerStateError("the optimizer shard was not written by this trainer (upstream's optimizer "
                                      "state cannot be resumed exactly)")
        if sd.get("world_size") != self.world_size or sd.get("rank") != self.rank:
            raise OptimizerStateError(f"the optimizer shard is rank {sd.get('rank')} of {sd.get('world_size')}, "
                                      f"but this process is rank {self.rank} of {self.world_size}")
        if list(sd.get("owned", [])) != self.owned:
            raise OptimizerStateError("the optimizer shard covers different parameters than this model "
                                      "(changed model config?)")
        state = {}
        for n, s in sd["state"].items():
            p = self.named.get(n)
            if p is None or n not in self.owned:
                raise OptimizerStateError(f"the optimizer shard holds state for {n}, which this rank does not own")
            restored = {}
            for k, v in s.items():
                if torch.is_tensor(v):
                    expected = p.shape if k in ("momentum_buffer", "exp_avg", "exp_avg_sq") else None
                    if expected is not None and tuple(v.shape) != tuple(expected):
                        raise OptimizerStateError(f"optimizer state {n}.{k} has shape {list(v.shape)}, "
                                                  f"the parameter has {list(p.shape)}")
                    v = v.to(device=p.device, dtype=p.dtype, copy=True)
                restored[k] = v
            state[n] = restored
        self.state = state


def polar_express(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately orthogonalize each matrix of a (K, m, n) stack (U S V^T -> U S' V^T, S' ~ 1)."""
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def muon_update(grads, params, momentum_buffer, second_buffer, *, momentum: float, lr: float,
                weight_decay: float, beta2: float, ns_steps: int, red_dim: int) -> None:
    """One Muon step on a stack of same-shape matrices, in place on params and both buffers."""
    # Nesterov momentum.
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    # Row equilibration: equal row norms condition the spectrum before orthogonalization.
    target = g.norm(dim=(-2, -1), keepdim=True) / (g.size(-2) ** 0.5)
    g = g * (target / g.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    g = polar_express(g, ns_steps)
    # Snap the Frobenius norm to sqrt(min(m, n)), an exactly semi-orthogonal matrix's norm.
    g = g * (min(g.size(-2), g.size(-1)) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # NorMuon: per-row (or per-column) second moment, rescaled to keep the update's overall norm.
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second_buffer.lerp_(v_mean, 1 - beta2)
    step_size = second_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # Cautious weight decay: only where the update and the weight agree in sign.
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * weight_decay * params * mask)


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """Upstream's Muon momentum: 0.85 -> 0.97 over the first 400 steps, down to 0.90 over the LR warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start and warmdown_iters > 0:
        progress = (step - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Upstream's cosine decay of Muon's weight decay to zero over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / max(1, num_iterations)))
