#!/usr/bin/env python
"""Find every sample training would trip over, before training.

    python tools/check_dataset.py IMAGE_ROOT [--labels DIR] [--class-map FILE] [--json out.json]

Fully decodes each image, strictly: a truncated file, a non-image, an unreadable one, and a JPEG
whose entropy-coded data is damaged (libjpeg-turbo's "Corrupt JPEG data" warnings, which Pillow and
DALI decode to garbage without a word) are problems; a CMYK JPEG or a PNG named .JPEG decodes and is
only noted. With ``--labels`` it matches images to label records both ways, checks every keys file
against the index and every record checksum, and lists each corrupt record by key. Exit code 0: no
problems; 1: problems found (listed, and written to ``--json``); 2: the dataset could not be read at
all; 75: the ``--json`` report did not fit on the disk (one line names it, the bytes needed and
free). Progress goes to stderr (a line every 30 s when it is not a terminal).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path

from PIL import Image

from relabel_dali import FormatError, LabelShardReader
from relabel_dali.progress import progress
from relabel_dali.data.encoded import encoded_problem, jpeg_problem
from relabel_dali.data.listing import list_images
from relabel_dali.atomic import DISK_FULL_EXIT, DiskFullError, atomic_write_bytes

JPEG_MAGIC = b"\xff\xd8\xff"


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(problem, note) for one file; a note is something that decodes fine but is unusual."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"unreadable ({error.strerror})", None
    problem = encoded_problem(data)
    if problem:
        return problem, None
    is_jpeg = data[:3] == JPEG_MAGIC
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                if not is_jpeg:  # JPEG pixels are decoded below, strictly
                    image.load()
                fmt, mode = image.format, image.mode
    except Exception as error:  # PIL raises many types for broken files
        return f"does not decode ({type(error).__name__}: {error})", None
    if is_jpeg:
        problem = jpeg_problem(data)
        if problem:
            return problem, None
    notes = []
    if fmt and path.suffix.lower() in (".jpeg", ".jpg") and fmt != "JPEG":
        notes.append(f"{fmt} file named {path.suffix}")
    if mode not in ("RGB", "L"):
        notes.append(f"{mode} colour mode")
    return None, "; ".join(notes) or None


def check(image_root, label_root=None, *, class_map="folder") -> dict:
    listing = list_images(image_root, class_map=class_map)
    report = {"image_root": str(image_root), "label_root": None if label_root is None else str(label_root),
              "images": len(listing), "problems": [], "notes": []}
    for rel in progress(listing.paths, desc="check_dataset: decoding images", unit="img"):
        problem, note = check_image(listing.root / rel)
        if problem:
            report["problems"].append({"file": rel, "kind": "bad image", "detail": problem})
        if note:
            report["notes"].append({"file": rel, "detail": note})
    if label_root is not None:
        check_labels(LabelShardReader(label_root), listing, report)
    return report


def check_labels(reader: LabelShardReader, listing, report: dict) -> None:
    """Keys files against the index, images against records both ways, every record checksum."""
    problems = report["problems"]
    report["records"] = len(reader)
    try:
        keys = set(reader.keys or [])
    except FormatError as error:
        # Which record belongs to which image is unknown: matching is skipped, records still checked.
        problems.append({"file": str(reader.path), "kind": "corrupt keys file", "detail": str(error)})
        keys = None
    if keys is not None:
        for rel, key in zip(listing.paths, listing.keys):
            if key not in keys:
                problems.append({"file": rel, "kind": "no label record", "detail": f"key {key!r}"})
        for key in sorted(keys - set(listing.keys)):
            problems.append({"file": key, "kind": "label record without image", "detail": f"key {key!r}"})
    with progress(len(reader), desc="check_dataset: label records", unit="rec") as bar:
        for error in reader.corrupt_records(on_shard=bar.update):
            where = error.key if error.key is not None else f"{error.shard.name} record {error.row}"
            problems.append({"file": where, "kind": "corrupt label record", "detail": str(error)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", type=Path)
    parser.add_argument("--labels", type=Path, help="packed label shard folder (with index.json)")
    parser.add_argument("--class-map", default="folder", help="'folder' or a JSON of wnid -> index")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    try:
        report = check(args.image_root, args.labels, class_map=args.class_map)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for item in report["problems"]:
        print(f"PROBLEM {item['kind']}: {item['file']}: {item['detail']}")
    for item in report["notes"]:
        print(f"note: {item['file']}: {item['detail']} (decodes)")
    if args.json:
        try:
            atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
        except DiskFullError as error:
            print(f"error: {error}; free space (or raise the quota) and rerun", file=sys.stderr)
            return DISK_FULL_EXIT
    print(f"{report['images']} images, {report.get('records', 0)} label records: "
          f"{len(report['problems'])} problem(s), {len(report['notes'])} note(s)")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
