"""relabel_dali.annotator: exact FCN conversion, dense top-k, adapters and their failure paths."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from relabel_dali.annotator import (LITE_MEAN, LITE_STD, TorchvisionAdapter, build_annotator, load_state_dict,
                                    pool_boxes, topk_maps)


def photo(name: str, size: int) -> torch.Tensor:
    """A foolbox ImageNet photo resized to size x size, normalized for EfficientNet-Lite."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("the foolbox wheel's photos are not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    image = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255
    image = (image - np.array(LITE_MEAN, np.float32)) / np.array(LITE_STD, np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    return build_annotator("efficientnet-lite0")


def random_torchvision(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=50)
    for module in model.modules():  # default inits leave heads near zero; make the logits large
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=1.0)
            torch.nn.init.normal_(module.bias, std=1.0)
    return model


class TestFullyConvolutional:
    @pytest.mark.parametrize("arch, size", [("resnet18", 64), ("resnet18", 96), ("mobilenet_v2", 64),
                                            ("shufflenet_v2_x0_5", 96), ("regnet_y_400mf", 64),
                                            ("mnasnet0_5", 64), ("efficientnet_b0", 64)])
    def test_dense_mean_equals_global_logits_torchvision(self, arch, size):
        adapter = TorchvisionAdapter(random_torchvision(arch))
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            dense, reference = adapter(x), adapter.model(x)  # the model's own forward, pooling included
        assert dense.shape == (2, 50, size // 32, size // 32)
        assert reference.abs().max() > 1.0
        torch.testing.assert_close(dense.mean((2, 3)), reference, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("size, cells", [(224, 7), (256, 8)])
    def test_dense_mean_equals_global_logits_lite0_real_photo(self, lite0, size, cells):
        x = photo("imagenet_08_915.jpg", size)
        with torch.no_grad():
            dense, reference = lite0(x), lite0.model(x)
        assert dense.shape == (1, 1000, cells, cells)
        torch.testing.assert_close(dense.mean((2, 3)), reference, rtol=1e-4, atol=1e-4)
        assert int(reference.argmax()) == 915  # yurt: the model and weights are the real ones

    @pytest.mark.parametrize("arch", ["mobilenet_v3_small", "squeezenet1_0"])
    def test_heads_without_exact_dense_form_are_refused(self, arch):
        with pytest.raises(ValueError, match="no exact fully-convolutional form"):
            TorchvisionAdapter(torchvision.models.get_model(arch, weights=None))


class TestBuildAnnotator:
    def test_torchvision_arch_with_weights_file(self, tmp_path):
        model = random_torchvision("resnet18")
        torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
        # num_classes differs from torchvision's default 1000: the file does not fit
        with pytest.raises(ValueError, match="w.pth: does not fit torchvision resnet18"):
            build_annotator("resnet18", tmp_path / "w.pth")
        full = torchvision.models.get_model("resnet18", weights=None)
        torch.save({"state_dict": full.state_dict()}, tmp_path / "full.pth")
        adapter = build_annotator("resnet18", tmp_path / "full.pth")
        for name, value in full.state_dict().items():
            assert torch.equal(adapter.model.state_dict()[name], value)

    def test_unknown_arch(self):
        with pytest.raises(ValueError, match="unknown --arch 'resnet9000'"):
            build_annotator("resnet9000", "x.pth")

    def test_torchvision_arch_needs_weights(self):
        with pytest.raises(ValueError, match="--arch resnet18 needs --weights FILE"):
            build_annotator("resnet18")

    def test_missing_weights_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.pth: weights file not found"):
            load_state_dict(tmp_path / "nope.pth")

    def test_weights_file_without_state_dict(self, tmp_path):
        torch.save(torch.zeros(3), tmp_path / "t.pth")
        with pytest.raises(ValueError, match="t.pth: holds a Tensor, expected a state dict"):
            load_state_dict(tmp_path / "t.pth")


class TestTopK:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("k", [1, 5, 12])
    def test_ordering_and_ids_match_a_full_sort(self, dtype, k):
        generator = torch.Generator().manual_seed(k)
        logits = (torch.randn(3, 40, 4, 6, generator=generator) * 4).to(dtype)
        scores, class_ids = topk_maps(logits, k)
        assert scores.shape == class_ids.shape == (3, k, 4, 6)
        assert scores.dtype == torch.float32 and class_ids.dtype == torch.int64
        values = logits.float().numpy()
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.take_along_axis(values, order, 1), scores.numpy())
        assert np.all(np.diff(scores.numpy(), axis=1) <= 0)
        # ids point at their scores (ties in low precision may order equal values either way)
        np.testing.assert_array_equal(np.take_along_axis(values, class_ids.numpy(), 1), scores.numpy())
        assert all(len(set(ids)) == k for ids in class_ids.permute(0, 2, 3, 1).reshape(-1, k).tolist())

    @pytest.mark.parametrize("k", [0, 41])
    def test_bad_k(self, k):
        with pytest.raises(ValueError, match=rf"k = {k}, expected within \[1, 40\]"):
            topk_maps(torch.zeros(1, 40, 2, 2), k)

    def test_bad_rank(self):
        with pytest.raises(ValueError, match=r"dense logits shape \(40, 2, 2\), expected \[N, C, h, w\]"):
            topk_maps(torch.zeros(40, 2, 2), 5)


class TestPoolBoxes:
    def maps(self, seed=0, k=5, size=(6, 8), num_classes=30):
        rng = np.random.default_rng(seed)
        scores = -np.sort(-rng.normal(0, 3, (2, k) + size), axis=1).astype(np.float32)
        ids = np.stack([rng.permutation(num_classes)[:k] for _ in range(2 * size[0] * size[1])])
        ids = ids.reshape(2, size[0], size[1], k).transpose(0, 3, 1, 2)
        return scores, ids

    @pytest.mark.parametrize("cell", [(0, 0), (2, 5), (5, 7)])
    def test_one_cell_box_gives_that_cell(self, cell):
        scores, ids = self.maps()
        y, x = cell
        box = np.array([[x / 8, y / 6, (x + 1) / 8, (y + 1) / 6]] * 2, np.float32)
        pooled = pool_boxes(scores, ids, box, num_classes=30).numpy()
        for n in range(2):
            logits = np.zeros(30, np.float32)
            logits[ids[n, :, y, x]] = scores[n, :, y, x]
            expected = np.exp(logits - logits.max())
            np.testing.assert_allclose(pooled[n], expected / expected.sum(), rtol=1e-5, atol=1e-6)

    def test_uniform_map_is_box_independent(self):
        scores = np.broadcast_to(np.array([3.0, 1.0, -2.0], np.float32)[None, :, None, None], (1, 3, 5, 5)).copy()
        ids = np.broadcast_to(np.array([4, 0, 7])[None, :, None, None], (1, 3, 5, 5)).copy()
        expected = np.zeros(10, np.float32)
        expected[[4, 0, 7]] = [3.0, 1.0, -2.0]
        expected = np.exp(expected) / np.exp(expected).sum()
        for box in ([0, 0, 1, 1], [0.1, 0.3, 0.5, 0.9]):
            pooled = pool_boxes(scores, ids, np.array([box], np.float32), num_classes=10)
            np.testing.assert_allclose(pooled[0].numpy(), expected, rtol=1e-5)
