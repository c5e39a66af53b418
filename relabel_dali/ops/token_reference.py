"""Token targets in Python: LabelPooling to an S x S grid of tokens, as TokenLabeling computes it
and in the image's own geometry. For tests and for checking the native operator against; like
``reference.py`` it builds the dense ``[B, C, H, W]`` map, so it is slow and memory hungry.

Every function returns ``[B, S*S, C]`` (or the compact form of it): token ``r * S + c`` is the
student's patch at row ``r``, column ``c`` of the crop *as the student sees it*, after the flip.
That is the order a ViT's patch tokens take (row-major) and the pairing TokenLabeling's loss makes.

Two geometries (docs/FORMAT.md, "Token targets", states them with the measured difference):

* ``"image"``: the convention of every other stage (docs/ARCHITECTURE.md). Canonical ``[k, y, x]``
  maps, boxes ``(x0, y0, x1, y1)`` normalized to the whole unflipped image, roi_align over
  ``(x0 W - 1/2, y0 H - 1/2, x1 W - 1/2, y1 H - 1/2)``; a mirrored crop reverses the grid's columns
  (the flip happens after the crop). At S = 1 this is ``reference.reference_pool`` exactly.
* ``"tokenlabeling"``: their loader, step by step (:func:`token_label_pool`). Their
  ``generate_label.py`` writes maps rows first (``[k, y, x]``, canonical), but their loader passes
  the crop as ``(top, left, bottom, right)`` to roi_align's ``(x1, y1, x2, y2)`` (ReLabel's code,
  written for maps stored the other way round), so token ``(r, c)`` reads the map at the crop
  point of token ``(c, r)`` reflected in the image's main diagonal; with a flip (of image and map,
  before the crop) the reflection is in the anti-diagonal instead. (Exactly so for crops at least
  one map cell wide and high: roi_align with ``aligned=False`` widens thinner ones to one cell to
  the right and below, which no reflection or flip mirrors.)
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from relabel_dali.ops.compact import CompactTargets
from relabel_dali.ops.reference import dense_label_maps

GEOMETRIES = ("image", "tokenlabeling")


def token_label_pool(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, mirror: torch.Tensor,
                     output_size: int, num_classes: int = 1000) -> torch.Tensor:
    """TokenLabeling's loader literally (``tlt/data/label_transforms_factory.py``, ``tlt/data/mixup.py``).

    ``scores``/``class_ids`` ``[B, k, H, W]``: the maps in the axis order of their files
    (``generate_label.py``: rows, then columns of the annotator's input); ``boxes [B, 4]`` the crop
    ``(x0, y0, x1, y1)`` normalized to the whole unflipped image; ``mirror [B]`` bool. Returns the
    token targets ``[B, S*S, C]``, S = ``output_size`` (their ``--token-label-size``).
    """
    rois, dense = _tokenlabeling_rois(scores, class_ids, boxes, mirror, num_classes)
    n = dense.shape[0]
    # get_label: at S = 1 the [B, C, 1, 1] pooled map is squeezed to [B, C]; above it, the tokens'
    # [B, C, S*S] follow a separately pooled 1 x 1 class token, and the softmax runs over the classes
    # (dim 1) of that [B, C, 1 + S*S] tensor. Their loss then reads the tokens as [B, S*S, C]. The
    # class token is computed here too: torch's softmax over a non-last dimension rounds differently
    # from one over the last (up to ~1e-5), and this reproduces their numbers bit for bit.
    tokens = roi_align(input=dense, boxes=rois, output_size=(output_size, output_size))
    if output_size == 1:
        return torch.softmax(tokens.reshape(n, num_classes), 1).unsqueeze(1)
    cls = roi_align(input=dense, boxes=rois, output_size=(1, 1))
    both = torch.cat([cls.view(n, num_classes, 1), tokens.view(n, num_classes, -1)], dim=2)
    return torch.softmax(both, 1)[:, :, 1:].transpose(1, 2).contiguous()


def _tokenlabeling_rois(scores, class_ids, boxes, mirror, num_classes) -> tuple[torch.Tensor, torch.Tensor]:
    """(roi_align's boxes, the dense map flipped where mirrored), as their loader makes them."""
    # get_featuremaps: the top-k scattered into zeros.
    dense = dense_label_maps(scores, class_ids, num_classes)
    n = dense.shape[0]
    mirror = torch.as_tensor(mirror, dtype=torch.bool, device=dense.device).reshape(n)
    # RandomHorizontalFlipWithLabel, before the crop: hflip(img) and label.flip(3), the map's last axis.
    dense = torch.where(mirror.view(n, 1, 1, 1), dense.flip(3), dense)
    # RandomResizedCropAndInterpolationWithCoords draws (i, j, h, w) on the flipped image and keeps
    # (i / H, j / W, h / H, w / W); get_labelmaps_with_coords adds the first pair to the second:
    # (top, left, bottom, right), normalized to the flipped image.
    b = boxes.to(torch.float32)
    left = torch.where(mirror, 1 - b[:, 2], b[:, 0])
    right = torch.where(mirror, 1 - b[:, 0], b[:, 2])
    coords = torch.stack([b[:, 1], left, b[:, 3], right], 1)
    # get_label: those four numbers scaled by the map's last dimension, minus half a cell, are
    # roi_align's (x1, y1, x2, y2); sampling_ratio -1 and aligned=False are roi_align's defaults.
    rois = torch.cat([torch.arange(n, device=dense.device).view(n, 1).float(), coords * dense.size(3) - 0.5], 1)
    return rois, dense


def _tokenlabeling_logits(scores, class_ids, boxes, mirror, output_size, num_classes) -> torch.Tensor:
    rois, dense = _tokenlabeling_rois(scores, class_ids, boxes, mirror, num_classes)
    pooled = roi_align(input=dense, boxes=rois, output_size=(output_size, output_size))
    return pooled.reshape(dense.shape[0], num_classes, output_size * output_size).transpose(1, 2)


def _image_logits(scores, class_ids, boxes, mirror, output_size, num_classes) -> torch.Tensor:
    dense = dense_label_maps(scores, class_ids, num_classes)
    n, _, h, w = dense.shape
    b = boxes.to(torch.float32)
    # The rois exactly as reference_pool builds them, so that S = 1 gives its numbers bit for bit.
    rois = torch.stack([torch.arange(n, dtype=torch.float32, device=b.device), b[:, 0] * w - 0.5,
                        b[:, 1] * h - 0.5, b[:, 2] * w - 0.5, b[:, 3] * h - 0.5], 1)
    pooled = roi_align(dense, rois, output_size=output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    mirror = torch.as_tensor(mirror, dtype=torch.bool, device=dense.device).reshape(n)
    pooled = torch.where(mirror.view(n, 1, 1, 1), pooled.flip(3), pooled)  # the student sees the crop flipped
    return pooled.reshape(n, num_classes, output_size * output_size).transpose(1, 2)


def _check(output_size: int, geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry {geometry!r}: expected one of {GEOMETRIES}")
    if output_size < 1:
        raise ValueError(f"output_size {output_size}: expected a positive number of tokens per side")


def token_logits(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, mirror: torch.Tensor,
                 output_size: int, num_classes: int = 1000, geometry: str = "image") -> torch.Tensor:
    """The pooled logits ``[B, S*S, C]`` before the softmax (absent classes 0) in either geometry."""
    _check(output_size, geometry)
    pool = _image_logits if geometry == "image" else _tokenlabeling_logits
    return pool(scores, class_ids, boxes, mirror, output_size, num_classes)


def pool_tokens_reference(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor,
                          mirror: torch.Tensor, output_size: int, num_classes: int = 1000,
                          geometry: str = "image", compact: bool = False,
                          compact_slots: int | None = None) -> torch.Tensor | CompactTargets:
    """Token targets ``[B, S*S, C]`` of canonical ``[B, k, y, x]`` maps over boxes ``(x0, y0, x1, y1)``
    (normalized to the whole unflipped image) and flips ``mirror [B]``: the reference the native
    operator is checked against. ``geometry="tokenlabeling"`` is :func:`token_label_pool` (their
    files are canonical as they stand). ``compact=True`` gives :func:`compact_token_targets` (with
    ``compact_slots`` as its ``slots``), as ``pool_labels(compact=True)`` takes the options."""
    _check(output_size, geometry)
    if compact:
        return compact_token_targets(scores, class_ids, boxes, mirror, output_size, num_classes, geometry,
                                     slots=compact_slots)
    if compact_slots is not None:
        raise ValueError(f"compact_slots {compact_slots!r} needs compact=True")
    if geometry == "tokenlabeling":
        return token_label_pool(scores, class_ids, boxes, mirror, output_size, num_classes)
    return torch.softmax(token_logits(scores, class_ids, boxes, mirror, output_size, num_classes, geometry), -1)


def compact_token_targets(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor,
                          mirror: torch.Tensor, output_size: int, num_classes: int = 1000,
                          geometry: str = "image", slots: int | None = None) -> CompactTargets:
    """:func:`pool_tokens_reference` in compact form: per token the classes its pooled window
    touches (ascending ids), their probabilities, and the probability every other class shares.
    A class is touched when a cell holding it in its top-k gets a positive weight from one of the
    window's sampling points; every other class pools to logit exactly 0. ``m`` is ``slots``, or the
    most classes any token touches (at least 1); a token touching more than ``slots`` raises."""
    logits = token_logits(scores, class_ids, boxes, mirror, output_size, num_classes, geometry)
    touched = token_logits(torch.ones_like(scores, dtype=torch.float32), class_ids, boxes, mirror, output_size,
                           num_classes, geometry) > 0
    count = touched.sum(-1)
    m = max(int(count.max()), 1) if count.numel() else 1
    if slots is not None:
        if m > slots:
            b, t = (int(i) for i in torch.nonzero(count > slots)[0])
            raise ValueError(f"sample {b}, token {t}: {int(count[b, t])} classes, more than the {slots} compact slots")
        m = slots
    # A stable sort puts the touched classes first, in ascending id order.
    order = torch.sort(touched.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :m]
    if order.shape[-1] < m:  # more slots than classes
        order = torch.cat([order, order.new_zeros(*order.shape[:-1], m - order.shape[-1])], -1)
    valid = torch.arange(m, device=logits.device) < count.unsqueeze(-1)
    log_z = torch.logsumexp(logits, -1, keepdim=True)
    values = torch.exp(logits.gather(-1, order) - log_z)
    # rest: 0 where a token touches every class (no class is left to have it), as the operator writes
    rest = torch.where(count < num_classes, torch.exp(-log_z).squeeze(-1), 0.0)
    return CompactTargets(ids=torch.where(valid, order, -1).to(torch.int32),
                          values=torch.where(valid, values, 0.0), rest=rest)


def object_topk_maps(n: int, k: int, size: int, num_classes: int, generator: torch.Generator,
                     objects: int = 3, distractors: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k maps that look like an annotator's: a few objects, each a box of cells where its class
    scores high (falling off over a cell at the edges), on a background of a dozen weak classes
    with per-cell noise. Scores ``[n, k, size, size]`` float32 sorted per cell, ids int64."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    scores, ids = [], []
    for _ in range(n):
        classes = torch.randperm(num_classes, generator=generator)[:objects + distractors]
        logits = torch.empty(objects + distractors, size, size)
        for i in range(objects):
            lo = torch.rand(2, generator=generator) * 0.7
            hi = lo + 0.15 + torch.rand(2, generator=generator) * (1 - lo - 0.15)
            inside_x = ((centres - lo[0]).clamp(max=0) + (hi[0] - centres).clamp(max=0)) * size  # <= 0 outside
            inside_y = ((centres - lo[1]).clamp(max=0) + (hi[1] - centres).clamp(max=0)) * size
            falloff = (1 + inside_y[:, None].clamp(min=-1)) * (1 + inside_x[None, :].clamp(min=-1))
            peak = 6 + 6 * torch.rand(1, generator=generator)
            logits[i] = peak * falloff - 1 + 0.5 * torch.randn(size, size, generator=generator)
        low = 3 * torch.rand(distractors, 1, 1, generator=generator)
        logits[objects:] = low + 0.7 * torch.randn(distractors, size, size, generator=generator)
        top = logits.topk(k, dim=0)
        scores.append(top.values)
        ids.append(classes[top.indices])
    return torch.stack(scores).contiguous(), torch.stack(ids).contiguous()
