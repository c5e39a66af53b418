#!/usr/bin/env python
"""The paper's Table 2 in miniature: train with each kind of label, N seeds each, and tabulate.

    python tools/ablate.py [--config configs/demo.yaml] [--methods softmax argmax global_softmax
        global_argmax onehot] [--seeds 5] [--out runs/ablation] [--report docs/results/NAME]
        [--no-pin] [-- TRAIN.PY OVERRIDES ...]

Each (method, seed) is one ``train.py`` run in OUT/<method>/seed<S> with the same recipe:
``--data.relabel.pool_mode METHOD`` for the four ways of turning label maps into targets
(localized/global x multi/single label), ``--data.relabel.use false`` for the original one-hot
labels, ``--compute.seed S``; ``tokens`` (not among the defaults; for a timm ViT student) adds
token labels: softmax targets for the class token and ``--data.relabel.token_size`` set to the
student's patch grid. Anything after ``--`` goes to every run (``-- --optim.epochs 2``).

The runs get the same CPU kernels on any x86-64 machine with AVX2 (PINNED_CPU_ENV: torch's and
oneDNN's vector instructions capped at AVX2, MKL's reproducible AVX2 path, 2 threads), so that a
seed's numbers do not depend on the machine's instruction set or core count; ``--no-pin`` runs
with the environment as it is (faster on AVX-512, not comparable across machines).

Rerunning keeps finished runs (a checkpoint at the last epoch, made with the same settings, CPU
pin and input files), resumes interrupted ones and trains the missing ones; a run folder holding
other settings or made from other data stops the tool rather than being mixed in (``--replace-stale``,
which make demo and make ablation pass, retrains it instead). The numbers are
the last evaluation's, read from each run's own metrics.json (train.py writes it beside its
checkpoints): top-1/top-5 and, with ``data.real_labels``, the multi-label figures (ReaL top-1,
recall@2). With one-hot labels among the methods, every other method is compared with them seed
by seed (paired differences: mean, std, Student's t 95 % interval, seeds better/worse/equal).

Outputs, written atomically: OUT/results.json (every run, the commit, machine and CPU settings),
OUT/table.md (the report: provenance line, the table, the paired comparison, the per-seed values)
and OUT/chart.png. ``--report docs/results/NAME`` also writes NAME.md/.json/.png there and
refreshes every copy of NAME.md in README.md and docs/*.md (between ``<!-- BEGIN path -->`` and
``<!-- END path -->``), so the documents show exactly what the command printed.

Exit codes: 0 done; 1 a training run failed; 2 bad arguments or a run folder with other settings.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
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
# Token labeling (TokenLabeling / LV-ViT), for a timm ViT student: ReLabel's softmax targets for the
# class token plus S x S token targets for an auxiliary per-token head (data.relabel.token_size S,
# the student's patch grid). Not among the default methods (make demo-tokens asks for it).
TOKENS = "tokens"
TOKEN_METHODS = {TOKENS: ("token labels (class token + tokens)", None)}
ALL_METHODS = {**METHODS, **TOKEN_METHODS}
# Train-time settings every run gets first (the user's overrides come after and win).
RUN_DEFAULTS = ("--util.progress", "false")
# What two x86-64 machines running the same commit may otherwise do differently (measured in
# docs/ABLATION.md: each of these alone changes a run's weights): torch's vectorized kernels and
# oneDNN's convolutions are chosen by instruction set (AVX-512 where present), MKL's GEMM likewise,
# and torch uses as many threads as there are cores, which changes how sums are split. Capped at
# AVX2, which every x86-64 server CPU since 2013-2015 has; 2 threads, what the demo was sized for.
PINNED_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
IDENTITY_NAME = "ablate_run.json"
# Metrics read from metrics.json (None where the run has no ReaL labels); single_top1 is derived:
# top-1 on the images without a ReaL entry (the demo's single-object images).
METRICS = ("top1", "single_top1", "top5", "real_top1", "real_label_top1", "real_recall2")
# Compared with one-hot labels seed by seed.
PAIRED_METRICS = ("top1", "single_top1", "real_top1", "real_recall2")
METRIC_NAMES = {"top1": "top-1, all", "single_top1": "top-1, single-object", "top5": "top-5",
                "real_top1": "ReaL top-1, composites", "real_label_top1": "folder-label top-1, composites",
                "real_recall2": "recall@2, composites"}
# Student's t, two-sided 95 %, by degrees of freedom (1..30; beyond, the normal 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass
class RunResult:
    method: str
    seed: int
    top1: float
    top5: float
    epoch: int
    run_dir: str
    samples: int | None = None
    real_top1: float | None = None
    real_label_top1: float | None = None
    real_recall2: float | None = None
    real_samples: int | None = None
    seconds: float | None = None  # training time, when trained by this invocation

    @property
    def single_top1(self) -> float | None:
        """Top-1 on the images without a ReaL entry, from the counts behind the percentages."""
        if None in (self.samples, self.real_samples, self.real_label_top1) or self.samples == self.real_samples:
            return None
        correct = round(self.top1 * self.samples / 100) - round(self.real_label_top1 * self.real_samples / 100)
        return 100.0 * correct / (self.samples - self.real_samples)


class AblationError(Exception):
    """Bad settings or a run folder that cannot be used; the message names the folder and field."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="train.py config file")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS),
                        help="pool modes to compare, 'onehot' for the original labels, 'tokens' for token labels "
                             "(a timm ViT student; default: the five label types)")
    parser.add_argument("--seeds", type=int, default=5, help="runs per method, seeds 0..N-1 (default 5)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="folder for the runs and results")
    parser.add_argument("--title", default="ReLabel label types", help="chart and report title")
    parser.add_argument("--report", type=Path, metavar="PREFIX",
                        help="also write PREFIX.md/.json/.png and refresh their copies in README.md and docs/")
    parser.add_argument("--replace-stale", action="store_true",
                        help="retrain a run folder made with other settings or inputs instead of stopping")
    parser.add_argument("--no-pin", action="store_true",
                        help="run with the CPU environment as it is (PINNED_CPU_ENV not applied)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be positive, got {args.seeds}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods lists a method twice: {' '.join(args.methods)}")
    return args, overrides


def token_grid(config: Path, overrides: list[str]) -> int:
    """Tokens per side of the recipe's student (a timm ViT): its patch grid at data.image_size."""
    from relabel_dali.train.models import TIMM_PREFIX, build_timm_model

    cfg, _ = parse_command_line(["--config-file-path", str(config), *overrides])
    arch = cfg.model.arch
    grid = None
    if arch.startswith(TIMM_PREFIX):
        model = build_timm_model(arch.removeprefix(TIMM_PREFIX), cfg.data.num_classes, dict(cfg.model.kwargs),
                                 image_size=cfg.data.image_size)
        grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
    if not grid or grid[0] != grid[1]:
        raise ConfigError(f"--methods {TOKENS}: model.arch {arch!r} has no square patch grid; token labels need a "
                          "timm vision transformer")
    return int(grid[0])


def train_argv(config: Path, method: str, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    if method == ONEHOT:
        label_flags = ["--data.relabel.use", "false"]
    elif method == TOKENS:
        label_flags = ["--data.relabel.pool_mode", "softmax", "--data.relabel.token_size",
                       str(token_grid(config, overrides))]
    else:
        label_flags = ["--data.relabel.pool_mode", method]
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


def input_fingerprint(wanted: dict, method: str) -> dict:
    """What the run reads besides its settings: the data folder's manifest, the label shards (names,
    sizes, modification times) and the ReaL file, so that a run made from other data is not kept."""
    data = wanted["data"]
    found = {}
    manifest = Path(data["data_path"]) / "manifest.json"
    if manifest.is_file():
        found["data_manifest"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    labels = Path(data["relabel"]["path"] or "")
    if method != ONEHOT and data["relabel"]["use"] and labels.is_dir():
        files = sorted(p for p in labels.iterdir() if p.is_file() and p.suffix in (".json", ".rls", ".keys"))
        listing = "".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}\n" for p in files)
        found["labels"] = hashlib.sha256(listing.encode()).hexdigest()
    if data.get("real_labels") and Path(data["real_labels"]).is_file():
        found["real_labels"] = hashlib.sha256(Path(data["real_labels"]).read_bytes()).hexdigest()
    return found


def check_identity(run_dir: Path, identity: dict) -> None:
    path = run_dir / IDENTITY_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if saved != identity:
        what = "no record of its CPU settings and input files" if saved is None else \
            "; ".join(differing_keys(saved, identity)[:3])
        raise AblationError(f"{run_dir} was made with other CPU settings or input data ({what}); "
                            f"remove {run_dir} (make clean-demo removes the demo's runs) or choose another --out")


def finished_result(run_dir: Path, wanted: dict, method: str, seed: int, identity: dict | None = None) -> RunResult | None:
    """The run's result (its metrics.json) when its last checkpoint is final and has the wanted
    settings; ``identity`` (CPU settings, input files) must match the run's record too."""
    path = run_dir / LAST_NAME
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    differences = differing_keys(state.get("config", {}), wanted)
    if differences:
        raise AblationError(f"{path} was made with other settings ({'; '.join(differences[:3])}); "
                            f"remove {run_dir} or choose another --out")
    if identity is not None:
        check_identity(run_dir, identity)
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
    optional = {name: metrics.get(name) for name in ("samples", "real_top1", "real_label_top1", "real_recall2",
                                                     "real_samples")}
    return RunResult(method, seed, float(metrics["top1"]), float(metrics["top5"]), int(metrics["epoch"]),
                     str(run_dir), **optional)


def child_environment(pin: bool) -> dict[str, str]:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run as it goes
    return {**environment, **PINNED_CPU_ENV} if pin else environment


def train(argv: list[str], log_path: Path, pin: bool = True) -> int:
    """Runs train.py, keeping its output in log_path and echoing its per-epoch lines."""
    command = [sys.executable, str(REPO / "train.py"), *argv, "--resume", "auto"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=child_environment(pin)) as process:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        for line in process.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("epoch ", "resumed ")):
                # Epochs without an evaluation (util.val_every) have no accuracy yet.
                print("    " + line.rstrip().replace("top1 nan  top5 nan", "(not evaluated)"), flush=True)
    return process.returncode


def run_all(args, overrides: list[str], loads: list[float] | None = None) -> list[RunResult]:
    """Every (method, seed) run, kept or trained; ``loads`` collects the 1-minute load average
    before and after each training."""
    plan = [(m, s) for m in args.methods for s in range(args.first_seed, args.first_seed + args.seeds)]
    cpu_env = None if args.no_pin else PINNED_CPU_ENV
    results = []
    for number, (method, seed) in enumerate(plan, 1):
        run_dir = args.out / method / f"seed{seed}"
        try:
            argv = train_argv(args.config, method, seed, run_dir, overrides)
            wanted = to_plain(parse_command_line(argv)[0])
        except ConfigError as error:
            raise AblationError(str(error)) from None
        identity = {"cpu_env": cpu_env, "inputs": input_fingerprint(wanted, method)}
        prefix = f"[{number}/{len(plan)}] {method} seed {seed}"
        try:
            result = finished_result(run_dir, wanted, method, seed, identity)
        except AblationError as error:
            if not args.replace_stale:
                raise
            print(f"{prefix}: replacing {run_dir}: {error}", flush=True)
            shutil.rmtree(run_dir)
            result = None
        if result is None:
            print(f"{prefix}: training ({run_dir / 'train.log'})", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / IDENTITY_NAME, (json.dumps(identity, indent=1) + "\n").encode())
            if loads is not None:
                loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            code = train(argv, run_dir / "train.log", pin=not args.no_pin)
            if code != 0:
                raise RuntimeError(f"{prefix}: train.py exited with {code}; see {run_dir / 'train.log'}")
            seconds = time.perf_counter() - started
            if loads is not None:
                loads.append(os.getloadavg()[0])
            result = finished_result(run_dir, wanted, method, seed, identity)
            if result is None:
                raise RuntimeError(f"{prefix}: train.py finished but {run_dir / LAST_NAME} is not at the last epoch")
            result.seconds = seconds
            took = f" in {seconds:.0f} s"
        else:
            took = " (kept from an earlier run)"
        real = "" if result.real_top1 is None else \
            f"  ReaL top-1 {result.real_top1:.2f}  recall@2 {result.real_recall2:.2f} (composites)"
        print(f"{prefix}: top-1 {result.top1:.2f}  top-5 {result.top5:.2f}{real}{took}", flush=True)
        results.append(result)
    return results


# ---- statistics ----------------------------------------------------------------------------------
def summarize(results: list[RunResult], methods: list[str]) -> list[dict]:
    """Per method: every metric's per-seed values, mean and sample std (None for one run or where
    a run lacks the metric)."""
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        row = {"method": method, "labels": ALL_METHODS[method][0], "paper_top1": ALL_METHODS[method][1],
               "runs": len(runs), "seeds": [r.seed for r in runs]}
        for name in METRICS:
            values = [getattr(r, name) for r in runs]
            if any(v is None for v in values) or not values:
                row[name], row[f"{name}_mean"], row[f"{name}_std"] = None, None, None
                continue
            row[name] = values
            row[f"{name}_mean"] = statistics.fmean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def difference_stats(differences: list[float]) -> dict:
    """Mean, sample std, Student's t 95 % interval of the mean, and how many are above/below/at 0."""
    n = len(differences)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences) if n > 1 else None
    half = None if std is None else (T975[n - 2] if n - 1 <= len(T975) else 1.96) * std / math.sqrt(n)
    return {"differences": differences, "n": n, "mean": mean, "std": std,
            "ci95": None if half is None else [mean - half, mean + half],
            "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences),
            "equal": sum(d == 0 for d in differences)}


