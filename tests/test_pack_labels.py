"""tools/pack_labels.py: layout conversion, bad input, skip policy, resume after a kill."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tree, official_array, save

from relabel_dali import LabelShardReader
from relabel_dali.store.labelmaps import LabelMapError, find_image, label_key, sample_key, to_canonical, to_official

from tools import pack_labels

ROOT = Path(__file__).resolve().parents[1]


def run(argv):
    return pack_labels.main([str(a) for a in argv])


def tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class TestKeys:
    @pytest.mark.parametrize("relative, key", [("n01/n01_1.JPEG", "n01/n01_1"), ("a/b.c.pt", "a/b.c"),
                                               ("a/noext", "a/noext"), ("x.npy", "x")])
    def test_sample_key(self, tmp_path, relative, key):
        assert sample_key(relative) == key
        assert label_key(tmp_path / relative, tmp_path) == key

    def test_find_image_any_case(self, tmp_path):
        (tmp_path / "n01").mkdir()
        (tmp_path / "n01" / "a[1].JPEG").write_bytes(b"")
        (tmp_path / "n01" / "a[1].txt").write_bytes(b"")
        (tmp_path / "n01" / "b.png").write_bytes(b"")
        assert find_image(tmp_path, "n01/a[1]") == tmp_path / "n01" / "a[1].JPEG"
        assert find_image(tmp_path, "n01/b") == tmp_path / "n01" / "b.png"
        with pytest.raises(FileNotFoundError, match="no image for key 'n01/c'"):
            find_image(tmp_path, "n01/c")


class TestLayout:
    def test_official_hot_cell_lands_transposed(self):
        array = np.zeros((2, 1, 15, 15), np.float32)
        array[0, 0, 2, 7] = 5.0  # official [k, a, b]: a is horizontal, b vertical
        array[1, 0] = 3
        scores, ids = to_canonical(array, topk=1, num_classes=10, layout="official")
        assert scores[0, 7, 2] == 5.0 and scores.sum() == 5.0  # canonical [k, y=7, x=2]
        scores, _ = to_canonical(array, topk=1, num_classes=10, layout="yx")
        assert scores[0, 2, 7] == 5.0

    def test_to_official_inverts(self):
        array = official_array(np.random.default_rng(1))
        scores, ids = to_canonical(array, topk=5, num_classes=1000, layout="official")
        np.testing.assert_array_equal(to_official(scores, ids), array)

    def test_topk_keeps_best_scores(self):
        rng = np.random.default_rng(2)
        array = official_array(rng, k=6)
        array[:, :, 0, 0] = array[:, ::-1, 0, 0]  # one location stored in ascending order
        scores, ids = to_canonical(array, topk=3, num_classes=1000, layout="yx")
        expected = np.sort(array[0, :, 0, 0])[::-1][:3]
        np.testing.assert_array_equal(scores[:, 0, 0], expected)
        assert np.all(np.diff(scores, axis=0) <= 0)

    def test_packed_shard_matches_official_files(self, tmp_path):
        arrays = make_tree(tmp_path / "src")
        assert run([tmp_path / "src", tmp_path / "out", "--dtype", "float32", "--records-per-shard", "5"]) == 0
        reader = LabelShardReader(tmp_path / "out")
        assert reader.keys == sorted(arrays) and len(reader.shard_paths) == 3
        for key, array in arrays.items():
            scores, ids = reader[key]
            np.testing.assert_array_equal(scores, array[0].transpose(0, 2, 1))
            np.testing.assert_array_equal(ids, array[1].transpose(0, 2, 1))

    @pytest.mark.parametrize("suffix", [".npy", ".npz"])
    def test_numpy_inputs(self, tmp_path, suffix):
        arrays = make_tree(tmp_path / "src", count=4, suffix=suffix)
        assert run([tmp_path / "src", tmp_path / "out", "--layout", "yx", "--dtype", "float32"]) == 0
        reader = LabelShardReader(tmp_path / "out")
        for key, array in arrays.items():
            np.testing.assert_array_equal(reader[key][0], array[0])


class TestBadInput:
    def corrupt(self, root, case):
        rng = np.random.default_rng(9)
        path = root / "n00000000" / "bad.pt"
        array = official_array(rng)
        if case == "unreadable":
            path.write_bytes(b"this is not a torch file")
            return path, "unreadable"
        if case == "shape":
            array = array[:, :, :, :10]
            save(path, array[0])
            return path, r"shape \(5, 15, 10\), expected \[2, k, H, W\]"
        if case == "small_k":
            save(path, array[:, :3])
            return path, "k = 3 entries per location, fewer than --topk 5"
        if case == "class_range":
            array[1, 0, 4, 4] = 1000
            save(path, array)
            return path, r"class ids span \[\d+, 1000\], expected within \[0, 999\]"
        if case == "nan":
            array[0, 1, 2, 3] = np.inf
            save(path, array)
            return path, "is inf"
        if case == "duplicate":
            # .npy sorts before .pt: the .npy becomes the source, the .pt the duplicate.
            np.save(root / "n00000000" / "n00000000_0000.npy", array)
            return root / "n00000000" / "n00000000_0000.pt", "duplicate key 'n00000000/n00000000_0000'"
        raise AssertionError(case)

    CASES = ["unreadable", "shape", "small_k", "class_range", "nan", "duplicate"]

    @pytest.mark.parametrize("case", CASES)
    def test_fail_names_the_file(self, tmp_path, capsys, case):
        make_tree(tmp_path / "src", count=6)
        path, message = self.corrupt(tmp_path / "src", case)
        assert run([tmp_path / "src", tmp_path / "out"]) == pack_labels.EXIT_FAILED
        err = capsys.readouterr().err
        assert str(path) in err
        assert __import__("re").search(message, err), err
        assert not (tmp_path / "out" / "index.json").exists()

    @pytest.mark.parametrize("case", CASES)
    def test_skip_packs_the_rest(self, tmp_path, capsys, case):
        arrays = make_tree(tmp_path / "src", count=6)
        path, _ = self.corrupt(tmp_path / "src", case)
        assert run([tmp_path / "src", tmp_path / "out", "--on-error", "skip"]) == pack_labels.EXIT_SKIPPED
        reader = LabelShardReader(tmp_path / "out")
        assert sorted(reader.keys) == sorted(arrays)
        skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
        assert [item["file"] for item in skipped] == [str(path)]
        assert "skipped: 1 bad files" in capsys.readouterr().out

    def test_map_size_mismatch(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=3)
        save(tmp_path / "src" / "zz.pt", official_array(np.random.default_rng(3), size=14))
        assert run([tmp_path / "src", tmp_path / "out"]) == pack_labels.EXIT_FAILED
        assert "zz.pt: map is 14x14, the dataset's is 15x15" in capsys.readouterr().err

    def test_direct_errors(self):
        with pytest.raises(LabelMapError, match="class id repeated within one location"):
            array = official_array(np.random.default_rng(4))
            array[1, 1, 0, 0] = array[1, 0, 0, 0]
            to_canonical(array, topk=5, num_classes=1000, layout="official")

    def test_other_settings_refused(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=3)
        assert run([tmp_path / "src", tmp_path / "out"]) == 0
        with pytest.raises(SystemExit, match="dtype differ"):
            run([tmp_path / "src", tmp_path / "out", "--dtype", "uint8"])


class TestReport:
    def test_image_root_mismatches(self, tmp_path, capsys):
        arrays = make_tree(tmp_path / "src", count=4)
        keys = sorted(arrays)
        for key in keys[1:] + ["n00000009/extra"]:
            (tmp_path / "img" / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "img" / f"{key}.JPEG").write_bytes(b"")
        assert run([tmp_path / "src", tmp_path / "out", "--image-root", tmp_path / "img"]) == 0
        out = capsys.readouterr().out
        assert "1 label files without an image, 1 images without a label file" in out
        assert f"label file without image: {keys[0]}" in out
        assert "image without label file: n00000009/extra" in out

    def test_summary_numbers(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=4)
        assert run([tmp_path / "src", tmp_path / "out"]) == 0
        out = capsys.readouterr().out
        assert "packed 4 records into 1 shards" in out and "18,176 (4,544 bytes/record" in out  # 64-byte header + 4 x 4528


class TestResume:
    def test_workers_give_identical_output(self, tmp_path):
        make_tree(tmp_path / "src", count=9)
        assert run([tmp_path / "src", tmp_path / "a", "--records-per-shard", "4"]) == 0
        assert run([tmp_path / "src", tmp_path / "b", "--records-per-shard", "4", "--workers", "2"]) == 0
        assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")

    def test_rerun_after_kill_is_identical(self, tmp_path):
        make_tree(tmp_path / "src", count=14)
        args = [str(tmp_path / "src"), None, "--records-per-shard", "4", "--dtype", "uint8"]
        assert run([a if a else tmp_path / "clean" for a in args]) == 0
        killed = tmp_path / "killed"
        # A real SIGKILL in the middle of the third shard: no cleanup code gets to run.
        script = textwrap.dedent(f"""
            import os, signal
            from tools import pack_labels
            from relabel_dali.store.writer import ShardBuilder
            added = ShardBuilder.add
            calls = []
            def add(self, *a, **k):
                calls.append(1)
                if len(calls) == 10:
                    os.kill(os.getpid(), signal.SIGKILL)
                return added(self, *a, **k)
            ShardBuilder.add = add
            pack_labels.main({[a if a else str(killed) for a in args]!r})
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT)
        assert result.returncode == -9
        assert (killed / "labels-00001.keys").exists() and not (killed / "labels-00002.keys").exists()
        assert not (killed / "index.json").exists()
        assert list(killed.glob(".*.tmp"))  # the half-written shard is left behind, as after a crash
        assert run([a if a else killed for a in args]) == 0
        assert tree_bytes(killed) == tree_bytes(tmp_path / "clean")
        assert LabelShardReader(killed).verify() == 14
