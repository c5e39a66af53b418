"""Models: any torchvision architecture by name, or any timm model as ``timm:NAME``; randomly
initialised, BN set from the config."""
from __future__ import annotations

import difflib

import torch
import torchvision

from relabel_dali.config import Config, ConfigError

TIMM_PREFIX = "timm:"


def build_model(cfg: Config) -> torch.nn.Module:
    """``model.arch`` from torchvision.models with ``weights=None``, or ``timm:NAME`` from timm with
    ``pretrained=False``; ``data.num_classes`` outputs, ``model.kwargs`` to the constructor."""
    arch, kwargs = cfg.model.arch, dict(cfg.model.kwargs)
    if arch.startswith(TIMM_PREFIX):
        model = build_timm_model(arch.removeprefix(TIMM_PREFIX), cfg.data.num_classes, kwargs,
                                 image_size=cfg.data.image_size)
    else:
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            close = difflib.get_close_matches(arch, available, n=3)
            raise ConfigError(f"model.arch {arch!r} is not a torchvision classification model (timm models are "
                             f"'timm:NAME')" + (f"; closest: {close}" if close else ""))
        model = torchvision.models.get_model(arch, weights=None, num_classes=cfg.data.num_classes, **kwargs)
    set_batchnorm(model, momentum=cfg.optim.bn.momentum, eps=cfg.optim.bn.eps)
    return model


def build_timm_model(name: str, num_classes: int, kwargs: dict, image_size: int | None = None) -> torch.nn.Module:
    """A model whose input size is fixed when it is built (a ViT's position embeddings) is built for
    ``image_size`` unless ``kwargs`` set ``img_size``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model.arch 'timm:{name}' is not a timm model" + (f"; closest: {close}" if close else ""))
    for reserved in ("pretrained", "num_classes"):
        if reserved in kwargs:
            raise ConfigError(f"model.kwargs.{reserved}: set by the trainer (weights are random; the class count "
                              "is data.num_classes)")
    config = timm.models.get_pretrained_cfg(name)
    if image_size is not None and config is not None and config.fixed_input_size:
        kwargs = {"img_size": image_size, **kwargs}
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as error:  # an argument the model's constructor does not take
        raise ConfigError(f"model.kwargs {kwargs} for timm:{name}: {error}") from None


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
