"""Shared test set-up.

CUDA must stay uninitialised in the test process until the GPU tests: DALI refuses to fork the
sample-source workers of the CPU loader tests once it is. ``torch.cuda.is_available()`` and
``device_count()`` initialise the driver unless PYTORCH_NVML_BASED_CUDA_CHECK=1 (NVML counts the
GPUs instead), so that is set before anything imports torch; tests marked ``gpu`` skip without a
GPU and run last.
"""
import os

os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    gpu_count = torch.cuda.device_count()  # NVML: does not initialise CUDA
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NVML finds none)")
    for item in items:
        if gpu_count == 0 and "gpu" in item.keywords:
            item.add_marker(skip)
    # Stable sort: GPU tests last, so every CPU test runs before anything initialises CUDA.
    items.sort(key=lambda item: "gpu" in item.keywords)


def pytest_collection_finish(session):
    session.config.stash[CUDA_AFTER_COLLECTION] = cuda_initialised()


def cuda_initialised() -> dict:
    """Whether torch, or anything at all in this process (DALI's check), has initialised CUDA."""
    state = {"torch": torch.cuda.is_initialized()}
    try:
        from nvidia.dali import backend
    except ImportError:
        return state
    state["driver"] = bool(backend.IsDriverInitialized())
    return state


CUDA_AFTER_COLLECTION = pytest.StashKey[dict]()


@pytest.fixture
def cuda_after_collection(request) -> dict:
    """``cuda_initialised()`` as it was when collection finished."""
    return request.config.stash[CUDA_AFTER_COLLECTION]
