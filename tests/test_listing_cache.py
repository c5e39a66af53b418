"""The listing file and the node's listing cache: written once, mapped read-only by every process,
named by what it was built from, rebuilt when any of that changes."""
import logging
import os
import pickle
import time

import numpy as np
import pytest
from conftest import make_dataset

from relabel_dali import LabelShardReader
from relabel_dali.data import listing_cache
from relabel_dali.data.listing import BadSampleError, Listing, MatchReport, list_images, match_records
from relabel_dali.data.listing_cache import cache_folder, dataset_listing
from relabel_dali.data.listing_file import ListingFileError, open_listing, write_listing
from relabel_dali.data.settings import Dataset


def same_listing(a: Listing, b: Listing) -> bool:
    return (a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
            and (a.record_numbers is None) == (b.record_numbers is None)
            and (a.record_numbers is None or a.record_numbers.tolist() == b.record_numbers.tolist()))


@pytest.fixture
def builds(monkeypatch):
    """Counts the listings built (not opened from a file)."""
    count = []
    build = Listing.build.__func__

    def counting(cls, *args, **kwargs):
        count.append(1)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(Listing, "build", classmethod(counting))
    return count


def settle(*paths):
    """Folder times older than the racy window, as on a dataset not being written to."""
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


class TestListingFile:
    def test_round_trip_read_only(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path, classes=3, per_class=3, skip_records=("c1/img1",))
        listing, report = match_records(list_images(image_root), LabelShardReader(label_root), "skip")
        write_listing(tmp_path / "a.listing", listing, {"what": 1}, "d1", report)
        opened, opened_report = open_listing(tmp_path / "a.listing", digest="d1", root=image_root, class_map="folder")
        assert same_listing(opened, listing) and opened_report == report
        assert opened.file == (tmp_path / "a.listing", "d1")
        for name in ("dir_ids", "suffix_ids", "stems", "stem_offsets", "record_numbers"):
            array = getattr(opened, name)
            assert not array.flags.writeable and array.dtype == getattr(listing, name).dtype, name
        # A spawned worker receives the file's name, and maps the same file again.
        payload = pickle.dumps(opened)
        assert len(payload) < 1000 and same_listing(pickle.loads(payload), listing)
        assert pickle.loads(payload).file == opened.file
        # Anything derived from it is in memory again and pickles as arrays.
        kept = opened.subset(np.arange(len(opened)) % 2 == 0)
        assert kept.file is None and pickle.loads(pickle.dumps(kept)).paths == kept.paths

    @pytest.mark.parametrize("damage,message", [
        (lambda data: data[:40], "shorter than its header"),
        (lambda data: b"NOTALIST" + data[8:], "not a listing file"),
        (lambda data: data[:8] + b"\x07" + data[9:], "header checksum mismatch"),
        (lambda data: data[:-1], "bytes, the header says"),
        (lambda data: data[:-2] + bytes([data[-2] ^ 1]) + data[-1:], "trailer checksum mismatch"),
        (lambda data: data[:64] + bytes([data[64] ^ 1]) + data[65:], "array dir_ids checksum mismatch"),
    ])
    def test_damaged_files_are_refused(self, tmp_path, damage, message):
        listing = Listing.from_paths(tmp_path, ["a/x.JPEG", "b/y.JPEG"])
        write_listing(tmp_path / "a.listing", listing, {}, "d", MatchReport([], []))
        (tmp_path / "a.listing").write_bytes(damage((tmp_path / "a.listing").read_bytes()))
        with pytest.raises(ListingFileError, match=message):
            open_listing(tmp_path / "a.listing", digest="d", root=tmp_path, class_map="folder")

    def test_other_inputs_are_refused(self, tmp_path):
        listing = Listing.from_paths(tmp_path, ["a/x.JPEG"])
        write_listing(tmp_path / "a.listing", listing, {}, "d", MatchReport([], []))
        with pytest.raises(ListingFileError, match="built from other inputs"):
            open_listing(tmp_path / "a.listing", digest="other", root=tmp_path, class_map="folder")


