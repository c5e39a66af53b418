"""tools/ablate.py: real train.py runs on a tiny dataset (1 seed, 1 epoch), the table's numbers
against each run's own metrics.json and checkpoint, reruns that keep finished runs, failure paths;
the paired statistics, the pinned CPU environment, and the published reports against their copies
in the documents."""
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, write_tiny
from PIL import Image

from tools import ablate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """18 training and 9 validation JPEGs (40x40, a dominant colour per class) with 3x4x4 label maps;
    ReaL entries name two classes for every third validation image (the demo's composites)."""
    root = write_tiny(tmp_path_factory.mktemp("tiny"), size=(40, 40), train=6, val=3, cells=4)
    names = sorted(f"{w}_val_{i:03d}" for w in CLASSES for i in range(3))
    real = [sorted({CLASSES.index(n.split("_")[0]), (CLASSES.index(n.split("_")[0]) + 1) % 3}) if n.endswith("2") else []
            for n in names]
    (root / "real.json").write_text(json.dumps(real))
    return root


def overrides(root: Path, *extra: str) -> list[str]:
    return ["--data.data_path", str(root), "--data.relabel.path", str(root / "labels"),
            "--data.real_labels", str(root / "real.json"),
            "--data.class_map", "folder", "--data.num_classes", "3", "--data.image_size", "32",
            "--model.arch", "mobilenet_v3_small", "--model.kwargs", "{width_mult: 0.25}",
            "--optim.batch_size", "6", "--optim.lr.base_batch_size", "6", "--util.val_batch_size", "9",
            "--optim.epochs", "1", "--optim.warmup.epochs", "0", "--data.num_threads", "1",
            "--data.py_workers", "1", "--compute.device", "cpu", "--util.tensorboard", "false", *extra]


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``: rows of cells, the header first, the rule left out."""
    tables, current = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = [cells]
            elif not set(line) <= set("|-: "):
                current.append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def table_rows(text: str) -> dict[str, list[str]]:
    """The report's main table -> {method: cells}, the method being the backquoted second column."""
    (main,) = [t for t in markdown_tables(text) if t[0][:2] == ["labels", "method"]]
    return {cells[1].strip("`"): cells for cells in main[1:]}


