"""relabel_dali.data.benchdata: the generated images, .pt maps and label shards agree with each other."""
import numpy as np
import pytest
import torch
from PIL import Image

from relabel_dali.data.benchdata import make_benchmark_data, random_map
from relabel_dali.store.labelmaps import to_canonical
from relabel_dali.store.reader import LabelShardReader


class TestMakeBenchmarkData:
    @pytest.mark.parametrize("workers", [1, 2])
    def test_images_maps_and_shards_agree(self, tmp_path, workers):
        data = make_benchmark_data(tmp_path, 7, classes=3, val_count=3, sizes=((40, 48), (30, 36)), workers=workers)
        images = sorted(data.image_root.glob("*/*.JPEG"))
        assert len(images) == 7 and len({p.parent.name for p in images}) == 3
        assert all(40 <= Image.open(p).width <= 48 and 30 <= Image.open(p).height <= 36 for p in images)
        assert len(list(data.val_root.glob("*/*.JPEG"))) == 3
        reader = LabelShardReader(data.label_root)
        keys = [p.relative_to(data.image_root).with_suffix("").as_posix() for p in images]
        assert list(reader.keys) == keys  # sorted, as tools/pack_labels.py writes them
        for key in keys:
            official = torch.load(data.pt_root / f"{key}.pt", weights_only=True).numpy()
            scores, class_ids = to_canonical(official, topk=5, num_classes=1000, layout="official")
            stored_scores, stored_ids = reader[key]
            np.testing.assert_array_equal(stored_ids, class_ids)
            np.testing.assert_allclose(stored_scores, scores, rtol=1e-3, atol=1e-2)  # stored as float16

    def test_same_seed_same_bytes(self, tmp_path):
        first = make_benchmark_data(tmp_path / "a", 3, sizes=((40, 48), (30, 36)))
        second = make_benchmark_data(tmp_path / "b", 3, sizes=((40, 48), (30, 36)))
        for path in first.image_root.glob("*/*.JPEG"):
            assert path.read_bytes() == (second.image_root / path.relative_to(first.image_root)).read_bytes()

    def test_count_must_be_positive(self, tmp_path):
        with pytest.raises(ValueError, match="count = 0"):
            make_benchmark_data(tmp_path, 0)


def test_random_map_is_a_valid_top_k_map():
    scores, class_ids = random_map(np.random.default_rng(3))
    assert scores.shape == class_ids.shape == (5, 15, 15)
    assert np.all(np.diff(scores, axis=0) <= 0)
    ordered = np.sort(class_ids, axis=0)
    assert np.all(ordered[1:] != ordered[:-1]) and class_ids.min() >= 0 and class_ids.max() < 1000
