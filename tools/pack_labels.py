#!/usr/bin/env python
"""Pack a tree of official ReLabel (or TokenLabeling) label maps into label shards.

    python tools/pack_labels.py SRC OUT [--topk K] [--dtype float32|float16|uint8]
        [--records-per-shard N] [--workers N] [--layout official|yx|tokenlabeling] [--image-root DIR]
        [--on-error fail|skip]

SRC holds ``<wnid>/<image>.pt`` files (or ``.npy``/``.npz``) of shape ``[2, k, H, W]``. Keys are the
paths relative to SRC without extension; records are stored in sorted key order, shard ``j`` holding
the ``j``-th run of ``--records-per-shard`` source files. The map size is the most common one among
up to 101 files sampled evenly across SRC; files of another size are bad files.

A killed run is resumed by running the same command again: complete shards are kept, the rest are
written, and the output is byte-identical to an uninterrupted run. A complete shard is kept only
when it was made from the same source files (keys, paths, sizes, modification times, recorded in
``labels-NNNNN.sources.json``); otherwise the run stops and says what differs (docs/FAILURES.md).

Exit codes: 0 everything packed; 1 a bad file stopped the run (``--on-error fail``) or bad arguments;
3 the run finished but skipped bad files (``--on-error skip``; they are listed in the summary and in
OUT/skipped.json); 75 the disk (or quota) is full: one line names the file, the bytes needed and the
bytes free, nothing partial is left, and the same command resumes once space is freed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

from relabel_dali.store import format as fmt
from relabel_dali.store.labelmaps import (FLOAT16_MAX_EXACT_ID, LABEL_SUFFIXES, LAYOUTS, LabelMapError, is_image,
                                          label_key, load_label_file, to_canonical)
from relabel_dali.progress import progress
from relabel_dali.atomic import DISK_FULL_EXIT, DiskFullError, atomic_write_bytes, describe_bytes
from relabel_dali.store.writer import LabelShardWriter, SourcesChangedError

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3
SETTINGS_NAME = "pack_settings.json"
SIZE_SAMPLE = 101  # files read to decide the map size (odd: no ties between two sizes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="tree of official label maps (.pt/.npy/.npz)")
    parser.add_argument("out", type=Path, help="output folder for shards and index.json")
    parser.add_argument("--topk", type=int, default=5, help="entries kept per location (default 5)")
    parser.add_argument("--dtype", choices=sorted(fmt.SCORE_DTYPE_NAMES), default="float16",
                        help="stored score dtype (default float16)")
    parser.add_argument("--records-per-shard", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1, help="processes reading source files")
    parser.add_argument("--layout", choices=LAYOUTS, default="official",
                        help="official: ReLabel's files as released (last axis vertical); yx: already [k, y, x]; "
                             "tokenlabeling: TokenLabeling's [2, 5, H, W] float16 files (rows first)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-root", type=Path, help="report label files without images and vice versa")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.records_per_shard < 1 or args.workers < 1:
        parser.error("--topk, --records-per-shard and --workers must be positive")
    if args.layout == "tokenlabeling" and args.num_classes - 1 > FLOAT16_MAX_EXACT_ID:
        parser.error(f"--layout tokenlabeling: the files' class ids are float16, exact only up to "
                     f"{FLOAT16_MAX_EXACT_ID}, so ids of {args.num_classes} classes cannot be told apart; "
                     f"make such maps with tools/relabel.py (uint16 ids) instead")
    return args


def find_sources(src: Path) -> tuple[dict[str, Path], list[dict]]:
    """(key -> file, duplicates): of two files with one key (a.npy, a.pt) the first in sorted
    path order is the source, the other a duplicate."""
    if not src.is_dir():
        raise LabelMapError(f"{src}: source folder does not exist")
    sources: dict[str, Path] = {}
    duplicates = []
    for path in sorted(src.rglob("*")):
        if path.suffix not in LABEL_SUFFIXES or not path.is_file():
            continue
        key = label_key(path, src)
        if key in sources:
            duplicates.append({"key": key, "file": str(path),
                               "error": f"{path}: duplicate key {key!r}, already given by {sources[key]}"})
        else:
            sources[key] = path
    return sources, duplicates


def find_images(root: Path) -> set[str]:
    return {label_key(p, root) for p in root.rglob("*") if is_image(p)}


class Converter:
    """Picklable per-file work for the worker pool: load, validate, convert to canonical."""

    def __init__(self, topk: int, num_classes: int, layout: str, score_dtype: str):
        self.topk, self.num_classes, self.layout = topk, num_classes, layout
        self.score_code = fmt.score_dtype_code(score_dtype)

    def __call__(self, item: tuple[str, Path]):
        key, path = item
        try:
            array = load_label_file(path)
            scores, class_ids = to_canonical(array, topk=self.topk, num_classes=self.num_classes,
                                             layout=self.layout, source=str(path))
            problem = fmt.score_fit_problem(scores, self.score_code)
            if problem:
                return key, path, None, None, f"{path}: {problem} (--dtype float32 or uint8)"
            return key, path, scores, class_ids, None
        except LabelMapError as error:
            return key, path, None, None, str(error)


def dataset_map_size(convert: Converter, keys: list[str], sources: dict[str, Path], on_error: str,
                     sample: int = SIZE_SAMPLE) -> tuple[tuple[int, int], str]:
    """(map size, how it was decided): the most common size among up to ``sample`` readable files
    spread evenly over the sorted keys, so one odd file (even the first) cannot set the size of a
    whole dataset. Files of other sizes become bad files."""
    count = min(sample, len(keys))
    picks = sorted({round(i * (len(keys) - 1) / max(count - 1, 1)) for i in range(count)})
    sizes: dict[tuple[int, int], list[str]] = {}
    for position in picks:
        key = keys[position]
        _, path, scores, _, error = convert((key, sources[key]))
        if error is not None:
            if on_error == "fail":
                raise LabelMapError(error)
            continue
        sizes.setdefault(tuple(scores.shape[1:]), []).append(str(path))
    if not sizes:
        raise LabelMapError(f"none of the {len(picks)} label files sampled could be read")
    ranked = Counter({size: len(paths) for size, paths in sizes.items()}).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise LabelMapError("no map size is the most common among the sampled files: "
                            + ", ".join(f"{h}x{w} ({n}, e.g. {sizes[(h, w)][0]})" for (h, w), n in ranked))
    size, votes = ranked[0]
    decided = f"the size of {votes} of {sum(len(p) for p in sizes.values())} sampled files"
    odd = [f"{h}x{w}: {n} (e.g. {sizes[(h, w)][0]})" for (h, w), n in ranked[1:]]
    return size, decided + (f"; other sizes sampled: {'; '.join(odd)}" if odd else "")


def check_settings(out: Path, settings: dict) -> None:
    """A resumed run must use the settings of the run it continues, or the shards would mix."""
    path = out / SETTINGS_NAME
    if not path.exists() and any(out.glob(f"*{fmt.KEYS_SUFFIX}")):
        raise SystemExit(f"error: {out} already holds label shards not written by pack_labels.py (no "
                         f"{SETTINGS_NAME}; e.g. written by tools/relabel.py); pack into a fresh output folder")
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise SystemExit(f"error: {out} was packed with other settings ({', '.join(changed)} differ); "
                             f"use a fresh output folder or the same arguments")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


def pack(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    sources, duplicates = find_sources(args.src)
    if duplicates and args.on_error == "fail":
        print(f"error: {duplicates[0]['error']}", file=sys.stderr)
        return EXIT_FAILED
    if not sources:
        print(f"error: no {'/'.join(LABEL_SUFFIXES)} files under {args.src}", file=sys.stderr)
        return EXIT_FAILED
    keys = sorted(sources)
    settings = {"topk": args.topk, "dtype": args.dtype, "layout": args.layout, "num_classes": args.num_classes,
                "records_per_shard": args.records_per_shard, "sources": len(keys)}
    check_settings(args.out, settings)

    convert = Converter(args.topk, args.num_classes, args.layout, args.dtype)
    (height, width), size_decided = dataset_map_size(convert, keys, sources, args.on_error)
    print(f"map size {height}x{width}: {size_decided}", flush=True)
    writer = LabelShardWriter(args.out, k=args.topk, height=height, width=width,
                              num_classes=args.num_classes, score_dtype=args.dtype, source_root=args.src)
    chunks = [keys[i:i + args.records_per_shard] for i in range(0, len(keys), args.records_per_shard)]
    names = [f"labels-{j:05d}" for j in range(len(chunks))]
    todo, mismatched = [], []
    for name, chunk in zip(names, chunks):
        try:
            if not writer.shard_done(name, sources={key: sources[key] for key in chunk}):
                todo.append((name, chunk))
        except SourcesChangedError as error:
            mismatched.append(str(error))
    if mismatched:
        print(f"error: {args.out} holds {len(mismatched)} complete shard(s) that this run would not write: "
              f"another dataset, or source files changed since they were packed:", file=sys.stderr)
        for line in mismatched[:10]:
            print(f"  {line}", file=sys.stderr)
        if len(mismatched) > 10:
            print(f"  ... and {len(mismatched) - 10} more", file=sys.stderr)
        print("pack into a fresh output folder, or delete the named shards' files (labels-NNNNN.*) to repack "
              "them", file=sys.stderr)
        return EXIT_FAILED
    resumed = len(chunks) - len(todo)

    pool = get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    skipped_now, written, max_error = [], 0, 0.0
    bar = progress(sum(len(c) for _, c in todo), desc="pack_labels", unit="map")
    try:
        for name, chunk in todo:
            items = [(key, sources[key]) for key in chunk]
            results = pool.imap(convert, items, chunksize=32) if pool else map(convert, items)
            shard_skipped = []
            with writer.shard(name, sources=dict(items)) as shard:
                for key, path, scores, class_ids, error in results:
                    bar.update()
                    if error is None and (scores.shape[1:] != (height, width)):
                        error = (f"{path}: map is {scores.shape[1]}x{scores.shape[2]}, the dataset's is "
                                 f"{height}x{width} ({size_decided.split(';')[0]})")
                    if error is not None:
                        if args.on_error == "fail":
                            raise LabelMapError(error)
                        shard_skipped.append({"key": key, "file": str(path), "error": error})
                        continue
                    max_error = max(max_error, shard.add(key, scores, class_ids))
                    written += 1
                # Recorded before the shard completes, so a finished shard always has its skip list.
                atomic_write_bytes(args.out / f"{name}.skipped.json",
                                   (json.dumps(shard_skipped, indent=1) + "\n").encode())
            skipped_now.extend(shard_skipped)
    except LabelMapError as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        print("nothing of the failed shard was kept; fix or remove the file (or use --on-error skip) "
              "and rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    except DiskFullError as error:
        bar.close()
        left = [(name, chunk) for name, chunk in todo if not writer.shard_done(name)]
        size = sum(fmt.HEADER_SIZE + len(chunk) * writer.geometry.record_dtype.itemsize for _, chunk in left)
        print(f"error: {error}; the {len(left)} shard(s) not yet written need up to {describe_bytes(size)} in all: "
              f"free space (or raise the quota) and rerun the same command (complete shards are kept)",
              file=sys.stderr)
        return DISK_FULL_EXIT
    finally:
        if pool:
            pool.terminate()
    bar.close()

    index = writer.finalize(names)
    skipped = list(duplicates)
    for name in names:
        path = args.out / f"{name}.skipped.json"
        skipped.extend(json.loads(path.read_text()) if path.exists() else [])
    atomic_write_bytes(args.out / "skipped.json", (json.dumps(skipped, indent=1) + "\n").encode())
    report_summary(args, index, sources, skipped, resumed, len(chunks), written, max_error,
                   time.perf_counter() - started)
    return EXIT_SKIPPED if skipped else EXIT_OK


def report_summary(args, index, sources, skipped, resumed, total_shards, written, max_error, seconds) -> None:
    shard_bytes = sum((args.out / s["file"]).stat().st_size for s in index["shards"])
    input_bytes = sum(p.stat().st_size for p in sources.values())
    records = index["records"]
    lines = [
        f"packed {records} records into {total_shards} shards in {args.out} "
        f"({resumed} shards kept from an earlier run)",
        f"  bytes written: {shard_bytes:,} ({shard_bytes / max(records, 1):,.0f} bytes/record, "
        f"{shard_bytes / max(input_bytes, 1):.3f} of the {input_bytes:,} input bytes)",
        f"  speed: {written / max(seconds, 1e-9):,.0f} records/s this run ({written} records in {seconds:.1f} s)",
        f"  scores: {args.dtype}, max abs quantization error this run: {max_error:.3g}",
        f"  skipped: {len(skipped)} bad files" + (" (see skipped.json)" if skipped else ""),
    ]
    for item in skipped[:20]:
        lines.append(f"    {item['error']}")
    if args.image_root is not None:
        images = find_images(args.image_root)
        labels = set(sources)
        no_image, no_label = sorted(labels - images), sorted(images - labels)
        lines.append(f"  image root {args.image_root}: {len(images)} images; {len(no_image)} label files "
                     f"without an image, {len(no_label)} images without a label file")
        for title, keys in (("label file without image", no_image), ("image without label file", no_label)):
            lines.extend(f"    {title}: {key}" for key in keys[:10])
            if len(keys) > 10:
                lines.append(f"    ... and {len(keys) - 10} more")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return pack(args)
    except (LabelMapError, fmt.FormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except DiskFullError as error:  # settings, index or skip list: nothing partial is left either
        print(f"error: {error}; free space (or raise the quota) and rerun the same command", file=sys.stderr)
        return DISK_FULL_EXIT


if __name__ == "__main__":
    sys.exit(main())
