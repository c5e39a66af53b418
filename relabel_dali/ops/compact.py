"""Compact token targets: a softmax target stored as its present classes and one shared rest value.

Under the softmax that ends LabelPooling every class absent from a token's pooled window has logit
0, so all of them share one probability, ``1 / Z``. A token's target is therefore fully given by
the values of the classes its window touches and that one number: ``m`` entries per token instead
of ``C``. Dense token targets at 14 x 14 tokens, 1000 classes and batch 128 are 100 MB of float32;
the compact form of real maps is 5-7 % of that (docs/TRAINING.md). The operator writes it
(``fn.label_pool(..., compact=True)``, ``pool_labels(..., compact=True)``; docs/OPERATOR.md), the
training loader carries it, :func:`mix` is CutMix's mix of two of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompactTargets:
    """``ids [B, T, m]`` integer class ids, ``-1`` where a token has fewer than ``m`` classes;
    ``values [B, T, m]`` float, each id's probability (0 at the padding); ``rest [B, T]`` the
    probability of every class not among a token's ids (0 where a token holds every class). ``m``
    is the slots per token: by default the most classes any token of the batch holds (the
    operator's ``compact_slots`` may fix it); the ids of a token are distinct and ascending."""

    ids: torch.Tensor
    values: torch.Tensor
    rest: torch.Tensor

    def __post_init__(self):
        if self.ids.shape != self.values.shape or self.ids.shape[:-1] != self.rest.shape:
            raise ValueError(f"ids {tuple(self.ids.shape)}, values {tuple(self.values.shape)} and rest "
                             f"{tuple(self.rest.shape)}: expected [..., m], [..., m] and [...]")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"ids: dtype {self.ids.dtype}, expected an integer dtype")

    def to_dense(self, num_classes: int) -> torch.Tensor:
        """The dense targets ``[..., num_classes]``: ``rest`` everywhere, each id's value at its id."""
        dense = self.rest.unsqueeze(-1).expand(*self.rest.shape, num_classes + 1).clone()
        slots = torch.where(self.ids >= 0, self.ids.long(), num_classes)  # padding goes to a spare column
        dense.scatter_(-1, slots, self.values.to(dense.dtype))
        return dense[..., :num_classes].contiguous()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.values, self.rest))

    def smooth(self, smoothing: float, num_classes: int) -> "CompactTargets":
        """Label smoothing ``t (1 - s) + s / C`` of the dense targets, in compact form: the same float32
        operations on each id's value and on ``rest`` (padding stays 0; ``rest`` stays 0 where a token
        holds every class)."""
        if smoothing == 0.0:
            return self
        present = self.ids >= 0
        values = torch.where(present, self.values * (1.0 - smoothing) + smoothing / num_classes, 0.0)
        left = present.sum(-1) < num_classes
        rest = torch.where(left, self.rest * (1.0 - smoothing) + smoothing / num_classes, 0.0)
        return CompactTargets(self.ids, values.to(self.values.dtype), rest.to(self.rest.dtype))

    def index(self, rows) -> "CompactTargets":
        """The targets of the samples ``rows`` (a permutation, say) along the first dimension."""
        return CompactTargets(self.ids[rows], self.values[rows], self.rest[rows])

    def to(self, device) -> "CompactTargets":
        return CompactTargets(self.ids.to(device), self.values.to(device), self.rest.to(device))


def mix(a: CompactTargets, b: CompactTargets, share: torch.Tensor) -> CompactTargets:
    """``(1 - share) * a + share * b`` of the dense targets, in compact form and with the dense mix's
    float32 operations, so ``mix(a, b, s).to_dense(C)`` equals the dense mix bit for bit (finite
    targets). ``share`` broadcasts against ``a.rest`` (CutMix: each token's share of its patch pasted from
    the partner). A token holds the union of both ids, except where its share is 0 (a's ids alone) or 1
    (b's alone); ``m`` is the most any token of the result holds."""
    if a.ids.shape[:-1] != b.ids.shape[:-1]:
        raise ValueError(f"mixing compact targets of shapes {tuple(a.ids.shape)} and {tuple(b.ids.shape)}: "
                         "expected the same dimensions before the last")
    share = torch.as_tensor(share, dtype=a.values.dtype, device=a.values.device).expand_as(a.rest)
    keep = 1.0 - share
    ma = a.ids.shape[-1]
    ids = torch.cat([torch.where((share == 1).unsqueeze(-1), -1, a.ids.int()),
                     torch.where((share == 0).unsqueeze(-1), -1, b.ids.int())], -1)
    missing = torch.iinfo(torch.int32).max
    key, order = torch.where(ids < 0, missing, ids).sort(dim=-1, stable=True)  # an id held by both: a's first
    values = torch.cat([a.values, b.values.to(a.values.dtype)], -1).gather(-1, order)
    from_a = order < ma
    same_as_next = key[..., 1:] == key[..., :-1]
    no = torch.zeros_like(key[..., :1], dtype=torch.bool)
    first = (key != missing) & ~torch.cat([no, same_as_next], -1)
    next_same = torch.cat([same_as_next, no], -1)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)
    rest_a, rest_b = a.rest.to(values.dtype).unsqueeze(-1), b.rest.to(values.dtype).unsqueeze(-1)
    value_a = torch.where(from_a, values, rest_a)  # at a first position, a's entry comes first if a has one
    value_b = torch.where(~from_a, values, torch.where(next_same, next_values, rest_b))
    mixed = keep.unsqueeze(-1) * value_a + share.unsqueeze(-1) * value_b
    count = first.sum(-1)
    m = max(int(count.max()), 1) if count.numel() else 1
    slots = torch.sort((~first).to(torch.uint8), dim=-1, stable=True).indices[..., :m]
    valid = torch.arange(m, device=slots.device) < count.unsqueeze(-1)
    return CompactTargets(ids=torch.where(valid, key.gather(-1, slots), -1).to(torch.int32),
                          values=torch.where(valid, mixed.gather(-1, slots), 0.0),
                          rest=keep * a.rest.to(values.dtype) + share * b.rest.to(values.dtype))
