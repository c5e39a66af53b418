"""Typed data settings: what the loaders, sources and graphs take instead of long keyword lists.

Each setting's default is written here once; ``configs/base.yaml`` exposes every one of them under
``data`` (a test keeps the two in step) and ``DataSettings.from_config`` turns the resolved config
into these objects, refusing bad values with the config key's name. Objects are frozen and
validate themselves, so a graph can trust what it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from relabel_dali.ops.pooling import MODES

BAD_SAMPLE_POLICIES = ("fail", "skip")
POOL_MODES = tuple(MODES)  # declared with their codes in pooling.MODES (and label_pool_math.h)
OUTPUT_DTYPES = ("float32", "float16")
START_METHODS = ("auto", "fork", "spawn")
VERIFY_LABELS = ("off", "open", "full")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: expected one of {', '.join(map(str, choices))}")


def _positive(name: str, value, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ValueError(f"{name} must be an integer >= {0 if zero else 1}, got {value!r}")


def _range(name: str, value, low: float, high: float) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {value!r}")
    return pair


@dataclass(frozen=True)
class Dataset:
    """Which images, and how they are named and labelled."""
    image_root: Path
    file_list: Path | None = None  # image paths relative to image_root, one per line (no folder scan)
    class_map: str | dict = "folder"  # folder, imagenet, a JSON path or a dict of folder -> index
    num_classes: int = 1000
    on_bad_sample: str = "fail"  # fail: stop naming the file; skip: substitute the next good sample
    preflight_decodes: int = 64  # images strictly decoded before training (0: none); check_dataset checks all
    listing_cache: str = "auto"  # where built listings are kept for the node (data/listing_cache.py); off: nowhere

    def __post_init__(self):
        object.__setattr__(self, "image_root", Path(self.image_root))
        if not isinstance(self.listing_cache, (str, Path)) or not str(self.listing_cache):
            raise ValueError(f"listing_cache must be auto, off or a folder, got {self.listing_cache!r}")
        object.__setattr__(self, "listing_cache", str(self.listing_cache))
        if self.file_list is not None:
            object.__setattr__(self, "file_list", Path(self.file_list))
        _positive("num_classes", self.num_classes)
        _positive("preflight_decodes", self.preflight_decodes, zero=True)
        _one_of("on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)


@dataclass(frozen=True)
class Labels:
    """The packed label shards and how they become targets."""
    path: Path
    pool_mode: str = "softmax"
    verify: str = "open"  # off; open: index and key checksums (cheap); full: every record at startup
    token_size: int = 0  # also S x S token targets per crop (TokenLabeling); 0: only the crop's target
    token_compact: bool = True  # token targets as ids, values and rest (docs/OPERATOR.md), not [S*S, C]

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        _one_of("pool_mode", self.pool_mode, POOL_MODES)
        _one_of("verify_labels", self.verify, VERIFY_LABELS)
        _positive("token_size", self.token_size, zero=True)
        if not isinstance(self.token_compact, bool):
            raise ValueError(f"token_compact must be true or false, got {self.token_compact!r}")
        if self.token_size and self.pool_mode.startswith("global"):
            raise ValueError(f"token_size {self.token_size} needs a box pool_mode (softmax or argmax): "
                             f"{self.pool_mode} pools the whole map into one target")


@dataclass(frozen=True)
class TrainAugment:
    """The training augmentation (the official ImageNet recipe's): random-resized crop, flip,
    colour jitter, PCA lighting."""
    image_size: int = 224
    random_area: tuple[float, float] = (0.08, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - s, 1 + s]
    lighting_std: float = 0.1  # PCA lighting coefficients ~ N(0, lighting_std)
    exif: bool = False  # apply EXIF orientation (the official label maps were made without it)

    def __post_init__(self):
        _positive("image_size", self.image_size)
        object.__setattr__(self, "random_area", _range("random_area", self.random_area, 1e-6, 1.0))
        object.__setattr__(self, "random_aspect_ratio",
                           _range("random_aspect_ratio", self.random_aspect_ratio, 1e-3, 1e3))
        for name in ("color_jitter", "lighting_std"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ValTransform:
    """Validation: resize the shorter side to ``image_size / crop_ratio``, centre crop."""
    image_size: int = 224
    crop_ratio: float = 0.875
    exif: bool = False

    def __post_init__(self):
        _positive("image_size", self.image_size)
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio}")


@dataclass(frozen=True)
class Runtime:
    """Where and how a pipeline runs."""
    device: str = "cpu"  # cpu or cuda[:N]
    num_threads: int = 2  # DALI threads per process
    py_workers: int = 2  # parallel sample-source worker processes (0: in the pipeline's thread)
    start_method: str = "fork"  # fork (fast start) or spawn (works once CUDA is initialised)
    dtype: str = "float32"  # image output dtype
    prefetch_queue_depth: int = 2

    def __post_init__(self):
        _positive("num_threads", self.num_threads)
        _positive("py_workers", self.py_workers, zero=True)
        _positive("prefetch_queue_depth", self.prefetch_queue_depth)
        _one_of("start_method", self.start_method, START_METHODS[1:])
        _one_of("dtype", self.dtype, OUTPUT_DTYPES)
        self.device_id  # validates the device

    @property
    def device_id(self) -> int | None:
        """DALI's device_id: None on the CPU."""
        device = str(self.device)
        if device == "cpu":
            return None
        if device == "cuda":
            return 0
        if device.startswith("cuda:") and device[5:].isdigit():
            return int(device[5:])
        raise ValueError(f"device {device}: expected 'cpu' or 'cuda[:N]'")


@dataclass(frozen=True)
class DataSettings:
    """Everything the trainer's data path needs, from one resolved config."""
    train: Dataset
    val: Dataset
    labels: Labels | None
    augment: TrainAugment = field(default_factory=TrainAugment)
    val_transform: ValTransform = field(default_factory=ValTransform)
    runtime: Runtime = field(default_factory=Runtime)

    @classmethod
    def from_config(cls, data, *, device: str = "cpu", start_method: str = "fork") -> "DataSettings":
        """``data``: the config's ``data`` section; ``device``/``start_method`` as resolved for this
        process. A bad value raises ``ConfigError`` naming its ``data.*`` key."""
        from relabel_dali.config import ConfigError

        def build(key: str, make):
            try:
                return make()
            except (TypeError, ValueError) as error:
                raise ConfigError(f"data.{key}: {error}") from None

        root = Path(data.data_path)
        common = dict(class_map=data.class_map, num_classes=data.num_classes, on_bad_sample=data.on_bad_sample,
                      listing_cache=data.listing_cache)
        train = build("train_folder", lambda: Dataset(root / data.train_folder, file_list=data.file_list,
                                                      preflight_decodes=data.preflight_decodes, **common))
        val = build("val_folder", lambda: Dataset(root / data.val_folder, file_list=data.val_file_list,
                                                  preflight_decodes=0, **common))
        labels = None
        if data.relabel.token_size and not data.relabel.use:
            raise ConfigError("data.relabel.token_size needs label maps: set data.relabel.use true (one-hot "
                              "labels have no token targets) or data.relabel.token_size 0")
        if data.relabel.use:
            if not data.relabel.path:
                raise ConfigError("data.relabel.use is true but data.relabel.path is empty: point it at the "
                                  "packed label shards (tools/pack_labels.py) or set --data.relabel.use false")
            labels = build("relabel", lambda: Labels(data.relabel.path, pool_mode=data.relabel.pool_mode,
                                                     verify=data.verify_labels,
                                                     token_size=data.relabel.token_size,
                                                     token_compact=data.relabel.token_compact))
        augment = build("augment", lambda: TrainAugment(
            image_size=data.image_size, random_area=(data.rrc_minimum, 1.0),
            random_aspect_ratio=tuple(data.random_aspect_ratio), flip=data.flip, color_jitter=data.color_jitter,
            lighting_std=data.lighting_std, exif=data.exif))
        val_transform = build("crop_ratio", lambda: ValTransform(image_size=data.image_size,
                                                                 crop_ratio=data.crop_ratio, exif=data.exif))
        runtime = build("runtime", lambda: Runtime(device=device, num_threads=data.num_threads,
                                                   py_workers=data.py_workers, start_method=start_method,
                                                   dtype=data.dtype, prefetch_queue_depth=data.prefetch_queue_depth))
        return cls(train, val, labels, augment, val_transform, runtime)
