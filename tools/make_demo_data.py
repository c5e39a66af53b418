#!/usr/bin/env python
"""Build the small offline demo dataset: ImageFolder train/val JPEGs from real photos, plus label maps.

    python tools/make_demo_data.py OUT [--seed 0] [--train-per-class 55] [--val-per-class 50]

Source photos are the 20 ImageNet photos that ship in the ``foolbox`` wheel's data folder (19
classes; they are read where pip installed them and never copied into the repository). Every
output image is a deterministic variant of them: scaled, cropped, flipped, placed on a plain
background, or composed with a photo of another class in one frame (filed under its folder's
class, the case ReLabel exists for). Every third image of a class, in training and validation
alike, is such a two-object composite.

Written under OUT (the whole folder appears at once, by rename, when complete):

* ``train/<wnid>/<wnid>_NNNN.JPEG``, ``val/<wnid>/<wnid>_val_NNNN.JPEG``
* ``relabel_pt/<wnid>/<wnid>_NNNN.pt``: official-format top-5 label maps ``[2, 5, 15, 15]`` (official
  layout: last axis vertical) that are spatially honest: each object's class scores highest on the
  cells its box covers, a few fixed distractor classes fill the rest;
* ``objects.json``: per train key, the image label, size and the objects' classes and pixel boxes;
  ``val_objects.json`` the same per validation key;
* ``real_labels.json``, ``real_labels_imagenet.json``: the validation composites' classes in the
  ReaL format that train.py's ``data.real_labels`` reads (a list in sorted file-name order, per
  image the classes of its objects: dataset indices under ``class_map: folder``, ImageNet-1k
  indices under ``class_map: imagenet``). Single-object images get an empty list, so the ReaL
  figures are measured on the composites alone;
* ``classes.json``: the classes used (ImageNet-1k index, wnid, name); ``manifest.json`` last.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from relabel_dali.data import imagenet
from relabel_dali.store.labelmaps import to_official

MAP_SIZE = 15
TOPK = 5
DISTRACTORS = 4


def photo_folder() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the demo photos come from the foolbox wheel: pip install --no-deps foolbox==3.3.4")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photos() -> dict[int, list[Image.Image]]:
    photos: dict[int, list[Image.Image]] = {}
    for path in sorted(photo_folder().glob("imagenet_*_*.jpg")):
        label = int(path.stem.rsplit("_", 1)[1])
        photos.setdefault(label, []).append(Image.open(path).convert("RGB"))
    if not photos:
        raise SystemExit(f"error: no imagenet_*_*.jpg photos in {photo_folder()}")
    return photos


def random_view(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop (40-100 % of the area, mild aspect change), resized to ``size``, maybe flipped."""
    width, height = photo.size
    area = rng.uniform(0.4, 1.0) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BILINEAR)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    base = rng.uniform(40, 215, size=3)
    noise = rng.normal(0, 18, size=(max(height // 8, 1), max(width // 8, 1), 3))
    small = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))


def compose(label: int, photos, rng: np.random.Generator, composite: bool) -> tuple[Image.Image, list[dict]]:
    """One frame and its objects ``[{"class", "box": [x0, y0, x1, y1] px}]``."""
    width, height = (int(v) for v in rng.integers(160, 289, size=2))
    canvas = background(rng, (width, height))
    pick = lambda cls: photos[cls][int(rng.integers(len(photos[cls])))]
    if composite:
        other = [c for c in photos if c != label]
        second = other[int(rng.integers(len(other)))]
        split_horizontally = rng.random() < 0.5
        ratio = rng.uniform(0.4, 0.6)
        if split_horizontally:
            cut = int(round(width * ratio))
            boxes = [(0, 0, cut, height), (cut, 0, width, height)]
        else:
            cut = int(round(height * ratio))
            boxes = [(0, 0, width, cut), (0, cut, width, height)]
        classes = [label, second] if rng.random() < 0.5 else [second, label]
    else:
        if rng.random() < 0.5:
            boxes = [(0, 0, width, height)]
        else:
            box_w = int(width * rng.uniform(0.5, 0.9))
            box_h = int(height * rng.uniform(0.5, 0.9))
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            boxes = [(x0, y0, x0 + box_w, y0 + box_h)]
        classes = [label]
    objects = []
    for cls, (x0, y0, x1, y1) in zip(classes, boxes):
        canvas.paste(random_view(pick(cls), rng, (x1 - x0, y1 - y0)), (x0, y0))
        objects.append({"class": int(cls), "box": [x0, y0, x1, y1]})
    return canvas, objects


def cell_coverage(box_norm: np.ndarray) -> np.ndarray:
    """Fraction of each of the MAP_SIZE x MAP_SIZE cells ([y, x]) that the normalized box covers."""
    edges = np.arange(MAP_SIZE + 1) / MAP_SIZE
    x0, y0, x1, y1 = box_norm
    overlap_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None) * MAP_SIZE
    overlap_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None) * MAP_SIZE
    return overlap_y[:, None] * overlap_x[None, :]


