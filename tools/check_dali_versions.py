#!/usr/bin/env python
"""Which DALI releases the LabelPool operator builds against and agrees with, one release at a time.

    python tools/check_dali_versions.py [--lines 1.38,1.42,1.47,1.50,2.0,2.4 | --versions 2.0.0,2.4.0]
        [--variant cuda120] [--json PATH] [--markdown PATH] [--tmp DIR] [--cuda]

Downloads (not part of ``make test``). Each line's last release (``pip index versions``) of
``nvidia-dali-<variant>`` is installed with pip into a throwaway folder of its own (``pip install
--target``, binary wheels only, no dependencies: the rest comes from this environment). A child
Python with that folder first on ``PYTHONPATH`` and ``RELABEL_DALI_CACHE`` inside it builds the
plugin (``relabel_dali.ops.build``; the CPU backend only unless ``--cuda``) and runs
``fn.label_pool`` on the CPU against the dense reference (``relabel_dali.ops.reference``) for every
mode and score dtype, edge boxes included: every value within 1e-6 (argmax modes: rows with a clear
top two); and ``fn.resize_jitter_normalize`` without jitter against PIL's resize, bit for bit.
The folder is deleted before the next release. One progress line per release, then a JSON
report and a Markdown table.

Exit codes: 0 every release checked installed, built and agreed; 1 some did not; 2 bad arguments or
too little disk space.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINES = "1.38,1.42,1.47,1.50,2.0,2.4"
DISK_NEEDED_GB = 3.0  # one release: a ~420 MB wheel, ~1.2 GB installed, the build
TOLERANCE = 1e-6
PLACEHOLDER = "placeholder"  # a registry entry that only downloads the real wheel from NVIDIA's own index


def available_versions(package: str) -> list[str]:
    """The package's releases on the configured index, newest first (``pip index versions``)."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                            capture_output=True, text=True)
    found = re.search(r"Available versions:\s*(.+)", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"pip index versions {package} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return [v.strip() for v in found.group(1).split(",") if v.strip()]


def _key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def last_of_line(line: str, versions: list[str]) -> str | None:
    """The newest release ``line.*`` (``1.50`` -> ``1.50.0``)."""
    matching = [v for v in versions if v == line or v.startswith(line + ".")]
    return max(matching, key=_key) if matching else None


def _pip_install(target: Path, requirements: list[str]) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--only-binary=:all:", "--no-deps", "--no-compile", "--target", str(target),
                             *requirements], capture_output=True, text=True)
    said = "\n".join(line for line in (result.stderr + result.stdout).splitlines()
                     if not line.startswith("WARNING: Location"))
    return result.returncode == 0, said.strip()


def missing_requirements(target: Path, package: str) -> list[str]:
    """The release's own Python dependencies that this environment lacks or has in another version.
    NVIDIA's codec libraries (nvidia-*) are left out: the check runs no decoder."""
    from importlib.metadata import PackageNotFoundError, version as installed_version

    from packaging.requirements import Requirement

    metadata = next(target.glob(package.replace("-", "_") + "-*.dist-info/METADATA"))
    missing = []
    for line in metadata.read_text().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.name.startswith("nvidia-") or (requirement.marker and not requirement.marker.evaluate()):
            continue
        try:
            if requirement.specifier.contains(installed_version(requirement.name), prereleases=True):
                continue
        except PackageNotFoundError:
            pass
        missing.append(f"{requirement.name}{requirement.specifier}")
    return missing


def install(package: str, version: str, target: Path) -> tuple[bool, str]:
    """(installed, what went wrong): the release, then the dependencies this environment lacks."""
    done, said = _pip_install(target, [f"{package}=={version}"])
    if not done:
        if "from versions:" in said or "No matching distribution" in said:
            return False, (f"no binary wheel of {version} on the index ({PLACEHOLDER} only: it would download from "
                           f"NVIDIA's own index)")
        return False, said[-600:]
    extra = missing_requirements(target, package)
    if extra:
        done, said = _pip_install(target, extra)
        if not done:
            return False, f"its dependencies {extra}: {said[-500:]}"
    return True, ""


