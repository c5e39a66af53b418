"""Checkpoints: atomic writes, everything needed to continue a run exactly, and weight loading
that also reads the official ReLabel checkpoints ('state_dict', 'module.' prefixes).

The last two checkpoints of a run are kept (``checkpoint-last.pth`` and
``checkpoint-previous.pth``): ``--resume auto`` checks the last one's zip structure and CRCs and,
when it is damaged (a truncated copy, a disk that filled outside our atomic write, a flipped byte),
resumes from the previous one and says so. ``checkpoint-best.pth`` is a hard link to the last
checkpoint of the best epoch, so it costs no space while that epoch is one of the last two.

A full disk never leaves half a checkpoint: each save first checks that the file system has room
for the checkpoint (its size estimated from the tensors it holds), and a write that fails anyway
raises :class:`relabel_dali.atomic.DiskFullError` with the temporary file removed.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from relabel_dali.atomic import DiskFullError, atomic_open, describe_bytes, free_bytes
from relabel_dali.train.models import strip_prefix

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"
PREVIOUS_NAME = "checkpoint-previous.pth"
FORMAT = "relabel_dali.train.checkpoint"


# Beyond the tensors' bytes: the zip container (a local header, a central directory entry and up
# to 63 bytes of alignment per tensor), the pickled structure, the RNG states and the config.
MARGIN_BYTES = 1 << 20
PER_TENSOR_BYTES = 512


class _WriteErrors:
    """A file's ``write`` that keeps the OSError it raised: torch's zip writer turns a failed write
    into ``RuntimeError: ... unexpected pos`` and drops the reason (a full disk)."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj, path: str | os.PathLike, size: int | None = None) -> None:
    """A run killed while saving keeps the previous checkpoint; a full disk raises DiskFullError
    naming ``size`` (the estimated size) as the bytes needed."""
    with atomic_open(path, size_hint=size) as handle:
        recorded = _WriteErrors(handle)
        try:
            torch.save(obj, recorded)
        except RuntimeError:
            if recorded.error is not None:
                raise recorded.error from None
            raise


def tensor_bytes(obj) -> tuple[int, int]:
    """(bytes, count) of the tensors in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), 1
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    total = count = 0
    for value in values:
        size, number = tensor_bytes(value)
        total, count = total + size, count + number
    return total, count


def optimizer_slots(optimizer: torch.optim.Optimizer) -> int:
    """Tensors per parameter in the optimizer's state after its first step: SGD's momentum buffer,
    the Adam family's two moments (three with AMSGrad)."""
    defaults = optimizer.defaults
    if "betas" in defaults:
        return 3 if defaults.get("amsgrad") else 2
    return 1 if defaults.get("momentum") else 0


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """An upper estimate of a checkpoint's size: the model's parameters and buffers, the optimizer's
    state (before its first step, the buffers that step will create, plus a step count each), and a
    margin for the container, the RNG states and the config."""
    size, count = tensor_bytes(model.state_dict())
    if optimizer.state:
        state_size, state_count = tensor_bytes(optimizer.state_dict()["state"])
    else:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        slots = optimizer_slots(optimizer)
        state_size = sum(p.numel() * p.element_size() for p in params) * slots + 8 * len(params)
        state_count = (slots + 1) * len(params)
    return size + state_size + (count + state_count) * PER_TENSOR_BYTES + MARGIN_BYTES


