"""The CUDA sources compile wherever an nvcc is found, GPU or not, so a build break shows in CI
rather than on the first GPU node. Compile only (``nvcc -c``), for one arch, with the pieces the
build module uses: its nvcc flags, its ``-gencode`` form and DALI's compile flags."""
import subprocess

import pytest

from relabel_dali.ops import build

NVCC = build.find_nvcc()
ARCH = "90"  # one arch keeps it quick; the build compiles cuda_archs()
SOURCES = sorted(path.name for path in build.CSRC.glob("*.cu"))

pytestmark = pytest.mark.skipif(
    NVCC is None, reason="no nvcc found (PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda, or RELABEL_DALI_NO_CUDA "
                         "is set): the CUDA sources cannot be compiled here")


def flags_for(source: str) -> list[str]:
    """What the build adds for each .cu file: the CUDA switch for the C ABI library, DALI's
    compile flags for the operator."""
    if source == "label_pool_capi.cu":
        return ["-DRELABEL_WITH_CUDA"]
    if source == "label_pool.cu":
        return build.dali_build_flags()[0]
    raise AssertionError(f"{source}: a new .cu file needs its flags here")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """source -> (command, result, object file): every .cu file compiled at once (each takes
    about half a minute of one core)."""
    try:
        build.find_cuda_include(NVCC)
        flags = {source: flags_for(source) for source in SOURCES}
    except build.BuildError as error:
        pytest.skip(f"nvcc {NVCC} found, but: {error}")
    out = tmp_path_factory.mktemp("cuda_objects")
    running = {}
    for source in SOURCES:
        obj = out / (source + ".o")
        command = [NVCC, *build.NVCC_FLAGS, *flags[source], *build.nvcc_gencode([ARCH]),
                   "-c", str(build.CSRC / source), "-o", str(obj)]
        running[source] = command, obj, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                         stderr=subprocess.STDOUT, text=True)
    return {source: (command, process.communicate(timeout=600)[0], process.returncode, obj)
            for source, (command, obj, process) in running.items()}


@pytest.mark.slow
class TestCudaSourcesCompile:
    def test_both_sources_are_found(self):
        assert SOURCES == ["label_pool.cu", "label_pool_capi.cu"]

    @pytest.mark.parametrize("source", SOURCES)
    def test_compiles_for_one_arch(self, compiled, source):
        command, output, returncode, obj = compiled[source]
        assert returncode == 0, f"{' '.join(command)}\n{output[-4000:]}"
        assert obj.stat().st_size > 0
