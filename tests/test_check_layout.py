"""tools/check_layout.py: picks the layout maps were built in, from known boxes; its measures; bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_dali.store.writer import LabelShardWriter
from tools import check_layout

ROOT = Path(__file__).resolve().parents[1]

CELLS, K, CLASSES = 12, 5, 1000


def canonical_map(rng, box_norm, class_id):
    """[k, y, x] maps: the object's class scores high on the cells its box covers, distractors elsewhere."""
    x0, y0, x1, y1 = box_norm
    centers = (np.arange(CELLS) + 0.5) / CELLS
    inside = np.outer((centers >= y0) & (centers <= y1), (centers >= x0) & (centers <= x1))
    scores = -np.sort(-rng.normal(0, 1, (K, CELLS, CELLS)), axis=0).astype(np.float32)
    distractors = rng.choice([c for c in range(CLASSES) if c != class_id], K, replace=False)
    ids = np.broadcast_to(distractors[:, None, None], (K, CELLS, CELLS)).copy()
    scores[0][inside] += 6
    ids[0][inside] = class_id
    return scores, ids


def build_dataset(root: Path, count=30, seed=0):
    """Random off-centre boxes in non-square images, their canonical maps and objects.json."""
    rng = np.random.default_rng(seed)
    objects, maps = {}, {}
    for i in range(count):
        key = f"n00000000/img_{i:03d}"
        width, height = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        x0, y0 = rng.uniform(0, 0.5, 2)
        x1, y1 = x0 + rng.uniform(0.2, 0.5), y0 + rng.uniform(0.2, 0.5)
        class_id = int(rng.integers(0, CLASSES))
        box = [x0 * width, y0 * height, x1 * width, y1 * height]
        objects[key] = {"label": class_id, "size": [width, height], "objects": [{"class": class_id, "box": box}]}
        maps[key] = canonical_map(rng, (x0, y0, x1, y1), class_id)
    (root / "objects.json").write_text(json.dumps(objects))
    return maps


def write_pt_tree(root: Path, maps, layout: str):
    for key, (scores, ids) in maps.items():
        path = root / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if layout == "official":  # official files hold [k, x, y]
            scores, ids = scores.transpose(0, 2, 1), ids.transpose(0, 2, 1)
        torch.save(torch.from_numpy(np.stack([scores, ids.astype(np.float32)])), path)


class TestCheckLayout:
    @pytest.mark.parametrize("layout", ["official", "yx"])
    def test_picks_the_layout_of_a_pt_tree(self, tmp_path, layout, capsys):
        maps = build_dataset(tmp_path)
        write_pt_tree(tmp_path / "pt", maps, layout)
        code = check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "objects.json"), "--crops", "4",
                                  "--json", str(tmp_path / "report.json")])
        report = json.loads((tmp_path / "report.json").read_text())
        assert code == check_layout.EXIT_OK
        assert report["verdict"] == layout and report["images"] == 30
        other = "yx" if layout == "official" else "official"
        assert report["mean_mass_inside_box"][layout] > report["mean_mass_inside_box"][other] + 0.1
        assert report["images_favouring"][layout] >= 25
        assert f"verdict: {layout}" in capsys.readouterr().out

    @pytest.mark.parametrize("packed_as", ["official", None])
    def test_shards_are_judged_in_their_source_layout(self, tmp_path, packed_as):
        maps = build_dataset(tmp_path)
        writer = LabelShardWriter(tmp_path / "shards", k=K, height=CELLS, width=CELLS, score_dtype="float32")
        with writer.shard("labels-00000") as shard:
            for key in sorted(maps):
                shard.add(key, *maps[key])  # correct canonical maps, as packing or annotating leaves them
        writer.finalize()
        if packed_as is not None:
            (tmp_path / "shards" / "pack_settings.json").write_text(json.dumps({"layout": packed_as}))
        code = check_layout.main([str(tmp_path / "shards"), "--boxes", str(tmp_path / "objects.json"),
                                  "--crops", "2", "--json", str(tmp_path / "r.json")])
        assert code == check_layout.EXIT_OK
        assert json.loads((tmp_path / "r.json").read_text())["verdict"] == (packed_as or "yx")

    def test_symmetric_data_is_inconclusive(self, tmp_path, capsys):
        maps = build_dataset(tmp_path)
        objects = json.loads((tmp_path / "objects.json").read_text())
        for key, entry in objects.items():  # a full-image box reads the same both ways
            entry["objects"][0]["box"] = [0, 0, *entry["size"]]
        (tmp_path / "objects.json").write_text(json.dumps(objects))
        write_pt_tree(tmp_path / "pt", maps, "yx")
        assert check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "objects.json"),
                                  "--crops", "1"]) == check_layout.EXIT_INCONCLUSIVE
        assert "verdict: inconclusive" in capsys.readouterr().out

    def test_curve_png_has_the_expected_size(self, tmp_path):
        maps = build_dataset(tmp_path, count=10)
        write_pt_tree(tmp_path / "pt", maps, "official")
        check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "objects.json"), "--crops", "8",
                           "--plot", str(tmp_path / "curve.png")])
        assert Image.open(tmp_path / "curve.png").size == (600, 400)


