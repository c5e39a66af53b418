"""Fault injection, end to end: every way a dataset, shard or checkpoint goes wrong is refused or
reported by name, never trained on in silence. One class per failure mode of docs/FAILURES.md."""
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode, make_dataset
from test_pack_labels import make_tree, official_array, save
from test_train import argv_for, tiny  # noqa: F401  (tiny is a fixture)

from relabel_dali import LabelShardReader, LabelShardWriter
from relabel_dali import checkpoint as ckpt
from relabel_dali import format as fmt
from relabel_dali.progress import INTERVAL_ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_dataset  # noqa: E402
import pack_labels  # noqa: E402


def pack(src, out, *extra):
    return pack_labels.main([str(src), str(out), *map(str, extra)])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def garbage_entropy_jpeg(data: bytes, seed: int = 0) -> bytes:
    """The JPEG with the middle third of its entropy-coded scan overwritten by random bytes. No 0xFF
    is written, so every marker stays valid and the file still starts and ends like a JPEG."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    third = (end - start) // 3
    garbage = np.random.default_rng(seed).integers(0, 0xFF, size=third, dtype=np.uint8)  # 0..254
    return data[:start + third] + garbage.tobytes() + data[start + 2 * third:]


class TestOtherJobInOutputFolder:
    """A rerun keeps complete shards only when they were packed from the same source files."""

    def test_other_dataset_with_same_count_refused(self, tmp_path, capsys):
        make_tree(tmp_path / "a", count=6, seed=0)
        assert pack(tmp_path / "a", tmp_path / "out", "--records-per-shard", 4) == 0
        index_before = (tmp_path / "out" / "index.json").read_bytes()
        rng = np.random.default_rng(1)
        (tmp_path / "b" / "x").mkdir(parents=True)
        for i in range(6):  # another dataset: other keys, same count and settings
            save(tmp_path / "b" / "x" / f"other_{i}.pt", official_array(rng))
        capsys.readouterr()
        assert pack(tmp_path / "b", tmp_path / "out", "--records-per-shard", 4) == pack_labels.EXIT_FAILED
        err = capsys.readouterr().err
        assert "holds 2 complete shard(s) that this run would not write" in err
        assert "labels-00000.rls: made from other source files" in err and "not in the earlier run" in err
        assert (tmp_path / "out" / "index.json").read_bytes() == index_before

    def test_changed_source_file_named(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=6)
        assert pack(tmp_path / "src", tmp_path / "out", "--records-per-shard", 4) == 0
        changed = sorted((tmp_path / "src").rglob("*.pt"))[5]  # in the second shard
        save(changed, official_array(np.random.default_rng(7)))
        os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
        capsys.readouterr()
        assert pack(tmp_path / "src", tmp_path / "out", "--records-per-shard", 4) == pack_labels.EXIT_FAILED
        err = capsys.readouterr().err
        key = changed.relative_to(tmp_path / "src").with_suffix("").as_posix()
        assert "labels-00001.rls: made from other source files" in err
        assert f"1 source file(s) changed (first: key {key!r}" in err and "modified since" in err
        assert "labels-00000" not in err

    def test_folder_written_by_another_tool_refused(self, tmp_path, capsys):
        # What tools/relabel.py leaves: shards and index with the same geometry, its own settings file.
        writer = LabelShardWriter(tmp_path / "out", k=5, height=15, width=15)
        keys = sorted(make_tree(tmp_path / "src", count=3))
        with writer.shard("labels-00000") as shard:
            for key in keys:
                shard.add(key, np.zeros((5, 15, 15)), np.tile(np.arange(5)[:, None, None], (1, 15, 15)))
        writer.finalize()
        (tmp_path / "out" / "relabel_settings.json").write_text("{}")
        with pytest.raises(SystemExit, match="already holds label shards not written by pack_labels.py"):
            pack(tmp_path / "src", tmp_path / "out")
        assert not (tmp_path / "out" / "pack_settings.json").exists()


class TestCorruptJpeg:
    """Valid markers, garbage entropy-coded data: Pillow decodes it without complaint."""

    def test_found_and_named(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        target = image_root / "c1" / "img2.JPEG"
        damaged = garbage_entropy_jpeg(target.read_bytes())
        assert damaged[:3] == b"\xff\xd8\xff" and damaged.endswith(b"\xff\xd9")
        target.write_bytes(damaged)
        report = check_dataset.check(image_root)
        assert [(p["file"], p["kind"]) for p in report["problems"]] == [("c1/img2.JPEG", "bad image")]
        assert "corrupt JPEG data" in report["problems"][0]["detail"]

    def test_grey_and_cmyk_jpegs_pass(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
        (image_root / "c0" / "img0.JPEG").write_bytes(encode(rgb, "JPEG", "L"))
        (image_root / "c0" / "img1.JPEG").write_bytes(encode(rgb, "JPEG", "CMYK"))
        assert check_dataset.check(image_root)["problems"] == []


class TestSwappedKeys:
    """Two swapped lines in a keys file would give two images each other's labels."""

    def swap(self, label_root):
        keys_path = label_root / "labels-00000.keys"
        lines = keys_path.read_text().splitlines()
        lines[0], lines[1] = lines[1], lines[0]
        keys_path.write_text("".join(line + "\n" for line in lines))

    def test_reader_refuses(self, tmp_path):
        _, label_root, keys = make_dataset(tmp_path)
        self.swap(label_root)
        with pytest.raises(fmt.FormatError, match="labels-00000.keys: keys file checksum .* changed after packing"):
            LabelShardReader(label_root).index_of(keys[0])

    def test_check_dataset_reports(self, tmp_path):
        image_root, label_root, _ = make_dataset(tmp_path)
        self.swap(label_root)
        report = check_dataset.check(image_root, label_root)
        assert [p["kind"] for p in report["problems"]] == ["corrupt keys file"]
        assert "labels-00000.keys" in report["problems"][0]["detail"]


