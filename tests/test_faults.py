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
from conftest import argv_for, encode, make_dataset, make_tree, official_array, save

from relabel_dali import LabelShardReader, LabelShardWriter
from relabel_dali.train import checkpoint as ckpt
from relabel_dali.store import format as fmt
from relabel_dali.progress import INTERVAL_ENV
from tools import check_dataset, pack_labels

ROOT = Path(__file__).resolve().parents[1]


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


# ---- training-side faults ---------------------------------------------------------------------
def copy_tiny(tiny, tmp_path) -> Path:
    import shutil

    root = tmp_path / "tiny"
    shutil.copytree(tiny, root)
    return root


class TestTrainingLabelChecks:
    """data.verify_labels and the per-sample record checks: a damaged record never becomes a target."""

    def damage_record(self, root: Path, row: int, value=None) -> str:
        """Overwrites one score of record ``row`` (a flipped byte, or ``value``); returns its key."""
        reader = LabelShardReader(root / "labels")
        shard, size = reader.shard_paths[0], reader.geometry.record_dtype.itemsize
        data = np.frombuffer(bytearray(shard.read_bytes()), np.uint8)
        records = data[fmt.HEADER_SIZE:].view(reader.geometry.record_dtype)
        if value is None:
            data[fmt.HEADER_SIZE + row * size + reader.geometry.record_dtype.fields["scores"][1] + 7] ^= 0x10
        else:
            records[row]["scores"][0, 1, 1] = value
        shard.write_bytes(data.tobytes())
        return reader.keys[row]

    def test_full_verification_names_the_damaged_record(self, tiny, tmp_path, capsys):
        import train

        root = copy_tiny(tiny, tmp_path)
        key = self.damage_record(root, 5)
        argv = argv_for(root, tmp_path / "run", "--optim.epochs", "1")
        # open (the default) checks index and keys only: the flipped score is not looked at
        assert train.main(argv + ["--data.verify_labels", "full"]) == 1
        err = capsys.readouterr().err
        assert "data.verify_labels full" in err and f"record 5 (key {key!r})" in err

    def test_non_finite_score_named_by_key(self, tiny, tmp_path):
        from relabel_dali.data.loader import build_train_loader
        from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment

        root = copy_tiny(tiny, tmp_path)
        key = self.damage_record(root, 2, np.nan)
        dataset = Dataset(root / "train", class_map="folder", num_classes=3, preflight_decodes=0)
        loader = build_train_loader(dataset, batch_size=8, labels=Labels(root / "labels"),
                                    augment=TrainAugment(image_size=16), runtime=Runtime(num_threads=1, py_workers=1))
        with pytest.raises(Exception, match=rf"label record 2 \(key '{key}'\).*non-finite label score"):
            list(loader)
        skip = build_train_loader(Dataset(root / "train", class_map="folder", num_classes=3, on_bad_sample="skip",
                                          preflight_decodes=0), batch_size=8, labels=Labels(root / "labels"),
                                  augment=TrainAugment(image_size=16), runtime=Runtime(num_threads=1, py_workers=1))
        targets = torch.cat([batch["targets"] for batch in skip])
        assert torch.isfinite(targets).all() and skip.substituted >= 1

    def test_swapped_keys_refused_at_start(self, tiny, tmp_path, capsys):
        import train

        root = copy_tiny(tiny, tmp_path)
        keys_file = next((root / "labels").glob("*.keys"))
        lines = keys_file.read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]
        keys_file.write_text("".join(lines))
        assert train.main(argv_for(root, tmp_path / "run")) == 1
        assert "checksum" in capsys.readouterr().err


class TestTrainingPreflight:
    def test_damaged_jpeg_found_before_training(self, tiny, tmp_path, capsys):
        import train

        root = copy_tiny(tiny, tmp_path)
        victim = sorted((root / "train").glob("*/*.JPEG"))[3]
        victim.write_bytes(garbage_entropy_jpeg(victim.read_bytes()))
        # All 24 images sampled: the damaged one is among them.
        assert train.main(argv_for(root, tmp_path / "run", "--data.preflight_decodes", "100")) == 1
        err = capsys.readouterr().err
        assert f"{victim}: corrupt JPEG data" in err and "check_dataset.py" in err
        out = tmp_path / "skip"
        assert train.main(argv_for(root, out, "--data.preflight_decodes", "100", "--data.on_bad_sample", "skip",
                                   "--optim.epochs", "1")) == 0