class TestMeasures:
    @pytest.mark.parametrize("lo, hi, cells", [(0.0, 1.0, 4), (0.1, 0.6, 5), (0.25, 0.5, 8)])
    def test_cell_overlap_sums_to_the_covered_cells(self, lo, hi, cells):
        overlap = check_layout.cell_overlap(lo, hi, cells)
        assert overlap.sum() == pytest.approx((hi - lo) * cells)
        assert np.all((overlap >= 0) & (overlap <= 1 + 1e-12))

    def test_iou(self):
        boxes = np.array([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 1, 1]])
        np.testing.assert_allclose(check_layout.iou(boxes, (0, 0, 0.5, 0.5)), [1, 0.0625 / 0.4375, 0])

    @pytest.mark.parametrize("positive, negative, expected", [(10, 0, 2 / 1024), (5, 5, 1.0), (0, 0, 1.0),
                                                              (8, 2, 2 * 56 / 1024)])
    def test_sign_test_exact(self, positive, negative, expected):
        assert check_layout.sign_test(positive, negative) == pytest.approx(expected)


class TestCheckLayoutBadInput:
    def test_no_shared_keys(self, tmp_path, capsys):
        build_dataset(tmp_path, count=3)
        write_pt_tree(tmp_path / "pt", {"other/key": canonical_map(np.random.default_rng(0), (0, 0, 1, 1), 3)}, "yx")
        assert check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "objects.json")]) == 1
        assert "no key is in both" in capsys.readouterr().err

    def test_csv_needs_image_root(self, tmp_path, capsys):
        (tmp_path / "LOC_train_solution.csv").write_text("ImageId,PredictionString\n")
        write_pt_tree(tmp_path / "pt", {"a/b": canonical_map(np.random.default_rng(0), (0, 0, 1, 1), 3)}, "yx")
        assert check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "LOC_train_solution.csv")]) == 1
        assert "LOC_train_solution.csv: a CSV holds no image sizes; pass --image-root" in capsys.readouterr().err

    def test_objects_json_without_size(self, tmp_path, capsys):
        (tmp_path / "objects.json").write_text(json.dumps({"a/b": {"objects": []}}))
        write_pt_tree(tmp_path / "pt", {"a/b": canonical_map(np.random.default_rng(0), (0, 0, 1, 1), 3)}, "yx")
        assert check_layout.main([str(tmp_path / "pt"), "--boxes", str(tmp_path / "objects.json")]) == 1
        assert "entry 'a/b' lacks 'size'" in capsys.readouterr().err


class TestBoxFormats:
    def test_imagenet_csv_and_xml_read_the_same_boxes(self, tmp_path):
        key, wnid = "n01440764/n01440764_1", "n01440764"
        (tmp_path / "img" / wnid).mkdir(parents=True)
        Image.new("RGB", (300, 200)).save(tmp_path / "img" / f"{key}.JPEG")
        (tmp_path / "loc.csv").write_text(f"ImageId,PredictionString\nn01440764_1,{wnid} 10 20 110 120 {wnid} 5 6 7 8 \n")
        (tmp_path / "xml" / wnid).mkdir(parents=True)
        objects = "".join(f"<object><name>{wnid}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                          f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in [(10, 20, 110, 120), (5, 6, 7, 8)])
        (tmp_path / "xml" / f"{key}.xml").write_text(
            f"<annotation><size><width>300</width><height>200</height></size>{objects}</annotation>")
        expected = {key: {"size": (300, 200), "objects": [(0, (10.0, 20.0, 110.0, 120.0)), (0, (5.0, 6.0, 7.0, 8.0))]}}
        assert check_layout.load_boxes(tmp_path / "loc.csv", tmp_path / "img") == expected
        assert check_layout.load_boxes(tmp_path / "xml", None) == expected
