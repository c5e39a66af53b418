"""Token targets in the native operator (``output_size``, ``mirror``): pool_labels, fn.label_pool in a CPU
pipeline and the emulated CUDA kernel against pool_tokens_reference(geometry="image") value by value,
against each other bit for bit, output_size 1 against the per-crop pooling bit for bit, the flip, the
refusals, and the kernel's determinism across thread interleavings."""
import zlib

import numpy as np
import pytest
import torch

from conftest import run_label_pool
from relabel_dali.ops.pooling import pool_labels
from relabel_dali.ops.reference import MODES, clear_top2, random_boxes, random_topk_maps
from relabel_dali.ops.testing import pool_labels_emulated
from relabel_dali.ops.token_reference import pool_tokens_reference

TOL = 1e-6
SIZES = [1, 7, 14, 24]
# (k, H, W): maps from 12 x 12 to 18 x 18, k from 1 to 5.
MAPS = {"12x12_k1": (1, 12, 12), "15x18_k3": (3, 15, 18), "18x18_k5": (5, 18, 18)}
# (x0, y0, x1, y1): the whole image, thinner than a cell (in one axis, in both), at each border and
# corner, a token grid finer than the map's cells.
EDGE_BOXES = torch.tensor([
    [0.0, 0.0, 1.0, 1.0],
    [0.3, 0.0, 0.31, 1.0],
    [0.0, 0.6, 1.0, 0.605],
    [0.99, 0.99, 1.0, 1.0],
    [0.0, 0.0, 0.02, 0.02],
    [0.7, 0.2, 1.0, 0.9],
    [0.0, 0.5, 0.25, 1.0],
    [0.4, 0.45, 0.6, 0.55],
])


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def batch(n, shape, num_classes, seed):
    """Random top-k maps, random and edge boxes, and flips alternating from no flip."""
    g = torch.Generator().manual_seed(seed)
    scores, class_ids = random_topk_maps(n, *shape, num_classes, g)
    return scores, class_ids, random_boxes(n, g), torch.arange(n) % 2 == 1


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_matches_reference(got, scores, class_ids, boxes, mirror, size, num_classes, mode):
    """Softmax within TOL of pool_tokens_reference; argmax the one-hot of its argmax where the top two
    are clearly apart (near-ties may go either way, as for the per-crop pooling)."""
    expected = pool_tokens_reference(scores, class_ids, boxes, mirror, size, num_classes, geometry="image")
    assert got.shape == expected.shape == (len(scores), size * size, num_classes)
    if mode == "softmax":
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        return
    flat, ref = got.reshape(-1, num_classes), expected.reshape(-1, num_classes)
    clear = clear_top2(ref)
    assert clear.float().mean() > 0.9
    assert torch.equal(flat.sum(1), torch.ones(len(flat)))
    assert torch.equal(flat[clear].argmax(1), ref[clear].argmax(1))


