"""tools.gpu_check: the quick CPU form end to end (every step runs, and the report's numbers agree
with each other and with what the steps left on disk), a failing step, time-outs, and the targets."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relabel_dali.store.reader import LabelShardReader
from tools.gpu_check.profiles import PROFILES, STEPS
from tools.gpu_check.report import evaluate_targets
from tools.gpu_check.runner import run_command
from tools.gpu_check.steps import edge_boxes

REPO = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, "-m", "tools.gpu_check"]  # run from the repository root (cwd=REPO)


def run_check(tmp_path, *args, env=None):
    return subprocess.run([*TOOL, "--device", "cpu", "--quick", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO)


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    """(process result, report, steps by name, work folder, report folder) of one quick CPU check."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    result = run_check(tmp)
    report = json.loads((tmp / "out" / "report.json").read_text())
    return result, report, {s["name"]: s for s in report["steps"]}, tmp / "work", tmp / "out"


@pytest.mark.slow
class TestQuickCpuForm:
    @pytest.fixture
    def run(self, quick_cpu_run):
        return quick_cpu_run

    def test_every_step_passes_and_the_exit_code_says_so(self, run):
        result, report, steps, _, _ = run
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert [s["name"] for s in report["steps"]] == list(STEPS)
        assert steps["tokens"]["status"] == "skip" and "GPU only" in steps["tokens"]["reason"]
        assert {s["status"] for s in report["steps"] if s["name"] != "tokens"} == {"pass"}, \
            [(s["name"], s["reason"]) for s in report["steps"]]
        assert report["exit_code"] == 0 and report["device"] == "cpu" and report["quick"]
        assert all(s["seconds"] > 0 for s in report["steps"])

    def test_parity_compares_every_backend_mode_and_dtype(self, run):
        parity = run[2]["parity"]["numbers"]
        expected = {f"{impl}/{dtype}/{mode}" for impl in ("pool_labels_cpu", "operator_cpu")
                    for dtype in ("float32", "float16", "uint8")
                    for mode in ("softmax", "argmax", "global_softmax", "global_argmax")}
        assert set(parity["max_abs_diff"]) == expected
        assert parity["worst_abs_diff"] == max(parity["max_abs_diff"].values()) <= 1e-6
        assert parity["batch"] == PROFILES[("cpu", True)]["parity_batch"] and parity["edge_boxes"] == 10
        assert 0.95 <= parity["min_clear_fraction_argmax"] <= 1

    def test_kernel_numbers(self, run):
        kernel = run[2]["kernel"]["numbers"]
        for case in ("random", "concentrated"):
            us = kernel["us_per_batch"][case]
            assert us["pool_labels"] < us["official_dense"]  # the native path beats the dense one, even here
            assert us["dali_pipeline"] > 0
        assert "kernel_us" not in kernel  # the kernel's device time is measured on the GPU only

    def test_data_on_disk(self, run):
        data, work = run[2]["data"]["numbers"], run[3]
        images = sorted((work / "data" / "train").glob("*/*.JPEG"))
        assert data["images"] == len(images) == len(LabelShardReader(work / "data" / "labels"))
        assert len(list((work / "data" / "pt").glob("*/*.pt"))) == len(images)
        assert len(list((work / "data" / "val").glob("*/*.JPEG"))) == data["val_images"]

    def test_loader_ratio(self, run):
        loader = run[2]["loader"]["numbers"]
        rates = loader["images_per_s"]
        assert set(rates) == {"a_dali_relabel", "b_dali_no_labels"} and min(rates.values()) > 0
        assert loader["a_over_b"] == pytest.approx(rates["a_dali_relabel"] / rates["b_dali_no_labels"])

    def test_trainer_runs_train_py_and_the_official_style_loop(self, run):
        trainer, work = run[2]["trainer"]["numbers"], run[3]
        profile = PROFILES[("cpu", True)]
        for variant in ("relabel", "no_relabel", "official", "official_no_labels", "fixed_batch"):
            assert trainer[variant]["images_per_s"] > 0
            assert 0 <= trainer[variant]["data_wait_fraction"] < 1
            assert len(trainer[variant]["per_epoch_images_per_s"]) == profile["train_epochs"]
        for variant in ("relabel", "no_relabel"):  # train.py really trained, to its last epoch
            state = torch.load(work / f"train_{variant}" / "checkpoint-last.pth", weights_only=False)
            assert state["epoch"] == profile["train_epochs"] and state["arch"] == profile["arch"]
        rate = {v: trainer[v]["images_per_s"] for v in ("relabel", "no_relabel", "official", "official_no_labels")}
        overhead = trainer["relabel_step_time_overhead"]
        assert overhead["ours"] == pytest.approx(rate["no_relabel"] / rate["relabel"] - 1)
        assert overhead["official_style"] == pytest.approx(rate["official_no_labels"] / rate["official"] - 1)

    def test_annotator_wrote_its_shards(self, run):
        annotator, work = run[2]["annotator"]["numbers"], run[3]
        assert annotator["images_per_s"] > 0
        assert len(LabelShardReader(work / "annotated")) == annotator["images"]

    def test_targets_on_the_cpu(self, run):
        report, steps = run[1], run[2]
        targets = {t["name"]: t for t in report["targets"]}
        parity = targets["parity max abs difference"]
        assert parity["value"] == steps["parity"]["numbers"]["worst_abs_diff"] and parity["met"] is True
        ratio = targets["loader images/s with labels / without"]
        assert ratio["value"] == steps["loader"]["numbers"]["a_over_b"]
        assert ratio["met"] is None and "not judged on the CPU" in ratio["note"]
        wait = targets["trainer data wait with ReLabel"]
        assert wait["value"] == steps["trainer"]["numbers"]["relabel"]["data_wait_fraction"]

    def test_markdown_report(self, run):
        text = (run[4] / "report.md").read_text()
        for name in STEPS:  # the tokens step is GPU only (test_every_step_passes_and_the_exit_code_says_so)
            assert f"| {name} | {'skip' if name == 'tokens' else 'pass'} |" in text


