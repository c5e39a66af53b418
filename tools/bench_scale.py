#!/usr/bin/env python
"""What the data path costs at ImageNet scale, before the first image is decoded.

    python tools/bench_scale.py --json PATH [--plot PNG] [--sizes imagenet-1k,imagenet-21k] [--samples N]

For each size, a simulated dataset in a temporary folder: a file list of ImageNet-style paths
(``n<wnid>/n<wnid>_<i>.JPEG``, classes of equal size) and label shards for every sample (real
headers, keys files and index; the record bytes are sparse files, never read here). No image
exists: nothing measured reads one. Per size:

* ``build_s``: the training source built as the trainer builds it (listing from the file list, the
  index and keys read and checked, every key matched to its record), and its parts;
* ``pickled_bytes``, ``pickle_s``, ``unpickle_s``: the source as a spawned worker receives it;
* ``worker_rss_mb``: memory a worker holds for the listing, with spawn (resident growth after
  unpickling and touching every array) and with fork (private memory after touching it);
* ``epoch_boundary_s``: a new epoch's order for one rank (what the loader and each worker
  compute when an epoch starts; the order itself is ``epoch_order_mb``);

with the targets for 1.28M samples beside them. Rank 3 of 8, batch 128 per rank, as on one node.
Exit codes: 0 done (targets are reported, not enforced), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from relabel_dali.store import format as fmt
from relabel_dali.atomic import atomic_write_bytes
from relabel_dali.progress import progress
from relabel_dali.data.settings import TrainAugment
from relabel_dali.store.writer import LabelShardWriter

SIZES = {"imagenet-1k": (1_281_167, 1000), "imagenet-21k": (13_153_500, 21841)}
TARGETS = {"build_s": 10.0, "pickled_mb": 40.0, "unpickle_s": 0.3, "worker_rss_mb": 60.0, "epoch_boundary_s": 1.0}
RANK, WORLD_SIZE, BATCH = 3, 8, 128
RECORDS_PER_SHARD = 10_000


def make_dataset(root: Path, samples: int, classes: int) -> tuple[Path, Path, Path]:
    """A file list and label shards for ``samples`` images in ``classes`` class folders."""
    image_root, label_root = root / "train", root / "labels"
    image_root.mkdir(parents=True)
    per_class = np.full(classes, samples // classes)
    per_class[: samples % classes] += 1
    keys = [f"n{c:08d}/n{c:08d}_{i}" for c in range(classes) for i in range(per_class[c])]
    file_list = root / "train.txt"
    file_list.write_text("".join(f"{key}.JPEG\n" for key in keys))
    writer = LabelShardWriter(label_root, k=5, height=15, width=15, num_classes=classes, score_dtype="float16")
    record_size = writer.geometry.record_dtype.itemsize
    names = []
    with progress(len(keys), desc="simulated shards", unit="rec") as bar:
        for number, start in enumerate(range(0, len(keys), RECORDS_PER_SHARD)):
            chunk = keys[start:start + RECORDS_PER_SHARD]
            name = f"labels-{number:05d}"
            with open(writer.shard_path(name), "wb") as handle:
                handle.write(fmt.make_header(writer.geometry, len(chunk)).tobytes())
                handle.truncate(fmt.HEADER_SIZE + len(chunk) * record_size)  # sparse: records never read
            writer.keys_path(name).write_text("".join(key + "\n" for key in chunk))
            names.append(name)
            bar.update(len(chunk))
    writer.finalize(names)
    return image_root, file_list, label_root


def build_source(image_root: Path, file_list: Path, label_root: Path, classes: int):
    """The training source as ``loader.build_train_loader`` builds it, timed by part."""
    from relabel_dali.store.reader import LabelShardReader
    from relabel_dali.data.listing import list_images, match_records
    from relabel_dali.data.source import SampleSource

    times = {}
    started = time.perf_counter()
    listing = list_images(image_root, file_list=file_list, class_map="folder")
    times["listing_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    reader = LabelShardReader(label_root)
    times["index_load_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    reader.keys  # read and checked against the index
    times["keys_read_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    listing, _ = match_records(listing, reader)
    times["match_s"] = time.perf_counter() - mark
    source = SampleSource(listing, label_root, batch_size=BATCH, rank=RANK, world_size=WORLD_SIZE,
                          augment=TrainAugment())
    times["build_s"] = time.perf_counter() - started
    return source, times


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _private_kb() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        fields = dict(line.split()[:2] for line in rollup if line.split()[0].startswith("Private_"))
    return int(fields["Private_Clean:"]) + int(fields["Private_Dirty:"])


def _touch(source) -> None:
    """What a worker does with the listing: paths and record numbers by sample, every page read."""
    listing = source.listing
    for i in range(0, len(listing), max(1, len(listing) // 2000)):
        listing.path(i), int(listing.record_numbers[i])
    for array in (listing.dir_ids, listing.suffix_ids, listing.stems, listing.stem_offsets, listing.record_numbers):
        int(array.sum())


def _spawn_worker(payload: bytes, queue) -> None:
    import relabel_dali.data.source  # noqa: F401  (imports are not the listing's memory)

    gc.collect()
    before = _rss_kb()
    source = pickle.loads(payload)
    _touch(source)
    queue.put((_rss_kb() - before) / 1024)


_FORKED_SOURCE = None


def _fork_worker(queue) -> None:
    before = _private_kb()
    _touch(_FORKED_SOURCE)
    queue.put((_private_kb() - before) / 1024)


def worker_memory(source, payload: bytes) -> dict:
    global _FORKED_SOURCE
    out = {}
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    process = spawn.Process(target=_spawn_worker, args=(payload, queue))
    process.start()
    out["spawn"] = queue.get(timeout=600)
    process.join()
    _FORKED_SOURCE = source
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    process = fork.Process(target=_fork_worker, args=(queue,))
    process.start()
    out["fork"] = queue.get(timeout=600)
    process.join()
    _FORKED_SOURCE = None
    return out


def measure(name: str, samples: int, classes: int, tmp: Path) -> dict:
    started = time.perf_counter()
    image_root, file_list, label_root = make_dataset(tmp / name, samples, classes)
    result = {"samples": samples, "classes": classes, "make_data_s": time.perf_counter() - started}
    gc.collect()
    rss_before = _rss_kb()
    source, times = build_source(image_root, file_list, label_root, classes)
    result.update(times)
    result["listing_mb"] = source.listing.nbytes / 2 ** 20
    result["builder_rss_growth_mb"] = (_rss_kb() - rss_before) / 1024
    mark = time.perf_counter()
    payload = pickle.dumps(source)
    result["pickle_s"] = time.perf_counter() - mark
    result["pickled_mb"] = len(payload) / 2 ** 20
    mark = time.perf_counter()
    clone = pickle.loads(payload)
    result["unpickle_s"] = time.perf_counter() - mark
    del clone
    boundaries = []
    for epoch in (1, 2, 3):
        mark = time.perf_counter()
        source.epoch_slots(epoch)
        boundaries.append(time.perf_counter() - mark)
    result["epoch_boundary_s"] = float(np.median(boundaries))
    result["epoch_order_mb"] = source.epoch_slots(1).nbytes / 2 ** 20
    result["worker_rss_mb"] = worker_memory(source, payload)
    return result


def verdicts(result: dict) -> dict:
    """Each yardstick against the measured value: met / not met (targets are for 1.28M samples)."""
    measured = {"build_s": result["build_s"], "pickled_mb": result["pickled_mb"], "unpickle_s": result["unpickle_s"],
                "worker_rss_mb": max(result["worker_rss_mb"].values()), "epoch_boundary_s": result["epoch_boundary_s"]}
    return {key: {"measured": measured[key], "target": TARGETS[key], "met": measured[key] <= TARGETS[key]}
            for key in TARGETS}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["sizes"])
    keys = list(TARGETS)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for axis, key in zip(axes, keys):
        values = [results["sizes"][n]["verdicts"][key]["measured"] for n in names]
        axis.bar(names, values, color=["tab:green" if results["sizes"][n]["verdicts"][key]["met"] else "tab:red"
                                       for n in names])
        axis.axhline(TARGETS[key], color="black", linestyle="--", label="target at 1.28M")
        axis.set_title(key.replace("_", " "))
        axis.tick_params(axis="x", labelrotation=20)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"data path at scale (rank {RANK} of {WORLD_SIZE}); green: within the 1.28M target")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--plot", type=Path, help="optional bar chart PNG")
    parser.add_argument("--sizes", default="imagenet-1k", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--samples", type=int, help="one custom size instead (with --classes)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--tmp", type=Path, help="folder for the simulated data (default: the system's temp)")
    args = parser.parse_args(argv)
    if args.samples is not None:
        if args.samples < WORLD_SIZE * BATCH or args.classes < 1:
            parser.error(f"--samples must be >= {WORLD_SIZE * BATCH} and --classes >= 1")
        sizes = {f"custom-{args.samples}": (args.samples, args.classes)}
    else:
        unknown = [s for s in args.sizes.split(",") if s not in SIZES]
        if unknown:
            parser.error(f"--sizes: unknown {unknown}; expected some of {list(SIZES)}")
        sizes = {s: SIZES[s] for s in args.sizes.split(",")}
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "rank": RANK, "world_size": WORLD_SIZE, "batch_size": BATCH,
               "targets_at_1.28M": TARGETS, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, (samples, classes) in sizes.items():
            print(f"{name}: {samples} samples, {classes} classes", flush=True)
            result = measure(name, samples, classes, Path(tmp))
            result["verdicts"] = verdicts(result)
            results["sizes"][name] = result
            print(json.dumps(result,
                             indent=1), flush=True)
            gc.collect()
    atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
