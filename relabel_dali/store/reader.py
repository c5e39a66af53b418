"""LabelShardReader: memory-mapped, O(1) random access to a packed label dataset."""
from __future__ import annotations

import bisect
import json
import mmap
import os
from pathlib import Path
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from relabel_dali.store import format as fmt


class ShardCorruptError(fmt.FormatError):
    """A record or shard whose bytes do not match their checksum."""

    def __init__(self, message: str, shard: Path | None = None, row: int | None = None, key: str | None = None):
        super().__init__(message)
        self.shard, self.row, self.key = shard, row, key


class KeysCorruptError(fmt.FormatError):
    """A keys file whose bytes do not match the checksum in the index."""


class LabelRecord(NamedTuple):
    """One record as stored: read-only views into the mapping, no copy, no dequantization."""

    scores: np.ndarray  # [k, H, W], the stored dtype (float32, float16 or uint8)
    class_ids: np.ndarray  # [k, H, W] uint16
    scale: float
    offset: float


def read_index(root: Path) -> dict:
    path = root / fmt.INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no label index here (run tools/pack_labels.py first)") from None
    except json.JSONDecodeError as error:
        raise fmt.FormatError(f"{path}: not valid JSON ({error})") from None
    if index.get("format") != fmt.INDEX_FORMAT:
        raise fmt.FormatError(f"{path}: format {index.get('format')!r}, expected {fmt.INDEX_FORMAT!r}")
    problem = fmt.version_problem(index.get("version"), str(path))
    if problem:
        raise fmt.FormatError(problem)
    for number, shard in enumerate(index.get("shards", [])):
        missing = [field for field in ("file", "keys", "records", "keys_crc32") if field not in shard]
        if missing:
            raise fmt.FormatError(f"{path}: shard entry {number} lacks {', '.join(missing)}")
    return index


def read_keys(path: Path, expected_crc32: int | None = None, records: int | None = None) -> list[str]:
    """The keys of one shard; with ``expected_crc32`` (from the index) a keys file changed after
    packing is refused, since its lines decide which image gets which record."""
    text = read_keys_bytes(path, expected_crc32, records).decode("utf-8")
    return text.split("\n")[:-1] if text else []


def read_keys_bytes(path: Path, expected_crc32: int | None = None, records: int | None = None) -> bytes:
    """A keys file's bytes, checked as ``read_keys`` checks them."""
    data = path.read_bytes()
    if expected_crc32 is not None:
        computed = fmt.checksum(data)
        if computed != expected_crc32:
            held = data.count(b"\n")
            counts = f"; it holds {held} keys for {records} records" if records is not None and held != records else ""
            raise KeysCorruptError(f"{path}: keys file checksum {computed:#010x}, the index says "
                                   f"{expected_crc32:#010x}{counts}: it was changed after packing (reordered, "
                                   f"edited or damaged lines would give images another image's labels); "
                                   f"pack the labels again")
    return data