def test_a_failing_step_is_reported_and_the_rest_still_run(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))
    result = run_check(tmp_path, "--skip", "data", env=env)
    assert result.returncode == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["steps"]}
    assert steps["build"]["status"] == "fail" and "no-such-compiler" in steps["build"]["reason"]
    assert steps["data"]["status"] == "skip" and steps["data"]["reason"] == "--skip"
    for name in ("parity", "kernel", "loader", "trainer", "annotator"):
        assert steps[name]["status"] == "skip" and "build step" in steps[name]["reason"]


def test_no_dali_runs_only_what_needs_torch_and_nvcc(tmp_path):
    result = run_check(tmp_path, "--no-dali", "--skip", "parity", "--skip", "kernel")
    assert result.returncode == 0, result.stdout[-3000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["steps"]}
    assert steps["build"]["status"] == "pass" and "plugin_path" not in steps["build"]["numbers"]
    for name in ("data", "loader", "trainer", "annotator"):
        assert steps[name]["status"] == "skip" and "--no-dali" in steps[name]["reason"]


def test_sigterm_reports_the_running_step_and_exits_143(tmp_path):
    process = subprocess.Popen([*TOOL, "--device", "cpu", "--quick", "--out", str(tmp_path / "out"),
                                "--work", str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    report = tmp_path / "out" / "report.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # until the build step is done: parity runs next
        if report.exists() and "build" in [s["name"] for s in json.loads(report.read_text())["steps"]]:
            break
        time.sleep(0.2)
    process.terminate()
    assert process.wait(60) == 143
    result = json.loads(report.read_text())
    assert result["exit_code"] == 143 and result["finished"]
    last = result["steps"][-1]
    assert last["status"] == "fail" and last["reason"].startswith("interrupted (SIGTERM)"), last
    assert [s["name"] for s in result["steps"]] == list(STEPS[:len(result["steps"])])


def test_a_signal_between_two_steps_is_reported_on_the_step_about_to_start(tmp_path, monkeypatch):
    """SIGTERM delivered right after a step's report was written (the moment the end-to-end test
    above waits for) names the next step, not a finished one, and the run exits 143."""
    import argparse
    import signal

    from tools.gpu_check import runner

    args = argparse.Namespace(quick=True, no_dali=False, skip=[], out=tmp_path / "out")
    check = runner.Check(args, "cpu", "cpu", tmp_path / "work")
    done = []

    def execute(name):
        done.append(name)
        return {"n": 1}

    signals = []

    def record(*a):
        runner.Check.record(check, *a)
        if len(done) == 1 and not signals:  # the first step is on disk: the signal arrives now
            signals.append(signal.SIGTERM)
            runner._interrupt(signal.SIGTERM, None)

    monkeypatch.setattr(check, "precondition", lambda name: None)
    monkeypatch.setattr(check, "execute", execute)
    monkeypatch.setattr(check, "record", record)
    assert check.run() == 143
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(STEPS[:2]) and done == [STEPS[0]]
    assert report["steps"][0]["status"] == "pass"
    assert report["steps"][1]["status"] == "fail"
    assert report["steps"][1]["reason"].startswith("interrupted (SIGTERM)")


def test_a_hanging_command_is_killed_with_its_children():
    started = time.perf_counter()
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', flush=True); time.sleep(60)"
    code, tail = run_command("hang", [sys.executable, "-c", script], 3, dict(os.environ))
    assert code is None and tail == ["started"]
    assert time.perf_counter() - started < 20


class TestTargets:
    def steps(self, **numbers):
        return {name: {"status": "pass", "numbers": value} for name, value in numbers.items()}

    def test_judged_on_the_gpu(self):
        steps = self.steps(parity={"worst_abs_diff": 2e-7},
                           kernel={"kernel_us": 61.0, "kernel_speedup_vs_official": 250.0},
                           loader={"a_over_b": 0.99, "images_per_s": {"a_dali_relabel": 9000.0}},
                           trainer={"fixed_batch": {"images_per_s": 3000.0}, "relabel": {"data_wait_fraction": 0.004}})
        targets = {t["name"]: t for t in evaluate_targets(steps, "cuda")}
        assert [t["met"] for t in targets.values()] == [True, False, True, False, True, True]
        assert targets["loader images/s / the model's own step rate"]["value"] == 3.0

    def test_a_failed_step_gives_no_value(self):
        steps = self.steps(parity={"worst_abs_diff": 2e-7})
        steps["parity"]["status"] = "fail"
        targets = evaluate_targets(steps, "cuda")
        assert all(t["value"] is None and t["met"] is None for t in targets)


@pytest.mark.parametrize("h, w", [(15, 15), (7, 12)])
def test_edge_boxes(h, w):
    boxes = edge_boxes(h, w)
    assert boxes[0].tolist() == [0, 0, 1, 1]
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.allclose(widths[1:6], torch.full((5,), 1 / w))
    assert torch.allclose(heights[1:6], torch.full((5,), 1 / h))
    assert ((boxes >= 0) & (boxes <= 1)).all() and (widths > 0).all() and (heights > 0).all()