def verdict(stats: dict) -> str:
    """What the interval allows one to say, in words."""
    if stats["ci95"] is None:
        return "one seed, no interval"
    low, high = stats["ci95"]
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "tie within noise"


def paired(results: list[RunResult], methods: list[str], baseline: str = ONEHOT) -> list[dict]:
    """Every method against ``baseline`` on the same seeds: per metric, the per-seed differences
    (method minus baseline, in points) and their statistics. Empty without the baseline."""
    base = {r.seed: r for r in results if r.method == baseline}
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method and r.seed in base]
        if method == baseline or not runs:
            continue
        row = {"method": method, "labels": ALL_METHODS[method][0], "baseline": baseline, "seeds": [r.seed for r in runs]}
        for name in PAIRED_METRICS:
            pairs = [(getattr(r, name), getattr(base[r.seed], name)) for r in runs]
            if any(a is None or b is None for a, b in pairs):
                row[name] = None
                continue
            # Rounded: two runs with the same count of correct images differ by exactly 0.
            row[name] = difference_stats([round(a - b, 9) for a, b in pairs])
        rows.append(row)
    return rows


# ---- provenance ----------------------------------------------------------------------------------
def git_lines(*command: str) -> list[str] | None:
    try:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.splitlines() if done.returncode == 0 else None


