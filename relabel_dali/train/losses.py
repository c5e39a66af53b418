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


def token_label_loss(logits: torch.Tensor, token_logits: torch.Tensor, targets: torch.Tensor,
                     token_targets: torch.Tensor | CompactTargets, token_weight: float) -> torch.Tensor:
    """TokenLabeling's loss (LV-ViT): the class token's soft-target cross-entropy on the crop's
    target plus ``token_weight`` times the mean over every token of the batch of the per-token
    soft-target cross-entropy. ``logits [B, C]``, ``token_logits [B, T, C]`` (the auxiliary head
    over the patch tokens), ``targets [B, C]``, ``token_targets [B, T, C]`` dense or compact."""
    if token_logits.ndim != 3 or token_logits.shape[0] != logits.shape[0]:
        raise ValueError(f"token_logits: expected [B={logits.shape[0]}, T, C], got {tuple(token_logits.shape)}")
    if isinstance(token_targets, CompactTargets):
        token_loss = compact_soft_target_cross_entropy(token_logits, token_targets)
    else:
        if token_logits.shape != token_targets.shape:
            raise ValueError(f"token_logits shape {tuple(token_logits.shape)} and token_targets shape "
                             f"{tuple(token_targets.shape)} differ")
        token_loss = soft_target_cross_entropy(token_logits.flatten(0, 1), token_targets.flatten(0, 1))
    return soft_target_cross_entropy(logits, targets) + token_weight * token_loss


def smooth_targets(targets: torch.Tensor | CompactTargets, smoothing: float,
                   num_classes: int | None = None) -> torch.Tensor | CompactTargets:
    """t * (1 - s) + s / C over all C classes, the last dimension (the official smoothing of soft
    targets; token targets [B, T, C] alike; compact token targets given ``num_classes``). It is
    linear, so smoothing before or after CutMix's convex mix gives the same targets."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"optim.label_smoothing must be in [0, 1), got {smoothing}")
    if isinstance(targets, CompactTargets):
        if num_classes is None:
            raise ValueError("smooth_targets: compact targets need num_classes")
        return targets.smooth(smoothing, num_classes)
    if smoothing == 0.0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()
