"""Check a node: does this install work here, and how fast is it?

    python -m tools.gpu_check [--quick] [--no-dali] [--device auto|cuda|cpu] [--out gpu_check]
        [--skip STEP ...] [--work DIR]

Steps, in order, each in its own process with its own time limit (a step that fails, crashes or
hangs is reported and the next one still runs):

  environment  GPUs, driver, CUDA runtime, torch, DALI (version and variant), nvcc, compiler, CPUs, /dev/shm
  build        the pooling library and the DALI plugin, for the local GPU's architecture
  parity       the operator in a pipeline (GPU and CPU) and pool_labels against the literal official
               pooling (relabel_dali.ops.reference): 4 modes x 3 score dtypes, random and edge boxes
  kernel       LabelPool per batch of crops, against the official dense path (tools/bench_pool.py)
  data         generated JPEGs, official .pt maps and label shards (relabel_dali.data.benchdata)
  loader       the training graph with and without labels (tools/bench_loader.py), mixed decoding on the GPU
  trainer      train.py with and without ReLabel; the same model fed by the official-style loader
               (relabel_dali.data.official) with and without labels, and by one fixed batch (model speed)
  tokens       GPU only: the GPU graph's token targets (fn.label_pool output_size, mirror) against
               pool_labels on the CPU, bit for bit; train.py training a ViT-Tiny on token labels for a
               few steps (finite loss, the auxiliary head trained). Skipped on the CPU, where
               tests/test_token_training.py covers the same path
  annotator    tools/relabel.py with a randomly initialised torchvision model

``--quick`` uses smaller sizes (meant to fit in 5 minutes on one H100; not yet timed on one); ``--no-dali`` runs
only what needs torch and nvcc (environment, build, parity and kernel of pool_labels); without a
GPU, or with ``--device cpu``, every step runs on the CPU at small sizes and the GPU targets are not
judged. Results: ``OUT/report.json`` (one entry per step: status pass/fail/skip, reason, numbers,
seconds; the targets, each with its value and whether it is met) and ``OUT/report.md``, rewritten
after every step. Generated data goes to a temporary folder (``--work``), removed at the end.

Exit codes: 0 every step passed or was skipped; 1 a step failed (crash, time-out, wrong values);
2 bad arguments; 143 stopped by SIGTERM/SIGINT (the report says where). Missed speed targets are
reported, not failures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from tools.gpu_check.profiles import (NO_DALI_STEPS, PROFILES, QUICK_TIMEOUTS, REPO, STEPS, TIMEOUTS, Interrupted,
                                      StepFailure, StepSkipped)
from tools.gpu_check.report import _fmt, evaluate_targets, write_report
from tools.gpu_check.steps import nvidia_smi, run_child
from tools.gpu_check.trainer import token_train_overrides, train_overrides, train_py_stats


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_command(name: str, argv: list[str], timeout: float, env: dict) -> tuple[int | None, list[str]]:
    """Runs ``argv`` in its own process group, echoing its output; (exit code or None on time-out,
    the output's last lines). A time-out kills the whole group (pipeline workers included)."""
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=40)

    def pump():
        for line in process.stdout:
            print(f"  [{name}] {line}", end="", flush=True)
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    except Interrupted:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    reader.join(10)
    return code, list(tail)


