#!/usr/bin/env python
"""The paper's Table 2 in miniature: train with each kind of label, N seeds each, and tabulate.

    python tools/ablate.py [--config configs/demo.yaml] [--methods softmax argmax global_softmax
        global_argmax onehot] [--seeds 3] [--out runs/ablation] [-- TRAIN.PY OVERRIDES ...]

Each (method, seed) is one ``train.py`` run in OUT/<method>/seed<S> with the same recipe:
``--data.relabel.pool_mode METHOD`` for the four ways of turning label maps into targets
(localized/global x multi/single label), ``--data.relabel.use false`` for the original one-hot
labels, ``--compute.seed S``. Anything after ``--`` goes to every run (``-- --optim.epochs 2``).

Rerunning keeps finished runs (a checkpoint at the last epoch, made with the same settings),
resumes interrupted ones and trains the missing ones; a run folder holding different settings
stops the tool rather than being mixed in. The numbers are the last evaluation's top-1/top-5,
read from each run's own metrics.json (train.py writes it beside its checkpoints). Outputs, written
atomically: OUT/results.json (every run, the commit it ran on), OUT/table.md (mean +- sample std
over seeds, the paper's ResNet-50 ImageNet top-1 beside it) and OUT/chart.png.

Exit codes: 0 done; 1 a training run failed; 2 bad arguments or a run folder with other settings.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from relabel_dali.atomic import atomic_write_bytes
from relabel_dali.train.checkpoint import LAST_NAME, load_checkpoint
from relabel_dali.config import ConfigError, parse_command_line, to_plain
from relabel_dali.train.engine import METRICS_NAME

REPO = Path(__file__).resolve().parent.parent

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ONEHOT = "onehot"
# Method -> (the paper's name for the label type, the paper's ResNet-50 ImageNet top-1 where known).
# Yun et al., CVPR 2021: original labels 77.5, ReLabel (localized multi-labels) 78.9; the other rows'
# values are not given here.
METHODS = {
    "softmax": ("localized multi-label (ReLabel)", 78.9),
    "argmax": ("localized single-label", None),
    "global_softmax": ("global multi-label", None),
    "global_argmax": ("global single-label", None),
    ONEHOT: ("original one-hot", 77.5),
}
# Train-time settings every run gets first (the user's overrides come after and win).
RUN_DEFAULTS = ("--util.progress", "false")


@dataclass
class RunResult:
    method: str
    seed: int
    top1: float
    top5: float
    epoch: int
    run_dir: str


class AblationError(Exception):
    """Bad settings or a run folder that cannot be used; the message names the folder and field."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="train.py config file")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="pool modes to compare, and 'onehot' for the original labels (default: all five)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0..N-1 (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="folder for the runs and results")
    parser.add_argument("--title", default="ReLabel label types", help="chart title")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be positive, got {args.seeds}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods lists a method twice: {' '.join(args.methods)}")
    return args, overrides


def train_argv(config: Path, method: str, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    label_flags = ["--data.relabel.use", "false"] if method == ONEHOT else ["--data.relabel.pool_mode", method]
    return ["--config-file-path", str(config), *RUN_DEFAULTS, *overrides, *label_flags,
            "--compute.seed", str(seed), "--util.output_dir", str(run_dir)]


def differing_keys(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key, "<missing>"), wanted.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: run has {a!r}, wanted {b!r}")
    return keys


def finished_result(run_dir: Path, wanted: dict, method: str, seed: int) -> RunResult | None:
    """The run's result (its metrics.json) when its last checkpoint is final and has the wanted settings."""
    path = run_dir / LAST_NAME
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    differences = differing_keys(state.get("config", {}), wanted)
    if differences:
        raise AblationError(f"{path} was made with other settings ({'; '.join(differences[:3])}); "
                            f"remove {run_dir} or choose another --out")
    if state["epoch"] < wanted["optim"]["epochs"]:
        return None
    metrics_path = run_dir / METRICS_NAME
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AblationError(f"{metrics_path}: unreadable ({error}); the run at {path} is finished") from None
    if metrics.get("epoch") != state["epoch"]:
        raise AblationError(f"{metrics_path}: epoch {metrics.get('epoch')!r}, but {path} is at epoch {state['epoch']}")
    for name in ("top1", "top5"):
        if not isinstance(metrics.get(name), (int, float)):
            raise AblationError(f"{metrics_path}: no number {name!r} (has {sorted(metrics)})")
    return RunResult(method, seed, float(metrics["top1"]), float(metrics["top5"]), int(metrics["epoch"]), str(run_dir))


def train(argv: list[str], log_path: Path) -> int:
    """Runs train.py, keeping its output in log_path and echoing its per-epoch lines."""
    command = [sys.executable, str(REPO / "train.py"), *argv, "--resume", "auto"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run as it goes
    with open(log_path, "a") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=environment) as process:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        for line in process.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("epoch ", "resumed ")):
                print("    " + line.rstrip(), flush=True)
    return process.returncode


