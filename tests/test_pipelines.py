"""The DALI graphs, CPU-only: crop boxes against the pixels decoded, pooled and one-hot targets,
the fused colour transform against step-by-step references, decoding of awkward files, the
validation resize/centre crop."""
import importlib.util
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import LUMA, NUM_CLASSES, STEPS, encode, jitter_step_by_step, make_dataset, pil_resize

from nvidia.dali import fn, pipeline_def, types

from pipelines.training import colour_transform, training_pipeline
from pipelines.validation import validation_pipeline
from relabel_dali import LabelShardReader
from relabel_dali.data import augment
from relabel_dali.data.settings import Runtime, TrainAugment, ValTransform
from relabel_dali.data.source import SampleSource

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)[:, None, None] * 255
STD = np.array(augment.IMAGENET_STD, np.float32)[:, None, None] * 255
HAVE_LABEL_POOL = importlib.util.find_spec("relabel_dali.ops.build") is not None


def run_epoch(pipe, names):
    """All batches of one epoch as numpy arrays, concatenated per output."""
    pipe.build()
    out = {name: [] for name in names}
    try:
        while True:
            for name, batch in zip(names, pipe.run()):
                out[name].extend(np.array(batch[i]) for i in range(len(batch)))
    except StopIteration:
        pass
    return {name: np.stack(values) for name, values in out.items()}


def pixels(images):
    """Undo normalization: [B, 3, S, S] back to 0..255 (no lighting noise in these tests)."""
    return images.astype(np.float32) * STD + MEAN


def plain(image_root, label_root=None, *, batch_size=4, seed=7, dtype="float32", fused=None, pool_mode="softmax",
          **augment):
    """A training graph over ``image_root`` with its source, in the pipeline's thread; augmentation
    off unless asked for."""
    settings = dict(image_size=32, color_jitter=0.0, lighting_std=0.0, flip=False)
    settings.update(augment)
    augment = TrainAugment(**settings)
    source = SampleSource(image_root, label_root, batch_size=batch_size, seed=seed, augment=augment)
    return training_pipeline(source, augment, Runtime(num_threads=1, py_workers=0, dtype=dtype),
                             num_classes=NUM_CLASSES, pool_mode=pool_mode, fused=fused)


NAMES = ("images", "boxes", "targets", "labels", "indices")


class TestCropBoxes:
    @pytest.mark.parametrize("flip", [False, True])
    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_boxes_are_the_decoded_crop(self, tmp_path, flip, dtype):
        # The CPU graph's fused operator: each image must be PIL's bilinear resize of the box's
        # pixels, which pins the box to the pixel and the resize to PIL's bit for bit.
        image_root, _, keys = make_dataset(tmp_path, classes=2, per_class=6, labels=False)
        out = run_epoch(plain(image_root, seed=1, flip=flip, dtype=dtype), NAMES)
        assert out["images"].dtype == np.dtype(dtype) and out["images"].shape == (12, 3, 32, 32)
        flips = 0
        for image, box, index in zip(pixels(out["images"]), out["boxes"], out["indices"]):
            whole = Image.open(image_root / (keys[index] + ".JPEG")).convert("RGB")
            w, h = whole.size
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            pixel_box = [int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h)]
            np.testing.assert_allclose(np.asarray(box, np.float64) * [w, h, w, h], pixel_box, atol=1e-3)
            resized = pil_resize(whole.crop(pixel_box), (32, 32))
            expected = np.asarray(resized, np.float32).transpose(2, 0, 1)
            if flip and not np.allclose(image, expected, atol=0.5):
                expected, flips = expected[:, :, ::-1], flips + 1
            # float16 keeps ~3 significant digits of the normalized value: 0.25 grey levels.
            np.testing.assert_allclose(image, expected, rtol=0, atol=0.01 if dtype == "float32" else 0.25)
        assert (0 < flips < 12) if flip else flips == 0

    @pytest.mark.parametrize("flip", [False, True])
    def test_boxes_are_the_decoded_crop_dali_resize(self, tmp_path, flip):
        # fused=False (the GPU graph's operators, run on the CPU): DALI's own resize.
        image_root, _, keys = make_dataset(tmp_path, classes=2, per_class=6, labels=False)
        out = run_epoch(plain(image_root, seed=1, flip=flip, fused=False), NAMES)
        assert out["images"].shape == (12, 3, 32, 32)
        flips = 0
        for image, box, index in zip(pixels(out["images"]), out["boxes"], out["indices"]):
            h, w = np.array(Image.open(image_root / (keys[index] + ".JPEG"))).shape[:2]
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            # R = x and G = y in the source image: a resized crop of a ramp is a ramp whose
            # intercept and slope give the crop's first pixel and its extent.
            cols, rows = image[0].mean(axis=0), image[1].mean(axis=1)
            if flip and cols[-1] < cols[0]:
                cols, flips = cols[::-1], flips + 1
            for ramp, (lo, hi), extent in ((cols, box[0::2], w), (rows, box[1::2], h)):
                j = np.arange(2, 30)
                slope, intercept = np.polyfit(j, ramp[2:30], 1)
                size = slope * 32
                start = intercept + 0.5 - 0.5 * slope
                assert abs(start - lo * extent) < 0.75
                assert abs(size - (hi - lo) * extent) < 0.75
        assert (0 < flips < 12) if flip else flips == 0

    def test_area_and_ratio_ranges_hold(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, classes=2, per_class=6, labels=False, size=(200, 200))
        out = run_epoch(plain(image_root, seed=2, random_area=(0.25, 0.5), random_aspect_ratio=(0.5, 2.0)), NAMES)
        boxes = out["boxes"].astype(np.float64)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert np.all((area > 0.23) & (area < 0.52))


