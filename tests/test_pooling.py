"""pool_labels (native C ABI) against the literal dense reference, value by value."""
import pytest
import torch

from relabel_dali.store import format as fmt
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import (MODES, clear_top2, dense_label_maps, official_label_pooling,
                                    random_boxes, random_topk_maps, reference_pool)

TOL = 1e-6


def reference_in_chunks(scores, class_ids, boxes, num_classes, mode, chunk=250):
    parts = [reference_pool(scores[i:i + chunk], class_ids[i:i + chunk], boxes[i:i + chunk], num_classes, mode)
             for i in range(0, len(scores), chunk)]
    return torch.cat(parts)


def assert_pooled_close(got, scores, class_ids, boxes, num_classes, mode, expected=None):
    """Softmax modes: within TOL everywhere. Argmax modes: equal one-hots wherever the pooled vector's
    top two differ by more than float rounding; near-ties (quantized scores make them common) may go
    either way, and must stay rare."""
    if expected is None:
        expected = reference_in_chunks(scores, class_ids, boxes, num_classes, mode)
    if "argmax" not in mode:
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        return
    soft = reference_in_chunks(scores, class_ids, boxes, num_classes, mode.replace("argmax", "softmax"))
    clear = clear_top2(soft)
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], expected[clear])
    assert torch.equal(got.sum(1), torch.ones(len(got)))


def quantize(scores):
    """Per-sample uint8 quantization with the label store's own encoder, and the dequantized floats."""
    stored, scales, offsets, decoded = [], [], [], []
    for sample in scores.numpy():
        q, scale, offset = fmt.encode_scores(sample, 3)
        stored.append(torch.from_numpy(q))
        scales.append(scale)
        offsets.append(offset)
        decoded.append(torch.from_numpy(fmt.decode_scores(q, scale, offset)))
    return torch.stack(stored), torch.tensor(scales), torch.tensor(offsets), torch.stack(decoded)


class TestPoolLabelsParity:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("shape", [(5, 15, 15), (3, 7, 12), (1, 1, 1)])
    def test_float32_matches_reference(self, mode, shape):
        g = torch.Generator().manual_seed(hash((mode, shape)) % 2**31)
        k, h, w = shape
        num_classes = 200
        scores, class_ids = random_topk_maps(2000, k, h, w, num_classes, g)
        boxes = random_boxes(2000, g)
        got = pool_labels(scores, class_ids, boxes, num_classes, mode)
        assert got.shape == (2000, num_classes) and got.dtype == torch.float32
        assert_pooled_close(got, scores, class_ids, boxes, num_classes, mode)

    @pytest.mark.parametrize("mode", MODES)
    def test_thousand_classes_concentrated_maps(self, mode):
        g = torch.Generator().manual_seed(7)
        scores, class_ids = random_topk_maps(300, 5, 15, 15, 1000, g, classes_per_image=12)
        boxes = random_boxes(300, g)
        assert_pooled_close(pool_labels(scores, class_ids, boxes, 1000, mode), scores, class_ids, boxes, 1000, mode)

    @pytest.mark.parametrize("mode", MODES)
    def test_float16_against_reference_on_decoded_values(self, mode):
        g = torch.Generator().manual_seed(11)
        scores, class_ids = random_topk_maps(1000, 5, 15, 15, 300, g)
        half = scores.to(torch.float16)
        boxes = random_boxes(1000, g)
        assert_pooled_close(pool_labels(half, class_ids, boxes, 300, mode), half.to(torch.float32), class_ids, boxes,
                            300, mode)

    @pytest.mark.parametrize("mode", MODES)
    def test_uint8_against_reference_on_dequantized_values(self, mode):
        g = torch.Generator().manual_seed(13)
        scores, class_ids = random_topk_maps(1000, 5, 15, 15, 300, g)
        stored, scales, offsets, decoded = quantize(scores * 6 - 2)  # a range with a nonzero offset
        boxes = random_boxes(1000, g)
        got = pool_labels(stored, class_ids, boxes, 300, mode, scale=scales, offset=offsets)
        assert_pooled_close(got, decoded, class_ids, boxes, 300, mode)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.uint16])
    def test_class_id_dtypes_agree(self, dtype):
        g = torch.Generator().manual_seed(17)
        scores, class_ids = random_topk_maps(64, 5, 15, 15, 250, g)
        boxes = random_boxes(64, g)
        expected = pool_labels(scores, class_ids, boxes, 250)
        assert torch.equal(pool_labels(scores, class_ids.to(dtype), boxes, 250), expected)

    def test_thread_count_does_not_change_results(self):
        g = torch.Generator().manual_seed(19)
        scores, class_ids = random_topk_maps(512, 5, 15, 15, 1000, g)
        boxes = random_boxes(512, g)
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = pool_labels(scores, class_ids, boxes)
            torch.set_num_threads(2)
            assert torch.equal(pool_labels(scores, class_ids, boxes), single)
        finally:
            torch.set_num_threads(previous)


