"""Sample source: listing, class maps, epoch layout, encoded-image checks, the worker callable."""
import io
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import encode, gradient_image, info, make_dataset
from PIL import Image

from relabel_dali import LabelShardReader, LabelShardWriter
from relabel_dali.data.augment import AugmentDraws, random_resized_crop_window
from relabel_dali.data.encoded import image_size
from relabel_dali.data.settings import TrainAugment
from relabel_dali.data.encoded import encoded_problem
from relabel_dali.data.listing import BadSampleError, Listing, list_images, load_class_map, match_records
from relabel_dali.data.order import epoch_permutation, rank_slots
from relabel_dali.data.source import AUGMENT_FIELDS, SampleSource


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

    def test_compact_arrays_round_trip(self, tmp_path):
        paths = ["b/x.JPEG", "a/y.png", "a/z.tar.JPEG", "a/sub/w.jpg", "b/ü.JPEG", "a/noext"]
        listing = Listing.from_paths(tmp_path, paths)
        assert listing.paths == sorted(paths)
        assert listing.keys == [p.rsplit(".", 1)[0] if "." in p.split("/")[-1] else p for p in sorted(paths)]
        assert listing.labels.tolist() == [0, 0, 0, 0, 1, 1]  # the class is the first folder
        # No per-sample Python objects: a few arrays whatever the size.
        assert all(isinstance(getattr(listing, name), np.ndarray)
                   for name in ("dir_ids", "suffix_ids", "stems", "stem_offsets"))
        clone = pickle.loads(pickle.dumps(listing))
        assert clone.paths == listing.paths
        kept = listing.subset(np.array([True, False, True, False, True, False]))
        assert kept.paths == [listing.path(i) for i in (0, 2, 4)] and kept.labels.tolist() == [0, 0, 1]

    def test_pickle_is_small(self, tmp_path):
        # ImageNet-like names: the listing must pickle to about its stems' bytes, not per object.
        paths = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(50) for i in range(200)]
        listing = Listing.from_paths(tmp_path, paths)
        stems = sum(len(p.split("/")[1]) - len(".JPEG") for p in paths)
        assert len(pickle.dumps(listing)) < stems + 12 * len(paths)

    # Names that order differently as bytes than as (folder, name) pairs, or have odd suffixes.
    TRICKY = ["a/x.JPEG", "a-b/y.JPEG", "a/b/z.png", "a/b.JPEG", "a/img.JPEG", "a/img-2.JPEG", "a/img.tar.gz",
              "a/.hidden", "a/end.", "a/..", "é/ünï.JPEG", "z/😀.png", "a/" + "long" * 30 + ".jpg",
              "a/" + "long" * 30 + "er.jpg", "a/" + "long" * 30, "b/sp ace.JPEG", "b/x.jpeg", "b/X.JPEG"]

    @staticmethod
    def reference(paths):
        """The listing of ``paths`` worked out string by string, as the first version did."""
        rows, dirs, suffixes = [], {}, {}
        for path in sorted(paths):
            folder, _, name = path.rpartition("/")
            dot = name.rfind(".")
            suffix = name[dot:] if 0 < dot < len(name) - 1 else ""
            rows.append((dirs.setdefault(folder, len(dirs)), suffixes.setdefault(suffix, len(suffixes)),
                         f"{folder}/{name[:len(name) - len(suffix)]}"))
        return rows, tuple(dirs), tuple(suffixes)

    @pytest.mark.parametrize("seed", range(6))
    def test_order_and_keys_are_the_per_string_reference(self, tmp_path, seed):
        rng = np.random.default_rng(seed)
        alphabet = list("ab-._/0zé😀") + ["A", "."]
        paths = set(self.TRICKY)
        for _ in range(300):
            folder = "".join(rng.choice(alphabet[:3], rng.integers(1, 4)))
            name = "".join(rng.choice(alphabet, rng.integers(1, 70))).replace("/", "_")
            paths.add(f"{folder}/{name}")
        paths = list(paths)
        rng.shuffle(paths)
        listing = Listing.from_paths(tmp_path, paths)
        rows, dirs, suffixes = self.reference(paths)
        assert listing.paths == sorted(paths) and (listing.dirs, listing.suffixes) == (dirs, suffixes)
        assert listing.keys == [key for _, _, key in rows]
        assert listing.dir_ids.tolist() == [d for d, _, _ in rows]
        assert listing.suffix_ids.tolist() == [s for _, s, _ in rows]

    def test_file_list_lines_are_stripped_as_python_does(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, classes=2, per_class=3, labels=False)
        plain = "c1/img2.JPEG\nc0/img1.JPEG\n\nc0/img0.JPEG"  # no newline after the last line
        messy = "  c1/img2.JPEG\r\n\tc0/img1.JPEG \r\n\x0b\n\u2028c0/img0.JPEG\u00a0"
        for number, text in enumerate((plain, messy, messy.replace("img2", "ïmg2"))):
            (tmp_path / f"list{number}.txt").write_text(text, encoding="utf-8")
        expected = ["c0/img0.JPEG", "c0/img1.JPEG", "c1/img2.JPEG"]
        assert list_images(image_root, file_list=tmp_path / "list0.txt").paths == expected
        assert list_images(image_root, file_list=tmp_path / "list1.txt").paths == expected
        assert list_images(image_root, file_list=tmp_path / "list2.txt").paths[2] == "c1/ïmg2.JPEG"
        (tmp_path / "bad.txt").write_bytes(b"c0/img0.JPEG\nc0/\xff.JPEG\n")
        with pytest.raises(ValueError, match="bad.txt: not UTF-8 text"):
            list_images(image_root, file_list=tmp_path / "bad.txt")

    def test_file_entry_outside_a_class_folder(self, tmp_path):
        with pytest.raises(ValueError, match="'loose.JPEG' is not inside a class folder"):
            Listing.from_paths(tmp_path, ["loose.JPEG"])

    def test_empty_and_missing_root(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="not a folder"):
            list_images(tmp_path / "nope")
        with pytest.raises(ValueError, match="no images found"):
            list_images(tmp_path)


