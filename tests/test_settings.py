"""Typed data settings: each validates itself, configs/base.yaml exposes every one of them, the
recipe's defaults agree between the two, and a bad config value names its key."""
import dataclasses

import pytest

from relabel_dali.config import ConfigError, load_config
from relabel_dali.data.settings import DataSettings, Dataset, Labels, Runtime, TrainAugment, ValTransform

# dataclass field -> its data.* key in configs/base.yaml (where the names differ)
KEYS = {
    (Dataset, "image_root"): "train_folder", (Dataset, "file_list"): "file_list", (Labels, "path"): "relabel.path",
    (Labels, "pool_mode"): "relabel.pool_mode", (Labels, "verify"): "verify_labels",
    (Labels, "token_size"): "relabel.token_size", (Labels, "token_compact"): "relabel.token_compact",
    (TrainAugment, "random_area"): "rrc_minimum", (Runtime, "device"): None,  # compute.device
}
# Defaults that differ on purpose: the trainer's are ImageNet's (1000 wnid folders, 4 threads), the
# library's suit any folder of images.
TRAINER_ONLY = {(Dataset, "class_map"), (Runtime, "num_threads"), (Runtime, "start_method")}


def fields():
    for cls in (Dataset, Labels, TrainAugment, ValTransform, Runtime):
        for field in dataclasses.fields(cls):
            yield cls, field


def test_every_setting_is_a_config_key_with_the_same_default():
    data = load_config().data
    for cls, field in fields():
        key = KEYS.get((cls, field.name), field.name)
        if key is None:
            continue
        value = data.get_path(key) if "." in key else data[key]
        if field.default is dataclasses.MISSING or (cls, field.name) in TRAINER_ONLY:
            continue
        if (cls, field.name) == (TrainAugment, "random_area"):
            assert (value, 1.0) == field.default
        elif isinstance(field.default, tuple):
            assert tuple(value) == pytest.approx(field.default), key
        elif key == "file_list":
            assert value is None and field.default is None
        else:
            assert value == field.default, key


def test_from_config_builds_what_the_config_says(tmp_path):
    cfg = load_config(overrides={"data.data_path": str(tmp_path), "data.relabel.path": str(tmp_path / "labels"),
                                 "data.color_jitter": "0.2", "data.flip": "false", "data.dtype": "float16",
                                 "data.class_map": "folder", "data.num_classes": "19", "data.exif": "true",
                                 "data.random_aspect_ratio": "[0.5, 2.0]", "data.on_bad_sample": "skip"})
    settings = DataSettings.from_config(cfg.data, device="cpu", start_method="fork")
    assert settings.train == Dataset(tmp_path / "train", class_map="folder", num_classes=19, on_bad_sample="skip")
    assert settings.val.image_root == tmp_path / "val" and settings.val.preflight_decodes == 0
    assert settings.labels == Labels(tmp_path / "labels")
    assert settings.augment == TrainAugment(color_jitter=0.2, flip=False, exif=True, random_aspect_ratio=(0.5, 2.0))
    assert settings.val_transform == ValTransform(exif=True)
    assert settings.runtime == Runtime(num_threads=4, dtype="float16")


@pytest.mark.parametrize("key,value,message", [
    ("data.rrc_minimum", "1.5", r"data.augment: random_area must be \[min, max\]"),
    ("data.image_size", "0", "data.augment: image_size must be an integer >= 1, got 0"),
    ("data.crop_ratio", "0", r"data.crop_ratio: crop_ratio must be in \(0, 1\]"),
    ("data.py_workers", "-1", "data.runtime: py_workers must be an integer >= 0, got -1"),
    ("data.prefetch_queue_depth", "0", "prefetch_queue_depth must be an integer >= 1"),
    ("data.relabel.pool_mode", "mean", "pool_mode 'mean': expected one of softmax, argmax"),
    ("data.preflight_decodes", "-1", "preflight_decodes must be an integer >= 0"),
])
def test_bad_values_name_their_key(tmp_path, key, value, message):
    cfg = load_config(overrides={"data.data_path": str(tmp_path), "data.relabel.path": "x", key: value})
    with pytest.raises(ConfigError, match=message):
        DataSettings.from_config(cfg.data)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainAugment().image_size = 5
