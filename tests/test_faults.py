"""Fault injection, end to end: every way a dataset, shard or checkpoint goes wrong is refused or
reported by name, never trained on in silence. One class per failure mode of docs/FAILURES.md."""
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from relabel_dali import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import pack_labels  # noqa: E402
from test_pack_labels import make_tree  # noqa: E402


def pack(src, out, *extra):
    return pack_labels.main([str(src), str(out), *map(str, extra)])


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
