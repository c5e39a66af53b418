"""util.trace_ranks (relabel_dali/train/trace.py): what a rank consumed in an epoch and a digest of its
parameters, written per epoch and rank."""
import json

import pytest
import torch

from relabel_dali.train.distributed import DistEnv
from relabel_dali.train.trace import RankTrace, parameters_sha256, trace_path


class Loader:
    """Three batches of dataset indices, as the training loader yields them."""

    def __init__(self):
        self.batches = [{"indices": torch.tensor([4, 1])}, {"indices": torch.tensor([7, 0])},
                        {"indices": torch.tensor([3, 5])}]
        self.epoch = 2

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class TestRankTrace:
    def test_records_what_the_epoch_consumed(self, tmp_path, monkeypatch):
        monkeypatch.setenv("GROUP_RANK", "1")
        trace = RankTrace(tmp_path, DistEnv(rank=3, world_size=4, local_rank=1, device=torch.device("cpu")))
        loader = trace.recording(Loader())
        assert len(loader) == 3 and loader.epoch == 2  # the loader's own attributes pass through
        assert [b["indices"].tolist() for b in loader] == [[4, 1], [7, 0], [3, 5]]
        model = torch.nn.Linear(2, 1)
        path = trace.epoch_done(5, model)
        assert path == trace_path(tmp_path, 5, 3) == tmp_path / "ranks" / "epoch-0005-rank-0003.json"
        record = json.loads(path.read_text())
        assert {k: record[k] for k in ("epoch", "rank", "world_size", "local_rank", "node_rank", "samples")} == \
            {"epoch": 5, "rank": 3, "world_size": 4, "local_rank": 1, "node_rank": 1, "samples": 6}
        assert record["indices"] == [4, 1, 7, 0, 3, 5] and record["params_sha256"] == parameters_sha256(model)
        list(trace.recording(Loader()))  # the next epoch starts a new list
        assert trace.indices == [4, 1, 7, 0, 3, 5]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_digest_changes_with_any_bit(self, dtype):
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(dtype)
        before = parameters_sha256(model)
        model[1].running_mean += 1  # a buffer, not a parameter: under DDP it is each rank's own
        assert parameters_sha256(model) == before
        with torch.no_grad():
            bits = model[0].weight.view(torch.int16 if dtype != torch.float32 else torch.int32)
            bits[0, 0] ^= 1  # the lowest bit of one value
        assert parameters_sha256(model) != before
