"""host_to_device: an owned copy on the CPU; on a GPU an asynchronous copy that still reads the
values the source had when it was called, however late the GPU gets to it."""
import pytest
import torch

from relabel_dali.data.transfer import host_to_device


class TestHostToDevice:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8])
    def test_cpu_gives_an_owned_copy(self, dtype):
        source = torch.arange(12).view(3, 4).to(dtype)
        copy = host_to_device(source, "cpu")
        assert torch.equal(copy, source) and copy.dtype == dtype and copy.shape == (3, 4)
        assert copy.data_ptr() != source.data_ptr()
        source.fill_(7)
        assert torch.equal(copy, torch.arange(12).view(3, 4).to(dtype))

    def test_only_host_tensors(self):
        with pytest.raises(ValueError, match="expected a host tensor, got one on meta"):
            host_to_device(torch.empty(2, device="meta"), "cpu")

    @pytest.mark.gpu
    @pytest.mark.parametrize("pinned", [True, False], ids=["pinned-source", "pageable-source"])
    def test_gpu_copy_reads_the_values_at_call_time(self, pinned):
        # The GPU is kept busy, so the copy runs long after the host has overwritten the
        # source (as DALI does with a buffer it lent): the copy must not see the new values.
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
        source = torch.arange(1 << 16, dtype=torch.int64)
        source = source.pin_memory() if pinned else source
        torch.cuda._sleep(200_000_000)  # cycles: a few tenths of a second of queued GPU work
        copy = host_to_device(source, "cuda")
        source.fill_(-1)
        torch.cuda.synchronize()
        assert copy.is_cuda and torch.equal(copy.cpu(), torch.arange(1 << 16, dtype=torch.int64))

    @pytest.mark.gpu
    def test_gpu_copy_does_not_wait_for_the_gpu(self):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
        host_to_device(torch.zeros(4), "cuda")  # the first pinned block is allocated outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            host_to_device(torch.arange(8), "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
