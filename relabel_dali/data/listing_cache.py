"""Listings built once per node: a listing file named by what the listing was built from.

``data.listing_cache`` (``Dataset.listing_cache``) says where: ``auto`` is
``$RELABEL_DALI_LISTING_CACHE`` if set, else ``$RELABEL_DALI_CACHE/listings`` (default
``~/.cache/relabel_dali/listings``; the image sets the first to a folder under ``/tmp``, since its
operator cache is read-only), ``off`` builds the
listing in memory every time, anything else is a folder. The first process to need a listing
builds it under a lock and writes it atomically; every other rank (and later run) on the node
waits for the lock, then maps the file read-only (``listing_file.py``).

What names a listing (its ``identity``, hashed into the file name and checked inside the file):

* the names of the images: with ``data.file_list`` the SHA-256 of the file's bytes (the image root
  then plays no part: the listing holds relative paths); without one, the image root's resolved
  path and the modification times of the root and of each class folder in it (a file added,
  removed or renamed in a folder changes that folder's time). A folder changed less than
  ``RACY_S`` before the scan could change again within the same time stamp: such a listing is
  used but not kept;
* with label shards: their folder's resolved path, the SHA-256 of ``index.json`` (shard order,
  record counts and each keys file's CRC-32), the size and modification time of each keys file,
  and whether the keys were checked against their CRC-32s (``data.verify_labels``);
* the listing file's version and the listing rules' version (``RULES``).

The class map is not part of it: folder labels are computed again each time the file is opened.
A listing file that no run has opened for ``UNUSED_DAYS`` is removed when another one is written.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relabel_dali.data import bytestrings as bs
from relabel_dali.data.listing import (BadSampleError, Listing, MatchReport, find_records, image_lines,
                                       list_images, match_records, read_file_list, record_keys)
from relabel_dali.data.listing_file import VERSION, ListingFileError, open_listing, write_listing
from relabel_dali.data.settings import Dataset
from relabel_dali.store import format as fmt
from relabel_dali.store.labelmaps import IMAGE_SUFFIXES
from relabel_dali.store.reader import LabelShardReader

log = logging.getLogger(__name__)
RULES = 1  # bump when the same inputs would give another listing (order, key or suffix rules)
RACY_S = 2.0
UNUSED_DAYS = 30


def cache_folder(setting) -> Path | None:
    if setting in (None, "off"):
        return None
    if setting == "auto":
        if os.environ.get("RELABEL_DALI_LISTING_CACHE"):
            return Path(os.environ["RELABEL_DALI_LISTING_CACHE"]).expanduser()
        return Path(os.environ.get("RELABEL_DALI_CACHE") or Path.home() / ".cache" / "relabel_dali") / "listings"
    return Path(setting).expanduser()


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_times(root: Path) -> tuple[list, bool]:
    """(name, mtime_ns) of the root and of each folder a scan lists (``*``, hidden names
    skipped, links followed), and whether any changed less than ``RACY_S`` ago."""
    now = time.time_ns()
    times = [("", os.stat(root).st_mtime_ns)]
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    times.append((entry.name, entry.stat().st_mtime_ns))
            except OSError:
                continue
    times.sort()
    return times, any(now - mtime < RACY_S * 1e9 for _, mtime in times)


def identity(root: Path, file_list_data, reader: LabelShardReader | None) -> tuple[dict, bool]:
    """(what the listing is built from, whether a listing of it may be kept)."""
    keep = True
    names: dict
    if file_list_data is not None:
        names = {"file_list_sha256": _sha256(memoryview(file_list_data)[:len(file_list_data) - bs.PAD])}
    else:
        times, racy = folder_times(root)
        keep = not racy
        names = {"image_root": str(root.resolve()), "suffixes": sorted(IMAGE_SUFFIXES),
                 "folder_times_sha256": _sha256(json.dumps(times).encode())}
    found = {"version": VERSION, "rules": RULES, "names": names, "labels": None}
    if reader is not None:
        index = reader.path / fmt.INDEX_NAME
        stamps = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in reader.keys_files or []]
        found["labels"] = {"path": str(reader.path.resolve()), "keys_checked": reader.check_keys,
                           "index_sha256": _sha256(index.read_bytes()) if reader.path.is_dir() else None,
                           "keys_files_sha256": _sha256(json.dumps(stamps).encode())}
    return found, keep


def dataset_listing(dataset: Dataset, reader: LabelShardReader | None = None) -> Listing:
    """The dataset's listing, with each image's label record when ``reader`` is given: from the
    node's listing file when one was built from the same inputs, else built (and written when
    the cache folder is writable). Images without a record and records without an image are
    handled by ``dataset.on_bad_sample`` as ``match_records`` handles them."""
    root = Path(dataset.image_root)
    folder = cache_folder(dataset.listing_cache)
    if folder is None:
        return _in_memory(dataset, reader)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root}: not a folder")
    data = None
    if dataset.file_list is not None:
        try:
            data = bs.read_padded(dataset.file_list)
        except OSError as error:
            raise FileNotFoundError(f"data.file_list {dataset.file_list}: unreadable ({error.strerror})") from None
    found, keep = identity(root, data, reader)
    if not keep:
        log.info("%s changed in the last %s s: its listing is built but not kept", root, RACY_S)
        return _in_memory(dataset, reader)
    digest = _sha256(json.dumps(found, sort_keys=True).encode())
    path = folder / f"{root.name or 'images'}-{digest[:32]}.listing"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "w")
    except OSError as error:
        log.warning("data.listing_cache %s: %s; building the listing in memory", folder, error)
        return _in_memory(dataset, reader)
    with lock:
        try:  # builders on a node take turns; without locks (some network file systems) the rename still keeps files whole
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        listing, report = _open_or_build(path, dataset, data, reader, found, digest)
    if reader is not None:
        report.check(root, reader.path, dataset.on_bad_sample)
        if listing is None:
            raise BadSampleError(f"no image under {root} has a label record in {reader.path}")
    return listing


def _open_or_build(path: Path, dataset: Dataset, data, reader, found: dict, digest: str):
    """(listing or None, match report) from ``path``, or built and written there."""
    opened = dict(digest=digest, root=Path(dataset.image_root), class_map=dataset.class_map)
    if path.exists():
        try:
            found_listing = open_listing(path, **opened)
        except ListingFileError as error:
            log.warning("%s; building it again", error)
        else:
            try:
                os.utime(path)  # in use: kept by _prune
            except OSError:
                pass
            return found_listing
    with ThreadPoolExecutor(1) as pool:  # the shards' keys are read while the images are listed
        records = None if reader is None else pool.submit(record_keys, reader)
        if data is not None:
            lines = read_file_list(data, dataset.file_list)
            if not len(lines):
                raise ValueError(f"image root {dataset.image_root}: no images found (expected <root>/<class>/<file>)")
        else:
            lines, _ = image_lines(dataset.image_root)
        listing, keys = Listing.build(Path(dataset.image_root), lines, dataset.class_map)
        del lines
        if reader is None:
            report = MatchReport([], [])
        else:
            listing, report = find_records(listing, reader, keys, records.result())
    if listing is None:
        return listing, report
    try:
        write_listing(path, listing, found, digest, report)
    except OSError as error:
        log.warning("data.listing_cache %s: %s; the listing stays in memory", path.parent, error)
        return listing, report
    _prune(path.parent)
    return open_listing(path, **opened, verify=False)  # its CRC-32s were computed from these arrays


def _prune(folder: Path) -> None:
    """Removes listings no run has opened for ``UNUSED_DAYS`` (each open marks its file's
    modification time), so datasets that changed do not pile up."""
    oldest = time.time() - UNUSED_DAYS * 86400
    for stale in folder.glob("*.listing"):
        try:
            if stale.stat().st_mtime < oldest:
                stale.unlink()
                Path(f"{stale}.lock").unlink(missing_ok=True)
        except OSError:
            continue


def _in_memory(dataset: Dataset, reader: LabelShardReader | None) -> Listing:
    listing = list_images(dataset.image_root, file_list=dataset.file_list, class_map=dataset.class_map)
    if reader is not None:
        listing, _ = match_records(listing, reader, dataset.on_bad_sample)
    return listing