class TestPoolLabelsEdgeCases:
    def setup_method(self):
        g = torch.Generator().manual_seed(23)
        self.scores, self.class_ids = random_topk_maps(1, 5, 15, 15, 100, g)

    @pytest.mark.parametrize("box", [
        (0.0, 0.0, 1.0, 1.0),        # the whole image
        (0.0, 0.3, 0.2, 1.0),        # touching left and bottom borders
        (0.98, 0.0, 1.0, 0.02),      # smaller than one cell, in a corner
        (0.5, 0.5, 0.5001, 0.5001),  # far smaller than one cell
        (0.2, 0.2, 0.2 + 1 / 15, 0.2 + 1 / 15),  # exactly one cell wide
    ])
    def test_edge_boxes_match_reference(self, box):
        boxes = torch.tensor([box], dtype=torch.float32)
        for mode in MODES:
            torch.testing.assert_close(pool_labels(self.scores, self.class_ids, boxes, 100, mode),
                                       reference_pool(self.scores, self.class_ids, boxes, 100, mode),
                                       atol=TOL, rtol=0)

    def test_whole_image_equals_global_mean(self):
        # roi_align over the whole image samples exactly the cell centres: the plain mean.
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        torch.testing.assert_close(pool_labels(self.scores, self.class_ids, boxes, 100),
                                   pool_labels(self.scores, self.class_ids, boxes, 100, "global_softmax"),
                                   atol=TOL, rtol=0)

    def test_argmax_ties_take_the_lowest_class_id(self):
        scores = torch.full((1, 2, 3, 3), 0.5)
        class_ids = torch.stack([torch.full((3, 3), 7), torch.full((3, 3), 4)])[None]
        out = pool_labels(scores, class_ids, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 10, "argmax")
        expected = reference_pool(scores, class_ids, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 10, "argmax")
        assert torch.equal(out, expected) and int(out.argmax()) == 4

    def test_negative_scores_make_an_absent_class_the_argmax(self):
        scores = -torch.rand(1, 2, 4, 4) - 0.1
        class_ids = torch.stack([torch.full((4, 4), 0), torch.full((4, 4), 2)])[None]
        for mode in ("argmax", "global_argmax"):
            out = pool_labels(scores, class_ids, torch.tensor([[0.1, 0.1, 0.9, 0.9]]), 5, mode)
            assert int(out.argmax()) == 1 and float(out.sum()) == 1.0  # the first class absent from the map

    def test_global_modes_ignore_the_box(self):
        a = pool_labels(self.scores, self.class_ids, torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 100, "global_softmax")
        b = pool_labels(self.scores, self.class_ids, torch.tensor([[float("nan"), 0, 0, 0]]), 100, "global_softmax")
        assert torch.equal(a, b)

    def test_empty_batch(self):
        out = pool_labels(torch.zeros(0, 5, 15, 15), torch.zeros(0, 5, 15, 15, dtype=torch.int64), torch.zeros(0, 4))
        assert out.shape == (0, 1000)


