#!/usr/bin/env python
"""Benchmark LabelPool: pooled samples/s of the DALI operator in a pipeline and of pool_labels,
against the official dense path (scatter into [N, C, H, W] + roi_align + softmax) on the same device.

    python tools/bench_pool.py --json PATH [--device cpu|cuda] [--batch N] [--repeats R] [--plot PNG]

Maps are 5x15x15 top-5 float32, 1000 classes, random crop boxes; two id distributions: "random"
(ids spread over all classes, the worst case) and "concentrated" (12 classes per image, like real
annotator maps). Exit codes: 0 done; 2 the requested device is unavailable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from relabel_dali.ops import build_info, load_label_pool
from relabel_dali.pooling import pool_labels
from relabel_dali.reference import random_boxes, random_topk_maps
from relabel_dali.writer import atomic_write_bytes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per method (dense path: fewer)")
    parser.add_argument("--plot", type=Path, help="optional bar chart PNG")
    return parser.parse_args(argv)


def timed(fn, repeats, sync):
    fn()  # warm-up: builds, allocations, first-touch
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def official_dense(scores, class_ids, boxes, num_classes=1000):
    from torchvision.ops import roi_align

    n, _, h, w = scores.shape
    dense = torch.zeros(n, num_classes, h, w, device=scores.device).scatter_(1, class_ids, scores)
    rois = torch.stack([torch.arange(n, device=scores.device, dtype=torch.float32), boxes[:, 0] * w - 0.5,
                        boxes[:, 1] * h - 0.5, boxes[:, 2] * w - 0.5, boxes[:, 3] * h - 0.5], 1)
    return torch.softmax(roi_align(dense, rois, 1, 1.0, -1, False).flatten(1), 1)


def dali_op_runner(scores, class_ids, boxes, batch, device):
    load_label_pool()
    from nvidia.dali import fn, pipeline_def

    s, i, b = scores.cpu().numpy(), class_ids.cpu().numpy().astype(np.uint16), boxes.cpu().numpy()

    @pipeline_def(batch_size=batch, num_threads=os.cpu_count() or 1, device_id=0 if device == "cuda" else None,
                  prefetch_queue_depth=1)
    def pipeline():
        # The inputs stay fixed: what is timed is the operator plus the pipeline's own overhead.
        # Whole-batch arrays (not lists of samples): external_source copies them in one piece.
        si = fn.external_source(source=lambda: s, batch=True)
        ii = fn.external_source(source=lambda: i, batch=True)
        bi = fn.external_source(source=lambda: b, batch=True)
        if device == "cuda":
            si, ii = si.gpu(), ii.gpu()
        return fn.label_pool(si, ii, bi, device="gpu" if device == "cuda" else "cpu")

    pipe = pipeline()
    pipe.build()
    return lambda: pipe.run()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    results = {"device": args.device, "batch": args.batch, "map": [5, 15, 15], "num_classes": 1000,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
               "build": {k: v for k, v in build_info().items() if k in ("dali_version", "cxx", "nvcc")},
               "cases": {}}
    g = torch.Generator().manual_seed(0)
    dense_repeats = max(2, args.repeats // 5)
    cases = [("random", None), ("concentrated", 12)]
    progress = tqdm(total=len(cases) * 3, desc="benchmarking", unit="method", disable=None)
    for name, classes_per_image in cases:
        scores, class_ids = random_topk_maps(args.batch, 5, 15, 15, 1000, g, classes_per_image)
        boxes = random_boxes(args.batch, g)
        scores, class_ids, boxes = scores.to(device), class_ids.to(device), boxes.to(device)
        ids16 = class_ids.to(torch.int16)
        seconds = {}
        seconds["official_dense"] = timed(lambda: official_dense(scores, class_ids, boxes), dense_repeats, sync)
        progress.update()
        seconds["pool_labels"] = timed(lambda: pool_labels(scores, ids16, boxes), args.repeats, sync)
        progress.update()
        seconds["dali_op"] = timed(dali_op_runner(scores, class_ids, boxes, args.batch, args.device), args.repeats, sync)
        progress.update()
        results["cases"][name] = {
            method: {"seconds_per_batch": t, "samples_per_s": args.batch / t,
                     "speedup_vs_official": seconds["official_dense"] / t}
            for method, t in seconds.items()}
    progress.close()

    atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    print(f"LabelPool on {args.device}, batch {args.batch}, 5x15x15 top-5 maps, 1000 classes:")
    for name, methods in results["cases"].items():
        for method, r in methods.items():
            print(f"  {name:>12} {method:>15}: {r['samples_per_s']:>11,.0f} samples/s "
                  f"({r['seconds_per_batch'] * 1e6:>9,.0f} us/batch, {r['speedup_vs_official']:6.1f}x official)")
    print(f"results written to {args.json}")
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    cases = list(results["cases"])
    methods = list(results["cases"][cases[0]])
    for j, method in enumerate(methods):
        values = [results["cases"][c][method]["samples_per_s"] for c in cases]
        ax.bar(np.arange(len(cases)) + j * 0.25, values, 0.25, label=method)
    ax.set_xticks(np.arange(len(cases)) + 0.25, cases)
    ax.set_yscale("log")
    ax.set_ylabel("samples/s")
    ax.set_title(f"LabelPool, {results['device']}, batch {results['batch']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
