"""Literal LabelPooling as the official ReLabel code computes it: dense scatter, roi_align, softmax.

For tests, benchmarks and tools/gpu_check (and the official-style comparison loader): it builds
the dense [N, C, H, W] map the native operator avoids, so it is slow and memory hungry, and it
shares no code with the operator. Every function runs on the device of its inputs.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from relabel_dali.ops.pooling import MODES  # the mode names, declared once (with their codes)


def dense_label_maps(scores: torch.Tensor, class_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatters top-k maps [N, k, H, W] into dense float32 maps [N, C, H, W]; absent classes are 0."""
    n, _, h, w = scores.shape
    dense = torch.zeros(n, num_classes, h, w, dtype=torch.float32, device=scores.device)
    return dense.scatter_(1, class_ids.long(), scores.to(torch.float32))


def official_label_pooling(official_maps: torch.Tensor, coords: torch.Tensor, num_classes: int = 1000) -> torch.Tensor:
    """The official get_labelmaps + get_relabel on maps as stored in official ``.pt`` files.

    ``official_maps`` [N, 2, k, A, B] (``[:, 0]`` scores, ``[:, 1]`` class ids as floats); ``coords``
    [N, 4] = (top/H, left/W, bottom/H, right/W), passed to roi_align as (x1, y1, x2, y2) after scaling by
    the maps' last dimension and shifting by half a cell, exactly as the official code does.
    """
    n = official_maps.shape[0]
    device = official_maps.device
    dense = torch.zeros(n, num_classes, official_maps.shape[3], official_maps.shape[4], device=device)
    for sample_map, sample_topk in zip(dense, official_maps):
        sample_map.scatter_(0, sample_topk[1].long(), sample_topk[0])
    rois = torch.cat([torch.arange(n, device=device).view(n, 1).float(),
                      coords.float() * dense.size(3) - 0.5], 1)
    pooled = roi_align(input=dense, boxes=rois, output_size=(1, 1))
    return torch.softmax(pooled.reshape(n, num_classes), 1)


def reference_pool(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, num_classes: int = 1000,
                   mode: str = "softmax") -> torch.Tensor:
    """Pools canonical [N, k, y, x] maps over boxes (x0, y0, x1, y1) -> [N, C] float32, any of the modes."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {tuple(MODES)}")
    dense = dense_label_maps(scores, class_ids, num_classes)
    n, _, h, w = dense.shape
    if mode.startswith("global"):
        pooled = dense.mean(dim=(2, 3))
    else:
        b = boxes.to(torch.float32)
        rois = torch.stack([torch.arange(n, dtype=torch.float32, device=b.device), b[:, 0] * w - 0.5,
                            b[:, 1] * h - 0.5, b[:, 2] * w - 0.5, b[:, 3] * h - 0.5], 1)
        pooled = roi_align(dense, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1,
                           aligned=False).reshape(n, num_classes)
    if mode.endswith("argmax"):
        return torch.nn.functional.one_hot(pooled.argmax(1), num_classes).to(torch.float32)
    return torch.softmax(pooled, 1)


def clear_top2(pooled: torch.Tensor, rel_gap: float = 1e-6) -> torch.Tensor:
    """Rows of pooled class scores [N, C] (either softmax mode's output) whose best value beats the
    second best by more than float rounding, ``rel_gap`` of the best. There every correct argmax
    agrees; on near-ties the summation order (roi_align's against the native backends' exact sums)
    may pick either class."""
    if pooled.shape[1] == 1:
        return torch.ones(len(pooled), dtype=torch.bool, device=pooled.device)
    top2 = pooled.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > rel_gap * top2[:, 0]


def random_topk_maps(n: int, k: int, h: int, w: int, num_classes: int, generator: torch.Generator,
                     classes_per_image: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k maps like an annotator's: scores [n, k, h, w] float32 in (0, 1), sorted descending
    per cell, class ids int64 distinct within each cell. ``classes_per_image`` draws each image's ids
    from that many classes (real maps concentrate on a few), else from all ``num_classes``."""
    pool = classes_per_image or num_classes
    if k > pool:
        raise ValueError(f"k = {k} distinct ids per cell need at least {k} classes, got {pool}")
    # Distinct ids per cell without a per-cell permutation: a random start plus k strictly increasing
    # offsets whose total stays below the pool size, taken modulo the pool.
    start = torch.randint(0, pool, (n, 1, h, w), generator=generator)
    steps = torch.randint(1, max(pool // k, 1) + 1, (n, k, h, w), generator=generator)
    steps[:, 0] = 0
    slots = (start + steps.cumsum(1)) % pool
    if classes_per_image:
        palette = torch.stack([torch.randperm(num_classes, generator=generator)[:pool] for _ in range(n)])
        class_ids = torch.gather(palette, 1, slots.reshape(n, -1)).reshape(n, k, h, w)
    else:
        class_ids = slots
    scores = torch.rand(n, k, h, w, generator=generator).sort(dim=1, descending=True).values
    return scores.contiguous(), class_ids.contiguous()


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop boxes (x0, y0, x1, y1) in [0, 1], mixing in the edge cases: boxes touching the
    borders, boxes thinner than a cell of a 15-cell map, and the whole image."""
    lo = torch.rand(n, 2, generator=generator)
    hi = lo + torch.rand(n, 2, generator=generator) * (1 - lo)
    kind = torch.randint(0, 8, (n, 2), generator=generator)
    lo = torch.where(kind == 0, torch.zeros_like(lo), lo)  # touching the top/left border
    hi = torch.where(kind == 1, torch.ones_like(hi), hi)  # touching the bottom/right border
    hi = torch.where(kind == 2, (lo + 0.01).clamp(max=1.0), hi)  # thinner than one cell
    whole = torch.rand(n, generator=generator) < 0.05
    lo[whole], hi[whole] = 0.0, 1.0
    thin_at_end = hi <= lo
    lo = torch.where(thin_at_end, (hi - 0.01).clamp(min=0.0), lo)
    hi = torch.where(hi <= lo, lo + 0.01, hi)
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], 1).to(torch.float32)