def commit_of(repo: Path = REPO) -> dict:
    """The commit checked out, and the tracked files that differ from it (they may have run too)."""
    head = git_lines("rev-parse", "--short=12", "HEAD")
    changed = git_lines("status", "--porcelain", "--untracked-files=no") or []
    return {"commit": head[0] if head else None, "modified": sorted(line[3:] for line in changed)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def effective_capability(pin: bool) -> str | None:
    """torch's vector instruction set in a child with the runs' environment (AVX2 unless the CPU lacks it)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=child_environment(pin))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def package_version(name: str, prefix: bool = False) -> str | None:
    """``name version`` of an installed distribution (with ``prefix``, the first whose name starts so)."""
    for distribution in metadata.distributions():
        found = (distribution.metadata["Name"] or "").lower()
        if found == name or (prefix and found.startswith(name)):
            return f"{found} {distribution.version}"
    return None


def machine(pin: bool) -> dict:
    flags = cpu_flags()
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags),
               "no AVX")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa": isa,
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
            "torch_capability": effective_capability(pin), "python": platform.python_version(),
            "torch": package_version("torch"), "dali": package_version("nvidia-dali", prefix=True)}


# ---- the report ----------------------------------------------------------------------------------
def mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def signed(value: float) -> str:
    return f"{value:+.2f}"


def provenance(record: dict) -> str:
    host, code = record["machine"], record["code"]
    modified = code["modified"]
    tree = "" if not modified else \
        f" ({len(modified)} tracked file{'s' * (len(modified) > 1)} differed from it: " + \
        ", ".join(f"`{m}`" for m in modified[:6]) + (", ..." if len(modified) > 6 else "") + ")"
    pin = "CPU kernels pinned (" + " ".join(f"`{k}={v}`" for k, v in record["cpu_env"].items()) + ")" \
        if record["cpu_env"] else "CPU kernels not pinned (`--no-pin`)"
    times = [r["seconds"] for r in record["runs"] if r["seconds"] is not None]
    timing = f"{len(times)} run(s) trained, {min(times):.0f}–{max(times):.0f} s each, {sum(times) / 60:.1f} min in all" \
        if times else "every run kept from an earlier invocation"
    load = record["load_average"]
    loaded = f"; 1-min load average {min(load):.1f}–{max(load):.1f} around the runs" if load else ""
    return (f"Commit `{code['commit']}`{tree}, {record['finished']}; {host['cpu']}, {host['cores']} cores "
            f"({host['isa']}; torch kernels used: {host['torch_capability']}); {host['torch']}, {host['dali']}; "
            f"{pin}. Settings: `{record['config']}`" + (f" with `{' '.join(record['overrides'])}`" if record["overrides"]
                                                       else "") + f". {timing}{loaded}.")


TABLE_METRICS = ("top1", "single_top1", "real_top1", "real_recall2", "top5")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| labels | method | runs | " + " | ".join(f"{METRIC_NAMES[m]} (%)" for m in TABLE_METRICS)
             + " | paper top-1 (%) |",
             "|---|---|---:|" + "---:|" * len(TABLE_METRICS) + "---:|"]
    for row in rows:
        paper = "n/a" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        cells = [mean_std(row[f"{name}_mean"], row[f"{name}_std"]) for name in TABLE_METRICS]
        lines.append(f"| {row['labels']} | `{row['method']}` | {row['runs']} | {' | '.join(cells)} | {paper} |")
    return "\n".join(lines) + "\n"


def paired_cell(stats: dict | None) -> str:
    """``+1.23 ± 1.40 (-0.50 to +2.96; 4/1/0)``: mean ± std, 95 % interval, seeds better/worse/equal."""
    if stats is None:
        return "n/a"
    spread = "" if stats["std"] is None else f" ± {stats['std']:.2f}"
    interval = "" if stats["ci95"] is None else f"{signed(stats['ci95'][0])} to {signed(stats['ci95'][1])}; "
    return f"{signed(stats['mean'])}{spread} ({interval}{stats['better']}/{stats['worse']}/{stats['equal']})"


def paired_table(pairs: list[dict]) -> str:
    if not pairs:
        return ""
    metrics = [m for m in PAIRED_METRICS if any(p[m] is not None for p in pairs)]
    lines = ["| minus one-hot, same seed (points) | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for row in pairs:
        lines.append(f"| {row['labels']} | " + " | ".join(paired_cell(row[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def paired_words(pairs: list[dict]) -> str:
    """One line per label type: what each paired interval allows one to say."""
    lines = ["In words (better or worse: the 95 % interval excludes 0; a tie within noise: it contains 0):\n"]
    for row in pairs:
        said = [f"{METRIC_NAMES[m]} {signed(row[m]['mean'])} {verdict(row[m])}" for m in PAIRED_METRICS
                if row[m] is not None]
        lines.append(f"- {row['labels']} − one-hot: " + "; ".join(said) + ".")
    return "\n".join(lines) + "\n"


def per_seed_table(rows: list[dict], metric: str) -> str:
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    lines = [f"| {METRIC_NAMES[metric]} (%) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for row in rows:
        values = dict(zip(row["seeds"], row[metric] or []))
        lines.append(f"| {row['labels']} | " + " | ".join(f"{values[s]:.2f}" if s in values else "" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(record: dict) -> str:
    rows, pairs = record["summary"], record["paired"]
    runs = record["runs"]
    samples = {r["samples"] for r in runs if r["samples"]}
    composites = {r["real_samples"] for r in runs if r["real_samples"]}
    parts = [f"<!-- Written by tools/ablate.py: do not edit; rerun the command below. -->\n",
             f"**{record['title']}**: `{record['command']}`\n",
             provenance(record) + "\n",
             markdown_table(rows)]
    if pairs:
        parts.append("Paired with the one-hot run of the same seed: the difference in points, mean ± std over "
                     "the seeds (95 % interval of the mean difference, Student's t; seeds better/worse/equal):\n")
        parts.append(paired_table(pairs))
        parts.append(paired_words(pairs))
    parts.append(per_seed_table(rows, "top1"))
    if all(row["real_top1"] is not None for row in rows):
        parts.append(per_seed_table(rows, "real_top1"))
    scale = []
    if len(samples) == 1:
        (n,) = samples
        scale.append(f"{n} validation images (one image = {100 / n:.3f} points of top-1)")
    if len(composites) == 1:
        (m,) = composites
        scale.append(f"{m} of them two-object composites (one composite = {100 / m:.2f} points of ReaL top-1)")
    notes = "mean ± sample standard deviation over the seeds"
    if scale:
        notes += "; " + ", ".join(scale)
    notes += (". Top-1, all: the folder's class, every validation image; single-object: the images with one "
              "object; ReaL top-1: the top-1 class is either object of a composite; recall@2: the share of the "
              "composites' objects among the two highest-scoring classes.")
    parts.append(notes + "\n")
    return "\n".join(parts)


def chart_png(record: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, pairs = record["summary"], record["paired"]
    has_real = all(row["real_top1"] is not None for row in rows)
    panels = 2 + bool(pairs)
    names = [row["labels"].replace(" (", "\n(") for row in rows]
    figure, axes = plt.subplots(1, panels, figsize=(3.2 + 2.0 * len(rows) * (panels - 1) / 2 + 3.5 * bool(pairs), 4.6),
                                constrained_layout=True, gridspec_kw={"width_ratios": [1, 1, 0.9][:panels]})
    positions = list(range(len(rows)))

    def bars(ax, metric, offset=0.0, width=0.8, colors=None, label=None):
        means = [row[f"{metric}_mean"] for row in rows]
        errors = [row[f"{metric}_std"] or 0.0 for row in rows]
        where = [p + offset for p in positions]
        drawn = ax.bar(where, means, width=width, yerr=errors, capsize=3, alpha=0.75, label=label,
                       color=colors or [f"C{i}" for i in positions])
        for x, row in zip(where, rows):
            ax.plot([x] * len(row[metric]), row[metric], "k.", markersize=4)
        ax.bar_label(drawn, labels=[f"{m:.1f}" for m in means], label_type="center", fontsize=8)
        return [v for row in rows for v in row[metric]]

    def finish(ax, values, ylabel):
        ax.set_ylim(max(0.0, min(values) - 8.0), min(100.0, max(values) + 2.0) + 0.5)
        ax.set_xticks(positions, names, fontsize=7.5, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    if all(row["single_top1"] is not None for row in rows):
        values = bars(axes[0], "top1", -0.2, 0.4, ["C2"] * len(rows), "all images")
        values += bars(axes[0], "single_top1", 0.2, 0.4, ["C4"] * len(rows), "single-object images")
        finish(axes[0], values, "top-1 accuracy (%), the folder's class")
        axes[0].legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    else:
        finish(axes[0], bars(axes[0], "top1"), "top-1 accuracy (%), all validation images")
    if has_real:
        values = bars(axes[1], "real_top1", -0.2, 0.4, ["C0"] * len(rows), "ReaL top-1")
        values += bars(axes[1], "real_recall2", 0.2, 0.4, ["C1"] * len(rows), "recall@2")
        finish(axes[1], values, "two-object composites (%)")
        axes[1].legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    else:
        finish(axes[1], bars(axes[1], "top5"), "top-5 accuracy (%)")
    if pairs:
        ax = axes[2]
        ax.axhline(0.0, color="0.4", linewidth=1)
        metrics = [m for m in PAIRED_METRICS if all(p[m] is not None for p in pairs)]
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            for i, row in enumerate(pairs):
                stats = row[metric]
                x = i + (j - (len(metrics) - 1) / 2) * width
                ax.plot([x] * stats["n"], stats["differences"], ".", color=f"C{j}", markersize=5, alpha=0.7,
                        label=METRIC_NAMES[metric] if i == 0 else None)
                low, high = stats["ci95"] or (stats["mean"], stats["mean"])
                ax.errorbar([x], [stats["mean"]], yerr=[[stats["mean"] - low], [high - stats["mean"]]], fmt="_",
                            color=f"C{j}", markersize=14, capsize=4, linewidth=1.5)
        ax.set_xticks(range(len(pairs)), [p["labels"].replace(" (", "\n(") for p in pairs], fontsize=7.5,
                      rotation=20, ha="right")
        ax.set_xlim(-0.6, len(pairs) - 0.4)
        ax.set_ylabel("minus one-hot, same seed (points)")
        ax.set_title("dots: seeds; bar and whiskers: mean, 95 % t-interval", fontsize=8)
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=2, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    runs = sorted({row["runs"] for row in rows})
    spread = "one run each" if runs == [1] else f"mean ± std over {'/'.join(map(str, runs))} seeds, dots = single runs"
    host = record["machine"]
    figure.suptitle(f"{record['title']}: {spread}\ncommit {record['code']['commit']}, {host['cpu']}, "
                    f"{host['cores']} cores, {record['finished'][:10]}", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


# ---- outputs -------------------------------------------------------------------------------------
def copy_markers(relative: str) -> tuple[str, str]:
    return f"<!-- BEGIN {relative} -->\n", f"<!-- END {relative} -->"


def refresh_copies(report_md: Path, text: str, documents: list[Path] | None = None) -> list[Path]:
    """Replaces the text between the BEGIN/END markers naming ``report_md`` in README.md and
    docs/*.md with ``text``; returns the documents changed."""
    try:
        relative = report_md.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return []
    begin, end = copy_markers(relative)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    changed = []
    for document in documents if documents is not None else [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        old = document.read_text()
        new = pattern.sub(lambda _: begin + text + end, old)
        if new != old:
            atomic_write_bytes(document, new.encode())
            changed.append(document)
    return changed


def write_outputs(args, overrides: list[str], results: list[RunResult], loads: list[float] | None = None,
                  argv: list[str] | None = None) -> str:
    rows = summarize(results, args.methods)
    command = shlex.join(["tools/ablate.py", *(argv if argv is not None else [])])
    record = {"title": args.title, "command": command, "config": str(args.config),
              "overrides": overrides, "code": commit_of(REPO), "machine": machine(not args.no_pin),
              "cpu_env": None if args.no_pin else PINNED_CPU_ENV, "load_average": loads or [],
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": [{**asdict(r), "single_top1": r.single_top1} for r in results], "summary": rows, "paired": paired(results, args.methods)}
    text = report_markdown(record)
    png = chart_png(record)
    body = (json.dumps(record, indent=1) + "\n").encode()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "results.json", body)
    atomic_write_bytes(args.out / "table.md", text.encode())
    atomic_write_bytes(args.out / "chart.png", png)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        report_md = args.report.with_name(args.report.name + ".md")
        atomic_write_bytes(args.report.with_name(args.report.name + ".json"), body)
        atomic_write_bytes(report_md, text.encode())
        atomic_write_bytes(args.report.with_name(args.report.name + ".png"), png)
        for document in refresh_copies(report_md, text):
            print(f"refreshed the copy of {report_md} in {document}")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    loads: list[float] = []
    try:
        results = run_all(args, overrides, loads)
    except AblationError as error:
        print(f"ablate.py: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:
        print(f"ablate.py: {error}", file=sys.stderr)
        return EXIT_FAILED
    text = write_outputs(args, overrides, results, loads, argv)
    print()
    print(text, end="")
    written = [args.out / "table.md", args.out / "chart.png", args.out / "results.json"]
    if args.report is not None:
        written += [args.report.with_name(args.report.name + suffix) for suffix in (".md", ".png", ".json")]
    print("\n" + ", ".join(map(str, written)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
