#!/usr/bin/env python
"""Benchmark the training input path in images/s.

    python tools/bench_loader.py [--data DIR --labels DIR --pt DIR] [--json out.json] [--plot out.png]

Three loaders on the same images, the same augmentations and the same worker count:
(a) this DALI pipeline with label shards and LabelPool, (b) the same without labels (one-hot),
(c) the official-style torch DataLoader: PIL decode, per-image ``.pt`` top-k maps, then a dense
scatter + ``roi_align`` + softmax per batch. Without ``--data`` it builds its own data set in a
temporary folder: variants of the real photos that ship in the foolbox wheel (synthetic
gradients if those are absent), random official-format ``.pt`` maps, and shards packed from them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_labels  # noqa: E402

from relabel_dali import augment  # noqa: E402
from relabel_dali.writer import atomic_write_bytes  # noqa: E402


# ---- data ------------------------------------------------------------------------------------
def photos() -> list[np.ndarray]:
    spec = importlib.util.find_spec("foolbox")
    if spec and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
        found = [np.array(Image.open(p).convert("RGB")) for p in sorted(folder.glob("imagenet_*.jpg"))]
        if found:
            return found
    y, x = np.mgrid[0:480, 0:480]
    return [np.stack([(x + 40 * i) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8) for i in range(8)]


def make_data(root: Path, count: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """``root/train/<class>/<img>.JPEG`` (ImageNet-like sizes), ``root/pt/...pt`` maps, ``root/labels``."""
    rng = np.random.default_rng(seed)
    sources = photos()
    image_root, pt_root = root / "train", root / "pt"
    for i in tqdm(range(count), desc="making images + .pt maps", unit="img", disable=None):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        crop_h, crop_w = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
        image = image.resize((int(rng.integers(400, 500)), int(rng.integers(330, 420))), Image.BILINEAR)
        key = f"n{i % 10:08d}/img_{i:05d}"
        (image_root / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(image_root / f"{key}.JPEG", quality=90)
        scores = -np.sort(-rng.normal(0, 3, (5, 15, 15)), axis=0)
        ids = np.argsort(rng.random((1000, 15, 15)), axis=0)[:5]
        (pt_root / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(np.stack([scores, ids]).astype(np.float32)), pt_root / f"{key}.pt")
    label_root = root / "labels"
    code = pack_labels.main([str(pt_root), str(label_root), "--image-root", str(image_root), "--dtype", "float16"])
    if code != 0:
        raise SystemExit(f"packing the benchmark label maps failed (exit {code})")
    return image_root, pt_root, label_root


# ---- (c) the official-style loader -----------------------------------------------------------
class OfficialStyleDataset(torch.utils.data.Dataset):
    """ImageFolder + RandomResizedCrop with coords + flip + ColorJitter + lighting + normalize, and
    the per-image ``.pt`` map, as the official ReLabel loader does it."""

    def __init__(self, image_root: Path, pt_root: Path, image_size: int):
        from torchvision import transforms

        self.paths = sorted(image_root.glob("*/*.JPEG"))
        self.image_root, self.pt_root = image_root, pt_root
        self.crop = transforms.RandomResizedCrop(image_size, scale=augment.RANDOM_AREA, ratio=augment.RANDOM_ASPECT_RATIO)
        self.rest = transforms.Compose([
            transforms.RandomHorizontalFlip(), transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor()])
        self.normalize = transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)
        self.eig = torch.tensor(augment.PCA_EIGVEC) * torch.tensor(augment.PCA_EIGVAL)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.transforms import functional as F

        path = self.paths[i]
        image = Image.open(path).convert("RGB")
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        box = torch.tensor([top / image.height, left / image.width,
                            (top + h) / image.height, (left + w) / image.width])
        image = F.resized_crop(image, top, left, h, w, self.crop.size, antialias=True)
        image = self.rest(image)
        image = image + (self.eig @ torch.randn(3).mul_(augment.LIGHTING_STD)).view(3, 1, 1)
        label_map = torch.load(self.pt_root / path.relative_to(self.image_root).with_suffix(".pt"), weights_only=True)
        return self.normalize(image), 0, box, label_map


def official_pool(label_maps: torch.Tensor, boxes: torch.Tensor, num_classes: int = 1000) -> torch.Tensor:
    from torchvision.ops import roi_align

    b, _, _, h, w = label_maps.shape
    dense = torch.zeros(b, num_classes, h, w)
    dense.scatter_(1, label_maps[:, 1].long(), label_maps[:, 0])
    rois = torch.cat([torch.arange(b, dtype=torch.float32).view(b, 1), boxes * w - 0.5], 1)
    return torch.softmax(roi_align(dense, rois, output_size=(1, 1)).view(b, -1), 1)


# ---- timing ----------------------------------------------------------------------------------
def time_loaders(loaders: dict, rounds: int, epochs_per_turn: int = 2) -> tuple[dict[str, float], list[dict]]:
    """images/s per loader over all rounds, and per round. Loaders take turns so that the load of a
    shared machine falls on each alike, in reversed order every other round (no loader always
    follows the same one); each turn starts with an untimed epoch, because a DALI loader prefetches
    its next epoch in the background while the other loaders are being timed."""
    images, seconds = dict.fromkeys(loaders, 0), dict.fromkeys(loaders, 0.0)
    per_round = []
    for round_index in tqdm(range(rounds), desc="timing", unit="round", disable=None):
        names = list(loaders) if round_index % 2 == 0 else list(reversed(loaders))
        rates = {}
        for name in names:
            make_iter = loaders[name]
            for _ in make_iter():
                pass
            count, started = 0, time.perf_counter()
            for _ in range(epochs_per_turn):
                for batch in make_iter():
                    count += batch
            elapsed = time.perf_counter() - started
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
    parser.add_argument("--rounds", type=int, default=4,
                        help="turns per loader (1 untimed + 2 timed epochs each; the order reverses every other round)")
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these loaders")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.data and not (args.labels and args.pt):
        parser.error("--data needs --labels and --pt")
    only = set(args.only or "abc")

    from relabel_dali.loader import build_train_loader

    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor(), "gpu": torch.cuda.is_available()},
               "batch_size": args.batch_size, "image_size": args.image_size, "workers": args.workers,
               "rounds": args.rounds, "images_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            image_root, pt_root, label_root = args.data, args.pt, args.labels
        else:
            image_root, pt_root, label_root = make_data(Path(tmp), args.images)
        results["images"] = len(list(image_root.glob("*/*")))
        common = dict(batch_size=args.batch_size, image_size=args.image_size, num_threads=args.workers,
                      py_workers=args.workers, seed=0)

        def dali(loader):
            return lambda: (len(batch["indices"]) for batch in loader)

        loaders = {}
        if "a" in only:
            loaders["a_dali_relabel"] = dali(build_train_loader(image_root, label_root, use_relabel=True, **common))
        if "b" in only:
            loaders["b_dali_no_labels"] = dali(build_train_loader(image_root, use_relabel=False, **common))
        if "c" in only:
            dataset = OfficialStyleDataset(image_root, pt_root, args.image_size)
            torch_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                                       drop_last=True, num_workers=args.workers,
                                                       persistent_workers=True)

            def official():
                for images, _, boxes, maps in torch_loader:
                    official_pool(maps, boxes)
                    yield len(images)

            loaders["c_official_torch"] = official
        rates, per_round = time_loaders(loaders, args.rounds)
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
