"""tools/make_demo_data.py: counts, determinism, and spatially honest official-format label maps."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_dali.store.labelmaps import to_canonical
from tools import make_demo_data



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    assert make_demo_data.main([str(out), "--train-per-class", "3", "--val-per-class", "3", "--seed", "7"]) == 0
    return out


class TestDemoData:
    def test_layout_and_counts(self, demo):
        classes = json.loads((demo / "classes.json").read_text())
        assert len(classes) == 19
        for entry in classes:
            assert len(list((demo / "train" / entry["wnid"]).glob("*.JPEG"))) == 3
            assert len(list((demo / "val" / entry["wnid"]).glob("*.JPEG"))) == 3
            assert len(list((demo / "relabel_pt" / entry["wnid"]).glob("*.pt"))) == 3
        objects = json.loads((demo / "objects.json").read_text())
        assert len(objects) == 57
        assert sum(len(v["objects"]) == 2 for v in objects.values()) == 19  # i % 3 == 2: one per class
        val_objects = json.loads((demo / "val_objects.json").read_text())
        assert len(val_objects) == 19 * 3
        assert sum(len(v["objects"]) == 2 for v in val_objects.values()) == 19  # val_0002 of each class
        manifest = json.loads((demo / "manifest.json").read_text())
        assert manifest["counts"] == {"classes": 19, "train": 57, "val": 57, "val_composites": 19}

    def test_val_composites_hold_their_folder_class_and_another(self, demo):
        val_objects = json.loads((demo / "val_objects.json").read_text())
        wnids = {entry["index"]: entry["wnid"] for entry in json.loads((demo / "classes.json").read_text())}
        for key, entry in val_objects.items():
            classes = [o["class"] for o in entry["objects"]]
            assert wnids[entry["label"]] == key.split("/")[0] and entry["label"] in classes
            assert len(set(classes)) == len(classes) == (2 if key.endswith("2") else 1), key
            with Image.open(demo / "val" / f"{key}.JPEG") as image:
                assert list(image.size) == entry["size"]

    def test_real_labels_list_the_composites_in_file_name_order(self, demo):
        val_objects = json.loads((demo / "val_objects.json").read_text())
        classes = json.loads((demo / "classes.json").read_text())
        folder_index = {entry["index"]: i for i, entry in enumerate(sorted(classes, key=lambda e: e["wnid"]))}
        real = json.loads((demo / "real_labels.json").read_text())
        real_imagenet = json.loads((demo / "real_labels_imagenet.json").read_text())
        # train.py matches entries to images by sorted file name (relabel_dali.train.metrics.real_positions).
        names = sorted(path.stem for path in (demo / "val").rglob("*.JPEG"))
        assert len(real) == len(real_imagenet) == len(names)
        by_name = {key.split("/")[1]: entry for key, entry in val_objects.items()}
        for name, entry, entry_imagenet in zip(names, real, real_imagenet):
            objects = [o["class"] for o in by_name[name]["objects"]]
            if len(objects) == 1:
                assert entry == entry_imagenet == []
            else:
                assert entry_imagenet == sorted(objects)
                assert entry == sorted(folder_index[c] for c in objects)

    def test_images_are_jpeg_of_recorded_size(self, demo):
        objects = json.loads((demo / "objects.json").read_text())
        for key, entry in list(objects.items())[:10]:
            with Image.open(demo / "train" / f"{key}.JPEG") as image:
                assert image.format == "JPEG" and list(image.size) == entry["size"]

    def test_maps_are_official_format_and_honest(self, demo):
        objects = json.loads((demo / "objects.json").read_text())
        for key, entry in objects.items():
            array = torch.load(demo / "relabel_pt" / f"{key}.pt", weights_only=True).numpy()
            assert array.shape == (2, 5, 15, 15)
            _, class_ids = to_canonical(array, topk=5, num_classes=1000, layout="official")
            width, height = entry["size"]
            assert entry["label"] in [o["class"] for o in entry["objects"]]
            for obj in entry["objects"]:
                x0, y0, x1, y1 = np.array(obj["box"]) / [width, height, width, height]
                # Cells whose centre lies well inside the box carry the object's class on top.
                centres = (np.arange(15) + 0.5) / 15
                inside_y = (centres > y0 + 1 / 15) & (centres < y1 - 1 / 15)
                inside_x = (centres > x0 + 1 / 15) & (centres < x1 - 1 / 15)
                top = class_ids[0][np.ix_(inside_y, inside_x)]
                assert top.size == 0 or np.all(top == obj["class"]), key

    def test_deterministic(self, demo, tmp_path):
        again = tmp_path / "again"
        assert make_demo_data.main([str(again), "--train-per-class", "3", "--val-per-class", "3", "--seed", "7"]) == 0
        for path in sorted(demo.rglob("*")):
            if path.is_file():
                assert path.read_bytes() == (again / path.relative_to(demo)).read_bytes(), path

    def test_complete_folder_is_kept(self, demo, capsys):
        before = (demo / "manifest.json").stat().st_mtime_ns
        assert make_demo_data.main([str(demo), "--train-per-class", "3", "--val-per-class", "3", "--seed", "7"]) == 0
        assert "already complete" in capsys.readouterr().out
        assert (demo / "manifest.json").stat().st_mtime_ns == before
