"""The PyTorch-facing loaders: dict batches of torch tensors out of the DALI pipelines.

Build loaders before anything touches CUDA: the parallel sample source forks its workers when the
pipeline is built, and DALI refuses to fork once CUDA is initialised (``start_method="spawn"``
lifts that, at a slower start).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from . import augment
from .sources import SampleSource

log = logging.getLogger(__name__)


class DaliLoader:
    """Iterates one epoch per ``iter()``; ``len()`` is the number of batches per epoch.

    Epoch ``e`` reads the order seeded by ``(seed, e)``. ``set_epoch(e)`` before iterating picks
    the epoch; the next epoch in sequence costs nothing, any other rebuilds the pipeline (so a
    resumed run gets exactly the order an uninterrupted one would have had).
    """

    def __init__(self, source: SampleSource, make_pipeline, output_map, *, device: str = "cpu",
                 start_method: str = "fork", validation: bool = False):
        self.source, self._make_pipeline, self.output_map = source, make_pipeline, list(output_map)
        self.device = torch.device(device)
        self.start_method, self.validation = start_method, validation
        self.substituted = 0  # bad samples replaced so far (on_bad_sample="skip")
        self._iterator = None
        self._build(source.start_epoch)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._iterator is not None and self.start_method == "fork" and torch.cuda.is_initialized():
            raise RuntimeError(f"set_epoch({epoch}) needs a new pipeline, but CUDA is initialised and DALI "
                               f"cannot fork workers now: pass start_epoch={epoch} to the loader factory, "
                               f"or use start_method='spawn'")
        self._iterator = None  # the old pipeline and its workers go first
        self.source.start_epoch = epoch
        pipeline = self._make_pipeline(self.source)
        self._iterator = DALIGenericIterator(pipeline, self.output_map, auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.DROP,
                                             prepare_first_batch=False)
        self._next_epoch, self._in_epoch = epoch, False

    def __len__(self) -> int:
        return self.source.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` reads."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._next_epoch or self._in_epoch:
            self._build(epoch)

    def __iter__(self):
        epoch = self._next_epoch
        expected = self.source.epoch_slots(epoch)
        self._in_epoch = True
        position = 0
        for outputs in self._iterator:
            batch = {name: tensor for name, tensor in outputs[0].items()}
            indices = batch["indices"].view(-1)
            size = len(indices)
            self.substituted += int((indices.numpy() != expected[position:position + size]).sum())
            position += size
            yield self._to_torch(batch)
        self._in_epoch = False
        self._next_epoch = epoch + 1

    def _to_torch(self, batch: dict) -> dict:
        out = {}
        for name, tensor in batch.items():
            if name in ("labels", "indices"):
                tensor = tensor.view(-1).to(torch.int64)
            out[name] = tensor.to(self.device, non_blocking=True)
        if self.validation:
            out["valid"] = out["indices"] >= 0
        return out


def _device_id(device: str) -> int | None:
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"device {device}: expected 'cpu' or 'cuda[:N]'")
    return device.index if device.index is not None else 0


def build_train_loader(image_root, label_root=None, *, batch_size: int, image_size: int = 224, rank: int = 0,
                       world_size: int = 1, seed: int = 0, device: str = "cpu", use_relabel: bool = True,
                       pool_mode: str = "softmax", num_classes: int = 1000, class_map="folder",
                       file_list=None, num_threads: int = 2, py_workers: int = 2, start_method: str = "fork",
                       exif: bool = False, dtype: str = "float32", on_bad_sample: str = "fail",
                       color_jitter: float = augment.COLOR_JITTER, lighting_std: float = augment.LIGHTING_STD,
                       random_area=augment.RANDOM_AREA, random_aspect_ratio=augment.RANDOM_ASPECT_RATIO,
                       flip: bool = True, remainder: str = "pad", start_epoch: int = 0) -> DaliLoader:
    """Batches ``{"images" [B,3,S,S], "targets" [B,C] float32, "labels" [B], "boxes" [B,4],
    "indices" [B]}`` on ``device``. ``rank``/``world_size`` are the GLOBAL rank and world size."""
    from pipelines.training import TRAIN_OUTPUTS, training_pipeline

    if use_relabel and label_root is None:
        raise ValueError("use_relabel=True needs label_root (a folder packed by tools/pack_labels.py)")
    source = SampleSource(image_root, label_root if use_relabel else None, batch_size=batch_size, rank=rank,
                          world_size=world_size, seed=seed, shuffle=True, remainder=remainder,
                          start_epoch=start_epoch, file_list=file_list, class_map=class_map,
                          on_bad_sample=on_bad_sample)
    if use_relabel and source.geometry.num_classes != num_classes:
        raise ValueError(f"{label_root}: label maps cover {source.geometry.num_classes} classes, "
                         f"num_classes is {num_classes}")
    if int(source.labels.max()) >= num_classes:
        raise ValueError(f"class_map gives index {int(source.labels.max())}, outside num_classes={num_classes}")
    device_id = _device_id(device)

    def make(src):
        # Ranks must not draw identical crops. A pipeline rebuilt for a resume starts a fresh
        # augmentation stream; the sample order is what a resume reproduces exactly.
        return training_pipeline(src, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                 seed=int(np.random.SeedSequence([seed, rank, src.start_epoch]).generate_state(1)[0]),
                                 image_size=image_size, use_relabel=use_relabel, pool_mode=pool_mode,
                                 num_classes=num_classes, exif=exif, dtype=dtype, color_jitter=color_jitter,
                                 lighting_std=lighting_std, random_area=random_area,
                                 random_aspect_ratio=random_aspect_ratio, flip=flip, py_workers=py_workers,
                                 start_method=start_method)

    return DaliLoader(source, make, TRAIN_OUTPUTS, device=device, start_method=start_method)


def build_val_loader(image_root, *, batch_size: int, image_size: int = 224, rank: int = 0, world_size: int = 1,
                     device: str = "cpu", class_map="folder", file_list=None, num_threads: int = 2,
                     py_workers: int = 2, start_method: str = "fork", exif: bool = False,
                     dtype: str = "float32", on_bad_sample: str = "fail",
                     crop_ratio: float = augment.VAL_CROP_RATIO) -> DaliLoader:
    """Batches ``{"images", "labels", "indices", "valid"}``; padded slots have index -1 and
    ``valid`` False, so each sample is evaluated exactly once across ranks."""
    from pipelines.validation import VAL_OUTPUTS, validation_pipeline

    source = SampleSource(image_root, None, batch_size=batch_size, rank=rank, world_size=world_size,
                          shuffle=False, remainder="mask", file_list=file_list, class_map=class_map,
                          on_bad_sample=on_bad_sample)
    device_id = _device_id(device)

    def make(src):
        return validation_pipeline(src, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                   image_size=image_size, crop_ratio=crop_ratio, exif=exif, dtype=dtype,
                                   py_workers=py_workers, start_method=start_method)

    return DaliLoader(source, make, VAL_OUTPUTS, device=device, start_method=start_method, validation=True)
