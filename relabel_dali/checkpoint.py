"""Checkpoints: atomic writes, everything needed to continue a run exactly, and weight loading
that also reads the official ReLabel checkpoints ('state_dict', 'module.' prefixes)."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_open
from .models import strip_prefix

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"
FORMAT = "relabel_dali.checkpoint"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """A run killed while saving keeps the previous checkpoint."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)


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


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """'auto' -> the run folder's last checkpoint when there is one; a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / LAST_NAME
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return path
