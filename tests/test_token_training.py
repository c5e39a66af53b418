"""Token-label training (data.relabel.token_size): the loader's token targets against the Python
reference, the loss against a dense soft-target cross-entropy written out here, token CutMix
against a per-cell count of the pasted pixels, and train.py end to end with exact resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import CLASSES, argv_for, kill_after_one_epoch_and_resume, write_tiny
from relabel_dali.config import ConfigError, parse_command_line
from relabel_dali.data.loader import build_train_loader
from relabel_dali.data.settings import Dataset, Labels, Runtime, TrainAugment
from relabel_dali.ops.token_reference import compact_token_targets, object_topk_maps, pool_tokens_reference
from relabel_dali.store.reader import LabelShardReader
from relabel_dali.train.cutmix import cutmix_batch, cutmix_batch_tokens
from relabel_dali.train.losses import token_label_loss
from relabel_dali.train.models import TokenLabelModel, build_model

VIT = "timm:vit_tiny_patch16_224"
VIT_KWARGS = "{depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}"  # 32 px: 4 x 4 tokens


def dense_loss(logits, token_logits, targets, token_targets, weight) -> float:
    """LV-ViT's loss written out in float64: soft CE of the class token, plus ``weight`` times
    the soft CE averaged over every token of every sample."""
    def soft_ce(z, t):
        z = z.double()
        log_q = z - z.logsumexp(-1, keepdim=True)
        return float(-(t.double() * log_q).sum(-1).mean())

    c = logits.shape[-1]
    return soft_ce(logits, targets) + weight * soft_ce(token_logits.reshape(-1, c), token_targets.reshape(-1, c))


class TestTokenLoss:
    @pytest.mark.parametrize("size,num_classes", [(4, 19), (14, 100)])
    def test_dense_and_compact_equal_the_reference(self, size, num_classes):
        generator = torch.Generator().manual_seed(size)
        n = 3
        scores, ids = object_topk_maps(n, 5, 12, num_classes, generator)
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.3, 0.6, 0.9], [0.55, 0.05, 0.95, 0.4]])
        mirror = torch.tensor([False, True, True])
        targets = pool_tokens_reference(scores, ids, boxes, mirror, 1, num_classes)[:, 0]
        tokens = pool_tokens_reference(scores, ids, boxes, mirror, size, num_classes)
        logits = 3 * torch.randn(n, num_classes, generator=generator)
        token_logits = 3 * torch.randn(n, size * size, num_classes, generator=generator)
        expected = dense_loss(logits, token_logits, targets, tokens, 0.5)
        assert float(token_label_loss(logits, token_logits, targets, tokens, 0.5)) == pytest.approx(expected, rel=1e-5)
        compact = compact_token_targets(scores, ids, boxes, mirror, size, num_classes)
        assert float(token_label_loss(logits, token_logits, targets, compact, 0.5)) == pytest.approx(expected, rel=1e-5)

    def test_weight_zero_is_the_class_token_loss_alone(self):
        logits, token_logits = torch.randn(2, 5), torch.randn(2, 4, 5)
        targets, tokens = torch.softmax(torch.randn(2, 5), 1), torch.softmax(torch.randn(2, 4, 5), 2)
        assert float(token_label_loss(logits, token_logits, targets, tokens, 0.0)) == pytest.approx(
            dense_loss(logits, token_logits, targets, tokens, 0.0), rel=1e-6)

    def test_mismatched_shapes_are_refused(self):
        with pytest.raises(ValueError, match="token_logits shape"):
            token_label_loss(torch.zeros(2, 5), torch.zeros(2, 4, 5), torch.zeros(2, 5), torch.zeros(2, 9, 5), 0.5)
        with pytest.raises(ValueError, match="expected \\[B=2, T, C\\]"):
            token_label_loss(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5), 0.5)


class TestTokenCutMix:
    @staticmethod
    def labelled_batch(n, size, side, num_classes, seed):
        """Images whose every pixel holds its sample's number, so the mixed images say where each
        pixel came from; random soft targets."""
        generator = torch.Generator().manual_seed(seed)
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, side, side).clone()
        targets = torch.softmax(torch.randn(n, num_classes, generator=generator), 1)
        tokens = torch.softmax(torch.randn(n, size * size, num_classes, generator=generator), 2)
        return images, targets, tokens

    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("size,side", [(4, 32), (7, 56), (14, 224)])
    def test_tokens_follow_the_pasted_pixels(self, seed, size, side):
        n, num_classes = 5, 6
        images, targets, tokens = self.labelled_batch(n, size, side, num_classes, seed)
        mixed, mixed_targets, mixed_tokens, lam = cutmix_batch_tokens(
            images.clone(), targets, tokens, prob=1.0, beta=1.0, generator=torch.Generator().manual_seed(seed))
        source = mixed[:, 0].round().long().numpy()  # [B, H, W]: which sample each pixel came from
        patch = side // size
        for b in range(n):
            partners = set(np.unique(source[b])) - {b}
            assert len(partners) <= 1
            partner = partners.pop() if partners else b
            pasted = source[b] != b
            assert float(mixed_targets[b].sum()) == pytest.approx(1.0)
            lam_b = 1.0 - pasted.mean()
            torch.testing.assert_close(mixed_targets[b], lam_b * targets[b] + (1 - lam_b) * targets[partner])
            for r in range(size):
                for c in range(size):
                    share = pasted[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].mean()
                    expected = (1 - share) * tokens[b, r * size + c] + share * tokens[partner, r * size + c]
                    torch.testing.assert_close(mixed_tokens[b, r * size + c], expected)
        box_share = max((source[b] != b).mean() for b in range(n))  # a sample paired with itself shows no box
        assert lam == pytest.approx(1.0 - box_share, abs=1e-6)

    def test_same_draws_as_cutmix_without_tokens(self):
        images, targets, tokens = self.labelled_batch(6, 4, 32, 5, 0)
        for seed in range(5):
            a = cutmix_batch(images.clone(), targets, prob=0.7, beta=1.0, generator=torch.Generator().manual_seed(seed))
            b = cutmix_batch_tokens(images.clone(), targets, tokens, prob=0.7, beta=1.0,
                                    generator=torch.Generator().manual_seed(seed))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[3]
            if b[3] == 1.0:
                assert b[2] is tokens

    def test_bad_token_shape_is_refused(self):
        images, targets, tokens = self.labelled_batch(2, 4, 32, 3, 0)
        with pytest.raises(ValueError, match="token_targets: expected"):
            cutmix_batch_tokens(images, targets, tokens[:, :15], generator=torch.Generator())


@pytest.fixture(scope="module")
def token_tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("token_tiny"))


def token_argv(root: Path, out: Path, *extra: str) -> list[str]:
    argv = argv_for(root, out, "--data.relabel.token_size", "4", "--data.cutmix.prob", "1.0",
                    "--data.cutmix.beta", "1.0", "--data.cutmix.off_epoch", "0", "--optim.optimizer", "adamw",
                    "--optim.lr.init", "1e-3", *extra)
    argv[argv.index("--model.arch") + 1], argv[argv.index("--model.kwargs") + 1] = VIT, VIT_KWARGS
    return argv


class TestLoader:
    def test_token_targets_equal_the_reference_and_the_rest_is_unchanged(self, token_tiny):
        def first_batch(token_size):
            loader = build_train_loader(Dataset(token_tiny / "train", num_classes=3), batch_size=8,
                                        labels=Labels(token_tiny / "labels", token_size=token_size,
                                                      token_compact=False),
                                        augment=TrainAugment(image_size=32),
                                        runtime=Runtime(num_threads=1, py_workers=1), seed=3)
            try:
                return next(iter(loader)), loader.source.keys
            finally:
                loader.close()

        plain, _ = first_batch(0)
        batch, keys = first_batch(4)
        assert set(plain) == {"images", "boxes", "targets", "labels", "indices"}
        for name in plain:  # the crop's target and everything else: bit for bit what token_size 0 gives
            assert torch.equal(plain[name], batch[name]), name
        reader = LabelShardReader(token_tiny / "labels")
        records = [reader[keys[i]] for i in batch["indices"].tolist()]
        scores = torch.from_numpy(np.stack([r[0] for r in records]).astype(np.float32))
        ids = torch.from_numpy(np.stack([r[1] for r in records]).astype(np.int64))
        mirror = batch["mirror"].bool()
        assert 0 < int(mirror.sum()) < len(mirror)  # both flips present in this batch
        expected = pool_tokens_reference(scores, ids, batch["boxes"], mirror, 4, len(CLASSES))
        assert batch["token_targets"].shape == (8, 16, 3)
        torch.testing.assert_close(batch["token_targets"], expected, rtol=0, atol=1e-6)


class TestModel:
    def test_configurations_without_a_patch_grid_of_token_size_are_refused(self, token_tiny, tmp_path):
        argv = token_argv(token_tiny, tmp_path)
        argv[argv.index("--model.arch") + 1], argv[argv.index("--model.kwargs") + 1] = "resnet18", "{}"
        cfg, _ = parse_command_line(argv)
        with pytest.raises(ConfigError, match="need a timm vision transformer"):
            build_model(cfg)
        cfg, _ = parse_command_line(token_argv(token_tiny, tmp_path, "--data.relabel.token_size", "2"))
        with pytest.raises(ConfigError, match="patch grid of \\(4, 4\\)"):
            build_model(cfg)
        assert train.main(token_argv(token_tiny, tmp_path, "--data.relabel.use", "false")) == 2

    def test_heads_and_prefix_tokens(self, token_tiny, tmp_path):
        argv = token_argv(token_tiny, tmp_path)
        kwargs = "{depth: 1, embed_dim: 32, num_heads: 2, patch_size: 8, reg_tokens: 2}"
        argv[argv.index("--model.kwargs") + 1] = kwargs
        cfg, _ = parse_command_line(argv)
        model = build_model(cfg)
        assert isinstance(model, TokenLabelModel) and model.num_prefix_tokens == 3  # class + 2 register tokens
        images = torch.randn(2, 3, 32, 32)
        logits, token_logits = model.train()(images)
        features = model.backbone.forward_features(images)
        torch.testing.assert_close(token_logits, model.aux_head(features[:, 3:]))
        torch.testing.assert_close(logits, model.backbone.forward_head(features))
        torch.testing.assert_close(model.eval()(images), logits)
        assert "backbone.pos_embed" in model.no_weight_decay()


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TestTrain:
    def test_trains_updates_the_aux_head_and_resumes_exactly(self, token_tiny, tmp_path, monkeypatch):
        straight_out, resumed_out = tmp_path / "straight", tmp_path / "resumed"
        assert train.main(token_argv(token_tiny, straight_out)) == 0
        straight = torch.load(straight_out / "checkpoint-last.pth", weights_only=False)
        cfg, _ = parse_command_line(token_argv(token_tiny, straight_out))
        torch.manual_seed(cfg.compute.seed)  # as train.prepare_model builds it
        initial = build_model(cfg).state_dict()
        assert straight["model"]["aux_head.weight"].shape == (len(CLASSES), 32)
        assert not torch.equal(straight["model"]["aux_head.weight"], initial["aux_head.weight"])
        assert all(torch.isfinite(v).all() for v in straight["model"].values())
        loss = json.loads((straight_out / "metrics.json").read_text())["train"]["loss"]
        assert np.isfinite(loss) and loss > 0

        resumed = kill_after_one_epoch_and_resume(token_argv(token_tiny, resumed_out), resumed_out, monkeypatch)
        assert resumed["epoch"] == straight["epoch"] == 2
        assert states_equal(resumed["model"], straight["model"])
        assert resumed["schedule"] == straight["schedule"]
        states = zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values())
        pairs = [(s[k], t[k]) for s, t in states for k in ("exp_avg", "exp_avg_sq")]
        assert pairs and all(torch.equal(a, b) for a, b in pairs)
        assert resumed["metrics"] == straight["metrics"]


class TestConfigs:
    def test_tokenlabel_deit_s_builds_the_recipe(self):
        from relabel_dali.train.optim import build_optimizer

        repo = Path(__file__).resolve().parent.parent
        assert "NOT RUN AT FULL SCALE" in (repo / "configs" / "tokenlabel_deit_s.yaml").read_text().splitlines()[0]
        cfg, _ = parse_command_line(["--config-file-path", str(repo / "configs" / "tokenlabel_deit_s.yaml")])
        assert (cfg.data.relabel.token_size, cfg.optim.token_loss_weight) == (14, 0.5)
        with torch.device("meta"):  # shapes only: initialising 22M weights is the slow part
            model = build_model(cfg)
        assert isinstance(model, TokenLabelModel) and model.backbone.patch_embed.grid_size == (14, 14)
        # DeiT-S with a 1000-class head (22,050,664) plus the 384 x 1000 auxiliary head and its bias
        assert sum(p.numel() for p in model.parameters()) == 22_050_664 + 384 * 1000 + 1000
        groups = build_optimizer(cfg, model).param_groups
        undecayed = {id(p) for p in groups[1]["params"]}
        assert id(model.backbone.pos_embed) in undecayed and id(model.aux_head.bias) in undecayed
        assert id(model.aux_head.weight) not in undecayed


class TestRelabelViTMaps:
    def test_a_vit_annotators_maps_are_token_labels_cell_for_token(self, token_tiny, tmp_path):
        """tools/relabel.py with a ViT annotator writes one cell per patch, rows first; pooled over
        the whole image to the annotator's own grid, token (r, c) of the student is cell (r, c)
        (cell (r, S-1-c) when the image was flipped)."""
        import timm
        from safetensors.torch import save_file

        from relabel_dali.ops.reference import dense_label_maps
        from tools import relabel

        torch.manual_seed(0)
        weights = tmp_path / "vit.safetensors"
        save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), weights)
        labels = tmp_path / "vit_labels"
        assert relabel.main([str(token_tiny / "train"), str(labels), "--arch", "timm:vit_tiny_patch16_224",
                             "--weights", str(weights), "--size", "48", "--topk", "3",
                             "--threads", "2", "--dtype", "float32", "--classes", "imagenet"]) == relabel.EXIT_OK
        reader = LabelShardReader(labels)
        assert (reader.height, reader.width) == (3, 3)  # 48 px / patch 16
        # Whole-image crops: the images are 40 wide, 48 high, so one area and one aspect ratio.
        augment = TrainAugment(image_size=48, random_area=(1.0, 1.0), random_aspect_ratio=(40 / 48, 40 / 48))
        loader = build_train_loader(Dataset(token_tiny / "train", class_map="imagenet", num_classes=1000),
                                    batch_size=8, labels=Labels(labels, token_size=3, token_compact=False),
                                    augment=augment,
                                    runtime=Runtime(num_threads=1, py_workers=1))
        try:
            batch = next(iter(loader))
            keys = loader.source.keys
        finally:
            loader.close()
        assert torch.equal(batch["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 8))
        mirror = batch["mirror"].bool()
        assert 0 < int(mirror.sum()) < 8
        for b, index in enumerate(batch["indices"].tolist()):
            scores, ids = reader[keys[index]]
            cells = torch.softmax(dense_label_maps(torch.from_numpy(scores)[None], torch.from_numpy(ids)[None].long(),
                                                   1000)[0], 0)  # [C, 3, 3]
            if mirror[b]:
                cells = cells.flip(2)
            torch.testing.assert_close(batch["token_targets"][b], cells.reshape(1000, 9).T, rtol=0, atol=1e-6)
