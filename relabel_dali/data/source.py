"""The sample source: the callable that ``fn.external_source(parallel=True, batch=False)`` runs in
its worker processes, delivering each slot's encoded image, label, label record and augmentation.

The epoch order comes from ``order.py`` and the dataset from ``listing.py``. Augmentation
(training): slot ``i`` of epoch ``e`` on rank ``r`` gets its crop window, flip, jitter factors and
lighting from ``augment.AugmentDraws`` keyed by ``(seed, r, e, i)``; the source sends them with the
sample. Nothing in the graph is random, so the source and the pipeline are built once per run and
a resumed run (``start_epoch``) replays every epoch exactly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relabel_dali.data.augment import AugmentDraws, SampleAugment
from relabel_dali.data.encoded import encoded_problem, image_size
from relabel_dali.data.listing import BadSampleError, Listing, MatchReport, index_dtype, list_images, match_records
from relabel_dali.data.order import REMAINDER_POLICIES, epoch_permutation, rank_length, rank_slots
from relabel_dali.data.settings import BAD_SAMPLE_POLICIES, TrainAugment
from relabel_dali.data.workers import die_with_parent, workers_die_with_parent
from relabel_dali.store.reader import LabelRecord, LabelShardReader

log = logging.getLogger(__name__)

PACKED_HEAD = 16  # bytes before anything else in a packed sample: int64 label, int64 index
# The training parameters a packed sample carries after its head: name -> (dtype, shape).
AUGMENT_FIELDS = {"anchor": (np.int32, (2,)), "crop_shape": (np.int32, (2,)), "box": (np.float32, (4,)),
                  "mirror": (np.int32, ()), "brightness": (np.float32, ()), "contrast": (np.float32, ()),
                  "saturation": (np.float32, ()), "lighting": (np.float32, (3,))}
AUGMENT_DTYPE = np.dtype([(name, dtype, shape) for name, (dtype, shape) in AUGMENT_FIELDS.items()])


@dataclass(frozen=True)
class Sample:
    """One delivered sample: encoded image bytes, class label, sample index (both ``-1`` for masked
    padding), the stored label record's bytes (None without labels) and the training
    augmentation (None for validation)."""
    image: np.ndarray
    label: int
    index: int
    record: np.ndarray | None
    augment: SampleAugment | None = None


class SampleSource:
    """Picklable per-sample callable for ``fn.external_source(parallel=True, batch=False)``.

    Outputs, two uint8 arrays per sample: the encoded image, and the packed sample (``pack``): the
    class label and the sample index (int64; ``-1`` for masked padding), then, for training
    (``augment`` given), the sample's augmentation parameters (``AUGMENT_DTYPE``), then, with
    labels, the stored label record. The graph slices the fields out
    (``pipelines.training.read_source``); ``sample`` gives them separately. The sample index is that
    of the sample actually delivered: a substituted bad sample reports its replacement's index.

    ``on_bad_sample``: ``"fail"`` raises :class:`BadSampleError` naming the file; ``"skip"``
    substitutes the next good sample in dataset order (deterministic, so ranks still agree and the
    epoch length is unchanged) and logs a warning. A label record with a non-finite score or a
    class id outside the label space counts as a bad sample too, named by its key.
    """

    def __init__(self, listing: Listing | str | os.PathLike, label_root=None, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 remainder: str = "pad", start_epoch: int = 0, on_bad_sample: str = "fail",
                 augment: TrainAugment | None = None):
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample {on_bad_sample!r}: expected one of {BAD_SAMPLE_POLICIES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder {remainder!r}: expected one of {REMAINDER_POLICIES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if not isinstance(listing, Listing):
            listing = list_images(listing)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.shuffle, self.remainder = int(seed), bool(shuffle), remainder
        self.start_epoch, self.on_bad_sample = int(start_epoch), on_bad_sample
        self.label_root = None if label_root is None else Path(label_root)
        self.report = MatchReport([], [])
        self.geometry = None
        if self.label_root is not None:
            reader = LabelShardReader(self.label_root)
            if listing.record_numbers is None:
                listing, self.report = match_records(listing, reader, on_bad_sample)
            self.geometry = reader.geometry
        self.listing = listing
        self.augment = augment
        self._draws = None if augment is None else AugmentDraws(
            seed=seed, rank=rank, random_area=augment.random_area, random_aspect_ratio=augment.random_aspect_ratio,
            flip=augment.flip, color_jitter=augment.color_jitter, lighting_std=augment.lighting_std)
        self._length = rank_length(len(listing), world_size=self.world_size, batch_size=self.batch_size,
                                   remainder=remainder)
        if self._length == 0:
            raise ValueError(f"{len(listing)} samples make no full global batch of {world_size} x {batch_size} "
                             f"(remainder='drop')")
        self._reader = None
        self._cached_epoch = None
        self._owner = os.getpid()  # the process that built the source: workers are the others
        workers_die_with_parent()

    # ---- epoch layout ---------------------------------------------------------------------
    @property
    def with_labels(self) -> bool:
        return self.label_root is not None

    @property
    def keys(self) -> list[str]:
        return self.listing.keys

    def __len__(self) -> int:
        """Samples per epoch on this rank (a multiple of the batch size)."""
        return self._length

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // self.batch_size

    def epoch_slots(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order (``-1``: masked padding); a
        compact copy, so the whole permutation is not kept alive by a view."""
        n = len(self.listing)
        order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
        slots = rank_slots(order, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                           remainder=self.remainder)
        return slots.astype(index_dtype(n))

    # ---- the packed sample ----------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True for uint8 label scores: only those need their record's scale and offset."""
        return self.with_labels and np.dtype(self.geometry.score_dtype) == np.uint8

    @property
    def output_dtypes(self) -> list[np.dtype]:
        """The two arrays per sample: the encoded image and the packed sample (see ``pack``)."""
        return [np.dtype(np.uint8), np.dtype(np.uint8)]

    @property
    def output_ndims(self) -> list[int]:
        return [1, 1]

    @property
    def _record_start(self) -> int:
        return PACKED_HEAD + (AUGMENT_DTYPE.itemsize if self.augment is not None else 0)

    @property
    def packed_size(self) -> int:
        return self._record_start + (self.geometry.record_dtype.itemsize if self.with_labels else 0)

    @property
    def packed_fields(self) -> dict[str, tuple[int, np.dtype, tuple]]:
        """``name -> (byte offset in the packed sample, dtype, shape)``: ``label``, ``index``; for
        training the ``AUGMENT_FIELDS``; with labels the record's ``scores``, ``class_ids``,
        ``scale`` and ``offset``."""
        fields = {"label": (0, np.dtype(np.int64), ()), "index": (8, np.dtype(np.int64), ())}
        groups = []
        if self.augment is not None:
            groups.append((PACKED_HEAD, AUGMENT_DTYPE, AUGMENT_FIELDS))
        if self.with_labels:
            groups.append((self._record_start, self.geometry.record_dtype, ("scores", "class_ids", "scale", "offset")))
        for start, record, names in groups:
            for name in names:
                dtype, offset = record.fields[name][:2]
                fields[name] = (start + offset, dtype.base, dtype.shape)
        return fields

    def pack(self, sample: Sample) -> np.ndarray:
        """One uint8 array for everything but the image: int64 label, int64 sample index, the
        augmentation parameters, then the stored label record's bytes as they are in the shard.
        Every array a parallel source returns costs its workers and the pipeline a fixed
        overhead per sample, several times that of copying a 4.5 KB record, so a sample travels
        as two arrays."""
        packed = np.empty(self.packed_size, dtype=np.uint8)
        packed[:PACKED_HEAD].view(np.int64)[:] = (sample.label, sample.index)
        if sample.augment is not None:
            a = sample.augment
            packed[PACKED_HEAD:self._record_start].view(AUGMENT_DTYPE)[0] = (
                (a.top, a.left), (a.height, a.width), a.box, int(a.mirror), *a.jitter, a.lighting)
        if sample.record is not None:
            packed[self._record_start:] = sample.record
        return packed

    def unpack(self, packed: np.ndarray) -> tuple[int, int, LabelRecord | None]:
        """(label, index, label record or None) from a packed sample, as the graph reads it."""
        packed = np.asarray(packed, dtype=np.uint8)
        label, index = packed[:PACKED_HEAD].view(np.int64).tolist()
        if not self.with_labels:
            return label, index, None
        row = packed[self._record_start:].view(self.geometry.record_dtype)[0]
        return label, index, LabelRecord(row["scores"], row["class_ids"], float(row["scale"]), float(row["offset"]))

    # ---- the callable ---------------------------------------------------------------------
    def sample(self, sample_info) -> Sample:
        """The sample of ``sample_info``'s slot (``idx_in_epoch``, ``epoch_idx``) as separate fields."""
        epoch = self.start_epoch + sample_info.epoch_idx
        slots = self._slots(epoch)
        position = sample_info.idx_in_epoch
        if position >= len(slots):
            raise StopIteration
        slot = int(slots[position])
        # Masked padding still carries a real image, so the decoder sees nothing special.
        delivered, data, size, record = self._good_sample(max(slot, 0))
        label, index = (self.listing.label(delivered), delivered) if slot >= 0 else (-1, -1)
        augment = None if self._draws is None else self._draws(epoch, position, *size)
        return Sample(np.frombuffer(data, dtype=np.uint8), label, index, record, augment)

    def __call__(self, sample_info):
        sample = self.sample(sample_info)
        return sample.image, self.pack(sample)

    def _slots(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._slots_cache, self._cached_epoch = self.epoch_slots(epoch), epoch
        return self._slots_cache

    def read_encoded(self, index: int) -> tuple[bytes, str | None]:
        path = self.listing.root / self.listing.path(index)
        try:
            data = path.read_bytes()
        except OSError as error:
            return b"", f"unreadable ({error.strerror})"
        return data, encoded_problem(data)

    def _read(self, index: int):
        """(bytes, (height, width) or None, record or None, problem or None) of sample ``index``."""
        data, problem = self.read_encoded(index)
        size = record = None
        if problem is None and self.augment is not None:
            try:
                size = image_size(data, exif=self.augment.exif)
            except ValueError as error:
                problem = str(error)
        if problem is None and self.with_labels:
            record, problem = self._record(index)
        return data, size, record, problem

    def _record(self, index: int) -> tuple[np.ndarray, str | None]:
        if self._reader is None:
            self._reader = LabelShardReader(self.label_root)
        number = int(self.listing.record_numbers[index])
        stored = self._reader.record(number)
        problem = None
        if stored.scores.dtype != np.uint8 and not np.isfinite(stored.scores).all():
            problem = "non-finite label score"
        elif stored.class_ids.max(initial=0) >= self.geometry.num_classes:
            problem = f"class id {int(stored.class_ids.max())} outside the {self.geometry.num_classes} classes"
        if problem is not None:
            problem = f"label record {number} (key {self.listing.key(index)!r}) in {self.label_root}: {problem}"
        return self._reader.record_bytes(number), problem

    def _good_sample(self, index: int):
        data, size, record, problem = self._read(index)
        if problem is None:
            return index, data, size, record
        message = f"{self.listing.root / self.listing.path(index)}: {problem}"
        if self.on_bad_sample == "fail":
            raise BadSampleError(message + " (on_bad_sample='skip' substitutes another sample)")
        n = len(self.listing)
        for step in range(1, n):
            candidate = (index + step) % n
            data, size, record, other = self._read(candidate)
            if other is None:
                log.warning("%s: substituted by %s", message, self.listing.path(candidate))
                return candidate, data, size, record
        raise BadSampleError(f"{self.listing.root}: no readable sample left to substitute for "
                             f"{self.listing.path(index)}")

    # Workers reopen the label mapping themselves: a pickled mmap would travel as a full copy.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_cached_epoch"] = None, None
        state.pop("_slots_cache", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self._owner:  # unpickled in a spawned worker
            die_with_parent(self._owner)
