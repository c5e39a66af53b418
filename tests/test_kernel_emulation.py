"""The CUDA kernel (label_pool_kernel.cuh) on the host: its own source, run by the emulation of blocks,
threads, barriers, shuffles and atomics (relabel_dali.ops.testing), against the CPU op (bit for bit) and
the literal reference (value by value), for every mode and score dtype, edge boxes and maps, class
counts, out-of-range class ids and NaN scores; the emulated kernel is the same under 50 interleavings
of its threads; the shared-memory check of both launch sites accounts for the kernel's own variables."""
import zlib

import numpy as np
import pytest
import torch

from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import MODES, clear_top2, random_boxes, random_topk_maps, reference_pool
from relabel_dali.ops.testing import (kernel_shared_limits, order_probe, pool_labels_emulated,
                                      shared_exp)
from relabel_dali.store import format as fmt

TOL = 1e-6
SCORE_DTYPES = ["float32", "float16", "uint8"]


def stored(scores: torch.Tensor, dtype: str):
    """(scores as stored in dtype, scale, offset, the float32 values they stand for)."""
    if dtype == "float32":
        return scores, None, None, scores
    if dtype == "float16":
        return scores.half(), None, None, scores.half().float()
    encoded = [fmt.encode_scores(sample, fmt.score_dtype_code("uint8")) for sample in (scores * 6 - 2).numpy()]
    q = torch.from_numpy(np.stack([e[0] for e in encoded]))
    scale = torch.tensor([e[1] for e in encoded], dtype=torch.float32)
    offset = torch.tensor([e[2] for e in encoded], dtype=torch.float32)
    decoded = torch.from_numpy(np.stack([fmt.decode_scores(*e) for e in encoded])).float()
    return q, scale, offset, decoded


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def assert_kernel_matches(scores, class_ids, boxes, num_classes, mode, scale=None, offset=None, floats=None,
                          seed=0):
    """The emulated kernel equals the CPU op bit for bit and the reference within TOL (argmax modes:
    equal one-hots where the pooled top two are clearly apart). Returns the kernel's output."""
    got = pool_labels_emulated(scores, class_ids, boxes, num_classes, mode, scale, offset, seed=seed)
    host = pool_labels(scores, class_ids, boxes, num_classes, mode, scale, offset)
    assert torch.equal(bits(got), bits(host)), f"kernel and CPU op differ by {(got - host).abs().max()}"
    floats = scores if floats is None else floats
    expected = reference_pool(floats, class_ids, boxes, num_classes, mode)
    if mode.endswith("argmax"):
        clear = clear_top2(reference_pool(floats, class_ids, boxes, num_classes, mode.replace("argmax", "softmax")))
        assert torch.equal(got[clear], expected[clear])
        assert torch.equal(got.sum(1), torch.ones(len(got)))
    else:
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    return got


def batch(n, k, h, w, num_classes, seed, classes_per_image=None):
    """Random top-k maps (ids from all classes, or from classes_per_image per image) and boxes."""
    g = torch.Generator().manual_seed(seed)
    scores, class_ids = random_topk_maps(n, k, h, w, num_classes, g, classes_per_image=classes_per_image)
    return scores, class_ids, random_boxes(n, g)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


class TestKernelParity:
    MAPS = {"imagenet_map": (5, 15, 15, 1000), "small_map": (3, 7, 12, 33), "one_cell": (1, 1, 1, 1),
            "deep_map": (10, 4, 9, 32)}

    @pytest.mark.parametrize("dtype", SCORE_DTYPES)
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("shape", MAPS.values(), ids=MAPS)
    def test_every_mode_and_dtype(self, shape, mode, dtype):
        k, h, w, num_classes = shape
        scores, class_ids, boxes = batch(4, k, h, w, num_classes, seed=seed_of(shape, mode, dtype))
        q, scale, offset, floats = stored(scores, dtype)
        assert_kernel_matches(q, class_ids, boxes, num_classes, mode, scale, offset, floats)

    def test_concentrated_ids_contend_for_few_classes(self):
        scores, class_ids, boxes = batch(4, 5, 15, 15, 1000, seed=5, classes_per_image=5)  # every cell: all 5
        assert_kernel_matches(scores, class_ids, boxes, 1000, "softmax")


class TestClassCounts:
    # 32 classes fill the block's first warp exactly; 21841 (ImageNet-21k) takes 11 passes of the
    # kernel's class window.
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("num_classes", [1, 31, 32, 33, 257, 1000, 21841])
    def test_class_count(self, num_classes, mode):
        scores, class_ids, boxes = batch(3, min(3, num_classes), 5, 6, num_classes, seed=num_classes)
        assert_kernel_matches(scores, class_ids, boxes, num_classes, mode)

    def test_ids_in_every_class_window(self):
        scores, class_ids, boxes = batch(2, 4, 6, 6, 21841, seed=3)
        class_ids[:, 0] = 2047  # the last class of the first window
        class_ids[:, 1] = 2048  # the first of the second
        class_ids[:, 2] = 21840  # the last class
        assert_kernel_matches(scores, class_ids, boxes, 21841, "softmax")