def check_release(package: str, version: str, tmp: Path, cuda: bool) -> dict:
    """Installs one release into its own folder, builds and checks in a child process, cleans up."""
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=f"dali-{version}-", dir=tmp))
    result = {"version": version, "installed": False, "built": None, "parity": None}
    try:
        mark = time.perf_counter()
        result["installed"], problem = install(package, version, folder / "site")
        result["install_s"] = time.perf_counter() - mark
        if not result["installed"]:
            result["error"] = problem
            return result
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder / "site"), str(ROOT)]),
                   RELABEL_DALI_CACHE=str(folder / "cache"), PYTHONDONTWRITEBYTECODE="1")
        if not cuda:
            env["RELABEL_DALI_NO_CUDA"] = "1"
        child = subprocess.run([sys.executable, "-m", "tools.check_dali_versions", "--child", str(folder / "site")],
                               cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=1800)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if not lines:
            result["error"] = f"child exited {child.returncode}: {(child.stderr or child.stdout)[-1500:]}"
            return result
        result.update(json.loads(lines[-1]))
        if result.get("dali") != version:
            result["parity"], result["error"] = False, f"the child imported DALI {result.get('dali')}, not {version}"
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        result["seconds"] = time.perf_counter() - started


def child(site: Path) -> dict:
    """In the child: build and load the plugin against the DALI in ``site``, then compare."""
    import nvidia

    # nvidia/ of this environment is a regular package, which wins over the namespace portion in
    # site even though site comes first on the path: look in site's nvidia/ first.
    nvidia.__path__.insert(0, str(site / "nvidia"))
    import nvidia.dali as dali

    out = {"dali": dali.__version__, "dali_path": str(Path(dali.__file__).parent)}
    from relabel_dali.ops.build import BuildError, load_operators

    mark = time.perf_counter()
    try:
        load_operators()
    except BuildError as error:
        out.update(built=False, error=str(error)[-3000:])
        return out
    out.update(built=True, build_s=time.perf_counter() - mark)
    mark = time.perf_counter()
    try:
        out.update(parity_numbers())
    except Exception as error:  # a pipeline that fails to run is a failed check, with its message
        out.update(parity=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")
    out["parity_s"] = time.perf_counter() - mark
    return out


def parity_numbers(n: int = 256) -> dict:
    """fn.label_pool (CPU) against the dense reference: every mode, float32/float16/uint8 scores."""
    import torch

    from relabel_dali.ops.reference import MODES, clear_top2, random_boxes, random_topk_maps, reference_pool
    from tools.gpu_check.steps import edge_boxes, pool_with_operator, stored_scores

    g = torch.Generator().manual_seed(7)
    scores, class_ids = random_topk_maps(n, 5, 15, 15, 1000, g)
    boxes = random_boxes(n, g)
    edges = edge_boxes(15, 15)
    boxes[:len(edges)] = edges
    diffs = {}
    for dtype in ("float32", "float16", "uint8"):
        stored, scale, offset, floats = stored_scores(scores, dtype)
        soft = {}
        for mode in MODES:  # each softmax mode before its argmax mode
            expected = reference_pool(floats, class_ids, boxes, 1000, mode)
            got = pool_with_operator(stored, class_ids, boxes, mode, "cpu", scale, offset)
            rows = torch.ones(n, dtype=torch.bool)
            if mode.endswith("argmax"):
                rows = clear_top2(soft[mode.replace("argmax", "softmax")])
            else:
                soft[mode] = expected
            diffs[f"{dtype}/{mode}"] = float((got[rows] - expected[rows]).abs().max())
    worst = max(diffs.values())
    resize = resize_equals_pil()
    return {"parity": worst <= TOLERANCE and resize, "max_abs_diff": worst, "cases": len(diffs), "batch": n,
            "resize_equals_pil": resize}


def resize_equals_pil() -> bool:
    """The plugin's other operator, fn.resize_jitter_normalize, without jitter: PIL's bilinear
    resize bit for bit (as tests/test_resize_jitter.py checks in depth)."""
    import numpy as np
    import PIL
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    order = "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "horizontal_first"  # this PIL's rule

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 51), (64, 23), (20, 20))]

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: images, dtype=types.UINT8, ndim=3, layout="HWC")
        return fn.resize_jitter_normalize(x, size=[24, 32], pass_order=order)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return all(np.array_equal(np.array(out[i]), np.asarray(Image.fromarray(image).resize((32, 24), Image.BILINEAR),
                                                            np.float32).transpose(2, 0, 1))
               for i, image in enumerate(images))