class TestBadValues:
    @pytest.mark.parametrize("flag,value,message", [
        ("--optim.batch_size", "0", "optim.batch_size must be an integer >= 1, got 0"),
        ("--optim.batch_size", "-8", "optim.batch_size must be an integer >= 1, got -8"),
        ("--optim.epochs", "0", "optim.epochs must be an integer >= 1, got 0"),
        ("--util.val_every", "0", "util.val_every must be an integer >= 1, got 0"),
        ("--data.color_jitter", "-1", "data.augment: color_jitter must be >= 0"),
        ("--data.random_aspect_ratio", "[2, 1]", "random_aspect_ratio must be \\[min, max\\]"),
        ("--data.on_bad_sample", "ignore", "on_bad_sample 'ignore': expected one of fail, skip"),
        ("--data.verify_labels", "some", "verify_labels 'some': expected one of off, open, full"),
    ])
    def test_exit_2_before_any_work(self, tiny, tmp_path, capsys, flag, value, message):
        import re
        import time

        import train

        started = time.perf_counter()
        assert train.main(argv_for(tiny, tmp_path / "run", flag, value)) == 2
        assert re.search(message, capsys.readouterr().err)
        assert time.perf_counter() - started < 20 and not (tmp_path / "run").exists()

    def test_missing_data_path(self, tiny, tmp_path, capsys):
        import train

        assert train.main(argv_for(tiny, tmp_path / "run", "--data.data_path", str(tmp_path / "nowhere"))) == 2
        assert f"{tmp_path / 'nowhere' / 'train'} is not a folder" in capsys.readouterr().err

    def test_label_classes_differ_from_num_classes(self, tiny, tmp_path, capsys):
        import train

        assert train.main(argv_for(tiny, tmp_path / "run", "--data.num_classes", "5")) == 2
        assert "label maps cover 3 classes, data.num_classes is 5" in capsys.readouterr().err

    def test_class_map_missing_a_folder(self, tiny, tmp_path, capsys):
        import train

        mapping = tmp_path / "map.json"
        mapping.write_text(json.dumps({"n01440764": 0, "n01443537": 1}))
        assert train.main(argv_for(tiny, tmp_path / "run", "--data.class_map", str(mapping))) == 2
        assert "no index for class folder(s) ['n01484850']" in capsys.readouterr().err


