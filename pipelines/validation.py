"""The validation graph: resize the shorter side to ``image_size / crop_ratio``, centre crop,
normalize. Outputs ``images``, ``labels``, ``indices``.

The source is built with ``remainder="mask"``: the last batch of a rank is padded with slots
whose label and index are ``-1`` (they carry a real image so the decoder sees nothing odd), so
every sample is evaluated exactly once across ranks and the caller masks ``indices < 0`` out.
"""
from __future__ import annotations

import math

from nvidia.dali import fn, types

from relabel_dali import augment

from .training import OUTPUT_DTYPES, read_source, source_pipeline

VAL_OUTPUTS = ("images", "labels", "indices")


def validation_pipeline(source, *, batch_size: int, num_threads: int, device_id: int | None, seed: int = 0,
                        image_size: int = 224, crop_ratio: float = augment.VAL_CROP_RATIO, exif: bool = False,
                        dtype: str = "float32", py_workers: int = 2, start_method: str = "fork",
                        prefetch_queue_depth: int = 2):
    """The validation pipeline (unbuilt); ``device_id=None`` runs everything on the CPU."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    shorter_px = int(math.ceil(image_size / crop_ratio))

    @source_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                     py_workers=py_workers, start_method=start_method, prefetch_queue_depth=prefetch_queue_depth)
    def graph():
        fields = read_source(source, py_workers)
        jpegs, labels, indices = fields["jpegs"], fields["labels"], fields["indices"]
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=exif,
                                   device="cpu" if device_id is None else "mixed")
        images = fn.resize(images, resize_shorter=shorter_px, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
            mean=[255.0 * m for m in augment.IMAGENET_MEAN], std=[255.0 * s for s in augment.IMAGENET_STD],
            dtype=OUTPUT_DTYPES[dtype], output_layout="CHW")
        return images, labels, indices

    return graph()
