"""Optimizers and the per-iteration learning-rate schedule (linear warm-up, then cosine)."""
from __future__ import annotations

import math

import torch

from relabel_dali.config import Config

OPTIMIZERS = ("sgd", "adamw", "adamp")
DECAY_TYPES = ("cos", "linear")


def scaled_lr(cfg: Config) -> float:
    """optim.lr.init is quoted for a global batch of optim.lr.base_batch_size (the linear
    scaling rule): lr = init * batch_size / base_batch_size."""
    return cfg.optim.lr.init * cfg.optim.batch_size / cfg.optim.lr.base_batch_size


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict]:
    """Normalization weights and biases are the 0-d/1-d parameters: decaying them only fights
    the scale invariance that normalization provides. Models that name more parameters to keep
    undecayed (timm's ``no_weight_decay()``: a ViT's position embedding and class token) have
    those excluded as well, as timm's and DeiT's own recipes do."""
    if not exclude_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    named = getattr(model, "no_weight_decay", None)
    skip = set(named()) if callable(named) else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    name = cfg.optim.optimizer.lower()
    groups = param_groups(model, cfg.optim.wd.base, cfg.optim.wd.exclude_bn_bias)
    lr = scaled_lr(cfg)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.optim.momentum, 0.999))
    if name == "adamp":
        try:
            from adamp import AdamP
        except ImportError:
            raise ImportError("optim.optimizer 'adamp' needs the adamp package, which is not installed: "
                              "pip install adamp") from None
        return AdamP(groups, lr=lr, betas=(cfg.optim.momentum, 0.999), nesterov=cfg.optim.nesterov)
    raise ValueError(f"optim.optimizer {cfg.optim.optimizer!r} is not one of {OPTIMIZERS}")


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float,
          decay_type: str = "cos") -> float:
    """The learning rate of 0-based iteration ``step``: linear from warmup_lr to peak over
    warmup_steps, then decay to 0 over the remaining steps."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay_type == "cos":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay_type == "linear":
        return peak_lr * (1.0 - progress)
    raise ValueError(f"optim.lr.decay_type {decay_type!r} is not one of {DECAY_TYPES}")


class WarmupDecaySchedule:
    """Sets every param group's lr once per iteration; its state is the iteration count, so a
    resumed run continues on the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int,
                 warmup_epochs: float, warmup_lr: float, decay_type: str = "cos"):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"optim.lr.decay_type {decay_type!r} is not one of {DECAY_TYPES}")
        if not 0 <= warmup_epochs <= epochs:
            raise ValueError(f"optim.warmup.epochs {warmup_epochs} must be within [0, optim.epochs={epochs}]")
        self.optimizer = optimizer
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = int(round(steps_per_epoch * warmup_epochs))
        self.warmup_lr, self.decay_type = warmup_lr, decay_type
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
        self.step_count = 0

    def lr(self, group: dict) -> float:
        return lr_at(self.step_count, peak_lr=group["peak_lr"], total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps, warmup_lr=self.warmup_lr, decay_type=self.decay_type)

    def step(self) -> float:
        """Sets the lr of the iteration about to run; returns the first group's."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(group)
        self.step_count += 1
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupDecaySchedule:
    return WarmupDecaySchedule(optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.optim.epochs,
                               warmup_epochs=cfg.optim.warmup.epochs, warmup_lr=cfg.optim.warmup.lr,
                               decay_type=cfg.optim.lr.decay_type)
