"""Process-group setup from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK).

A plain ``python train.py`` is a world of one. Nothing here initialises CUDA: DALI refuses to
fork its workers once CUDA is initialised, so the data loaders are built before the model
touches the GPU (see train.py).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank: the data shard this process reads
    world_size: int
    local_rank: int  # the GPU this process drives on its node
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def cuda_present() -> bool:
    """Asks NVML, not the CUDA driver, so the check itself does not initialise CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"compute.device {requested!r} is not one of auto, cuda, cpu")
    if requested == "cpu" or (requested == "auto" and not cuda_present()):
        return torch.device("cpu")
    if not cuda_present():
        raise RuntimeError("compute.device is 'cuda' but no CUDA GPU is visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    env = DistEnv(rank, world_size, local_rank, resolve_device(device, local_rank))
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main(env: DistEnv, write, *errors: type[BaseException]) -> None:
    """Runs ``write()`` on rank 0 only; one of ``errors`` that it raises is raised on every rank.
    A failure only rank 0 can see (its output folder is full) thus stops all ranks together,
    instead of leaving the others waiting at the next collective."""
    failure = None
    if env.is_main:
        try:
            write()
        except errors as error:
            failure = error
    if dist.is_available() and dist.is_initialized():
        box = [failure]
        dist.broadcast_object_list(box, src=0)  # errors pickle (DiskFullError keeps its fields)
        failure = box[0]
    if failure is not None:
        raise failure


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
