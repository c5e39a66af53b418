"""The epoch order: per-epoch shuffle and global-rank sharding, pure functions of their arguments.

Every rank computes the same thing from the same arguments, so ranks never need to talk: the
dataset order of epoch ``e`` is a permutation seeded by ``(seed, e)``; the permuted list is cut to
a multiple of ``world_size * batch_size`` and rank ``r`` takes every ``world_size``-th entry
starting at ``r``. The cut follows ``remainder``:

* ``"pad"`` (training default): wrap around to the start of the permutation, like
  ``DistributedSampler``: every sample is seen each epoch, a few twice;
* ``"drop"``: drop the last incomplete global batch: every sample at most once;
* ``"mask"`` (validation): pad with slots whose sample index is ``-1`` (and label ``-1``), so every
  sample is seen exactly once across ranks and padded slots can be masked out.

DALI drops a partial last batch, so every rank's epoch is a whole number of batches, the same on
all ranks (uneven batch counts hang DDP).
"""
from __future__ import annotations

import numpy as np

REMAINDER_POLICIES = ("pad", "drop", "mask")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_slots(order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
               remainder: str) -> np.ndarray:
    """This rank's slice of an epoch order (dataset indices, ``-1`` for masked padding)."""
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder {remainder!r}: expected one of {REMAINDER_POLICIES}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    step = world_size * batch_size
    n = len(order)
    if remainder == "drop":
        total = n // step * step
        if total == 0:
            raise ValueError(f"{n} samples make no full global batch of {world_size} x {batch_size} "
                             f"(remainder='drop')")
        order = order[:total]
    else:
        total = -(-n // step) * step
        if remainder == "pad":
            order = np.resize(order, total)  # wraps around
        else:
            order = np.concatenate([order, np.full(total - n, -1, dtype=order.dtype)])
    return order[rank::world_size]


def rank_length(num_samples: int, *, world_size: int, batch_size: int, remainder: str) -> int:
    """Samples per epoch on each rank (a multiple of the batch size), without building the order."""
    step = world_size * batch_size
    total = num_samples // step * step if remainder == "drop" else -(-num_samples // step) * step
    return total // world_size


