"""Sample source: listing, class maps, epoch layout, encoded-image checks, the worker callable.

``make_dataset`` is shared with the pipeline, loader and check_dataset tests.
"""
import io
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from relabel_dali import LabelShardReader, LabelShardWriter
from relabel_dali.sources import (BadSampleError, SampleSource, encoded_problem, epoch_permutation,
                                  list_images, load_class_map, rank_slots)

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


class TestListing:
    def test_folder_class_map_and_keys(self, tmp_path):
        image_root, _, keys = make_dataset(tmp_path, classes=3, per_class=2, labels=False)
        listing = list_images(image_root)
        assert listing.keys == sorted(keys)
        assert listing.paths == [key + ".JPEG" for key in sorted(keys)]
        assert listing.labels.tolist() == [0, 0, 1, 1, 2, 2]

    @pytest.mark.parametrize("as_file", [False, True])
    def test_explicit_class_map(self, tmp_path, as_file):
        image_root, _, _ = make_dataset(tmp_path, classes=2, per_class=1, labels=False)
        mapping = {"7": "c0", "3": "c1"}  # index -> wnid, as imagenet1k_to_21k.json stores it
        if as_file:
            (tmp_path / "map.json").write_text(json.dumps(mapping))
            mapping = tmp_path / "map.json"
        assert list_images(image_root, class_map=mapping).labels.tolist() == [7, 3]

    def test_imagenet_class_map(self):
        # Index 0 of ImageNet-1k is the tench (n01440764), index 1 the goldfish (n01443537).
        mapping = load_class_map("imagenet", ["n01443537", "n01440764"])
        assert mapping["n01440764"] == 0 and mapping["n01443537"] == 1 and len(mapping) == 1000

    def test_wnid_to_index_dict(self):
        assert load_class_map({"a": 5, "b": 2}, ["a", "b"]) == {"a": 5, "b": 2}

    def test_file_list(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, classes=2, per_class=3, labels=False)
        (tmp_path / "list.txt").write_text("c1/img2.JPEG\nc0/img1.JPEG\n\n")
        listing = list_images(image_root, file_list=tmp_path / "list.txt")
        assert listing.keys == ["c0/img1", "c1/img2"] and listing.labels.tolist() == [0, 1]

    def test_missing_class_fails(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, classes=2, per_class=1, labels=False)
        with pytest.raises(ValueError, match=r"no index for class folder\(s\) \['c1'\]"):
            list_images(image_root, class_map={"c0": 0})

    def test_bad_class_map_file(self, tmp_path):
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(ValueError, match="bad.json: unreadable"):
            load_class_map(tmp_path / "bad.json", ["a"])

    def test_empty_and_missing_root(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="not a folder"):
            list_images(tmp_path / "nope")
        with pytest.raises(ValueError, match="no images found"):
            list_images(tmp_path)


class TestEpochLayout:
    @pytest.mark.parametrize("n", [1, 7, 24, 25])
    @pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 3), (3, 2)])
    def test_mask_covers_each_sample_exactly_once(self, n, world_size, batch_size):
        order = epoch_permutation(n, 0, 0)
        parts = [rank_slots(order, rank=r, world_size=world_size, batch_size=batch_size, remainder="mask")
                 for r in range(world_size)]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) % batch_size == 0
        seen = np.concatenate(parts)
        assert sorted(seen[seen >= 0].tolist()) == list(range(n))
        assert (seen < 0).sum() == len(seen) - n < world_size * batch_size

    @pytest.mark.parametrize("n", [5, 24, 25])
    @pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 3)])
    def test_pad_sees_every_sample_and_wraps(self, n, world_size, batch_size):
        order = epoch_permutation(n, 3, 1)
        parts = [rank_slots(order, rank=r, world_size=world_size, batch_size=batch_size, remainder="pad")
                 for r in range(world_size)]
        seen = np.concatenate(parts)
        step = world_size * batch_size
        assert len(seen) == -(-n // step) * step and len({len(p) for p in parts}) == 1
        assert set(seen.tolist()) == set(range(n))
        counts = np.bincount(seen, minlength=n)
        assert counts.max() - counts.min() <= 1 + step // n

    @pytest.mark.parametrize("n", [24, 25, 30])
    def test_drop_sees_each_sample_at_most_once(self, n):
        parts = [rank_slots(epoch_permutation(n, 0, 2), rank=r, world_size=2, batch_size=4, remainder="drop")
                 for r in range(2)]
        seen = np.concatenate(parts)
        assert len(seen) == n // 8 * 8 and len(set(seen.tolist())) == len(seen)

    def test_orders_repeat_for_a_seed_and_differ_between_epochs(self):
        assert np.array_equal(epoch_permutation(100, 5, 3), epoch_permutation(100, 5, 3))
        assert not np.array_equal(epoch_permutation(100, 5, 3), epoch_permutation(100, 5, 4))
        assert not np.array_equal(epoch_permutation(100, 5, 3), epoch_permutation(100, 6, 3))

    def test_bad_arguments(self):
        order = np.arange(10)
        with pytest.raises(ValueError, match="remainder 'wrap'"):
            rank_slots(order, rank=0, world_size=1, batch_size=2, remainder="wrap")
        with pytest.raises(ValueError, match=r"rank 2 outside \[0, world_size=2\)"):
            rank_slots(order, rank=2, world_size=2, batch_size=2, remainder="pad")
        with pytest.raises(ValueError, match="10 samples make no full global batch of 2 x 8"):
            rank_slots(order, rank=0, world_size=2, batch_size=8, remainder="drop")


class TestEncodedProblem:
    @pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB"),
                                          ("BMP", "RGB"), ("WEBP", "RGB")])
    def test_good_images_pass(self, fmt, mode):
        assert encoded_problem(encode(gradient_image(20, 30), fmt, mode)) is None

    def test_trailing_bytes_after_jpeg_end_pass(self):
        assert encoded_problem(encode(gradient_image(20, 30)) + b"\0" * 100) is None

    @pytest.mark.parametrize("data,message", [
        (b"", "empty file"),
        (encode(gradient_image(40, 40))[:-300], "truncated JPEG"),
        (encode(gradient_image(40, 40), "PNG")[:-30], "truncated PNG"),
        (b"<html>not an image</html>", "not an image"),
    ])
    def test_bad_images_named(self, data, message):
        assert message in encoded_problem(data)