class KeysOnly:
    """What record matching reads of a LabelShardReader: its keys, in record order."""

    def __init__(self, keys, path="labels"):
        self.keys, self.path = list(keys), path

    def keys_buffer(self, pad=0):
        return np.frombuffer("".join(key + "\n" for key in self.keys).encode() + bytes(pad), np.uint8).copy()

    def __len__(self):
        return len(self.keys)


class TestMatchRecords:
    @pytest.mark.parametrize("seed", range(8))
    def test_record_numbers_are_a_dict_lookup(self, tmp_path, seed):
        rng = np.random.default_rng(seed)
        stems = {f"c{rng.integers(3)}/{rng.integers(10 ** rng.integers(1, 12))}" for _ in range(400)}
        paths = [f"{stem}.{rng.choice(['JPEG', 'png'])}" for stem in stems]
        listing = Listing.from_paths(tmp_path, paths)
        keys = listing.keys
        records = [key for key in keys if rng.random() < 0.9] + [f"x/{i}" for i in range(rng.integers(4))]
        if seed % 2:
            rng.shuffle(records)  # seeds 0, 2, ...: the records in the images' order (pack_labels' order)
        lookup = {key: i for i, key in enumerate(records)}
        matched, report = match_records(listing, KeysOnly(records), "skip")
        kept = [key for key in keys if key in lookup]
        assert matched.keys == kept and matched.record_numbers.tolist() == [lookup[key] for key in kept]
        assert report.dropped == [listing.path(i) for i, key in enumerate(keys) if key not in lookup]
        assert report.unused_records == sorted(set(records) - set(keys))
        assert (report.dropped_count, report.unused_count) == (len(report.dropped), len(report.unused_records))

    def test_same_records_in_order(self, tmp_path):
        listing = Listing.from_paths(tmp_path, [f"c/{i:04d}.JPEG" for i in range(50)])
        matched, report = match_records(listing, KeysOnly(listing.keys))
        assert matched.record_numbers.tolist() == list(range(50)) and report.unused_count == 0

    def test_keys_twice(self, tmp_path):
        listing = Listing.from_paths(tmp_path, ["c/a.JPEG", "c/b.JPEG", "c/b.png"])
        with pytest.raises(BadSampleError, match="2 key\\(s\\) appear twice in the key files"):
            match_records(listing, KeysOnly(["c/a", "c/a", "c/b", "c/b"]))
        with pytest.raises(BadSampleError, match="two images share a key"):
            match_records(listing, KeysOnly(["c/a", "c/b"]))


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


