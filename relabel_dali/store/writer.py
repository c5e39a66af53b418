"""LabelShardWriter: atomic, resumable writing of label shards and their index.

Each shard is streamed into a temporary file, its header written last, then fsync'd and renamed
into place; its ``.keys`` file follows the same way and marks the shard complete. ``finalize``
writes ``index.json`` last, with each keys file's checksum. A run killed at any point leaves only
complete shards (plus a stray temporary file that the next ``finalize`` removes), so a rerun skips
them and carries on.

A rerun must continue *the same* job: a caller that names each shard's source files
(``shard(name, sources=...)``) gets them recorded beside the shard (``<name>.sources.json``: key,
path, size and modification time of each), and ``shard_done(name, sources=...)`` refuses a
complete shard made from anything else, saying what differs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from relabel_dali.store import format as fmt
from relabel_dali.atomic import atomic_open, atomic_write_bytes
from relabel_dali.store.reader import read_keys

SOURCES_SUFFIX = ".sources.json"


class SourcesChangedError(fmt.FormatError):
    """A complete shard on disk that was made from other source files than this run's."""


def describe_sources(sources: Mapping[str, os.PathLike], root: os.PathLike | None) -> list[list]:
    """[key, path (relative to ``root`` when given), size, mtime_ns] per source, in key order."""
    rows = []
    for key in sorted(sources):
        path = Path(sources[key])
        info = path.stat()
        shown = path.relative_to(root) if root is not None else path
        rows.append([key, shown.as_posix(), info.st_size, info.st_mtime_ns])
    return rows


def sources_difference(recorded: list[list], current: list[list]) -> str | None:
    """None when both lists describe the same files; otherwise what differs, with examples."""
    old = {row[0]: tuple(row[1:]) for row in recorded}
    new = {row[0]: tuple(row[1:]) for row in current}
    if old == new:
        return None
    parts = []
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    changed = sorted(key for key in set(old) & set(new) if old[key] != new[key])
    if changed:
        key = changed[0]
        (path_was, size_was, mtime_was), (path_now, size_now, mtime_now) = old[key], new[key]
        what = [f"path {path_was} -> {path_now}" if path_was != path_now else path_now]
        if size_was != size_now:
            what.append(f"{size_was} -> {size_now} bytes")
        if mtime_was != mtime_now:
            what.append("modified since")
        parts.append(f"{len(changed)} source file(s) changed (first: key {key!r}, {', '.join(what)})")
    if added:
        parts.append(f"{len(added)} key(s) not in the earlier run (first: {added[0]!r})")
    if gone:
        parts.append(f"{len(gone)} key(s) of the earlier run not in this one (first: {gone[0]!r})")
    return "; ".join(parts)


def validate_map(scores: np.ndarray, class_ids: np.ndarray, geometry: fmt.Geometry) -> None:
    """Raises ValueError saying which field is wrong, expected vs actual."""
    expected = (geometry.k, geometry.height, geometry.width)
    if scores.shape != expected:
        raise ValueError(f"scores shape {tuple(scores.shape)}, expected {expected} [k, H, W]")
    if class_ids.shape != expected:
        raise ValueError(f"class_ids shape {tuple(class_ids.shape)}, expected {expected} [k, H, W]")
    if not np.all(np.isfinite(scores)):
        bad = np.argwhere(~np.isfinite(scores))[0].tolist()
        raise ValueError(f"score at [k, y, x] = {bad} is {scores[tuple(bad)]}: NaN/inf scores are not stored")
    problem = fmt.score_fit_problem(scores, geometry.score_code)
    if problem:
        raise ValueError(problem)
    low, high = int(class_ids.min()), int(class_ids.max())
    if low < 0 or high >= geometry.num_classes:
        raise ValueError(f"class ids span [{low}, {high}], expected within [0, {geometry.num_classes - 1}]")


class ShardBuilder:
    """Streams the records of one shard; use through ``LabelShardWriter.shard(name)``."""

    def __init__(self, writer: "LabelShardWriter", name: str, sources: Mapping[str, os.PathLike] | None = None):
        self.writer, self.name, self.sources = writer, name, sources
        self.path = writer.out_dir / f"{name}{fmt.SHARD_SUFFIX}"
        self.keys: list[str] = []
        self.max_error = 0.0
        self._record = np.zeros((), dtype=writer.geometry.record_dtype)
        self._record_bytes = memoryview(self._record.reshape(1).view(np.uint8))
        self._handle = None

    def __enter__(self) -> "ShardBuilder":
        self._stack = ExitStack()
        # With its sources known, a full disk is reported with the whole shard's size.
        size = None if self.sources is None else \
            fmt.HEADER_SIZE + len(self.sources) * self.writer.geometry.record_dtype.itemsize
        self._handle = self._stack.enter_context(atomic_open(self.path, size_hint=size, size_qualifier="up to"))
        self._handle.write(b"\0" * fmt.HEADER_SIZE)  # the real header is written last
        return self

    def add(self, key: str, scores: np.ndarray, class_ids: np.ndarray) -> float:
        """Appends one map (float scores, integer ids, [k, H, W] canonical); returns its max
        quantization error."""
        if not key or "\n" in key or "\r" in key:
            raise ValueError(f"key {key!r}: keys must be non-empty single-line strings")
        scores = np.asarray(scores, dtype=np.float32)
        class_ids = np.asarray(class_ids)
        geometry = self.writer.geometry
        validate_map(scores, class_ids, geometry)
        stored, scale, offset = fmt.encode_scores(scores, geometry.score_code)
        record = self._record
        record["scale"], record["offset"] = scale, offset
        record["scores"] = stored
        record["class_ids"] = class_ids.astype(np.uint16)
        record["crc32"] = fmt.record_checksum(self._record_bytes)
        self._handle.write(self._record_bytes)
        self.keys.append(key)
        error = float(np.max(np.abs(fmt.decode_scores(stored, scale, offset) - scores)))
        self.max_error = max(self.max_error, error)
        return error

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = None
        if exc_type is None:
            try:
                self._complete()
            except BaseException as error:  # e.g. a full disk: the temporary file goes too
                failed, exc_type, exc, tb = error, type(error), error, error.__traceback__
        # Renames the finished shard into place, or removes the temporary file on an exception.
        self._stack.__exit__(exc_type, exc, tb)
        self._handle = None
        if failed is not None:
            raise failed
        if exc_type is None:
            try:
                atomic_write_bytes(self.writer.keys_path(self.name), "".join(k + "\n" for k in self.keys).encode())
            except BaseException:
                self.path.unlink(missing_ok=True)  # no shard without its keys: a rerun writes both
                raise

    def _complete(self) -> None:
        if self.sources is not None:
            # Before the keys file: a complete shard always has its sources record.
            rows = describe_sources(self.sources, self.writer.source_root)
            atomic_write_bytes(self.writer.sources_path(self.name), (json.dumps({"sources": rows}) + "\n").encode())
        self._handle.seek(0)
        self._handle.write(fmt.make_header(self.writer.geometry, len(self.keys)).tobytes())


