"""Top-k and ReaL accuracy: counts against brute force, hand-checked ReaL cases, exact sums across ranks."""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from relabel_dali.train.metrics import AccuracyMeter, RealLabels, load_real_labels, real_positions, topk_correct


def brute_topk(logits, labels, k):
    return sum(int(label in np.argsort(-row, kind="stable")[:k]) for row, label in zip(logits, labels))


class TestTopK:
    @pytest.mark.parametrize("batch, classes", [(1, 5), (17, 10), (64, 1000)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_against_brute_force(self, batch, classes, dtype):
        gen = torch.Generator().manual_seed(batch + classes)
        logits = torch.randn(batch, classes, generator=gen).to(dtype)
        labels = torch.randint(classes, (batch,), generator=gen)
        got = topk_correct(logits, labels).tolist()
        assert got == [brute_topk(logits.numpy(), labels.numpy(), k) for k in (1, 5)]

    def test_fewer_classes_than_k(self):
        logits, labels = torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, 0])
        assert topk_correct(logits, labels).tolist() == [1, 2]


class TestRealLabels:
    KEYS = ["n2/val_0003", "n1/val_0001", "n1/val_0004", "n2/val_0002", "n3/val_0005"]

    def test_positions_follow_sorted_file_names(self):
        # Sorted file names: val_0001 (n1), val_0002 (n2), val_0003 (n2), val_0004 (n1), val_0005 (n3).
        assert real_positions(self.KEYS) == [2, 0, 3, 1, 4]

    def test_hand_checked_accuracy(self, tmp_path):
        # ReaL entries in sorted-file-name order: val_0001..val_0005.
        path = tmp_path / "real.json"
        path.write_text(json.dumps([[1, 2], [], [0], [3, 4], [4]]))
        real = RealLabels(load_real_labels(path), self.KEYS)
        # Predictions per sample in loader (KEYS) order: val_0003 -> 0 (ok), val_0001 -> 2 (ok),
        # val_0004 -> 0 (wrong: {3, 4}), val_0002 -> 7 (excluded: empty), val_0005 -> 4 (ok).
        logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 0, 7, 4]), 8).float()
        assert real.correct(logits, torch.arange(5)).tolist()[:2] == [3, 4]
        meter = AccuracyMeter(real=real)
        meter.update(logits, torch.tensor([0, 1, 0, 7, 4]), torch.arange(5))
        summary = meter.summary()
        assert summary["real_top1"] == pytest.approx(75.0) and summary["real_samples"] == 4
        # Own label on the 4 counted images: val_0003 0/0 ok, val_0001 2/1 no, val_0004 0/0 ok, val_0005 4/4 ok.
        assert summary["real_label_top1"] == pytest.approx(75.0)
        # Single-label top-1: 4 of 5 (only sample 1, label 1 predicted 2, is wrong).
        assert summary["top1"] == pytest.approx(80.0) and summary["samples"] == 5

    def test_recall_at_2_counts_each_listed_class(self):
        # Two images, classes {1, 2} and {0, 3}; top-2 of the first {2, 1} (both found), of the second {3, 4} (one).
        real = RealLabels([[1, 2], [0, 3]], ["a/val_0001", "a/val_0002"])
        logits = torch.tensor([[0.0, 0.5, 0.9, 0.1, 0.0], [0.1, 0.0, 0.0, 0.9, 0.5]])
        counts = real.correct(logits, torch.tensor([0, 1]), torch.tensor([1, 0])).tolist()
        # top-1 2 in {1, 2} yes, 3 in {0, 3} yes; own label: 2 != 1, 3 != 0; found 2 + 1 of 4 listed.
        assert counts == [2, 2, 0, 3, 4]
        meter = AccuracyMeter(real=real)
        meter.update(logits, torch.tensor([1, 0]), torch.tensor([0, 1]))
        summary = meter.summary()
        assert summary["real_recall2"] == pytest.approx(75.0) and summary["real_label_top1"] == 0.0
        assert summary["real_top1"] == 100.0 and summary["top1"] == 0.0

    def test_recall_with_padding_and_empty_entries(self):
        # Entries of different lengths: the table is padded with -1, which never matches a class.
        real = RealLabels([[0], [], [1, 2, 3]], ["a/val_1", "a/val_2", "a/val_3"])
        logits = torch.tensor([[0.0, 0.9, 0.8, 0.0], [0.9, 0.0, 0.0, 0.8], [0.0, 0.0, 0.8, 0.9]])
        meter = AccuracyMeter(real=real)
        meter.update(logits, torch.tensor([0, 0, 1]), torch.arange(3), valid=torch.tensor([True, True, True]))
        summary = meter.summary()
        # Counted: val_1 (top-2 {1, 2}: 0 missing) and val_3 (top-2 {3, 2}: 2 of 3 found): 2 of 4 listed.
        assert summary["real_samples"] == 2 and summary["real_recall2"] == pytest.approx(50.0)
        assert summary["real_top1"] == pytest.approx(50.0)

    def test_duplicate_file_names(self):
        with pytest.raises(ValueError, match="'val_0001' occurs in two folders"):
            real_positions(["a/val_0001", "b/val_0001"])

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="data.real_labels has 1 entries, the validation set 2 images"):
            RealLabels([[1]], ["a/x", "a/y"])

    @pytest.mark.parametrize("text, message", [
        ('{"a": 1}', "holds a dict, expected a list of lists"),
        ("[[1], [2, -1]]", r"entry 1 is \[2, -1\]"),
        ("[[1], 3]", "entry 1 is 3"),
        ("[[1", "not valid JSON"),
    ])
    def test_bad_json(self, tmp_path, text, message):
        path = tmp_path / "real.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_real_labels(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="data.real_labels: .*nope.json does not exist"):
            load_real_labels(tmp_path / "nope.json")

    def test_meter_needs_indices(self):
        meter = AccuracyMeter(real=RealLabels([[0]], ["a/x"]))
        with pytest.raises(ValueError, match="needs the validation sample indices"):
            meter.update(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


class TestAccuracyMeter:
    def test_padding_is_not_counted(self):
        logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 0]), 3).float()
        meter = AccuracyMeter()
        meter.update(logits, torch.tensor([1, 0, 0, -1]), valid=torch.tensor([True, True, True, False]))
        assert meter.summary() == {"top1": pytest.approx(200 / 3), "top5": 100.0, "samples": 3}


def _rank_meter(rank, world_size, init_file, logits, labels, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    meter = AccuracyMeter()
    # Uneven shards with padding: each rank masks what is not its own.
    mine = torch.arange(len(labels)) % world_size == rank
    meter.update(logits, labels, valid=mine)
    torch.save(meter.summary(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


class TestDistributedSum:
    def test_two_ranks_equal_one_process(self, tmp_path):
        gen = torch.Generator().manual_seed(3)
        logits, labels = torch.randn(11, 6, generator=gen), torch.randint(6, (11,), generator=gen)
        mp.start_processes(_rank_meter, args=(2, str(tmp_path / "init"), logits, labels, str(tmp_path)),
                           nprocs=2, start_method="spawn")
        single = AccuracyMeter()
        single.update(logits, labels)
        expected = single.summary()
        for rank in range(2):
            assert torch.load(tmp_path / f"rank{rank}.pt") == expected
