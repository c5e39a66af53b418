"""Token targets: the TokenLabeling reference and the image's geometry, compact targets and their
loss, TokenLabeling's own label files through pack_labels.py, and tools/token_targets.py."""
import json

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from relabel_dali import LabelShardReader
from relabel_dali.ops.compact import CompactTargets
from relabel_dali.ops.reference import dense_label_maps, official_label_pooling, random_boxes, reference_pool
from relabel_dali.ops.token_reference import (compact_token_targets, object_topk_maps, pool_tokens_reference,
                                              token_label_pool, token_logits)
from relabel_dali.train.losses import compact_soft_target_cross_entropy, soft_target_cross_entropy
from conftest import make_dataset
from tools import pack_labels, token_targets

C = 1000


@pytest.fixture(scope="module")
def maps():
    generator = torch.Generator().manual_seed(0)
    scores, ids = object_topk_maps(24, 5, 15, C, generator)
    return scores, ids, random_boxes(24, generator), torch.rand(24, generator=generator) < 0.5


def wide(boxes, cells):
    """Boxes at least one map cell wide and high: roi_align (aligned=False) widens thinner ones to
    one cell to the right and below, which no flip mirrors."""
    return ((boxes[:, 2] - boxes[:, 0]) * cells >= 1) & ((boxes[:, 3] - boxes[:, 1]) * cells >= 1)


def cell_map():
    """4x4 canonical map whose cell (y, x) holds class 4 y + x alone."""
    return torch.full((1, 1, 4, 4), 8.0), torch.arange(16).view(1, 1, 4, 4)


class TestOneToken:
    def test_image_geometry_is_the_relabel_reference_bit_for_bit(self, maps):
        scores, ids, boxes, mirror = maps
        pooled = pool_tokens_reference(scores, ids, boxes, mirror, 1, C)
        assert pooled.shape == (24, 1, C)
        assert torch.equal(pooled[:, 0], reference_pool(scores, ids, boxes, C))

    def test_tokenlabeling_is_relabels_official_formula(self, maps):
        """Their get_label at S = 1 is ReLabel's official pooling: bit for bit on the same file, and
        reference_pool on the maps with the last two axes swapped (as --layout official stores)."""
        scores, ids, boxes, _ = maps
        theirs = token_label_pool(scores, ids, boxes, torch.zeros(24, dtype=torch.bool), 1, C)[:, 0]
        coords = boxes[:, [1, 0, 3, 2]]  # (top, left, bottom, right)
        assert torch.equal(theirs, official_label_pooling(torch.stack([scores, ids.float()], 1), coords, C))
        transposed = reference_pool(scores.transpose(2, 3), ids.transpose(2, 3), boxes, C)
        torch.testing.assert_close(theirs, transposed, rtol=1e-5, atol=1e-7)