class TestMapSizes:
    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    @pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 9), (4, 9, 1), (3, 2, 2), (5, 15, 15), (7, 31, 17),
                                       (10, 32, 32)], ids=lambda s: "x".join(map(str, s)))
    def test_map_size_and_k(self, shape, mode):
        k, h, w = shape
        scores, class_ids, boxes = batch(2, k, h, w, 300, seed=h * 100 + w)
        assert_kernel_matches(scores, class_ids, boxes, 300, mode)


class TestEdgeBoxes:
    def setup_method(self):
        self.scores, self.class_ids, _ = batch(1, 5, 15, 15, 100, seed=23)

    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    @pytest.mark.parametrize("box", [
        (0.0, 0.0, 1.0, 1.0),                      # the whole image
        (0.41, 0.41, 0.45, 0.45),                  # inside one cell
        (0.2, 0.2, 0.2 + 1 / 15, 0.2 + 1 / 15),    # exactly one cell wide
        (0.98, 0.0, 1.0, 0.02),                    # a corner, smaller than a cell
        (0.0, 0.3, 0.2, 1.0),                      # touching the left and bottom borders
    ])
    def test_accepted_boxes(self, box, mode):
        assert_kernel_matches(self.scores, self.class_ids, torch.tensor([box]), 100, mode)

    @pytest.mark.parametrize("box", [
        (0.5, 0.5, 0.5, 0.5),      # zero area
        (0.3, 0.6, 0.3, 0.9),      # zero width
        (-0.2, 0.1, 0.3, 0.5),     # partly outside the map
        (1.1, 1.1, 1.3, 1.4),      # wholly outside the map
        (0.6, 0.1, 0.5, 0.9),      # inverted
    ])
    def test_refused_boxes_raise_like_pool_labels_on_cuda(self, box):
        with pytest.raises(ValueError, match=r"boxes: sample 0: box .* is not inside \[0, 1\]"):
            pool_labels_emulated(self.scores, self.class_ids, torch.tensor([box]), 100)

    @pytest.mark.parametrize("box", [(0.5, 0.5, 0.5, 0.5), (-0.2, 0.1, 0.3, 0.5), (1.1, 1.1, 1.3, 1.4)])
    def test_unvalidated_boxes_pool_as_roi_align_does(self, box):
        # Without the checks the kernel still follows roi_align: a zero-area roi is clamped to one
        # cell, samples beyond the map are dropped (but counted in the average).
        boxes = torch.tensor([box])
        got = pool_labels_emulated(self.scores, self.class_ids, boxes, 100, validate=False)
        torch.testing.assert_close(got, reference_pool(self.scores, self.class_ids, boxes, 100), atol=TOL, rtol=0)