def processes_with(token: str) -> list[int]:
    """Pids of live processes whose environment holds ``token`` (the run and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    status = (entry / "status").read_text()
                    if "\nState:\tZ" not in status:
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
class TestSignals:
    """SIGTERM (preemption) ends a run cleanly; SIGKILL takes the DALI workers with it."""

    def start(self, tiny, tmp_path, token, start_method="fork", workers=2):
        import subprocess
        import time

        env = {**os.environ, "RELABEL_TEST_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        argv = argv_for(tiny, tmp_path / "run", "--optim.epochs", "50", "--data.py_workers", str(workers),
                        "--util.print_freq", "1", "--data.start_method", start_method)
        # Output to a file, not a pipe: a pipe would also wait for any process that outlived the run.
        log = open(tmp_path / "train.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while len(processes_with(token)) < 1 + 2 * workers:  # the trainer and its training and validation workers
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.2)
        time.sleep(1.5 if start_method == "fork" else 8.0)  # into the loop; spawned workers import for seconds
        return process

    def wait_gone(self, token, seconds=10.0) -> list[int]:
        import time

        deadline = time.monotonic() + seconds
        while processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        return processes_with(token)

    def test_sigterm_stops_at_a_step_and_leaves_nothing(self, tiny, tmp_path):
        import signal
        import uuid

        token = uuid.uuid4().hex
        process = self.start(tiny, tmp_path, token)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        output = (tmp_path / "train.log").read_text()
        assert process.returncode == 143, output
        assert "stopped by SIGTERM" in output and "--resume auto" in output
        left = self.wait_gone(token)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == []

    @pytest.mark.parametrize("start_method", ["fork", "spawn"])
    def test_sigkill_takes_the_workers_along(self, tiny, tmp_path, start_method):
        import signal
        import uuid

        token = uuid.uuid4().hex
        # Spawned workers each import torch and DALI afresh: one per loader (four of them importing at
        # once on the two busy cores took ~18 s to start and 12 s to go after the kill).
        process = self.start(tiny, tmp_path, token, start_method, workers=2 if start_method == "fork" else 1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        left = self.wait_gone(token, 10 if start_method == "fork" else 30)
        for pid in left:  # do not leave them running if the test fails
            os.kill(pid, signal.SIGKILL)
        assert left == []


class TestAnnotationJobs:
    """tools/relabel.py: a resume continues only the same job; SIGTERM stops it cleanly."""

    @pytest.fixture
    def photos(self, tmp_path):
        from PIL import Image

        rng = np.random.default_rng(0)
        root = tmp_path / "photos"
        for c, wnid in enumerate(("n01440764", "n01443537")):
            (root / wnid).mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((40, 40, 3)) * 60 + np.roll([190, 40, 40], c)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.JPEG", quality=90)
        return root

    @pytest.fixture
    def weights(self, tmp_path):
        """A randomly initialised 1000-class ResNet-10t as the user's weights file (no download)."""
        timm = pytest.importorskip("timm")
        from safetensors.torch import save_file

        torch.manual_seed(0)
        path = tmp_path / "resnet10t.safetensors"
        save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
        return path

    def annotate(self, photos, out, weights, *extra):
        from tools import relabel

        return relabel.main([str(photos), str(out), "--arch", "timm:resnet10t", "--weights", str(weights), "--size",
                             "32", "--batch-size", "4", "--records-per-shard", "4", "--threads", "1", *extra])

    def test_resume_into_a_folder_of_other_images_refused(self, photos, weights, tmp_path, capsys):
        assert self.annotate(photos, tmp_path / "out", weights) == 0
        victim = sorted(photos.glob("*/*.JPEG"))[1]
        os.utime(victim, (1, 1))  # same name, other file (as after a re-download)
        capsys.readouterr()
        assert self.annotate(photos, tmp_path / "out", weights) == 1
        assert "made from other source files" in capsys.readouterr().err

    def test_sigterm_stops_and_leaves_nothing(self, photos, weights, tmp_path):
        import signal
        import subprocess
        import time
        import uuid

        token = uuid.uuid4().hex
        many = tmp_path / "many"
        for i in range(20):  # enough images that the run is still annotating when the signal comes
            for source in sorted(photos.glob("*/*.JPEG")):
                target = many / source.parent.name / f"{source.stem}_{i}.JPEG"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
        log = open(tmp_path / "relabel.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "relabel.py"), str(many), str(tmp_path / "out"),
                                    "--arch", "timm:resnet10t", "--weights", str(weights), "--size", "32",
                                    "--batch-size", "2",
                                    "--records-per-shard", "8", "--threads", "1"],
                                   env={**os.environ, "RELABEL_TEST_TOKEN": token, "RELABEL_PROGRESS_INTERVAL_S": "0"},
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while "annotating" not in (tmp_path / "relabel.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "relabel.log").read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        output = (tmp_path / "relabel.log").read_text()
        assert process.returncode == 143, output
        assert "stopped by SIGTERM" in output and "rerun the same command" in output
        left = TestSignals().wait_gone(token)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == []
        assert not list((tmp_path / "out").glob(".*.tmp"))  # nothing half-written in sight


def test_verify_labels_off_reads_swapped_keys_without_checking(tmp_path):
    """The one thing ``data.verify_labels: off`` gives up: the keys checksum (open and full keep it)."""
    from relabel_dali.data.loader import open_labels
    from relabel_dali.store.reader import KeysCorruptError
    from relabel_dali.data.settings import Labels

    image_root, label_root, keys = make_dataset(tmp_path)
    keys_file = next(label_root.glob("*.keys"))
    lines = keys_file.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    keys_file.write_text("".join(lines))
    for verify in ("open", "full"):
        with pytest.raises(KeysCorruptError):
            open_labels(Labels(label_root, verify=verify), 16).keys
    assert open_labels(Labels(label_root, verify="off"), 16).keys[:2] == [keys[1], keys[0]]
