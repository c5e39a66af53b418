#!/usr/bin/env python
"""Benchmark LabelPool: pooled samples/s of the DALI operator in a pipeline and of pool_labels,
against the official dense path (scatter into [N, C, H, W] + roi_align + softmax) on the same device.

    python tools/bench_pool.py --json PATH [--device cpu|cuda] [--batch N] [--repeats R] [--plot PNG]
        [--no-dali] [--output-size S]

Maps are 5x15x15 top-5 float32, 1000 classes, random crop boxes; two id distributions: "random"
(ids spread over all classes, the worst case) and "concentrated" (12 classes per image, like real
annotator maps). Per method: seconds per batch (wall clock, device synchronised). ``dali_op`` is
the pipeline with the operator less the same pipeline without it. On the GPU, ``kernel_us`` adds
the device time of the LabelPool kernel alone, per batch, from the CUDA profiler (CUPTI): the C
ABI's launch and the DALI operator's. Exit codes: 0 done; 2 the requested device is unavailable.

``--output-size S`` measures token targets instead (S x S per crop, half the crops mirrored): the
native ``output_size=S`` path against TokenLabeling's dense one (``token_reference.token_label_pool``:
scatter, roi_align to S x S, softmax), in token targets per second (``targets_per_s``).
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

from relabel_dali.ops.build import build_info, load_operators
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import random_boxes, random_topk_maps, reference_pool
from relabel_dali.ops.token_reference import token_label_pool
from relabel_dali.atomic import atomic_write_bytes

KERNELS = {"pool_labels": "pool_batch_kernel", "dali_op": "pool_samples_kernel"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per method (dense path: fewer)")
    parser.add_argument("--plot", type=Path, help="optional bar chart PNG")
    parser.add_argument("--no-dali", action="store_true", help="only pool_labels and the dense path (no DALI needed)")
    parser.add_argument("--output-size", type=int, default=0,
                        help="token targets: S x S per crop against TokenLabeling's dense path (0: one per crop)")
    return parser.parse_args(argv)


def timed(fn, repeats, device):
    """Seconds per call after one warm-up call (builds, allocations, first touch); the device is
    synchronised before the clock stops (the whole device: DALI's stream too)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def kernel_us(fn, repeats, kernel) -> float | None:
    """Mean device time in microseconds of the CUDA kernel whose name contains ``kernel``, over
    ``repeats`` calls of ``fn``; None where the profiler records no such kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
    except RuntimeError as error:  # e.g. no CUPTI in this torch install
        print(f"warning: the CUDA profiler failed ({error}): no kernel time for {kernel}", file=sys.stderr)
        return None
    times = [event.time_range.elapsed_us() for event in prof.events()
             if event.device_type == torch.autograd.DeviceType.CUDA and kernel in event.name]
    return float(np.mean(times)) if times else None


def dali_runner(scores, class_ids, boxes, batch, device, with_op=True, mirror=None, **op_args):
    """One pipeline run per call: the inputs (fixed) through the operator, or only copied to the device;
    ``mirror`` [N] becomes the operator's per-sample argument input."""
    load_operators()
    from nvidia.dali import fn, pipeline_def

    s, i, b = scores.cpu().numpy(), class_ids.cpu().numpy().astype(np.uint16), boxes.cpu().numpy()
    m = None if mirror is None else mirror.cpu().numpy().astype(np.int32)

    @pipeline_def(batch_size=batch, num_threads=os.cpu_count() or 1, device_id=0 if device == "cuda" else None,
                  prefetch_queue_depth=1)
    def pipeline():
        # Whole-batch arrays (not lists of samples): external_source copies them in one piece.
        si = fn.external_source(source=lambda: s, batch=True)
        ii = fn.external_source(source=lambda: i, batch=True)
        bi = fn.external_source(source=lambda: b, batch=True)
        if device == "cuda":
            si, ii = si.gpu(), ii.gpu()
        if m is not None:
            op_args["mirror"] = fn.external_source(source=lambda: m, batch=True)
        if not with_op:
            return si, ii, bi
        return fn.label_pool(si, ii, bi, device="gpu" if device == "cuda" else "cpu", **op_args)

    pipe = pipeline()
    pipe.build()
    return lambda: pipe.run()


def run_case(scores, class_ids, boxes, batch, repeats, device, dali=True, output_size=0) -> tuple[dict, dict]:
    """(seconds per batch per method, kernel microseconds per batch on CUDA). With ``output_size`` the
    token targets, every other crop mirrored, against TokenLabeling's dense path."""
    ids16 = class_ids.to(torch.int16)
    tokens = {}
    if output_size:
        mirror = torch.arange(len(scores), device=scores.device) % 2 == 1
        tokens = {"output_size": output_size, "mirror": mirror}
        dense = lambda: token_label_pool(scores, class_ids, boxes, mirror, output_size)  # noqa: E731
    else:
        dense = lambda: reference_pool(scores, class_ids, boxes)  # noqa: E731
    seconds = {
        "official_dense": timed(dense, max(2, repeats // 5), device),
        "pool_labels": timed(lambda: pool_labels(scores, ids16, boxes, **tokens), repeats, device)}
    if dali:
        op_args = {"output_size": output_size, "mirror": tokens["mirror"]} if output_size else {}
        with_op = dali_runner(scores, class_ids, boxes, batch, device, **op_args)
        without_op = dali_runner(scores, class_ids, boxes, batch, device, with_op=False, **op_args)
        seconds["dali_pipeline"] = timed(with_op, repeats, device)
        # None where the difference drowns in the timing noise (a loaded machine, few repeats).
        op = seconds["dali_pipeline"] - timed(without_op, repeats, device)
        seconds["dali_op"] = op if op > 0 else None
    kernels = {}
    if device == "cuda":
        kernels["pool_labels"] = kernel_us(lambda: pool_labels(scores, ids16, boxes, validate=False, **tokens),
                                           repeats, KERNELS["pool_labels"])
        if dali:
            kernels["dali_op"] = kernel_us(with_op, repeats, KERNELS["dali_op"])
    return seconds, kernels


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    targets_per_sample = max(args.output_size, 1) ** 2
    results = {"device": args.device, "batch": args.batch, "map": [5, 15, 15], "num_classes": 1000,
               "output_size": args.output_size or None,
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
               "build": {k: v for k, v in build_info().items() if k in ("dali_version", "cxx", "nvcc")},
               "methods_note": "dali_op = dali_pipeline less the same pipeline without the operator" + (
                   "; official_dense = token_reference.token_label_pool (TokenLabeling's loader), "
                   "targets_per_s = token targets per second" if args.output_size else ""),
               "cases": {}, "kernel_us": {}}
    g = torch.Generator().manual_seed(0)
    cases = [("random", None), ("concentrated", 12)]
    for name, classes_per_image in tqdm(cases, desc="benchmarking", unit="case", disable=None):
        scores, class_ids = random_topk_maps(args.batch, 5, 15, 15, 1000, g, classes_per_image)
        boxes = random_boxes(args.batch, g)
        scores, class_ids, boxes = scores.to(device), class_ids.to(device), boxes.to(device)
        seconds, kernels = run_case(scores, class_ids, boxes, args.batch, args.repeats, args.device,
                                    dali=not args.no_dali, output_size=args.output_size)
        results["cases"][name] = {
            method: {"seconds_per_batch": t, "samples_per_s": None if t is None else args.batch / t,
                     "targets_per_s": None if t is None else args.batch * targets_per_sample / t,
                     "speedup_vs_official": None if t is None else seconds["official_dense"] / t}
            for method, t in seconds.items()}
        if kernels:
            results["kernel_us"][name] = {
                method: {"us_per_batch": us, "speedup_vs_official": None if us is None else
                         seconds["official_dense"] * 1e6 / us} for method, us in kernels.items()}

    atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())
    grid = f", {args.output_size}x{args.output_size} token targets per crop" if args.output_size else ""
    print(f"LabelPool on {args.device}, batch {args.batch}, 5x15x15 top-5 maps, 1000 classes{grid}:")
    for name, methods in results["cases"].items():
        for method, r in methods.items():
            if r["seconds_per_batch"] is None:
                print(f"  {name:>12} {method:>15}: not resolved (below the timing noise)")
                continue
            rate = f"{r['targets_per_s']:>11,.0f} targets/s" if args.output_size else \
                f"{r['samples_per_s']:>11,.0f} samples/s"
            print(f"  {name:>12} {method:>15}: {rate} "
                  f"({r['seconds_per_batch'] * 1e6:>9,.0f} us/batch, {r['speedup_vs_official']:6.1f}x official)")
        for kernel, k in results["kernel_us"].get(name, {}).items():
            us = float("nan") if k["us_per_batch"] is None else k["us_per_batch"]
            print(f"  {name:>12} {kernel + ' kernel':>15}: {us:>9,.1f} us/batch on the device alone")
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
        values = [results["cases"][c][method]["samples_per_s"] or 0 for c in cases]
        ax.bar(np.arange(len(cases)) + j * 0.2, values, 0.2, label=method)
    ax.set_xticks(np.arange(len(cases)) + 0.3, cases)
    ax.set_yscale("log")
    ax.set_ylabel("samples/s")
    ax.set_title(f"LabelPool, {results['device']}, batch {results['batch']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