class TestGeometry:
    @pytest.mark.parametrize("geometry", ["image", "tokenlabeling"])
    def test_whole_image_crops_agree(self, maps, geometry):
        """15 tokens over a 15-cell map sample the cells' centres: token (r, c) is cell (r, c), the
        columns reversed where mirrored, in both geometries."""
        scores, ids, _, mirror = maps
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(24, 4)
        dense = dense_label_maps(scores, ids, C)
        cells = torch.where(mirror.view(24, 1, 1, 1), dense.flip(3), dense).flatten(2).transpose(1, 2)
        assert torch.equal(token_logits(scores, ids, whole, mirror, 15, C, geometry), cells)

    def test_token_order_is_row_major_over_the_crop_as_the_student_sees_it(self):
        scores, ids = cell_map()
        for box, tokens, seen in [([0.0, 0.0, 1.0, 1.0], 4, list(range(16))), ([0.5, 0.0, 1.0, 0.5], 2, [2, 3, 6, 7])]:
            for mirror in (False, True):
                pooled = pool_tokens_reference(scores, ids, torch.tensor([box]), torch.tensor([mirror]), tokens, 16)
                expected = torch.tensor(seen).view(tokens, tokens)
                assert pooled[0].argmax(-1).tolist() == (expected.flip(1) if mirror else expected).flatten().tolist()

    def test_tokenlabeling_reads_the_crop_reflected_in_the_diagonal_or_with_a_flip_the_anti_diagonal(self):
        scores, ids = cell_map()
        box = torch.tensor([[0.5, 0.0, 1.0, 0.75]])  # columns 2-3, rows 0-2
        image = pool_tokens_reference(scores, ids, box, torch.tensor([False]), 2, 16)
        theirs = pool_tokens_reference(scores, ids, box, torch.tensor([False]), 2, 16, "tokenlabeling")
        flipped = pool_tokens_reference(scores, ids, box, torch.tensor([True]), 2, 16, "tokenlabeling")
        assert image[0].argmax(-1).tolist() == [2, 3, 10, 11]  # rows 0.75 and 2.25 (nearest: 0-1 -> 0, 2), cols 2, 3
        # reflected in the main diagonal: rows 2-3, columns 0-2, tokens row-major over that window
        assert theirs[0].argmax(-1).tolist() == [8, 10, 12, 14]
        # flipped: reflected in the anti-diagonal (x, y) -> (1 - y, 1 - x): rows 0-1, columns 1-3,
        # the columns running right to left
        assert flipped[0].argmax(-1).tolist() == [3, 1, 7, 5]
        # so their class token (S = 1) depends on the flip; the image's does not
        one = [pool_tokens_reference(scores, ids, box, torch.tensor([m]), 1, 16, "tokenlabeling") for m in (0, 1)]
        assert not torch.allclose(one[0], one[1])
        image_one = [pool_tokens_reference(scores, ids, box, torch.tensor([m]), 1, 16) for m in (0, 1)]
        assert torch.equal(image_one[0], image_one[1])

    def test_tokenlabeling_is_the_image_geometry_on_the_transposed_map(self, maps):
        """No flip: their token (r, c) is the image geometry's token (c, r) of the transposed map.
        Flip: the same for the crop rotated by 180 degrees, rows reversed."""
        scores, ids, boxes, _ = maps
        s, n = 6, len(boxes)
        no = torch.zeros(n, dtype=torch.bool)
        theirs = token_logits(scores, ids, boxes, no, s, C, "tokenlabeling").reshape(n, s, s, C)
        image_t = token_logits(scores.transpose(2, 3), ids.transpose(2, 3), boxes, no, s, C).reshape(n, s, s, C)
        torch.testing.assert_close(theirs, image_t.transpose(1, 2), rtol=1e-5, atol=1e-5)

        theirs_flipped = token_logits(scores, ids, boxes, ~no, s, C, "tokenlabeling").reshape(n, s, s, C)
        rotated = torch.stack([1 - boxes[:, 2], 1 - boxes[:, 3], 1 - boxes[:, 0], 1 - boxes[:, 1]], 1)
        image_r = token_logits(scores.transpose(2, 3), ids.transpose(2, 3), rotated, no, s, C).reshape(n, s, s, C)
        ok = wide(boxes, 15)
        assert ok.sum() >= 8
        torch.testing.assert_close(theirs_flipped[ok], image_r.flip(1).transpose(1, 2)[ok], rtol=1e-5, atol=1e-5)

    def test_image_mirror_is_the_crop_of_the_flipped_map(self, maps):
        """Flipping after the crop (the columns of the grid) equals cropping the flipped map over the
        mirrored box, for boxes of at least a cell."""
        scores, ids, boxes, _ = maps
        n = len(boxes)
        mirrored_box = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
        after = token_logits(scores, ids, boxes, torch.ones(n, dtype=torch.bool), 6, C)
        before = token_logits(scores.flip(3), ids.flip(3), mirrored_box, torch.zeros(n, dtype=torch.bool), 6, C)
        ok = wide(boxes, 15)
        torch.testing.assert_close(after[ok], before[ok], rtol=1e-5, atol=1e-5)

    def test_bad_arguments(self, maps):
        scores, ids, boxes, mirror = maps
        with pytest.raises(ValueError, match="geometry 'relabel': expected one of"):
            pool_tokens_reference(scores, ids, boxes, mirror, 14, C, "relabel")
        with pytest.raises(ValueError, match="output_size 0: expected a positive"):
            pool_tokens_reference(scores, ids, boxes, mirror, 0, C)


