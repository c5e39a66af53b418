"""The test process keeps CUDA uninitialised through collection (see conftest.py): test modules
may ask whether a GPU exists, but asking must not initialise CUDA, or DALI's forked workers fail
in every CPU loader test that follows."""
import os


def test_availability_checks_use_nvml():
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"


def test_cuda_not_initialised_after_collection(cuda_after_collection):
    assert cuda_after_collection["torch"] is False
    # DALI's own check (cuInit called by anyone in this process), where DALI is installed.
    assert cuda_after_collection.get("driver", False) is False
