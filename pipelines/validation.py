"""The validation graph: resize the shorter side to ``image_size / crop_ratio``, centre crop,
normalize. Outputs ``images``, ``labels``, ``indices``.

The source is built with ``remainder="mask"``: the last batch of a rank is padded with slots
whose label and index are ``-1`` (they carry a real image so the decoder sees nothing odd), so
every sample is evaluated exactly once across ranks and the caller masks ``indices < 0`` out.
"""
from __future__ import annotations

import math

from nvidia.dali import fn, types

from relabel_dali.data import augment as constants
from relabel_dali.data.settings import Runtime, ValTransform

from .training import OUTPUT_DTYPES, read_source, source_pipeline

VAL_OUTPUTS = ("images", "labels", "indices")


def validation_pipeline(source, transform: ValTransform, runtime: Runtime):
    """The validation pipeline (unbuilt); a CPU ``runtime`` runs everything on the CPU."""
    shorter_px = int(math.ceil(transform.image_size / transform.crop_ratio))

    @source_pipeline(source, runtime)
    def graph():
        fields = read_source(source, runtime.py_workers)
        jpegs, labels, indices = fields["jpegs"], fields["labels"], fields["indices"]
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=transform.exif,
                                   device="cpu" if runtime.device_id is None else "mixed")
        images = fn.resize(images, resize_shorter=shorter_px, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(
            images, crop=(transform.image_size, transform.image_size), crop_pos_x=0.5, crop_pos_y=0.5,
            mean=[255.0 * m for m in constants.IMAGENET_MEAN], std=[255.0 * s for s in constants.IMAGENET_STD],
            dtype=OUTPUT_DTYPES[runtime.dtype], output_layout="CHW")
        return images, labels, indices

    return graph()