class TestTargets:
    def test_one_hot_without_relabel(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        out = run_epoch(plain(image_root, seed=0), NAMES)
        expected = np.eye(NUM_CLASSES, dtype=np.float32)[out["labels"]]
        assert np.array_equal(out["targets"], expected)
        assert sorted(out["indices"].tolist()) == list(range(8))

    @pytest.mark.skipif(not HAVE_LABEL_POOL, reason="relabel_dali.ops.build (the LabelPool operator) is not in the tree")
    @pytest.mark.parametrize("score_dtype", ["float32", "float16", "uint8"])
    @pytest.mark.parametrize("mode", ["softmax", "argmax"])
    def test_soft_targets_are_pool_labels_of_the_box(self, tmp_path, score_dtype, mode):
        from relabel_dali.ops.pooling import pool_labels

        image_root, label_root, keys = make_dataset(tmp_path, score_dtype=score_dtype)
        out = run_epoch(plain(image_root, label_root, seed=0, pool_mode=mode), NAMES)
        reader = LabelShardReader(label_root)
        records = [reader.record(keys[index]) for index in out["indices"]]
        expected = pool_labels(torch.from_numpy(np.stack([r.scores for r in records])),
                               torch.from_numpy(np.stack([r.class_ids for r in records]).astype(np.int64)),
                               torch.from_numpy(out["boxes"]), NUM_CLASSES, mode,
                               [r.scale for r in records], [r.offset for r in records])
        np.testing.assert_allclose(out["targets"], expected.numpy(), rtol=1e-5, atol=1e-6)
        assert out["targets"].shape == (len(keys), NUM_CLASSES)
        np.testing.assert_allclose(out["targets"].sum(1), 1, atol=1e-5)

    def test_source_and_graph_must_agree_on_augmentation(self, tmp_path):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        source = SampleSource(image_root, batch_size=4, augment=TrainAugment(image_size=32))
        with pytest.raises(ValueError, match="other augmentation settings"):
            training_pipeline(source, TrainAugment(image_size=64), Runtime(py_workers=0), num_classes=NUM_CLASSES)

    @pytest.mark.parametrize("argument,value,message", [
        ("dtype", "int8", "dtype 'int8'"), ("pool_mode", "mean", "pool_mode 'mean'")])
    def test_bad_arguments(self, tmp_path, argument, value, message):
        image_root, _, _ = make_dataset(tmp_path, labels=False)
        with pytest.raises(ValueError, match=message):
            plain(image_root, **{argument: value})


# DALI's saturation goes through YIQ with rounded constants: up to ~0.3 grey levels off the exact
# map, less than the official path's own rounding to whole grey levels after every step.
GREY_LEVEL = 1 / (255 * min(augment.IMAGENET_STD))  # one grey level, normalized


def run_colour_transform(images, params, fold=None):
    """``colour_transform`` on uint8 HWC ``images`` with per-sample (b, c, s, r, g, b) ``params``,
    back in HWC."""
    def column(k):
        return lambda: [np.array(p[k], np.float32) for p in params]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def graph():
        x = fn.external_source(source=lambda: images, dtype=types.UINT8, ndim=3, layout="HWC")
        # A source callable must take no argument, or DALI passes it the iteration number.
        columns = [fn.external_source(source=column(k), dtype=types.FLOAT, ndim=0) for k in range(6)]
        return colour_transform(x, *columns[:3], columns[3:], fold=fold)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]).transpose(1, 2, 0) for i in range(len(images))]


