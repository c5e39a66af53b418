"""A full disk or quota (ENOSPC, EDQUOT) for every writer: one line that names the path, the bytes
needed and the bytes free; nothing half-written left behind; the same command resumes once space is
freed. Real faults on a small tmpfs where this machine lets the tests mount one (as root), skipped
with the reason elsewhere; the same paths with a monkeypatched ``os.statvfs`` and with writers that
raise ``OSError(ENOSPC)`` run everywhere."""
import errno
import io
import os
import pickle
import re
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from conftest import argv_for, make_dataset, make_tree
from relabel_dali import LabelShardWriter
from relabel_dali.atomic import (DISK_FULL_EXIT, DiskFullError, atomic_open, atomic_write_bytes, check_free_space,
                                 describe_bytes, free_bytes)
from relabel_dali.train import checkpoint as ckpt
from relabel_dali.train.engine import RunLogger
from tools import check_dataset, pack_labels, relabel

KIB = 1024
FREE = re.compile(r"[\d,]+ bytes( \([\d.]+ [KMGT]iB\))? free")


class SmallFs:
    """A size-limited tmpfs; ``resize`` stands for space being freed (or a raised quota)."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True)

    def fill(self, leave: int = 0) -> Path:
        """Fills the file system up to ``leave`` free bytes with one file (returned)."""
        path = self.path / "filler"
        with open(path, "ab") as handle:
            handle.truncate(0)
            room = free_bytes(self.path) - leave
            try:
                handle.write(b"\0" * max(room, 0))
                handle.flush()
            except OSError:
                pass
        return path

    def stray_files(self) -> list[str]:
        return sorted(p.name for p in self.path.rglob(".*.tmp"))


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs mounted for the test (needs root, as in this project's CI VMs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallFs(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fake_statvfs(free: int, block: int = 4096):
    """An ``os.statvfs`` that reports ``free`` bytes available to the user."""
    return lambda path: SimpleNamespace(f_bavail=free // block, f_frsize=block, f_bsize=block)


class FullHandle(io.BytesIO):
    """A file whose writes fail as on a full disk (or a used-up quota)."""

    def __init__(self, code=errno.ENOSPC):
        super().__init__()
        self.code = code

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))


def one_line(text: str, prefix: str = "") -> str:
    """The one line of ``text`` (that starts with ``prefix``: a progress summary may precede it)."""
    lines = [line for line in text.splitlines() if line.strip() and line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ---- the shared ground: relabel_dali/atomic.py ------------------------------------------------------
class TestDiskFullError:
    @pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                              (errno.EDQUOT, "disk quota exceeded")])
    def test_names_path_needed_and_free(self, code, reason):
        error = DiskFullError("/runs/x/checkpoint-last.pth", 3_000_000, 1_048_576, code, "about")
        assert isinstance(error, OSError) and error.errno == code
        assert str(error).startswith(f"/runs/x/checkpoint-last.pth: {reason}: needs about 3,000,000 bytes (2.9 MiB), "
                                     f"1,048,576 bytes (1.0 MiB) free")
        assert ("quota allows less" in str(error)) == (code == errno.EDQUOT)
        copy = pickle.loads(pickle.dumps(error))  # crosses ranks (broadcast) and worker pools
        assert (copy.path, copy.needed, copy.free, copy.errno, str(copy)) == \
            (error.path, error.needed, error.free, code, str(error))

    @pytest.mark.parametrize("count, text", [(0, "0 bytes"), (1023, "1,023 bytes"), (1024, "1,024 bytes (1.0 KiB)"),
                                             (5 << 30, "5,368,709,120 bytes (5.0 GiB)")])
    def test_describe_bytes(self, count, text):
        assert describe_bytes(count) == text


class TestCheckFreeSpace:
    def test_refuses_naming_the_sizes(self, tmp_path, monkeypatch):
        monkeypatch.setattr(os, "statvfs", fake_statvfs(8192))
        assert check_free_space(tmp_path / "a.bin", 8192) == 8192
        with pytest.raises(DiskFullError, match=r"a.bin: no space left on device: needs 8,193 bytes .*8,192 bytes"):
            check_free_space(tmp_path / "a.bin", 8193)

    def test_asks_the_nearest_existing_folder(self, tmp_path, monkeypatch):
        asked = []
        monkeypatch.setattr(os, "statvfs", lambda path: asked.append(Path(path)) or fake_statvfs(4096)(path))
        assert free_bytes(tmp_path / "not" / "yet" / "there.pth") == 4096
        assert asked == [tmp_path]


class TestAtomicOpen:
    @pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
    def test_failed_write_becomes_disk_full_and_leaves_nothing(self, tmp_path, code):
        target = tmp_path / "report.json"
        target.write_bytes(b"old")
        with pytest.raises(DiskFullError) as caught:
            with atomic_open(target, size_hint=5000) as handle:
                handle.write(b"x" * 100)
                raise OSError(code, os.strerror(code))
        assert caught.value.errno == code and caught.value.path == target and caught.value.needed == 5000
        assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

    def test_without_a_size_the_bytes_written_are_a_lower_bound(self, tmp_path):
        with pytest.raises(DiskFullError, match="needs at least 1 bytes"):
            with atomic_open(tmp_path / "a.bin"):
                raise OSError(errno.ENOSPC, "No space left on device")

    def test_other_errors_pass_unchanged(self, tmp_path):
        with pytest.raises(OSError) as caught:
            with atomic_open(tmp_path / "a.bin"):
                raise OSError(errno.EIO, "Input/output error")
        assert type(caught.value) is OSError and caught.value.errno == errno.EIO
        assert list(tmp_path.iterdir()) == []

    def test_real_full_file_system(self, small_fs):
        data = b"\1" * (400 * KIB)
        target = small_fs.path / "sub" / "big.bin"
        with pytest.raises(DiskFullError) as caught:
            atomic_write_bytes(target, data)
        error = caught.value
        assert error.path == target and error.needed == len(data) and 200 * KIB < error.free <= 256 * KIB
        assert f"needs {describe_bytes(len(data))}" in str(error)
        assert small_fs.stray_files() == [] and not target.exists()
        small_fs.resize(1024)  # space freed: the same call succeeds
        atomic_write_bytes(target, data)
        assert target.read_bytes() == data


# ---- label packing: tools/pack_labels.py and the shard writer -----------------------------------------
class TestPackLabels:
    def test_full_disk_exits_75_in_one_line_and_resumes(self, small_fs, tmp_path, capsys):
        src = tmp_path / "src"
        make_tree(src, count=24)  # 24 maps of 4.5 KiB: 6 shards of 4, 109 KiB in all
        reference = tmp_path / "reference"
        assert pack_labels.main([str(src), str(reference), "--records-per-shard", "4"]) == 0
        out = small_fs.path / "labels"
        small_fs.fill(leave=40 * KIB)  # room for a shard or two, not for six
        capsys.readouterr()
        assert pack_labels.main([str(src), str(out), "--records-per-shard", "4"]) == DISK_FULL_EXIT
        line = one_line(capsys.readouterr().err, "error:")
        assert line.startswith(f"error: {out}/labels-0000")
        assert re.search(r"\.rls: no space left on device: needs up to [\d,]+ bytes .*, [\d,]+ bytes .*free; ", line)
        assert "not yet written need up to" in line and "rerun the same command" in line
        assert small_fs.stray_files() == []
        shards = {p.stem for p in out.glob("*.rls")}
        assert shards and shards == {p.stem for p in out.glob("*.keys")}, "no shard without its keys"
        assert len(shards) < 6
        (small_fs.path / "filler").unlink()  # space freed: the same command finishes
        assert pack_labels.main([str(src), str(out), "--records-per-shard", "4"]) == 0
        assert f"{len(shards)} shards kept from an earlier run" in capsys.readouterr().out
        for path in reference.iterdir():
            if path.suffix != ".json" or path.name == "index.json":
                assert (out / path.name).read_bytes() == path.read_bytes(), path.name

    def test_shard_writer_names_the_whole_shard(self, tmp_path, monkeypatch):
        src = tmp_path / "src"
        make_tree(src, count=8)
        sources = {path.stem: path for path in sorted(src.rglob("*.pt"))}
        writer = LabelShardWriter(tmp_path / "out", k=5, height=15, width=15)
        monkeypatch.setattr(os, "statvfs", fake_statvfs(4096 * 3))
        with pytest.raises(DiskFullError) as caught:
            with writer.shard("labels-00000", sources=sources):
                raise OSError(errno.ENOSPC, "No space left on device")  # a record's write found the disk full
        assert caught.value.needed == 64 + 8 * writer.geometry.record_dtype.itemsize  # header + 8 records
        assert caught.value.free == 4096 * 3 and "needs up to" in str(caught.value)
        assert list((tmp_path / "out").iterdir()) == []

    def test_no_shard_without_its_keys(self, tmp_path, monkeypatch):
        from relabel_dali.store import writer as writer_module

        def keys_do_not_fit(path, data):
            if str(path).endswith(".keys"):
                raise DiskFullError(path, len(data), 0)
            atomic_write_bytes(path, data)

        monkeypatch.setattr(writer_module, "atomic_write_bytes", keys_do_not_fit)
        writer = LabelShardWriter(tmp_path, k=5, height=15, width=15)
        scores = -np.sort(-np.random.default_rng(0).random((5, 15, 15)), axis=0).astype(np.float32)
        with pytest.raises(DiskFullError, match="labels-00000.keys"):
            with writer.shard("labels-00000") as shard:
                shard.add("n01/a", scores, np.zeros((5, 15, 15), np.int64))
        assert list(tmp_path.iterdir()) == [] and not writer.shard_done("labels-00000")


# ---- annotation: tools/relabel.py ----------------------------------------------------------------------
class TestRelabel:
    def test_disk_full_exits_75_in_one_line(self, tmp_path, monkeypatch, capsys):
        def full(args, stop):
            raise DiskFullError(tmp_path / "labels-00003.rls", 9_000_000, 4096)

        monkeypatch.setattr(relabel, "relabel", full)
        assert relabel.main([str(tmp_path), str(tmp_path / "out")]) == DISK_FULL_EXIT
        line = one_line(capsys.readouterr().err)
        assert "labels-00003.rls: no space left on device: needs 9,000,000 bytes" in line
        assert "4,096 bytes (4.0 KiB) free" in line and "rerun the same command" in line

    def test_official_pt_files_on_a_full_disk(self, small_fs):
        small_fs.fill(leave=8 * KIB)
        scores = np.zeros((5, 15, 15), np.float32)
        with pytest.raises(DiskFullError, match="n01/a.pt: no space left on device"):
            relabel.write_pt(small_fs.path / "pt", "n01/a", scores, np.zeros((5, 15, 15), np.int64))
        assert small_fs.stray_files() == [] and not (small_fs.path / "pt" / "n01" / "a.pt").exists()


# ---- reports: tools/check_dataset.py ---------------------------------------------------------------------
class TestCheckDataset:
    def test_report_on_a_full_disk_exits_75_in_one_line(self, small_fs, tmp_path, capsys):
        image_root, _, _ = make_dataset(tmp_path, classes=1, per_class=2, labels=False)
        small_fs.fill(leave=0)
        report = small_fs.path / "reports" / "check.json"
        assert check_dataset.main([str(image_root), "--json", str(report)]) == DISK_FULL_EXIT
        captured = capsys.readouterr()
        assert "2 images, 0 label records: 0 problem(s)" not in captured.out  # stopped before the summary
        line = one_line(captured.err, "error:")
        assert line.startswith(f"error: {report}: no space left on device: needs ") and FREE.search(line)
        assert small_fs.stray_files() == [] and not report.exists()


# ---- checkpoints: relabel_dali/train/checkpoint.py ----------------------------------------------------
def tiny_model_and_optimizer(kind: str):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    model(torch.zeros(1, 3, 8, 8))
    if kind == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=kind == "amsgrad")


def checkpoint_size(model, optimizer) -> int:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}, buffer)
    return len(buffer.getvalue())


class TestCheckpoints:
    @pytest.mark.parametrize("kind, slots", [("sgd", 1), ("adamw", 2), ("amsgrad", 3)])
    def test_estimate_bounds_the_real_size_before_and_after_a_step(self, kind, slots):
        model, optimizer = tiny_model_and_optimizer(kind)
        assert ckpt.optimizer_slots(optimizer) == slots
        before = ckpt.estimate_checkpoint_bytes(model, optimizer)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        after, actual = ckpt.estimate_checkpoint_bytes(model, optimizer), checkpoint_size(model, optimizer)
        assert actual <= after <= actual + ckpt.MARGIN_BYTES + 64 * ckpt.PER_TENSOR_BYTES
        assert abs(before - after) <= 16 * ckpt.PER_TENSOR_BYTES  # the estimate before the step is as good

    def test_torch_save_on_a_full_disk_names_the_size(self, small_fs):
        last = small_fs.path / ckpt.LAST_NAME
        ckpt.atomic_torch_save({"epoch": 1, "w": torch.ones(1000)}, last)
        weights = {"epoch": 2, "w": torch.ones(100_000)}  # 400 KB: more than the 256 KiB file system
        with pytest.raises(DiskFullError) as caught:  # torch alone says "unexpected pos"
            ckpt.save_keeping_previous(weights, last)
        assert caught.value.path == last and "needs at least" in str(caught.value)
        assert small_fs.stray_files() == []
        # The last checkpoint had been moved aside: --resume auto finds it there.
        assert ckpt.resolve_resume("auto", small_fs.path, warn=lambda m: None) == small_fs.path / ckpt.PREVIOUS_NAME

    def test_save_refused_before_anything_moves(self, tmp_path, monkeypatch):
        last = tmp_path / ckpt.LAST_NAME
        ckpt.save_keeping_previous({"epoch": 1}, last)
        ckpt.save_keeping_previous({"epoch": 2}, last)
        previous_size = (tmp_path / ckpt.PREVIOUS_NAME).stat().st_size
        monkeypatch.setattr(os, "statvfs", fake_statvfs(4096 * 10))
        assert ckpt.reclaimed_by_save(last) == previous_size
        with pytest.raises(DiskFullError) as caught:
            ckpt.save_keeping_previous({"epoch": 3}, last, size=10**6)
        assert (caught.value.needed, caught.value.free) == (10**6, 4096 * 10 + previous_size)
        assert "needs about 1,000,000 bytes" in str(caught.value)
        assert torch.load(last)["epoch"] == 2 and torch.load(tmp_path / ckpt.PREVIOUS_NAME)["epoch"] == 1
        ckpt.save_keeping_previous({"epoch": 3}, last, size=4096)  # fits: saved as before
        assert torch.load(last)["epoch"] == 3

    def test_best_is_a_hard_link_or_a_copy(self, tmp_path, monkeypatch):
        last, best = tmp_path / ckpt.LAST_NAME, tmp_path / ckpt.BEST_NAME
        ckpt.atomic_torch_save({"epoch": 1}, last)
        ckpt.atomic_link(last, best)
        assert best.stat().st_ino == last.stat().st_ino
        ckpt.save_keeping_previous({"epoch": 2}, last)  # best keeps epoch 1, which is now the previous one
        assert torch.load(best)["epoch"] == 1 and ckpt.reclaimed_by_save(last) == 0
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links here")))
        ckpt.atomic_link(last, best)
        assert torch.load(best)["epoch"] == 2 and best.stat().st_ino != last.stat().st_ino
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.LAST_NAME, ckpt.PREVIOUS_NAME, ckpt.BEST_NAME])

    def test_room_for_two_checkpoints(self, tmp_path, monkeypatch):
        monkeypatch.setattr(os, "statvfs", fake_statvfs(4096 * 100))
        assert ckpt.room_problem(tmp_path, 4096 * 50) is None
        problem = ckpt.room_problem(tmp_path, 4096 * 51)
        assert problem == (f"{tmp_path}: no room for two checkpoints of about 208,896 bytes (204.0 KiB): "
                           f"417,792 bytes (408.0 KiB) needed, 409,600 bytes (400.0 KiB) free")
        (tmp_path / ckpt.LAST_NAME).write_bytes(b"\0" * 8192)  # replaced by the run: counts as room
        assert ckpt.room_problem(tmp_path, 4096 * 51) is None


# ---- TensorBoard ---------------------------------------------------------------------------------------
class TestTensorBoard:
    def test_full_disk_stops_logging_with_one_warning(self, small_fs, capfd, monkeypatch):
        monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # the logger quiets TensorBoard's thread
        small_fs.fill(leave=0)
        logger = RunLogger(small_fs.path / "tb")
        for step in range(3):
            logger.scalar("train/loss", 1.0, step)
        logger.close()
        err = capfd.readouterr().err
        line = one_line(err)
        assert line.startswith(f"warning: TensorBoard logging stops: {small_fs.path / 'tb'}: no space left on device")
        assert FREE.search(line) and logger.writer is None

    @pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
    def test_write_errors_from_the_writer(self, tmp_path, code, capsys):
        logger = RunLogger(None)
        logger.log_dir = tmp_path
        logger.writer = SimpleNamespace(add_scalar=lambda *a: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        logger.scalar("train/loss", 1.0, 1)
        assert logger.writer is None and os.strerror(code).lower() in capsys.readouterr().err
        logger.writer = SimpleNamespace(add_scalar=lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
        with pytest.raises(OSError, match="I/O"):
            logger.scalar("train/loss", 1.0, 2)


# ---- train.py -----------------------------------------------------------------------------------------
@pytest.mark.slow
class TestTrain:
    def test_refuses_an_output_folder_without_room_for_two_checkpoints(self, tiny, small_fs, capsys):
        out = small_fs.path / "run"
        assert train.main(argv_for(tiny, out, "--optim.epochs", "1")) == 2
        message = capsys.readouterr().err
        assert f"util.output_dir {out}: no room for two checkpoints of about" in message
        assert "needed," in message and "free" in message and "Traceback" not in message
        assert not (out / "config.yaml").exists() and small_fs.stray_files() == []

    def test_disk_filling_up_stops_at_the_save_and_resumes(self, tiny, small_fs, monkeypatch, capsys):
        small_fs.resize(8 * 1024)  # two checkpoints of this model fit (about 1.3 MB each)
        out = small_fs.path / "run"
        argv = argv_for(tiny, out)
        original = train.train_one_epoch

        def fill_during_epoch_2(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs):
            if epoch == 1:
                small_fs.fill(leave=64 * KIB)  # room for the logs, not for a checkpoint
            return original(model, loader, optimizer, schedule, scaler, cfg, epoch, *args, **kwargs)

        monkeypatch.setattr(train, "train_one_epoch", fill_during_epoch_2)
        assert train.main(argv) == DISK_FULL_EXIT
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"train.py: {out / ckpt.LAST_NAME}: no space left on device: needs about")
        assert FREE.search(message) and "--resume auto" in message
        assert torch.load(out / ckpt.LAST_NAME, weights_only=False)["epoch"] == 1  # untouched
        assert small_fs.stray_files() == []
        monkeypatch.undo()
        (small_fs.path / "filler").unlink()  # space freed: --resume auto repeats only epoch 2
        assert train.main(argv + ["--resume", "auto"]) == 0
        assert torch.load(out / ckpt.LAST_NAME, weights_only=False)["epoch"] == 2
