"""Models: any torchvision architecture by name, randomly initialised, BN set from the config."""
from __future__ import annotations

import torch
import torchvision

from .config import Config

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def build_model(cfg: Config) -> torch.nn.Module:
    """``model.arch`` from torchvision.models with ``weights=None`` and ``data.num_classes`` outputs."""
    arch = cfg.model.arch
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        import difflib

        close = difflib.get_close_matches(arch, available, n=3)
        raise ValueError(f"model.arch {arch!r} is not a torchvision classification model"
                         + (f"; closest: {close}" if close else ""))
    model = torchvision.models.get_model(arch, weights=None, num_classes=cfg.data.num_classes,
                                         **dict(cfg.model.kwargs))
    set_batchnorm(model, momentum=cfg.optim.bn.momentum, eps=cfg.optim.bn.eps)
    return model


def set_batchnorm(model: torch.nn.Module, *, momentum: float, eps: float) -> None:
    """``momentum`` is the running average's decay (0.9 keeps 90% of the old value), as the
    official config states it; torch's BatchNorm momentum is the weight of the new batch."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0 - momentum
            module.eps = eps


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """DataParallel/DDP checkpoints name parameters 'module.<name>'."""
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
