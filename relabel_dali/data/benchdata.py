"""A generated data set for benchmarks and the GPU check: JPEGs, their official-format ``.pt``
label maps, and label shards holding the same maps.

Images are scaled and cropped variants of the real photos that ship in the foolbox wheel (smooth
synthetic patterns where it is absent), so decoding costs what photos cost. Label maps are random
(sorted scores, distinct class ids per cell): they serve speed measurements, not accuracy.
Not imported by the training path.
"""
from __future__ import annotations

import importlib.util
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_SIZES = ((400, 500), (330, 420))  # (width range, height range), about ImageNet's mean


@dataclass(frozen=True)
class BenchmarkData:
    image_root: Path  # <class>/<key>.JPEG
    pt_root: Path  # <class>/<key>.pt, official [2, k, x, y] layout
    label_root: Path  # label shards + index.json of the same maps
    val_root: Path | None  # <class>/<key>.JPEG, no labels
    count: int


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The foolbox wheel's ImageNet photos as RGB arrays, else eight synthetic 480x480 patterns
    textured at three scales, so their JPEGs are about photo-sized (~80 KB at 450x375)."""
    spec = importlib.util.find_spec("foolbox")
    if spec and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
        found = [np.array(Image.open(p).convert("RGB")) for p in sorted(folder.glob("imagenet_*.jpg"))]
        if found:
            return tuple(found)
    y, x = np.mgrid[0:480, 0:480]
    rng = np.random.default_rng(0)
    patterns = []
    for i in range(8):
        base = np.stack([(x + 40 * i) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.float32)
        texture = sum(np.kron(rng.normal(0, 1, (480 // s, 480 // s, 3)), np.ones((s, s, 1))) for s in (1, 4, 16))
        patterns.append(np.clip(base + 18 * texture, 0, 255).astype(np.uint8))
    return tuple(patterns)


def random_map(rng: np.random.Generator, k: int = 5, size: int = 15, num_classes: int = 1000):
    """Canonical ``(scores float32 [k, y, x] descending per cell, class ids int64 distinct per cell)``."""
    scores = -np.sort(-rng.normal(0, 3, (k, size, size)), axis=0).astype(np.float32)
    # Distinct ids without a per-cell permutation: a start plus k increasing steps below num_classes.
    steps = rng.integers(1, num_classes // k + 1, (k, size, size))
    steps[0] = 0
    class_ids = (rng.integers(0, num_classes, (1, size, size)) + steps.cumsum(0)) % num_classes
    return scores, class_ids


def _image(index: int, seed: int, sizes) -> Image.Image:
    rng = np.random.default_rng([seed, index])
    photo = photos()[index % len(photos())]
    h, w = photo.shape[:2]
    crop_h, crop_w = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
    top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
    size = (int(rng.integers(*sizes[0], endpoint=True)), int(rng.integers(*sizes[1], endpoint=True)))
    return Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(size, Image.BILINEAR)


def _key(index: int, classes: int) -> str:
    return f"n{index % classes:08d}/img_{index:06d}"


def _write_chunk(job) -> int:
    """One worker's contiguous run of sorted keys: images, ``.pt`` maps and one label shard."""
    import torch

    from relabel_dali.store.labelmaps import to_official
    from relabel_dali.store.writer import LabelShardWriter

    root, name, indices, classes, seed, sizes = job
    writer = LabelShardWriter(root / "labels", k=5, height=15, width=15, num_classes=1000, score_dtype="float16")
    with writer.shard(name) as shard:
        for index in indices:
            key = _key(index, classes)
            for folder in (root / "train", root / "pt"):
                (folder / key).parent.mkdir(parents=True, exist_ok=True)
            _image(index, seed, sizes).save(root / "train" / f"{key}.JPEG", quality=90)
            scores, class_ids = random_map(np.random.default_rng([seed, index, 1]))
            torch.save(torch.from_numpy(to_official(scores, class_ids)), root / "pt" / f"{key}.pt")
            shard.add(key, scores, class_ids)
    return len(indices)


def make_benchmark_data(root: str | Path, count: int, *, seed: int = 0, classes: int = 10, val_count: int = 0,
                        sizes=IMAGENET_SIZES, workers: int = 1, progress=None) -> BenchmarkData:
    """Writes ``count`` training images (``classes`` folders) with ``.pt`` maps and label shards
    under ``root``, and ``val_count`` validation images. ``workers`` processes each write one
    shard; ``progress(images_done)`` is called as chunks finish. Deterministic in ``seed``."""
    root = Path(root)
    if count < 1 or classes < 1:
        raise ValueError(f"count = {count}, classes = {classes}: both must be positive")
    order = sorted(range(count), key=lambda i: _key(i, classes))  # shards hold keys in sorted order
    chunks = [c for c in np.array_split(np.array(order), max(1, min(workers, count))) if len(c)]
    jobs = [(root, f"labels-{j:05d}", chunk.tolist(), classes, seed, sizes) for j, chunk in enumerate(chunks)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_write_chunk, jobs):
                if progress:
                    progress(done)
    else:
        for job in jobs:
            done = _write_chunk(job)
            if progress:
                progress(done)
    from relabel_dali.store.writer import LabelShardWriter

    LabelShardWriter(root / "labels", k=5, height=15, width=15, num_classes=1000,
                     score_dtype="float16").finalize([job[1] for job in jobs])
    val_root = None
    if val_count:
        val_root = root / "val"
        for index in range(val_count):
            path = val_root / f"{_key(index, classes)}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(index, seed + 1, sizes).save(path, quality=90)
    return BenchmarkData(root / "train", root / "pt", root / "labels", val_root, count)


TINY_CLASSES = ("n01440764", "n01443537", "n01484850")


def write_tiny_dataset(root: Path, *, train: int = 8, val: int = 4, size=(48, 40), cells: int = 5,
                       classes: tuple[str, ...] = TINY_CLASSES) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` (a dominant colour per class) and 3 x cells x cells label
    maps for the training images in ``root/labels``: the test suite's tiny set, also what
    ``tools/bench_startup.py`` trains on."""
    from relabel_dali.store.writer import LabelShardWriter

    rng = np.random.default_rng(0)
    writer = LabelShardWriter(root / "labels", k=3, height=cells, width=cells, num_classes=len(classes),
                              score_dtype="float16")
    with writer.shard("labels-00000") as shard:
        for c, wnid in enumerate(classes):
            colour = np.roll(np.array([180, 40, 40]), c)
            for split, count in (("train", train), ("val", val)):
                (root / split / wnid).mkdir(parents=True)
                for i in range(count):
                    pixels = (rng.random((*size, 3)) * 70 + colour).clip(0, 255).astype(np.uint8)
                    name = f"{wnid}_{split}_{i:03d}"
                    Image.fromarray(pixels).save(root / split / wnid / f"{name}.JPEG", quality=90)
                    if split == "train":
                        ids = np.stack([np.full((cells, cells), (c + j) % len(classes)) for j in range(3)])
                        scores = rng.normal(size=(3, cells, cells)) + np.array([3.0, 0.0, -1.0])[:, None, None]
                        shard.add(f"{wnid}/{name}", scores, ids)
    writer.finalize()
    return root