def flat_images(root, colour, count, shape):
    """``root/c0/flatNN.JPEG``: ``count`` single-colour images (PNG bytes: lossless); returns root."""
    (root / "c0").mkdir()
    for i in range(count):
        flat = np.broadcast_to(np.asarray(colour).astype(np.uint8), (*shape, 3))
        (root / "c0" / f"flat{i:02d}.JPEG").write_bytes(encode(np.ascontiguousarray(flat), "PNG"))
    return root


def smooth_images(count, shape, low, high, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(low, high + 1, (4, 5, 3), np.uint8)
        out.append(np.array(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR)))
    return out


class TestColourTransform:
    # fold=False is the GPU graph's arithmetic pass, run here on the CPU.
    @pytest.mark.parametrize("fold", [True, False])
    @pytest.mark.parametrize("order", list(itertools.permutations(STEPS)))
    def test_equals_the_steps_in_any_order(self, order, fold):
        images = smooth_images(5, (12, 17), 0, 255, seed=len(order[0]))
        params = [(0.6, 1.4, 1.0, 0.0, 0.0, 0.0), (1.4, 0.6, 0.6, 0.02, -0.01, 0.0),
                  (1.0, 1.0, 1.4, -0.03, 0.01, 0.02), (0.83, 1.21, 0.7, 0.0, 0.05, -0.04),
                  (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)]
        for image, p, out in zip(images, params, run_colour_transform(images, params, fold)):
            assert out.dtype == np.float32 and out.shape == image.shape
            expected = jitter_step_by_step(image, *p[:3], p[3:], order)
            np.testing.assert_allclose(out, expected, rtol=0, atol=0.35 * GREY_LEVEL)

    def test_equals_torchvision_where_nothing_clips(self):
        from torchvision.transforms import functional as F

        images = smooth_images(4, (16, 16), 90, 160, seed=3)
        rng = np.random.default_rng(4)
        params = [(*rng.uniform(0.8, 1.2, 3), *rng.normal(0, 0.02, 3)) for _ in images]
        adjust = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
                  "saturation": F.adjust_saturation}
        for image, p, out in zip(images, params, run_colour_transform(images, params)):
            x = torch.from_numpy(image).permute(2, 0, 1).double() / 255
            for k in rng.permutation(3):
                x = adjust[STEPS[k]](x, float(p[k]))
            assert 0 < x.min() and x.max() < 1  # the clipping of each step never applied
            x = x + torch.tensor(p[3:], dtype=torch.float64).view(3, 1, 1)
            expected = F.normalize(x, augment.IMAGENET_MEAN, augment.IMAGENET_STD).permute(1, 2, 0).numpy()
            # torchvision's grey is 0.2989 R + 0.587 G + 0.114 B: a 1e-4 difference in the weights.
            np.testing.assert_allclose(out, expected, rtol=0, atol=0.4 * GREY_LEVEL)

    def test_fold_needs_cpu_images(self):
        # Only defines the graph: no GPU is needed to reach the check.
        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def graph():
            x = fn.external_source(source=lambda: [], dtype=types.UINT8, ndim=3, layout="HWC").gpu()
            return colour_transform(x, 1.0, 1.0, 1.0, (0.0, 0.0, 0.0), fold=True)

        with pytest.raises(ValueError, match="fold=True needs CPU images"):
            graph()

    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_jitter_factors_per_sample_in_range(self, tmp_path, dtype):
        # On a flat image the output grey is b * grey (contrast about the image's own mean and
        # saturation keep the grey), and the chroma is scaled by b * c * s.
        colour = np.array([150.0, 90.0, 60.0])
        out = run_epoch(plain(flat_images(tmp_path, colour, 16, (20, 24)), batch_size=8, seed=5, image_size=8, color_jitter=0.4, dtype=dtype), NAMES)
        x = pixels(out["images"]).reshape(16, 3, -1).astype(np.float64)
        assert np.ptp(x, axis=2).max() < 0.5  # one affine map per image: a flat image stays flat
        x = x.mean(axis=2)
        grey = colour @ LUMA
        brightness = x @ LUMA / grey
        chroma = (x - (x @ LUMA)[:, None]) / (colour - grey)
        tolerance = 2e-3 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(chroma, chroma.mean(axis=1, keepdims=True).repeat(3, 1), rtol=tolerance, atol=tolerance)
        contrast_saturation = chroma.mean(axis=1) / brightness
        assert np.all((brightness > 0.6 - tolerance) & (brightness < 1.4 + tolerance))
        assert np.all((contrast_saturation > 0.36 - tolerance) & (contrast_saturation < 1.96 + tolerance))
        assert brightness.std() > 0.1 and contrast_saturation.std() > 0.1

    def test_lighting_is_the_pca_basis_times_normal_coefficients(self, tmp_path):
        # With jitter off, a flat image's output is its colour plus 255 * basis @ alpha: solving for
        # alpha must give independent N(0, 0.1) coefficients (a wrong basis orientation would mix
        # eigenvalues 0.2175 and 0.0045 and blow the smallest component's spread up or down).
        colour = np.array([120.0, 100.0, 80.0])
        out = run_epoch(plain(flat_images(tmp_path, colour, 64, (12, 12)), batch_size=16, seed=9, image_size=8, lighting_std=0.1), NAMES)
        x = pixels(out["images"]).reshape(64, 3, -1).astype(np.float64)
        assert np.ptp(x, axis=2).max() < 1e-3
        basis = np.array(augment.PCA_EIGVEC) * np.array(augment.PCA_EIGVAL)
        alphas = np.linalg.solve(basis, ((x.mean(axis=2) - colour) / 255).T).T
        assert np.all(np.abs(alphas.mean(axis=0)) < 0.05)
        assert np.all((alphas.std(axis=0) > 0.06) & (alphas.std(axis=0) < 0.14))
        assert abs(np.corrcoef(alphas.T)[0, 1]) < 0.4


