#!/usr/bin/env python
"""The pip requirements that bring nvcc and the CUDA headers into the venv, for a GPU node without
the CUDA toolkit (``make install`` runs this when ``nvidia-smi`` exists but no nvcc is found).

    python tools/cuda_wheels.py [--dali-variant cuda130]

Prints the requirements on one line, or nothing (with the reason on stderr) where the registry has
no nvcc for that CUDA release. The release is the one the installed torch was built for, else the
DALI variant's (``cuda130`` -> 13.0). CUDA 13 wheels put all of it under
``site-packages/nvidia/cu13/`` (``bin/nvcc``, ``include/``, ``nvvm/``, ``lib/``); torch's CUDA 13
builds depend on the ``cuda-toolkit`` metapackage, whose ``nvcc`` and ``cccl`` extras pin nvcc,
crt, nvvm, the runtime and CCCL to the release torch runs on, so that pin is used when it is
installed. CUDA 12's ``nvidia-cuda-nvcc-cu12`` wheels hold ptxas but no nvcc: there, install the
toolkit.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

# The pieces nvcc needs to compile and link a .cu file: the driver, the host headers it includes
# (crt/host_config.h), its device front end (nvvm's cicc), cuda_runtime.h and libcudart_static,
# and CCCL (nvcc adds its include/cccl to every compile).
PACKAGES = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime", "nvidia-cuda-cccl")
FIRST_WITH_NVCC = 13


def cuda_release(torch_cuda: str | None, dali_variant: str) -> tuple[int, int] | None:
    """(major, minor) from torch's ``torch.version.cuda`` ("13.0"), else from the DALI variant."""
    if torch_cuda:
        major, minor = torch_cuda.split(".")[:2]
        return int(major), int(minor)
    match = re.fullmatch(r"cuda(\d+)(\d)", dali_variant)
    return (int(match[1]), int(match[2])) if match else None


def requirements(release: tuple[int, int] | None, toolkit: str | None) -> list[str]:
    """Requirements for ``release``; ``toolkit`` is the installed cuda-toolkit version, if any."""
    if release is None or release[0] < FIRST_WITH_NVCC:
        return []
    major, minor = release
    if toolkit and toolkit.split(".")[:2] == [str(major), str(minor)]:
        return [f"cuda-toolkit[nvcc,cccl]=={toolkit}"]
    return [f"{name}=={major}.{minor}.*" for name in PACKAGES]


def installed_toolkit() -> str | None:
    try:
        return metadata.version("cuda-toolkit")
    except metadata.PackageNotFoundError:
        return None


def torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dali-variant", default="cuda130", help="the Makefile's DALI_VARIANT (default cuda130)")
    args = parser.parse_args(argv)
    release = cuda_release(torch_cuda(), args.dali_variant)
    wanted = requirements(release, installed_toolkit())
    if wanted:
        print(" ".join(wanted))
    else:
        name = "unknown" if release is None else f"{release[0]}.{release[1]}"
        print(f"cuda_wheels.py: the package registry has no nvcc for CUDA {name} (wheels carry nvcc from "
              f"CUDA {FIRST_WITH_NVCC} on): install the CUDA toolkit and set CUDA_HOME to build the GPU backend",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