def markdown(report: dict) -> str:
    rows = ["| release | installs | builds | CPU parity (label_pool max abs diff; resize = PIL) | seconds | note |",
            "|---|---|---|---|---|---|"]
    for r in report["results"]:
        def mark(value):
            return "—" if value is None else ("yes" if value else "**no**")
        parity = mark(r.get("parity"))
        if r.get("max_abs_diff") is not None:
            parity += f" ({r['max_abs_diff']:.1e}; resize {'=' if r.get('resize_equals_pil') else '≠'} PIL)"
        note = r.get("error", "").splitlines()[0][:120] if r.get("error") else ""
        rows.append(f"| {r.get('line', '')} → {r['version']} | {mark(r['installed'])} | {mark(r.get('built'))} | "
                    f"{parity} | {r['seconds']:.0f} | {note} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", default=LINES, help=f"release lines, each checked at its last release "
                                                       f"(default {LINES})")
    parser.add_argument("--versions", help="exact releases instead of --lines")
    parser.add_argument("--variant", default="cuda120", help="nvidia-dali-<variant> (default cuda120)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="for the throwaway folders")
    parser.add_argument("--cuda", action="store_true", help="build the GPU backend too (nvcc; slower)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the release's folder, in the child
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return 0
    free_gb = shutil.disk_usage(args.tmp).free / 2 ** 30
    if free_gb < DISK_NEEDED_GB:
        print(f"{args.tmp}: {free_gb:.1f} GB free, one release needs about {DISK_NEEDED_GB} GB", file=sys.stderr)
        return 2
    package = f"nvidia-dali-{args.variant}"
    if args.versions:
        wanted = [(None, v.strip()) for v in args.versions.split(",") if v.strip()]
    else:
        known = available_versions(package)
        wanted = [(line.strip(), last_of_line(line.strip(), known)) for line in args.lines.split(",") if line.strip()]
        missing = [line for line, version in wanted if version is None]
        if missing:
            parser.error(f"--lines: no release of {package} in line(s) {missing}")
    import numpy
    import torch

    report = {"tool": "tools/check_dali_versions.py", "package": package, "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__},
              "cuda_backend": args.cuda, "tolerance": TOLERANCE, "results": []}
    for number, (line, version) in enumerate(wanted, 1):
        result = check_release(package, version, args.tmp, args.cuda)
        if line:
            result["line"] = line
        report["results"].append(result)
        state = ("not installable" if not result["installed"] else "build failed" if not result.get("built")
                 else f"parity {'ok' if result.get('parity') else 'FAILED'}"
                 + (f" (max |diff| {result['max_abs_diff']:.1e}, {result.get('cases')} cases)"
                    if result.get("max_abs_diff") is not None else ""))
        timings = ", ".join(f"{name} {result[key]:.0f} s" for name, key in
                            (("install", "install_s"), ("build", "build_s"), ("parity", "parity_s")) if key in result)
        print(f"[{number}/{len(wanted)}] DALI {version}: {state}; {timings}; {result['seconds']:.0f} s", flush=True)
    passed = [r["version"] for r in report["results"] if r.get("parity")]
    report["oldest_passing"] = min(passed, key=_key) if passed else None
    text = markdown(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0 if all(r.get("parity") for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
