"""Shared test set-up.

CUDA must stay uninitialised in the test process until the GPU tests: DALI refuses to fork the
sample-source workers of the CPU loader tests once it is. ``torch.cuda.is_available()`` and
``device_count()`` initialise the driver unless PYTORCH_NVML_BASED_CUDA_CHECK=1 (NVML counts the
GPUs instead), so that is set before anything imports torch; tests marked ``gpu`` skip without a
GPU and run last.
"""
import os

os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

import io  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from relabel_dali import LabelShardWriter  # noqa: E402
from relabel_dali.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


# ---- shared helpers: small datasets of photos whose colours name their coordinates ----------------
K, MAP_H, MAP_W, NUM_CLASSES = 3, 5, 6, 16


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """R = x, G = y (pixels), B a per-image constant: colours name their coordinates."""
    y, x = np.mgrid[0:height, 0:width]
    blue = np.full_like(x, 40 + 20 * (seed % 8))
    return np.stack([x, y, blue], axis=-1).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array).convert(mode)
    image.save(buffer, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def label_map(i: int):
    rng = np.random.default_rng(1000 + i)
    scores = -np.sort(-rng.normal(0, 2, (K, MAP_H, MAP_W)), axis=0).astype(np.float32)
    class_ids = np.argsort(rng.random((NUM_CLASSES, MAP_H, MAP_W)), axis=0)[:K]
    return scores, class_ids


def make_dataset(root, *, classes=2, per_class=4, size=(48, 64), labels=True, score_dtype="float16",
                 extra_records=(), skip_records=()):
    """``root/images/c<j>/img<i>.JPEG`` gradient photos and, with ``labels``, packed shards in
    ``root/labels``. Returns (image_root, label_root or None, keys)."""
    image_root = root / "images"
    keys = []
    for j in range(classes):
        (image_root / f"c{j}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = j * per_class + i
            h, w = size
            (image_root / f"c{j}" / f"img{i}.JPEG").write_bytes(encode(gradient_image(h + 4 * n, w + 2 * n, n)))
            keys.append(f"c{j}/img{i}")
    if not labels:
        return image_root, None, keys
    label_root = root / "labels"
    writer = LabelShardWriter(label_root, k=K, height=MAP_H, width=MAP_W, num_classes=NUM_CLASSES,
                              score_dtype=score_dtype)
    with writer.shard("labels-00000") as shard:
        for n, key in enumerate(list(keys) + list(extra_records)):
            if key not in skip_records:
                shard.add(key, *label_map(n))
    writer.finalize()
    return image_root, label_root, keys


def info(idx, epoch=0):
    return SimpleNamespace(idx_in_epoch=idx, epoch_idx=epoch)


# ---- shared helpers: step-by-step colour references ----------------------------------------------
# PIL's "L" conversion: L = R * 299/1000 + G * 587/1000 + B * 114/1000.
LUMA = np.array([0.299, 0.587, 0.114])
STEPS = ("brightness", "contrast", "saturation")
def pil_resize(image: Image.Image, size, order: str = "horizontal_first") -> Image.Image:
    """PIL's bilinear resize with its two passes in a given order. One-axis resizes are single
    passes, so chaining two is exactly what PIL's two-pass resize does (before Pillow 13 always
    horizontal first; Pillow 13 picks the order by the shape)."""
    w, h = size
    if order == "horizontal_first":
        return image.resize((w, image.height), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return image.resize((image.width, h), Image.BILINEAR).resize((w, h), Image.BILINEAR)


def jitter_step_by_step(image, b, c, s, rgb, order):
    """The three jitter maps applied one after another in ``order`` (no clipping), then lighting
    and normalization, in float64: [H, W, 3] normalized."""
    x = image.reshape(-1, 3).astype(np.float64)
    for step in order:
        if step == "brightness":
            x = b * x
        elif step == "contrast":
            x = c * x + (1 - c) * (x @ LUMA).mean()
        else:
            x = s * x + (1 - s) * (x @ LUMA)[:, None]
    x = (x + 255 * np.asarray(rgb) - 255 * np.array(IMAGENET_MEAN)) / (255 * np.array(IMAGENET_STD))
    return x.reshape(image.shape)


def pytest_collection_modifyitems(config, items):
    gpu_count = torch.cuda.device_count()  # NVML: does not initialise CUDA
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NVML finds none)")
    for item in items:
        if gpu_count == 0 and "gpu" in item.keywords:
            item.add_marker(skip)
    # Stable sort: GPU tests last, so every CPU test runs before anything initialises CUDA.
    items.sort(key=lambda item: "gpu" in item.keywords)


def pytest_collection_finish(session):
    session.config.stash[CUDA_AFTER_COLLECTION] = cuda_initialised()


def cuda_initialised() -> dict:
    """Whether torch, or anything at all in this process (DALI's check), has initialised CUDA."""
    state = {"torch": torch.cuda.is_initialized()}
    try:
        from nvidia.dali import backend
    except ImportError:
        return state
    state["driver"] = bool(backend.IsDriverInitialized())
    return state


CUDA_AFTER_COLLECTION = pytest.StashKey[dict]()


@pytest.fixture
def cuda_after_collection(request) -> dict:
    """``cuda_initialised()`` as it was when collection finished."""
    return request.config.stash[CUDA_AFTER_COLLECTION]