class TestListingCache:
    def dataset(self, tmp_path, **settings):
        image_root, label_root, keys = make_dataset(tmp_path, classes=3, per_class=4)
        settle(image_root, *image_root.iterdir())
        settings.setdefault("listing_cache", str(tmp_path / "cache"))
        return Dataset(image_root, class_map="folder", num_classes=3, **settings), label_root

    def test_built_once_then_opened(self, tmp_path, builds):
        dataset, label_root = self.dataset(tmp_path)
        first = dataset_listing(dataset, LabelShardReader(label_root))
        again = dataset_listing(dataset, LabelShardReader(label_root))
        assert len(builds) == 1
        expected, _ = match_records(list_images(dataset.image_root), LabelShardReader(label_root))
        assert same_listing(first, expected) and same_listing(again, expected)
        assert first.file is not None and again.file == first.file
        assert [p.suffix for p in (tmp_path / "cache").iterdir()] in ([".listing", ".lock"], [".lock", ".listing"])
        unlabeled = dataset_listing(dataset)  # without labels: another listing
        assert len(builds) == 3 and unlabeled.record_numbers is None and unlabeled.paths == expected.paths

    def test_what_names_a_listing(self, tmp_path, builds):
        dataset, label_root = self.dataset(tmp_path)
        dataset_listing(dataset, LabelShardReader(label_root))
        # The class map is applied on opening: not a new listing.
        relabelled = Dataset(dataset.image_root, class_map={"c0": 2, "c1": 1, "c2": 0}, num_classes=3,
                             listing_cache=dataset.listing_cache)
        assert dataset_listing(relabelled, LabelShardReader(label_root)).labels.tolist()[::4] == [2, 1, 0]
        assert len(builds) == 1
        # An image added to a class folder: a new listing (and an image without a record).
        (dataset.image_root / "c2" / "img9.JPEG").write_bytes((dataset.image_root / "c2" / "img0.JPEG").read_bytes())
        settle(dataset.image_root / "c2")
        with pytest.raises(BadSampleError, match=r"1 image\(s\) under .* without a label record"):
            dataset_listing(dataset, LabelShardReader(label_root))
        assert len(builds) == 2
        # Unchecked keys are another listing than checked ones.
        dataset_listing(Dataset(dataset.image_root, class_map="folder", num_classes=3, on_bad_sample="skip",
                                listing_cache=dataset.listing_cache), LabelShardReader(label_root, check_keys=False))
        assert len(builds) == 3

    def test_file_list_and_labels_changes(self, tmp_path, builds):
        dataset, label_root = self.dataset(tmp_path)
        (tmp_path / "list.txt").write_text("c0/img0.JPEG\nc1/img1.JPEG\n")
        listed = Dataset(dataset.image_root, file_list=tmp_path / "list.txt", class_map="folder", num_classes=3,
                         on_bad_sample="skip", listing_cache=dataset.listing_cache)
        assert dataset_listing(listed, LabelShardReader(label_root)).paths == ["c0/img0.JPEG", "c1/img1.JPEG"]
        dataset_listing(listed, LabelShardReader(label_root))
        assert len(builds) == 1
        (tmp_path / "list.txt").write_text("c0/img0.JPEG\nc1/img2.JPEG\n")
        assert dataset_listing(listed, LabelShardReader(label_root)).paths == ["c0/img0.JPEG", "c1/img2.JPEG"]
        assert len(builds) == 2
        keys = next(label_root.glob("*.keys"))
        stat = keys.stat()
        os.utime(keys, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a keys file rewritten
        dataset_listing(listed, LabelShardReader(label_root))
        assert len(builds) == 3

    @pytest.mark.parametrize("policy", ["fail", "skip"])
    def test_bad_samples_from_a_kept_listing(self, tmp_path, caplog, policy):
        image_root, label_root, _ = make_dataset(tmp_path, skip_records=("c1/img2",), extra_records=("c9/ghost",))
        settle(image_root, *image_root.iterdir())
        dataset = Dataset(image_root, class_map="folder", num_classes=2, on_bad_sample=policy,
                          listing_cache=str(tmp_path / "cache"))
        for _ in range(2):  # built, then opened: the same outcome
            caplog.clear()
            if policy == "fail":
                with pytest.raises(BadSampleError, match=r"1 label record\(s\) without an image, e.g. \['c9/ghost'\]"):
                    dataset_listing(dataset, LabelShardReader(label_root))
            else:
                with caplog.at_level(logging.WARNING):
                    listing = dataset_listing(dataset, LabelShardReader(label_root))
                assert "c1/img2" not in listing.keys and len(listing) == 7
                assert "without a label record" in caplog.text and "c9/ghost" in caplog.text
        assert len(list((tmp_path / "cache").glob("*.listing"))) == 1

    def test_off_racy_and_unwritable(self, tmp_path, builds, caplog, monkeypatch):
        dataset, label_root = self.dataset(tmp_path, listing_cache="off")
        listing = dataset_listing(dataset, LabelShardReader(label_root))
        assert listing.file is None and not (tmp_path / "cache").exists()
        # A class folder changed a moment ago: used, not kept.
        dataset, _ = self.dataset(tmp_path / "racy")
        os.utime(dataset.image_root / "c1")
        assert dataset_listing(dataset).file is None and not list((tmp_path / "racy" / "cache").glob("*.listing"))
        # A cache folder that cannot be written: in memory, with a warning.
        settle(dataset.image_root / "c1")
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the folder should be")
        dataset = Dataset(dataset.image_root, class_map="folder", num_classes=3, listing_cache=str(blocked / "x"))
        with caplog.at_level(logging.WARNING):
            assert dataset_listing(dataset).file is None
        assert "building the listing in memory" in caplog.text

    def test_damaged_file_is_rebuilt(self, tmp_path, builds, caplog):
        dataset, label_root = self.dataset(tmp_path)
        dataset_listing(dataset, LabelShardReader(label_root))
        path = next((tmp_path / "cache").glob("*.listing"))
        path.write_bytes(path.read_bytes()[:-3])
        with caplog.at_level(logging.WARNING):
            listing = dataset_listing(dataset, LabelShardReader(label_root))
        assert len(builds) == 2 and "building it again" in caplog.text and listing.file is not None

    def test_unused_listings_are_pruned(self, tmp_path, monkeypatch):
        dataset, label_root = self.dataset(tmp_path)
        stale = tmp_path / "cache" / "old-0123.listing"
        stale.parent.mkdir()
        stale.write_bytes(b"x")
        past = time.time() - (listing_cache.UNUSED_DAYS + 1) * 86400
        os.utime(stale, (past, past))
        dataset_listing(dataset, LabelShardReader(label_root))
        assert not stale.exists() and len(list((tmp_path / "cache").glob("*.listing"))) == 1

    def test_cache_folder_setting(self, monkeypatch, tmp_path):
        monkeypatch.delenv("RELABEL_DALI_LISTING_CACHE", raising=False)
        monkeypatch.setenv("RELABEL_DALI_CACHE", str(tmp_path))
        assert cache_folder("auto") == tmp_path / "listings" and cache_folder("off") is None
        monkeypatch.setenv("RELABEL_DALI_LISTING_CACHE", str(tmp_path / "node"))  # wins over the operator cache
        assert cache_folder("auto") == tmp_path / "node" and cache_folder(str(tmp_path / "y")) == tmp_path / "y"
        monkeypatch.delenv("RELABEL_DALI_LISTING_CACHE")
        monkeypatch.delenv("RELABEL_DALI_CACHE")
        assert cache_folder("auto") == tmp_path.home() / ".cache" / "relabel_dali" / "listings"
        assert cache_folder("~/x") == tmp_path.home() / "x"
        with pytest.raises(ValueError, match="listing_cache must be auto, off or a folder"):
            Dataset(tmp_path, listing_cache="")
