#!/usr/bin/env python
"""Draw what LabelPooling gives random crops of an image, and where the top classes live.

    python tools/show_labels.py LABELS IMAGE_ROOT --out DIR [--keys KEY ...] [--random N]
        [--crops 4] [--seed 0] [--exif] [--classes imagenet|folder]

For each sample one PNG (``DIR/<key with / as __>.png``): the image with N random crop boxes
drawn; under it each crop with its pooled top-5 classes and probabilities (the paper's Figure
A3); beside it the label maps of the image's two top classes over the image (Figure A2; per-cell
softmax over the stored top-k, zero where the class is not among them). The maps are canonical
[k, y, x] over the whole image; images are shown unrotated unless --exif, as the annotator saw them.
Class ids are named in the space the shards were written in (relabel.py's --classes): ImageNet-1k
indices, or the image root's sorted folders.

Exit codes: 0 written; 1 bad input (unknown key, missing image, bad arguments).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from relabel_dali.data import imagenet
from relabel_dali.annotate.annotator import pool_boxes
from relabel_dali.store.labelmaps import find_image, random_crops
from relabel_dali.store.reader import LabelShardReader

EXIT_OK, EXIT_FAILED = 0, 1
PANEL_INCHES, DPI = 3.0, 100
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", type=Path, help="label shard folder")
    parser.add_argument("image_root", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--keys", nargs="+", default=[], help="sample keys to show")
    parser.add_argument("--random", type=int, default=0, help="also show this many random samples")
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exif", action="store_true", help="rotate images by EXIF (match the annotation run)")
    parser.add_argument("--classes", choices=("imagenet", "folder"), default="imagenet",
                        help="class id space of the shards: ImageNet-1k indices or sorted image folders")
    args = parser.parse_args(argv)
    if not 1 <= args.crops <= len(COLORS):
        parser.error(f"--crops must be in [1, {len(COLORS)}], got {args.crops}")
    if not args.keys and args.random < 1:
        parser.error("name samples with --keys or ask for --random N")
    return args


def imagenet_name(class_id: int) -> str:
    try:
        return imagenet.short_name_of(class_id)
    except (IndexError, ModuleNotFoundError):
        return f"class {class_id}"


def folder_names(image_root: Path) -> list[str]:
    """Class id i -> the i-th sorted folder, named as its ImageNet class where it is a WordNet id."""
    names = []
    for folder in sorted(p.name for p in image_root.iterdir() if p.is_dir()):
        try:
            names.append(imagenet.short_name_of(imagenet.index_of(folder)))
        except (KeyError, ValueError, ModuleNotFoundError):
            names.append(folder)
    return names


def class_namer(classes: str, image_root: Path, num_classes: int):
    if classes == "imagenet":
        return imagenet_name
    names = folder_names(image_root)
    if len(names) != num_classes:
        raise ValueError(f"--classes folder: {image_root} has {len(names)} folders but the shards have "
                         f"num_classes {num_classes}")
    return names.__getitem__


def class_heatmap(scores: np.ndarray, ids: np.ndarray, class_id: int) -> np.ndarray:
    probs = np.exp(scores - scores.max(0, keepdims=True))
    probs /= probs.sum(0, keepdims=True)
    return np.where(ids == class_id, probs, 0).sum(0)


def render(key: str, image: Image.Image, scores: np.ndarray, ids: np.ndarray, crops: np.ndarray,
           num_classes: int, path: Path, class_name=imagenet_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width, height = image.size
    boxes = np.concatenate([crops, [[0, 0, 1, 1]]]).astype(np.float32)
    stack = np.broadcast_to(scores, (len(boxes),) + scores.shape).copy()
    id_stack = np.broadcast_to(ids, (len(boxes),) + ids.shape).copy()
    pooled = pool_boxes(stack, id_stack, boxes, num_classes=num_classes).numpy()
    top2 = np.argsort(-pooled[-1])[:2]

    columns = max(3, len(crops))
    figure = plt.figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * 3), dpi=DPI)
    grid = figure.add_gridspec(3, columns)
    axis = figure.add_subplot(grid[0, 0])
    axis.imshow(image)
    for j, (x0, y0, x1, y1) in enumerate(crops):
        axis.add_patch(Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height,
                                 fill=False, lw=2, color=COLORS[j]))
    axis.set_title(key, fontsize=8)
    axis.axis("off")
    gray = np.asarray(image.convert("L"))
    for j, class_id in enumerate(top2):
        axis = figure.add_subplot(grid[0, 1 + j])
        axis.imshow(gray, cmap="gray")
        axis.imshow(class_heatmap(scores, ids, class_id), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                    interpolation="bilinear", extent=(0, width, height, 0))
        axis.set_title(f"map: {class_name(class_id)} ({100 * pooled[-1, class_id]:.0f} % whole image)", fontsize=8)
        axis.axis("off")
    for j, (x0, y0, x1, y1) in enumerate(crops):
        axis = figure.add_subplot(grid[1, j])
        left, top = int(x0 * width), int(y0 * height)
        axis.imshow(image.crop((left, top, max(left + 1, int(x1 * width)), max(top + 1, int(y1 * height)))))
        axis.set_title(f"crop {j + 1}", color=COLORS[j], fontsize=9)
        axis.axis("off")
        axis = figure.add_subplot(grid[2, j])
        best = np.argsort(-pooled[j])[:5]
        axis.barh(range(5)[::-1], pooled[j, best], color=COLORS[j])
        axis.set_yticks(range(5)[::-1], [class_name(c) for c in best], fontsize=7)
        axis.set_xlim(0, 1)
        axis.set_xlabel("pooled probability", fontsize=7)
        axis.tick_params(axis="x", labelsize=7)
    figure.subplots_adjust(left=0.09, right=0.98, top=0.95, bottom=0.06, wspace=0.6, hspace=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=DPI)
    plt.close(figure)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reader = LabelShardReader(args.labels)
        rng = np.random.default_rng(args.seed)
        keys = list(args.keys)
        if args.random:
            keys += [reader.keys[i] for i in rng.choice(len(reader), min(args.random, len(reader)), replace=False)]
        class_name = class_namer(args.classes, args.image_root, reader.num_classes)
        written = []
        for key in keys:
            scores, ids = reader[key]
            image = Image.open(find_image(args.image_root, key))
            image = (ImageOps.exif_transpose(image) if args.exif else image).convert("RGB")
            crops = random_crops(rng, args.crops, *image.size)
            path = args.out / f"{key.replace('/', '__')}.png"
            render(key, image, scores, ids, crops, reader.num_classes, path, class_name)
            written.append(path)
    except (KeyError, FileNotFoundError, ValueError) as error:
        print(f"error: {str(error).strip(chr(34))}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {len(written)} figure(s) to {args.out}:")
    print("\n".join(f"  {p}" for p in written))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
