"""Checkpoints: atomic writes, weight loading in our and the official layout, RNG state, resume lookup."""
import random

import numpy as np
import pytest
import torch

from relabel_dali.train import checkpoint as ckpt


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class TestAtomicSave:
    def test_round_trip_and_no_temp_left(self, tmp_path):
        path = tmp_path / "run" / "checkpoint-last.pth"
        ckpt.atomic_torch_save({"epoch": 3, "weights": torch.arange(5)}, path)
        loaded = ckpt.load_checkpoint(path)
        assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.arange(5))
        assert [p.name for p in path.parent.iterdir()] == [path.name]

    def test_failed_save_keeps_previous(self, tmp_path, monkeypatch):
        path = tmp_path / "checkpoint-last.pth"
        ckpt.atomic_torch_save({"epoch": 1}, path)

        def broken_save(obj, handle):
            handle.write(b"half a checkpoint")
            raise OSError("disk full")

        monkeypatch.setattr(ckpt.torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            ckpt.atomic_torch_save({"epoch": 2}, path)
        monkeypatch.undo()
        assert ckpt.load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == [path.name]

    def test_atomic_copy(self, tmp_path):
        ckpt.atomic_torch_save({"epoch": 4}, tmp_path / "a.pth")
        ckpt.atomic_copy(tmp_path / "a.pth", tmp_path / "b.pth")
        assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()


class TestLoadWeights:
    @pytest.mark.parametrize("layout", ["ours", "official", "official_prefixed", "bare", "bare_prefixed"])
    def test_layouts(self, tmp_path, layout):
        source = small_model(seed=1)
        state = source.state_dict()
        prefixed = {f"module.{k}": v for k, v in state.items()}
        content = {"ours": {"model": state, "epoch": 2}, "official": {"state_dict": state, "arch": "x"},
                   "official_prefixed": {"state_dict": prefixed, "epoch": 90}, "bare": state,
                   "bare_prefixed": prefixed}[layout]
        torch.save(content, tmp_path / "w.pth")
        target = small_model(seed=2)
        assert not same_weights(source, target)
        ckpt.load_model_weights(target, tmp_path / "w.pth")
        assert same_weights(source, target)

    def test_mismatch_names_parameters(self, tmp_path):
        torch.save({"state_dict": {"fc.weight": torch.zeros(2)}}, tmp_path / "w.pth")
        with pytest.raises(ValueError, match=r"w\.pth: weights do not fit model: missing \['0\.weight'"):
            ckpt.load_model_weights(small_model(), tmp_path / "w.pth")

    @pytest.mark.parametrize("content, message", [
        ([1, 2], "holds a list, expected a dict"),
        ({"epoch": 3}, r"no 'model' or 'state_dict' entry"),
    ])
    def test_not_a_checkpoint(self, tmp_path, content, message):
        torch.save(content, tmp_path / "w.pth")
        with pytest.raises(ValueError, match=message):
            ckpt.load_model_weights(small_model(), tmp_path / "w.pth")

    def test_unreadable(self, tmp_path):
        (tmp_path / "w.pth").write_bytes(b"not a pickle")
        with pytest.raises(ValueError, match=r"w\.pth cannot be read"):
            ckpt.load_checkpoint(tmp_path / "w.pth")

    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pth does not exist"):
            ckpt.load_checkpoint(tmp_path / "nope.pth")


class TestRngState:
    def test_restores_every_generator(self):
        state = ckpt.rng_state()
        first = (random.random(), float(np.random.rand()), torch.rand(3))
        ckpt.set_rng_state(state)
        again = (random.random(), float(np.random.rand()), torch.rand(3))
        assert first[:2] == again[:2] and torch.equal(first[2], again[2])


class TestResolveResume:
    def test_auto_without_checkpoint_starts_fresh(self, tmp_path):
        assert ckpt.resolve_resume("auto", tmp_path) is None

    def test_auto_finds_last(self, tmp_path):
        ckpt.atomic_torch_save({"epoch": 1}, tmp_path / ckpt.LAST_NAME)
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / ckpt.LAST_NAME

    def test_auto_with_only_damaged_checkpoints_names_them(self, tmp_path):
        (tmp_path / ckpt.LAST_NAME).write_bytes(b"x")
        with pytest.raises(ValueError, match="no intact checkpoint .*checkpoint-last.pth is not a complete"):
            ckpt.resolve_resume("auto", tmp_path)

    def test_damaged_explicit_path(self, tmp_path):
        (tmp_path / "a.pth").write_bytes(b"x")
        with pytest.raises(ValueError, match="--resume .*a.pth: not a complete checkpoint"):
            ckpt.resolve_resume(str(tmp_path / "a.pth"), tmp_path)

    def test_save_keeping_previous(self, tmp_path):
        for epoch in (1, 2, 3):
            ckpt.save_keeping_previous({"epoch": epoch}, tmp_path / ckpt.LAST_NAME)
        assert ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)["epoch"] == 3
        assert ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS_NAME)["epoch"] == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST_NAME, ckpt.PREVIOUS_NAME]

    def test_none(self, tmp_path):
        assert ckpt.resolve_resume(None, tmp_path) is None

    def test_missing_path(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="--resume .*nope.pth: no such checkpoint"):
            ckpt.resolve_resume(str(tmp_path / "nope.pth"), tmp_path)
