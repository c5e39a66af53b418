"""What each process trained on, written down (``util.trace_ranks``).

After every epoch each rank writes ``<output_dir>/ranks/epoch-EEEE-rank-RRRR.json``: the dataset
indices of the samples it consumed in that epoch, in order, and a SHA-256 of its parameters. The
files answer, after the fact, what a multi-node run cannot show while it runs: did the ranks read
disjoint parts of the data that together cover the epoch, and did every node end the epoch with
the same weights. Off by default: the index lists grow with the data set.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch

from relabel_dali.atomic import atomic_write_bytes
from relabel_dali.train.distributed import DistEnv

FOLDER = "ranks"


def trace_path(out_dir: str | os.PathLike, epoch: int, rank: int) -> Path:
    return Path(out_dir) / FOLDER / f"epoch-{epoch:04d}-rank-{rank:04d}.json"


def parameters_sha256(model: torch.nn.Module) -> str:
    """Of every parameter's name, dtype, shape and bytes, in the model's order (BatchNorm running
    statistics are buffers, not parameters: under DDP they follow each rank's own batches)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        values = parameter.detach().cpu().contiguous()
        digest.update(f"{name} {values.dtype} {tuple(values.shape)}\n".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Recording:
    """The training loader, noting the ``indices`` of every batch it hands out."""

    def __init__(self, loader, indices: list[int]):
        self.loader, self.indices = loader, indices

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.indices.extend(batch["indices"].view(-1).tolist())
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


class RankTrace:
    def __init__(self, out_dir: str | os.PathLike, env: DistEnv):
        self.out_dir, self.env = Path(out_dir), env
        self.indices: list[int] = []

    def recording(self, loader):
        """``loader`` for one epoch, recording what it yields."""
        self.indices = []
        return _Recording(loader, self.indices)

    def epoch_done(self, epoch: int, model: torch.nn.Module) -> Path:
        """Writes epoch ``epoch``'s record (0-based, as the loader counts) for this rank."""
        group_rank = os.environ.get("GROUP_RANK")  # torchrun's node rank
        record = {"epoch": epoch, "rank": self.env.rank, "world_size": self.env.world_size,
                  "local_rank": self.env.local_rank, "node_rank": None if group_rank is None else int(group_rank),
                  "host": socket.gethostname(), "samples": len(self.indices),
                  "params_sha256": parameters_sha256(model), "indices": self.indices}
        path = trace_path(self.out_dir, epoch, self.env.rank)
        atomic_write_bytes(path, (json.dumps(record) + "\n").encode())
        return path
