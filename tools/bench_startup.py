#!/usr/bin/env python
"""Benchmark what every ``train.py`` process pays before and after its training: start-up (imports,
data, model) and exit (pipelines, worker processes, the interpreter's teardown).

    python tools/bench_startup.py [--tree PATH] [--repeats N] [--json PATH] [--only NAME ...]

Cases, each a fresh process (or processes) in ``--tree`` (default: this checkout; another checkout
or an unpacked ``git archive`` of an older commit measures that one with the same data):

- ``import``: ``python -c "import train"``
- ``config_error``: ``python train.py --optim.epoch 3`` (a misspelt key: exit 2 after parsing)
- ``tiny_run``: one process, 2 epochs of a 24-image, 3-class set at 32 px (MobileNetV3-small x0.25,
  gloo not involved), as ``tests/test_multinode.py`` trains it
- ``two_nodes``: the same run under two ``torchrun`` launchers as two nodes (c10d rendezvous on
  127.0.0.1, gloo): the unit ``tests/test_multinode.py`` starts three times

Per case: median wall seconds and median CPU seconds (user + system of the process and all it
waited for: DALI workers, the trainers under torchrun), over ``--repeats`` runs, with the 1-minute
load average seen at each start: on a shared machine the load moves the wall times a lot; compare
two trees by running both in one invocation each, back to back, at a similar load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from relabel_dali.atomic import atomic_write_bytes  # noqa: E402
from relabel_dali.data.benchdata import write_tiny_dataset  # noqa: E402
from tools.ablate import cpu_model  # noqa: E402


CASES = ("import", "config_error", "tiny_run", "two_nodes")


def run_argv(data: Path, out: Path) -> list[str]:
    return ["--data.data_path", str(data), "--data.relabel.path", str(data / "labels"), "--data.class_map", "folder",
            "--data.num_classes", "3", "--data.image_size", "32", "--model.arch", "mobilenet_v3_small",
            "--model.kwargs", "{width_mult: 0.25}", "--optim.batch_size", "8", "--optim.lr.base_batch_size", "8",
            "--util.val_batch_size", "8", "--optim.epochs", "2", "--optim.warmup.epochs", "1",
            "--data.num_threads", "1", "--data.py_workers", "1", "--compute.device", "cpu",
            "--util.progress", "False", "--util.tensorboard", "false", "--util.trace_ranks", "true",
            "--util.output_dir", str(out)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commands(case: str, data: Path, out: Path) -> list[list[str]]:
    python = sys.executable
    if case == "import":
        return [[python, "-c", "import train"]]
    if case == "config_error":
        return [[python, "train.py", "--optim.epoch", "3"]]
    if case == "tiny_run":
        return [[python, "train.py", *run_argv(data, out)]]
    launcher = [python, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=bench", "--local-addr=127.0.0.1",
                "--max-restarts=0", "train.py", *run_argv(data, out)]
    return [launcher, launcher]


def measure(case: str, tree: Path, data: Path, scratch: Path) -> dict:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    processes = [subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for command in commands(case, data, out)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    expected = 2 if case == "config_error" else 0
    for process, output in zip(processes, outputs):
        if process.returncode != expected:
            raise SystemExit(f"{case}: exit {process.returncode}, expected {expected}:\n{output[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_1min": load}


def tree_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    if done.returncode != 0:
        return "unknown (not a git checkout)"
    return done.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose train.py is measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    if not (tree / "train.py").is_file():
        parser.error(f"--tree {tree}: no train.py there")

    report = {"tree": str(tree), "commit": tree_commit(tree), "host_cpu": cpu_model(), "cpus": os.cpu_count(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "repeats": args.repeats, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        scratch = Path(scratch)
        data = write_tiny_dataset(scratch / "data")
        runs = {case: [] for case in args.only}
        for _ in range(args.repeats):  # the cases interleaved, so that a change of load touches all of them
            for case in args.only:
                runs[case].append(measure(case, tree, data, scratch))
    for case, measured in runs.items():
        report["cases"][case] = {
            "wall_s": round(statistics.median(m["wall_s"] for m in measured), 2),
            "cpu_s": round(statistics.median(m["cpu_s"] for m in measured), 2),
            "load_1min": [round(m["load_1min"], 2) for m in measured],
            "runs": [{k: round(v, 3) for k, v in m.items()} for m in measured]}
    print(f"{report['commit']}  {report['host_cpu']} x{report['cpus']}  {report['date']}")
    for case, figures in report["cases"].items():
        loads = figures["load_1min"]
        print(f"  {case:13s} wall {figures['wall_s']:6.2f} s  CPU {figures['cpu_s']:6.2f} s  "
              f"(median of {len(loads)}; load {min(loads):.1f}-{max(loads):.1f})")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
