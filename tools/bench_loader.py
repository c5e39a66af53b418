#!/usr/bin/env python
"""Benchmark the training input path in images/s.

    python tools/bench_loader.py [--data DIR --labels DIR --pt DIR] [--json out.json] [--plot out.png]

Three loaders on the same images, the same augmentations and the same worker count:
(a) this DALI pipeline with label shards and LabelPool, (b) the same without labels (one-hot),
(c) the official-style torch DataLoader: PIL decode, per-image ``.pt`` top-k maps, then a dense
scatter + ``roi_align`` + softmax per batch. Without ``--data`` it builds its own data set in a
temporary folder (relabel_dali.data.benchdata): variants of the real photos that ship in the foolbox
wheel, random official-format ``.pt`` maps, and label shards of the same maps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from relabel_dali.data.benchdata import make_benchmark_data
from relabel_dali.data.official import OfficialStyleLoader
from relabel_dali.atomic import atomic_write_bytes


# ---- timing ----------------------------------------------------------------------------------
def clock(device: str = "cpu") -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued so far: a GPU batch is
    handed over before the GPU has made it (DALI's GPU stages, loader c's pooling), so reading the
    clock without waiting would time only the host's side."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_loaders(loaders: dict, rounds: int, epochs_per_turn: int = 2,
                 device: str = "cpu") -> tuple[dict[str, float], list[dict]]:
    """images/s per loader over all rounds, and per round. Loaders take turns so that the load of a
    shared machine falls on each alike, in reversed order every other round (no loader always
    follows the same one); each turn starts with an untimed epoch, because a DALI loader prefetches
    its next epoch in the background while the other loaders are being timed. On a GPU the clock is
    read after the device has caught up (``clock``)."""
    images, seconds = dict.fromkeys(loaders, 0), dict.fromkeys(loaders, 0.0)
    per_round = []
    for round_index in tqdm(range(rounds), desc="timing", unit="round", disable=None):
        names = list(loaders) if round_index % 2 == 0 else list(reversed(loaders))
        rates = {}
        for name in names:
            make_iter = loaders[name]
            for _ in make_iter():
                pass
            count, started = 0, clock(device)
            for _ in range(epochs_per_turn):
                for batch in make_iter():
                    count += batch
            elapsed = clock(device) - started
            images[name] += count
            seconds[name] += elapsed
            rates[name] = count / elapsed
        per_round.append(rates)
    return {name: images[name] / seconds[name] for name in loaders}, per_round


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image root (<class>/<file>); default: generated")
    parser.add_argument("--labels", type=Path, help="packed label shards for --data")
    parser.add_argument("--pt", type=Path, help="official .pt label maps for --data (for loader c)")
    parser.add_argument("--images", type=int, default=1024, help="images to generate without --data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="Python workers, and DALI threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: GPU graphs with mixed (hardware where present) JPEG decoding; "
                             "(c) pools on the GPU")
    parser.add_argument("--rounds", type=int, default=4,
                        help="turns per loader (1 untimed + 2 timed epochs each; the order reverses every other round)")
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these loaders")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.data and not (args.labels and args.pt):
        parser.error("--data needs --labels and --pt")
    only = set(args.only or "abc")

    from relabel_dali.data.loader import build_train_loader
    from relabel_dali.data.settings import Labels, Runtime, TrainAugment

    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor(), "gpu": None}, "device": args.device,
               "batch_size": args.batch_size, "image_size": args.image_size, "workers": args.workers,
               "rounds": args.rounds, "images_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            image_root, pt_root, label_root = args.data, args.pt, args.labels
        else:
            progress = tqdm(total=args.images, desc="making images + .pt maps + shards", unit="img", disable=None)
            data = make_benchmark_data(Path(tmp), args.images, workers=args.workers, progress=progress.update)
            progress.close()
            image_root, pt_root, label_root = data.image_root, data.pt_root, data.label_root
        results["images"] = len(list(image_root.glob("*/*")))
        # Forked workers (fast) on the CPU; on the GPU the second pipeline would fork after the first
        # initialised CUDA, which DALI refuses.
        runtime = Runtime(device=args.device, num_threads=args.workers, py_workers=args.workers,
                          start_method="spawn" if args.device == "cuda" else "fork")
        common = dict(batch_size=args.batch_size, augment=TrainAugment(image_size=args.image_size), runtime=runtime,
                      seed=0)

        def dali(loader):
            return lambda: (len(batch["indices"]) for batch in loader)

        loaders = {}
        if "a" in only:
            loaders["a_dali_relabel"] = dali(build_train_loader(image_root, labels=Labels(label_root), **common))
        if "b" in only:
            loaders["b_dali_no_labels"] = dali(build_train_loader(image_root, **common))
        if "c" in only:
            official = OfficialStyleLoader(image_root, pt_root, batch_size=args.batch_size,
                                           image_size=args.image_size, workers=args.workers, device=args.device)
            loaders["c_official_torch"] = lambda: (len(batch["images"]) for batch in official)
        if args.device == "cuda":  # only now: CUDA must not be initialised before forking loaders
            results["machine"]["gpu"] = torch.cuda.get_device_name()
        rates, per_round = time_loaders(loaders, args.rounds, device=args.device)
        results["images_per_s"], results["images_per_s_per_round"] = rates, per_round
    for ratio, (top, bottom) in {"a_over_c": ("a_dali_relabel", "c_official_torch"),
                                 "a_over_b": ("a_dali_relabel", "b_dali_no_labels")}.items():
        if top in rates and bottom in rates:
            results[ratio] = rates[top] / rates[bottom]
            rounds = [r[top] / r[bottom] for r in per_round]
            results[f"{ratio}_per_round"] = rounds
            results[f"{ratio}_median_of_rounds"] = float(np.median(rounds))
    for name, rate in rates.items():
        print(f"{name:20s} {rate:8.1f} images/s")
    for name in ("a_over_c", "a_over_b"):
        if name in results:
            rounds = " ".join(f"{r:.3f}" for r in results[f"{name}_per_round"])
            print(f"{name:20s} {results[name]:8.3f}   per round: {rounds}   median {results[name + '_median_of_rounds']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(rates), list(rates.values()), color=["tab:blue", "tab:cyan", "tab:gray"][: len(rates)])
        ax.set_ylabel("images/s")
        ax.set_title(f"training input path, batch {args.batch_size}, {args.image_size}px, "
                     f"{args.workers} workers, {os.cpu_count()} CPUs")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
