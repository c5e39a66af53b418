"""The package: its public names resolve to real objects (they are imported lazily), and a built
wheel, installed without the repository, carries what it reads at run time (base config, sources)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import relabel_dali

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", relabel_dali.__all__)
def test_export_resolves(name):
    assert getattr(relabel_dali, name) is not None


def test_unknown_name():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        relabel_dali.nope


def test_configs_base_links_to_the_package_data():
    link = ROOT / "configs" / "base.yaml"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "relabel_dali" / "configs" / "base.yaml").resolve()


def test_wheel_install_finds_the_base_config(tmp_path):
    # Build from a copy holding only what the build reads, so nothing is written into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("relabel_dali", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("relabel_dali-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import relabel_dali.config as c; print(c.__file__); print(c.BASE_CONFIG); "
             "print(c.load_config().get_path('optim.epochs'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    module_file, base_config, epochs = result.stdout.split("\n")[:3]
    assert Path(module_file).is_relative_to(target)  # the installed copy, not the checkout
    assert Path(base_config).read_bytes() == (ROOT / "relabel_dali" / "configs" / "base.yaml").read_bytes()
    assert int(epochs) == yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())["optim"]["epochs"]
