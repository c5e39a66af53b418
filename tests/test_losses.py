"""Soft-target cross-entropy and label smoothing on soft targets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relabel_dali.train.losses import one_hot_targets, smooth_targets, soft_target_cross_entropy


def numpy_soft_ce(logits, targets):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-(targets * log_probs).sum(axis=1).mean())


class TestSoftTargetCrossEntropy:
    @pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-5)])
    @pytest.mark.parametrize("batch, classes", [(1, 2), (8, 10), (5, 1000)])
    def test_matches_formula(self, dtype, tol, batch, classes):
        gen = torch.Generator().manual_seed(batch * classes)
        logits = (torch.randn(batch, classes, generator=gen) * 4).to(dtype)
        targets = torch.softmax(torch.randn(batch, classes, generator=gen), dim=1)
        expected = numpy_soft_ce(logits.double().numpy(), targets.double().numpy())
        assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=tol, abs=tol)

    def test_one_hot_equals_cross_entropy(self):
        gen = torch.Generator().manual_seed(0)
        logits, labels = torch.randn(16, 7, generator=gen), torch.randint(7, (16,), generator=gen)
        got = soft_target_cross_entropy(logits, one_hot_targets(labels, 7))
        torch.testing.assert_close(got, F.cross_entropy(logits, labels))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"logits shape \(2, 3\) and targets shape \(2, 4\) differ"):
            soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


class TestSmoothTargets:
    @pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
    @pytest.mark.parametrize("classes", [3, 1000])
    def test_official_formula(self, smoothing, classes):
        targets = torch.softmax(torch.randn(4, classes, generator=torch.Generator().manual_seed(1)), dim=1)
        expected = targets.numpy() * (1 - smoothing) + smoothing / classes
        got = smooth_targets(targets, smoothing)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)

    def test_commutes_with_mixing(self):
        # CutMix mixes convexly; smoothing is affine: smoothing after mixing equals mixing smoothed targets.
        gen = torch.Generator().manual_seed(2)
        a, b = torch.softmax(torch.randn(3, 9, generator=gen), 1), torch.softmax(torch.randn(3, 9, generator=gen), 1)
        lam, s = 0.3, 0.2
        torch.testing.assert_close(smooth_targets(lam * a + (1 - lam) * b, s),
                                   lam * smooth_targets(a, s) + (1 - lam) * smooth_targets(b, s))

    @pytest.mark.parametrize("smoothing", [-0.1, 1.0])
    def test_out_of_range(self, smoothing):
        with pytest.raises(ValueError, match=r"optim\.label_smoothing must be in \[0, 1\)"):
            smooth_targets(torch.zeros(1, 2), smoothing)