class LabelShardReader:
    """Reads a label dataset folder (with ``index.json``) or a single ``.rls`` shard.

    ``reader[key_or_index]`` returns ``(scores float32 [k,H,W], class_ids int64 [k,H,W])`` in
    canonical [k, y, x] layout; ``reader.record(key_or_index)`` returns the stored record as
    read-only views. The memory maps are opened lazily in each process and never pickled, so a
    reader can be handed to fork or spawn workers.
    """

    def __init__(self, path: str | os.PathLike, *, check_keys: bool = True):
        """``check_keys=False`` reads the keys files without comparing them with their checksums
        (``data.verify_labels: off``)."""
        self.path = Path(path)
        self.check_keys = check_keys
        self._open_metadata()
        self._maps: list[mmap.mmap] | None = None
        self._records: list[np.ndarray] | None = None
        self._fields: list[tuple] | None = None

    # ---- metadata (cheap, pickled by value) -------------------------------------------------
    def _open_metadata(self) -> None:
        if self.path.is_dir():
            index = read_index(self.path)
            self.shard_paths = [self.path / shard["file"] for shard in index["shards"]]
            counts = [int(shard["records"]) for shard in index["shards"]]
            self._keys_paths = [self.path / shard["keys"] for shard in index["shards"]]
            self._keys_crcs = [int(shard["keys_crc32"]) for shard in index["shards"]]
        else:
            self.shard_paths = [self.path]
            counts = [None]
            keys_path = self.path.with_suffix(fmt.KEYS_SUFFIX)
            self._keys_paths = [keys_path] if keys_path.exists() else None
            self._keys_crcs = [None]  # a lone shard has no index to hold its keys checksum
        self._keys = None
        self.geometry = None
        self.counts = []
        for shard_path, expected in zip(self.shard_paths, counts):
            with open(shard_path, "rb") as handle:
                geometry, count = fmt.parse_header(handle.read(fmt.HEADER_SIZE), str(shard_path))
            if expected is not None and count != expected:
                raise fmt.FormatError(f"{shard_path}: header says {count} records, index says {expected}")
            size = shard_path.stat().st_size
            expected_size = fmt.HEADER_SIZE + count * geometry.record_dtype.itemsize
            if size != expected_size:
                raise fmt.FormatError(f"{shard_path}: {size} bytes, expected {expected_size} "
                                      f"for {count} records (truncated or padded file)")
            if self.geometry is not None and geometry != self.geometry:
                raise fmt.FormatError(f"{shard_path}: geometry {geometry} differs from {self.geometry}")
            self.geometry = geometry
            self.counts.append(count)
        if self.geometry is None:
            raise fmt.FormatError(f"{self.path}: the index lists no shards")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self._key_to_index = None

    @property
    def keys(self) -> list[str] | None:
        """Sample keys in record order (None for a lone shard without a keys file), each file checked
        against its checksum in the index. Read on first use: workers that address records by
        number never read them."""
        if self._keys is None and self._keys_paths is not None:
            keys = []
            for keys_path, crc, count in zip(self._keys_paths, self._keys_crcs, self.counts):
                keys.extend(read_keys(keys_path, crc if self.check_keys else None, count))
            if len(keys) != len(self):
                raise fmt.FormatError(f"{self.path}: the shards hold {len(self)} records but the key "
                                      f"files hold {len(keys)} keys")
            self._keys = keys
        return self._keys

    def keys_buffer(self, pad: int = 0) -> np.ndarray | None:
        """The keys files end to end (each key followed by ``\\n``) in one uint8 array, then
        ``pad`` zero bytes; in record order, each file checked as ``keys`` checks it. None for a
        lone shard without a keys file. For matching millions of keys without a Python string
        per key (``data/listing.py``)."""
        if self._keys_paths is None:
            return None
        sizes = [path.stat().st_size for path in self._keys_paths]
        buffer = np.zeros(sum(sizes) + pad, np.uint8)
        at = 0
        for path, size, crc, count in zip(self._keys_paths, sizes, self._keys_crcs, self.counts):
            data = read_keys_bytes(path, crc if self.check_keys else None, count)
            if len(data) != size:
                raise fmt.FormatError(f"{path}: changed while being read")
            buffer[at:at + size] = np.frombuffer(data, np.uint8)
            at += size
        held = int(np.count_nonzero(buffer[:at] == 10))
        if held != len(self):
            raise fmt.FormatError(f"{self.path}: the shards hold {len(self)} records but the key "
                                  f"files hold {held} keys")
        return buffer

    @property
    def keys_files(self) -> list[Path] | None:
        return None if self._keys_paths is None else list(self._keys_paths)

    @property
    def k(self) -> int:
        return self.geometry.k

    @property
    def height(self) -> int:
        return self.geometry.height

    @property
    def width(self) -> int:
        return self.geometry.width

    @property
    def num_classes(self) -> int:
        return self.geometry.num_classes

    @property
    def score_dtype(self) -> str:
        return self.geometry.score_dtype

    def __len__(self) -> int:
        return self.starts[-1]

    def __contains__(self, key: str) -> bool:
        return key in self._lookup()

    def _lookup(self) -> dict[str, int]:
        if self._key_to_index is None:
            if self.keys is None:
                raise KeyError(f"{self.path}: no keys file; access records by number")
            self._key_to_index = {key: i for i, key in enumerate(self.keys)}
        return self._key_to_index

    def index_of(self, key: str) -> int:
        try:
            return self._lookup()[key]
        except KeyError:
            raise KeyError(f"{self.path}: no label record for key {key!r}") from None

    # ---- records (memory-mapped per process) ------------------------------------------------
    def _open_maps(self) -> None:
        # Field views are taken once per shard: indexing them per record is then a single
        # strided view, several times cheaper than going through a structured scalar.
        self._maps, self._records, self._fields, self._raw = [], [], [], []
        dtype = self.geometry.record_dtype
        for shard_path, count in zip(self.shard_paths, self.counts):
            with open(shard_path, "rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if count else None
            records = (np.frombuffer(mapping, dtype=dtype, count=count, offset=fmt.HEADER_SIZE)
                       if count else np.empty(0, dtype))
            self._maps.append(mapping)
            self._records.append(records)
            self._fields.append((records["scores"], records["class_ids"],
                                 records["scale"].tolist(), records["offset"].tolist()))
            self._raw.append(records.view(np.uint8).reshape(count, dtype.itemsize))

    def _locate(self, key_or_index) -> tuple[int, int]:
        if isinstance(key_or_index, str):
            index = self._key_to_index.get(key_or_index) if self._key_to_index is not None else None
            if index is None:
                index = self.index_of(key_or_index)  # builds the table, or raises a clear KeyError
        else:
            index = int(key_or_index)
        total = self.starts[-1]
        if index < 0:
            index += total
        if not 0 <= index < total:
            raise IndexError(f"{self.path}: record {key_or_index} out of range [0, {total})")
        if len(self.counts) == 1:
            return 0, index
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def record(self, key_or_index) -> LabelRecord:
        if self._records is None:
            self._open_maps()
        shard, row = self._locate(key_or_index)
        scores, class_ids, scales, offsets = self._fields[shard]
        return LabelRecord(scores[row], class_ids[row], scales[row], offsets[row])

    def record_bytes(self, key_or_index) -> np.ndarray:
        """The stored record as a read-only uint8 view (``geometry.record_dtype`` layout)."""
        if self._records is None:
            self._open_maps()
        shard, row = self._locate(key_or_index)
        return self._raw[shard][row]

    def __getitem__(self, key_or_index) -> tuple[np.ndarray, np.ndarray]:
        scores, class_ids, scale, offset = self.record(key_or_index)
        return fmt.decode_scores(scores, scale, offset), class_ids.astype(np.int64)

    def corrupt_records(self, on_shard=None) -> Iterator[ShardCorruptError]:
        """Checks every record checksum and yields an error for each record that fails, naming
        shard, row and (when the keys were read) the sample key. ``on_shard(n)`` is called after each
        shard with its record count (for progress)."""
        if self._records is None:
            self._open_maps()
        for number, (shard_path, records) in enumerate(zip(self.shard_paths, self._records)):
            raw = self._raw[number]
            crcs = records["crc32"].tolist()
            for row in range(len(records)):
                computed = fmt.record_checksum(memoryview(raw[row]))
                if crcs[row] != computed:
                    key = self._keys[self.starts[number] + row] if self._keys is not None else None
                    named = f" (key {key!r})" if key is not None else ""
                    yield ShardCorruptError(f"{shard_path}: record {row}{named} checksum {crcs[row]:#010x}, "
                                            f"computed {computed:#010x}", shard_path, row, key)
            if on_shard is not None:
                on_shard(len(records))

    def verify(self) -> int:
        """Checks the key files and every record checksum; raises on the first failure and
        returns the number of records checked."""
        self.keys
        for error in self.corrupt_records():
            raise error
        return len(self)

    def close(self) -> None:
        self._records = self._fields = self._raw = None
        for mapping in self._maps or []:
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # a caller still holds a view; the OS unmaps at exit
                    pass
        self._maps = None

    # ---- pickling: only the path travels; workers reopen lazily ------------------------------
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        g = self.geometry
        return (f"LabelShardReader({str(self.path)!r}, records={len(self)}, k={g.k}, "
                f"map={g.height}x{g.width}, classes={g.num_classes}, scores={g.score_dtype})")
