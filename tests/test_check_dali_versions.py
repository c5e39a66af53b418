"""tools/check_dali_versions.py without downloading anything: choosing releases, the dependencies a
release needs, the report; and the build refusing a DALI older than the minimum."""
import sys
import types

import pytest

from relabel_dali.ops import build
from tools import check_dali_versions as check

VERSIONS = ["2.4.0", "2.1.1", "2.1.0", "2.0.0", "1.53.0", "1.50.0", "1.37.1", "1.37.0", "1.30.0", "0.0.0"]


@pytest.mark.parametrize("line,expected", [("2.1", "2.1.1"), ("1.37", "1.37.1"), ("2.0", "2.0.0"),
                                           ("1.5", None), ("1.50", "1.50.0"), ("3.0", None)])
def test_last_release_of_a_line(line, expected):
    assert check.last_of_line(line, VERSIONS) == expected


def test_dependencies_this_environment_lacks(tmp_path):
    info = tmp_path / "nvidia_dali_cuda120-9.9.9.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("\n".join([
        "Name: nvidia-dali-cuda120", "Requires-Dist: numpy", "Requires-Dist: packaging<=1.0",
        "Requires-Dist: surely-not-installed-here>=1", "Requires-Dist: nvidia-nvimgcodec-cu12[all]<0.8.0,>=0.7.0",
        'Requires-Dist: dm-tree<=0.1.9; python_version < "3.0"']))
    assert check.missing_requirements(tmp_path, "nvidia-dali-cuda120") == ["packaging<=1.0",
                                                                           "surely-not-installed-here>=1"]


def test_report_table():
    report = {"results": [
        {"line": "1.38", "version": "1.38.0", "installed": False, "built": None, "parity": None, "seconds": 1.2,
         "error": "no binary wheel of 1.38.0 on the index (placeholder only)"},
        {"line": "2.4", "version": "2.4.0", "installed": True, "built": True, "parity": True, "seconds": 43.0,
         "max_abs_diff": 1.9e-9, "resize_equals_pil": True}]}
    table = check.markdown(report).splitlines()
    assert table[2] == "| 1.38 → 1.38.0 | **no** | — | — | 1 | no binary wheel of 1.38.0 on the index (placeholder only) |"
    assert table[3] == "| 2.4 → 2.4.0 | yes | yes | yes (1.9e-09; resize = PIL) | 43 |  |"


def test_bad_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "available_versions", lambda package: VERSIONS)
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--lines", "2.4,7.1", "--tmp", str(tmp_path)])
    assert exit_info.value.code == 2 and "no release of nvidia-dali-cuda120 in line(s) ['7.1']" in capsys.readouterr().err


@pytest.mark.parametrize("version,refused", [("1.27.0", True), ("1.28.0", False), ("2.4.0", False)])
def test_build_refuses_an_older_dali(monkeypatch, version, refused):
    sysconfig = types.SimpleNamespace(get_compile_flags=lambda: ["-I/x"], get_link_flags=lambda: ["-ldali"])
    dali = types.ModuleType("nvidia.dali")
    dali.__version__, dali.sysconfig = version, sysconfig
    monkeypatch.setitem(sys.modules, "nvidia.dali", dali)
    monkeypatch.setitem(sys.modules, "nvidia.dali.sysconfig", sysconfig)
    import nvidia

    monkeypatch.setattr(nvidia, "dali", dali, raising=False)  # `import nvidia.dali as x` reads the attribute
    if refused:
        with pytest.raises(build.BuildError, match=rf"DALI {version} is too old: .* need DALI >= {build.MIN_DALI}"):
            build.dali_build_flags()
    else:
        assert build.dali_build_flags() == (["-I/x"], ["-ldali"], version)