def label_map(objects: list[dict], size: tuple[int, int], rng: np.random.Generator, num_classes: int = 1000):
    """Canonical top-5 maps ``(scores [5, y, x], class_ids [5, y, x])``: objects dominate their cells."""
    width, height = size
    object_classes = [o["class"] for o in objects]
    pool = np.setdiff1d(np.arange(num_classes), object_classes)
    distractors = rng.choice(pool, size=DISTRACTORS, replace=False)
    candidates = np.array(object_classes + distractors.tolist())
    scores = np.empty((len(candidates), MAP_SIZE, MAP_SIZE), np.float32)
    for i, obj in enumerate(objects):
        box = np.array(obj["box"], np.float64) / [width, height, width, height]
        scores[i] = 9.0 * cell_coverage(box) - 1.0 + rng.normal(0, 0.3, (MAP_SIZE, MAP_SIZE))
    low = rng.uniform(0.0, 3.0, size=(DISTRACTORS, 1, 1))
    scores[len(objects):] = low + rng.normal(0, 0.5, (DISTRACTORS, MAP_SIZE, MAP_SIZE))
    order = np.argsort(-scores, axis=0, kind="stable")[:TOPK]
    top_scores = np.take_along_axis(scores, order, axis=0)
    top_ids = candidates[order]
    return top_scores.astype(np.float32), top_ids.astype(np.int64)


def write_jpeg(image: Image.Image, path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=int(rng.integers(85, 96)))


def real_labels(val_objects: dict[str, dict], index: dict[int, int] | None = None) -> list[list[int]]:
    """ReaL entries in sorted file-name order: a composite's classes (ImageNet-1k ids mapped through
    ``index``), an empty list for a single-object image (not counted by the ReaL metrics)."""
    entries = []
    for key in sorted(val_objects, key=lambda k: k.rsplit("/", 1)[-1]):
        classes = [o["class"] for o in val_objects[key]["objects"]]
        if len(classes) < 2:
            entries.append([])
        else:
            entries.append(sorted(classes if index is None else [index[c] for c in classes]))
    return entries


def build(out: Path, seed: int, train_per_class: int, val_per_class: int) -> dict:
    photos = load_photos()
    wnids, names = imagenet.wnids(), imagenet.names()
    labels = sorted(photos)
    objects_by_key, val_objects = {}, {}
    jobs = [("train", label, i) for label in labels for i in range(train_per_class)]
    jobs += [("val", label, i) for label in labels for i in range(val_per_class)]
    for split, label, i in tqdm(jobs, desc="demo images", unit="img", disable=None):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, label, i])
        wnid = wnids[label]
        # A third of the images hold two objects, in training and validation alike.
        image, objects = compose(label, photos, rng, composite=i % 3 == 2)
        stem = f"{wnid}_{i:04d}" if split == "train" else f"{wnid}_val_{i:04d}"
        write_jpeg(image, out / split / wnid / f"{stem}.JPEG", rng)
        key = f"{wnid}/{stem}"
        entry = {"label": label, "size": list(image.size), "objects": objects}
        if split == "val":
            val_objects[key] = entry
            continue
        scores, class_ids = label_map(objects, image.size, rng)
        target = out / "relabel_pt" / wnid / f"{stem}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(torch.from_numpy(to_official(scores, class_ids)), buffer)
        target.write_bytes(buffer.getvalue())
        objects_by_key[key] = entry
    classes = [{"index": label, "wnid": wnids[label], "name": names[label]} for label in labels]
    # class_map: folder numbers the classes by sorted folder (wnid) name.
    folder_index = {label: position for position, label in enumerate(sorted(labels, key=wnids.__getitem__))}
    write_json(out / "objects.json", objects_by_key)
    write_json(out / "val_objects.json", val_objects)
    write_json(out / "real_labels.json", real_labels(val_objects, folder_index))
    write_json(out / "real_labels_imagenet.json", real_labels(val_objects))
    write_json(out / "classes.json", classes)
    composites = sum(len(entry["objects"]) > 1 for entry in val_objects.values())
    return {"classes": len(labels), "train": len(labels) * train_per_class, "val": len(labels) * val_per_class,
            "val_composites": composites}


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=55)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    args = parser.parse_args(argv)
    settings = {"seed": args.seed, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
                "map_size": MAP_SIZE, "topk": TOPK, "version": 2}
    manifest = args.out / "manifest.json"
    if manifest.exists() and not args.force:
        previous = json.loads(manifest.read_text())
        if previous.get("settings") == settings:
            print(f"demo data already complete in {args.out} ({previous['counts']})")
            return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        counts = build(staging, args.seed, args.train_per_class, args.val_per_class)
        (staging / "manifest.json").write_text(json.dumps({"settings": settings, "counts": counts}, indent=1) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"demo data in {args.out}: {counts['classes']} classes, {counts['train']} train images and "
          f"{counts['val']} val images (a third of each two-object composites; {counts['val_composites']} in val, "
          f"their classes in real_labels.json), official-format label maps in {args.out / 'relabel_pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
