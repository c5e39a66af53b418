"""Losses on soft targets: the ReLabel targets are distributions, not class ids."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from relabel_dali.ops.compact import CompactTargets


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(t * log_softmax(z)).sum(1).mean(); at least float32, so bf16/fp16 logits do not lose
    the small target probabilities."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)} differ")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype), dim=1)
    return -(targets.to(dtype) * log_probs).sum(dim=1).mean()


def compact_soft_target_cross_entropy(logits: torch.Tensor, targets: CompactTargets) -> torch.Tensor:
    """:func:`soft_target_cross_entropy` of logits ``[..., C]`` against ``targets.to_dense(C)``, mean
    over every leading position (a batch of tokens), without the dense targets. With ``l = log q``:
    ``-sum_present p_c l_c - rest * (sum_all l_c - sum_present l_c)``: every absent class carries
    the same probability ``rest``. The padding (id -1) contributes nothing."""
    if logits.shape[:-1] != targets.ids.shape[:-1]:
        raise ValueError(f"logits shape {tuple(logits.shape)} and compact targets {tuple(targets.ids.shape)} "
                         "differ before the last dimension")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype), dim=-1)
    present = targets.ids >= 0
    log_present = log_probs.gather(-1, targets.ids.clamp(min=0).long()) * present
    present_term = (targets.values.to(dtype) * log_present).sum(-1)
    rest_term = targets.rest.to(dtype) * (log_probs.sum(-1) - log_present.sum(-1))
    return -(present_term + rest_term).mean()


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
