"""Host-to-device copies that neither make the host wait for the GPU nor read memory that its
owner may reuse.

A ``non_blocking`` copy runs when the GPU reaches it in its stream, which may be after the host has
prepared the next batch; its source must stay untouched until then. Torch's pinned-memory allocator
guarantees that for the blocks it hands out (it records the copy and reuses a block only after the
copy has run), but not for pinned memory owned by someone else, such as the host outputs that DALI
lends through DLPack and recycles for later batches. A plain copy from pageable memory is safe but
blocks the host until the GPU has caught up. So the data go through a pinned tensor of torch's own:
one host memcpy of a few bytes, then an asynchronous copy.
"""
from __future__ import annotations

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) as a tensor on ``device`` that shares memory with nothing: on a CUDA
    device an asynchronous copy out of torch-owned pinned memory, on the CPU a clone."""
    device = torch.device(device)
    if tensor.device.type != "cpu":
        raise ValueError(f"host_to_device: expected a host tensor, got one on {tensor.device}")
    if device.type == "cpu":
        return tensor.clone()
    # Not tensor.pin_memory(): it returns a tensor that is already pinned (DALI's) as it is.
    staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staging.copy_(tensor)
    return staging.to(device, non_blocking=True)
