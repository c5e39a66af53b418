"""CutMix: target mass, the area formula, determinism, failure paths, GPU tensors."""
import pytest
import torch

from relabel_dali.train.cutmix import cutmix_batch, cutmix_box


def batch(size=6, classes=10, hw=(16, 20), device="cpu", dtype=torch.float32):
    # Each image is one constant value (its batch position), so pasted pixels say where they came from.
    images = torch.arange(size, dtype=dtype, device=device).view(size, 1, 1, 1).expand(size, 3, *hw).clone()
    targets = torch.softmax(torch.randn(size, classes, generator=torch.Generator().manual_seed(1)), 1).to(device)
    return images, targets


class TestCutmix:
    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("hw", [(16, 20), (7, 7)])
    def test_area_formula_and_mixed_targets(self, seed, dtype, hw):
        images, targets = batch(hw=hw, dtype=dtype)
        original = images.clone()
        mixed, mixed_targets, lam = cutmix_batch(images, targets, prob=1.0, beta=1.0,
                                                 generator=torch.Generator().manual_seed(seed))
        changed = (mixed != original).any(dim=1)  # [B, H, W]
        area = hw[0] * hw[1]
        # Where a sample was paired with another, the pasted region is exactly 1 - lam of the image.
        for b in range(len(mixed)):
            moved = int(changed[b].sum())
            assert moved in (0, round((1 - lam) * area))
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(mixed_targets.sum(1), torch.ones(len(targets)), atol=1e-5)
        # The targets are lam * t + (1 - lam) * t[perm] with perm read back from the pasted pixels.
        perm = torch.tensor([int(img[0][changed[b]].unique()[0]) if changed[b].any() else b
                             for b, img in enumerate(mixed)])
        expected = lam * targets + (1 - lam) * targets[perm]
        assert torch.allclose(mixed_targets, expected, atol=1e-6)

    def test_box_area_matches_lam_before_clipping(self):
        g = torch.Generator().manual_seed(0)
        for lam in (0.1, 0.5, 0.9):
            y0, y1, x0, x1 = cutmix_box(1000, 1000, lam, g)
            assert 0 <= y0 <= y1 <= 1000 and 0 <= x0 <= x1 <= 1000
            assert (y1 - y0) * (x1 - x0) <= (1 - lam) * 1e6 + 2000

    def test_deterministic_with_a_generator(self):
        runs = []
        for _ in range(2):
            images, targets = batch()
            runs.append(cutmix_batch(images, targets, prob=1.0, beta=1.0, generator=torch.Generator().manual_seed(3)))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]

    def test_prob_zero_is_identity(self):
        images, targets = batch()
        out_images, out_targets, lam = cutmix_batch(images.clone(), targets, prob=0.0)
        assert lam == 1.0 and torch.equal(out_images, images) and torch.equal(out_targets, targets)

    def test_prob_is_a_rate(self):
        g = torch.Generator().manual_seed(0)
        applied = sum(cutmix_batch(*batch(), prob=0.3, generator=g)[2] != 1.0 for _ in range(300))
        assert 60 <= applied <= 120

    @pytest.mark.parametrize("kwargs,message", [
        ({"prob": 1.5}, r"prob must be in \[0, 1\], got 1.5"),
        ({"beta": 0.0}, "beta must be > 0, got 0.0"),
    ])
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            cutmix_batch(*batch(), **kwargs)

    def test_bad_shapes(self):
        images, targets = batch()
        with pytest.raises(ValueError, match=r"images: expected \[B, C, H, W\], got shape \(6, 16, 20\)"):
            cutmix_batch(images[:, 0], targets)
        with pytest.raises(ValueError, match=r"targets: expected \[B=6, num_classes\], got shape \(5, 10\)"):
            cutmix_batch(images, targets[:5])

    @pytest.mark.parametrize("seed,lam,box,moved,next_draw", [
        (5, 0.90625, (1, 7, 15, 20), {1: 2, 2: 1}, 0.9809269309043884),
        (11, 0.8875, (4, 10, 0, 6), {4: 5, 5: 4}, 0.10250282287597656),
    ])
    def test_cpu_draws_are_unchanged(self, seed, lam, box, moved, next_draw):
        # Recorded before the permutation moved through host_to_device: a seed still gives the
        # same lam, box and pairs on the CPU, and leaves the generator where it did (exact resume).
        images, targets = batch()
        original = images.clone()
        generator = torch.Generator().manual_seed(seed)
        mixed, _, got_lam = cutmix_batch(images, targets, prob=1.0, beta=1.0, generator=generator)
        assert got_lam == lam
        changed = (mixed != original).any(dim=1)
        rows, cols = changed.any(dim=(0, 2)).nonzero().flatten(), changed.any(dim=(0, 1)).nonzero().flatten()
        assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == box
        assert {b: int(mixed[b, 0][changed[b]].unique()) for b in range(len(mixed)) if changed[b].any()} == moved
        assert float(torch.rand((), generator=generator)) == next_draw

    @pytest.mark.gpu
    def test_on_gpu_the_host_does_not_wait(self):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU available")
        cutmix_batch(*batch(device="cuda"), prob=1.0, generator=torch.Generator().manual_seed(5))  # warm-up
        images, targets = batch(device="cuda")
        torch.cuda.set_sync_debug_mode("error")  # a blocking copy or other synchronisation raises
        try:
            cutmix_batch(images, targets, prob=1.0, generator=torch.Generator().manual_seed(6))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    @pytest.mark.gpu
    def test_on_gpu_matches_cpu(self):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU available")
        cpu = cutmix_batch(*batch(), prob=1.0, generator=torch.Generator().manual_seed(5))
        gpu = cutmix_batch(*batch(device="cuda"), prob=1.0, generator=torch.Generator().manual_seed(5))
        assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0])
        assert torch.allclose(gpu[1].cpu(), cpu[1]) and gpu[2] == cpu[2]
