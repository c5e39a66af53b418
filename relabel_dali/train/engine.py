"""One training epoch, one evaluation pass, and the single place where the trainer meets the data.

Both loops take plain objects (model, loader, optimizer, ...) so tests can drive them directly;
``train.py`` only wires them together.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relabel_dali.atomic import disk_full_error, is_disk_full
from relabel_dali.config import Config, ConfigError
from relabel_dali.data.transfer import host_to_device
from relabel_dali.train.distributed import DistEnv, all_reduce_sum
from relabel_dali.ops.compact import CompactTargets
from relabel_dali.train.losses import smooth_targets, soft_target_cross_entropy, token_label_loss
from relabel_dali.train.metrics import AccuracyMeter, RealLabels, load_real_labels
from relabel_dali.progress import progress
from relabel_dali.data.settings import DataSettings


# ---- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    # loader.DaliLoader: dicts {"images", "targets", "labels", "boxes", "indices"} (with token labels
    # also "token_targets", or "token_ids", "token_values", "token_rest" in compact form, and "mirror")
    train: object
    val: object  # iterable of dicts {"images", "labels", "indices", "valid"}
    val_keys: list[str]  # validation sample keys, indexed by the batches' "indices"

    def train_epoch(self, epoch: int):
        """The training loader, positioned at ``epoch`` (free when epochs run in sequence)."""
        self.train.set_epoch(epoch)
        return self.train

    def close(self) -> None:
        for loader in (self.train, self.val):
            close = getattr(loader, "close", None)
            if close is not None:
                close()


def per_rank_batch(global_batch: int, world_size: int, name: str) -> int:
    if global_batch % world_size:
        raise ConfigError(f"{name}={global_batch} is not divisible by the {world_size} processes")
    return global_batch // world_size


def resolve_start_method(start_method: str, device: torch.device) -> str:
    """``auto``: fork (fast) on the CPU, spawn on the GPU, where DALI cannot fork once the first
    pipeline has initialised CUDA."""
    if start_method == "auto":
        return "spawn" if device.type == "cuda" else "fork"
    if start_method not in ("fork", "spawn"):
        raise ConfigError(f"data.start_method {start_method!r}: expected auto, fork or spawn")
    if device.type == "cuda" and start_method == "fork":
        # Building the first GPU pipeline initialises CUDA in this process, so the validation
        # pipeline would have to fork after it, which DALI refuses.
        raise ConfigError("data.start_method fork cannot work on the GPU: building the training pipeline "
                          "initialises CUDA, after which DALI cannot fork the validation pipeline's "
                          "workers: set --data.start_method spawn")
    return start_method


def data_settings(cfg: Config, env: DistEnv) -> DataSettings:
    device = str(env.device) if env.device.type == "cuda" else "cpu"
    return DataSettings.from_config(cfg.data, device=device,
                                    start_method=resolve_start_method(cfg.data.start_method, env.device))


def build_data(cfg: Config, env: DistEnv, start_epoch: int = 0) -> Data:
    """The trainer's only contact with the data path: both loaders, built once per run, the
    training loader starting at ``start_epoch``. Call it before CUDA is touched: DALI's forked
    workers refuse a process with CUDA initialised."""
    from relabel_dali.data import loader

    settings = data_settings(cfg, env)
    train = loader.build_train_loader(
        settings.train, batch_size=per_rank_batch(cfg.optim.batch_size, env.world_size, "optim.batch_size"),
        labels=settings.labels, augment=settings.augment, runtime=settings.runtime, rank=env.rank,
        world_size=env.world_size, seed=cfg.compute.seed, start_epoch=start_epoch)
    val = loader.build_val_loader(
        settings.val, batch_size=per_rank_batch(cfg.util.val_batch_size, env.world_size, "util.val_batch_size"),
        transform=settings.val_transform, runtime=settings.runtime, rank=env.rank, world_size=env.world_size)
    return Data(train, val, val.source.keys)


# ---- stopping on request -------------------------------------------------------------------------
METRICS_NAME = "metrics.json"
STOPPED_EXIT = 128 + signal.SIGTERM  # the shell's code for "ended by SIGTERM"


class Stopped(Exception):
    """Training stopped at a step boundary because a stop was requested (SIGTERM)."""


class StopRequest:
    """Set by SIGTERM; the training loop checks it after every step. A second SIGTERM while the
    first is being honoured ends the process at once (the default action)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = None

    @classmethod
    def install(cls) -> "StopRequest":
        request = cls()
        if threading.current_thread() is threading.main_thread():
            request._previous = signal.signal(signal.SIGTERM, request._handle)
        return request

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def check(self, where: str) -> None:
        if self.signal is not None:
            raise Stopped(f"stopped by {signal.Signals(self.signal).name} {where}")


