"""tools/relabel.py: shards equal the in-memory maps, official .pt layout, resume, torchrun slices,
bad input, a real two-object composite photo, and timm annotators whose shards a timm student
trains on."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_dali import LabelShardReader
from relabel_dali.annotate.annotator import build_annotator, class_subset, pool_boxes
from relabel_dali.annotate.dense import DenseClassifier
from tools import relabel

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("nvidia.dali")
needs_lite = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                reason="EfficientNet-Lite0 (efficientnet_lite_pytorch) is not installed")
SIZE, CELLS = 256, 8
YURT, CANNON = 915, 471
COMPOSITE_KEY = "n04613696/composite_yurt_cannon"


def foolbox_photo(name: str) -> Image.Image:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("the foolbox wheel's photos are not installed")
    return Image.open(Path(list(spec.submodule_search_locations)[0]) / "data" / name).convert("RGB")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Four photos in wnid folders plus one composite: a yurt left of a cannon."""
    root = tmp_path_factory.mktemp("images")
    for name, wnid in [("imagenet_01_559.jpg", "n03376595"), ("imagenet_08_915.jpg", "n04613696"),
                       ("imagenet_04_949.jpg", "n07745940"), ("imagenet_13_471.jpg", "n02950826")]:
        (root / wnid).mkdir(exist_ok=True)
        foolbox_photo(name).resize((192, 192)).save(root / wnid / f"{wnid}_photo.JPEG", quality=92)
    composite = Image.new("RGB", (512, 256))
    composite.paste(foolbox_photo("imagenet_08_915.jpg").resize((256, 256)), (0, 0))
    composite.paste(foolbox_photo("imagenet_13_471.jpg").resize((256, 256)), (256, 0))
    composite.save(root / f"{COMPOSITE_KEY}.JPEG", quality=92)
    return root


def run_tool(image_root, out, *extra):
    return relabel.main([str(image_root), str(out), "--size", str(SIZE), "--batch-size", "3",
                         "--records-per-shard", "2", "--dtype", "float32", "--threads", "2", *extra])


