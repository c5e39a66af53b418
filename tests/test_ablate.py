"""tools/ablate.py: real train.py runs on a tiny dataset (1 seed, 1 epoch), the table's numbers
against each run's own metrics.json and checkpoint, reruns that keep finished runs, failure paths."""
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny
from PIL import Image

from tools import ablate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """18 training and 9 validation JPEGs (40x40, a dominant colour per class) with 3x4x4 label maps."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), size=(40, 40), train=6, val=3, cells=4)


def overrides(root: Path, *extra: str) -> list[str]:
    return ["--data.data_path", str(root), "--data.relabel.path", str(root / "labels"),
            "--data.class_map", "folder", "--data.num_classes", "3", "--data.image_size", "32",
            "--model.arch", "mobilenet_v3_small", "--model.kwargs", "{width_mult: 0.25}",
            "--optim.batch_size", "6", "--optim.lr.base_batch_size", "6", "--util.val_batch_size", "9",
            "--optim.epochs", "1", "--optim.warmup.epochs", "0", "--data.num_threads", "1",
            "--data.py_workers", "1", "--compute.device", "cpu", "--util.tensorboard", "false", *extra]


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table -> {method: cells}, the method being the backquoted second column."""
    rows = {}
    for line in text.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[1].strip("`")] = cells
    return rows