class TestPoolLabelsErrors:
    def setup_method(self):
        g = torch.Generator().manual_seed(29)
        self.scores, self.class_ids = random_topk_maps(3, 5, 15, 15, 100, g)
        self.boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9]] * 3)

    @pytest.mark.parametrize("box, problem", [
        ((0.5, 0.1, 0.5, 0.9), "degenerate"),
        ((0.6, 0.1, 0.5, 0.9), "inverted"),
        ((0.1, float("nan"), 0.5, 0.9), "NaN"),
        ((-0.1, 0.1, 0.5, 0.9), "outside"),
        ((0.1, 0.1, 0.5, 1.5), "outside"),
    ])
    def test_bad_box_names_sample_and_values(self, box, problem):
        boxes = self.boxes.clone()
        boxes[2] = torch.tensor(box)
        with pytest.raises(ValueError, match=rf"sample 2: box .* {problem}"):
            pool_labels(self.scores, self.class_ids, boxes, 100)

    @pytest.mark.parametrize("bad_id", [100, 5000, -1])
    def test_class_id_out_of_range(self, bad_id):
        class_ids = self.class_ids.clone()
        class_ids[1, 2, 3, 4] = bad_id
        with pytest.raises(ValueError, match=rf"sample 1: class id {bad_id} at \[k, y, x\] = \[2, 3, 4\] is outside"):
            pool_labels(self.scores, class_ids, self.boxes, 100)

    @pytest.mark.parametrize("threads", [1, 2])
    def test_lowest_bad_sample_is_reported_whatever_the_threads(self, threads):
        scores, class_ids = random_topk_maps(512, 5, 15, 15, 100, torch.Generator().manual_seed(3))
        boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(512, 1)
        boxes[400] = torch.tensor([0.5, 0.5, 0.2, 0.9])
        class_ids[300, 0, 0, 0] = 100
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            with pytest.raises(ValueError, match=r"^sample 300: class id 100"):
                pool_labels(scores, class_ids, boxes, 100)
        finally:
            torch.set_num_threads(previous)

    def test_uint16_class_id_out_of_range_reported_by_native_check(self):
        class_ids = self.class_ids.to(torch.uint16)
        class_ids[2, 0, 1, 1] = 300
        with pytest.raises(ValueError, match=r"sample 2: class id 300 at \[k, y, x\] = \[0, 1, 1\] is outside"):
            pool_labels(self.scores, class_ids, self.boxes, 100)

    @pytest.mark.parametrize("kwargs, error, match", [
        (dict(mode="mean"), ValueError, "mode 'mean'"),
        (dict(num_classes=0), ValueError, "num_classes = 0"),
        (dict(num_classes=70000), ValueError, "num_classes = 70000"),
    ])
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            pool_labels(self.scores, self.class_ids, self.boxes, **{"num_classes": 100, **kwargs})

    def test_shape_mismatches(self):
        with pytest.raises(ValueError, match=r"class_ids: shape \(3, 5, 15, 14\)"):
            pool_labels(self.scores, self.class_ids[..., :14], self.boxes, 100)
        with pytest.raises(ValueError, match=r"boxes: shape \(2, 4\), expected \[3, 4\]"):
            pool_labels(self.scores, self.class_ids, self.boxes[:2], 100)
        with pytest.raises(ValueError, match=r"scores: shape \(5, 15, 15\), expected \[N, k, H, W\]"):
            pool_labels(self.scores[0], self.class_ids[0], self.boxes, 100)
        with pytest.raises(ValueError, match=r"scale: 2 values for 3 samples"):
            pool_labels(self.scores.to(torch.uint8), self.class_ids, self.boxes, 100, scale=[1.0, 2.0])

    def test_bad_dtypes(self):
        with pytest.raises(TypeError, match=r"scores: dtype torch.float64"):
            pool_labels(self.scores.double(), self.class_ids, self.boxes, 100)
        with pytest.raises(TypeError, match=r"class_ids: dtype torch.float32"):
            pool_labels(self.scores, self.class_ids.float(), self.boxes, 100)
        with pytest.raises(TypeError, match=r"scores: expected a torch.Tensor, got ndarray"):
            pool_labels(self.scores.numpy(), self.class_ids, self.boxes, 100)


