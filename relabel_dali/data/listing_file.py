"""The listing file: a built listing on disk, mapped read-only by every rank and worker of a node.

One copy of the listing then lives in the page cache, shared, instead of one unpickled copy per
process; a spawned worker receives the file's name, not its arrays (``Listing.__reduce__``).

Layout, little-endian: a 64-byte header (``HEADER``), the arrays each at a 64-byte aligned offset,
then a UTF-8 JSON trailer: what the listing was built from (``identity``, and its ``digest``),
the folder and suffix tables, where each array lies, and the record-matching report. The file is
written whole to a temporary name and renamed into place (``atomic.py``), its header last, so a
file with a valid header is complete. The header, the trailer and each array carry CRC-32s: the
file is a cache, rebuilt when anything about it looks wrong.
"""
from __future__ import annotations

import json
import mmap
import zlib
from pathlib import Path

import numpy as np

from relabel_dali.atomic import atomic_open
from relabel_dali.data.listing import Listing, MatchReport, label_dirs

MAGIC = b"RLDLIST1"
VERSION = 1
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("header_size", "<u4"), ("meta_offset", "<u8"),
                   ("meta_size", "<u8"), ("count", "<u8"), ("meta_crc32", "<u4"), ("reserved", "V16"),
                   ("header_crc32", "<u4")])
assert HEADER.itemsize == 64
ALIGN = 64
# array -> the dtypes it may be stored as (little-endian; offsets and record numbers widen past 2**31)
ARRAYS = {"dir_ids": ("<i4",), "suffix_ids": ("|u1",), "stems": ("|u1",), "stem_offsets": ("<i4", "<i8"),
          "record_numbers": ("<i4", "<i8")}


class ListingFileError(ValueError):
    """A listing file that cannot be used (damaged, another version, another dataset)."""


def write_listing(path: Path, listing: Listing, identity: dict, digest: str, report: MatchReport) -> None:
    """Writes ``listing`` (its arrays, folder and suffix tables) with what it was built from."""
    placed = {}
    with atomic_open(path) as handle:
        handle.write(bytes(HEADER.itemsize))
        for name in ARRAYS:
            array = getattr(listing, name)
            if array is None:
                continue
            stored = np.ascontiguousarray(array, np.dtype(array.dtype).newbyteorder("<"))
            handle.write(bytes(-handle.tell() % ALIGN))
            offset = handle.tell()
            handle.write(memoryview(stored).cast("B"))
            placed[name] = {"offset": offset, "dtype": stored.dtype.str, "count": int(stored.size),
                            "crc32": zlib.crc32(stored)}
        meta = json.dumps({"identity": identity, "digest": digest, "dirs": list(listing.dirs),
                           "suffixes": list(listing.suffixes), "arrays": placed,
                           "report": {"dropped": report.dropped, "unused_records": report.unused_records,
                                      "dropped_count": report.dropped_count,
                                      "unused_count": report.unused_count}}).encode()
        meta_offset = handle.tell()
        handle.write(meta)
        header = np.zeros((), HEADER)
        header["magic"], header["version"], header["header_size"] = MAGIC, VERSION, HEADER.itemsize
        header["meta_offset"], header["meta_size"], header["count"] = meta_offset, len(meta), len(listing)
        header["meta_crc32"] = zlib.crc32(meta)
        header["header_crc32"] = zlib.crc32(header.tobytes()[:60])
        handle.seek(0)
        handle.write(header.tobytes())


def _open(path: Path, verify: bool = True) -> tuple[mmap.mmap, dict, dict]:
    """(the read-only mapping, the trailer, the arrays as read-only views), every field checked;
    with ``verify`` each array against its CRC-32 too (0.3 s for 13M samples: each rank does it
    once, a worker reopening what its rank checked does not)."""
    try:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:
        raise ListingFileError(f"{path}: cannot be mapped ({error})") from None
    if len(mapping) < HEADER.itemsize:
        raise ListingFileError(f"{path}: {len(mapping)} bytes, shorter than its header")
    header = np.frombuffer(mapping, HEADER, 1)[0]
    if bytes(header["magic"]) != MAGIC:
        raise ListingFileError(f"{path}: not a listing file (magic {bytes(header['magic'])!r})")
    if zlib.crc32(mapping[:60]) != int(header["header_crc32"]):
        raise ListingFileError(f"{path}: header checksum mismatch")
    if int(header["version"]) != VERSION:
        raise ListingFileError(f"{path}: listing file version {int(header['version'])}, this code reads {VERSION}")
    start, size = int(header["meta_offset"]), int(header["meta_size"])
    if start + size != len(mapping):
        raise ListingFileError(f"{path}: {len(mapping)} bytes, the header says {start + size}")
    meta_bytes = mapping[start:start + size]
    if zlib.crc32(meta_bytes) != int(header["meta_crc32"]):
        raise ListingFileError(f"{path}: trailer checksum mismatch")
    meta = json.loads(meta_bytes)
    count = int(header["count"])
    arrays = {}
    for name, where in meta["arrays"].items():
        if name not in ARRAYS or where["dtype"] not in ARRAYS[name]:
            raise ListingFileError(f"{path}: array {name} stored as {where['dtype']}")
        dtype = np.dtype(where["dtype"])
        if not HEADER.itemsize <= where["offset"] <= start - where["count"] * dtype.itemsize:
            raise ListingFileError(f"{path}: array {name} lies outside the file")
        arrays[name] = np.frombuffer(mapping, dtype, where["count"], where["offset"])
        if verify and zlib.crc32(arrays[name]) != where["crc32"]:
            raise ListingFileError(f"{path}: array {name} checksum mismatch")
    expected = {"dir_ids": count, "suffix_ids": count, "stem_offsets": count + 1, "record_numbers": count}
    for name, length in expected.items():
        if name in arrays and len(arrays[name]) != length:
            raise ListingFileError(f"{path}: array {name} holds {len(arrays[name])} values, expected {length}")
    return mapping, meta, arrays


def _listing(path: Path, meta: dict, arrays: dict, root, dir_labels: np.ndarray) -> Listing:
    return Listing(Path(root), tuple(meta["dirs"]), dir_labels, tuple(meta["suffixes"]), arrays["dir_ids"],
                   arrays["suffix_ids"], arrays["stems"], arrays["stem_offsets"], arrays.get("record_numbers"),
                   file=(path, meta["digest"]))


def open_listing(path, *, digest: str, root, class_map, verify: bool = True) -> tuple[Listing, MatchReport]:
    """The listing in ``path`` (labels from ``class_map``) and its record-matching report;
    ``digest``: what the caller expects it to have been built from; ``verify``: check each array
    against its CRC-32 (the process that has just written the file computed them itself)."""
    path = Path(path)
    _, meta, arrays = _open(path, verify)
    if meta.get("digest") != digest:
        raise ListingFileError(f"{path}: built from other inputs (digest {meta.get('digest')}, expected {digest})")
    listing = _listing(path, meta, arrays, root, label_dirs(root, meta["dirs"], class_map))
    return listing, MatchReport(**meta["report"])


def reopen(path: str, digest: str, root: str, dir_labels: np.ndarray) -> Listing:
    """A pickled file-backed listing, unpickled (in a spawned worker): the same file mapped again."""
    path = Path(path)
    _, meta, arrays = _open(path, verify=False)
    if meta.get("digest") != digest:
        raise ListingFileError(f"{path}: replaced by a listing of other inputs since this one was opened")
    return _listing(path, meta, arrays, root, dir_labels)