@pytest.fixture(scope="module")
def ablation(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    argv = ["--seeds", "1", "--first-seed", "3", "--out", str(out), "--", *overrides(tiny)]
    assert ablate.main(argv) == 0
    return out, argv


@pytest.mark.slow
class TestAblation:
    def test_every_method_ran_with_its_own_label_settings(self, ablation):
        out, _ = ablation
        for method in ablate.METHODS:
            state = torch.load(out / method / "seed3" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
            relabel = state["config"]["data"]["relabel"]
            assert relabel["use"] is (method != "onehot")
            if method != "onehot":
                assert relabel["pool_mode"] == method
            assert state["config"]["compute"]["seed"] == 3
            assert state["epoch"] == 1

    def test_table_and_json_numbers_are_each_runs_metrics_file(self, ablation):
        out, _ = ablation
        rows = table_rows((out / "table.md").read_text())
        record = json.loads((out / "results.json").read_text())
        assert sorted(rows) == sorted(ablate.METHODS)
        assert len(record["runs"]) == len(ablate.METHODS)
        for run in record["runs"]:
            metrics = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
            state = torch.load(Path(run["run_dir"]) / "checkpoint-last.pth", map_location="cpu", weights_only=False)
            top1, top5 = metrics["top1"], metrics["top5"]
            assert (top1, top5) == (state["metrics"]["top1"], state["metrics"]["top5"]) and metrics["epoch"] == 1
            # 9 validation images: every accuracy is a multiple of 100/9.
            assert round(top1 * 9 / 100, 6) == round(top1 * 9 / 100)
            assert 0.0 <= top1 <= top5 <= 100.0
            assert run["top1"] == pytest.approx(top1) and run["top5"] == pytest.approx(top5)
            cells = rows[run["method"]]
            assert cells[2] == "1"
            assert cells[3] == f"{top1:.2f}" and cells[4] == f"{top5:.2f}"  # one seed: no spread shown
            assert cells[5] == f"{top1:.2f}"
        assert rows["softmax"][6] == "78.9" and rows["onehot"][6] == "77.5" and rows["argmax"][6] == "n/a"

    def test_chart_is_a_png(self, ablation):
        out, _ = ablation
        with Image.open(out / "chart.png") as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200

    def test_rerun_keeps_finished_runs(self, ablation, capsys):
        out, argv = ablation
        checkpoints = sorted(out.glob("*/seed3/checkpoint-last.pth"))
        before = [p.stat().st_mtime_ns for p in checkpoints]
        assert ablate.main(argv) == 0
        assert [p.stat().st_mtime_ns for p in checkpoints] == before
        assert capsys.readouterr().out.count("kept from an earlier run") == len(ablate.METHODS)

    def test_run_folder_with_other_settings_is_refused(self, ablation, tiny, capsys):
        out, _ = ablation
        argv = ["--seeds", "1", "--first-seed", "3", "--methods", "argmax", "--out", str(out),
                "--", *overrides(tiny, "--optim.lr.init", "0.05")]
        assert ablate.main(argv) == ablate.EXIT_USAGE
        error = capsys.readouterr().err
        assert "other settings" in error and "optim.lr.init" in error and "argmax" in error

    def test_finished_run_without_metrics_file_is_refused(self, ablation, capsys):
        out, argv = ablation
        metrics = out / "global_argmax" / "seed3" / "metrics.json"
        kept = metrics.with_name("metrics.kept")
        metrics.rename(kept)
        try:
            assert ablate.main(["--methods", "global_argmax", *argv]) == ablate.EXIT_USAGE
        finally:
            kept.rename(metrics)
        assert "metrics.json: unreadable" in capsys.readouterr().err

    def test_failed_training_run_exits_1(self, tiny, tmp_path, capsys):
        argv = ["--seeds", "1", "--methods", "softmax", "--out", str(tmp_path),
                "--", *overrides(tiny, "--data.relabel.path", str(tmp_path / "no_labels"))]
        assert ablate.main(argv) == ablate.EXIT_FAILED
        assert "train.py exited with" in capsys.readouterr().err
        assert (tmp_path / "softmax" / "seed0" / "train.log").is_file()


def result(method, seed, top1, top5):
    return ablate.RunResult(method, seed, top1, top5, 1, f"runs/{method}/seed{seed}")


class TestSummary:
    def test_mean_and_sample_std_per_method(self):
        results = [result("softmax", s, t1, t5) for s, (t1, t5) in enumerate([(90.0, 99.0), (92.5, 98.0), (94.0, 100.0)])]
        results += [result("onehot", 0, 80.0, 95.0)]
        rows = ablate.summarize(results, ["softmax", "onehot"])
        assert rows[0]["top1_mean"] == pytest.approx(np.mean([90.0, 92.5, 94.0]))
        assert rows[0]["top1_std"] == pytest.approx(np.std([90.0, 92.5, 94.0], ddof=1))
        assert rows[0]["top5_std"] == pytest.approx(np.std([99.0, 98.0, 100.0], ddof=1))
        assert rows[1]["top1_std"] is None and rows[1]["runs"] == 1
        cells = table_rows(ablate.markdown_table(rows))
        assert cells["softmax"][3] == f"{statistics.fmean([90.0, 92.5, 94.0]):.2f} ± {np.std([90.0, 92.5, 94.0], ddof=1):.2f}"
        assert cells["softmax"][5] == "90.00, 92.50, 94.00"
        assert cells["onehot"][3] == "80.00"


class TestArguments:
    @pytest.mark.parametrize("argv, message", [
        (["--seeds", "0"], "--seeds must be positive"),
        (["--methods", "softmax", "softmax"], "lists a method twice"),
        (["--methods", "mean"], "invalid choice"),
        (["--config", "no/such.yaml"], "no such file"),
    ])
    def test_bad_arguments(self, argv, message, capsys):
        with pytest.raises(SystemExit) as exit_info:
            ablate.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    def test_unknown_train_setting_is_refused_before_training(self, tmp_path, capsys):
        assert ablate.main(["--out", str(tmp_path), "--", "--optim.epochz", "1"]) == ablate.EXIT_USAGE
        assert "optim.epochz" in capsys.readouterr().err
        assert not any(tmp_path.iterdir())

    def test_overrides_after_separator_reach_every_run(self):
        args, extra = ablate.parse_args(["--seeds", "2", "--", "--optim.epochs", "2"])
        assert args.seeds == 2 and extra == ["--optim.epochs", "2"]
        argv = ablate.train_argv(Path("c.yaml"), "onehot", 1, Path("o"), extra)
        assert argv[argv.index("--optim.epochs") + 1] == "2"
        assert argv[argv.index("--data.relabel.use") + 1] == "false"
        assert argv[argv.index("--compute.seed") + 1] == "1"
