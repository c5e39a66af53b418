"""The check's report: each target with its value and whether it is met, written as
``report.json`` and ``report.md``."""
from __future__ import annotations

import json
from pathlib import Path

from tools.gpu_check.profiles import TOLERANCE


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
