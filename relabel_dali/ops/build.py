"""Builds the LabelPool native code against the installed DALI, caches it, and loads it once.

Two shared libraries come from ``relabel_dali/ops/csrc``:

* the DALI plugin (``label_pool.cc`` + ``label_pool.cu``, ``resize_jitter.cc``), which registers
  ``fn.label_pool`` and the CPU training graph's ``fn.resize_jitter_normalize``. A plugin
  must match the installed DALI exactly (its symbols are versioned), so it is built here on first use
  rather than shipped;
* the DALI-free C ABI library (``label_pool_capi.*``) that :mod:`relabel_dali.ops.pooling` calls through
  ctypes.

A third, for tests only, runs the CUDA kernel's own source on the host (``testing_*``, g++ alone, no
GPU or nvcc): :mod:`relabel_dali.ops.testing`.

Builds are cached under ``$RELABEL_DALI_CACHE`` (default ``~/.cache/relabel_dali``), keyed by DALI
release (not the folder it is installed in), compiler versions, source hash and CUDA archs.
Concurrent builders serialise on an ``fcntl`` lock and each library appears by atomic rename, so a
half-written library is never loaded.
Environment: ``RELABEL_DALI_CUDA_ARCHS`` (default ``80;90``), ``RELABEL_DALI_NO_CUDA=1`` (CPU only).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
# -ffp-contract=off: host and device arithmetic agree bit for bit only if no multiply-add is fused (on
# x86-64 without -march nothing is; on aarch64 GCC would fuse). -fno-math-errno lets std::llrint
# compile to one instruction instead of a libm call.
CXX_FLAGS = ["-std=c++20", "-O3", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
# --fmad=false: fused multiply-adds would move roi_align sample points off torchvision's by an ulp.
NVCC_FLAGS = ["-std=c++20", "-O3", "--fmad=false", "-Xcompiler", "-fPIC"]

_lock = threading.Lock()
_loaded_plugin: Path | None = None
_capi: ctypes.CDLL | None = None
_emulator: ctypes.CDLL | None = None
_last_build: dict[str, bool] = {}


class BuildError(RuntimeError):
    """The native code cannot be built here; the message says what to install or set."""


def cache_dir() -> Path:
    return Path(os.environ.get("RELABEL_DALI_CACHE") or Path.home() / ".cache" / "relabel_dali")


def cuda_archs() -> list[str]:
    raw = os.environ.get("RELABEL_DALI_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise BuildError(f"RELABEL_DALI_CUDA_ARCHS={raw!r}: expected compute capabilities like '80;90'")
    return archs


def nvcc_gencode(archs: list[str]) -> list[str]:
    """Machine code for each arch, plus PTX for the newest, which the driver compiles at load time on
    GPUs newer than all of them (instead of failing with "no kernel image is available")."""
    newest = max(archs, key=int)
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a != newest] + [
        f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]"]


def find_nvcc() -> str | None:
    """nvcc to build the GPU backends with, or None (CPU only)."""
    if os.environ.get("RELABEL_DALI_NO_CUDA", "") not in ("", "0"):
        return None
    candidates = [shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    # The registry's CUDA 13 wheels (`make cuda-wheels`) put nvcc in site-packages, not on PATH.
    candidates += [str(Path(d) / "nvidia" / "cu13" / "bin" / "nvcc") for d in sys.path if d]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_library_flags(nvcc: str) -> list[str]:
    """-L for the CUDA wheels' static runtime: their nvcc looks in lib64, the wheels install lib."""
    lib = Path(nvcc).resolve().parent.parent / "lib"
    return [f"-L{lib}"] if (lib / "libcudart_static.a").exists() else []


def find_cuda_include(nvcc: str | None) -> Path:
    """A folder holding cuda_runtime.h: DALI's headers include it even for the CPU operator."""
    candidates = []
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(Path(root) / "include")
    for site in map(Path, sys.path):
        nvidia = site / "nvidia"
        if nvidia.is_dir():
            candidates += [nvidia / "cu13" / "include", nvidia / "cuda_runtime" / "include"]
    for folder in candidates:
        if (folder / "cuda_runtime.h").is_file():
            return folder
    raise BuildError("cuda_runtime.h not found (DALI's operator headers need the CUDA headers even for CPU): "
                     "install the CUDA toolkit (set CUDA_HOME), or the wheels of one CUDA release: "
                     "`pip install nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt` (crt/ holds "
                     "host_config.h, which cuda_runtime.h includes)")


@lru_cache(maxsize=None)
def compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(f"C++ compiler {compiler!r} is not usable ({error}): install g++ >= 10 "
                         f"(e.g. `apt-get install g++`) or set CXX") from None
    return result.stdout.strip()


def _short_version(text: str) -> str:
    lines = text.splitlines()
    return next((line for line in lines if "release" in line), lines[0] if lines else text)


def host_compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise BuildError("no C++ compiler found: install g++ >= 10 (e.g. `apt-get install g++`) or set CXX")
    return compiler


