"""The PyTorch-facing loaders: dict batches of torch tensors out of the DALI pipelines.

A loader is built once per run: its source and pipeline then serve every epoch in sequence
(``start_epoch`` first), each epoch's order and augmentation a pure function of
(seed, rank, epoch, slot). Build loaders before anything touches CUDA when workers fork: DALI
refuses to fork once CUDA is initialised (``start_method="spawn"`` lifts that, at a slower start).
"""
from __future__ import annotations

import gc
import itertools
import logging
import os

import torch

from relabel_dali.config import ConfigError
from relabel_dali.store.reader import LabelShardReader, ShardCorruptError
from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment, ValTransform
from relabel_dali.data.listing import preflight_decodes
from relabel_dali.data.listing_cache import dataset_listing
from relabel_dali.data.source import SampleSource
from relabel_dali.data.transfer import host_to_device

log = logging.getLogger(__name__)
HOST_METADATA = ("boxes", "labels", "indices")  # per-sample outputs the graphs make on the host
TOKEN_METADATA = ("mirror",)  # and with token targets, each sample's flip


class DaliLoader:
    """Iterates one epoch per ``iter()``; ``len()`` is the number of batches per epoch.

    Epochs follow each other from ``source.start_epoch`` without rebuilding anything.
    ``set_epoch(e)`` names the epoch the next ``iter()`` reads: the next one in sequence costs
    nothing; any other epoch (or restarting an abandoned one) rebuilds the pipeline at ``e``,
    which reads exactly what an uninterrupted run would have read there.
    """

    def __init__(self, source: SampleSource, make_pipeline, output_map, *, device: str = "cpu",
                 start_method: str = "fork", validation: bool = False):
        self.source, self._make_pipeline, self.output_map = source, make_pipeline, list(output_map)
        self.device = torch.device(device)
        self.start_method, self.validation = start_method, validation
        self.substituted = 0  # bad samples replaced so far (on_bad_sample="skip")
        self.builds = 0  # pipelines built so far: 1 for a run that reads its epochs in sequence
        self._iterator = None
        self._build(source.start_epoch)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._iterator is not None and self.start_method == "fork" and torch.cuda.is_initialized():
            raise RuntimeError(f"set_epoch({epoch}) needs a new pipeline, but CUDA is initialised and DALI "
                               f"cannot fork workers now: start the loader at epoch {epoch}, "
                               f"or use start_method='spawn'")
        self.close()  # the old pipeline and its workers go first
        self.source.start_epoch = epoch
        pipeline = self._make_pipeline(self.source)
        self._iterator = DALIGenericIterator(pipeline, self.output_map, auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.DROP,
                                             prepare_first_batch=False)
        self.builds += 1
        self._next_epoch, self._in_epoch = epoch, False

    def close(self) -> None:
        """Stops the pipeline and its worker processes now rather than at garbage collection."""
        if self._iterator is not None:
            self._iterator = None
            gc.collect()

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
        """DALI lends its outputs through DLPack and recycles a host buffer once it is released,
        possibly before an asynchronous copy out of it has run: host outputs bound for the GPU go
        through ``host_to_device``, and the per-sample host outputs (boxes, labels, indices, the
        token path's flips: a few bytes) are owned copies on the CPU as well, so none of them
        depends on when DALI recycles a buffer. A CPU loader's images and targets stay DALI's:
        nothing reads them asynchronously, and DALI keeps a buffer as long as a tensor refers to it."""
        out = {}
        for name, tensor in batch.items():
            if name in ("labels", "indices", "mirror"):
                tensor = tensor.view(-1).to(torch.int64)
            host_metadata = name in HOST_METADATA or name in TOKEN_METADATA
            if tensor.device.type == "cpu" and (self.device.type != "cpu" or host_metadata):
                tensor = host_to_device(tensor, self.device)
            out[name] = tensor
        if self.validation:
            out["valid"] = out["indices"] >= 0
        return out


def _dataset(dataset) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else Dataset(dataset)


