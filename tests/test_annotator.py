"""relabel_dali.annotate.annotator , dense and timm_models: exact FCN conversion, per-token ViT maps, dense top-k, adapters
and their failure paths."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from relabel_dali.annotate.annotator import build_annotator, pool_boxes, topk_maps
from relabel_dali.annotate.dense import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, TorchvisionAdapter,
                                         load_state_dict)


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


def random_timm(name: str, num_classes: int = 20, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    for module in model.modules():  # make the logits large, so that a wrong map cannot pass by tolerance
        if isinstance(module, torch.nn.Linear) and module.out_features == num_classes:
            torch.nn.init.normal_(module.weight, std=1.0)
            torch.nn.init.normal_(module.bias, std=1.0)
    return model.eval()


class TestTimmConvolutional:
    @pytest.mark.parametrize("name, size, kwargs", [
        ("resnet10t", 64, {}), ("resnet10t", 96, {}), ("efficientnet_b0", 64, {}),
        ("tf_efficientnet_b0", 96, {}),  # the L2 annotator's family: TF 'same' padding
        ("regnetx_002", 64, {}),
        ("swin_tiny_patch4_window7_224", 64, {"img_size": 64, "window_size": 2}),  # NHWC features
    ])
    def test_dense_mean_equals_the_models_own_logits(self, name, size, kwargs):
        from relabel_dali.annotate.timm_models import TimmConvAdapter

        model = random_timm(name, **kwargs)
        adapter = TimmConvAdapter(model, name)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            dense, reference = adapter(x), model(x)  # timm's own forward: features, pooling, head
        assert dense.shape == (2, 20, size // 32, size // 32) and adapter.exact
        assert reference.abs().max() > 1.0
        torch.testing.assert_close(dense.mean((2, 3)), reference, rtol=1e-4, atol=1e-4)
        # each cell is the classifier of that cell's feature vector, bias included
        features = model.forward_features(x)
        if features.shape[1] != dense.shape[1] and features.shape[-1] == model.num_features:
            features = features.permute(0, 3, 1, 2)
        cell = features[:, :, 1, 0]
        torch.testing.assert_close(dense[:, :, 1, 0], model.get_classifier()(cell), rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("name, kwargs", [("convnext_atto", {}), ("mobilenetv3_small_050", {}),
                                              ("resnet10t", {"global_pool": "max"}),
                                              ("resnet10t", {"global_pool": "catavgmax"})])
    def test_heads_without_exact_dense_form_are_refused_by_name(self, name, kwargs):
        from relabel_dali.annotate.timm_models import TimmConvAdapter

        with pytest.raises(ValueError, match=f"timm:{name} has no exact fully-convolutional form"):
            TimmConvAdapter(random_timm(name, **kwargs), name)


class TestTimmVisionTransformer:
    SIZE = 64  # 4x4 patches of 16 px

    def dense_and_tokens(self, **kwargs):
        from relabel_dali.annotate.timm_models import TimmTokenAdapter

        model = random_timm("vit_tiny_patch16_224", img_size=self.SIZE, **kwargs)
        adapter = TimmTokenAdapter(model, "vit_tiny_patch16_224")
        x = torch.randn(2, 3, self.SIZE, self.SIZE, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return adapter, model, x, adapter(x), model.forward_features(x)

    def test_mean_pooled_head_with_per_token_norm_is_exact(self):
        adapter, model, x, dense, _ = self.dense_and_tokens(global_pool="avg", fc_norm=False)
        assert dense.shape == (2, 20, 4, 4) and adapter.exact
        with torch.no_grad():
            torch.testing.assert_close(dense.mean((2, 3)), model(x), rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg"}])  # class token; avg with fc_norm
    def test_each_cell_is_the_head_on_that_patch_token(self, kwargs):
        adapter, model, x, dense, tokens = self.dense_and_tokens(**kwargs)
        prefix = model.num_prefix_tokens
        with torch.no_grad():
            for y, x_cell in [(0, 0), (1, 3), (3, 2)]:
                token = tokens[:, prefix + 4 * y + x_cell]  # row-major patch order
                torch.testing.assert_close(dense[:, :, y, x_cell], model.head(model.fc_norm(token)),
                                           rtol=1e-4, atol=1e-4)
            logits = model(x)
        # neither head's logits are the mean of the per-token map: documented, and reported as not exact
        assert not adapter.exact
        assert (dense.mean((2, 3)) - logits).abs().max() > 1e-2
        if not kwargs:  # the class-token head reads token 0 only
            torch.testing.assert_close(logits, model.head(tokens[:, 0]), rtol=1e-4, atol=1e-4)

    def test_patch_grid_layout_on_a_non_square_image(self):
        from relabel_dali.annotate.timm_models import TimmTokenAdapter

        # No blocks: each token depends on its own patch only, so a change inside patch (row 1,
        # column 3) of a 3x5 grid must move that cell of the map and no other.
        model = random_timm("vit_tiny_patch16_224", depth=0, dynamic_img_size=True, global_pool="avg",
                            fc_norm=False)
        adapter = TimmTokenAdapter(model, "vit_tiny_patch16_224")
        x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
        changed = x.clone()
        changed[:, :, 16:32, 48:64] += 1.0
        with torch.no_grad():
            moved = (adapter(changed) - adapter(x)).abs().amax(1)[0]
        assert moved.shape == (3, 5)
        assert moved[1, 3] > 1e-3
        moved[1, 3] = 0
        assert moved.max() < 1e-5

    def test_attention_pooling_is_refused(self):
        from relabel_dali.annotate.timm_models import TimmTokenAdapter

        with pytest.raises(ValueError, match="pools its tokens with attention"):
            TimmTokenAdapter(random_timm("vit_tiny_patch16_224", img_size=64, global_pool="map"), "vit")


class TestBuildTimmAnnotator:
    def test_weights_file_safetensors_with_its_own_class_count(self, tmp_path):
        from safetensors.torch import save_file

        model = random_timm("resnet10t", num_classes=7)
        save_file(model.state_dict(), tmp_path / "w.safetensors")
        adapter = build_annotator("timm:resnet10t", tmp_path / "w.safetensors")
        assert adapter.num_classes == 7 and adapter.exact
        for name, value in model.state_dict().items():
            assert torch.equal(adapter.model.state_dict()[name], value), name
        # resnet10t's pretrained config: ImageNet mean/std, bicubic
        assert adapter.mean == IMAGENET_MEAN and adapter.std == IMAGENET_STD
        assert adapter.interpolation == "bicubic"

    def test_torch_checkpoint_with_ddp_prefix(self, tmp_path):
        model = random_timm("resnet10t", num_classes=5)
        torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
        adapter = build_annotator("timm:resnet10t", tmp_path / "w.pth")
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(adapter.global_logits(x), model(x))

    def test_vit_weights_at_another_input_size(self, tmp_path):
        from safetensors.torch import save_file

        model = random_timm("vit_tiny_patch16_224")  # 224 px: 14x14 position embeddings
        save_file(model.state_dict(), tmp_path / "vit.safetensors")
        adapter = build_annotator("timm:vit_tiny_patch16_224", tmp_path / "vit.safetensors", size=96)
        assert adapter.interpolation == "bicubic" and adapter.mean == (0.5, 0.5, 0.5)
        with torch.no_grad():
            assert adapter(torch.zeros(1, 3, 96, 96)).shape == (1, 20, 6, 6)
        assert torch.equal(adapter.model.head.weight, model.head.weight)

    def test_weights_of_another_model_do_not_fit(self, tmp_path):
        torch.save(random_timm("resnet10t").state_dict(), tmp_path / "w.pth")
        with pytest.raises(ValueError, match="w.pth: does not fit timm resnet14t"):
            build_annotator("timm:resnet14t", tmp_path / "w.pth")

    def test_missing_weights_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.safetensors: weights file not found"):
            build_annotator("timm:resnet10t", tmp_path / "nope.safetensors")

    def test_unknown_model_names_close_ones(self):
        with pytest.raises(ValueError, match="unknown timm model 'resnet10x'; closest: .*resnet10t"):
            build_annotator("timm:resnet10x", "w.pth")

    def test_the_papers_annotator_config(self):
        from relabel_dali.annotate.annotator import default_input_size
        from relabel_dali.annotate.timm_models import pretrained_config

        config = pretrained_config("tf_efficientnet_l2.ns_jft_in1k_475")
        assert default_input_size("timm:tf_efficientnet_l2.ns_jft_in1k_475") == 475
        assert (config.num_classes, config.interpolation, config.mean) == (1000, "bicubic", IMAGENET_MEAN)
        assert default_input_size("efficientnet-lite0") == 480