class TestImageSize:
    @pytest.mark.parametrize("fmt,mode,options", [("JPEG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}),
                                                  ("JPEG", "CMYK", {}), ("JPEG", "L", {}), ("PNG", "RGB", {}),
                                                  ("BMP", "RGB", {}), ("WEBP", "RGB", {})])
    @pytest.mark.parametrize("size", [(37, 91), (600, 17), (1, 1)])
    def test_header_size_equals_pil(self, fmt, mode, options, size):
        buffer = io.BytesIO()
        Image.fromarray(gradient_image(*size)).convert(mode).save(buffer, fmt, **options)
        with Image.open(io.BytesIO(buffer.getvalue())) as image:
            assert image_size(buffer.getvalue()) == (image.height, image.width) == size

    @pytest.mark.parametrize("orientation,expected", [(1, (30, 50)), (3, (30, 50)), (6, (50, 30)), (8, (50, 30))])
    def test_exif_orientation(self, orientation, expected):
        image = Image.fromarray(gradient_image(30, 50))
        exif = image.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", exif=exif.tobytes())
        assert image_size(buffer.getvalue()) == (30, 50)
        assert image_size(buffer.getvalue(), exif=True) == expected

    def test_no_size_in_header(self):
        with pytest.raises(ValueError, match="no image size in the header"):
            image_size(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\0" * 20)


class TorchDraws:
    """The draws torchvision's RandomResizedCrop.get_params makes, from torch's global generator."""

    def uniform(self, low, high):
        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low, high):
        return int(torch.randint(low, high, size=(1,)).item())


class TestAugmentDraws:
    @pytest.mark.parametrize("size", [(375, 500), (500, 375), (20, 300), (300, 20), (7, 7), (1000, 50)])
    @pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0), (1.0, 1.0)])
    def test_crop_window_is_torchvisions(self, size, scale):
        from torchvision.transforms import RandomResizedCrop

        for seed in range(60):
            torch.manual_seed(seed)
            expected = RandomResizedCrop.get_params(torch.empty(3, *size), list(scale), [3 / 4, 4 / 3])
            torch.manual_seed(seed)
            assert random_resized_crop_window(TorchDraws(), *size, scale, (3 / 4, 4 / 3)) == tuple(expected)

    def test_a_pure_function_of_seed_rank_epoch_slot(self):
        draws = AugmentDraws(seed=4, rank=1)
        slots = [0, 5, 1023, 1024, 3000]
        forward = [draws(2, slot, 375, 500) for slot in slots]
        fresh = AugmentDraws(seed=4, rank=1)
        assert [fresh(2, slot, 375, 500) for slot in reversed(slots)] == forward[::-1]
        for other in (AugmentDraws(seed=5, rank=1)(2, 5, 375, 500), AugmentDraws(seed=4, rank=0)(2, 5, 375, 500),
                      draws(3, 5, 375, 500)):
            assert other != forward[1]

    def test_parameters_follow_the_recipe(self):
        draws = AugmentDraws(seed=0, rank=0, color_jitter=0.4, lighting_std=0.1)
        samples = [draws(0, slot, 300, 400) for slot in range(4000)]
        areas = np.array([s.height * s.width / (300 * 400) for s in samples])
        jitter = np.array([s.jitter for s in samples])
        lighting = np.array([s.lighting for s in samples])
        assert 0.08 - 0.01 <= areas.min() and areas.max() <= 1.0
        assert abs(np.mean([s.mirror for s in samples]) - 0.5) < 0.05
        assert jitter.min() >= 0.6 and jitter.max() <= 1.4 and abs(jitter.mean() - 1) < 0.02
        assert np.allclose(lighting.std(axis=0), 0.1, rtol=0.1) and np.abs(lighting.mean(axis=0)).max() < 0.01
        for s in samples[:50]:
            assert s.box == (s.left / 400, s.top / 300, (s.left + s.width) / 400, (s.top + s.height) / 300)

    def test_off_switches(self):
        sample = AugmentDraws(seed=0, rank=0, flip=False, color_jitter=0, lighting_std=0)(0, 3, 30, 40)
        assert not sample.mirror and sample.jitter == (1.0, 1.0, 1.0) and sample.lighting == (0.0, 0.0, 0.0)


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
        assert source.report.dropped == ["c1/img2.JPEG"] and "c1/img2" not in source.keys and len(source.listing) == 7

    def test_record_without_image(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path, extra_records=("c9/ghost",))
        with pytest.raises(BadSampleError, match=r"1 label record\(s\) without an image.*c9/ghost"):
            SampleSource(image_root, label_root, batch_size=2)
        source = SampleSource(image_root, label_root, batch_size=2, on_bad_sample="skip")
        assert source.report.unused_records == ["c9/ghost"] and len(source.listing) == 8

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

    def test_training_source_sends_its_augmentation(self, tmp_path):
        image_root, label_root, keys = make_dataset(tmp_path)
        augment = TrainAugment(image_size=16)
        source = SampleSource(image_root, label_root, batch_size=2, seed=6, rank=0, augment=augment, start_epoch=1)
        draws = AugmentDraws(seed=6, rank=0)
        reader = LabelShardReader(label_root)
        for position in range(len(source)):
            image, packed = source(info(position, epoch=2))
            index = source.unpack(packed)[1]
            with Image.open(image_root / (keys[index] + ".JPEG")) as photo:
                expected = draws(3, position, photo.height, photo.width)
            fields = source.packed_fields
            values = {name: packed[fields[name][0]:fields[name][0] + np.dtype(dtype).itemsize * int(np.prod(shape))]
                      .view(dtype).reshape(shape) for name, (dtype, shape) in AUGMENT_FIELDS.items()}
            assert values["anchor"].tolist() == [expected.top, expected.left]
            assert values["crop_shape"].tolist() == [expected.height, expected.width]
            assert np.allclose(values["box"], expected.box) and values["mirror"] == expected.mirror
            assert np.allclose([values[n] for n in ("brightness", "contrast", "saturation")], expected.jitter)
            assert np.allclose(values["lighting"], expected.lighting)
            start, dtype, shape = fields["scores"]
            scores = packed[start:start + dtype.itemsize * int(np.prod(shape))].view(dtype).reshape(shape)
            assert np.array_equal(scores, reader.record(keys[index]).scores)

    @pytest.mark.parametrize("bad", ["nan", "inf", "class_id"])
    def test_bad_label_record_named_by_key(self, tmp_path, bad):
        image_root, _, keys = make_dataset(tmp_path, labels=False)
        label_root = tmp_path / "bad_labels"
        writer = LabelShardWriter(label_root, k=2, height=2, width=2, num_classes=4, score_dtype="float32")
        with writer.shard("labels-00000") as shard:
            for n, key in enumerate(keys):
                scores = np.ones((2, 2, 2), np.float32)
                ids = np.stack([np.zeros((2, 2), np.int64), np.ones((2, 2), np.int64)])
                shard.add(key, scores, ids)
        writer.finalize()
        # Damage record 3 in place, as a flipped byte or a bad writer would.
        reader = LabelShardReader(label_root)
        shard_path, record_size = reader.shard_paths[0], reader.geometry.record_dtype.itemsize
        record = np.frombuffer(bytearray(shard_path.read_bytes()), np.uint8)
        view = record[-len(reader) * record_size:].view(reader.geometry.record_dtype)
        if bad == "class_id":
            view[3]["class_ids"][0, 0, 0] = 9
        else:
            view[3]["scores"][0, 1, 1] = float(bad)
        shard_path.write_bytes(record.tobytes())
        source = SampleSource(image_root, label_root, batch_size=2, shuffle=False)
        with pytest.raises(BadSampleError, match=rf"label record 3 \(key '{keys[3]}'\)"):
            source(info(3))
        skip = SampleSource(image_root, label_root, batch_size=2, shuffle=False, on_bad_sample="skip")
        assert skip.unpack(skip(info(3))[1])[1] == 4

    def test_bad_arguments(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        with pytest.raises(ValueError, match="on_bad_sample 'ignore'"):
            SampleSource(image_root, batch_size=2, on_bad_sample="ignore")
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
            SampleSource(image_root, batch_size=0)


def test_a_killed_unreaped_owner_counts_as_gone():
    # A spawned worker that unpickles its source after the trainer was killed, but before anyone
    # reaped it, must still see the owner as gone (and exit) rather than outlive it.
    import signal
    import subprocess
    import time

    from relabel_dali.data.workers import alive as _alive

    process = subprocess.Popen(["sleep", "30"])
    assert _alive(process.pid)
    process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(process.pid)  # a zombie until the wait below
    assert process.poll() is not None or process.wait(timeout=5) is not None
