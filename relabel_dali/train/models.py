"""Models: any torchvision architecture by name, or any timm model as ``timm:NAME``; randomly
initialised, BN set from the config; with token labels a timm ViT with an auxiliary per-token head."""
from __future__ import annotations

import difflib
import importlib
import sys
import types

import torch

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
        torchvision = import_torchvision()
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            close = difflib.get_close_matches(arch, available, n=3)
            raise ConfigError(f"model.arch {arch!r} is not a torchvision classification model (timm models are "
                             f"'timm:NAME')" + (f"; closest: {close}" if close else ""))
        model = torchvision.models.get_model(arch, weights=None, num_classes=cfg.data.num_classes, **kwargs)
    set_batchnorm(model, momentum=cfg.optim.bn.momentum, eps=cfg.optim.bn.eps)
    if cfg.data.relabel.token_size:
        model = TokenLabelModel(model, cfg.data.num_classes, cfg.data.relabel.token_size, arch)
    return model


DYNAMO_UTILS = "torch._dynamo.utils"


def import_torchvision() -> types.ModuleType:
    """``torchvision``, imported without importing ``torch._dynamo`` along with it.

    Importing torchvision imports its ops, and ``torchvision.ops.roi_align`` takes one function from
    ``torch._dynamo.utils`` at import, which imports all of TorchDynamo (sympy, FX, FSDP: about as
    long as torch itself, and 130,000 more objects for every garbage collection to go over). A
    training process imports it anyway (torch.optim does, at an optimizer's first parameter
    group); evaluation, tools and tests that only build a model need not. While torchvision is imported,
    ``torch._dynamo.utils`` is a stand-in whose attributes are the real ones, imported on first use
    (RoIAlign calls ``is_compile_supported`` only on some of its paths); the stand-in is gone once
    torchvision is in. Where TorchDynamo is already loaded, or torchvision is, it is a plain import."""
    if "torchvision" in sys.modules or DYNAMO_UTILS in sys.modules or "torch._dynamo" in sys.modules:
        return importlib.import_module("torchvision")
    stand_in = types.ModuleType(DYNAMO_UTILS, "torch._dynamo.utils, imported on first use")

    def real_attribute(name: str):
        if name.startswith("__"):  # what the import system asks of a module (__path__, ...)
            raise AttributeError(name)
        if sys.modules.get(DYNAMO_UTILS) is stand_in:  # still importing torchvision
            del sys.modules[DYNAMO_UTILS]
        return getattr(importlib.import_module(DYNAMO_UTILS), name)

    stand_in.__getattr__ = real_attribute  # module attribute look-up falls back to it (PEP 562)
    stand_in.is_compile_supported = lambda *args, **kwargs: real_attribute("is_compile_supported")(*args, **kwargs)
    sys.modules[DYNAMO_UTILS] = stand_in
    try:
        return importlib.import_module("torchvision")
    finally:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]


class TokenLabelModel(torch.nn.Module):
    """A timm vision transformer with TokenLabeling's auxiliary head: one linear layer, shared by
    all patch tokens, from each token's final features to class logits (LV-ViT's ``aux_head``).

    In training mode ``forward`` returns ``(logits [B, C], token_logits [B, S*S, C])``: the class
    token's head (the model's own ``forward_head``) and the auxiliary head on the patch tokens of
    ``forward_features``, past the model's ``num_prefix_tokens`` (class, distillation, register
    tokens). In evaluation mode it returns the class logits only, so evaluation, test-only runs and
    ReaL use the class token alone. One ``forward`` for both keeps DDP's gradient hooks in the path.
    The state dict holds ``backbone.*`` (the timm model's own names) and ``aux_head.*``."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int, token_size: int, arch: str = "model"):
        super().__init__()
        for needed in ("forward_features", "forward_head", "num_prefix_tokens"):
            if not hasattr(backbone, needed):
                raise ConfigError(f"data.relabel.token_size {token_size}: model.arch {arch!r} has no "
                                  f"{needed}: token labels need a timm vision transformer (e.g. "
                                  "timm:deit_small_patch16_224)")
        grid = tuple(getattr(getattr(backbone, "patch_embed", None), "grid_size", ()) or ())
        if grid != (token_size, token_size):
            raise ConfigError(f"data.relabel.token_size {token_size}: model.arch {arch!r} has a patch grid of "
                              f"{grid or 'unknown size'}; token_size must equal its tokens per side "
                              "(data.image_size / patch size)")
        self.backbone = backbone
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        self.aux_head = torch.nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor):
        features = self.backbone.forward_features(images)
        logits = self.backbone.forward_head(features)
        if not self.training:
            return logits
        return logits, self.aux_head(features[:, self.num_prefix_tokens:])

    def no_weight_decay(self) -> set[str]:
        named = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in (named() if callable(named) else ())}


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
