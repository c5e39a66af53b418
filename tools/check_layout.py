#!/usr/bin/env python
"""Which axis of a label map is vertical? Decide it from ground-truth boxes.

    python tools/check_layout.py LABELS --boxes FILE [--image-root DIR] [--crops 16] [--seed 0]
        [--plot curve.png] [--json report.json] [--alpha 0.01]

LABELS is a label shard folder (index.json) or a tree of official ``<key>.pt`` files ``[2, k, A, B]``.
Boxes come from the demo's ``objects.json``, ImageNet's ``LOC_train_solution.csv`` (needs
--image-root for the image sizes) or a folder of ImageNet/PASCAL bounding-box ``.xml`` files.

The maps are read as the source files hold them (``[k, A, B]``; shards packed with
``--layout official`` are transposed back using their pack_settings.json) and tried both ways:
``official`` (A horizontal, B vertical: the official pooling code's reading) and ``yx`` (A
vertical). For each image the share of the ground-truth class's label-map mass (per-cell softmax
over the stored top-k) that falls inside its box is measured under both readings; a sign test over
images and a bootstrap interval of the mean difference say which reading the data supports. The
paper's Figure 5 curve (pooled label confidence of a random crop vs its IoU with the box) is drawn
for both readings with --plot.

Exit codes: 0 a layout is supported at --alpha; 3 inconclusive; 1 bad input.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from tqdm import tqdm

from relabel_dali.data import imagenet
from relabel_dali.annotate.annotator import pool_boxes
from relabel_dali.store.labelmaps import READINGS, find_image, label_key, load_label_file, random_crops
from relabel_dali.store.reader import LabelShardReader
from relabel_dali.atomic import atomic_write_bytes

EXIT_OK, EXIT_FAILED, EXIT_INCONCLUSIVE = 0, 1, 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", type=Path, help="label shard folder or tree of official .pt maps")
    parser.add_argument("--boxes", type=Path, required=True, help="objects.json, LOC_train_solution.csv or XML folder")
    parser.add_argument("--image-root", type=Path, help="images, for the sizes a CSV does not give")
    parser.add_argument("--crops", type=int, default=16, help="random crops per image for the curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.01, help="sign-test level for a verdict")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument("--plot", type=Path, help="write the confidence-vs-IoU curve here (PNG)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.crops < 1:
        parser.error(f"--crops must be positive, got {args.crops}")
    return args


# ---- ground truth ------------------------------------------------------------------------------
def load_boxes(path: Path, image_root: Path | None) -> dict[str, dict]:
    """key -> {"size": (W, H), "objects": [(class, (x0, y0, x1, y1) pixels), ...]}."""
    if path.is_dir():
        return {label_key(p, path): parse_xml(p) for p in sorted(path.rglob("*.xml"))}
    if path.suffix == ".json":
        boxes = {}
        for key, entry in json.loads(path.read_text()).items():
            try:
                boxes[key] = {"size": tuple(entry["size"]),
                              "objects": [(int(o["class"]), tuple(o["box"])) for o in entry["objects"]]}
            except (KeyError, TypeError) as error:
                raise ValueError(f"{path}: entry {key!r} lacks {error} (expected size and objects[class, box])") from None
        return boxes
    if path.suffix == ".csv":
        if image_root is None:
            raise ValueError(f"{path}: a CSV holds no image sizes; pass --image-root")
        return parse_csv(path, image_root)
    raise ValueError(f"{path}: unknown box file, expected objects.json, a .csv or a folder of .xml files")


def parse_xml(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    try:
        size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
        objects = [(imagenet.index_of(o.findtext("name")),
                    tuple(float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")))
                   for o in root.iter("object")]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed box file ({error})") from None
    return {"size": size, "objects": objects}


def parse_csv(path: Path, image_root: Path) -> dict[str, dict]:
    from PIL import Image

    boxes = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                image_id, fields = row["ImageId"], row["PredictionString"].split()
            except KeyError:
                raise ValueError(f"{path}: expected columns ImageId,PredictionString") from None
            if len(fields) % 5:
                raise ValueError(f"{path}: {image_id}: PredictionString is not groups of 'wnid x0 y0 x1 y1'")
            key = f"{image_id.split('_')[0]}/{image_id}"
            try:
                image = find_image(image_root, key)
            except FileNotFoundError:
                continue
            with Image.open(image) as opened:
                size = opened.size
            objects = [(imagenet.index_of(fields[i]), tuple(float(v) for v in fields[i + 1:i + 5]))
                       for i in range(0, len(fields), 5)]
            boxes[key] = {"size": size, "objects": objects}
    return boxes


# ---- label maps as the source holds them -------------------------------------------------------
class RawMaps:
    """``raw(key) -> (scores [k, A, B], class_ids [k, A, B])`` in the source files' own axis order."""

    def __init__(self, path: Path):
        self.path = path
        if (path / "index.json").exists():
            self.reader = LabelShardReader(path)
            settings = path / "pack_settings.json"
            packed_official = settings.exists() and json.loads(settings.read_text()).get("layout") == "official"
            self.transpose_back = packed_official  # undo pack_labels' official -> canonical transpose
            self.keys = set(self.reader.keys)
            self.num_classes = self.reader.num_classes
        else:
            self.reader = None
            self.files = {label_key(p, path): p for p in path.rglob("*.pt")}
            if not self.files:
                raise ValueError(f"{path}: neither a label shard folder (index.json) nor a tree of .pt maps")
            self.keys = set(self.files)
            self.num_classes = 1000

    def raw(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if self.reader is not None:
            scores, ids = self.reader[key]
            return (scores.transpose(0, 2, 1), ids.transpose(0, 2, 1)) if self.transpose_back else (scores, ids)
        array = load_label_file(self.files[key])
        if array.ndim != 4 or array.shape[0] != 2:
            raise ValueError(f"{self.files[key]}: shape {array.shape}, expected [2, k, A, B]")
        return array[0], array[1].astype(np.int64)


def canonical(raw: tuple[np.ndarray, np.ndarray], layout: str) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = raw
    return (scores.transpose(0, 2, 1), ids.transpose(0, 2, 1)) if layout == "official" else (scores, ids)


# ---- measures ----------------------------------------------------------------------------------
def cell_overlap(lo: float, hi: float, cells: int) -> np.ndarray:
    """Fraction of each of ``cells`` unit cells on [0, 1] covered by [lo, hi]."""
    edges = np.linspace(0, 1, cells + 1)
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) * cells