@pytest.fixture(scope="module")
def annotated(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    assert run_tool(image_root, out / "shards", "--write-pt", str(out / "pt")) == relabel.EXIT_OK
    return out


@pytest.fixture(scope="module")
def in_memory(image_root):
    """The maps computed in this process, without the tool's shard writing."""
    model = build_annotator()
    images = relabel.find_images(image_root)
    keys = sorted(images)
    annotator = relabel.Annotator(model, topk=5, device=torch.device("cpu"), amp=False)
    pipe_args = dict(size=SIZE, mean=model.mean, std=model.std, exif=False, batch_size=len(keys),
                     device_id=None, num_threads=2)
    return {key: (scores, ids) for key, scores, ids, _ in annotator.run(keys, [images[k] for k in keys], pipe_args)}


@needs_lite
class TestRelabelTool:
    def test_shards_read_back_equal_the_maps_computed_in_memory(self, annotated, in_memory):
        reader = LabelShardReader(annotated / "shards")
        assert reader.keys == sorted(in_memory)
        assert (reader.k, reader.height, reader.width, reader.num_classes) == (5, CELLS, CELLS, 1000)
        assert len(reader.shard_paths) == 3  # 5 images, 2 per shard
        for key, (scores, ids) in in_memory.items():
            stored_scores, stored_ids = reader[key]
            np.testing.assert_array_equal(stored_ids, ids)
            np.testing.assert_allclose(stored_scores, scores, rtol=1e-5, atol=1e-5)
        assert reader.verify() == 5

    def test_official_pt_files_are_the_transposed_maps(self, annotated):
        reader = LabelShardReader(annotated / "shards")
        for key in reader.keys:
            official = torch.load(annotated / "pt" / f"{key}.pt", weights_only=True).numpy()
            scores, ids = reader[key]
            assert official.shape == (2, 5, CELLS, CELLS)
            np.testing.assert_array_equal(official[0], scores.transpose(0, 2, 1))
            np.testing.assert_array_equal(official[1], ids.transpose(0, 2, 1).astype(np.float32))

    def test_resume_rewrites_only_missing_shards(self, image_root, tmp_path, capsys):
        out = tmp_path / "labels"
        assert run_tool(image_root, out) == 0
        before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("labels-*")}
        for name in ("labels-00001.rls", "labels-00001.keys", "index.json"):
            (out / name).unlink()
        capsys.readouterr()
        assert run_tool(image_root, out) == 0
        assert "2 of rank 0's shards kept" in capsys.readouterr().out
        after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("labels-*")}
        assert sorted(after) == sorted(before)
        for name, (data, mtime) in before.items():
            assert after[name][0] == data, name
            assert (after[name][1] == mtime) == (not name.startswith("labels-00001")), name
        assert len(LabelShardReader(out)) == 5

    def test_changed_settings_refuse_to_resume(self, image_root, tmp_path, capsys):
        out = tmp_path / "labels"
        assert run_tool(image_root, out, "--limit", "1") == 0
        assert run_tool(image_root, out, "--limit", "1", "--topk", "3") == relabel.EXIT_FAILED
        assert "annotated with other settings (topk differ)" in capsys.readouterr().err

    def test_torchrun_ranks_write_contiguous_slices_in_sorted_order(self, image_root, annotated, tmp_path):
        out = tmp_path / "labels"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                   str(ROOT / "tools" / "relabel.py"), str(image_root), str(out), "--size", str(SIZE),
                   "--batch-size", "3", "--records-per-shard", "2", "--dtype", "float32", "--threads", "1"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        single, multi = LabelShardReader(annotated / "shards"), LabelShardReader(out)
        assert multi.keys == single.keys
        for key in single.keys:
            np.testing.assert_array_equal(multi[key][1], single[key][1])
            np.testing.assert_allclose(multi[key][0], single[key][0], rtol=1e-4, atol=1e-4)


@needs_lite
class TestRelabelBadInput:
    def test_refuses_a_folder_of_packed_shards(self, image_root, tmp_path, capsys):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "pack_settings.json").write_text("{}")
        assert run_tool(image_root, tmp_path / "out") == relabel.EXIT_FAILED
        assert "packed by tools/pack_labels.py; annotate into another folder" in capsys.readouterr().err

    def test_empty_folder(self, tmp_path, capsys):
        (tmp_path / "images").mkdir()
        assert run_tool(tmp_path / "images", tmp_path / "out") == relabel.EXIT_FAILED
        assert "images: no images" in capsys.readouterr().err

    def test_missing_folder(self, tmp_path, capsys):
        assert run_tool(tmp_path / "nowhere", tmp_path / "out") == relabel.EXIT_FAILED
        assert "nowhere: image folder does not exist" in capsys.readouterr().err

    @pytest.mark.parametrize("flag", ["--size", "--topk", "--batch-size", "--records-per-shard"])
    def test_non_positive_arguments(self, flag, tmp_path, capsys):
        with pytest.raises(SystemExit):
            relabel.parse_args([str(tmp_path), str(tmp_path / "out"), flag, "0"])
        assert f"{flag} must be positive, got 0" in capsys.readouterr().err


