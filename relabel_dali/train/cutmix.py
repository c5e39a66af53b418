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
from relabel_dali.ops.compact import CompactTargets
from relabel_dali.ops.compact import mix as compact_mix


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None):
    """(y0, y1, x0, x1) pixel bounds of a box of area ``(1 - lam)`` of the image, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre_y = int(torch.randint(height, (1,), generator=generator))
    centre_x = int(torch.randint(width, (1,), generator=generator))
    y0, y1 = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    x0, x1 = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return y0, y1, x0, x1


def _check(images: torch.Tensor, targets: torch.Tensor, prob: float, beta: float) -> None:
    if images.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets: expected [B={images.shape[0]}, num_classes], got shape {tuple(targets.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _draw(images: torch.Tensor, prob: float, beta: float, generator):
    """``None`` (no CutMix this batch) or ``(box, perm)``; every draw on the CPU, in one order."""
    if prob == 0.0 or float(torch.rand((), generator=generator)) >= prob:
        return None
    beta_t = torch.tensor([float(beta)])
    # torch.distributions has no generator argument: Beta(a, b) = Ga / (Ga + Gb) with seeded gammas.
    gammas = torch._standard_gamma(beta_t.repeat(2), generator=generator)
    lam = float(gammas[0] / gammas.sum())
    height, width = images.shape[-2:]
    box = cutmix_box(height, width, lam, generator)
    perm = torch.randperm(images.shape[0], generator=generator)
    if images.device.type != "cpu":
        perm = host_to_device(perm, images.device)
    return box, perm


def _paste(images: torch.Tensor, targets: torch.Tensor, box, perm):
    y0, y1, x0, x1 = box
    height, width = images.shape[-2:]
    images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return images, lam * targets + (1.0 - lam) * targets[perm], lam


def cutmix_batch(images: torch.Tensor, targets: torch.Tensor, *, prob: float = 1.0, beta: float = 1.0,
                 generator: torch.Generator | None = None):
    """Returns ``(images, targets, lam)``; ``images`` [B, C, H, W] is modified in place.

    ``generator`` is a CPU ``torch.Generator``: every draw happens on the CPU, so a seed gives the
    same mix on any device, and the permutation reaches the GPU by an asynchronous copy (the host
    does not wait for the GPU each step); the pixel copy and target mix stay on the tensors' device.
    ``lam`` is 1.0 when CutMix was not applied.
    """
    _check(images, targets, prob, beta)
    drawn = _draw(images, prob, beta, generator)
    if drawn is None:
        return images, targets, 1.0
    return _paste(images, targets, *drawn)


def token_cover(box, height: int, width: int, size: int, device=None) -> torch.Tensor:
    """``[size * size]`` float32: the fraction of each token's patch (row-major, ``size x size``
    patches tiling the ``height x width`` image) that lies inside the pixel box ``(y0, y1, x0, x1)``."""
    y0, y1, x0, x1 = box

    def overlap(low: int, high: int, extent: int) -> torch.Tensor:
        edges = torch.arange(size + 1, dtype=torch.float64) * (extent / size)
        return (torch.minimum(edges[1:], torch.tensor(float(high))) -
                torch.maximum(edges[:-1], torch.tensor(float(low)))).clamp(min=0) / (extent / size)

    cover = overlap(y0, y1, height)[:, None] * overlap(x0, x1, width)[None, :]
    return cover.reshape(-1).to(device=device, dtype=torch.float32)


def cutmix_batch_tokens(images: torch.Tensor, targets: torch.Tensor, token_targets: torch.Tensor | CompactTargets,
                        *, prob: float = 1.0, beta: float = 1.0, generator: torch.Generator | None = None):
    """:func:`cutmix_batch` (the same draws, so the same boxes, partners and images for a seed) that
    also cuts the box out of the token targets ``[B, S*S, C]``: a token whose patch lies inside the
    box takes its partner's token target, one outside keeps its own, and one the box's edge crosses
    mixes the two by the share of its patch inside the box (:func:`token_cover`). The class-token
    targets mix by area as in :func:`cutmix_batch`. Token targets in compact form
    (:class:`CompactTargets`, ``[B, S*S, m]``) mix by :func:`relabel_dali.ops.compact.mix`, equal to
    the dense mix bit for bit. Returns ``(images, targets, token_targets, lam)``."""
    _check(images, targets, prob, beta)
    compact = isinstance(token_targets, CompactTargets)
    shape = tuple(token_targets.ids.shape if compact else token_targets.shape)
    size = math.isqrt(shape[1]) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != images.shape[0] or size * size != shape[1]:
        raise ValueError(f"token_targets: expected [B={images.shape[0]}, S*S, {'m' if compact else 'num_classes'}]"
                         f"{' (compact)' if compact else ''}, got shape {shape}")
    drawn = _draw(images, prob, beta, generator)
    if drawn is None:
        return images, targets, token_targets, 1.0
    box, perm = drawn
    if compact:
        cover = token_cover(box, *images.shape[-2:], size, device=token_targets.values.device).view(1, -1)
        token_targets = compact_mix(token_targets, token_targets.index(perm), cover)
    else:
        cover = token_cover(box, *images.shape[-2:], size, device=token_targets.device).view(1, -1, 1)
        token_targets = (1.0 - cover) * token_targets + cover * token_targets[perm]
    images, targets, lam = _paste(images, targets, box, perm)
    return images, targets, token_targets, lam