class Check:
    """Runs the steps in order and keeps the report up to date."""

    def __init__(self, args, device: str, device_name: str, work: Path):
        self.args, self.device, self.work = args, device, work
        self.settings = dict(PROFILES[(device, args.quick)], device=device, no_dali=args.no_dali,
                             work=str(work), cpu_count=os.cpu_count() or 1)
        self.timeouts = QUICK_TIMEOUTS if args.quick else TIMEOUTS
        self.env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1", PYTHONUNBUFFERED="1")
        self.steps: dict[str, dict] = {}
        self.report = {"tool": "tools.gpu_check", "command": " ".join(["python -m tools.gpu_check", *sys.argv[1:]]),
                       "started": now(), "finished": None, "device": device, "device_name": device_name,
                       "quick": args.quick, "no_dali": args.no_dali, "settings": self.settings, "steps": [],
                       "targets": [], "exit_code": None}

    def child(self, step: str) -> list[str]:
        settings = self.work / "settings.json"
        settings.write_text(json.dumps(self.settings))
        # Run from the repository root (run_command's cwd), whatever the check's own cwd.
        return [sys.executable, "-m", "tools.gpu_check", "--step", step, "--work", str(self.work)]

    def run_step(self, name: str) -> None:
        started = time.perf_counter()
        status, reason, numbers = "pass", "", {}
        try:
            self.precondition(name)
            numbers = self.execute(name)
        except StepSkipped as why:
            status, reason = "skip", str(why)
        except StepFailure as why:
            status, reason, numbers = "fail", why.reason, why.numbers
        except Interrupted as why:
            self.record(name, "fail", f"interrupted ({why}) after {time.perf_counter() - started:.0f} s", {},
                        started)
            raise
        self.record(name, status, reason, numbers, started)

    def record(self, name: str, status: str, reason: str, numbers: dict, started: float) -> None:
        # A SIGTERM/SIGINT waits until the entry and the report on disk agree (it is delivered
        # when the mask is lifted, and then interrupts whatever comes next).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self._record(name, status, reason, numbers, started)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _record(self, name: str, status: str, reason: str, numbers: dict, started: float) -> None:
        entry = {"name": name, "status": status, "reason": reason, "numbers": numbers,
                 "seconds": time.perf_counter() - started}
        print(f"{name}: {status}" + (f" ({reason})" if reason else "") + f" in {entry['seconds']:.1f} s", flush=True)
        self.steps[name] = entry
        self.report["steps"].append(entry)
        self.report["targets"] = evaluate_targets(self.steps, self.device)
        write_report(self.args.out, self.report)

    def precondition(self, name: str) -> None:
        if name in self.args.skip:
            raise StepSkipped("--skip")
        if self.args.no_dali and name not in NO_DALI_STEPS:
            raise StepSkipped("--no-dali: this step needs DALI")
        needs = {"parity": ["build"], "kernel": ["build"], "loader": ["build", "data"], "trainer": ["build", "data"],
                 "tokens": ["build", "data"], "annotator": ["build", "data"]}
        for before in needs.get(name, []):
            if self.steps.get(before, {}).get("status") != "pass":
                raise StepSkipped(f"needs the {before} step, which did not pass")

    def command(self, step: str, label: str, argv: list[str]) -> list[str]:
        """Runs one command of ``step`` under the step's time limit; its output's tail or a failure."""
        timeout = self.timeouts[step]
        code, tail = run_command(label, argv, timeout, self.env)
        if code is None:
            raise StepFailure(f"{label}: no result within {timeout} s (killed); last output: " + " / ".join(tail[-5:]))
        if code != 0:
            raise StepFailure(f"{label}: exit code {code}; last output: " + " / ".join(tail[-8:]))
        return tail

    def execute(self, name: str) -> dict:
        if name in ("environment", "build", "parity", "data"):
            self.command(name, name, self.child(name))
            return self.read_result(name)
        return getattr(self, f"step_{name}")()

    def read_result(self, name: str) -> dict:
        path = self.work / "results" / f"{name}.json"
        if not path.is_file():
            raise StepFailure(f"{name}: the step's process ended without writing {path.name}")
        result = json.loads(path.read_text())
        if result["status"] == "fail":
            raise StepFailure(result["reason"], result["numbers"])
        if result["status"] == "skip":
            raise StepSkipped(result["reason"])
        return result["numbers"]

    # -- steps that run the project's tools ---------------------------------------------------
    def step_kernel(self) -> dict:
        s, out = self.settings, self.work / "bench_pool.json"
        argv = [sys.executable, "tools/bench_pool.py", "--json", str(out), "--device", self.device,
                "--batch", str(s["kernel_batch"]), "--repeats", str(s["kernel_repeats"])]
        self.command("kernel", "bench_pool", argv + (["--no-dali"] if self.args.no_dali else []))
        result = json.loads(out.read_text())
        numbers = {"batch": result["batch"], "us_per_batch": {
            case: {method: None if r["seconds_per_batch"] is None else r["seconds_per_batch"] * 1e6
                   for method, r in methods.items()}
            for case, methods in result["cases"].items()}}
        if result.get("kernel_us"):
            numbers["kernel_us_per_batch"] = {case: {k: v["us_per_batch"] for k, v in kernels.items()}
                                              for case, kernels in result["kernel_us"].items()}
            # The targets: the slower case, of the operator's kernel where the profiler saw it, else
            # of pool_labels' launch of the same kernel code.
            for which in ("dali_op", "pool_labels"):
                cases = {case: k[which] for case, k in result["kernel_us"].items()
                         if k.get(which, {}).get("us_per_batch") is not None}
                if cases:
                    worst = max(cases, key=lambda case: cases[case]["us_per_batch"])
                    numbers.update(kernel_us=cases[worst]["us_per_batch"],
                                   kernel_speedup_vs_official=cases[worst]["speedup_vs_official"],
                                   kernel_of=f"{which}, {worst} ids")
                    break
            else:
                numbers["kernel_of"] = "the CUDA profiler recorded no LabelPool kernel"
        return numbers

    def step_loader(self) -> dict:
        s, data, out = self.settings, self.work / "data", self.work / "bench_loader.json"
        workers = max(1, min(8, s["cpu_count"]))
        argv = [sys.executable, "tools/bench_loader.py", "--data", str(data / "train"), "--labels",
                str(data / "labels"), "--pt", str(data / "pt"), "--only", "a", "--only", "b", "--device", self.device,
                "--batch-size", str(s["loader_batch"]), "--image-size", str(s["image_size"]), "--workers",
                str(workers), "--rounds", str(s["loader_rounds"]), "--json", str(out)]
        self.command("loader", "bench_loader", argv)
        result = json.loads(out.read_text())
        return {key: result[key] for key in ("images", "batch_size", "image_size", "workers", "images_per_s",
                                             "a_over_b", "a_over_b_median_of_rounds") if key in result}

    def step_trainer(self) -> dict:
        s, data = self.settings, self.work / "data"
        numbers = {"arch": s["arch"], "batch": s["train_batch"], "epochs": s["train_epochs"],
                   "measured": "epochs after the first"}
        for variant, relabel in (("relabel", True), ("no_relabel", False)):
            out_dir = self.work / f"train_{variant}"
            self.command("trainer", f"train.py {variant}", [sys.executable, "train.py", *train_overrides(
                s, data, out_dir, relabel)])
            numbers[variant] = train_py_stats(out_dir)
        for variant in ("official", "official_no_labels", "fixed_batch"):
            self.command("trainer", variant, self.child(f"train_{variant}"))
            numbers[variant] = self.read_result(f"train_{variant}")
        rate = {v: numbers[v]["images_per_s"] for v in ("relabel", "no_relabel", "official", "official_no_labels")}
        # Step time with ReLabel over step time without it, less one: the cost of ReLabel per step.
        numbers["relabel_step_time_overhead"] = {"ours": rate["no_relabel"] / rate["relabel"] - 1,
                                                 "official_style": rate["official_no_labels"] / rate["official"] - 1}
        numbers["ours_over_official_with_relabel"] = rate["relabel"] / rate["official"]
        return numbers

    def step_tokens(self) -> dict:
        if self.device != "cuda":
            raise StepSkipped("GPU only (the GPU graph's token targets and a ViT on them); on the CPU "
                              "tests/test_token_training.py covers the same path")
        s = self.settings
        self.command("tokens", "token targets", self.child("tokens"))
        numbers = self.read_result("tokens")
        out_dir = self.work / "train_tokens"
        self.command("tokens", "train.py tokens", [sys.executable, "train.py", *token_train_overrides(
            s, self.work / "data", out_dir)])
        numbers["train"] = check_token_run(out_dir, s)
        return numbers

    def step_annotator(self) -> dict:
        s, data = self.settings, self.work / "data"
        argv = [sys.executable, "tools/relabel.py", str(data / "train"), str(self.work / "annotated"), "--arch",
                s["arch"], "--weights", str(data / "annotator.pth"), "--size", str(s["annotate_size"]),
                "--batch-size", str(s["annotate_batch"]), "--device", self.device, "--limit",
                str(s["annotate_images"]), "--threads", str(s["cpu_count"])]
        started = time.perf_counter()
        tail = self.command("annotator", "relabel.py", argv)
        seconds = time.perf_counter() - started
        speed = [float(m.group(1)) for line in tail if (m := re.search(r"speed: ([0-9.]+) images/s", line))]
        if not speed:
            raise StepFailure("relabel.py finished without its 'speed: N images/s' line")
        return {"arch": s["arch"], "size": s["annotate_size"], "images": s["annotate_images"],
                "images_per_s": speed[-1], "seconds_in_all": seconds, "amp": self.device == "cuda"}

    def run(self) -> int:
        interrupted = False
        try:
            for name in STEPS:
                self.run_step(name)
        except Interrupted as why:
            interrupted = True
            entries = self.report["steps"]
            pending = next((name for name in STEPS if name not in self.steps), None)
            if pending and not (entries and entries[-1]["reason"].startswith("interrupted")):
                # The signal came between two steps (or as one was recorded): the next one is where it stopped.
                self.record(pending, "fail", f"interrupted ({why}) as the step was starting", {}, time.perf_counter())
        failed = [s["name"] for s in self.report["steps"] if s["status"] == "fail"]
        self.report.update(finished=now(), exit_code=143 if interrupted else 1 if failed else 0)
        write_report(self.args.out, self.report)
        print(f"report: {self.args.out / 'report.json'} and report.md; "
              + (f"FAILED: {', '.join(failed)}" if failed else "no step failed"))
        for t in self.report["targets"]:
            met = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
            print(f"  {t['name']}: {_fmt(t['value'])} {t['unit']} (target {t['target']}): {met}")
        return self.report["exit_code"]