class TestSampleSource:
    @pytest.mark.parametrize("score_dtype", ["float32", "float16", "uint8"])
    def test_outputs_are_the_stored_record(self, tmp_path, score_dtype):
        image_root, label_root, keys = make_dataset(tmp_path, score_dtype=score_dtype)
        source = SampleSource(image_root, label_root, batch_size=2, shuffle=False)
        reader = LabelShardReader(label_root)
        assert source.quantized == (score_dtype == "uint8")
        for slot in range(len(source)):
            out = source(info(slot))
            assert [o.dtype for o in out] == source.output_dtypes and [o.ndim for o in out] == source.output_ndims
            image, packed = out
            assert packed.nbytes == source.packed_size == 16 + reader.geometry.record_dtype.itemsize
            label, index, record = source.unpack(packed)
            stored = reader.record(keys[slot])
            assert index == slot and label == slot // 4
            assert image.tobytes() == (image_root / (keys[slot] + ".JPEG")).read_bytes()
            assert record.scores.dtype == np.dtype(score_dtype) and np.array_equal(record.scores, stored.scores)
            assert np.array_equal(record.class_ids, stored.class_ids)
            assert (record.scale, record.offset) == (stored.scale, stored.offset)
            # The packed fields the graph slices out, read independently of unpack().
            fields = source.packed_fields
            for name, value in (("label", label), ("index", index), ("scores", stored.scores),
                                ("class_ids", stored.class_ids), ("scale", stored.scale),
                                ("offset", stored.offset)):
                start, dtype, shape = fields[name]
                count = int(np.prod(shape, dtype=np.int64))
                raw = packed[start:start + dtype.itemsize * count].view(dtype).reshape(shape)
                assert np.array_equal(raw, value), name
        with pytest.raises(StopIteration):
            source(info(len(source)))

    def test_without_labels(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        source = SampleSource(image_root, batch_size=4, shuffle=False)
        image, packed = source(info(5))
        assert packed.nbytes == 16 and source.unpack(packed) == (1, 5, None)
        sample = source.sample(info(5))
        assert (sample.label, sample.index, sample.record) == (1, 5, None)
        assert sample.image.tobytes() == image.tobytes()

    def test_epoch_index_drives_the_order(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False, per_class=8)
        source = SampleSource(image_root, batch_size=4, seed=3, start_epoch=2)
        order = [source.sample(info(i, epoch=1)).index for i in range(len(source))]
        assert order == source.epoch_slots(3).tolist()
        assert sorted(order) == list(range(16))

    def test_pickles_without_the_mapping(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path)
        source = SampleSource(image_root, label_root, batch_size=2)
        source(info(0))
        clone = pickle.loads(pickle.dumps(source))
        assert clone._reader is None
        assert np.array_equal(clone(info(1))[1], source(info(1))[1])

    def test_image_without_record(self, tmp_path):
        image_root, label_root, keys = make_dataset(tmp_path, skip_records=("c1/img2",))
        with pytest.raises(BadSampleError, match=r"1 image\(s\) under .* without a label record.*c1/img2.JPEG"):
            SampleSource(image_root, label_root, batch_size=2)
        source = SampleSource(image_root, label_root, batch_size=2, on_bad_sample="skip")
        assert source.dropped == ["c1/img2.JPEG"] and "c1/img2" not in source.keys and len(source.paths) == 7

    def test_record_without_image(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path, extra_records=("c9/ghost",))
        with pytest.raises(BadSampleError, match=r"1 label record\(s\) without an image.*c9/ghost"):
            SampleSource(image_root, label_root, batch_size=2)
        source = SampleSource(image_root, label_root, batch_size=2, on_bad_sample="skip")
        assert source.unused_records == ["c9/ghost"] and len(source.paths) == 8

    def test_truncated_image_fail_and_skip(self, tmp_path):
        image_root, label_root, keys = make_dataset(tmp_path)
        bad = image_root / "c0" / "img1.JPEG"
        bad.write_bytes(bad.read_bytes()[:200])
        source = SampleSource(image_root, label_root, batch_size=2, shuffle=False)
        with pytest.raises(BadSampleError, match=r"img1.JPEG: truncated JPEG"):
            source(info(1))
        skip = SampleSource(image_root, label_root, batch_size=2, shuffle=False, on_bad_sample="skip")
        label, index, record = skip.unpack(skip(info(1))[1])
        reader = LabelShardReader(label_root)
        assert index == 2 and label == 0  # the next good sample stands in
        assert np.array_equal(record.scores, reader.record("c0/img2").scores)

    def test_bad_arguments(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        with pytest.raises(ValueError, match="on_bad_sample 'ignore'"):
            SampleSource(image_root, batch_size=2, on_bad_sample="ignore")
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
            SampleSource(image_root, batch_size=0)