# The oldest DALI the operators build against and agree with (tools/check_dali_versions.py,
# docs/OPERATOR.md): older releases' own headers do not compile as C++20.
MIN_DALI = "1.28"


def dali_build_flags() -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, version) of the installed DALI wheel, if it is recent enough."""
    dali, sysconfig = _import_dali()
    release = tuple(int(part) for part in dali.__version__.split(".")[:2] if part.isdigit())
    if release < tuple(int(part) for part in MIN_DALI.split(".")):
        raise BuildError(f"NVIDIA DALI {dali.__version__} is too old: the LabelPool operators need DALI >= "
                         f"{MIN_DALI} (`pip install -U nvidia-dali-cuda130`, or the cuda120 variant)")
    return list(sysconfig.get_compile_flags()), list(sysconfig.get_link_flags()), dali.__version__


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.sysconfig as sysconfig
    except ImportError:
        raise BuildError("NVIDIA DALI is not installed: `pip install nvidia-dali-cuda130` (or the cuda120 "
                         "variant matching your driver)") from None
    return dali, sysconfig


def dali_key_parts(compile_flags: list[str], link_flags: list[str]) -> list[str]:
    """What identifies the installed DALI in the plugin's cache key: its release (version, the commit
    it was built from, its CUDA version) and its build flags with the folder it is unpacked in
    replaced by ``<dali>``. The plugin records no path (no run path: it links ``libdali.so`` by
    name, which DALI has already loaded), so every virtual environment and every clone holding the
    same DALI shares one build instead of compiling its own."""
    dali, sysconfig = _import_dali()
    root = str(sysconfig.get_lib_dir())
    release = f"{dali.__version__} {getattr(dali, '__git_sha__', '?')} cuda {getattr(dali, '__cuda_version__', '?')}"
    return [release, " ".join(flag.replace(root, "<dali>") for flag in compile_flags + link_flags)]


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"build command failed ({result.returncode}): {' '.join(command)}\n"
                         f"{(result.stderr or result.stdout)[-4000:]}")


def _build_cached(name: str, key_parts: list[str], steps) -> Path:
    """Returns the cached library ``name-KEY.so``, building it with ``steps(tmpdir) -> Path`` if absent."""
    digest = hashlib.sha256()
    for part in [*key_parts, " ".join(CXX_FLAGS), " ".join(NVCC_FLAGS)]:
        digest.update(part.encode() + b"\0")
    for source in sorted(CSRC.iterdir()):
        if source.suffix in (".h", ".cc", ".cu", ".cuh"):
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache = cache_dir()
    target = cache / f"{name}-{digest.hexdigest()[:20]}.so"
    if target.is_file():
        _last_build[name] = False
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.stem}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if target.is_file():  # another process built it while this one waited
            _last_build[name] = False
            return target
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-build-") as tmp:
            built = steps(Path(tmp))
            os.replace(built, target)
    _last_build[name] = True
    return target


def _compile_and_link(tmp: Path, cc_sources: list[str], cu_sources: list[str], cflags: list[str],
                      ldflags: list[str], nvcc: str | None, cuda_include: Path) -> Path:
    compiler = host_compiler()
    jobs, objects = [], []
    for source in cc_sources:
        obj = tmp / (source + ".o")
        jobs.append([compiler, *CXX_FLAGS, *cflags, f"-I{cuda_include}", "-c", str(CSRC / source), "-o", str(obj)])
        objects.append(str(obj))
    if nvcc:
        gencode = nvcc_gencode(cuda_archs())
        for source in cu_sources:
            obj = tmp / (source + ".o")
            jobs.append([nvcc, *NVCC_FLAGS, *cflags, *gencode, "-c", str(CSRC / source), "-o", str(obj)])
            objects.append(str(obj))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda command: _run(command, tmp), jobs))
    library = tmp / "library.so"
    # nvcc links the CUDA runtime statically, so the library needs no libcudart at load time.
    linker = [nvcc, "-shared", "-Xcompiler", "-fPIC", *nvcc_library_flags(nvcc)] if nvcc else \
        [compiler, "-shared", "-fPIC"]
    _run([*linker, *objects, "-o", str(library), *ldflags], tmp)
    return library


def build_plugin() -> Path:
    """Builds (or finds in the cache) the DALI plugin for the installed DALI; returns its path."""
    compile_flags, link_flags, dali_version = dali_build_flags()
    nvcc = find_nvcc()
    cuda_include = find_cuda_include(nvcc)
    compiler = host_compiler()
    key = ["plugin", *dali_key_parts(compile_flags, link_flags), compiler_version(compiler),
           compiler_version(nvcc) if nvcc else "no-cuda", ";".join(cuda_archs()) if nvcc else ""]
    return _build_cached(
        "label_pool_dali" + dali_version, key,
        lambda tmp: _compile_and_link(tmp, ["label_pool.cc", "resize_jitter.cc"], ["label_pool.cu"], compile_flags, link_flags,
                                      nvcc, cuda_include))


def build_capi() -> Path:
    """Builds (or finds in the cache) the DALI-free pooling library; returns its path."""
    nvcc = find_nvcc()
    compiler = host_compiler()
    key = ["capi", compiler_version(compiler), compiler_version(nvcc) if nvcc else "no-cuda",
           ";".join(cuda_archs()) if nvcc else ""]
    cflags = ["-DRELABEL_WITH_CUDA"] if nvcc else []
    cuda_include = find_cuda_include(nvcc) if nvcc else Path("/nonexistent")
    return _build_cached(
        "label_pool_capi", key,
        lambda tmp: _compile_and_link(tmp, ["label_pool_capi.cc"], ["label_pool_capi.cu"], cflags, [],
                                      nvcc, cuda_include))


def build_emulator() -> Path:
    """Builds (or finds in the cache) the host emulation of the CUDA kernel (tests only; g++ alone)."""
    compiler = host_compiler()
    key = ["emulator", compiler_version(compiler)]

    def steps(tmp: Path) -> Path:
        library = tmp / "library.so"
        _run([compiler, *CXX_FLAGS, "-shared", str(CSRC / "testing_label_pool_emulator.cc"), "-o", str(library)], tmp)
        return library

    return _build_cached("label_pool_emulator", key, steps)


def load_operators() -> Path:
    """Builds if needed and loads the plugin once per process; ``nvidia.dali.fn.label_pool`` and
    ``nvidia.dali.fn.resize_jitter_normalize`` exist after."""
    global _loaded_plugin
    with _lock:
        if _loaded_plugin is None:
            path = build_plugin()
            import nvidia.dali.plugin_manager as plugin_manager

            # Loading a second library that registers LabelPool aborts the process: load exactly once.
            plugin_manager.load_library(str(path))
            _loaded_plugin = path
        return _loaded_plugin


def load_capi() -> ctypes.CDLL:
    """The C ABI library with argument types declared (loaded once per process)."""
    global _capi
    with _lock:
        if _capi is None:
            library = ctypes.CDLL(str(build_capi()))
            pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            # ... mode, output_size, mirror: every entry's arguments from the scores to the flips.
            common = [pointer, i32, pointer, pointer, pointer, pointer, i64, i32, i32, i32, i32, i32, i32, pointer]
            # The CPU entry also takes the class id dtype code, right after the class id pointer.
            library.relabel_pool_cpu.argtypes = [*common[:3], i32, *common[3:], i32, pointer, ctypes.c_char_p, i32]
            library.relabel_pool_cuda.argtypes = [*common, pointer, pointer, ctypes.c_char_p, i32]
            library.relabel_pool_cpu.restype = library.relabel_pool_cuda.restype = i32
            # The compact entry: the CPU entry's arguments up to num_threads, then slots, ids, values,
            # rest, needed, err, err_len.
            library.relabel_pool_cpu_compact.argtypes = [*common[:3], i32, *common[3:], i32, i32, pointer, pointer,
                                                         pointer, pointer, ctypes.c_char_p, i32]
            library.relabel_pool_cpu_compact.restype = i32
            library.relabel_pool_has_cuda.restype = i32
            _capi = library
        return _capi


def load_emulator() -> ctypes.CDLL:
    """The kernel emulation library with argument types declared (loaded once per process)."""
    global _emulator
    with _lock:
        if _emulator is None:
            library = ctypes.CDLL(str(build_emulator()))
            pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            library.relabel_pool_emulated.argtypes = [pointer, i32, pointer, pointer, pointer, pointer, i64, i32, i32,
                                                      i32, i32, i32, i32, pointer, ctypes.c_uint64, i32, pointer,
                                                      ctypes.c_char_p, i32]
            library.relabel_pool_emulated.restype = i32
            library.relabel_emulated_limits.argtypes = [ctypes.POINTER(ctypes.c_longlong)] * 2
            library.relabel_emulated_limits.restype = None
            library.relabel_emulated_exp.argtypes = [pointer, pointer, i64]
            library.relabel_emulated_exp.restype = None
            library.relabel_emulated_order_probe.argtypes = [ctypes.c_uint64]
            library.relabel_emulated_order_probe.restype = ctypes.c_float
            _emulator = library
        return _emulator


def build_info() -> dict:
    """What the native code is (or would be) built with, and what this process has loaded."""
    nvcc = find_nvcc()
    try:
        dali_version = dali_build_flags()[2]
    except BuildError as error:
        dali_version = f"unavailable: {error}"
    return {
        "dali_version": dali_version,
        "cxx": _short_version(compiler_version(host_compiler())),
        "nvcc": _short_version(compiler_version(nvcc)) if nvcc else None,
        "cuda_archs": cuda_archs() if nvcc else [],
        "cache_dir": str(cache_dir()),
        "plugin": str(_loaded_plugin) if _loaded_plugin else None,
        "capi": str(_capi._name) if _capi is not None else None,
        "built_now": dict(_last_build),  # name -> True if this process compiled it, False on a cache hit
    }
