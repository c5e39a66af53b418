#!/usr/bin/env python
"""Checks in a built image, on any host (no GPU needed), that the LabelPool operator is the one built
into the image and has the backends the image's flavour promises:

    python docker/check_operator.py [--cuda]

* both libraries (DALI plugin, C ABI library) are cache hits in ``$RELABEL_DALI_CACHE``: nothing is
  compiled at run time;
* the plugin loads into DALI and registers ``LabelPool`` for the CPU backend;
* CUDA flavour (nvcc was there at build time; ``--cuda`` makes it a requirement): the plugin also
  registers ``LabelPool`` for the GPU backend, the C ABI library reports its CUDA entry point
  (``relabel_pool_has_cuda``), and both libraries carry SASS for every arch in
  ``RELABEL_DALI_CUDA_ARCHS`` and PTX for the newest (docker/check_fatbin.py). DALI registers GPU
  operators without touching a GPU, so this holds on a CPU-only host; running a kernel does not.

Exit codes: 0 as promised, 1 not.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_fatbin  # noqa: E402  (the sibling script)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="the image must carry the CUDA backend")
    args = parser.parse_args(argv)

    import nvidia.dali.backend as dali_backend
    from relabel_dali.ops import build as ops

    ops.load_operators()
    capi = ops.load_capi()
    info = ops.build_info()
    print("operator:", info)
    problems = [f"{name} was compiled at run time, not taken from the image's cache"
                for name, built in info["built_now"].items() if built]
    if "LabelPool" not in dali_backend.RegisteredCPUOps():
        problems.append("the plugin did not register LabelPool for the CPU backend")
    if info["nvcc"] is None:
        print("CUDA backend: none (no nvcc at build time: a CPU image)")
        if args.cuda:
            problems.append("no nvcc in the image: the CUDA backend was not built")
    else:
        gpu_registered = "LabelPool" in dali_backend.RegisteredGPUOps()
        has_cuda = capi.relabel_pool_has_cuda() == 1
        print(f"CUDA backend: DALI GPU operator registered: {gpu_registered}; C ABI CUDA entry: {has_cuda}")
        if not gpu_registered:
            problems.append("the plugin did not register LabelPool for the GPU backend")
        if not has_cuda:
            problems.append("the C ABI library was built without its CUDA entry point")
        libraries = [info["plugin"], info["capi"]]
        if check_fatbin.main([*libraries, "--archs", os.environ.get("RELABEL_DALI_CUDA_ARCHS", "80;90")]) != 0:
            problems.append("device code missing (above)")
    for problem in problems:
        print("check_operator.py:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