# The training runs below take the tool's CPU pin with one OpenMP/MKL thread instead of two. Beside
# the other pytest worker, two threads per run made each tiny run 2-3x slower (train.py on the
# ablation's tiny set with the other core busy: 18-32 s against 7-12 s wall) for the same checks.
# What is tested is unchanged: the pin reaching the runs, being recorded and compared; the pin's
# own values (two threads) are TestPinnedEnvironment's.
ONE_THREAD_PIN = {**ablate.PINNED_CPU_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread_pin(monkeypatch):
    monkeypatch.setattr(ablate, "PINNED_CPU_ENV", ONE_THREAD_PIN)


@pytest.fixture(scope="module")
def ablation(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    argv = ["--seeds", "1", "--first-seed", "3", "--out", str(out), "--", *overrides(tiny)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ablate, "PINNED_CPU_ENV", ONE_THREAD_PIN)
        assert ablate.main(argv) == 0
    return out, argv


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread_pin")
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
            # 9 validation images: every accuracy is a multiple of 100/9; 3 of them composites.
            assert round(top1 * 9 / 100, 6) == round(top1 * 9 / 100)
            assert 0.0 <= top1 <= top5 <= 100.0
            assert metrics["real_samples"] == run["real_samples"] == 3 and run["samples"] == 9
            assert round(metrics["real_top1"] * 3 / 100, 6) == round(metrics["real_top1"] * 3 / 100)
            assert round(metrics["real_recall2"] * 6 / 100, 6) == round(metrics["real_recall2"] * 6 / 100)
            assert run["top1"] == pytest.approx(top1) and run["top5"] == pytest.approx(top5)
            cells = rows[run["method"]]
            assert cells[2] == "1"
            assert cells[3] == f"{top1:.2f}" and cells[7] == f"{top5:.2f}"  # one seed: no spread shown
            assert cells[5] == f"{metrics['real_top1']:.2f}" and cells[6] == f"{metrics['real_recall2']:.2f}"
            # Single-object images: the 6 without a ReaL entry; correct = all correct - composites correct.
            single = (round(top1 * 9 / 100) - round(metrics["real_label_top1"] * 3 / 100)) / 6 * 100
            assert cells[4] == f"{single:.2f}" and run["single_top1"] == pytest.approx(single)
        assert rows["softmax"][8] == "78.9" and rows["onehot"][8] == "77.5" and rows["argmax"][8] == "n/a"

    def test_report_names_commit_machine_and_pin(self, ablation):
        out, _ = ablation
        text = (out / "table.md").read_text()
        record = json.loads((out / "results.json").read_text())
        assert re.fullmatch(r"[0-9a-f]{12}", record["code"]["commit"])
        assert f"Commit `{record['code']['commit']}`" in text
        assert record["machine"]["cpu"] in text and f"{os.cpu_count()} cores" in text
        assert record["cpu_env"] == ablate.PINNED_CPU_ENV and "`ATEN_CPU_CAPABILITY=avx2`" in text
        assert record["machine"]["torch_capability"] in ("AVX2", "DEFAULT")  # the pin reached the child
        assert "9 validation images" in text and "3 of them two-object composites" in text

    def test_runs_got_the_pinned_environment(self, ablation):
        out, _ = ablation
        identity = json.loads((out / "softmax" / "seed3" / ablate.IDENTITY_NAME).read_text())
        assert identity["cpu_env"] == ablate.PINNED_CPU_ENV
        assert set(identity["inputs"]) == {"labels", "real_labels"}
        assert set(json.loads((out / "onehot" / "seed3" / ablate.IDENTITY_NAME).read_text())["inputs"]) == {"real_labels"}

    def test_paired_comparison_is_in_the_report(self, ablation):
        out, _ = ablation
        record = json.loads((out / "results.json").read_text())
        runs = {r["method"]: r for r in record["runs"]}
        pairs = {p["method"]: p for p in record["paired"]}
        assert sorted(pairs) == sorted(set(ablate.METHODS) - {"onehot"})
        for method, pair in pairs.items():
            assert pair["top1"]["differences"] == [pytest.approx(runs[method]["top1"] - runs["onehot"]["top1"])]
            assert pair["real_recall2"]["n"] == 1 and pair["top1"]["ci95"] is None
        (paired_table,) = [t for t in markdown_tables((out / "table.md").read_text()) if t[0][0].startswith("minus one-hot")]
        assert len(paired_table) == 5 and "one seed, no interval" in (out / "table.md").read_text()

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

    def test_stale_run_is_replaced_when_asked(self, ablation, tmp_path, capsys):
        # The module's finished one-hot run is the run made with the old settings (no training of
        # its own here); it is put back afterwards for the tests below.
        out, argv = ablation
        run, kept = out / "onehot", tmp_path / "onehot"
        shutil.copytree(run, kept)
        try:
            argv = ["--methods", "onehot", *argv]
            assert ablate.main(argv) == 0
            assert "kept from an earlier run" in capsys.readouterr().out
            changed = [*argv, "--optim.lr.init", "0.05"]
            assert ablate.main(changed) == ablate.EXIT_USAGE
            assert ablate.main(["--replace-stale", *changed]) == 0
            assert "replacing" in capsys.readouterr().out
            state = torch.load(run / "seed3" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
            assert state["config"]["optim"]["lr"]["init"] == 0.05
        finally:
            shutil.rmtree(run)
            shutil.move(kept, run)

    def test_run_made_with_other_cpu_settings_is_refused(self, ablation, capsys):
        out, argv = ablation
        assert ablate.main(["--no-pin", "--methods", "argmax", *argv]) == ablate.EXIT_USAGE
        error = capsys.readouterr().err
        assert "other CPU settings or input data" in error and "cpu_env" in error

    def test_run_made_from_other_labels_is_refused(self, ablation, tiny, capsys):
        out, argv = ablation
        index = tiny / "labels" / "index.json"
        stat = index.stat()
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        try:
            assert ablate.main(["--methods", "softmax", *argv]) == ablate.EXIT_USAGE
            assert ablate.main(["--methods", "onehot", *argv]) == 0  # one-hot runs do not read the labels
        finally:
            os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert "inputs.labels" in capsys.readouterr().err

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


def result(method, seed, top1, top5, real_top1=None):
    return ablate.RunResult(method, seed, top1, top5, 1, f"runs/{method}/seed{seed}", real_top1=real_top1)


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
        assert cells["onehot"][3] == "80.00"
        assert cells["softmax"][4] == cells["softmax"][5] == "n/a"  # no ReaL labels
        (per_seed,) = markdown_tables(ablate.per_seed_table(rows, "top1"))
        assert per_seed[0] == ["top-1, all (%)", "seed 0", "seed 1", "seed 2"]
        assert per_seed[1][1:] == ["90.00", "92.50", "94.00"] and per_seed[2][1:] == ["80.00", "", ""]


class TestSingleObjectTop1:
    def test_derived_from_the_counts(self):
        # 950 images, 304 composites: 640 correct in all, 100 of them composites -> 540 of 646.
        run = ablate.RunResult("softmax", 0, 100 * 640 / 950, 99.0, 4, "r", samples=950, real_samples=304,
                               real_label_top1=100 * 100 / 304)
        assert run.single_top1 == pytest.approx(100 * 540 / 646)
        assert result("softmax", 0, 90.0, 99.0).single_top1 is None


class TestPaired:
    def test_differences_per_seed_against_brute_force(self):
        top1 = {"softmax": [88.0, 86.0, 91.0, 85.0, 87.5], "onehot": [85.0, 86.0, 89.0, 86.0, 84.5]}
        results = [result(m, s, v, 99.0, real_top1=v - 20) for m, values in top1.items() for s, v in enumerate(values)]
        (pair,) = ablate.paired(results, ["softmax", "onehot"])
        differences = np.subtract(top1["softmax"], top1["onehot"])
        stats = pair["top1"]
        assert stats["differences"] == pytest.approx(differences.tolist())
        assert stats["mean"] == pytest.approx(differences.mean()) and stats["std"] == pytest.approx(differences.std(ddof=1))
        half = 2.776 * differences.std(ddof=1) / np.sqrt(5)  # t(0.975, 4 degrees of freedom)
        assert stats["ci95"] == pytest.approx([differences.mean() - half, differences.mean() + half])
        assert (stats["better"], stats["worse"], stats["equal"]) == (3, 1, 1)
        assert pair["real_top1"]["differences"] == pytest.approx(differences.tolist())
        assert pair["real_recall2"] is None

    @pytest.mark.parametrize("differences, words", [
        ([2.0, 2.5, 3.0], "better"), ([-2.0, -2.5, -3.0], "worse"), ([1.0, -1.0, 2.0], "tie within noise"),
        ([2.0], "one seed, no interval"),
    ])
    def test_verdict_follows_the_interval(self, differences, words):
        assert ablate.verdict(ablate.difference_stats(differences)).startswith(words)

    def test_no_baseline_no_pairs(self):
        assert ablate.paired([result("softmax", 0, 90.0, 99.0)], ["softmax"]) == []

    def test_only_common_seeds_are_paired(self):
        results = [result("softmax", 0, 90.0, 99.0), result("softmax", 1, 91.0, 99.0), result("onehot", 1, 89.0, 99.0)]
        (pair,) = ablate.paired(results, ["softmax", "onehot"])
        assert pair["seeds"] == [1] and pair["top1"]["differences"] == [2.0]


class TestPinnedEnvironment:
    def test_children_get_the_pin_over_the_environment(self, monkeypatch):
        monkeypatch.setenv("OMP_NUM_THREADS", "16")
        assert ablate.child_environment(pin=True)["OMP_NUM_THREADS"] == "2"
        assert ablate.child_environment(pin=False)["OMP_NUM_THREADS"] == "16"

    def test_makefile_annotates_under_the_same_pin(self):
        text = (REPO / "Makefile").read_text().replace("\\\n", " ")
        (line,) = re.findall(r"^DEMO_CPU_ENV := (.*)$", text, re.MULTILINE)
        assert dict(item.split("=", 1) for item in line.split()) == ablate.PINNED_CPU_ENV
        assert "env $(DEMO_CPU_ENV) $(BIN)/python tools/relabel.py" in text


class TestPublishedResults:
    """The documents show the reports that `make demo` and `make ablation` wrote, byte for byte."""

    COPY = re.compile(r"<!-- BEGIN (docs/results/[\w.]+\.md) -->\n(.*?)<!-- END \1 -->", re.DOTALL)

    def copies(self):
        for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
            for match in self.COPY.finditer(document.read_text()):
                yield document, match.group(1), match.group(2)

    def test_every_copy_equals_its_report(self):
        found = list(self.copies())
        published = {"docs/results/demo.md"} | {n for n in ["docs/results/ablation.md"] if (REPO / n).exists()}
        assert {name for _, name, _ in found} >= published
        for document, name, text in found:
            assert text == (REPO / name).read_text(), f"{document.name}: the copy of {name} differs; rerun the command it names"

    @pytest.mark.parametrize("name", ["demo", "ablation"])
    def test_report_names_its_commit_and_machine(self, name):
        if name == "ablation" and not (REPO / "docs" / "results" / "ablation.md").exists():
            pytest.skip("make ablation has not written docs/results/ablation.md yet")
        text = (REPO / "docs" / "results" / f"{name}.md").read_text()
        record = json.loads((REPO / "docs" / "results" / f"{name}.json").read_text())
        assert f"Commit `{record['code']['commit']}`" in text and record["machine"]["cpu"] in text
        assert record["cpu_env"] == ablate.PINNED_CPU_ENV
        assert ablate.report_markdown(record) == text  # the Markdown is the JSON's rendering
        with Image.open(REPO / "docs" / "results" / f"{name}.png") as image:
            assert image.format == "PNG"

    def test_refresh_replaces_only_the_marked_copy(self, tmp_path, monkeypatch):
        monkeypatch.setattr(ablate, "REPO", tmp_path)
        (tmp_path / "docs" / "results").mkdir(parents=True)
        report = tmp_path / "docs" / "results" / "x.md"
        document = tmp_path / "README.md"
        document.write_text("intro\n<!-- BEGIN docs/results/x.md -->\nold\n<!-- END docs/results/x.md -->\nrest\n"
                            "<!-- BEGIN docs/results/y.md -->\nother\n<!-- END docs/results/y.md -->\n")
        assert ablate.refresh_copies(report, "new\ntable\n", [document]) == [document]
        assert document.read_text() == ("intro\n<!-- BEGIN docs/results/x.md -->\nnew\ntable\n<!-- END docs/results/x.md -->"
                                        "\nrest\n<!-- BEGIN docs/results/y.md -->\nother\n<!-- END docs/results/y.md -->\n")
        assert ablate.refresh_copies(report, "new\ntable\n", [document]) == []


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
