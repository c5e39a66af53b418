"""LabelShardWriter: atomic, resumable writing of label shards and their index.

Each shard is streamed into a temporary file, its header written last, then fsync'd and renamed
into place; its ``.keys`` file follows the same way and marks the shard complete. ``finalize``
writes ``index.json`` last. A run killed at any point leaves only complete shards (plus a stray
temporary file that the next ``finalize`` removes), so a rerun skips them and carries on.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from . import format as fmt
from .atomic import atomic_open, atomic_write_bytes
from .reader import read_keys


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
    low, high = int(class_ids.min()), int(class_ids.max())
    if low < 0 or high >= geometry.num_classes:
        raise ValueError(f"class ids span [{low}, {high}], expected within [0, {geometry.num_classes - 1}]")


class ShardBuilder:
    """Streams the records of one shard; use through ``LabelShardWriter.shard(name)``."""

    def __init__(self, writer: "LabelShardWriter", name: str):
        self.writer, self.name = writer, name
        self.path = writer.out_dir / f"{name}{fmt.SHARD_SUFFIX}"
        self.keys: list[str] = []
        self.max_error = 0.0
        self._record = np.zeros((), dtype=writer.geometry.record_dtype)
        self._record_bytes = memoryview(self._record.reshape(1).view(np.uint8))
        self._handle = None

    def __enter__(self) -> "ShardBuilder":
        self._stack = ExitStack()
        self._handle = self._stack.enter_context(atomic_open(self.path))
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
        if exc_type is None:
            self._handle.seek(0)
            self._handle.write(fmt.make_header(self.writer.geometry, len(self.keys)).tobytes())
        # Renames the finished shard into place, or removes the temporary file on an exception.
        self._stack.__exit__(exc_type, exc, tb)
        self._handle = None
        if exc_type is None:
            atomic_write_bytes(self.writer.keys_path(self.name), "".join(k + "\n" for k in self.keys).encode())


class LabelShardWriter:
    """Writes shards named by the caller into ``out_dir``; ``finalize`` writes the index."""

    def __init__(self, out_dir: str | os.PathLike, *, k: int, height: int, width: int,
                 num_classes: int = 1000, score_dtype: str = "float16"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.geometry = fmt.Geometry(k, height, width, num_classes, fmt.score_dtype_code(score_dtype))
        self.geometry.validate()

    def shard_path(self, name: str) -> Path:
        return self.out_dir / f"{name}{fmt.SHARD_SUFFIX}"

    def keys_path(self, name: str) -> Path:
        return self.out_dir / f"{name}{fmt.KEYS_SUFFIX}"

    def shard(self, name: str) -> ShardBuilder:
        return ShardBuilder(self, name)

    def shard_done(self, name: str) -> bool:
        """True when a previous run completed this shard with the same geometry."""
        shard_path, keys_path = self.shard_path(name), self.keys_path(name)
        if not (shard_path.exists() and keys_path.exists()):
            return False
        with open(shard_path, "rb") as handle:
            geometry, count = fmt.parse_header(handle.read(fmt.HEADER_SIZE), str(shard_path))
        if geometry != self.geometry:
            raise fmt.FormatError(f"{shard_path}: existing shard has geometry {geometry}, this run writes "
                                  f"{self.geometry}; use a fresh output folder")
        return count == len(read_keys(keys_path))

    def finalize(self, names: list[str] | None = None) -> dict:
        """Writes index.json over the given complete shards (default: all, by name)."""
        if names is None:
            names = sorted(p.name[: -len(fmt.KEYS_SUFFIX)] for p in self.out_dir.glob(f"*{fmt.KEYS_SUFFIX}"))
        shards, seen = [], {}
        for name in names:
            if not self.shard_done(name):
                raise fmt.FormatError(f"{self.shard_path(name)}: shard is missing or incomplete")
            keys = read_keys(self.keys_path(name))
            for key in keys:
                if key in seen:
                    raise fmt.FormatError(f"duplicate key {key!r} in shards {seen[key]} and {name}")
                seen[key] = name
            shards.append({"file": self.shard_path(name).name, "keys": self.keys_path(name).name,
                           "records": len(keys)})
        g = self.geometry
        index = {"format": fmt.INDEX_FORMAT, "version": fmt.VERSION, "k": g.k, "height": g.height,
                 "width": g.width, "num_classes": g.num_classes, "score_dtype": g.score_dtype,
                 "layout": "k,y,x", "records": len(seen), "shards": shards}
        for stray in self.out_dir.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        atomic_write_bytes(self.out_dir / fmt.INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
        return index
