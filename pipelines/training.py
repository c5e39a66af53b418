"""The training graph: decode a random crop, know its box, pool the label map over that box.

``training_pipeline(...)`` only builds a graph from its arguments (no I/O, no global state beyond
loading the LabelPool plugin once); the caller builds and runs it. Outputs, in order:
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


def read_source(source, py_workers: int):
    """The external source node(s) for a ``SampleSource``; ``py_workers == 0`` runs it inline."""
    return fn.external_source(source=source, parallel=py_workers > 0, batch=False,
                              num_outputs=len(source.output_dtypes),
                              dtype=[dali_type(d) for d in source.output_dtypes], ndim=source.output_ndims)


def crop_box(shape, anchor, crop_shape):
    """Normalized (x0, y0, x1, y1) of a crop given as [y, x] anchor and [h, w] shape."""
    shape = fn.cast(shape, dtype=types.FLOAT)
    anchor = fn.cast(anchor, dtype=types.FLOAT)
    crop_shape = fn.cast(crop_shape, dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    return fn.stack(anchor[1] / width, anchor[0] / height,
                    (anchor[1] + crop_shape[1]) / width, (anchor[0] + crop_shape[0]) / height)


def jitter_colours(images, strength: float):
    """Brightness, contrast and saturation factors each uniform in [1 - s, 1 + s]."""
    if strength <= 0:
        return images
    factor = [max(0.0, 1.0 - strength), 1.0 + strength]
    return fn.color_twist(images, brightness=fn.random.uniform(range=factor),
                          contrast=fn.random.uniform(range=factor),
                          saturation=fn.random.uniform(range=factor))


def lighting_mean(lighting_std: float):
    """Per-sample normalization mean (0..255 scale) that also adds PCA lighting noise.

    (x + 255 * rgb - 255 * mean) / (255 * std) is the official ``normalize(lighting(x / 255))``,
    so folding ``rgb`` into the mean costs no extra pass over the pixels.
    """
    if lighting_std <= 0:
        return [255.0 * m for m in augment.IMAGENET_MEAN]
    alphas = [fn.random.normal(stddev=lighting_std) for _ in range(3)]
    channels = []
    for c in range(3):
        rgb = sum(alphas[j] * (augment.PCA_EIGVEC[c][j] * augment.PCA_EIGVAL[j]) for j in range(3))
        channels.append(255.0 * (augment.IMAGENET_MEAN[c] - rgb))
    return fn.stack(*channels)


def training_pipeline(source, *, batch_size: int, num_threads: int, device_id: int | None, seed: int,
                      image_size: int = 224, use_relabel: bool = True, pool_mode: str = "softmax",
                      num_classes: int = 1000, exif: bool = False, dtype: str = "float32",
                      color_jitter: float = augment.COLOR_JITTER, lighting_std: float = augment.LIGHTING_STD,
                      random_area=augment.RANDOM_AREA, random_aspect_ratio=augment.RANDOM_ASPECT_RATIO,
                      flip: bool = True, py_workers: int = 2, start_method: str = "fork",
                      prefetch_queue_depth: int = 2):
    """The training pipeline (unbuilt). ``source`` is a ``relabel_dali.sources.SampleSource``;
    ``device_id=None`` runs everything on the CPU."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode {pool_mode!r}: expected one of {POOL_MODES}")
    if use_relabel and not source.with_labels:
        raise ValueError("use_relabel=True needs a source with label shards (label_root)")
    if use_relabel:
        from relabel_dali.ops import load_label_pool

        load_label_pool()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  py_num_workers=max(py_workers, 1), py_start_method=start_method,
                  prefetch_queue_depth=prefetch_queue_depth)
    def graph():
        outputs = read_source(source, py_workers)
        jpegs, labels, indices = outputs[0], outputs[-2], outputs[-1]
        gpu = device_id is not None
        shape = fn.peek_image_shape(jpegs, adjust_orientation=exif)
        anchor, crop_shape = fn.random_crop_generator(shape, random_area=list(random_area),
                                                      random_aspect_ratio=list(random_aspect_ratio),
                                                      num_attempts=10)
        images = fn.decoders.image_slice(jpegs, anchor, crop_shape, axis_names="HW", output_type=types.RGB,
                                         adjust_orientation=exif, device="mixed" if gpu else "cpu")
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = jitter_colours(images, color_jitter)
        images = fn.crop_mirror_normalize(
            images, mean=lighting_mean(lighting_std), std=[255.0 * s for s in augment.IMAGENET_STD],
            mirror=fn.random.coin_flip(probability=0.5) if flip else 0,
            dtype=OUTPUT_DTYPES[dtype], output_layout="CHW")
        boxes = crop_box(shape, anchor, crop_shape)
        if use_relabel:
            scores, class_ids, scale, offset = outputs[1:5]
            if gpu:
                scores, class_ids, pool_boxes = scores.gpu(), class_ids.gpu(), boxes.gpu()
            else:
                pool_boxes = boxes
            targets = fn.label_pool(scores, class_ids, pool_boxes, scale=scale, offset=offset,
                                    num_classes=num_classes, mode=pool_mode,
                                    device="gpu" if gpu else "cpu")
        else:
            targets = fn.one_hot(labels, num_classes=num_classes, dtype=types.FLOAT)
            if gpu:
                targets = targets.gpu()
        return images, boxes, targets, labels, indices

    return graph()