def open_labels(labels: Labels, num_classes: int) -> LabelShardReader:
    """The label shards, checked as ``labels.verify`` asks, and against ``num_classes``."""
    reader = LabelShardReader(labels.path, check_keys=labels.verify != "off")
    if reader.num_classes != num_classes:
        raise ConfigError(f"{labels.path}: label maps cover {reader.num_classes} classes, "
                          f"data.num_classes is {num_classes}")
    if labels.verify == "full":
        from relabel_dali.progress import progress

        reader.keys  # reads and checks the key files
        with progress(len(reader), desc=f"verifying {labels.path}", unit="rec") as bar:
            errors = list(itertools.islice(reader.corrupt_records(on_shard=bar.update), 20))
        if errors:
            listed = "; ".join(str(error) for error in errors[:5])
            raise ShardCorruptError(f"data.verify_labels full: {len(errors)}{'+' if len(errors) == 20 else ''} "
                                    f"corrupt label record(s): {listed}")
    return reader


def build_train_loader(dataset: Dataset | str | os.PathLike, *, batch_size: int, labels: Labels | None = None,
                       augment: TrainAugment = TrainAugment(), runtime: Runtime = Runtime(), rank: int = 0,
                       world_size: int = 1, seed: int = 0, start_epoch: int = 0) -> DaliLoader:
    """Batches ``{"images" [B,3,S,S], "targets" [B,C] float32, "labels" [B], "boxes" [B,4],
    "indices" [B]}`` on ``runtime.device``, ``B = batch_size`` per process. ``labels`` None gives
    one-hot targets; ``labels.token_size`` T > 0 adds ``"token_targets" [B,T*T,C]`` float32 (the
    crop's token targets, mirrored with the image) and ``"mirror" [B]`` (1: the image was
    flipped); with ``labels.token_compact`` the token targets come in compact form instead:
    ``"token_ids" [B,T*T,M]`` int32 (ascending, -1 as padding), ``"token_values" [B,T*T,M]``
    float32 and ``"token_rest" [B,T*T]`` float32 (:class:`relabel_dali.ops.compact.CompactTargets`'
    fields; M, the most classes any token of the batch touches, varies between batches).
    ``rank``/``world_size`` are the GLOBAL rank and world size."""
    from pipelines.training import train_outputs, training_pipeline

    dataset = _dataset(dataset)
    listing = dataset_listing(dataset, None if labels is None else open_labels(labels, dataset.num_classes))
    label_root = None if labels is None else labels.path
    _check_label_range(listing, dataset)
    listing = preflight_decodes(listing, dataset.preflight_decodes, seed, dataset.on_bad_sample)
    source = SampleSource(listing, label_root, batch_size=batch_size, rank=rank, world_size=world_size,
                          seed=seed, shuffle=True, remainder="pad", start_epoch=start_epoch,
                          on_bad_sample=dataset.on_bad_sample, augment=augment)
    pool_mode = labels.pool_mode if labels is not None else "softmax"
    token_size = labels.token_size if labels is not None else 0
    token_compact = bool(token_size) and labels.token_compact
    def make(src):
        return training_pipeline(src, augment, runtime, num_classes=dataset.num_classes, pool_mode=pool_mode,
                                 token_size=token_size, token_compact=token_compact)

    return DaliLoader(source, make, train_outputs(token_size, token_compact), device=runtime.device,
                      start_method=runtime.start_method)


def build_val_loader(dataset: Dataset | str | os.PathLike, *, batch_size: int,
                     transform: ValTransform = ValTransform(), runtime: Runtime = Runtime(), rank: int = 0,
                     world_size: int = 1) -> DaliLoader:
    """Batches ``{"images", "labels", "indices", "valid"}``; padded slots have index -1 and
    ``valid`` False, so each sample is evaluated exactly once across ranks."""
    from pipelines.validation import VAL_OUTPUTS, validation_pipeline

    dataset = _dataset(dataset)
    listing = dataset_listing(dataset)
    _check_label_range(listing, dataset)
    source = SampleSource(listing, batch_size=batch_size, rank=rank, world_size=world_size, shuffle=False,
                          remainder="mask", on_bad_sample=dataset.on_bad_sample)
    def make(src):
        return validation_pipeline(src, transform, runtime)

    return DaliLoader(source, make, VAL_OUTPUTS, device=runtime.device, start_method=runtime.start_method,
                      validation=True)


def _check_label_range(listing, dataset: Dataset) -> None:
    largest = int(listing.dir_labels.max())
    if largest >= dataset.num_classes:
        raise ConfigError(f"class_map gives index {largest}, outside data.num_classes={dataset.num_classes}")