@needs_lite
class TestTwoObjectComposite:
    def test_each_half_has_its_own_class(self, annotated):
        scores, ids = LabelShardReader(annotated / "shards")[COMPOSITE_KEY]
        left, right = ids[0, :, : CELLS // 2], ids[0, :, CELLS // 2:]
        left_top, right_top = np.bincount(left.ravel()).argmax(), np.bincount(right.ravel()).argmax()
        assert left_top != right_top
        assert (left_top, right_top) == (YURT, CANNON)
        boxes = np.array([[0, 0, 0.5, 1], [0.5, 0, 1, 1]], np.float32)
        pooled = pool_boxes(np.stack([scores] * 2), np.stack([ids] * 2), boxes)
        assert pooled.argmax(1).tolist() == [YURT, CANNON]
        whole = pool_boxes(scores[None], ids[None], np.array([[0, 0, 1, 1]], np.float32))[0]
        assert set(torch.topk(whole, 2).indices.tolist()) == {YURT, CANNON}


TIMM_WNIDS = ("n01440764", "n01443537", "n01484850")  # ImageNet-1k classes 0, 1, 2


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A randomly initialised 1000-class ResNet-10t, written as the user's weights file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def wnid_tree(tmp_path_factory):
    """train/ and val/ folders of small JPEGs in three ImageNet wnid folders."""
    root = tmp_path_factory.mktemp("wnid_tree")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(TIMM_WNIDS):
        for split, count in (("train", 4), ("val", 2)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((56, 72, 3)) * 60 + np.roll([170, 40, 40], c)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{split}_{i}.JPEG", quality=90)
    return root


def run_timm_tool(image_root, out, weights, *extra):
    return relabel.main([str(image_root), str(out), "--arch", "timm:resnet10t", "--weights", str(weights),
                         "--size", "64", "--batch-size", "5", "--dtype", "float32", "--threads", "2", *extra])


class TestTimmAnnotator:
    def test_shards_hold_the_adapters_maps_and_a_timm_student_trains_on_them(self, wnid_tree, timm_weights,
                                                                              tmp_path, capsys):
        import train

        labels = tmp_path / "labels"
        assert run_timm_tool(wnid_tree / "train", labels, timm_weights) == relabel.EXIT_OK
        summary = capsys.readouterr().out
        assert "timm:resnet10t at 64x64 px (bicubic) -> 2x2 maps" in summary
        assert "mean over locations equals the model's own logits" in summary
        reader = LabelShardReader(labels)
        assert (len(reader), reader.k, reader.height, reader.width, reader.num_classes) == (12, 5, 2, 2, 1000)

        # The same maps, computed here from the model the tool loads and the pipeline it decodes with.
        model = build_annotator("timm:resnet10t", timm_weights, 64)
        images = relabel.find_images(wnid_tree / "train")
        keys = sorted(images)
        pipe_args = dict(size=64, mean=model.mean, std=model.std, interpolation=model.interpolation, exif=False,
                         batch_size=len(keys), device_id=None, num_threads=2)
        annotator = relabel.Annotator(model, topk=5, device=torch.device("cpu"), amp=False)
        for key, scores, ids, _ in annotator.run(keys, [images[k] for k in keys], pipe_args):
            stored_scores, stored_ids = reader[key]
            np.testing.assert_array_equal(stored_ids, ids)
            np.testing.assert_allclose(stored_scores, scores, rtol=1e-5, atol=1e-5)

        out = tmp_path / "run"
        argv = ["--data.data_path", str(wnid_tree), "--data.relabel.path", str(labels),
                "--data.class_map", "imagenet", "--data.num_classes", "1000", "--data.image_size", "32",
                "--model.arch", "timm:resnet10t", "--optim.batch_size", "4", "--optim.lr.base_batch_size", "4",
                "--util.val_batch_size", "4", "--optim.epochs", "1", "--optim.warmup.epochs", "0",
                "--data.num_threads", "1", "--data.py_workers", "1", "--compute.device", "cpu",
                "--util.progress", "False", "--util.output_dir", str(out)]
        assert train.main(argv) == 0
        state = torch.load(out / "checkpoint-last.pth", weights_only=False)
        assert state["epoch"] == 1 and state["arch"] == "timm:resnet10t"
        assert state["metrics"]["samples"] == 6
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    def test_vision_transformer_maps_on_the_patch_grid(self, wnid_tree, tmp_path, capsys):
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "vit.safetensors")
        out = tmp_path / "labels"
        assert relabel.main([str(wnid_tree / "val"), str(out), "--arch", "timm:vit_tiny_patch16_224",
                             "--weights", str(tmp_path / "vit.safetensors"), "--size", "48", "--topk", "3",
                             "--threads", "2"]) == relabel.EXIT_OK
        assert "mean over locations is NOT the model's own logits" in capsys.readouterr().out
        reader = LabelShardReader(out)
        assert (len(reader), reader.k, reader.height, reader.width, reader.num_classes) == (6, 3, 3, 3, 1000)

    def test_refused_architecture_names_the_model(self, wnid_tree, tmp_path, capsys):
        import timm
        from safetensors.torch import save_file

        save_file(timm.create_model("convnext_atto", pretrained=False).state_dict(), tmp_path / "c.safetensors")
        assert relabel.main([str(wnid_tree / "val"), str(tmp_path / "out"), "--arch", "timm:convnext_atto",
                             "--weights", str(tmp_path / "c.safetensors"), "--size", "64"]) == relabel.EXIT_FAILED
        assert "timm:convnext_atto has no exact fully-convolutional form" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


class ColourAnnotator(DenseClassifier):
    """A synthetic 10-class annotator: 16-px cells, class 3 follows red, 5 green, 1 blue, and class 7
    outscores everything everywhere (bias 100): restricted to {3, 5, 1} it must never appear."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 10)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[3, 0] = self.head.weight[5, 1] = self.head.weight[1, 2] = 1.0
            self.head.bias[7] = 100.0

    def features(self, x):
        return torch.nn.functional.avg_pool2d(x, 16)

    @property
    def linear(self):
        return self.head


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
COLOUR_CLASSES = {"red": 3, "green": 5, "blue": 1}  # dataset class -> annotator class


@pytest.fixture(scope="module")
def colour_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(1)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for i in range(2):
            pixels = (rng.random((48, 48, 3)) * 40 + np.array(colour) - 20).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


class TestClassRestriction:
    def test_best_class_outside_the_subset_is_ignored_and_ids_are_dataset_indices(self):
        names, ids = ["blue", "green", "red"], [1, 5, 3]  # sorted names; their annotator classes
        x = torch.zeros(2, 3, 32, 48)
        x[0, 0], x[1, 2] = 2.0, 2.0  # image 0 red, image 1 blue
        x[0, 1, :16, :16] = 3.0  # one green cell in image 0
        annotator = relabel.Annotator(ColourAnnotator(), topk=2, device=torch.device("cpu"), amp=False,
                                      class_ids=ids)
        scores, class_ids, top1 = annotator.maps(x)
        assert class_ids.shape == (2, 2, 2, 3) and class_ids.max() <= 2
        with torch.no_grad():
            full = ColourAnnotator()(x).numpy()
        assert (full.argmax(1) == 7).all()  # unrestricted, class 7 wins everywhere
        # independent reference: the dataset classes' own logits, sorted per cell
        restricted = full[:, ids]
        order = np.argsort(-restricted, axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(class_ids, order)
        np.testing.assert_allclose(scores, np.take_along_axis(restricted, order, 1), rtol=1e-6)
        assert class_ids[0, 0, 0, 0] == names.index("green") and class_ids[0, 0, 1, 2] == names.index("red")
        assert top1.tolist() == [names.index("red"), names.index("blue")]

    @pytest.mark.parametrize("form", ["name_to_index", "index_to_name"])
    def test_tool_writes_dataset_space_shards_from_a_class_file(self, colour_tree, tmp_path, monkeypatch, capsys,
                                                                form):
        table = COLOUR_CLASSES if form == "name_to_index" else {str(v): k for k, v in COLOUR_CLASSES.items()}
        (tmp_path / "classes.json").write_text(json.dumps(table))
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        out = tmp_path / "labels"
        assert relabel.main([str(colour_tree), str(out), "--size", "32", "--topk", "3", "--threads", "2",
                             "--dtype", "float32", "--classes", str(tmp_path / "classes.json")]) == relabel.EXIT_OK
        summary = capsys.readouterr().out
        assert "classes: the dataset's 3" in summary
        assert "equals the folder's class for 6/6 images" in summary
        reader = LabelShardReader(out)
        assert reader.num_classes == 3 and reader.k == 3
        names = sorted(COLOURS)
        for key in reader.keys:
            scores, ids = reader[key]
            assert (ids[0] == names.index(key.split("/")[0])).all()  # the folder's dataset index, every cell
            assert sorted(ids[:, 0, 0].tolist()) == [0, 1, 2]
        settings = json.loads((out / "relabel_settings.json").read_text())
        assert settings["classes"]["names"] == names and settings["classes"]["annotator_ids"] == [1, 5, 3]

    def test_folder_classes_with_a_timm_annotator(self, wnid_tree, timm_weights, tmp_path, capsys):
        out = tmp_path / "labels"
        assert run_timm_tool(wnid_tree / "train", out, timm_weights, "--classes", "folder", "--topk", "2") == 0
        assert "among the 3 dataset classes" in capsys.readouterr().out
        reader = LabelShardReader(out)
        assert (reader.num_classes, reader.k) == (3, 2)
        # independent reference: the model's full 1000-class map, restricted by hand to ImageNet 0, 1, 2
        model = build_annotator("timm:resnet10t", timm_weights, 64)
        images = relabel.find_images(wnid_tree / "train")
        keys = sorted(images)
        pipe = relabel.annotation_pipeline([images[k] for k in keys], size=64, mean=model.mean, std=model.std,
                                           interpolation=model.interpolation, exif=False, batch_size=len(keys),
                                           device_id=None, num_threads=2)
        (batch,) = pipe.run()
        with torch.no_grad():
            full = model(relabel.to_torch(batch, torch.device("cpu")))
        scores, ids = torch.topk(full[:, [0, 1, 2]], 2, dim=1)
        for i, key in enumerate(keys):
            stored_scores, stored_ids = reader[key]
            np.testing.assert_array_equal(stored_ids, ids[i].numpy())
            np.testing.assert_allclose(stored_scores, scores[i].numpy(), rtol=1e-5, atol=1e-5)

        # a 3-class student trains on them, classes numbered by sorted folder as the shards are
        import train

        run = tmp_path / "run"
        assert train.main(["--data.data_path", str(wnid_tree), "--data.relabel.path", str(out),
                           "--data.class_map", "folder", "--data.num_classes", "3", "--data.image_size", "32",
                           "--model.arch", "timm:resnet10t", "--optim.batch_size", "4",
                           "--optim.lr.base_batch_size", "4", "--util.val_batch_size", "4", "--optim.epochs", "1",
                           "--optim.warmup.epochs", "0", "--data.num_threads", "1", "--data.py_workers", "1",
                           "--compute.device", "cpu", "--util.progress", "False", "--util.output_dir", str(run)]) == 0
        state = torch.load(run / "checkpoint-last.pth", weights_only=False)
        assert state["epoch"] == 1 and state["model"]["fc.weight"].shape == (3, 512)

    def test_folder_classes_of_an_annotator_trained_on_the_folders(self, colour_tree, tmp_path, capsys):
        """One annotator class per folder: ImageFolder's numbering (class i = i-th sorted folder), no
        WordNet ids needed: a classifier fine-tuned on the folders annotates them in its own ids."""
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(1)
        weights = tmp_path / "resnet10t_3.safetensors"
        save_file(timm.create_model("resnet10t", pretrained=False, num_classes=3).state_dict(), weights)
        out = tmp_path / "labels"
        assert run_timm_tool(colour_tree, out, weights, "--classes", "folder", "--topk", "3") == 0
        assert "classes: the dataset's 3 (--classes folder)" in capsys.readouterr().out
        reader = LabelShardReader(out)
        assert (reader.num_classes, reader.k) == (3, 3)
        settings = json.loads((out / "relabel_settings.json").read_text())
        assert settings["classes"]["names"] == sorted(COLOURS) and settings["classes"]["annotator_ids"] == [0, 1, 2]
        # independent reference: the model's own 3-class map, unrestricted, sorted per cell
        model = build_annotator("timm:resnet10t", weights, 64)
        images = relabel.find_images(colour_tree)
        keys = sorted(images)
        pipe = relabel.annotation_pipeline([images[k] for k in keys], size=64, mean=model.mean, std=model.std,
                                           interpolation=model.interpolation, exif=False, batch_size=len(keys),
                                           device_id=None, num_threads=2)
        (batch,) = pipe.run()
        with torch.no_grad():
            scores, ids = torch.topk(model(relabel.to_torch(batch, torch.device("cpu"))), 3, dim=1)
        for i, key in enumerate(keys):
            stored_scores, stored_ids = reader[key]
            np.testing.assert_array_equal(stored_ids, ids[i].numpy())
            np.testing.assert_allclose(stored_scores, scores[i].numpy(), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("folders, names", [
        (["red", "blue", "green"], ["blue", "green", "red"]),
        ([f"n{i:08d}" for i in (7, 0, 3)], ["n00000000", "n00000003", "n00000007"]),
        (["c2", "c3", "c1"], ["c1", "c2", "c3"]),
    ])
    def test_folder_classes_of_a_same_sized_annotator_are_numbered_by_sorted_folder(self, folders, names):
        assert class_subset("folder", folders, 3) == (names, [0, 1, 2])

    @pytest.mark.parametrize("folders, message", [
        (["c10", "c2", "c3"], r"'c10' is class 0\) and in natural order \(timm's: 'c2' is class 0\)"),
        (["B", "a", "c"], r"'B' is class 0\) and in natural order \(timm's: 'a' is class 0\)"),
    ])
    def test_folder_orders_that_torchvision_and_timm_number_differently_are_refused(self, folders, message):
        with pytest.raises(ValueError, match=message + ".*write --classes FILE"):
            class_subset("folder", folders, 3)

    @pytest.mark.parametrize("table, message", [
        ({"red": 3, "green": 5}, r"no annotator class for folder\(s\) \['blue'\]"),
        ({"red": 3, "green": 5, "blue": 10}, r"class 'blue' -> index 10, outside .*'s 10 classes \[0, 10\)"),
        ({"red": 3, "green": 3, "blue": 1}, r"annotator class\(es\) \[3\] given to more than one dataset class"),
        ({"red": "x", "green": 5, "blue": 1}, r"class 'red' -> 'x', expected an integer class index"),
        ([3, 5, 1], "expected a JSON object of class name -> annotator class index"),
    ])
    def test_bad_class_files(self, colour_tree, tmp_path, monkeypatch, capsys, table, message):
        (tmp_path / "classes.json").write_text(json.dumps(table))
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        assert relabel.main([str(colour_tree), str(tmp_path / "out"), "--size", "32", "--topk", "2",
                             "--classes", str(tmp_path / "classes.json")]) == relabel.EXIT_FAILED
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "out").exists()

    def test_topk_larger_than_the_dataset_classes(self, colour_tree, tmp_path, monkeypatch, capsys):
        (tmp_path / "classes.json").write_text(json.dumps(COLOUR_CLASSES))
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        assert relabel.main([str(colour_tree), str(tmp_path / "out"), "--size", "32", "--topk", "5",
                             "--classes", str(tmp_path / "classes.json")]) == relabel.EXIT_FAILED
        assert "--topk 5 is more than the 3 classes of --classes" in capsys.readouterr().err

    def test_folder_needs_imagenet_wnids(self, colour_tree, tmp_path, timm_weights, capsys):
        assert run_timm_tool(colour_tree, tmp_path / "out", timm_weights, "--classes", "folder") == 1
        err = capsys.readouterr().err
        assert "has no class for folder(s) ['blue', 'green', 'red']: not ImageNet-1k WordNet ids" in err
        assert "use --classes FILE" in err

    def test_folder_needs_a_known_label_space(self, colour_tree, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        assert relabel.main([str(colour_tree), str(tmp_path / "out"), "--classes", "folder"]) == 1
        assert "has 10 classes, not ImageNet-1k's 1000 nor one per class folder (3)" in capsys.readouterr().err

    def test_unknown_classes_word(self, colour_tree, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        assert relabel.main([str(colour_tree), str(tmp_path / "out"), "--classes", "folders"]) == 1
        assert "--classes 'folders': expected imagenet, folder or a JSON file" in capsys.readouterr().err


@pytest.fixture
def tree_with_bad_images(colour_tree, tmp_path):
    """The six colour images, a corrupt JPEG among them and an empty PNG at the end."""
    import shutil

    root = tmp_path / "images"
    shutil.copytree(colour_tree, root)
    (root / "green" / "green_0b.png").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "red" / "red_9.png").write_bytes(b"")
    (tmp_path / "classes.json").write_text(json.dumps(COLOUR_CLASSES))
    return root


def run_colour_tool(root, out, *extra):
    return relabel.main([str(root), str(out), "--size", "32", "--topk", "2", "--threads", "2", "--batch-size", "2",
                         "--records-per-shard", "3", "--dtype", "float32",
                         "--classes", str(Path(root).parent / "classes.json"), *extra])


class TestUndecodableImages:
    def test_names_the_one_file_with_the_decoders_message(self, tree_with_bad_images, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        out = tmp_path / "out"
        assert run_colour_tool(tree_with_bad_images, out) == relabel.EXIT_FAILED
        err = capsys.readouterr().err
        bad = tree_with_bad_images / "green" / "green_0b.png"
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert line.startswith(f"error: {bad}: cannot be decoded: ")
        assert "truncated JPEG (no end-of-image marker)" in line and "--on-error skip" in line
        decoder_says = line.split("cannot be decoded: ")[1].split(";")[0]
        assert decoder_says.strip() and "Critical error" not in decoder_says
        for other in ("green_0.png", "green_1.png", "blue_1.png", "red_0.png"):  # its batch and neighbours
            assert other not in line
        assert not (out / "index.json").exists()

    def test_skip_lists_the_skipped_images_and_exits_3(self, tree_with_bad_images, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(relabel, "build_annotator", lambda *args: ColourAnnotator())
        out = tmp_path / "out"
        assert run_colour_tool(tree_with_bad_images, out, "--on-error", "skip") == relabel.EXIT_SKIPPED
        err = capsys.readouterr().err
        bad = {tree_with_bad_images / "green" / "green_0b.png", tree_with_bad_images / "red" / "red_9.png"}
        assert "2 image(s) the decoder rejects were skipped" in err
        for path in bad:
            assert f"  {path}: " in err
        assert "empty file" in err and "truncated JPEG" in err
        reader = LabelShardReader(out)
        good = sorted(relabel.label_key(path, tree_with_bad_images) for path in tree_with_bad_images.rglob("*.png")
                      if path not in bad)
        assert reader.keys == good and len(good) == 6
        for key in reader.keys:  # the images after the bad one still carry their own maps
            assert (reader[key][1][0] == sorted(COLOURS).index(key.split("/")[0])).all()
        assert reader.verify() == 6
        # the list survives a resume that keeps every shard
        capsys.readouterr()
        assert run_colour_tool(tree_with_bad_images, out, "--on-error", "skip") == relabel.EXIT_SKIPPED
        captured = capsys.readouterr()
        assert "3 of rank 0's shards kept" in captured.out and "2 image(s) the decoder rejects" in captured.err
        assert len(list(out.glob(f"*{relabel.SKIPPED_SUFFIX}"))) == 2