class TestScoreOverflow:
    """A score beyond float16's range would be stored as inf and give NaN targets."""

    def make(self, tmp_path):
        arrays = make_tree(tmp_path / "src", count=4)
        key = sorted(arrays)[2]
        big = arrays[key].copy()
        big[0, 0, 3, 4] = 1e6  # the top score at one location: still sorted
        save(tmp_path / "src" / f"{key}.pt", big)
        return key

    def test_refused_naming_the_file(self, tmp_path, capsys):
        key = self.make(tmp_path)
        assert pack(tmp_path / "src", tmp_path / "out") == pack_labels.EXIT_FAILED
        err = capsys.readouterr().err
        assert f"{key}.pt: score 1e+06" in err and "does not fit float16" in err

    def test_skipped_under_skip(self, tmp_path):
        key = self.make(tmp_path)
        assert pack(tmp_path / "src", tmp_path / "out", "--on-error", "skip") == pack_labels.EXIT_SKIPPED
        skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
        assert [item["key"] for item in skipped] == [key] and "float16" in skipped[0]["error"]
        reader = LabelShardReader(tmp_path / "out")
        assert len(reader) == 3 and key not in reader
        assert all(np.isfinite(reader[i][0]).all() for i in range(3))

    def test_float32_keeps_it(self, tmp_path):
        key = self.make(tmp_path)
        assert pack(tmp_path / "src", tmp_path / "out", "--dtype", "float32") == 0
        assert LabelShardReader(tmp_path / "out")[key][0].max() == 1e6


class TestOddMapSize:
    """One file of another map size, sorting first, must not decide the dataset's size."""

    def test_odd_first_file_skipped_alone(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=6)
        odd = tmp_path / "src" / "a_first" / "odd.pt"
        odd.parent.mkdir()
        save(odd, official_array(np.random.default_rng(3), size=14))
        assert pack(tmp_path / "src", tmp_path / "out", "--on-error", "skip") == pack_labels.EXIT_SKIPPED
        out = capsys.readouterr().out
        assert f"map size 15x15: the size of 6 of 7 sampled files; other sizes sampled: 14x14: 1 (e.g. {odd})" in out
        skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
        assert [item["file"] for item in skipped] == [str(odd)]
        assert "map is 14x14, the dataset's is 15x15" in skipped[0]["error"]
        reader = LabelShardReader(tmp_path / "out")
        assert len(reader) == 6 and (reader.height, reader.width) == (15, 15)

    def test_fail_mode_names_the_odd_file(self, tmp_path, capsys):
        make_tree(tmp_path / "src", count=6)
        odd = sorted((tmp_path / "src").rglob("*.pt"))[0]
        save(odd, official_array(np.random.default_rng(3), size=14))
        assert pack(tmp_path / "src", tmp_path / "out") == pack_labels.EXIT_FAILED
        assert f"{odd}: map is 14x14, the dataset's is 15x15" in capsys.readouterr().err


class TestEveryCorruptRecord:
    def test_all_listed_by_key(self, tmp_path):
        image_root, label_root, keys = make_dataset(tmp_path)
        record_size = LabelShardReader(label_root).geometry.record_dtype.itemsize
        for row in (1, 4, 6):
            flip_byte(label_root / "labels-00000.rls", fmt.HEADER_SIZE + row * record_size + 20)
        report = check_dataset.check(image_root, label_root)
        assert [(p["file"], p["kind"]) for p in report["problems"]] == [
            (keys[row], "corrupt label record") for row in (1, 4, 6)]