class TestCompactTargets:
    @pytest.mark.parametrize("geometry", ["image", "tokenlabeling"])
    @pytest.mark.parametrize("size", [1, 14])
    def test_to_dense_is_the_reference(self, maps, geometry, size):
        scores, ids, boxes, mirror = maps
        compact = compact_token_targets(scores, ids, boxes, mirror, size, C, geometry)
        dense = torch.softmax(token_logits(scores, ids, boxes, mirror, size, C, geometry), -1)
        torch.testing.assert_close(compact.to_dense(C), dense, rtol=1e-5, atol=1e-8)
        # pool_tokens_reference: the same softmax (image), or theirs over the class axis of a [B, C, T]
        # tensor (tokenlabeling), which torch's CPU kernel rounds to a few 1e-5 relative
        reference = pool_tokens_reference(scores, ids, boxes, mirror, size, C, geometry)
        torch.testing.assert_close(reference, dense, rtol=1e-4 if geometry == "tokenlabeling" else 0, atol=1e-9)
        assert compact.ids.dtype == torch.int32 and compact.ids.shape == compact.values.shape
        padding = compact.ids < 0
        assert torch.all(compact.values[padding] == 0)
        real = torch.where(padding, C + torch.arange(compact.ids.shape[-1]), compact.ids)
        assert torch.all(real[..., 1:] > real[..., :-1])  # distinct, ascending, padding last
        assert compact.ids.shape[-1] == int((~padding).sum(-1).max())  # m = the most any token touches

    def test_bytes_per_batch_at_14_tokens_and_top5(self, maps, capsys):
        """The documented case: S = 14, k = 5, real-looking 15x15 maps, 1000 classes."""
        scores, ids, boxes, mirror = maps
        compact = compact_token_targets(scores, ids, boxes, mirror, 14, C)
        dense_bytes = len(boxes) * 196 * C * 4
        with capsys.disabled():
            print(f"\ncompact token targets: m = {compact.ids.shape[-1]}, {compact.nbytes:,} bytes vs {dense_bytes:,} "
                  f"dense ({compact.nbytes / dense_bytes:.1%}) for {len(boxes)} samples")
        assert compact.nbytes <= 0.10 * dense_bytes

    def test_shapes_and_dtypes_are_checked(self):
        ids = torch.zeros(2, 3, 4, dtype=torch.int32)
        with pytest.raises(ValueError, match=r"ids \(2, 3, 4\), values \(2, 3, 5\) and rest \(2, 3\)"):
            CompactTargets(ids, torch.zeros(2, 3, 5), torch.zeros(2, 3))
        with pytest.raises(ValueError, match="ids: dtype torch.float32, expected an integer dtype"):
            CompactTargets(ids.float(), torch.zeros(2, 3, 4), torch.zeros(2, 3))