def reclaimed_by_save(path: str | os.PathLike) -> int:
    """Bytes a ``save_keeping_previous(path)`` frees before writing: the previous checkpoint, which
    the move of the last one replaces (unless another name, the best checkpoint, still holds it)."""
    path = Path(path)
    previous = previous_path(path)
    if not (path.is_file() and previous.is_file()):
        return 0
    info = previous.stat()
    return info.st_size if info.st_nlink == 1 else 0


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``save_keeping_previous`` moves the checkpoint it replaces."""
    path = Path(path)
    return path.with_name(PREVIOUS_NAME if path.name == LAST_NAME else f"{path.stem}-previous{path.suffix}")


def room_problem(out_dir: str | os.PathLike, checkpoint_bytes: int) -> str | None:
    """None when ``out_dir`` can hold two checkpoints (the last and the previous one) of
    ``checkpoint_bytes``, counting the space of those already there that a run replaces; else what
    is missing, with the sizes."""
    out_dir = Path(out_dir)
    ours = sum(path.stat().st_size for path in (out_dir / LAST_NAME, out_dir / PREVIOUS_NAME)
               if path.is_file() and path.stat().st_nlink == 1)
    free = free_bytes(out_dir)
    if free + ours >= 2 * checkpoint_bytes:
        return None
    replaced = f" (plus {describe_bytes(ours)} in checkpoints the run replaces)" if ours else ""
    return (f"{out_dir}: no room for two checkpoints of about {describe_bytes(checkpoint_bytes)}: "
            f"{describe_bytes(2 * checkpoint_bytes)} needed, {describe_bytes(free)} free{replaced}")


def save_keeping_previous(obj, path: str | os.PathLike, size: int | None = None) -> None:
    """Saves atomically after moving the current ``path`` to ``previous_path(path)``: a checkpoint
    damaged later still leaves the one before it. A kill between the two steps leaves only the
    previous checkpoint, which ``resolve_resume('auto')`` then picks. With ``size`` (the estimated
    size), a file system without room for it raises DiskFullError before anything is moved."""
    path = Path(path)
    if size is not None:
        available = free_bytes(path) + reclaimed_by_save(path)
        if available < size:
            raise DiskFullError(path, size, available, qualifier="about")
    if path.is_file():
        os.replace(path, previous_path(path))
    atomic_torch_save(obj, path, size)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete torch zip checkpoint whose stored CRCs all match (torch.load
    itself does not check them: a flipped byte loads as a silently wrong tensor)."""
    try:
        if not zipfile.is_zipfile(path):
            return "not a complete checkpoint (no zip directory at its end: truncated or not a torch.save file)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"unreadable ({type(error).__name__}: {error})"
    return f"entry {bad} fails its CRC check (damaged file)" if bad else None


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    with atomic_open(path) as handle, open(source, "rb") as original:
        shutil.copyfileobj(original, handle)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """``path`` becomes another name of ``source`` (no space used: checkpoints are never changed in
    place, only replaced), or a copy where the file system has no hard links."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
    except OSError:
        atomic_copy(source, path)
        return
    os.replace(temporary, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our checkpoints hold RNG states and the config (numpy arrays, tuples): not weights-only.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None


def model_state_from(checkpoint: dict, source: str) -> dict:
    """Our 'model', the official 'state_dict', or a bare state dict; 'module.' prefixes removed."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, expected a dict")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return strip_prefix(checkpoint[key])
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return strip_prefix(checkpoint)
    raise ValueError(f"{source}: no 'model' or 'state_dict' entry and not a state dict "
                     f"(top-level keys: {sorted(checkpoint)[:8]})")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Loads weights strictly; a mismatch names the missing and unexpected parameters."""
    checkpoint = load_checkpoint(path)
    state = model_state_from(checkpoint, str(path))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return checkpoint


def resolve_resume(resume: str | None, output_dir: str | os.PathLike, warn=None) -> Path | None:
    """'auto' -> the run folder's last intact checkpoint (last, else previous, saying why through
    ``warn``, default stderr), None when the folder holds neither; a path must exist and be intact."""
    if not resume:
        return None
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    if resume == "auto":
        found = []
        for path in (Path(output_dir) / LAST_NAME, Path(output_dir) / PREVIOUS_NAME):
            if not path.is_file():
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                if found:
                    warn(f"warning: --resume auto: {found[0]}; resuming from the previous checkpoint {path} "
                         f"instead (one save interval of training is repeated)")
                return path
            found.append(f"{path} is {problem}")
        if found:
            raise ValueError(f"--resume auto: no intact checkpoint in {output_dir}: " + "; ".join(found)
                             + ". Move them away to start afresh, or resume from another file with --resume PATH")
        return None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume {resume}: {problem}")
    return path
