"""Literal LabelPooling as the official ReLabel code computes it: dense scatter, roi_align, softmax.

For tests only: it builds the dense [N, C, H, W] map the native operator avoids, so it is slow and
memory hungry, and it shares no code with the operator.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

MODES = ("softmax", "argmax", "global_softmax", "global_argmax")


def dense_label_maps(scores: torch.Tensor, class_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatters top-k maps [N, k, H, W] into dense float32 maps [N, C, H, W]; absent classes are 0."""
    n, _, h, w = scores.shape
    dense = torch.zeros(n, num_classes, h, w, dtype=torch.float32)
    return dense.scatter_(1, class_ids.long(), scores.to(torch.float32))


def official_label_pooling(official_maps: torch.Tensor, coords: torch.Tensor, num_classes: int = 1000) -> torch.Tensor:
    """The official get_labelmaps + get_relabel on maps as stored in official ``.pt`` files.

    ``official_maps`` [N, 2, k, A, B] (``[:, 0]`` scores, ``[:, 1]`` class ids as floats); ``coords``
    [N, 4] = (top/H, left/W, bottom/H, right/W), passed to roi_align as (x1, y1, x2, y2) after scaling by
    the maps' last dimension and shifting by half a cell, exactly as the official code does.
    """
    n = official_maps.shape[0]
    dense = torch.zeros(n, num_classes, official_maps.shape[3], official_maps.shape[4])
    for sample_map, sample_topk in zip(dense, official_maps):
        sample_map.scatter_(0, sample_topk[1].long(), sample_topk[0])
    rois = torch.cat([torch.arange(n).view(n, 1).float(), coords.float() * dense.size(3) - 0.5], 1)
    pooled = roi_align(input=dense, boxes=rois, output_size=(1, 1))
    return torch.softmax(pooled.reshape(n, num_classes), 1)


def reference_pool(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, num_classes: int = 1000,
                   mode: str = "softmax") -> torch.Tensor:
    """Pools canonical [N, k, y, x] maps over boxes (x0, y0, x1, y1) -> [N, C] float32, any of the modes."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    dense = dense_label_maps(scores, class_ids, num_classes)
    n, _, h, w = dense.shape
    if mode.startswith("global"):
        pooled = dense.mean(dim=(2, 3))
    else:
        b = boxes.to(torch.float32)
        rois = torch.stack([torch.arange(n, dtype=torch.float32), b[:, 0] * w - 0.5, b[:, 1] * h - 0.5,
                            b[:, 2] * w - 0.5, b[:, 3] * h - 0.5], 1)
        pooled = roi_align(dense, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1,
                           aligned=False).reshape(n, num_classes)
    if mode.endswith("argmax"):
        return torch.nn.functional.one_hot(pooled.argmax(1), num_classes).to(torch.float32)
    return torch.softmax(pooled, 1)
