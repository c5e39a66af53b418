"""Losses on soft targets: the ReLabel targets are distributions, not class ids."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(t * log_softmax(z)).sum(1).mean(); at least float32, so bf16/fp16 logits do not lose
    the small target probabilities."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)} differ")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype), dim=1)
    return -(targets.to(dtype) * log_probs).sum(dim=1).mean()


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """t * (1 - s) + s / C over all C classes (the official smoothing of soft targets). It is
    linear, so smoothing before or after CutMix's convex mix gives the same targets."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"optim.label_smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0.0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[1]


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()
