#!/usr/bin/env python
"""What the data path costs at ImageNet scale, before the first image is decoded.

    python tools/bench_scale.py --json PATH [--plot PNG] [--sizes imagenet-1k,imagenet-21k] [--samples N]

For each size, a simulated dataset in a temporary folder: a file list of ImageNet-style paths
(``n<wnid>/n<wnid>_<i>.JPEG``, classes of equal size, in class order and image number order, so
not sorted) and label shards for every sample, their keys in sorted order as the packers write
them (real headers, keys files and index; the record bytes are sparse files, never read here).
No image exists: nothing measured reads one. Per size:

* ``build_s``: the training listing as the trainer gets it on a node that has not built it yet
  (``listing_cache.dataset_listing``: the file list read and hashed, the listing built, every key
  matched to its record, the listing file written and mapped; ``build_cpu_s``: the processor time
  it took, both threads together, which other jobs on the host do not inflate as much), and,
  measured apart, its parts
  (``listing_s``, ``keys_read_s``, ``match_s``, ``write_s``) and the matching of records kept in
  another order (``match_other_order_s``: shuffled, so every key is looked up by hash);
* ``cached_build_s``: the same on a node that has built it before (the listing file is there);
* ``pickled_bytes``, ``pickle_s``, ``unpickle_s``: the source as a spawned worker receives it;
* ``worker_mb``: memory a worker holds for the listing: with spawn its own (anonymous) memory
  after unpickling the source and reading every array, and apart from it the listing file's
  pages it maps (``spawn_mapped``: shared by every process of the node through the page cache);
  with fork the pages it had to copy (private dirty memory) after reading every array;
* ``epoch_boundary_s``: a new epoch's order for one rank (what the loader and each worker
  compute when an epoch starts; the order itself is ``epoch_order_mb``);

each against its target (``TARGETS``: ImageNet-1k's from before the listing file, and the
targets at 13M samples). Rank 3 of 8, batch 128 per rank, as on one node.
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
TARGETS = {
    "imagenet-1k": {"build_s": 10.0, "cached_build_s": 2.0, "pickled_mb": 40.0, "unpickle_s": 0.3,
                    "worker_mb": 60.0, "epoch_boundary_s": 1.0},
    "imagenet-21k": {"build_s": 15.0, "cached_build_s": 2.0, "pickled_mb": 1.0, "unpickle_s": 0.3,
                     "worker_mb": 50.0, "epoch_boundary_s": 1.0},
}
RANK, WORLD_SIZE, BATCH = 3, 8, 128
RECORDS_PER_SHARD = 10_000


def targets(samples: int) -> dict:
    """ImageNet-1k's targets up to its size, the 13M-sample ones beyond."""
    return TARGETS["imagenet-1k" if samples <= SIZES["imagenet-1k"][0] else "imagenet-21k"]