class TestClassIdsOutOfRange:
    """One rule for the pooling math on both backends: class ids >= num_classes contribute nothing;
    pool_labels (validate=True) raises on them before pooling, on CPU and CUDA tensors alike."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("bad_id", [100, 65535])
    def test_kernel_ignores_them(self, bad_id, mode):
        scores, class_ids, boxes = batch(3, 5, 15, 15, 100, seed=bad_id)
        bad = torch.rand(class_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.1
        got = pool_labels_emulated(scores, class_ids.masked_fill(bad, bad_id), boxes, 100, mode, validate=False)
        # An entry that is not there pools like one of score 0: bit for bit the same host result.
        host = pool_labels(scores.masked_fill(bad, 0.0), class_ids.masked_fill(bad, 0), boxes, 100, mode)
        assert torch.equal(bits(got), bits(host))

    def test_validation_raises_with_the_position(self):
        scores, class_ids, boxes = batch(2, 5, 15, 15, 100, seed=2)
        class_ids[1, 2, 3, 4] = 100
        with pytest.raises(ValueError, match=r"sample 1: class id 100 at \[k, y, x\] = \[2, 3, 4\] is outside"):
            pool_labels_emulated(scores, class_ids, boxes, 100)


class TestNaNScores:
    """torch's semantics: a class whose pooled value is NaN makes the whole softmax NaN and is the
    argmax (the lowest such class id). A NaN in a cell the box gives weight 0 takes no part."""

    def nan_batch(self):
        scores, class_ids, boxes = batch(3, 5, 15, 15, 100, seed=31)
        scores[0, 1, 2, 3] = float("nan")                                   # one NaN
        scores[2, 0, 7, 7], scores[2, 4, 14, 0] = float("nan"), float("nan")  # two classes with NaN
        return scores, class_ids, boxes

    @pytest.mark.parametrize("mode", MODES)
    def test_matches_the_host_bit_for_bit(self, mode):
        scores, class_ids, boxes = self.nan_batch()
        got = pool_labels_emulated(scores, class_ids, boxes, 100, mode)
        assert torch.equal(bits(got), bits(pool_labels(scores, class_ids, boxes, 100, mode)))

    @pytest.mark.parametrize("mode", MODES)
    def test_whole_map_pooling_matches_torch(self, mode):
        # Over the whole map every cell has weight: NaN wherever the dense reference has NaN.
        scores, class_ids, boxes = self.nan_batch()
        boxes[:] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        got = pool_labels_emulated(scores, class_ids, boxes, 100, mode)
        expected = reference_pool(scores, class_ids, boxes, 100, mode)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0, equal_nan=True)
        if mode.endswith("softmax"):
            assert got[[0, 2]].isnan().all() and not got[1].isnan().any()
        else:
            assert int(got[0].argmax()) == int(class_ids[0, 1, 2, 3])
            assert int(got[2].argmax()) == int(min(class_ids[2, 0, 7, 7], class_ids[2, 4, 14, 0]))

    def test_nan_outside_the_box_weights_takes_no_part(self):
        scores, class_ids, _ = batch(1, 5, 15, 15, 100, seed=37)
        scores[0, 0, 14, 14] = float("nan")  # the bottom-right cell
        boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
        got = pool_labels_emulated(scores, class_ids, boxes, 100)
        assert not got.isnan().any()
        torch.testing.assert_close(got, reference_pool(scores, class_ids, boxes, 100), atol=TOL, rtol=0)


class TestDeterminism:
    """Exact per-class sums make the kernel's output independent of the order its threads run in."""

    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    def test_fifty_interleavings_give_the_same_bits(self, mode):
        scores, class_ids, boxes = batch(3, 5, 15, 15, 1000, seed=41, classes_per_image=12)
        q, scale, offset, _ = stored(scores, "uint8")  # quantized scores: many near-ties for the argmax
        first = pool_labels_emulated(q, class_ids, boxes, 1000, mode, scale, offset, seed=0)
        for seed in range(1, 50):
            again = pool_labels_emulated(q, class_ids, boxes, 1000, mode, scale, offset, seed=seed)
            assert torch.equal(bits(again), bits(first)), f"interleaving {seed} differs"

    def test_the_emulation_does_reorder_threads(self):
        # An order-dependent block gives different results under different seeds, the same under one.
        results = [order_probe(seed) for seed in range(20)]
        assert len(set(results)) > 5
        assert order_probe(7) == results[7]


class TestLaunchLimits:
    """The dynamic shared memory (H + W axis weights) shares the 48 KiB of a block with the kernel's
    static variables; both launch sites check the sum (kPoolMaxAxes in label_pool_kernel.cuh)."""

    def test_the_check_counts_the_static_shared_memory(self):
        static_bytes, max_axes = kernel_shared_limits()
        assert static_bytes > 0 and static_bytes + 4 * max_axes <= 48 * 1024 < static_bytes + 4 * (max_axes + 1)

    def test_largest_accepted_map_launches(self):
        _, max_axes = kernel_shared_limits()
        scores, class_ids, boxes = batch(1, 1, 1, max_axes - 1, 4, seed=1)
        got = pool_labels_emulated(scores, class_ids, boxes, 4, "global_softmax")
        assert torch.equal(bits(got), bits(pool_labels(scores, class_ids, boxes, 4, "global_softmax")))

    def test_one_more_is_refused_before_launch(self):
        _, max_axes = kernel_shared_limits()
        scores, class_ids, boxes = batch(1, 1, 1, max_axes, 4, seed=1)
        with pytest.raises(ValueError, match=rf"map 1x{max_axes} too large .*h \+ w must be <= {max_axes}\)"):
            pool_labels_emulated(scores, class_ids, boxes, 4, "global_softmax")

    def test_without_the_check_the_launch_fails(self):
        # H + W = 12288 passed the former check (dynamic shared memory alone <= 48 KiB).
        scores, class_ids, boxes = batch(1, 1, 1, 12287, 4, seed=1)
        with pytest.raises(RuntimeError, match="too many resources requested for launch"):
            pool_labels_emulated(scores, class_ids, boxes, 4, "global_softmax", check_launch=False)


class TestSharedExp:
    def test_within_about_one_ulp(self):
        g = torch.Generator().manual_seed(0)
        x = torch.cat([torch.rand(200_000, generator=g) * 190 - 102, -torch.rand(100_000, generator=g) * 1e-3])
        got = shared_exp(x).double()
        exact = torch.exp(x.double())
        normal = (exact > 1.2e-38) & (exact < 3.4e38)
        ulp = torch.from_numpy(np.spacing(exact[normal].float().numpy())).double()
        assert float(((got[normal] - exact[normal]).abs() / ulp).max()) < 1.05

    def test_special_values(self):
        x = torch.tensor([0.0, -0.0, -104.5, float("-inf"), 89.5, float("inf"), float("nan")])
        got = shared_exp(x)
        assert got[:6].tolist() == [1.0, 1.0, 0.0, 0.0, float("inf"), float("inf")] and got[6].isnan()
