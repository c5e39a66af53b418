"""The training graph: decode a random crop, know its box, pool the label map over that box.

``training_pipeline(...)`` only builds a graph from its arguments (no I/O, no global state beyond
loading the operator plugin once); the caller builds and runs it. Outputs, in order:
``images`` ([3, S, S] float32/float16, normalized), ``boxes`` (float32 [4] normalized xyxy of the
crop in the whole, unflipped image), ``targets`` (float32 [num_classes]: pooled soft labels, or
one-hot labels when ``use_relabel`` is False), ``labels`` and ``indices`` (int64 scalars).
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from relabel_dali import augment

OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
POOL_MODES = ("softmax", "argmax", "global_softmax", "global_argmax")
TRAIN_OUTPUTS = ("images", "boxes", "targets", "labels", "indices")


def dali_type(dtype) -> types.DALIDataType:
    return types.to_dali_type(np.dtype(dtype))


def read_source(source, py_workers: int) -> dict:
    """The external source for a ``SampleSource`` (``py_workers == 0`` runs it inline) and the
    fields of its packed samples as nodes: ``jpegs``, ``labels``, ``indices`` and, with labels,
    ``scores``, ``class_ids`` and (uint8 scores only) ``scale``, ``offset``."""
    jpegs, packed = fn.external_source(source=source, parallel=py_workers > 0, batch=False, num_outputs=2,
                                       dtype=[dali_type(d) for d in source.output_dtypes],
                                       ndim=source.output_ndims)
    nodes = {"jpegs": jpegs}
    plural = {"label": "labels", "index": "indices"}
    for name, (start, dtype, shape) in source.packed_fields.items():
        if name in ("scale", "offset") and not source.quantized:
            continue  # float scores are stored with scale 1 and offset 0: nothing to apply
        stop = start + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        nodes[plural.get(name, name)] = fn.reinterpret(packed[start:stop], dtype=dali_type(dtype), shape=list(shape))
    return nodes


def source_pipeline(*, batch_size: int, num_threads: int, device_id: int | None, seed: int, py_workers: int,
                    start_method: str, prefetch_queue_depth: int):
    """``pipeline_def`` for a graph fed by a ``SampleSource`` (its parallel workers included)."""
    return pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                        py_num_workers=max(py_workers, 1), py_start_method=start_method,
                        prefetch_queue_depth=prefetch_queue_depth)


def crop_box(shape, anchor, crop_shape):
    """Normalized (x0, y0, x1, y1) of a crop given as [y, x] anchor and [h, w] shape."""
    shape = fn.cast(shape, dtype=types.FLOAT)
    anchor = fn.cast(anchor, dtype=types.FLOAT)
    crop_shape = fn.cast(crop_shape, dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    return fn.stack(anchor[1] / width, anchor[0] / height,
                    (anchor[1] + crop_shape[1]) / width, (anchor[0] + crop_shape[0]) / height)


def lighting_offsets(lighting_std: float):
    """Per-sample PCA lighting noise (0..1 scale), one value or node per channel."""
    if lighting_std <= 0:
        return (0.0, 0.0, 0.0)
    alphas = [fn.random.normal(stddev=lighting_std) for _ in range(3)]
    return tuple(sum(alphas[j] * augment.PCA_BASIS[c][j] for j in range(3))
                 for c in range(3))


def lighting_mean(lighting_std: float):
    """Per-sample normalization mean (0..255 scale) that also adds PCA lighting noise.

    (x + 255 * rgb - 255 * mean) / (255 * std) is the official ``normalize(lighting(x / 255))``,
    so folding ``rgb`` into the mean costs no extra pass over the pixels.
    """
    if lighting_std <= 0:
        return [255.0 * m for m in augment.IMAGENET_MEAN]
    rgb = lighting_offsets(lighting_std)
    return fn.stack(*[255.0 * (augment.IMAGENET_MEAN[c] - rgb[c]) for c in range(3)])


def folded_normalization(brightness, contrast, grey_mean, lighting):
    """Per-sample ``(mean, std)`` (0..255 scale, one entry per channel) for ``crop_mirror_normalize``
    that apply brightness, contrast, lighting and normalization to a saturation-adjusted image.
    Arguments are DALI nodes or plain numbers alike (only arithmetic is used).

    Brightness ``x -> b x``, contrast ``x -> c x + (1 - c) m 1`` (``m``: the image's mean grey at
    that step) and saturation ``x -> s x + (1 - s) (w.x) 1`` are all ``alpha I + beta 1 w^T`` plus
    a grey offset; since ``w.1 = 1`` that family is closed under composition, and in every order
    the product is ``b c S_s(x) + b (1 - c) m0 1`` (``S_s``: the saturation map, ``m0``: the
    input's mean grey). Only ``S_s`` mixes channels; the rest is a per-channel scale and shift,
    and so are lighting (``+ 255 rgb``) and normalization.
    """
    scale = brightness * contrast
    shift = brightness * (1.0 - contrast) * grey_mean
    mean = [(255.0 * (augment.IMAGENET_MEAN[c] - lighting[c]) - shift) / scale for c in range(3)]
    std = [255.0 * augment.IMAGENET_STD[c] / scale for c in range(3)]
    return mean, std


def per_sample(values):
    """A list of numbers as is, or one DALI node stacking values of which some are nodes."""
    return list(values) if all(isinstance(v, (int, float)) for v in values) else fn.stack(*values)


def colour_transform(images, brightness, contrast, saturation, lighting, *, mirror=0, dtype=types.FLOAT,
                     fold: bool | None = None):
    """Colour jitter, lighting, normalization, mirroring and CHW of uint8 HWC RGB images.

    ``fn.saturation`` (the only channel mixing; to float, as a uint8 output costs 3x more on the
    CPU), then one ``crop_mirror_normalize`` whose per-sample statistics also carry brightness and
    contrast (``fold``, the CPU default). The contrast centre is each image's mean grey
    (torchvision's), from one reduction. Operator arguments must live on the CPU while a GPU
    image's statistics live on the GPU, so a GPU graph (``fold=False``, its default) applies
    brightness and contrast with one arithmetic pass instead.
    """
    gpu = images.device == "gpu"
    fold = not gpu if fold is None else fold
    if fold and gpu:
        raise ValueError("fold=True needs CPU images: the GPU reduction cannot feed CPU arguments")
    channel_means = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
    grey_mean = sum(channel_means[c] * augment.GREY_WEIGHTS[c] for c in range(3))
    images = fn.saturation(images, saturation=saturation, dtype=types.FLOAT)
    if not fold:
        scale, shift = brightness * contrast, brightness * (1.0 - contrast)
        if gpu:
            scale, shift = scale.gpu(), shift.gpu()
        images = images * scale + shift * grey_mean
        brightness = contrast = 1.0
        grey_mean = 0.0
    mean, std = folded_normalization(brightness, contrast, grey_mean, lighting)
    return fn.crop_mirror_normalize(images, mean=per_sample(mean), std=per_sample(std), mirror=mirror,
                                    dtype=dtype, output_layout="CHW")


def jitter_factors(strength: float):
    """Per-sample brightness, contrast and saturation factors from torchvision's range
    ``[max(0, 1 - s), 1 + s]``; a factor of exactly 0 would divide by zero in the folded
    statistics, so the floor is a hair above it."""
    factor = [max(1e-3, 1.0 - strength), 1.0 + strength]
    return tuple(fn.random.uniform(range=factor) for _ in range(3))


def jitter_and_normalize(images, *, strength: float, lighting_std: float, mirror, dtype):
    """The photometric half of the training graph on DALI's own operators: uint8 HWC in,
    normalized CHW ``dtype`` out (the GPU graph's)."""
    if strength <= 0:
        return fn.crop_mirror_normalize(images, mean=lighting_mean(lighting_std),
                                        std=[255.0 * s for s in augment.IMAGENET_STD], mirror=mirror,
                                        dtype=dtype, output_layout="CHW")
    brightness, contrast, saturation = jitter_factors(strength)
    return colour_transform(images, brightness, contrast, saturation, lighting_offsets(lighting_std),
                            mirror=mirror, dtype=dtype)


LIGHTING_BASIS = [value for row in augment.PCA_BASIS for value in row]  # row-major, as the operator takes it


def resize_jitter_normalize(images, *, size, strength: float, lighting_std: float, mirror, dtype,
                            pass_order: str = "horizontal_first"):
    """Resize, colour jitter, PCA lighting, normalization, mirror and CHW of decoded uint8 HWC
    crops in one CPU operator (the project's ``fn.resize_jitter_normalize``): the resize is PIL's
    bilinear resize bit for bit, as the official torchvision recipe runs it, and the colour steps
    are the same affine composition as ``colour_transform``'s."""
    jitter = {}
    if strength > 0:
        jitter = dict(zip(("brightness", "contrast", "saturation"), jitter_factors(strength)))
    if lighting_std > 0:
        jitter["lighting"] = fn.random.normal(shape=[3], stddev=lighting_std)
    return fn.resize_jitter_normalize(images, size=list(size), mirror=mirror, dtype=dtype,
                                      lighting_basis=LIGHTING_BASIS,
                                      mean=[255.0 * m for m in augment.IMAGENET_MEAN],
                                      std=[255.0 * s for s in augment.IMAGENET_STD],
                                      pass_order=pass_order, **jitter)


def training_pipeline(source, *, batch_size: int, num_threads: int, device_id: int | None, seed: int,
                      image_size: int = 224, use_relabel: bool = True, pool_mode: str = "softmax",
                      num_classes: int = 1000, exif: bool = False, dtype: str = "float32",
                      color_jitter: float = augment.COLOR_JITTER, lighting_std: float = augment.LIGHTING_STD,
                      random_area=augment.RANDOM_AREA, random_aspect_ratio=augment.RANDOM_ASPECT_RATIO,
                      flip: bool = True, py_workers: int = 2, start_method: str = "fork",
                      prefetch_queue_depth: int = 2, fused: bool | None = None):
    """The training pipeline (unbuilt). ``source`` is a ``relabel_dali.sources.SampleSource``;
    ``device_id=None`` runs everything on the CPU. ``fused`` (default: on the CPU) resizes and
    jitters with the one ``resize_jitter_normalize`` operator instead of DALI's resize,
    saturation and normalize; it is a CPU operator, so a GPU graph cannot use it."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode {pool_mode!r}: expected one of {POOL_MODES}")
    if use_relabel and not source.with_labels:
        raise ValueError("use_relabel=True needs a source with label shards (label_root)")
    gpu = device_id is not None
    fused = not gpu if fused is None else fused
    if fused and gpu:
        raise ValueError("fused=True needs device_id=None: resize_jitter_normalize is a CPU operator")
    if use_relabel or fused:
        from relabel_dali.ops import load_label_pool

        load_label_pool()

    @source_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                     py_workers=py_workers, start_method=start_method, prefetch_queue_depth=prefetch_queue_depth)
    def graph():
        fields = read_source(source, py_workers)
        jpegs, labels, indices = fields["jpegs"], fields["labels"], fields["indices"]
        shape = fn.peek_image_shape(jpegs, adjust_orientation=exif)
        anchor, crop_shape = fn.random_crop_generator(shape, random_area=list(random_area),
                                                      random_aspect_ratio=list(random_aspect_ratio),
                                                      num_attempts=10)
        images = fn.decoders.image_slice(jpegs, anchor, crop_shape, axis_names="HW", output_type=types.RGB,
                                         adjust_orientation=exif, device="mixed" if gpu else "cpu")
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        if fused:
            images = resize_jitter_normalize(images, size=(image_size, image_size), strength=color_jitter,
                                             lighting_std=lighting_std, mirror=mirror, dtype=OUTPUT_DTYPES[dtype])
        else:
            images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR,
                               antialias=True)
            images = jitter_and_normalize(images, strength=color_jitter, lighting_std=lighting_std,
                                          mirror=mirror, dtype=OUTPUT_DTYPES[dtype])
        boxes = crop_box(shape, anchor, crop_shape)
        if use_relabel:
            scores, class_ids = fields["scores"], fields["class_ids"]
            scale, offset = fields.get("scale", 1.0), fields.get("offset", 0.0)
            if gpu:
                scores, class_ids = scores.gpu(), class_ids.gpu()
            # Boxes stay a CPU input on both backends: the operator checks them on the host and
            # hands them to its kernel without a device-to-host copy.
            targets = fn.label_pool(scores, class_ids, boxes, scale=scale, offset=offset,
                                    num_classes=num_classes, mode=pool_mode,
                                    device="gpu" if gpu else "cpu")
        else:
            targets = fn.one_hot(labels, num_classes=num_classes, dtype=types.FLOAT)
            if gpu:
                targets = targets.gpu()
        return images, boxes, targets, labels, indices

    return graph()
