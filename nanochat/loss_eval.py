"""
Validation bits per byte: the tokenizer-independent loss upstream reports as `val_bpb`.

bpb = (sum of the per-token cross-entropy in nats over target tokens that stand for text) /
(ln 2 x the UTF-8 bytes those tokens stand for). Special tokens (0 bytes) and ignored targets (-1) count
for neither. Sums are float64 and all-reduced over ranks, so every rank returns the same number.

It knows nothing about where batches come from (see `dataloader.py`).
"""

from __future__ import annotations

import math

import torch

from nanochat import distributed


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """`steps` batches from the iterator `batches`; token_bytes: (vocab,) int tensor on the model's device."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        counted = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        nats += (loss.double() * (counted > 0)).sum()
        nbytes += counted.sum().double()
    totals = torch.stack([nats, nbytes])
    distributed.all_reduce_sum(totals)
    if totals[1].item() == 0:
        return float("nan")
    return totals[0].item() / (math.log(2) * totals[1].item())