class TestCompactLoss:
    @pytest.mark.parametrize("geometry", ["image", "tokenlabeling"])
    def test_equals_the_dense_loss_and_its_gradient(self, maps, geometry):
        scores, ids, boxes, mirror = maps
        compact = compact_token_targets(scores, ids, boxes, mirror, 14, C, geometry)
        dense = compact.to_dense(C)
        logits = (3 * torch.randn(24, 196, C, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss = compact_soft_target_cross_entropy(logits, compact)
        (grad,) = torch.autograd.grad(loss, logits)
        reference_logits = logits.detach().clone().requires_grad_()
        reference = soft_target_cross_entropy(reference_logits.reshape(-1, C), dense.reshape(-1, C))
        (reference_grad,) = torch.autograd.grad(reference, reference_logits)
        assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-9)

    def test_rows_of_logits_and_low_precision(self, maps):
        scores, ids, boxes, mirror = maps
        compact = compact_token_targets(scores, ids, boxes, mirror, 1, C)
        flat = CompactTargets(compact.ids[:, 0], compact.values[:, 0], compact.rest[:, 0])
        logits = torch.randn(24, C, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        loss = compact_soft_target_cross_entropy(logits, flat)
        assert loss.dtype == torch.float32
        reference = soft_target_cross_entropy(logits, flat.to_dense(C))
        assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())

    def test_shape_mismatch(self, maps):
        compact = compact_token_targets(*maps, 2, C)
        with pytest.raises(ValueError, match=r"logits shape \(24, 9, 1000\) and compact targets \(24, 4, \d+\)"):
            compact_soft_target_cross_entropy(torch.zeros(24, 9, C), compact)


# ---- TokenLabeling's own files ------------------------------------------------------------------
def write_tokenlabeling_file(path, output):
    """What their generate_label.py saves for one image: the head's output [H, W, C] (the conv head
    permuted to channels last), top-5 along the classes, values and indices as float16, permuted to
    [2, 5, H, W]."""
    value, indices = output.topk(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack([value.half(), indices.half()]).permute(0, 3, 1, 2), path)


def tokenlabeling_loader(files, crops, flips, sizes, label_size, num_classes):
    """Their loader, from its published description: the file as float; where flipped, the map's
    last axis reversed with the image, before the crop; the crop drawn on the (flipped) image as
    pixels (i, j, h, w) kept as (i/H, j/W, h/W, w/W) and turned into (top, left, bottom, right); the
    top-5 scattered into zeros; roi_align over those four times the map's last size minus 0.5, an
    S x S grid after a 1 x 1 class token, softmax over the classes; tokens read as [B, S*S, C]."""
    label_maps, coords = [], []
    for path, (i, j, h, w), flip, (width, height) in zip(files, crops, flips, sizes):
        label_map = torch.load(path).float()
        if flip:
            label_map = label_map.flip(3)
        label_maps.append(label_map)
        coords.append(torch.tensor([i / height, j / width, h / height, w / width], dtype=torch.float32))
    topk, coords = torch.stack(label_maps), torch.stack(coords)
    coords[:, 2:] += coords[:, :2]
    n = len(files)
    dense = torch.zeros(n, num_classes, topk.shape[3], topk.shape[4])
    for one_map, one_topk in zip(dense, topk):
        one_map.scatter_(0, one_topk[1].long(), one_topk[0])
    rois = torch.cat([torch.arange(n).view(n, 1).float(), coords * dense.size(3) - 0.5], 1)
    tokens = roi_align(dense, rois, output_size=(label_size, label_size))
    cls = roi_align(dense, rois, output_size=(1, 1))
    target = torch.softmax(torch.cat([cls.view(n, num_classes, 1), tokens.view(n, num_classes, -1)], 2), 1)
    return target[:, :, 1:].transpose(1, 2)


class TestTokenLabelingFiles:
    def test_packed_files_pool_to_the_targets_their_loader_computes(self, tmp_path, capsys):
        generator = torch.Generator().manual_seed(3)
        src, out = tmp_path / "label_top5_train_nfnet", tmp_path / "shards"
        keys = [f"n0000000{c}/n0000000{c}_{i}" for c in range(2) for i in range(4)]
        scores, ids = object_topk_maps(len(keys), 12, 18, C, generator)  # NFNet-F6 at 576 px: 18x18
        outputs = dense_label_maps(scores, ids, C) + 0.01 * torch.randn(len(keys), C, 18, 18, generator=generator)
        for key, output in zip(keys, outputs):
            write_tokenlabeling_file(src / f"{key}.pt", output.permute(1, 2, 0))
        assert pack_labels.main([str(src), str(out), "--layout", "tokenlabeling"]) == 0
        reader = LabelShardReader(out)
        assert (reader.k, reader.height, reader.width, reader.num_classes) == (5, 18, 18, C)

        rng = np.random.default_rng(0)
        # power-of-two sides keep every coordinate exact in float32 on both sides, so that the two
        # agree to the bit (their (top, left, h, w) sums and our 1 - x1 round alike)
        sizes = [(int(rng.choice([256, 512])), int(rng.choice([256, 512]))) for _ in keys]
        crops, boxes = [], []
        flips = [bool(f) for f in rng.integers(0, 2, len(keys))]
        for (width, height), flip in zip(sizes, flips):
            w, h = int(rng.integers(40, width)), int(rng.integers(40, height))
            i, j = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crops.append((i, j, h, w))  # drawn on the flipped image where flipped
            left = width - j - w if flip else j  # in the unflipped image
            boxes.append([left / width, i / height, (left + w) / width, (i + h) / height])
        theirs = tokenlabeling_loader([src / f"{key}.pt" for key in keys], crops, flips, sizes, 14, C)

        stored = [reader[key] for key in keys]
        packed_scores = torch.from_numpy(np.stack([s for s, _ in stored]))
        packed_ids = torch.from_numpy(np.stack([i for _, i in stored]))
        ours = pool_tokens_reference(packed_scores, packed_ids, torch.tensor(boxes), torch.tensor(flips), 14, C,
                                     geometry="tokenlabeling")
        assert torch.equal(ours, theirs)
        # the image's geometry reads other windows: their targets are not the image's
        image = pool_tokens_reference(packed_scores, packed_ids, torch.tensor(boxes), torch.tensor(flips), 14, C)
        assert 0.5 * (image - theirs).abs().sum(-1).mean() > 0.05

    def test_kept_rows_first(self, tmp_path):
        output = torch.zeros(4, 6, 10)  # [H, W, C]: rows first, as their head's output is permuted
        output[1, 4, 7] = 5.0
        write_tokenlabeling_file(tmp_path / "src" / "a" / "b.pt", output)
        assert pack_labels.main([str(tmp_path / "src"), str(tmp_path / "out"), "--layout", "tokenlabeling",
                                 "--num-classes", "10"]) == 0
        scores, ids = LabelShardReader(tmp_path / "out")["a/b"]
        assert scores.shape == (5, 4, 6) and (scores[0, 1, 4], ids[0, 1, 4]) == (5.0, 7)

    def test_more_classes_than_float16_ids_hold_are_refused(self, tmp_path, capsys):
        with pytest.raises(SystemExit):
            pack_labels.main([str(tmp_path), str(tmp_path / "out"), "--layout", "tokenlabeling",
                              "--num-classes", "21843"])
        assert "class ids are float16, exact only up to 2048, so ids of 21843 classes" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


class TestTool:
    @pytest.mark.parametrize("source", ["synthetic", "shards"])
    def test_reports_bytes_and_distances(self, tmp_path, capsys, source):
        maps = "synthetic" if source == "synthetic" else str(make_dataset(tmp_path)[1])
        report = tmp_path / "report.json"
        assert token_targets.main(["--maps", maps, "--tokens", "4", "--batch", "8", "--batches", "2",
                                   "--json", str(report)]) == 0
        out = capsys.readouterr().out
        assert "compact / dense: " in out and "image vs tokenlabeling geometry: mean TV" in out
        result = json.loads(report.read_text())
        classes = 1000 if source == "synthetic" else 16
        assert result["num_classes"] == classes and len(result["batches"]) == 2
        for batch in result["batches"]:
            assert batch["dense_bytes"] == 8 * 16 * classes * 4
            assert batch["compact_bytes"] == 8 * 16 * (batch["m"] * 8 + 4)
        assert all(0 < d < 1 for d in result["tv_tokens"])

    def test_bad_arguments(self, capsys):
        with pytest.raises(SystemExit):
            token_targets.main(["--maps", "synthetic", "--tokens", "0"])
        assert "--tokens, --batch and --batches must be positive" in capsys.readouterr().err