class TestAwkwardFiles:
    @pytest.mark.parametrize("fmt,mode,name", [("JPEG", "CMYK", "cmyk.JPEG"), ("PNG", "RGB", "png.JPEG"),
                                               ("JPEG", "L", "grey.JPEG"), ("JPEG", "RGB", "plain.JPEG")])
    def test_decodes_like_pil(self, tmp_path, fmt, mode, name):
        rng = np.random.default_rng(0)
        smooth = np.array(Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).resize((64, 64), Image.BILINEAR))
        (tmp_path / "c0").mkdir()
        (tmp_path / "c0" / name).write_bytes(encode(smooth, fmt, mode))
        reference = np.array(Image.open(tmp_path / "c0" / name).convert("RGB"), np.float32).transpose(2, 0, 1)
        out = run_epoch(plain(tmp_path, batch_size=1, image_size=64, random_area=(1, 1),
                              random_aspect_ratio=(1, 1)), NAMES)
        assert np.allclose(out["boxes"][0], [0, 0, 1, 1])
        assert np.abs(pixels(out["images"])[0] - reference).max() < 1.5


class TestValidation:
    # Sizes whose resized margins are even: centring a crop in an odd margin rounds differently
    # in DALI and torchvision (half a pixel either way).
    @pytest.mark.parametrize("size", [(48, 72), (80, 40)])
    def test_resize_shorter_and_centre_crop(self, tmp_path, size):
        from torchvision import transforms

        image_root, _, keys = make_dataset(tmp_path, classes=1, per_class=1, labels=False, size=size)
        source = SampleSource(image_root, batch_size=2, shuffle=False, remainder="mask")
        pipe = validation_pipeline(source, ValTransform(image_size=28), Runtime(num_threads=1, py_workers=0))
        out = run_epoch(pipe, ("images", "labels", "indices"))
        assert out["indices"].tolist() == [0, -1] and out["labels"].tolist() == [0, -1]
        reference = transforms.Compose([transforms.Resize(int(np.ceil(28 / 0.875))), transforms.CenterCrop(28)])
        for image, index in zip(pixels(out["images"][:1]), out["indices"][:1]):
            expected = np.array(reference(Image.open(image_root / (keys[index] + ".JPEG")).convert("RGB")),
                                np.float32).transpose(2, 0, 1)
            # Resize filters differ a little at the borders; the interior of a ramp must agree.
            assert np.abs(image - expected)[:, 2:-2, 2:-2].max() < 2.5

    def test_bad_crop_ratio(self):
        with pytest.raises(ValueError, match="crop_ratio must be in"):
            ValTransform(crop_ratio=1.5)