def make_dataset(root: Path, samples: int, classes: int) -> tuple[Path, Path, Path]:
    """A file list and label shards for ``samples`` images in ``classes`` class folders."""
    image_root, label_root = root / "train", root / "labels"
    image_root.mkdir(parents=True)
    per_class = np.full(classes, samples // classes)
    per_class[: samples % classes] += 1
    keys = [f"n{c:08d}/n{c:08d}_{i}" for c in range(classes) for i in range(per_class[c])]
    file_list = root / "train.txt"
    file_list.write_text("".join(f"{key}.JPEG\n" for key in keys))
    # The records in sorted key order, as tools/pack_labels.py and tools/relabel.py write them.
    numbers = {count: sorted(range(count), key=str) for count in set(per_class.tolist())}
    keys = [f"n{c:08d}/n{c:08d}_{i}" for c in range(classes) for i in numbers[int(per_class[c])]]
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


def build_source(image_root: Path, file_list: Path, label_root: Path, classes: int, cache: Path):
    """The training source as ``loader.build_train_loader`` builds it, with its listing from the
    listing file in ``cache`` (built there when absent): (source, seconds)."""
    from relabel_dali.data.listing_cache import dataset_listing
    from relabel_dali.data.settings import Dataset
    from relabel_dali.data.source import SampleSource
    from relabel_dali.store.reader import LabelShardReader

    started, cpu = time.perf_counter(), time.process_time()
    dataset = Dataset(image_root, file_list=file_list, class_map="folder", num_classes=classes,
                      listing_cache=str(cache))
    listing = dataset_listing(dataset, LabelShardReader(label_root))
    source = SampleSource(listing, label_root, batch_size=BATCH, rank=RANK, world_size=WORLD_SIZE,
                          augment=TrainAugment())
    return source, time.perf_counter() - started, time.process_time() - cpu


def build_parts(image_root: Path, file_list: Path, label_root: Path, classes: int, tmp: Path) -> dict:
    """What ``build_s`` is made of, each part timed on its own (in memory, then written)."""
    from relabel_dali.data.listing import Listing, find_records, image_lines, record_keys
    from relabel_dali.data.listing_file import open_listing, write_listing
    from relabel_dali.store.reader import LabelShardReader

    times = {}
    mark = time.perf_counter()
    lines, _ = image_lines(image_root, file_list=file_list)
    listing, keys = Listing.build(image_root, lines, "folder")
    del lines
    times["listing_s"] = time.perf_counter() - mark
    reader = LabelShardReader(label_root)
    mark = time.perf_counter()
    reader.keys_buffer()  # read and checked against the index
    times["keys_read_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    matched, report = find_records(listing, reader, keys)
    times["match_s"] = time.perf_counter() - mark  # the keys read again, then matched
    records = record_keys(reader)
    shuffled = records.take(np.random.default_rng(0).permutation(len(records)))
    del records
    mark = time.perf_counter()
    find_records(listing, reader, keys, shuffled)
    times["match_other_order_s"] = time.perf_counter() - mark
    listing = matched
    del keys, shuffled, matched
    mark = time.perf_counter()
    write_listing(tmp / "parts.listing", listing, {}, "parts", report)
    open_listing(tmp / "parts.listing", digest="parts", root=image_root, class_map="folder")
    times["write_s"] = time.perf_counter() - mark
    (tmp / "parts.listing").unlink()
    return times


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty:"))


def _touch(source) -> None:
    """What a worker does with the listing: paths and record numbers by sample, every page read."""
    listing = source.listing
    for i in range(0, len(listing), max(1, len(listing) // 2000)):
        listing.path(i), int(listing.record_numbers[i])
    for array in (listing.dir_ids, listing.suffix_ids, listing.stems, listing.stem_offsets, listing.record_numbers):
        int(array.sum())


def _spawn_worker(payload: bytes, queue) -> None:
    import relabel_dali.data.listing_file  # noqa: F401  (imports are not the listing's memory)
    import relabel_dali.data.source  # noqa: F401

    gc.collect()
    anonymous, mapped = _status_kb("RssAnon"), _status_kb("RssFile")
    source = pickle.loads(payload)
    _touch(source)
    queue.put(((_status_kb("RssAnon") - anonymous) / 1024, (_status_kb("RssFile") - mapped) / 1024))


_FORKED_SOURCE = None


def _fork_worker(queue) -> None:
    before = _private_dirty_kb()
    _touch(_FORKED_SOURCE)
    queue.put((_private_dirty_kb() - before) / 1024)


def worker_memory(source, payload: bytes) -> dict:
    global _FORKED_SOURCE
    out = {}
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    process = spawn.Process(target=_spawn_worker, args=(payload, queue))
    process.start()
    out["spawn"], out["spawn_mapped"] = queue.get(timeout=600)
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
    cache = tmp / name / "listings"
    gc.collect()
    rss_before = _status_kb("VmRSS")
    source, result["build_s"], result["build_cpu_s"] = build_source(image_root, file_list, label_root, classes, cache)
    result["builder_rss_growth_mb"] = (_status_kb("VmRSS") - rss_before) / 1024
    result["listing_file_mb"] = sum(path.stat().st_size for path in cache.glob("*.listing")) / 2 ** 20
    result["listing_mb"] = source.listing.nbytes / 2 ** 20
    _, result["cached_build_s"], result["cached_build_cpu_s"] = build_source(image_root, file_list, label_root,
                                                                            classes, cache)
    gc.collect()
    result.update(build_parts(image_root, file_list, label_root, classes, tmp / name))
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
    result["worker_mb"] = worker_memory(source, payload)
    return result


def verdicts(result: dict) -> dict:
    """Each yardstick against the measured value: met / not met."""
    measured = {key: result[key] for key in ("build_s", "cached_build_s", "pickled_mb", "unpickle_s",
                                             "epoch_boundary_s")}
    measured["worker_mb"] = max(result["worker_mb"]["spawn"], result["worker_mb"]["fork"])
    goals = targets(result["samples"])
    return {key: {"measured": measured[key], "target": goals[key], "met": measured[key] <= goals[key]}
            for key in goals}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["sizes"])
    keys = list(TARGETS["imagenet-21k"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.6))
    for axis, key in zip(axes, keys):
        verdict = [results["sizes"][n]["verdicts"][key] for n in names]
        axis.bar(names, [v["measured"] for v in verdict],
                 color=["tab:green" if v["met"] else "tab:red" for v in verdict])
        for x, v in enumerate(verdict):
            axis.hlines(v["target"], x - 0.4, x + 0.4, color="black", linestyle="--",
                        label="target" if x == 0 else None)
        axis.set_title(key.replace("_", " "))
        axis.tick_params(axis="x", labelrotation=20)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"data path at scale (rank {RANK} of {WORLD_SIZE}); green: within its target (dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


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
                           "processor": _cpu_model(), "python": platform.python_version(),
                           "numpy": np.__version__, "memory_gb": round(os.sysconf("SC_PHYS_PAGES")
                                                                       * os.sysconf("SC_PAGE_SIZE") / 2 ** 30, 1)},
               "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(), "rank": RANK,
               "world_size": WORLD_SIZE, "batch_size": BATCH, "targets": TARGETS, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, (samples, classes) in sizes.items():
            print(f"{name}: {samples} samples, {classes} classes", flush=True)
            result = measure(name, samples, classes, Path(tmp))
            result["load_average_after"] = os.getloadavg()  # other jobs on the host slow every figure
            result["verdicts"] = verdicts(result)
            results["sizes"][name] = result
            print(json.dumps(result, indent=1), flush=True)
            gc.collect()
    atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
