"""Test infrastructure: the CUDA kernel's own source run on the host, where no GPU is at hand.

``pool_labels_emulated`` takes :func:`relabel_dali.ops.pooling.pool_labels`' arguments, on CPU tensors,
and runs what ``pool_labels`` runs on CUDA tensors: the same checks, the same C ABI entry arguments and
``label_pool_kernel.cuh``, compiled by g++ over a host emulation of blocks, threads, barriers, warp
shuffles and atomics (``csrc/testing_cuda_emulation.h``). ``seed`` picks the interleaving of the
emulated threads. It is slow (a context switch at every barrier, shuffle and atomic): small batches.
"""
from __future__ import annotations

import ctypes

import torch

from relabel_dali.ops.pooling import _check_inputs, kernel_arguments, output_shape, raise_for_code


def pool_labels_emulated(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, num_classes: int = 1000,
                         mode: str = "softmax", scale=None, offset=None, validate: bool = True, *, seed: int = 0,
                         check_launch: bool = True, output_size: int | None = None, mirror=None) -> torch.Tensor:
    """``pool_labels`` on CPU tensors through the emulated CUDA kernel. ``check_launch=False`` skips the
    entry's launch checks (shape, shared memory), leaving the emulated launch to refuse what a GPU would."""
    from relabel_dali.ops.build import load_emulator

    n, k, h, w = _check_inputs(scores, class_ids, boxes, num_classes, mode, output_size)
    if scores.device.type != "cpu":
        raise ValueError(f"the kernel emulation runs on cpu tensors, got {scores.device}")
    out = torch.empty(output_shape(n, num_classes, output_size), dtype=torch.float32)
    if n == 0:
        return out
    args, _keep = kernel_arguments(scores, class_ids, boxes, num_classes, mode, scale, offset, validate, output_size,
                                   mirror)
    err = ctypes.create_string_buffer(1024)
    code = load_emulator().relabel_pool_emulated(*args, seed, int(check_launch), out.data_ptr(), err, len(err))
    raise_for_code(code, err)
    return out


def kernel_shared_limits() -> tuple[int, int]:
    """(the kernel's static shared memory in bytes, the largest H + W a launch accepts), as both launch
    sites compute them."""
    from relabel_dali.ops.build import load_emulator

    static_bytes, max_axes = ctypes.c_longlong(), ctypes.c_longlong()
    load_emulator().relabel_emulated_limits(ctypes.byref(static_bytes), ctypes.byref(max_axes))
    return static_bytes.value, max_axes.value


def shared_exp(x: torch.Tensor) -> torch.Tensor:
    """exp_rn, the exponential the host and the kernel share, on a float32 tensor."""
    from relabel_dali.ops.build import load_emulator

    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    load_emulator().relabel_emulated_exp(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def order_probe(seed: int) -> float:
    """A block whose result depends on the thread order (a float atomicAdd of 1 and 255 tiny values),
    under the interleaving of ``seed``: distinct seeds should give distinct results."""
    from relabel_dali.ops.build import load_emulator

    return load_emulator().relabel_emulated_order_probe(seed)
