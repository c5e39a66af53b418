"""tools/cuda_wheels.py (which wheels bring nvcc) and `make cuda-wheels` (when make install
installs them): a stand-in venv python and nvidia-smi, no package is installed."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tools import cuda_wheels

REPO = Path(__file__).resolve().parents[1]
PINNED = ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*", "nvidia-nvvm==13.0.*",
          "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-cccl==13.0.*"]


class TestRequirements:
    @pytest.mark.parametrize("torch_cuda,variant,release", [
        ("13.0", "cuda130", (13, 0)), ("13.2", "cuda130", (13, 2)), ("12.8", "cuda130", (12, 8)),
        (None, "cuda130", (13, 0)), (None, "cuda120", (12, 0)), (None, "cpu", None),
    ])
    def test_release_from_torch_else_dali(self, torch_cuda, variant, release):
        assert cuda_wheels.cuda_release(torch_cuda, variant) == release

    @pytest.mark.parametrize("release,toolkit,expected", [
        ((13, 0), "13.0.3.0", ["cuda-toolkit[nvcc,cccl]==13.0.3.0"]),  # torch's own pin
        ((13, 0), None, PINNED),
        ((13, 0), "13.2.0", PINNED),  # a toolkit of another release does not decide
        ((12, 8), "12.8.1", []),  # no CUDA 12 wheel carries nvcc
        (None, None, []),
    ])
    def test_requirements(self, release, toolkit, expected):
        assert cuda_wheels.requirements(release, toolkit) == expected

    def test_no_nvcc_wheel_says_why(self, monkeypatch, capsys):
        monkeypatch.setattr(cuda_wheels, "torch_cuda", lambda: None)
        assert cuda_wheels.main(["--dali-variant", "cuda120"]) == 0
        out, err = capsys.readouterr()
        assert out == "" and "no nvcc for CUDA 12.0" in err and "CUDA_HOME" in err


@pytest.fixture
def fake_node(tmp_path):
    """A bin/ with an nvidia-smi and a venv whose python logs its arguments (its cuda_wheels.py
    answer is a fixed requirement)."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    log = tmp_path / "python.log"
    python = venv_bin / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      'case "$1" in tools/cuda_wheels.py) echo "cuda-toolkit[nvcc,cccl]==13.0.3.0";; esac\n')
    python.chmod(0o755)

    def run(*, gpu=True, nvcc_at=None, env_extra=None):
        if gpu:
            (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
            (bin_dir / "nvidia-smi").chmod(0o755)
        home = tmp_path / "cuda"
        if nvcc_at is not None:
            (tmp_path / nvcc_at).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / nvcc_at).write_text("#!/bin/sh\n")
            (tmp_path / nvcc_at).chmod(0o755)
        env = {key: value for key, value in os.environ.items() if key not in ("CUDA_HOME", "CUDA_PATH", "MAKEFLAGS")}
        env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
        env.update(env_extra or {})
        result = subprocess.run([shutil.which("make"), "-s", "-C", str(REPO), "cuda-wheels",
                                 f"VENV={tmp_path / 'venv'}", f"CUDA_DEFAULT_HOME={home}"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return log.read_text().splitlines() if log.exists() else []

    return tmp_path, run


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
class TestMakeCudaWheels:
    def test_gpu_without_nvcc_installs_the_wheels(self, fake_node):
        _, run = fake_node
        assert run() == ["tools/cuda_wheels.py --dali-variant cuda130",
                         "-m pip install -q cuda-toolkit[nvcc,cccl]==13.0.3.0"]

    def test_no_gpu_installs_nothing(self, fake_node):
        _, run = fake_node
        assert run(gpu=False) == []

    @pytest.mark.parametrize("nvcc_at,env", [
        ("bin/nvcc", {}),  # on PATH
        ("home/bin/nvcc", {"CUDA_HOME": "{tmp}/home"}),
        ("path/bin/nvcc", {"CUDA_PATH": "{tmp}/path"}),
        ("cuda/bin/nvcc", {}),  # the default home (/usr/local/cuda)
    ])
    def test_an_nvcc_anywhere_installs_nothing(self, fake_node, nvcc_at, env):
        tmp, run = fake_node
        assert run(nvcc_at=nvcc_at, env_extra={k: v.format(tmp=tmp) for k, v in env.items()}) == []


class TestBuildFindsTheWheels:
    """Where the wheels put nvcc and the static runtime, and what the build makes of it."""

    def wheel_tree(self, tmp_path) -> Path:
        root = tmp_path / "site-packages" / "nvidia" / "cu13"
        (root / "bin").mkdir(parents=True)
        (root / "lib").mkdir()
        nvcc = root / "bin" / "nvcc"
        nvcc.write_text("#!/bin/sh\n")
        nvcc.chmod(0o755)
        return nvcc

    def test_nvcc_in_site_packages_is_found_after_the_usual_places(self, tmp_path, monkeypatch):
        from relabel_dali.ops import build

        nvcc = self.wheel_tree(tmp_path)
        monkeypatch.delenv("RELABEL_DALI_NO_CUDA", raising=False)
        monkeypatch.delenv("CUDA_HOME", raising=False)
        monkeypatch.delenv("CUDA_PATH", raising=False)
        monkeypatch.setattr(build.shutil, "which", lambda name: None)
        monkeypatch.setattr(build.sys, "path", ["", str(tmp_path / "site-packages")])
        real_access = os.access
        monkeypatch.setattr(build.os, "access", lambda p, m: not str(p).startswith("/usr/local/cuda")
                            and real_access(p, m))
        assert build.find_nvcc() == str(nvcc)

    def test_link_flag_only_where_the_static_runtime_is(self, tmp_path):
        from relabel_dali.ops import build

        nvcc = self.wheel_tree(tmp_path)
        assert build.nvcc_library_flags(str(nvcc)) == []
        (nvcc.parent.parent / "lib" / "libcudart_static.a").write_bytes(b"")
        assert build.nvcc_library_flags(str(nvcc)) == [f"-L{nvcc.parent.parent / 'lib'}"]