class TestReference:
    def test_dense_maps_scatter_topk(self):
        scores = torch.tensor([[[[0.7]], [[0.2]]]])
        class_ids = torch.tensor([[[[3]], [[1]]]])
        dense = dense_label_maps(scores, class_ids, 5)
        assert dense[0, :, 0, 0].tolist() == pytest.approx([0, 0.2, 0, 0.7, 0])

    def test_official_pooling_equals_canonical_on_transposed_maps(self):
        # The official code reads the last map axis as vertical; canonical maps are its transpose. Only
        # roi_align's summation order differs (rows and columns swap roles): rounding-level tolerance.
        g = torch.Generator().manual_seed(31)
        scores, class_ids = random_topk_maps(40, 5, 15, 15, 1000, g)
        boxes = random_boxes(40, g)
        official = torch.stack([scores, class_ids.float()], 1).transpose(3, 4)
        coords = boxes[:, [1, 0, 3, 2]]  # (top/H, left/W, bottom/H, right/W)
        torch.testing.assert_close(official_label_pooling(official, coords), reference_pool(scores, class_ids, boxes),
                                   atol=1e-9, rtol=1e-6)


@pytest.mark.gpu
class TestPoolLabelsCuda:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
    def test_cuda_matches_cpu(self, mode, dtype):
        g = torch.Generator().manual_seed(37)
        scores, class_ids = random_topk_maps(1024, 5, 15, 15, 1000, g)
        boxes = random_boxes(1024, g)
        scale = offset = None
        if dtype == torch.uint8:
            scores, scale, offset, _ = quantize(scores)
        else:
            scores = scores.to(dtype)
        cpu = pool_labels(scores, class_ids, boxes, 1000, mode, scale, offset)

        def on_cuda():
            return pool_labels(scores.cuda(), class_ids.cuda(), boxes.cuda(), 1000, mode,
                               None if scale is None else scale.cuda(), None if offset is None else offset.cuda()).cpu()

        # Exact per-class sums and shared arithmetic (docs/OPERATOR.md): equal bits, run after run.
        cuda = on_cuda()
        assert torch.equal(cuda.view(torch.int32), cpu.view(torch.int32))
        assert torch.equal(on_cuda().view(torch.int32), cuda.view(torch.int32))

    def test_cuda_nan_scores_and_ids_beyond_num_classes_as_on_the_cpu(self):
        g = torch.Generator().manual_seed(43)
        scores, class_ids = random_topk_maps(64, 5, 15, 15, 100, g)
        boxes = random_boxes(64, g)
        scores[::3, 0, 7, 7] = float("nan")
        bad = torch.rand(class_ids.shape, generator=g) < 0.05
        for mode in MODES:
            cpu = pool_labels(scores.masked_fill(bad, 0.0), class_ids.masked_fill(bad, 0), boxes, 100, mode)
            cuda = pool_labels(scores.cuda(), class_ids.masked_fill(bad, 100).cuda(), boxes.cuda(), 100, mode,
                               validate=False).cpu()
            assert torch.equal(cuda.view(torch.int32), cpu.view(torch.int32)), mode

    def test_cuda_bad_box(self):
        scores, class_ids = random_topk_maps(2, 5, 15, 15, 100, torch.Generator().manual_seed(1))
        boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.5, 0.5, 0.4, 0.9]], device="cuda")
        with pytest.raises(ValueError, match="sample 1: box"):
            pool_labels(scores.cuda(), class_ids.cuda(), boxes, 100)

    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
    def test_tensors_on_another_device_than_the_current_one(self):
        g = torch.Generator().manual_seed(41)
        scores, class_ids = random_topk_maps(64, 5, 15, 15, 1000, g)
        boxes = random_boxes(64, g)
        cpu = pool_labels(scores, class_ids, boxes, 1000)
        with torch.cuda.device(0):
            other = pool_labels(scores.to("cuda:1"), class_ids.to("cuda:1"), boxes.to("cuda:1"), 1000)
        assert other.device == torch.device("cuda", 1)
        torch.testing.assert_close(other.cpu(), cpu, atol=TOL, rtol=0)
