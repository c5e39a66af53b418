"""tools/show_labels.py: PNG figures of the expected size; unknown keys and images fail clearly."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relabel_dali.data import imagenet
from relabel_dali.store.writer import LabelShardWriter
from tools import show_labels

ROOT = Path(__file__).resolve().parents[1]

KEYS = ["n01440764/a", "n01443537/b", "n01484850/c"]


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    writer = LabelShardWriter(tmp_path / "labels", k=5, height=8, width=8, score_dtype="float16")
    with writer.shard("labels-00000") as shard:
        for key in KEYS:
            scores = -np.sort(-rng.normal(0, 4, (5, 8, 8)), axis=0)
            ids = np.stack([rng.permutation(1000)[:5] for _ in range(64)], 1).reshape(5, 8, 8)
            shard.add(key, scores, ids)
            (tmp_path / "images" / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{key}.JPEG")
    writer.finalize()
    return tmp_path


class TestShowLabels:
    @pytest.mark.parametrize("crops, width", [(2, 900), (4, 1200), (6, 1800)])
    def test_png_size_follows_the_crop_count(self, dataset, crops, width):
        out = dataset / "figures"
        code = show_labels.main([str(dataset / "labels"), str(dataset / "images"), "--out", str(out),
                                 "--keys", KEYS[0], "--crops", str(crops)])
        assert code == show_labels.EXIT_OK
        assert Image.open(out / "n01440764__a.png").size == (width, 900)

    def test_random_samples(self, dataset):
        out = dataset / "figures"
        assert show_labels.main([str(dataset / "labels"), str(dataset / "images"), "--out", str(out),
                                 "--random", "2", "--crops", "2"]) == 0
        written = sorted(p.name for p in out.glob("*.png"))
        assert len(written) == 2 and set(written) <= {k.replace("/", "__") + ".png" for k in KEYS}

    def test_heatmap_is_the_per_cell_probability(self):
        scores = np.array([[[2.0]], [[0.0]]], np.float32)
        ids = np.array([[[7]], [[3]]])
        assert show_labels.class_heatmap(scores, ids, 7)[0, 0] == pytest.approx(np.exp(2) / (np.exp(2) + 1))
        assert show_labels.class_heatmap(scores, ids, 5)[0, 0] == 0

    def test_unknown_key(self, dataset, capsys):
        assert show_labels.main([str(dataset / "labels"), str(dataset / "images"), "--out", str(dataset / "f"),
                                 "--keys", "nope/x"]) == show_labels.EXIT_FAILED
        assert "no label record for key 'nope/x'" in capsys.readouterr().err

    def test_missing_image(self, dataset, capsys):
        (dataset / "images" / f"{KEYS[1]}.JPEG").unlink()
        assert show_labels.main([str(dataset / "labels"), str(dataset / "images"), "--out", str(dataset / "f"),
                                 "--keys", KEYS[1]]) == show_labels.EXIT_FAILED
        assert "no image for key 'n01443537/b'" in capsys.readouterr().err

    @pytest.mark.parametrize("argv, message", [(["--crops", "0"], "--crops must be in"), ([], "--keys or ask for --random")])
    def test_bad_arguments(self, tmp_path, argv, message, capsys):
        with pytest.raises(SystemExit):
            show_labels.parse_args([str(tmp_path), str(tmp_path), "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err


class TestClassNames:
    def test_folder_ids_are_named_by_sorted_folder(self, tmp_path):
        for folder in ("n01484850", "n01440764", "my_class"):
            (tmp_path / folder).mkdir()
        name = show_labels.class_namer("folder", tmp_path, 3)
        # Sorted: my_class, n01440764 (ImageNet index 0, tench), n01484850 (index 2, great white shark).
        assert name(0) == "my_class"
        assert name(1) == imagenet.short_name_of(0) and name(2) == imagenet.short_name_of(2)

    def test_imagenet_ids_are_imagenet_names(self, tmp_path):
        assert show_labels.class_namer("imagenet", tmp_path, 1000)(2) == imagenet.short_name_of(2)

    def test_folder_count_must_match_the_shards(self, dataset, capsys):
        assert show_labels.main([str(dataset / "labels"), str(dataset / "images"), "--out", str(dataset / "f"),
                                 "--keys", KEYS[0], "--classes", "folder"]) == show_labels.EXIT_FAILED
        assert "has 3 folders but the shards have num_classes 1000" in capsys.readouterr().err