# ---- helpers -------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Randomness of epoch e on rank r depends on (seed, e, r) only, so a resumed run replays it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def autocast_enabled(device: torch.device, amp: str) -> bool:
    """Autocast runs on the GPU only; on the CPU, and with compute.amp none, the model computes in
    the float32 of its weights."""
    return device.type == "cuda" and amp != "none"


def autocast(device: torch.device, amp: str):
    if not autocast_enabled(device, amp):
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"compute.amp {amp!r} is not one of bf16, fp16, none")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The loaders hand batches over on the trainer's device already; a host tensor from any other
    loader reaches the GPU through ``host_to_device``, never by a non-blocking copy out of memory
    torch does not own."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return host_to_device(tensor, device)
    return tensor.to(device)


def to_device(batch: dict, device: torch.device, channels_last: bool, amp: str = "none") -> tuple[torch.Tensor, dict]:
    images = on_device(batch["images"], device)
    if images.dtype != torch.float32 and not autocast_enabled(device, amp):
        # data.dtype float16 without autocast would meet float32 weights at the first layer.
        images = images.float()
    if channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch


def token_targets_of(batch: dict, device: torch.device):
    """A batch's token targets on ``device``: dense float32 ``[B, T, C]`` ("token_targets"), compact
    (``CompactTargets`` of "token_ids", "token_values", "token_rest"), or None without token labels."""
    if "token_targets" in batch:
        return on_device(batch["token_targets"], device).float()
    if "token_ids" in batch:
        return CompactTargets(*(on_device(batch[f"token_{name}"], device) for name in ("ids", "values", "rest")))
    return None


def cutmix_active(cfg: Config, epoch: int) -> bool:
    cutmix = cfg.data.cutmix
    return cutmix.prob > 0 and cutmix.beta > 0 and epoch < cfg.optim.epochs - cutmix.off_epoch


# ---- training ------------------------------------------------------------------------------------
def train_one_epoch(model, loader, optimizer, schedule, scaler, cfg: Config, epoch: int, env: DistEnv,
                    logger=None, stop: StopRequest | None = None) -> dict:
    """One pass over ``loader``; returns the epoch's mean loss (over all ranks) and throughput.
    Raises ``Stopped`` at the first step boundary after ``stop`` was requested."""
    model.train()
    torch.manual_seed(epoch_seed(cfg.compute.seed, epoch, env.rank))
    # CutMix draws its boxes and pairings on the CPU: the same numbers on any device.
    generator = torch.Generator().manual_seed(epoch_seed(cfg.compute.seed, epoch, env.rank))
    use_cutmix = cutmix_active(cfg, epoch)
    if use_cutmix:
        from relabel_dali.train.cutmix import cutmix_batch, cutmix_batch_tokens
    steps = len(loader)
    bar = progress(steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="it",
                   disable=not (env.is_main and cfg.util.progress), leave=False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    samples, wait_s = 0, 0.0
    start = last = time.perf_counter()
    iterator = iter(loader)
    for step in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise RuntimeError(f"train loader ended after {step} of its {steps} batches (epoch {epoch})") from None
        fetched = time.perf_counter()
        wait_s += fetched - last
        images, batch = to_device(batch, env.device, cfg.model.channels_last, cfg.compute.amp)
        targets = on_device(batch["targets"], env.device).float()
        tokens = token_targets_of(batch, env.device)
        if tokens is not None:  # token labels (data.relabel.token_size): LV-ViT's two losses
            if use_cutmix:
                images, targets, tokens, _ = cutmix_batch_tokens(images, targets, tokens, prob=cfg.data.cutmix.prob,
                                                                 beta=cfg.data.cutmix.beta, generator=generator)
        elif use_cutmix:
            images, targets, _ = cutmix_batch(images, targets, prob=cfg.data.cutmix.prob,
                                              beta=cfg.data.cutmix.beta, generator=generator)
        targets = smooth_targets(targets, cfg.optim.label_smoothing)
        lr = schedule.step()
        with autocast(env.device, cfg.compute.amp):
            logits = model(images)
        if tokens is not None:
            logits, token_logits = logits
            tokens = smooth_targets(tokens, cfg.optim.label_smoothing, num_classes=targets.shape[-1])
            loss = token_label_loss(logits, token_logits, targets, tokens, cfg.optim.token_loss_weight)
        else:
            loss = soft_target_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * images.shape[0]
        samples += images.shape[0]
        # Reading the loss synchronises the GPU: only every print_freq steps.
        if (step + 1) % cfg.util.print_freq == 0 or step + 1 == steps:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch}, iteration {step}")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", refresh=False)
            if logger is not None:
                logger.scalar("train/loss", value, schedule.step_count)
                logger.scalar("train/lr", lr, schedule.step_count)
        bar.update(1)
        if stop is not None:
            stop.check(f"at epoch {epoch + 1}, step {step + 1} of {steps}")
        last = time.perf_counter()
    # Run the loader's epoch to its end so it knows the epoch is complete.
    for _ in iterator:
        raise RuntimeError(f"train loader yields more batches than its len() of {steps} (epoch {epoch})")
    bar.close()
    elapsed = max(time.perf_counter() - start, 1e-9)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64,
                                                                 device=env.device)]))
    stats = {"loss": float(totals[0] / totals[1].clamp(min=1)),
             "images_per_s": float(totals[1]) / elapsed,
             "data_wait_fraction": wait_s / elapsed, "seconds": elapsed}
    if logger is not None:
        logger.scalar("perf/images_per_s", stats["images_per_s"], epoch + 1)
        logger.scalar("perf/data_wait_fraction", stats["data_wait_fraction"], epoch + 1)
    return stats