class LabelShardWriter:
    """Writes shards named by the caller into ``out_dir``; ``finalize`` writes the index."""

    def __init__(self, out_dir: str | os.PathLike, *, k: int, height: int, width: int,
                 num_classes: int = 1000, score_dtype: str = "float16",
                 source_root: str | os.PathLike | None = None):
        """``source_root``: source paths are recorded relative to it (a moved tree still matches)."""
        self.out_dir = Path(out_dir)
        self.source_root = None if source_root is None else Path(source_root)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.geometry = fmt.Geometry(k, height, width, num_classes, fmt.score_dtype_code(score_dtype))
        self.geometry.validate()

    def shard_path(self, name: str) -> Path:
        return self.out_dir / f"{name}{fmt.SHARD_SUFFIX}"

    def keys_path(self, name: str) -> Path:
        return self.out_dir / f"{name}{fmt.KEYS_SUFFIX}"

    def sources_path(self, name: str) -> Path:
        return self.out_dir / f"{name}{SOURCES_SUFFIX}"

    def shard(self, name: str, sources: Mapping[str, os.PathLike] | None = None) -> ShardBuilder:
        """A builder for shard ``name``; ``sources`` (key -> file) are recorded for resume checks."""
        return ShardBuilder(self, name, sources)

    def shard_done(self, name: str, sources: Mapping[str, os.PathLike] | None = None) -> bool:
        """True when a previous run completed this shard with the same geometry. With ``sources``
        the shard must also have been made from exactly these files (same keys, paths, sizes and
        modification times), or :class:`SourcesChangedError` says what differs."""
        shard_path, keys_path = self.shard_path(name), self.keys_path(name)
        if not (shard_path.exists() and keys_path.exists()):
            return False
        with open(shard_path, "rb") as handle:
            geometry, count = fmt.parse_header(handle.read(fmt.HEADER_SIZE), str(shard_path))
        if geometry != self.geometry:
            raise fmt.FormatError(f"{shard_path}: existing shard has geometry {geometry}, this run writes "
                                  f"{self.geometry}; use a fresh output folder")
        if count != len(read_keys(keys_path)):
            return False
        if sources is not None:
            self.check_sources(name, sources)
        return True

    def check_sources(self, name: str, sources: Mapping[str, os.PathLike]) -> None:
        path = self.sources_path(name)
        if not path.exists():
            raise SourcesChangedError(f"{self.shard_path(name)}: complete shard without a record of its source "
                                      f"files ({path.name}): written by another tool (tools/relabel.py) or "
                                      f"an older version, so this run cannot tell it holds the same data")
        try:
            recorded = json.loads(path.read_text())["sources"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SourcesChangedError(f"{path}: unreadable sources record ({error})") from None
        difference = sources_difference(recorded, describe_sources(sources, self.source_root))
        if difference:
            raise SourcesChangedError(f"{self.shard_path(name)}: made from other source files than this "
                                      f"run's: {difference}")

    def finalize(self, names: list[str] | None = None) -> dict:
        """Writes index.json over the given complete shards (default: all, by name)."""
        if names is None:
            names = sorted(p.name[: -len(fmt.KEYS_SUFFIX)] for p in self.out_dir.glob(f"*{fmt.KEYS_SUFFIX}"))
        shards, seen = [], {}
        for name in names:
            if not self.shard_done(name):
                raise fmt.FormatError(f"{self.shard_path(name)}: shard is missing or incomplete")
            keys_bytes = self.keys_path(name).read_bytes()
            keys = read_keys(self.keys_path(name))
            for key in keys:
                if key in seen:
                    raise fmt.FormatError(f"duplicate key {key!r} in shards {seen[key]} and {name}")
                seen[key] = name
            shards.append({"file": self.shard_path(name).name, "keys": self.keys_path(name).name,
                           "records": len(keys), "keys_crc32": fmt.checksum(keys_bytes)})
        g = self.geometry
        index = {"format": fmt.INDEX_FORMAT, "version": fmt.VERSION, "k": g.k, "height": g.height,
                 "width": g.width, "num_classes": g.num_classes, "score_dtype": g.score_dtype,
                 "layout": "k,y,x", "records": len(seen), "shards": shards}
        for stray in self.out_dir.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        atomic_write_bytes(self.out_dir / fmt.INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
        return index
