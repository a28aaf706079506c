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
- Saved state is upstream's, whatever the in-memory layout: `state_dict()` returns for this rank exactly
  what upstream's `MuonAdamW.state_dict()` holds (integer indices in upstream's group order, upstream's
  group keys, Muon state stacked per group, and for W ranks upstream's split: large AdamW state by rows,
  Muon groups in chunks of ceil(K/W) params), so upstream's trainer continues our runs. Building a rank's
  file needs state other ranks own, so with W > 1 it is a collective (one broadcast per tensor, from its
  owner). `load_shards()` takes every rank's file of one step, in this layout or our earlier per-name one
  (format "nanochat-workbench-optimizer", v1), rebuilds each parameter's full state and keeps what this
  rank owns; anything that does not fit the model fails with a one-line `OptimizerStateError`.

It does not choose learning-rate schedules (see `schedule.py`) or talk to the file system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanochat import distributed

STATE_FORMAT = "nanochat-workbench-optimizer"  # our earlier per-name layout, still read
SMEAR_PARAMS = ("smear_gate.weight", "smear_lambda", "backout_lambda")  # upstream's order within the group
SMALL_NUMEL = 1024  # upstream keeps the full AdamW state of smaller params on every rank, row shards of larger
# Key order of upstream's saved groups (torch's state_dict keeps the group's insertion order, params last).
UPSTREAM_GROUP_KEYS = {"adamw": ("kind", "lr", "betas", "eps", "weight_decay", "initial_lr"),
                       "muon": ("kind", "lr", "momentum", "ns_steps", "beta2", "weight_decay", "initial_lr")}
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "muon": ("momentum_buffer", "second_momentum_buffer")}

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
        dict(name="value_embeds", params=sorted(names(lambda n: n.startswith("value_embeds.")),
                                                 key=lambda n: int(n.split(".")[1])),
             lr=lrs.embedding * scale * 0.5, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(name="resid_lambdas", params=names(lambda n: n == "resid_lambdas"), lr=lrs.scalar * 0.01,
             betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(name="x0_lambdas", params=names(lambda n: n == "x0_lambdas"), lr=lrs.scalar,
             betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(name="smear", params=[n for n in SMEAR_PARAMS if n in named],
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
        """This rank's file, in upstream's layout (module docstring): plain CPU tensors and numbers.
        With world_size > 1 every rank must call it (it broadcasts each parameter's state from its owner)."""
        world, rank = self.world_size, self.rank
        groups, state, index = [], {}, 0
        for g in self.param_groups:
            names, kind = g["params"], g["kind"]
            ids = list(range(index, index + len(names)))
            index += len(names)
            groups.append(_upstream_group(g, ids))
            if kind == "muon":
                full = [self._state_everywhere(n, kind) for n in names]
                if any(s is None for s in full):
                    continue  # no step yet: upstream has no entry either
                chunk = -(-len(names) // world)
                mine = full[rank * chunk:(rank + 1) * chunk]
                entry = {}
                for key in STATE_KEYS[kind]:
                    shape = full[0][key].shape
                    stacked = torch.zeros((chunk, *shape), dtype=full[0][key].dtype)
                    for j, s in enumerate(mine):
                        stacked[j].copy_(s[key])
                    entry[key] = stacked
                state[ids[0]] = entry
                continue
            for i, n in zip(ids, names):
                s = self._state_everywhere(n, kind)
                if s is not None:
                    state[i] = {"step": s["step"], **{k: self._rows_of_rank(s[k]) for k in STATE_KEYS[kind]}}
        return {"state": state, "param_groups": groups}

    def _rows_of_rank(self, t: torch.Tensor) -> torch.Tensor:
        """Upstream's AdamW split: rank r keeps rows [r*R/W, (r+1)*R/W) of a large parameter's state.
        (Upstream cannot train when R % W != 0; such state is then written whole.)"""
        w = self.world_size
        if w == 1 or t.numel() < SMALL_NUMEL or t.shape[0] % w:
            return t
        rows = t.shape[0] // w
        return t[self.rank * rows:(self.rank + 1) * rows].clone()

    def _state_everywhere(self, name: str, kind: str) -> dict | None:
        """One parameter's full state on every rank (CPU copies); None before its first step."""
        p = self.named[name]
        owner = self.owners[name]
        mine = self.state.get(name) if owner == self.rank else None
        if self.world_size == 1:
            return None if mine is None else {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                                              for k, v in mine.items()}
        head = torch.tensor([mine is not None, (mine or {}).get("step", 0)], dtype=torch.int64, device=p.device)
        distributed.broadcast(head, owner)
        if not head[0].item():
            return None
        out = {"step": int(head[1].item())} if kind == "adamw" else {}
        for key in STATE_KEYS[kind]:
            t = mine[key] if mine is not None else torch.empty(_state_shape(p, key), dtype=p.dtype, device=p.device)
            distributed.broadcast(t, owner)
            out[key] = t.detach().to("cpu", copy=True)
        return out

    def load_shards(self, shards: list) -> None:
        """Restore from every rank's file of one step (index = rank), upstream's layout or our v1 one.
        The files may come from another world size: each parameter's full state is rebuilt first."""
        if not shards:
            raise OptimizerStateError("no optimizer files to load")
        if all(isinstance(sd, dict) and sd.get("format") == STATE_FORMAT for sd in shards):
            full = self._full_state_from_v1(shards)
        else:
            full = self._full_state_from_upstream(shards)
        state = {}
        for n in self.owned:
            if n in full:
                p = self.named[n]
                state[n] = {k: (v.to(device=p.device, dtype=p.dtype, copy=True) if torch.is_tensor(v) else v)
                            for k, v in full[n].items()}
        self.state = state

    def _full_state_from_v1(self, shards: list[dict]) -> dict[str, dict]:
        full = {}
        for r, sd in enumerate(shards):
            if (sd.get("rank"), sd.get("world_size")) != (r, len(shards)):
                raise OptimizerStateError(f"optimizer file {r} of {len(shards)} says it is rank {sd.get('rank')} "
                                          f"of {sd.get('world_size')}")
            for n, s in sd["state"].items():
                p = self.named.get(n)
                if p is None:
                    raise OptimizerStateError(f"the optimizer state holds {n}, which this model does not have "
                                              "(changed model config?)")
                full[n] = dict(s)
        for n, s in full.items():
            for k in ("exp_avg", "exp_avg_sq", "momentum_buffer", "second_momentum_buffer"):
                if k in s and tuple(s[k].shape) != _state_shape(self.named[n], k):
                    raise OptimizerStateError(f"optimizer state {n}.{k} has shape {list(s[k].shape)}, the parameter "
                                              f"has {list(self.named[n].shape)}")
        return full

    def _full_state_from_upstream(self, shards: list) -> dict[str, dict]:
        world = len(shards)
        for r, sd in enumerate(shards):
            if isinstance(sd, list):
                raise OptimizerStateError("this is classic upstream optimizer state (a list [adamw, muon]); only "
                                          "the current single-dict layout can be continued")
            if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict)
                    and isinstance(sd.get("param_groups"), list)):
                raise OptimizerStateError(f"optimizer file of rank {r} is not an optimizer state dict")
        ours = self.param_groups
        for r, sd in enumerate(shards):
            theirs = sd["param_groups"]
            sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in theirs]
            if len(theirs) != len(ours):
                raise OptimizerStateError(f"the optimizer file of rank {r} holds {len(theirs)} parameter groups, this "
                                          f"model has {len(ours)} (written for another model?)")
            if [g.get("kind") if isinstance(g, dict) else None for g in theirs] != [g["kind"] for g in ours] \
                    or sizes != [len(g["params"]) for g in ours]:
                raise OptimizerStateError(f"the optimizer file of rank {r} has groups of sizes {sizes}, this model's "
                                          f"are {[len(g['params']) for g in ours]} (changed model config?)")
        full, index = {}, 0
        for g in ours:
            names, kind = g["params"], g["kind"]
            ids = list(range(index, index + len(names)))
            index += len(names)
            if kind == "adamw":
                for i, n in zip(ids, names):
                    entries = [sd["state"].get(i) for sd in shards]
                    if entries[0] is None:
                        continue
                    full[n] = {"step": _as_int(entries[0].get("step"), n),
                               **{k: self._join_rows(n, k, entries) for k in STATE_KEYS[kind]}}
                continue
            entries = [sd["state"].get(ids[0]) for sd in shards]
            if entries[0] is None:
                continue
            chunk = -(-len(names) // world)
            for key in STATE_KEYS[kind]:
                parts = [_entry_tensor(e, key, names[0], r) for r, e in enumerate(entries)]
                want = _state_shape(self.named[names[0]], key)
                for r, t in enumerate(parts):
                    if tuple(t.shape) != (chunk, *want):
                        raise OptimizerStateError(f"rank {r}'s {key} for the {g['name']} group has shape "
                                                  f"{list(t.shape)}, expected {[chunk, *want]}")
                stacked = torch.cat(parts)[:len(names)]
                for j, n in enumerate(names):
                    full.setdefault(n, {})[key] = stacked[j].clone()
        return full

    def _join_rows(self, name: str, key: str, entries: list) -> torch.Tensor:
        """An AdamW tensor whole (on every rank alike) or as upstream's row shards, one per rank."""
        want = tuple(self.named[name].shape)
        parts = [_entry_tensor(e, key, name, r) for r, e in enumerate(entries)]
        if tuple(parts[0].shape) == want:
            return parts[0]
        if all(tuple(t.shape) == (want[0] // len(parts), *want[1:]) for t in parts) and want[0] % len(parts) == 0:
            return torch.cat(parts)
        raise OptimizerStateError(f"optimizer state {name}.{key} has shape {list(parts[0].shape)} in rank 0's file, "
                                  f"the parameter has {list(want)}")


def _upstream_group(g: dict, ids: list[int]) -> dict:
    out = {k: (tuple(g[k]) if k == "betas" else g[k]) for k in UPSTREAM_GROUP_KEYS[g["kind"]]}
    out["params"] = ids
    return out


def _state_shape(p: torch.Tensor, key: str) -> tuple[int, ...]:
    if key == "second_momentum_buffer":
        rows, cols = p.shape[-2], p.shape[-1]
        return (rows, 1) if rows >= cols else (1, cols)
    return tuple(p.shape)


def _entry_tensor(entry, key: str, name: str, rank: int) -> torch.Tensor:
    t = entry.get(key) if isinstance(entry, dict) else None
    if not torch.is_tensor(t):
        raise OptimizerStateError(f"rank {rank}'s optimizer file has no {key} for {name}")
    return t


def _as_int(v, name: str) -> int:
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise OptimizerStateError(f"the optimizer step of {name} is {v!r}, not a count")
    return v


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