class TestProgressWithoutTerminal:
    """Under SLURM or ``| tee`` stderr is not a terminal: tqdm shows nothing, a line per interval does."""

    def test_pack_labels(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setenv(INTERVAL_ENV, "0")
        make_tree(tmp_path / "src", count=5)
        assert pack(tmp_path / "src", tmp_path / "out") == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pack_labels:")]
        assert [line.split()[1] for line in lines[:5]] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
        assert lines[-1].startswith("pack_labels: 5 map in")

    def test_check_dataset(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setenv(INTERVAL_ENV, "0")
        image_root, label_root, _ = make_dataset(tmp_path)
        assert check_dataset.main([str(image_root), "--labels", str(label_root)]) == 0
        err = capsys.readouterr().err
        assert "check_dataset: decoding images: 8/8 (100%)" in err
        assert "check_dataset: label records: 8/8 (100%)" in err


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


class TestFileModes:
    """Files written atomically get 0666 less the umask, not mkstemp's 0600."""

    def test_packed_dataset_readable_by_others(self, tmp_path, umask_022):
        make_tree(tmp_path / "src", count=6)
        assert pack(tmp_path / "src", tmp_path / "out", "--records-per-shard", 4) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
        assert {"index.json", "labels-00000.rls", "labels-00001.keys", "pack_settings.json"} <= set(modes)
        assert modes == dict.fromkeys(modes, 0o644)

    def test_checkpoint_follows_umask(self, tmp_path, umask_022):
        ckpt.atomic_torch_save({"epoch": 1}, tmp_path / "a.pth")
        assert stat.S_IMODE((tmp_path / "a.pth").stat().st_mode) == 0o644
        os.umask(0o077)
        ckpt.atomic_torch_save({"epoch": 1}, tmp_path / "b.pth")
        assert stat.S_IMODE((tmp_path / "b.pth").stat().st_mode) == 0o600


class TestDamagedCheckpoint:
    """A truncated or damaged checkpoint-last.pth: --resume auto takes the previous one and says so."""

    def save_epochs(self, out, epochs):
        for epoch in epochs:
            ckpt.save_keeping_previous({"epoch": epoch, "weights": torch.full((1000,), float(epoch))},
                                       out / ckpt.LAST_NAME)

    def test_truncated_last_falls_back_to_previous(self, tmp_path):
        self.save_epochs(tmp_path, (1, 2, 3))
        last = tmp_path / ckpt.LAST_NAME
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        messages = []
        chosen = ckpt.resolve_resume("auto", tmp_path, warn=messages.append)
        assert chosen == tmp_path / ckpt.PREVIOUS_NAME
        assert ckpt.load_checkpoint(chosen)["epoch"] == 2
        assert len(messages) == 1 and "checkpoint-last.pth is not a complete checkpoint" in messages[0]

    def test_flipped_byte_in_last_detected(self, tmp_path):
        self.save_epochs(tmp_path, (1, 2))
        last = tmp_path / ckpt.LAST_NAME
        raw = bytearray(last.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # inside the weights: torch.load alone would load it silently
        last.write_bytes(bytes(raw))
        messages = []
        assert ckpt.resolve_resume("auto", tmp_path, warn=messages.append) == tmp_path / ckpt.PREVIOUS_NAME
        assert "fails its CRC check" in messages[0]

    @pytest.mark.slow
    def test_train_resumes_from_previous(self, tiny, tmp_path, capsys):
        import train
        argv = argv_for(tiny, tmp_path)  # two epochs
        assert train.main(argv) == 0
        last = tmp_path / ckpt.LAST_NAME
        assert ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS_NAME)["epoch"] == 1
        last.write_bytes(last.read_bytes()[:4096])
        capsys.readouterr()
        assert train.main(argv + ["--resume", "auto"]) == 0
        captured = capsys.readouterr()
        assert "checkpoint-last.pth is not a complete checkpoint" in captured.err
        assert f"resumed from {tmp_path / ckpt.PREVIOUS_NAME} at epoch 1" in captured.out
        assert ckpt.load_checkpoint(last)["epoch"] == 2

    def test_kill_between_rotation_and_write_resumes_from_previous(self, tmp_path, monkeypatch):
        self.save_epochs(tmp_path, (1,))

        def killed(obj, handle):
            raise KeyboardInterrupt("killed while saving")

        monkeypatch.setattr(ckpt.torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            self.save_epochs(tmp_path, (2,))
        monkeypatch.undo()
        chosen = ckpt.resolve_resume("auto", tmp_path, warn=pytest.fail)
        assert chosen == tmp_path / ckpt.PREVIOUS_NAME and ckpt.load_checkpoint(chosen)["epoch"] == 1
