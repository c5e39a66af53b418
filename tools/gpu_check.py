#!/usr/bin/env python
"""Check a node: does this install work here, and how fast is it?

    python tools/gpu_check.py [--quick] [--no-dali] [--device auto|cuda|cpu] [--out gpu_check]
        [--skip STEP ...] [--work DIR]

Steps, in order, each in its own process with its own time limit (a step that fails, crashes or
hangs is reported and the next one still runs):

  environment  GPUs, driver, CUDA runtime, torch, DALI (version and variant), nvcc, compiler, CPUs, /dev/shm
  build        the pooling library and the DALI plugin, for the local GPU's architecture
  parity       the operator in a pipeline (GPU and CPU) and pool_labels against the literal official
               pooling (relabel_dali.reference): 4 modes x 3 score dtypes, random and edge boxes
  kernel       LabelPool per batch of crops, against the official dense path (tools/bench_pool.py)
  data         generated JPEGs, official .pt maps and label shards (relabel_dali.benchdata)
  loader       the training graph with and without labels (tools/bench_loader.py), mixed decoding on the GPU
  trainer      train.py with and without ReLabel; the same model fed by the official-style loader
               (relabel_dali.official) with and without labels, and by one fixed batch (model speed)
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

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "build", "parity", "kernel", "data", "loader", "trainer", "annotator")
NO_DALI_STEPS = ("environment", "build", "parity", "kernel")
TOLERANCE = 1e-6
IMAGENET_SIZES = ((400, 500), (330, 420))
TINY_SIZES = ((40, 56), (32, 48))

# Sizes per (device, quick). The full GPU check follows the targets' definitions (batches of 1024
# crops, >= 20k ImageNet-sized JPEGs, a few hundred ResNet-50 steps, ~2k annotated images); the CPU
# forms prove that every step runs, at sizes a laptop finishes in minutes (tests use the quick one).
PROFILES = {
    ("cuda", False): dict(parity_batch=1024, kernel_batch=1024, kernel_repeats=50, images=20480, val_images=512,
                          sizes=IMAGENET_SIZES, image_size=224, loader_batch=256, loader_rounds=2, train_batch=256,
                          train_epochs=3, arch="resnet50", annotate_images=2048, annotate_size=480,
                          annotate_batch=64),
    ("cuda", True): dict(parity_batch=1024, kernel_batch=1024, kernel_repeats=20, images=4096, val_images=256,
                         sizes=IMAGENET_SIZES, image_size=224, loader_batch=256, loader_rounds=1, train_batch=128,
                         train_epochs=2, arch="resnet50", annotate_images=512, annotate_size=480, annotate_batch=64),
    ("cpu", False): dict(parity_batch=1024, kernel_batch=256, kernel_repeats=5, images=256, val_images=32,
                         sizes=IMAGENET_SIZES, image_size=128, loader_batch=16, loader_rounds=1, train_batch=16,
                         train_epochs=2, arch="resnet18", annotate_images=64, annotate_size=224, annotate_batch=16),
    ("cpu", True): dict(parity_batch=128, kernel_batch=128, kernel_repeats=2, images=32, val_images=8,
                        sizes=TINY_SIZES, image_size=32, loader_batch=8, loader_rounds=1, train_batch=8,
                        train_epochs=2, arch="resnet18", annotate_images=16, annotate_size=64, annotate_batch=8),
}
# Seconds per command of each step (a step may run several commands).
TIMEOUTS = {"environment": 120, "build": 600, "parity": 600, "kernel": 600, "data": 900, "loader": 900,
            "trainer": 900, "annotator": 600}
QUICK_TIMEOUTS = {"environment": 60, "build": 300, "parity": 240, "kernel": 180, "data": 180, "loader": 240,
                  "trainer": 240, "annotator": 180}


class StepFailure(Exception):
    """A step's checks failed: ``reason`` goes into the report, with whatever ``numbers`` were measured."""

    def __init__(self, reason: str, numbers: dict | None = None):
        super().__init__(reason)
        self.reason, self.numbers = reason, numbers or {}


