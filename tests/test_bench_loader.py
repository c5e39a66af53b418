"""tools/bench_loader.py end to end on a tiny generated data set: it runs, and its JSON is
consistent with itself. No speed is asserted (speed is the script's output, not a test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import bench_loader

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_loader.py"


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_three_loaders_and_their_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run_tool("--images", "16", "--batch-size", "8", "--image-size", "32", "--workers", "1",
                      "--rounds", "2", "--json", str(out), "--plot", str(tmp_path / "bench.png"))
    assert result.returncode == 0, result.stderr
    result = json.loads(out.read_text())
    rates = result["images_per_s"]
    assert set(rates) == {"a_dali_relabel", "b_dali_no_labels", "c_official_torch"}
    assert all(rate > 0 for rate in rates.values())
    assert result["images"] == 16 and len(result["images_per_s_per_round"]) == 2
    assert result["a_over_c"] == pytest.approx(rates["a_dali_relabel"] / rates["c_official_torch"])
    assert result["a_over_b"] == pytest.approx(rates["a_dali_relabel"] / rates["b_dali_no_labels"])
    for ratio, (top, bottom) in {"a_over_c": ("a_dali_relabel", "c_official_torch"),
                                 "a_over_b": ("a_dali_relabel", "b_dali_no_labels")}.items():
        expected = [r[top] / r[bottom] for r in result["images_per_s_per_round"]]
        assert result[f"{ratio}_per_round"] == pytest.approx(expected)
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_data_arguments_come_together(capsys):
    # In this process: the tool's own process would spend seconds importing torch and DALI only to
    # reject the arguments (its __main__ path is the test above's).
    with pytest.raises(SystemExit) as exit:
        bench_loader.main(["--data", "somewhere"])
    assert exit.value.code == 2 and "--data needs --labels and --pt" in capsys.readouterr().err


class TestClock:
    """On a GPU a batch is handed over before the device has made it: the clock waits for it."""

    @pytest.fixture
    def synchronized(self, monkeypatch):
        calls = []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
        return calls

    def test_cuda_synchronizes_before_each_reading(self, synchronized):
        bench_loader.clock("cuda")
        bench_loader.clock("cuda:1")
        assert len(synchronized) == 2

    def test_cpu_does_not(self, synchronized):
        bench_loader.clock("cpu")
        assert synchronized == []

    @pytest.mark.parametrize("device,per_turn", [("cuda", 2), ("cpu", 0)])
    def test_time_loaders_reads_the_clock_after_the_device(self, synchronized, device, per_turn):
        loaders = {"x": lambda: iter([4, 4]), "y": lambda: iter([2])}
        rates, per_round = bench_loader.time_loaders(loaders, rounds=3, device=device)
        assert len(synchronized) == per_turn * 3 * len(loaders)  # at the start and at the end of each turn
        assert set(rates) == {"x", "y"} and len(per_round) == 3 and all(rate > 0 for rate in rates.values())