# ---- evaluation ----------------------------------------------------------------------------------
def build_real(cfg: Config, val_keys: list[str]) -> RealLabels | None:
    if not cfg.data.real_labels:
        return None
    return RealLabels(load_real_labels(cfg.data.real_labels), val_keys)


@torch.no_grad()
def evaluate(model, loader, cfg: Config, env: DistEnv, real: RealLabels | None = None) -> dict:
    """Top-1/top-5 (and ReaL top-1) over the whole validation set, each image counted once."""
    model.eval()
    meter = AccuracyMeter(env.device, real)
    for batch in progress(loader, desc="eval", unit="it", leave=False,
                          disable=not (env.is_main and cfg.util.progress)):
        images, batch = to_device(batch, env.device, cfg.model.channels_last, cfg.compute.amp)
        with autocast(env.device, cfg.compute.amp):
            logits = model(images).float()
        meter.update(logits, batch["labels"], batch.get("indices"), batch.get("valid"))
    return meter.summary()


# ---- logging -------------------------------------------------------------------------------------
class RunLogger:
    """TensorBoard scalars, written by rank 0 only; other ranks get a logger that does nothing.

    A full disk (or quota) ends the logging with one warning that names the folder, the bytes needed
    and the bytes free; training goes on to its next checkpoint, which checks for room itself (on
    every rank at once, where a failing log write would stop rank 0 alone)."""

    def __init__(self, log_dir: str | Path | None):
        self.writer, self.log_dir = None, log_dir
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            self._guarded(lambda: setattr(self, "writer", SummaryWriter(log_dir=str(log_dir))))

    def _guarded(self, write) -> None:
        try:
            write()
        except OSError as error:  # raised here by TensorBoard's writer thread, or directly
            if not is_disk_full(error):
                raise
            self.writer = None
            print(f"warning: TensorBoard logging stops: {disk_full_error(error, self.log_dir)}", file=sys.stderr,
                  flush=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self._guarded(lambda: self.writer.add_scalar(tag, value, step))

    def close(self) -> None:
        if self.writer is not None:
            self._guarded(self.writer.flush)
        if self.writer is not None:
            self._guarded(self.writer.close)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread dies on a full disk with a traceback of its own, then raises the
    same error at the logger's next call, where it is reported once: no traceback for it."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and is_disk_full(args.exc_value)):
            previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook

