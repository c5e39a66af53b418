"""The ``resize_jitter_normalize`` CPU operator against independent references: PIL's own bilinear
resize (bit for bit, both pass orders), the colour steps applied one after another in float64,
mirroring, float16, and its argument checks."""
import numpy as np
import PIL
import pytest
from PIL import Image
from conftest import LUMA, STEPS, jitter_step_by_step, pil_resize

from nvidia.dali import fn, pipeline_def, types

from pipelines.training import LIGHTING_BASIS
from relabel_dali.data import augment
from relabel_dali.ops.build import load_operators

load_operators()

MEAN_255 = [255.0 * m for m in augment.IMAGENET_MEAN]
STD_255 = [255.0 * s for s in augment.IMAGENET_STD]
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

# Upscaled, downscaled, mixed, unchanged, single-pixel and very thin inputs, and the shapes on
# both sides of Pillow 13's pass-order rule (height shrinking more than twice the width).
SHAPES = [(375, 450), (100, 80), (32, 32), (32, 300), (600, 31), (1, 5), (7, 1), (333, 500), (682, 647),
          (537, 300), (97, 33), (40, 200)]


def random_images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for h, w in shapes:
        # Noise (every rounding path) over a smooth field (realistic neighbourhoods).
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
        noise = rng.integers(0, 256, (h, w, 3))
        images.append(np.where(rng.random((h, w, 1)) < 0.5, noise, smooth).astype(np.uint8))
    return images


def constant(batch):
    # A source callable must take no argument, or DALI passes it the iteration number.
    return lambda: batch


def run_op(images, per_sample=None, **kwargs):
    """The operator on uint8 HWC ``images``; ``per_sample`` maps argument names to one value per
    image (fed as tensor arguments). Returns the outputs as numpy arrays."""
    per_sample = per_sample or {}

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0)
    def graph():
        x = fn.external_source(source=constant(images), dtype=types.UINT8, ndim=3, layout="HWC")
        tensors = {}
        for name, values in per_sample.items():
            arrays = [np.asarray(v, np.int32 if name == "mirror" else np.float32) for v in values]
            tensors[name] = fn.external_source(source=constant(arrays), ndim=arrays[0].ndim,
                                               dtype=types.INT32 if name == "mirror" else types.FLOAT)
        return fn.resize_jitter_normalize(x, **tensors, **kwargs)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(images))]


class TestResize:
    @pytest.mark.parametrize("size", [(32, 32), (48, 20), (224, 224)])
    def test_horizontal_first_is_pils_resize_bit_for_bit(self, size):
        images = random_images(SHAPES)
        for image, out in zip(images, run_op(images, size=list(size))):
            expected = np.asarray(pil_resize(Image.fromarray(image), size[::-1]), np.float32).transpose(2, 0, 1)
            assert out.shape == (3, *size) and out.dtype == np.float32
            assert np.array_equal(out, expected), f"input {image.shape[:2]}"

    @pytest.mark.parametrize("size", [(32, 32), (224, 160)])
    def test_pillow13_order(self, size):
        images = random_images(SHAPES, seed=1)
        for image, out in zip(images, run_op(images, size=list(size), pass_order="pillow13")):
            h, w = image.shape[:2]
            vertical_first = h - size[0] > 0 and h - size[0] > 2 * (w - size[1])
            order = "vertical_first" if vertical_first else "horizontal_first"
            expected = np.asarray(pil_resize(Image.fromarray(image), size[::-1], order), np.float32)
            assert np.array_equal(out, expected.transpose(2, 0, 1)), f"input {image.shape[:2]}"
            if PILLOW_MAJOR >= 13:  # the installed PIL itself picks the order
                direct = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR), np.float32)
                assert np.array_equal(out, direct.transpose(2, 0, 1))

    def test_orders_differ_somewhere(self):
        # The rule matters: a tall input resampled both ways differs (by a grey level here and there).
        images = random_images([(600, 31)], seed=2)
        first = run_op(images, size=[32, 32])[0]
        second = run_op(images, size=[32, 32], pass_order="pillow13")[0]
        assert 0 < np.abs(first - second).max() <= 1


class TestColour:
    def test_jitter_lighting_normalize_equal_the_steps(self):
        images = random_images([(90, 120), (64, 64), (200, 50), (33, 77), (120, 90)], seed=3)
        rng = np.random.default_rng(4)
        n = len(images)
        factors = rng.uniform(0.6, 1.4, (n, 3))
        alphas = rng.normal(0, 0.1, (n, 3))
        mirror = [0, 1, 0, 1, 1]
        outs = run_op(images, {"brightness": factors[:, 0], "contrast": factors[:, 1], "saturation": factors[:, 2],
                               "lighting": alphas, "mirror": mirror},
                      size=[40, 40], lighting_basis=LIGHTING_BASIS, mean=MEAN_255, std=STD_255)
        basis = np.array(LIGHTING_BASIS).reshape(3, 3)
        for i, (image, out) in enumerate(zip(images, outs)):
            resized = np.asarray(pil_resize(Image.fromarray(image), (40, 40)))
            # The step order does not matter (no clipping between steps): take a random one.
            order = [STEPS[k] for k in rng.permutation(3)]
            expected = jitter_step_by_step(resized, *factors[i], basis @ alphas[i], order).transpose(2, 0, 1)
            if mirror[i]:
                expected = expected[:, :, ::-1]
            np.testing.assert_allclose(out, expected, rtol=0, atol=2e-4)

    def test_contrast_centre_is_the_resized_images_mean_grey(self):
        # Contrast 0 collapses every pixel onto the mean grey of the resized crop.
        images = random_images([(50, 70)], seed=5)
        (out,) = run_op(images, {"contrast": [0.0]}, size=[16, 16])
        resized = np.asarray(pil_resize(Image.fromarray(images[0]), (16, 16)), np.float64)
        np.testing.assert_allclose(out, (resized @ LUMA).mean(), rtol=1e-6)

    def test_float16_matches_float32(self):
        images = random_images([(80, 60), (61, 99)], seed=6)
        kwargs = dict(size=[24, 24], mean=MEAN_255, std=STD_255, brightness=1.2, saturation=0.7)
        full = run_op(images, **kwargs)
        half = run_op(images, dtype=types.FLOAT16, **kwargs)
        for a, b in zip(full, half):
            assert b.dtype == np.float16
            np.testing.assert_allclose(b.astype(np.float32), a, rtol=1e-3, atol=1e-3)

    def test_defaults_are_the_identity(self):
        images = random_images([(30, 40)], seed=7)
        (out,) = run_op(images, size=[30, 40])
        assert np.array_equal(out, images[0].transpose(2, 0, 1).astype(np.float32))


class TestArguments:
    @pytest.mark.parametrize("kwargs,message", [
        (dict(size=[32]), "size must be \\[H, W\\]"),
        (dict(size=[32, 32], pass_order="vertical"), "pass_order \"vertical\""),
        (dict(size=[32, 32], mean=[0.0, 0.0]), "mean and std need 3 values"),
        (dict(size=[32, 32], std=[1.0, 0.0, 1.0]), "std must not contain 0"),
        (dict(size=[32, 32], lighting_basis=[0.0] * 3), "lighting_basis has 3 values"),
        (dict(size=[32, 32], dtype=types.UINT8), "dtype must be FLOAT or FLOAT16"),
    ])
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(RuntimeError, match=message):
            run_op(random_images([(8, 8)]), **kwargs)

    def test_four_channels_are_refused(self):
        image = np.zeros((8, 8, 4), np.uint8)
        with pytest.raises(RuntimeError, match=r"image shape 8 x 8 x 4, expected \[H, W, 3\]"):
            run_op([image], size=[4, 4])

    def test_lighting_needs_three_values(self):
        with pytest.raises(RuntimeError, match="lighting has 2 values, expected 3"):
            run_op(random_images([(8, 8)]), {"lighting": [[0.1, 0.2]]}, size=[4, 4])
