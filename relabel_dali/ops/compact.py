"""Compact token targets: a softmax target stored as its present classes and one shared rest value.

Under the softmax that ends LabelPooling every class absent from a token's pooled window has logit
0, so all of them share one probability, ``1 / Z``. A token's target is therefore fully given by
the values of the classes its window touches and that one number: ``m`` entries per token instead
of ``C``. Dense token targets at 14 x 14 tokens, 1000 classes and batch 128 are 100 MB of float32;
the compact form of real-looking maps is a few percent of that (docs/TRAINING.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompactTargets:
    """``ids [B, T, m]`` integer class ids, ``-1`` where a token has fewer than ``m`` classes;
    ``values [B, T, m]`` float, each id's probability (0 at the padding); ``rest [B, T]`` the
    probability of every class not among a token's ids. ``m`` is the largest number of distinct
    classes any token of the batch touches; the ids of a token are distinct."""

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
