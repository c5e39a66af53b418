#!/usr/bin/env python
"""Checks at image build time that torch, DALI and nvcc agree on the CUDA major version.

    python docker/check_cuda.py --variant cuda130 [--require-cuda | --report-only]

The DALI wheel's variant names the CUDA major it is built for (``cuda130`` -> 13). In the CUDA
flavour (nvcc present, or ``--require-cuda``) torch must be a CUDA build of that major and nvcc
must be that major too: otherwise the operator and DALI would talk to a different CUDA runtime
than torch. In the CPU flavour (no nvcc) the versions are only reported.

Exit codes: 0 consistent (or report only), 1 mismatch, 2 bad command line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys


def variant_cuda_major(variant: str) -> int:
    """``cuda130`` -> 13, ``cuda120`` -> 12, ``cuda110`` -> 11 (the last digit is the minor)."""
    match = re.fullmatch(r"cuda(\d+)(\d)", variant)
    if not match:
        raise ValueError(f"DALI variant {variant!r}: expected 'cuda' and major+minor digits, e.g. 'cuda130'")
    return int(match.group(1))


def cuda_major(version: str | None) -> int | None:
    """``'13.0'`` -> 13; None stays None."""
    if version is None:
        return None
    match = re.match(r"(\d+)\.", version)
    if not match:
        raise ValueError(f"CUDA version {version!r}: expected 'MAJOR.MINOR'")
    return int(match.group(1))


def nvcc_version(nvcc: str) -> str:
    """``'13.0'`` from ``nvcc --version`` (its 'release 13.0, V13.0.88' line)."""
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    if not match:
        raise ValueError(f"{nvcc} --version: no 'release X.Y' in its output:\n{output}")
    return match.group(1)


def find_nvcc() -> str | None:
    from relabel_dali.ops.build import find_nvcc as project_find_nvcc

    return project_find_nvcc() or shutil.which("nvcc")


def check(variant: str, torch_cuda: str | None, nvcc_cuda: str | None, dali_installed: str | None,
          require_cuda: bool) -> list[str]:
    """The problems found (empty: consistent). Pure, so the rules can be tested without CUDA."""
    expected = variant_cuda_major(variant)
    problems = []
    if dali_installed is None:
        problems.append(f"nvidia-dali-{variant} is not installed")
    if not require_cuda:
        return problems
    if torch_cuda is None:
        problems.append(f"torch is a CPU-only build, but DALI {variant} needs CUDA {expected}")
    elif cuda_major(torch_cuda) != expected:
        problems.append(f"torch is built for CUDA {torch_cuda}, but DALI {variant} needs CUDA {expected}.x")
    if nvcc_cuda is None:
        problems.append("nvcc not found: the operator's CUDA backend cannot be built")
    elif cuda_major(nvcc_cuda) != expected:
        problems.append(f"nvcc is CUDA {nvcc_cuda}, but DALI {variant} needs CUDA {expected}.x")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help="DALI wheel variant, e.g. cuda130")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--require-cuda", action="store_true", help="fail on any mismatch even without nvcc")
    mode.add_argument("--report-only", action="store_true", help="only report the versions (a missing DALI still fails)")
    args = parser.parse_args(argv)
    try:
        expected = variant_cuda_major(args.variant)
    except ValueError as error:
        parser.error(str(error))

    import torch

    try:
        dali_installed = importlib.metadata.version(f"nvidia-dali-{args.variant}")
    except importlib.metadata.PackageNotFoundError:
        dali_installed = None
    nvcc = find_nvcc()
    nvcc_cuda = nvcc_version(nvcc) if nvcc else None
    require_cuda = args.require_cuda or (nvcc is not None and not args.report_only)
    print(f"DALI nvidia-dali-{args.variant} {dali_installed or 'MISSING'} (needs CUDA {expected}.x)")
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU-only build)'}")
    print(f"nvcc {nvcc} (CUDA {nvcc_cuda})" if nvcc else "nvcc: none (CPU backend only)")
    print("flavour:", "CUDA (versions must agree)" if require_cuda else "CPU (versions reported only)")
    problems = check(args.variant, torch.version.cuda, nvcc_cuda, dali_installed, require_cuda)
    for problem in problems:
        print("error:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
