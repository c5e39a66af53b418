"""Shared test set-up.

CUDA must stay uninitialised in the test process until the GPU tests: DALI refuses to fork the
sample-source workers of the CPU loader tests once it is. ``torch.cuda.is_available()`` and
``device_count()`` initialise the driver unless PYTORCH_NVML_BASED_CUDA_CHECK=1 (NVML counts the
GPUs instead), so that is set before anything imports torch; tests marked ``gpu`` skip without a
GPU and run last.

One intra-op thread per process unless the caller chose otherwise: ``make test`` runs two pytest
workers on two cores, and most tests start train.py or a tool as child processes (which inherit
it). With more OpenMP threads than free cores, each parallel region waits for a descheduled thread:
on a busy two-core machine a tiny train.py run with two threads took twice the CPU time (14 s
against 7 s) and trained at 2-5 images/s instead of 50-90, for the same numbers. Tests of thread
counts set them explicitly.
"""
import os

os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from relabel_dali import LabelShardWriter  # noqa: E402
from relabel_dali.data.benchdata import TINY_CLASSES, write_tiny_dataset  # noqa: E402
from relabel_dali.ops.build import load_operators  # noqa: E402
from relabel_dali.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


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


# ---- shared helpers: official-format label map files (tools/pack_labels.py's input) ----------------
def official_array(rng, k=5, size=15, num_classes=1000):
    """An official-format [2, k, A, B] float array with scores sorted descending per location."""
    scores = -np.sort(-rng.normal(0, 3, size=(k, size, size)), axis=0)
    ids = np.stack([rng.choice(num_classes, size=k, replace=False) for _ in range(size * size)], axis=1)
    return np.stack([scores, ids.reshape(k, size, size)]).astype(np.float32)


def make_tree(root, count=12, seed=0, suffix=".pt"):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(count):
        key = f"n{i % 3:08d}/n{i % 3:08d}_{i:04d}"
        arrays[key] = official_array(rng)
        path = root / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path, arrays[key])
    return arrays


def save(path, array):
    if path.suffix == ".pt":
        torch.save(torch.from_numpy(array), path)
    elif path.suffix == ".npy":
        np.save(path, array)
    else:
        np.savez(path, labels=array)


# ---- shared helpers: a tiny ImageNet-style training set for train.py ---------------------------
CLASSES = TINY_CLASSES
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4