def check_token_run(out_dir: Path, s: dict) -> dict:
    """What train.py's token run left: a finished checkpoint whose auxiliary head moved from its
    initial weights, finite parameters and loss."""
    import torch

    state = torch.load(out_dir / "checkpoint-last.pth", weights_only=False, map_location="cpu")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    aux = state["model"].get("aux_head.weight")
    if state["epoch"] != 1 or aux is None:
        raise StepFailure(f"{out_dir}: checkpoint at epoch {state['epoch']}, aux head "
                          f"{'missing' if aux is None else 'present'}")
    finite = all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    loss = metrics["train"]["loss"]
    if not finite or loss != loss or abs(loss) == float("inf"):
        raise StepFailure(f"{out_dir}: non-finite parameters or loss ({loss})")
    moved = state["optimizer"]["state"] != {}
    return {"loss": loss, "images_per_s": metrics["train"]["images_per_s"], "top1": metrics.get("top1"),
            "optimizer_stepped": moved, "token_size": s["image_size"] // 16}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, meant to fit in 5 minutes on one GPU")
    parser.add_argument("--no-dali", action="store_true", help="only the steps that need torch and nvcc")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when nvidia-smi lists a GPU, else cpu")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="report folder (default gpu_check)")
    parser.add_argument("--work", type=Path, help="folder for generated data (default: a temporary one, removed)")
    parser.add_argument("--skip", choices=STEPS, action="append", default=[], help="skip a step (repeatable)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.step:
        return run_child(args.step, args.work)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    gpus = nvidia_smi()
    device = args.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
        if not gpus:
            print("no GPU found (nvidia-smi lists none): running the CPU form of the check (--device cpu)", flush=True)
    if device == "cuda" and gpus and not os.environ.get("RELABEL_DALI_CUDA_ARCHS"):
        # Build for this GPU only: faster than the default list, and exactly what runs here.
        os.environ["RELABEL_DALI_CUDA_ARCHS"] = ";".join(sorted({g["compute_capability"].replace(".", "")
                                                                 for g in gpus}))
    device_name = gpus[0]["name"] if device == "cuda" and gpus else platform.processor() or platform.machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="relabel_gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {device} ({device_name}){', quick' if args.quick else ''}"
          f"{', no DALI' if args.no_dali else ''}: report in {args.out}, data in {work}", flush=True)
    try:
        return Check(args, device, device_name, work).run()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
