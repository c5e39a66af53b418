"""CutMix on soft targets, as ReLabel trains with it.

A Beta(beta, beta) draw sets the kept area; a box of area ``1 - lam`` centred uniformly at random
(and clipped to the image) is pasted from a permutation of the batch, and ``lam`` is recomputed
from the clipped box, so the target mix ``lam * t + (1 - lam) * t[perm]`` matches the pixels.
Turning CutMix off for the last epochs is the caller's decision: pass ``prob=0`` then.
"""
from __future__ import annotations

import math

import torch

from relabel_dali.data.transfer import host_to_device


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None):
    """(y0, y1, x0, x1) pixel bounds of a box of area ``(1 - lam)`` of the image, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre_y = int(torch.randint(height, (1,), generator=generator))
    centre_x = int(torch.randint(width, (1,), generator=generator))
    y0, y1 = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    x0, x1 = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix_batch(images: torch.Tensor, targets: torch.Tensor, *, prob: float = 1.0, beta: float = 1.0,
                 generator: torch.Generator | None = None):
    """Returns ``(images, targets, lam)``; ``images`` [B, C, H, W] is modified in place.

    ``generator`` is a CPU ``torch.Generator``: every draw happens on the CPU, so a seed gives the
    same mix on any device, and the permutation reaches the GPU by an asynchronous copy (the host
    does not wait for the GPU each step); the pixel copy and target mix stay on the tensors' device.
    ``lam`` is 1.0 when CutMix was not applied.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets: expected [B={images.shape[0]}, num_classes], got shape {tuple(targets.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if prob == 0.0 or float(torch.rand((), generator=generator)) >= prob:
        return images, targets, 1.0
    beta_t = torch.tensor([float(beta)])
    # torch.distributions has no generator argument: Beta(a, b) = Ga / (Ga + Gb) with seeded gammas.
    gammas = torch._standard_gamma(beta_t.repeat(2), generator=generator)
    lam = float(gammas[0] / gammas.sum())
    height, width = images.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
    perm = torch.randperm(images.shape[0], generator=generator)
    if images.device.type != "cpu":
        perm = host_to_device(perm, images.device)
    images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    targets = lam * targets + (1.0 - lam) * targets[perm]
    return images, targets, lam