def mass_inside(scores: np.ndarray, ids: np.ndarray, class_id: int, box_norm) -> float | None:
    """Share of the class's per-cell probability mass inside the box; None where the map lacks it."""
    probs = np.exp(scores - scores.max(0, keepdims=True))
    probs /= probs.sum(0, keepdims=True)
    mass = np.where(ids == class_id, probs, 0).sum(0)  # [y, x]
    total = mass.sum()
    if total <= 0:
        return None
    x0, y0, x1, y1 = box_norm
    weight = np.outer(cell_overlap(y0, y1, mass.shape[0]), cell_overlap(x0, x1, mass.shape[1]))
    return float((mass * weight).sum() / total)


def iou(boxes: np.ndarray, box) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = ix * iy
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (areas + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def sign_test(positive: int, negative: int) -> float:
    """Two-sided exact binomial p-value of ``positive`` vs ``negative`` under p = 1/2."""
    n = positive + negative
    if n == 0:
        return 1.0
    low = min(positive, negative)
    if n > 1000:  # normal approximation with continuity correction
        z = (abs(positive - negative) - 1) / math.sqrt(n)
        return min(1.0, math.erfc(z / math.sqrt(2)))
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def check(args: argparse.Namespace) -> dict:
    maps = RawMaps(args.labels)
    boxes = load_boxes(args.boxes, args.image_root)
    keys = sorted(set(boxes) & maps.keys)[: args.limit]
    if not keys:
        raise ValueError(f"no key is in both {args.labels} and {args.boxes} "
                         f"({len(maps.keys)} maps, {len(boxes)} box entries)")
    rng = np.random.default_rng(args.seed)
    fractions = {layout: [] for layout in READINGS}
    differences, ious, confidences = [], [], {layout: [] for layout in READINGS}
    for key in tqdm(keys, unit="img", desc="checking", disable=None):
        entry = boxes[key]
        width, height = entry["size"]
        raw = maps.raw(key)
        per_layout = {layout: [] for layout in READINGS}
        for class_id, box in entry["objects"]:
            if not 0 <= class_id < maps.num_classes:
                raise ValueError(f"{args.boxes}: {key}: class {class_id} outside [0, {maps.num_classes})")
            box_norm = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
            values = {layout: mass_inside(*canonical(raw, layout), class_id, box_norm) for layout in READINGS}
            if any(v is None for v in values.values()):
                continue
            for layout in READINGS:
                per_layout[layout].append(values[layout])
            crops = random_crops(rng, args.crops, width, height)
            ious.append(iou(crops, box_norm))
            for layout in READINGS:
                scores, ids = canonical(raw, layout)
                stack = lambda a: np.broadcast_to(a, (len(crops),) + a.shape).copy()  # noqa: E731
                pooled = pool_boxes(stack(scores), stack(ids), crops, num_classes=maps.num_classes)
                confidences[layout].append(pooled[:, class_id].numpy())
        if per_layout["official"]:
            for layout in READINGS:
                fractions[layout].append(float(np.mean(per_layout[layout])))
            differences.append(fractions["official"][-1] - fractions["yx"][-1])
    if not differences:
        raise ValueError("no image's ground-truth class appears in its label map")
    return summarize(args, fractions, np.array(differences), ious, confidences)


def summarize(args, fractions, differences, ious, confidences) -> dict:
    positive, negative = int((differences > 1e-6).sum()), int((differences < -1e-6).sum())
    p_value = sign_test(positive, negative)
    rng = np.random.default_rng(args.seed)
    resampled = differences[rng.integers(0, len(differences), (1000, len(differences)))].mean(1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    supported = "official" if positive > negative else "yx"
    verdict = supported if p_value < args.alpha else "inconclusive"
    bins = np.linspace(0, 1, 11)
    all_ious = np.concatenate(ious)
    which = np.clip(np.digitize(all_ious, bins) - 1, 0, 9)
    curve = {layout: [float(np.concatenate(confidences[layout])[which == b].mean()) if np.any(which == b) else None
                      for b in range(10)] for layout in READINGS}
    return {
        "images": len(differences), "verdict": verdict, "supported": supported, "p_value": p_value,
        "confidence": 1 - p_value,
        "mean_mass_inside_box": {layout: float(np.mean(fractions[layout])) for layout in READINGS},
        "images_favouring": {"official": positive, "yx": negative, "tie": len(differences) - positive - negative},
        "mean_difference_official_minus_yx": float(differences.mean()),
        "bootstrap_95": [float(low), float(high)],
        "curve": {"iou_bins": bins.tolist(), "confidence": curve, "crops": int(len(all_ious))},
    }


def plot_curve(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.array(report["curve"]["iou_bins"])
    centers = (bins[:-1] + bins[1:]) / 2
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for layout, values in report["curve"]["confidence"].items():
        values = np.array([np.nan if v is None else v for v in values])
        axis.plot(centers, values, marker="o", label=f"read as {layout}")
    axis.set(xlabel="IoU of the random crop with the ground-truth box",
             ylabel="pooled confidence of the ground-truth class", xlim=(0, 1), ylim=(0, 1),
             title=f"LabelPooling vs crop IoU ({report['images']} images, verdict: {report['verdict']})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = check(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"error: {str(error).strip(chr(34))}", file=sys.stderr)
        return EXIT_FAILED
    share = report["mean_mass_inside_box"]
    print("\n".join([
        f"layout check over {report['images']} images of {args.labels}",
        f"  mean share of the true class's map mass inside its box: official {share['official']:.3f}, "
        f"yx {share['yx']:.3f}",
        f"  images favouring official {report['images_favouring']['official']}, yx "
        f"{report['images_favouring']['yx']}, ties {report['images_favouring']['tie']}; sign test p = "
        f"{report['p_value']:.3g}; official - yx mean {report['mean_difference_official_minus_yx']:+.3f}, "
        f"bootstrap 95 % [{report['bootstrap_95'][0]:+.3f}, {report['bootstrap_95'][1]:+.3f}]",
        f"  verdict: {report['verdict']}" + ("" if report["verdict"] == "inconclusive" else
                                            f" (confidence {100 * report['confidence']:.4g} %)"),
    ]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    if args.plot is not None:
        plot_curve(report, args.plot)
        print(f"  curve: {args.plot}")
    return EXIT_OK if report["verdict"] != "inconclusive" else EXIT_INCONCLUSIVE


if __name__ == "__main__":
    sys.exit(main())