def write_tiny(root: Path, *, size=(48, 40), train: int = TRAIN_PER_CLASS, val: int = VAL_PER_CLASS,
               cells: int = 5) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` (a dominant colour per class) and 3 x cells x cells label
    maps for the training images in ``root/labels``."""
    return write_tiny_dataset(root, train=train, val=val, size=size, cells=cells)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 training and 12 validation JPEGs (48x40) with 3x5x5 label maps, and ReaL labels."""
    root = write_tiny(tmp_path_factory.mktemp("tiny"))
    # ReaL entries in sorted file-name order; one image without acceptable labels.
    names = sorted(f"{w}_val_{i:03d}" for w in CLASSES for i in range(VAL_PER_CLASS))
    real = [[CLASSES.index(n.split("_")[0])] for n in names]
    real[0] = []
    (root / "real.json").write_text(json.dumps(real))
    return root


def argv_for(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.data_path", str(root), "--data.relabel.path", str(root / "labels"),
            "--data.class_map", "folder", "--data.num_classes", "3", "--data.image_size", "32",
            "--model.arch", "mobilenet_v3_small", "--model.kwargs", "{width_mult: 0.25}",
            "--optim.batch_size", "8", "--optim.lr.base_batch_size", "8", "--util.val_batch_size", "8",
            "--optim.epochs", "2", "--optim.warmup.epochs", "1", "--data.num_threads", "1",
            "--data.py_workers", "1", "--compute.device", "cpu", "--util.progress", "False",
            "--util.output_dir", str(out), *extra]


# ---- shared helpers: fn.label_pool inside a DALI pipeline ----------------------------------------
def run_label_pool(scores, class_ids, boxes, batch_size, device="cpu", arg_inputs=None, **op_args):
    """Feeds the samples through ``fn.label_pool`` in batches of ``batch_size``; returns the outputs
    stacked (float32 numpy). ``arg_inputs``: name -> one value per sample, passed as per-sample
    argument inputs (``scale``, ``offset``, ``mirror``); ``op_args``: the operator's arguments."""
    load_operators()
    from nvidia.dali import fn, pipeline_def

    n = len(scores)
    assert n % batch_size == 0
    named = dict(arg_inputs or {})

    def batches():
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            yield (list(scores[part]), list(class_ids[part]), list(boxes[part]),
                   *([np.asarray(v) for v in values[part]] for values in named.values()))

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=0 if device == "gpu" else None,
                  prefetch_queue_depth=1)
    def pipeline():
        s, i, b, *extra = fn.external_source(source=batches, num_outputs=3 + len(named), cycle="raise")
        if device == "gpu":
            s, i = s.gpu(), i.gpu()
        return fn.label_pool(s, i, b, device=device, **op_args, **dict(zip(named, extra)))

    pipe = pipeline()
    pipe.build()
    results = []
    for _ in range(n // batch_size):
        (out,) = pipe.run()
        if device == "gpu":
            out = out.as_cpu()
        results.append(np.stack([np.array(t) for t in out]))
    return np.concatenate(results)


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


# The files that take longest, longest first (``pytest --durations`` summed per file, 2 cores).
# ``make test`` hands whole files to two workers in collection order (``--dist loadfile
# --no-loadscope-reorder``): starting with the longest leaves short files to even out the end, where
# xdist's own order (most tests first) left a long file running alone on one worker.
LONGEST_FIRST = ("test_gpu_check.py", "test_ablate.py", "test_faults.py", "test_train.py", "test_relabel_tool.py",
                 "test_multinode.py", "test_ops.py", "test_cuda_build.py", "test_startup.py", "test_annotator.py",
                 "test_token_pooling.py", "test_bench_loader.py", "test_disk_full.py", "test_loader.py",
                 "test_token_training.py")


# torch's intra-op thread count when the session started (OMP_NUM_THREADS above).
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_reset():
    """After each test, torch's intra-op thread count is the session's again. tools/relabel.py run
    in-process with ``--threads 2`` (in a test or in a module fixture) calls
    ``torch.set_num_threads(2)``, which held for every later test of that pytest worker: one worker
    ran all its later in-process training and annotation with two threads beside the other worker,
    the contention the module docstring describes."""
    yield
    if torch.get_num_threads() != SESSION_THREADS:
        torch.set_num_threads(SESSION_THREADS)


def pytest_collection_modifyitems(config, items):
    gpu_count = torch.cuda.device_count()  # NVML: does not initialise CUDA
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NVML finds none)")
    for item in items:
        if gpu_count == 0 and "gpu" in item.keywords:
            item.add_marker(skip)
    # Stable sort: GPU tests last, so every CPU test runs before anything initialises CUDA; the
    # longest files first, the others in their usual order.
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: ("gpu" in item.keywords, rank.get(item.path.name, len(rank))))


def pytest_itemcollected(item):
    # make test's GPU run collects only the files that say "mark.gpu" (Makefile GPU_TEST_FILES).
    if "gpu" in item.keywords and "mark.gpu" not in _source(item.path):
        raise pytest.UsageError(f"{item.nodeid}: a GPU test in a file that does not say 'mark.gpu', which "
                                "the Makefile's GPU run would not collect; mark it with pytest.mark.gpu")


_SOURCES: dict = {}


def _source(path) -> str:
    if path not in _SOURCES:
        _SOURCES[path] = Path(path).read_text()
    return _SOURCES[path]


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


def kill_after_one_epoch_and_resume(argv: list[str], out: Path, monkeypatch) -> dict:
    """Runs train.main(argv), killed at the start of epoch 1, then resumes it with --resume auto;
    returns the final checkpoint."""
    import train

    original = train.train_one_epoch

    def killed_at_epoch_1(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
        return original(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["epoch"] == 1
    monkeypatch.undo()
    assert train.main(argv + ["--resume", "auto"]) == 0
    return torch.load(out / "checkpoint-last.pth", weights_only=False)
