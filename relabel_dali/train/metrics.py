"""Validation metrics: top-1/top-5 and ReaL multi-label accuracy, summed exactly across ranks.

Meters accumulate integer counts, not averages, so a distributed sum gives the same result as
one process seeing every sample, whatever the per-rank batch sizes.

With ReaL labels (``data.real_labels``), on the images whose entry is not empty:

* ``real_top1``: the top-1 class is one of the image's acceptable classes (Beyer et al., 2020);
* ``real_label_top1``: the top-1 class is the image's own (folder) label, on the same images;
* ``real_recall2``: of the listed classes, the share found among the two highest logits (every
  listed class of every counted image is one trial). For the demo's two-object images it is the
  share of objects the model names in its top two.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """int64 [len(ks)]: how many rows have their label among the k highest logits."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return torch.stack([hits[:, :min(k, max_k)].any(dim=1).sum() for k in ks]).long()


def load_real_labels(path: str | Path) -> list[list[int]]:
    """A ReaL JSON: a list with, per validation image, the list of its acceptable class ids."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"data.real_labels: {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"data.real_labels: {path} is not valid JSON ({error})") from None
    if not isinstance(data, list):
        raise ValueError(f"data.real_labels: {path} holds a {type(data).__name__}, expected a list of lists")
    for position, entry in enumerate(data):
        if not isinstance(entry, list) or not all(isinstance(c, int) and c >= 0 for c in entry):
            raise ValueError(f"data.real_labels: {path} entry {position} is {entry!r}, "
                             "expected a list of non-negative class ids")
    return data


def real_positions(val_keys: list[str]) -> list[int]:
    """Validation sample keys (``wnid/ILSVRC2012_val_00000001``) -> their ReaL entry: the rank of
    the file name (folder ignored) in sorted order, which is the order of the official list."""
    names = [PurePosixPath(key).name for key in val_keys]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"validation file name {duplicate!r} occurs in two folders: ReaL entries "
                         "are matched by file name, which must be unique")
    order = sorted(range(len(names)), key=names.__getitem__)
    positions = [0] * len(names)
    for rank, sample in enumerate(order):
        positions[sample] = rank
    return positions


class RealLabels:
    """ReaL entries as a padded id table, looked up per batch by validation sample index."""

    def __init__(self, entries: list[list[int]], val_keys: list[str]):
        if len(entries) != len(val_keys):
            raise ValueError(f"data.real_labels has {len(entries)} entries, the validation set "
                             f"{len(val_keys)} images: they must match one to one")
        width = max(1, max(len(entry) for entry in entries))
        table = torch.full((len(entries), width), -1, dtype=torch.long)
        for row, entry in enumerate(entries):
            table[row, :len(entry)] = torch.tensor(entry, dtype=torch.long)
        # Row i of ``by_sample`` is the entry of validation sample i (loader order).
        self.by_sample = table[torch.tensor(real_positions(val_keys), dtype=torch.long)]

    RECALL_K = 2

    def correct(self, logits: torch.Tensor, sample_indices: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [5]: top-1 in the acceptable set, images with a non-empty set, top-1 equal to
        ``labels`` on those images (0 without labels), listed classes among the top RECALL_K,
        listed classes."""
        rows = self.by_sample[sample_indices.cpu().long()].to(logits.device)
        listed = rows >= 0
        counted = listed[:, 0]
        top = logits.topk(min(self.RECALL_K, logits.shape[1]), dim=1).indices
        hits = (rows == top[:, :1]).any(dim=1) & counted
        found = (rows.unsqueeze(2) == top.unsqueeze(1)).any(dim=2) & listed
        own = torch.zeros((), dtype=torch.long, device=logits.device)
        if labels is not None:
            own = ((top[:, 0] == labels.to(logits.device)) & counted).sum()
        return torch.stack([hits.sum(), counted.sum(), own, found.sum(), listed.sum()]).long()


class AccuracyMeter:
    """Counts over a validation pass; ``summary`` sums them across ranks when distributed."""

    def __init__(self, device: torch.device | str = "cpu", real: RealLabels | None = None):
        self.real = real
        # correct@1, correct@5, samples, then RealLabels.correct's five counts
        self.counts = torch.zeros(8, dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> None:
        """``valid`` masks padding samples so each validation image is counted exactly once."""
        if valid is not None:
            keep = valid.to(logits.device).bool().view(-1)
            logits, labels = logits[keep], labels.to(logits.device)[keep]
            if indices is not None:
                indices = indices.to(keep.device)[keep]
        labels = labels.to(logits.device)
        self.counts[:2] += topk_correct(logits, labels).to(self.counts.device)
        self.counts[2] += labels.numel()
        if self.real is not None:
            if indices is None:
                raise ValueError("ReaL accuracy needs the validation sample indices of each batch")
            self.counts[3:] += self.real.correct(logits, indices, labels).to(self.counts.device)

    def summary(self) -> dict[str, float]:
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct1, correct5, samples, real_correct, real_counted, own, found, listed = (int(c) for c in counts)
        result = {"top1": 100.0 * correct1 / max(1, samples), "top5": 100.0 * correct5 / max(1, samples),
                  "samples": samples}
        if self.real is not None:
            result["real_top1"] = 100.0 * real_correct / max(1, real_counted)
            result["real_samples"] = real_counted
            result["real_label_top1"] = 100.0 * own / max(1, real_counted)
            result["real_recall2"] = 100.0 * found / max(1, listed)
        return result