class TestPoolLabelsTokens:
    @pytest.mark.parametrize("num_classes", [10, 1000])
    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("shape", MAPS.values(), ids=MAPS)
    def test_softmax_matches_reference(self, shape, size, num_classes):
        scores, class_ids, boxes, mirror = batch(6, shape, num_classes, seed_of(shape, size, num_classes))
        got = pool_labels(scores, class_ids, boxes, num_classes, output_size=size, mirror=mirror)
        assert_matches_reference(got, scores, class_ids, boxes, mirror, size, num_classes, "softmax")

    @pytest.mark.parametrize("size", [7, 14])
    def test_argmax_matches_reference(self, size):
        scores, class_ids, boxes, mirror = batch(6, (5, 18, 18), 1000, seed_of("argmax", size))
        got = pool_labels(scores, class_ids, boxes, 1000, "argmax", output_size=size, mirror=mirror)
        assert_matches_reference(got, scores, class_ids, boxes, mirror, size, 1000, "argmax")

    @pytest.mark.parametrize("flip", [False, True])
    @pytest.mark.parametrize("size", SIZES)
    def test_edge_boxes(self, size, flip):
        n = len(EDGE_BOXES)
        scores, class_ids, _, _ = batch(n, (3, 15, 18), 10, seed_of("edges", size))
        mirror = torch.full((n,), flip)
        got = pool_labels(scores, class_ids, EDGE_BOXES, 10, output_size=size, mirror=mirror)
        assert_matches_reference(got, scores, class_ids, EDGE_BOXES, mirror, size, 10, "softmax")

    @pytest.mark.parametrize("dtype", ["float16", "uint8"])
    def test_stored_score_dtypes(self, dtype):
        scores, class_ids, boxes, mirror = batch(4, (5, 14, 14), 100, seed_of(dtype))
        if dtype == "float16":
            stored, scale, offset, floats = scores.half(), None, None, scores.half().float()
        else:
            stored = torch.randint(0, 256, scores.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
            scale, offset = torch.tensor([0.02, 0.03, 0.01, 0.05]), torch.tensor([-1.0, 0.5, 0.0, -2.0])
            floats = offset.view(4, 1, 1, 1) + scale.view(4, 1, 1, 1) * stored.float()
        got = pool_labels(stored, class_ids, boxes, 100, scale=scale, offset=offset, output_size=7, mirror=mirror)
        assert_matches_reference(got, floats, class_ids, boxes, mirror, 7, 100, "softmax")

    @pytest.mark.parametrize("mode", MODES)
    def test_output_size_one_is_the_per_crop_pooling_bit_for_bit(self, mode):
        scores, class_ids, boxes, mirror = batch(64, (5, 15, 15), 1000, seed_of("one", mode))
        per_crop = pool_labels(scores, class_ids, boxes, 1000, mode)
        tokens = pool_labels(scores, class_ids, boxes, 1000, mode, output_size=1, mirror=mirror)
        assert per_crop.shape == (64, 1000) and tokens.shape == (64, 1, 1000)
        assert torch.equal(bits(tokens[:, 0]), bits(per_crop))

    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    def test_mirror_reverses_the_token_columns(self, mode):
        scores, class_ids, boxes, _ = batch(8, (5, 18, 18), 1000, seed_of("mirror", mode))
        plain = pool_labels(scores, class_ids, boxes, 1000, mode, output_size=7, mirror=False)
        flipped = pool_labels(scores, class_ids, boxes, 1000, mode, output_size=7, mirror=torch.ones(8, dtype=torch.int32))
        assert torch.equal(bits(flipped.view(8, 7, 7, 1000)), bits(plain.view(8, 7, 7, 1000).flip(2)))
        assert not torch.equal(flipped, plain)
        assert torch.equal(bits(pool_labels(scores, class_ids, boxes, 1000, mode, output_size=7)), bits(plain))

    @pytest.mark.parametrize("mode", ["global_softmax", "global_argmax"])
    def test_global_modes_refuse_a_token_grid(self, mode):
        scores, class_ids, boxes, _ = batch(2, (3, 12, 12), 10, 0)
        with pytest.raises(ValueError, match=r"output_size 7 needs a box mode \(softmax or argmax\)"):
            pool_labels(scores, class_ids, boxes, 10, mode, output_size=7)
        with pytest.raises(ValueError, match=r"output_size 7 needs a box mode"):
            pool_labels_emulated(scores, class_ids, boxes, 10, mode, output_size=7)
        assert pool_labels(scores, class_ids, boxes, 10, mode, output_size=1).shape == (2, 1, 10)

    @pytest.mark.parametrize("size", [0, -1, 4097, True, 7.0])
    def test_bad_output_size(self, size):
        scores, class_ids, boxes, _ = batch(2, (3, 12, 12), 10, 0)
        with pytest.raises(ValueError, match=r"output_size .*expected None or an int in 1..4096"):
            pool_labels(scores, class_ids, boxes, 10, output_size=size)

    def test_bad_mirror(self):
        scores, class_ids, boxes, _ = batch(3, (3, 12, 12), 10, 0)
        with pytest.raises(ValueError, match=r"mirror: 2 values for 3 samples"):
            pool_labels(scores, class_ids, boxes, 10, output_size=7, mirror=[True, False])
        with pytest.raises(TypeError, match=r"mirror: dtype torch.float32, expected bool or an integer dtype"):
            pool_labels(scores, class_ids, boxes, 10, output_size=7, mirror=torch.zeros(3))


class TestEmulatedKernelTokens:
    """The kernel's source on the host (about 30 ms per emulated block, one block per token): few samples."""

    @pytest.mark.parametrize("size, num_classes, n", [(1, 1000, 4), (7, 10, 2), (7, 1000, 2), (14, 10, 2),
                                                      (14, 1000, 2), (24, 10, 2), (24, 1000, 2)])
    def test_equals_cpu_bit_for_bit_and_matches_reference(self, size, num_classes, n):
        scores, class_ids, boxes, _ = batch(n, (5, 18, 18), num_classes, seed_of("kernel", size, num_classes))
        mirror = torch.arange(n) % 2 == 1
        got = pool_labels_emulated(scores, class_ids, boxes, num_classes, output_size=size, mirror=mirror)
        host = pool_labels(scores, class_ids, boxes, num_classes, output_size=size, mirror=mirror)
        assert torch.equal(bits(got), bits(host))
        assert_matches_reference(got, scores, class_ids, boxes, mirror, size, num_classes, "softmax")

    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    @pytest.mark.parametrize("flip", [False, True])
    def test_edge_boxes(self, flip, mode):
        boxes = EDGE_BOXES[[0, 1, 3, 6]]
        scores, class_ids, _, _ = batch(4, (3, 12, 12), 100, seed_of("kernel edges"))
        mirror = torch.full((4,), flip)
        got = pool_labels_emulated(scores, class_ids, boxes, 100, mode, output_size=5, mirror=mirror)
        host = pool_labels(scores, class_ids, boxes, 100, mode, output_size=5, mirror=mirror)
        assert torch.equal(bits(got), bits(host))
        if mode == "softmax":
            assert_matches_reference(got, scores, class_ids, boxes, mirror, 5, 100, mode)

    def test_uint8_scores(self):
        scores, class_ids, boxes, mirror = batch(2, (5, 12, 12), 1000, seed_of("kernel uint8"))
        q = torch.randint(0, 256, scores.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        scale, offset = torch.tensor([0.02, 0.05]), torch.tensor([-1.0, 0.5])
        args = (q, class_ids, boxes, 1000, "softmax", scale, offset)
        assert torch.equal(bits(pool_labels_emulated(*args, output_size=4, mirror=mirror)),
                           bits(pool_labels(*args, output_size=4, mirror=mirror)))

    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    def test_same_bits_under_every_interleaving(self, mode):
        scores, class_ids, boxes, mirror = batch(2, (5, 15, 15), 1000, seed_of("interleavings", mode))
        args = (scores, class_ids, boxes, 1000, mode)
        first = pool_labels_emulated(*args, output_size=6, mirror=mirror, seed=0)
        for seed in (1, 2, 3):
            again = pool_labels_emulated(*args, output_size=6, mirror=mirror, seed=seed)
            assert torch.equal(bits(again), bits(first))

    def test_entry_refuses_what_the_python_checks_refuse(self):
        scores, class_ids, boxes, _ = batch(1, (1, 12, 12), 10, 0)
        with pytest.raises(ValueError, match=r"output_size 5000 is outside 1..4096"):
            emulated_entry(scores, class_ids, boxes, "softmax", 5000)
        with pytest.raises(ValueError, match=r"output_size 3 needs a box mode"):
            emulated_entry(scores, class_ids, boxes, "global_argmax", 3)


def emulated_entry(scores, class_ids, boxes, mode, size):
    """The emulated C entry itself, with an output size the Python checks would refuse first."""
    import ctypes

    from relabel_dali.ops.build import load_emulator
    from relabel_dali.ops.pooling import kernel_arguments, raise_for_code

    args, _keep = kernel_arguments(scores, class_ids, boxes, 10, mode, None, None, True)
    args[12] = size  # the entries' arguments: ..., num_classes, mode, output_size, mirror
    out = torch.empty(len(scores), 10)
    err = ctypes.create_string_buffer(1024)
    raise_for_code(load_emulator().relabel_pool_emulated(*args, 0, 1, out.data_ptr(), err, len(err)), err)


def run_tokens_pipeline(scores, class_ids, boxes, flips, batch_size, device="cpu", **op_args):
    """fn.label_pool on numpy batches, ``flips`` as the per-sample argument input ``mirror`` (or None)."""
    return run_label_pool(scores, class_ids, boxes, batch_size, device, None if flips is None else {"mirror": flips},
                          **op_args)


def numpy_inputs(n, num_classes, seed, shape=(5, 18, 18)):
    scores, class_ids, boxes, mirror = batch(n, shape, num_classes, seed)
    return scores, class_ids, boxes, mirror, (scores.numpy(), class_ids.numpy().astype(np.uint16), boxes.numpy())


class TestLabelPoolOperatorTokens:
    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    @pytest.mark.parametrize("size", [1, 7, 14])
    def test_equals_pool_labels_bit_for_bit_and_matches_reference(self, size, mode):
        scores, class_ids, boxes, mirror, arrays = numpy_inputs(16, 1000, seed_of("op", size, mode))
        got = run_tokens_pipeline(*arrays, mirror.numpy().astype(np.int32), 8, num_classes=1000, mode=mode,
                                  output_size=size)
        native = pool_labels(scores, class_ids, boxes, 1000, mode, output_size=size, mirror=mirror)
        np.testing.assert_array_equal(got.view(np.int32), bits(native).numpy())
        assert_matches_reference(torch.from_numpy(got), scores, class_ids, boxes, mirror, size, 1000, mode)

    def test_mirror_as_bool_input_and_as_a_constant(self):
        scores, class_ids, boxes, _, arrays = numpy_inputs(4, 100, seed_of("op mirror"))
        flipped = pool_labels(scores, class_ids, boxes, 100, output_size=5, mirror=True)
        as_bool = run_tokens_pipeline(*arrays, np.ones(4, dtype=bool), 4, num_classes=100, output_size=5)
        as_constant = run_tokens_pipeline(*arrays, None, 4, num_classes=100, output_size=5, mirror=1)
        np.testing.assert_array_equal(as_bool.view(np.int32), bits(flipped).numpy())
        np.testing.assert_array_equal(as_constant.view(np.int32), bits(flipped).numpy())

    def test_default_is_one_vector_per_crop_and_output_size_one_the_same_bits(self):
        _, _, _, mirror, arrays = numpy_inputs(4, 100, seed_of("op default"))
        per_crop = run_tokens_pipeline(*arrays, None, 4, num_classes=100)
        one = run_tokens_pipeline(*arrays, mirror.numpy().astype(np.int32), 4, num_classes=100, output_size=1)
        assert per_crop.shape == (4, 100) and one.shape == (4, 1, 100)
        np.testing.assert_array_equal(one[:, 0].view(np.int32), per_crop.view(np.int32))

    def test_global_mode_refuses_a_token_grid(self):
        _, _, _, _, arrays = numpy_inputs(4, 100, 0)
        with pytest.raises(RuntimeError, match=r"LabelPool: output_size 7 needs a box mode"):
            run_tokens_pipeline(*arrays, None, 4, num_classes=100, mode="global_softmax", output_size=7)

    def test_float_mirror_is_refused(self):
        _, _, _, _, arrays = numpy_inputs(4, 100, 0)
        with pytest.raises(RuntimeError, match=r"LabelPool: mirror must be bool or an integer type"):
            run_tokens_pipeline(*arrays, np.ones(4, dtype=np.float32), 4, num_classes=100, output_size=3)


@pytest.mark.gpu
class TestLabelPoolOperatorTokensGpu:
    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    def test_gpu_equals_cpu_bit_for_bit(self, mode):
        _, _, _, mirror, arrays = numpy_inputs(64, 1000, seed_of("gpu", mode))
        flips = mirror.numpy().astype(np.int32)
        cpu = run_tokens_pipeline(*arrays, flips, 32, num_classes=1000, mode=mode, output_size=14)
        gpu = run_tokens_pipeline(*arrays, flips, 32, device="gpu", num_classes=1000, mode=mode, output_size=14)
        np.testing.assert_array_equal(gpu.view(np.int32), cpu.view(np.int32))

    def test_pool_labels_on_cuda_equals_cpu_bit_for_bit(self):
        scores, class_ids, boxes, mirror = batch(64, (5, 18, 18), 1000, seed_of("gpu capi"))
        cpu = pool_labels(scores, class_ids, boxes, 1000, output_size=14, mirror=mirror)
        gpu = pool_labels(scores.cuda(), class_ids.cuda(), boxes.cuda(), 1000, output_size=14, mirror=mirror.cuda())
        assert torch.equal(bits(gpu.cpu()), bits(cpu))
