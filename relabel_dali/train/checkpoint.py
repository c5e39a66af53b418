"""Checkpoints: atomic writes, everything needed to continue a run exactly, and weight loading
that also reads the official ReLabel checkpoints ('state_dict', 'module.' prefixes).

The last two checkpoints of a run are kept (``checkpoint-last.pth`` and
``checkpoint-previous.pth``): ``--resume auto`` checks the last one's zip structure and CRCs and,
when it is damaged (a truncated copy, a disk that filled outside our atomic write, a flipped byte),
resumes from the previous one and says so.
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

from relabel_dali.atomic import atomic_open
from relabel_dali.train.models import strip_prefix

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"
PREVIOUS_NAME = "checkpoint-previous.pth"
FORMAT = "relabel_dali.train.checkpoint"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """A run killed while saving keeps the previous checkpoint."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``save_keeping_previous`` moves the checkpoint it replaces."""
    path = Path(path)
    return path.with_name(PREVIOUS_NAME if path.name == LAST_NAME else f"{path.stem}-previous{path.suffix}")


def save_keeping_previous(obj, path: str | os.PathLike) -> None:
    """Saves atomically after moving the current ``path`` to ``previous_path(path)``: a checkpoint
    damaged later still leaves the one before it. A kill between the two steps leaves only the
    previous checkpoint, which ``resolve_resume('auto')`` then picks."""
    path = Path(path)
    if path.is_file():
        os.replace(path, previous_path(path))
    atomic_torch_save(obj, path)


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