class StepSkipped(Exception):
    """A step cannot run here: the message says why."""


class Interrupted(Exception):
    """SIGTERM or SIGINT (e.g. a time limit around the whole check): the running step's processes
    are killed, it is reported as failed, and the report is written before exiting."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


# ==== the report ================================================================================
def evaluate_targets(steps: dict, device: str) -> list[dict]:
    """Each target with its value and whether it is met (None: not measured, or not judged on the CPU)."""
    def numbers(name):
        step = steps.get(name)
        return step["numbers"] if step and step["status"] == "pass" else {}

    parity, kernel, loader, trainer = numbers("parity"), numbers("kernel"), numbers("loader"), numbers("trainer")
    synthetic = trainer.get("fixed_batch", {}).get("images_per_s")
    loader_rate = loader.get("images_per_s", {}).get("a_dali_relabel")
    rows = [
        ("parity max abs difference", parity.get("worst_abs_diff"), "<=", TOLERANCE, "", True),
        ("LabelPool kernel per batch of 1024 crops", kernel.get("kernel_us"), "<=", 50.0, "us", False),
        ("LabelPool speed-up over the official dense path", kernel.get("kernel_speedup_vs_official"), ">=", 100.0,
         "x", False),
        ("loader images/s with labels / without", loader.get("a_over_b"), ">=", 0.995, "", False),
        ("loader images/s / the model's own step rate",
         None if not (loader_rate and synthetic) else loader_rate / synthetic, ">=", 2.0, "x", False),
        ("trainer data wait with ReLabel", trainer.get("relabel", {}).get("data_wait_fraction"), "<=", 0.01,
         "of step time", False),
    ]
    targets = []
    for name, value, op, target, unit, everywhere in rows:
        judged = value is not None and (everywhere or device == "cuda")
        met = None if not judged else (value <= target if op == "<=" else value >= target)
        note = "" if value is None or judged else "a GPU target: not judged on the CPU"
        targets.append({"name": name, "value": value, "target": f"{op} {target:g}", "unit": unit, "met": met,
                        "note": note})
    return targets


def write_report(out: Path, report: dict) -> None:
    from relabel_dali.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(report: dict) -> str:
    lines = [f"# relabel_dali GPU check: {report['device_name']}", "",
             f"{report['started']} to {report.get('finished') or '(running)'}; device {report['device']}"
             f"{', quick' if report['quick'] else ''}{', no DALI' if report['no_dali'] else ''}; "
             f"exit code {_fmt(report.get('exit_code'))}", "", f"    {report['command']}", "",
             "| step | status | seconds | reason |", "|---|---|---|---|"]
    for step in report["steps"]:
        reason = step["reason"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {reason} |")
    lines += ["", "| target | value | target | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['name']} | {_fmt(t['value'])} {t['unit']} | {t['target']} | {met} {t['note']} |")
    lines += ["", "## Numbers", ""]
    for step in report["steps"]:
        if step["numbers"]:
            lines += [f"### {step['name']}", "", "```", json.dumps(step["numbers"], indent=1), "```", ""]
    return "\n".join(lines) + "\n"


# ==== running steps =============================================================================
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
        self.report = {"tool": "tools/gpu_check.py", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                       "started": now(), "finished": None, "device": device, "device_name": device_name,
                       "quick": args.quick, "no_dali": args.no_dali, "settings": self.settings, "steps": [],
                       "targets": [], "exit_code": None}

    def child(self, step: str) -> list[str]:
        settings = self.work / "settings.json"
        settings.write_text(json.dumps(self.settings))
        return [sys.executable, str(Path(__file__).resolve()), "--step", step, "--work", str(self.work)]

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
                 "annotator": ["build", "data"]}
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
        except Interrupted:
            interrupted = True
        failed = [s["name"] for s in self.report["steps"] if s["status"] == "fail"]
        self.report.update(finished=now(), exit_code=143 if interrupted else 1 if failed else 0)
        write_report(self.args.out, self.report)
        print(f"report: {self.args.out / 'report.json'} and report.md; "
              + (f"FAILED: {', '.join(failed)}" if failed else "no step failed"))
        for t in self.report["targets"]:
            met = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
            print(f"  {t['name']}: {_fmt(t['value'])} {t['unit']} (target {t['target']}): {met}")
        return self.report["exit_code"]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ==== trainer helpers ===========================================================================
def train_overrides(s: dict, data: Path, out_dir: Path, relabel: bool) -> list[str]:
    """train.py's command line for the check (train.py refuses a key configs/base.yaml lacks)."""
    cuda = s["device"] == "cuda"
    workers = max(1, min(8, s["cpu_count"]))
    settings = {
        "model.arch": s["arch"], "model.channels_last": cuda, "compute.device": s["device"],
        "compute.amp": "bf16" if cuda else "none", "data.data_path": data, "data.class_map": "folder",
        "data.image_size": s["image_size"], "data.num_threads": workers, "data.py_workers": max(1, workers // 2),
        "data.relabel.use": relabel, "optim.epochs": s["train_epochs"], "optim.batch_size": s["train_batch"],
        "optim.lr.base_batch_size": s["train_batch"], "optim.warmup.epochs": 0, "util.val_batch_size": s["train_batch"],
        "util.output_dir": out_dir, "util.val_every": 1000, "util.progress": False, "util.tensorboard": True,
        "util.print_freq": 1000,
        "data.preflight_decodes": 0,  # generated, clean JPEGs; and a fresh node may lack simplejpeg
    }
    if relabel:
        settings["data.relabel.path"] = data / "labels"
    argv = ["--config-file-path", str(REPO / "configs" / "base.yaml")]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


def train_py_stats(out_dir: Path) -> dict:
    """images/s and data-wait fraction train.py logged, averaged over the epochs after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tb"))
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    if not {"perf/images_per_s", "perf/data_wait_fraction"} <= tags:
        raise StepFailure(f"{out_dir / 'tb'}: train.py logged no perf/images_per_s and perf/data_wait_fraction")
    rates = events.Scalars("perf/images_per_s")
    waits = events.Scalars("perf/data_wait_fraction")
    keep = slice(1, None) if len(rates) > 1 else slice(None)
    return {"images_per_s": sum(e.value for e in rates[keep]) / len(rates[keep]),
            "data_wait_fraction": sum(e.value for e in waits[keep]) / len(waits[keep]),
            "per_epoch_images_per_s": [e.value for e in rates]}


def train_loop(batches, steps_per_epoch: int, s: dict) -> dict:
    """The trainer's step (same model, AMP, channels-last, soft-target loss) fed by ``batches()``
    (a fresh iterator of ``{"images", "targets"}`` per epoch); images/s and data-wait fraction over
    the epochs after the first, measured as relabel_dali.engine measures them."""
    import torch
    import torchvision

    from relabel_dali.losses import soft_target_cross_entropy

    device = torch.device(s["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = torchvision.models.get_model(s["arch"], weights=None, num_classes=1000).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    per_epoch = []
    for _ in range(s["train_epochs"]):
        samples, wait_s, steps = 0, 0.0, 0
        start = last = time.perf_counter()
        for batch in batches():
            wait_s += time.perf_counter() - last
            images = batch["images"].to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(images)
            loss = soft_target_cross_entropy(logits, batch["targets"].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            samples += images.shape[0]
            steps += 1
            last = time.perf_counter()
            if steps == steps_per_epoch:
                break
        if cuda:
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise StepFailure(f"the loss is {float(loss)}")
        elapsed = time.perf_counter() - start
        per_epoch.append((samples / elapsed, wait_s / elapsed))
    measured = per_epoch[1:] or per_epoch
    return {"images_per_s": sum(r for r, _ in measured) / len(measured),
            "data_wait_fraction": sum(w for _, w in measured) / len(measured),
            "per_epoch_images_per_s": [r for r, _ in per_epoch]}


# ==== steps that run in a child process of this script ============================================
def child_environment(s: dict) -> dict:
    import importlib.metadata

    import torch

    from relabel_dali import ops

    gpus = nvidia_smi()
    dali = [f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    try:  # also where DALI was unpacked onto PYTHONPATH without its package metadata
        import nvidia.dali

        dali.append(f"nvidia.dali {nvidia.dali.__version__} from {Path(nvidia.dali.__file__).parent}")
    except ImportError:
        pass
    nvcc = ops.find_nvcc()
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None

    def version(find):
        try:
            return ops._short_version(ops.compiler_version(find()))
        except ops.BuildError as error:  # the build step reports it as its failure
            return f"unusable: {error}"

    numbers = {
        "gpus": gpus, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torch_gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if s["device"] == "cuda" else [],
        "dali": dali or None, "nvcc": version(lambda: nvcc) if nvcc else None, "cxx": version(ops.host_compiler),
        "cuda_archs": os.environ.get("RELABEL_DALI_CUDA_ARCHS"), "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "dev_shm_free_gib": None if shm is None else round(shm.free / 2 ** 30, 2)}
    if s["device"] == "cuda" and not numbers["torch_gpus"]:
        raise StepFailure("--device cuda, but torch finds no GPU" + ("" if gpus else " (nor does nvidia-smi)"))
    return numbers


def child_build(s: dict) -> dict:
    from relabel_dali import ops

    nvcc = ops.find_nvcc()
    if s["device"] == "cuda" and nvcc is None:
        raise StepFailure("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the GPU kernels cannot be built; "
                          "install the CUDA toolkit or set CUDA_HOME")
    numbers = {"nvcc": nvcc, "cuda_archs": ops.cuda_archs() if nvcc else []}
    parts = [("capi", ops.build_capi, "label_pool_capi")]
    if not s["no_dali"]:
        parts.append(("plugin", ops.build_plugin, None))
    for name, build, _ in parts:
        started = time.perf_counter()
        try:
            path = build()
        except ops.BuildError as error:
            raise StepFailure(f"{name}: {error}") from None
        numbers[f"{name}_seconds"] = time.perf_counter() - started
        numbers[f"{name}_path"] = str(path)
    numbers["built_now"] = ops.build_info()["built_now"]  # False: found in the cache
    return numbers


def edge_boxes(h: int, w: int):
    """The whole image, single cells at the corners and the centre, one-cell strips along each border."""
    import torch

    cells = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    boxes = [(0.0, 0.0, 1.0, 1.0)] + [(x / w, y / h, (x + 1) / w, (y + 1) / h) for y, x in cells]
    boxes += [(0.0, 0.0, 1 / w, 1.0), (1 - 1 / w, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1 / h), (0.0, 1 - 1 / h, 1.0, 1.0)]
    return torch.tensor(boxes, dtype=torch.float32)


def stored_scores(scores, dtype: str):
    """(scores as stored, scale, offset, the floats they stand for) for one score dtype."""
    import numpy as np
    import torch

    from relabel_dali import format as fmt

    if dtype == "float32":
        return scores, None, None, scores
    if dtype == "float16":
        half = scores.half()
        return half, None, None, half.float()
    encoded = [fmt.encode_scores(sample, fmt.score_dtype_code("uint8")) for sample in scores.numpy()]
    stored = torch.from_numpy(np.stack([q for q, _, _ in encoded]))
    decoded = torch.from_numpy(np.stack([fmt.decode_scores(q, a, b) for q, a, b in encoded]))
    return (stored, torch.tensor([a for _, a, _ in encoded]), torch.tensor([b for _, _, b in encoded]),
            decoded.float())


def constant(value):
    """A source callable without parameters (DALI passes batch information to one that has any)."""
    return lambda: value


def pool_with_operator(scores, class_ids, boxes, mode: str, device: str, scale=None, offset=None):
    """fn.label_pool over one batch in a one-off pipeline (inputs on the GPU for device cuda)."""
    import numpy as np
    import torch

    from relabel_dali.ops import load_operators

    load_operators()
    from nvidia.dali import fn, pipeline_def

    arrays = [scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy()]
    if scale is not None:
        arrays += [scale.numpy().astype(np.float32), offset.numpy().astype(np.float32)]

    @pipeline_def(batch_size=len(scores), num_threads=min(4, os.cpu_count() or 1),
                  device_id=0 if device == "cuda" else None, prefetch_queue_depth=1)
    def pipeline():
        inputs = [fn.external_source(source=constant(a), batch=True) for a in arrays]
        s, i, b = inputs[:3]
        if device == "cuda":
            s, i = s.gpu(), i.gpu()
        extra = {"scale": inputs[3], "offset": inputs[4]} if scale is not None else {}
        return fn.label_pool(s, i, b, mode=mode, device="gpu" if device == "cuda" else "cpu", **extra)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    if device == "cuda":
        out = out.as_cpu()
    return torch.from_numpy(np.array(out.as_tensor()))


def child_parity(s: dict) -> dict:
    """Every backend against the literal reference, and the GPU backends against the CPU ones, for
    each mode and score dtype. Argmax modes: only rows whose top two pooled scores are clearly
    apart (reference.clear_top2), where every correct argmax agrees."""
    import torch

    from relabel_dali.pooling import pool_labels
    from relabel_dali.reference import MODES, clear_top2, random_boxes, random_topk_maps, reference_pool

    n, device = s["parity_batch"], s["device"]
    g = torch.Generator().manual_seed(1)
    scores, class_ids = random_topk_maps(n, 5, 15, 15, 1000, g)
    boxes = random_boxes(n, g)
    edges = edge_boxes(15, 15)
    boxes[:len(edges)] = edges
    diffs, clear_fractions = {}, {}
    for dtype in ("float32", "float16", "uint8"):
        stored, scale, offset, floats = stored_scores(scores, dtype)
        soft = {}
        for mode in MODES:  # each softmax mode before its argmax mode
            expected = torch.cat([reference_pool(floats[i:i + 256], class_ids[i:i + 256], boxes[i:i + 256], 1000, mode)
                                  for i in range(0, n, 256)])
            got = {}
            for where in ["cpu", "cuda"] if device == "cuda" else ["cpu"]:
                def to(t):
                    return None if t is None else t.to(where)
                got[f"pool_labels_{where}"] = pool_labels(to(stored), to(class_ids), to(boxes), 1000, mode,
                                                          to(scale), to(offset)).cpu()
                if not s["no_dali"]:
                    got[f"operator_{where}"] = pool_with_operator(stored, class_ids, boxes, mode, where, scale, offset)
            rows = torch.ones(n, dtype=torch.bool)
            if mode.endswith("argmax"):
                rows = clear_top2(soft[mode.replace("argmax", "softmax")])
                clear_fractions[f"{dtype}/{mode}"] = float(rows.float().mean())
            else:
                soft[mode] = expected
            pairs = [(name, expected) for name in got]
            if device == "cuda":
                pairs += [(f"{kind}_cuda_vs_cpu", got[f"{kind}_cpu"]) for kind in ("pool_labels", "operator")
                          if f"{kind}_cpu" in got]
            for name, against in pairs:
                mine = got[name.replace("_vs_cpu", "")]
                diffs[f"{name}/{dtype}/{mode}"] = float((mine[rows] - against[rows]).abs().max())
    worst = max(diffs, key=diffs.get)
    numbers = {"batch": n, "edge_boxes": len(edges), "tolerance": TOLERANCE, "worst_abs_diff": diffs[worst],
               "worst": worst, "min_clear_fraction_argmax": min(clear_fractions.values()),
               "max_abs_diff": diffs, "clear_fraction_argmax": clear_fractions}
    bad = [f"{k} = {v:.3g}" for k, v in diffs.items() if not v <= TOLERANCE]
    if bad:
        raise StepFailure(f"{len(bad)} of {len(diffs)} comparisons exceed {TOLERANCE}: " + "; ".join(bad[:6]),
                          numbers)
    # Near-ties must stay rare, or the comparison would prove little. uint8 scores make them more
    # common, most of all for the one-cell edge boxes (a cell's own quantized scores).
    if numbers["min_clear_fraction_argmax"] < 0.95:
        raise StepFailure(f"argmax modes: only {numbers['min_clear_fraction_argmax']:.3f} of the rows have a clear "
                          f"top-2 gap (expected >= 0.95)", numbers)
    return numbers


def child_data(s: dict) -> dict:
    import torch
    import torchvision

    from relabel_dali.benchdata import make_benchmark_data

    work = Path(s["work"])
    started = time.perf_counter()
    done = [0]

    def progress(count):
        done[0] += count
        print(f"data: {done[0]}/{s['images']} images", flush=True)

    data = make_benchmark_data(work / "data", s["images"], val_count=s["val_images"], sizes=tuple(s["sizes"]),
                               workers=s["cpu_count"], progress=progress)
    torch.manual_seed(0)
    model = torchvision.models.get_model(s["arch"], weights=None, num_classes=1000)
    torch.save(model.state_dict(), work / "data" / "annotator.pth")  # random weights: speed only
    return {"images": data.count, "val_images": s["val_images"], "sizes": s["sizes"],
            "seconds": time.perf_counter() - started}


def child_train(s: dict, variant: str) -> dict:
    import torch

    data = Path(s["work"]) / "data"
    if variant == "fixed_batch":  # the model's own speed: one batch, already on the device
        g = torch.Generator().manual_seed(0)
        batch = {"images": torch.randn(s["train_batch"], 3, s["image_size"], s["image_size"], generator=g),
                 "targets": torch.softmax(torch.randn(s["train_batch"], 1000, generator=g), 1)}
        batch = {k: v.to(s["device"]) for k, v in batch.items()}
        steps = s["images"] // s["train_batch"]
        return train_loop(lambda: (batch for _ in range(steps)), steps, s)
    from relabel_dali.official import OfficialStyleLoader

    loader = OfficialStyleLoader(data / "train", data / "pt" if variant == "official" else None,
                                 batch_size=s["train_batch"], image_size=s["image_size"], workers=s["cpu_count"],
                                 device=s["device"])
    return {**train_loop(lambda: iter(loader), len(loader), s), "workers": s["cpu_count"]}


def run_child(step: str, work: Path) -> int:
    s = json.loads((work / "settings.json").read_text())
    result = {"status": "pass", "reason": "", "numbers": {}}
    try:
        if step.startswith("train_"):
            result["numbers"] = child_train(s, step.removeprefix("train_"))
        else:
            result["numbers"] = globals()[f"child_{step}"](s)
    except StepFailure as failure:
        result.update(status="fail", reason=failure.reason, numbers=failure.numbers)
    except StepSkipped as why:
        result.update(status="skip", reason=str(why))
    from relabel_dali.atomic import atomic_write_bytes

    (work / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / "results" / f"{step}.json", (json.dumps(result, indent=1) + "\n").encode())
    return 0


# ==== main ======================================================================================
def nvidia_smi() -> list[dict]:
    """The GPUs nvidia-smi lists (no CUDA context is created), or [] without nvidia-smi or GPUs."""
    fields = ["name", "memory.total", "driver_version", "compute_cap"]
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    rows = [[v.strip() for v in line.split(",")] for line in result.stdout.strip().splitlines() if line.strip()]
    return [dict(zip(["name", "memory_mib", "driver", "compute_capability"], row)) for row in rows]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