def run_all(args, overrides: list[str]) -> list[RunResult]:
    plan = [(m, s) for m in args.methods for s in range(args.first_seed, args.first_seed + args.seeds)]
    results = []
    for number, (method, seed) in enumerate(plan, 1):
        run_dir = args.out / method / f"seed{seed}"
        argv = train_argv(args.config, method, seed, run_dir, overrides)
        try:
            wanted = to_plain(parse_command_line(argv)[0])
        except ConfigError as error:
            raise AblationError(str(error)) from None
        prefix = f"[{number}/{len(plan)}] {method} seed {seed}"
        result = finished_result(run_dir, wanted, method, seed)
        if result is None:
            print(f"{prefix}: training ({run_dir / 'train.log'})", flush=True)
            started = time.perf_counter()
            code = train(argv, run_dir / "train.log")
            if code != 0:
                raise RuntimeError(f"{prefix}: train.py exited with {code}; see {run_dir / 'train.log'}")
            result = finished_result(run_dir, wanted, method, seed)
            if result is None:
                raise RuntimeError(f"{prefix}: train.py finished but {run_dir / LAST_NAME} is not at the last epoch")
            took = f" in {time.perf_counter() - started:.0f} s"
        else:
            took = " (kept from an earlier run)"
        print(f"{prefix}: top-1 {result.top1:.2f}  top-5 {result.top5:.2f}{took}", flush=True)
        results.append(result)
    return results


def summarize(results: list[RunResult], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        row = {"method": method, "labels": METHODS[method][0], "paper_top1": METHODS[method][1],
               "runs": len(runs), "seeds": [r.seed for r in runs]}
        for name in ("top1", "top5"):
            values = [getattr(r, name) for r in runs]
            row[name] = values
            row[f"{name}_mean"] = statistics.fmean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| labels | method | runs | top-1 (%) | top-5 (%) | top-1 per seed | paper top-1 (%) |",
             "|---|---|---:|---:|---:|---|---:|"]
    for row in rows:
        paper = "n/a" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        per_seed = ", ".join(f"{v:.2f}" for v in row["top1"])
        lines.append(f"| {row['labels']} | `{row['method']}` | {row['runs']} | "
                     f"{mean_std(row['top1_mean'], row['top1_std'])} | {mean_std(row['top5_mean'], row['top5_std'])} | "
                     f"{per_seed} | {paper} |")
    return "\n".join(lines) + "\n"


def chart_png(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["labels"].replace(" (", "\n(") for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4.2), constrained_layout=True)
    for ax, metric, label in zip(axes, ("top1", "top5"), ("top-1 accuracy (%)", "top-5 accuracy (%)")):
        means = [row[f"{metric}_mean"] for row in rows]
        errors = [row[f"{metric}_std"] or 0.0 for row in rows]
        positions = range(len(rows))
        bars = ax.bar(positions, means, yerr=errors, capsize=4, color=[f"C{i}" for i in positions], alpha=0.75)
        for i, row in enumerate(rows):
            ax.plot([i] * len(row[metric]), row[metric], "k.", markersize=5)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", fontsize=9)
        values = [v for row in rows for v in row[metric]]
        low = max(0.0, min(values) - 10.0)
        ax.set_ylim(low, min(100.0, max(values) + 2.0) + 0.5)
        ax.set_xticks(list(positions), names, fontsize=8, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    runs = sorted({row["runs"] for row in rows})
    spread = "one run each" if runs == [1] else f"mean ± std over {'/'.join(map(str, runs))} seeds, dots = single runs"
    figure.suptitle(f"{title}: {spread}", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def commit_of(repo: Path) -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=repo,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write_outputs(args, overrides: list[str], results: list[RunResult], rows: list[dict]) -> str:
    table = markdown_table(rows)
    record = {"config": str(args.config), "overrides": overrides, "commit": commit_of(REPO),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "runs": [asdict(r) for r in results], "summary": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", (json.dumps(record, indent=1) + "\n").encode())
    atomic_write_bytes(args.out / "table.md", table.encode())
    atomic_write_bytes(args.out / "chart.png", chart_png(rows, args.title))
    return table


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = run_all(args, overrides)
    except AblationError as error:
        print(f"ablate.py: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:
        print(f"ablate.py: {error}", file=sys.stderr)
        return EXIT_FAILED
    rows = summarize(results, args.methods)
    table = write_outputs(args, overrides, results, rows)
    print()
    print(table, end="")
    print(f"\n{args.out / 'table.md'}, {args.out / 'chart.png'}, {args.out / 'results.json'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
