"""The training graph: decode the crop the sample source chose, know its box, pool the label map
over that box.

``training_pipeline(source, augment, runtime)`` only builds a graph from its arguments (no I/O, no
global state beyond loading the operator plugin once); the caller builds and runs it. The graph
draws no random numbers: every sample's crop window, box, flip, jitter factors and lighting
coefficients arrive with the sample (``relabel_dali.data.source``), which is what makes an epoch's
augmentation a pure function of (seed, rank, epoch, slot). Outputs, in order: ``images``
([3, S, S] float32/float16, normalized), ``boxes`` (float32 [4] normalized xyxy of the crop in the
whole, unflipped image), ``targets`` (float32 [num_classes]: pooled soft labels when the source
has label shards, else one-hot labels), ``labels`` and ``indices`` (int64 scalars); with
``token_size`` S also ``token_targets`` (float32 [S*S, num_classes]: the crop pooled to an S x S
grid, token ``r*S + c`` at row r, column c of the image as the student sees it, flipped with it)
and ``mirror`` (int32 scalar, 1 where the image was flipped); with ``token_compact`` the token
targets come in compact form instead (docs/OPERATOR.md, "Compact token targets"): ``token_ids``
(int32 [S*S, M], ascending, -1 as padding), ``token_values`` (float32 [S*S, M]) and ``token_rest``
(float32 [S*S]), M the most classes any token of the batch touches.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from relabel_dali.data import augment as constants
from relabel_dali.data.settings import POOL_MODES, Runtime, TrainAugment

OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
TRAIN_OUTPUTS = ("images", "boxes", "targets", "labels", "indices")
TOKEN_OUTPUTS = TRAIN_OUTPUTS + ("token_targets", "mirror")
COMPACT_TOKEN_OUTPUTS = TRAIN_OUTPUTS + ("token_ids", "token_values", "token_rest", "mirror")


def train_outputs(token_size: int = 0, token_compact: bool = False) -> tuple[str, ...]:
    """The names of ``training_pipeline``'s outputs, in order."""
    if not token_size:
        return TRAIN_OUTPUTS
    return COMPACT_TOKEN_OUTPUTS if token_compact else TOKEN_OUTPUTS


def dali_type(dtype) -> types.DALIDataType:
    return types.to_dali_type(np.dtype(dtype))


def read_source(source, py_workers: int) -> dict:
    """The external source for a ``SampleSource`` (``py_workers == 0`` runs it inline) and the
    fields of its packed samples as nodes: ``jpegs``, ``labels``, ``indices``; for training the
    augmentation fields (``anchor``, ``crop_shape``, ``box``, ``mirror``, ``brightness``,
    ``contrast``, ``saturation``, ``lighting``); with labels ``scores``, ``class_ids`` and (uint8
    scores only) ``scale``, ``offset``."""
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


def source_pipeline(source, runtime: Runtime):
    """``pipeline_def`` for a graph fed by a ``SampleSource`` (its parallel workers included).
    The seed is fixed: no operator in these graphs draws random numbers."""
    return pipeline_def(batch_size=source.batch_size, num_threads=runtime.num_threads, device_id=runtime.device_id,
                        seed=0, py_num_workers=max(runtime.py_workers, 1), py_start_method=runtime.start_method,
                        prefetch_queue_depth=runtime.prefetch_queue_depth)


def lighting_offsets(alphas):
    """Per-channel PCA lighting offsets (0..1 scale) from a node of three coefficients, or zeros."""
    if alphas is None:
        return (0.0, 0.0, 0.0)
    return tuple(sum(alphas[j] * constants.PCA_BASIS[c][j] for j in range(3)) for c in range(3))


def lighting_mean(alphas):
    """Per-sample normalization mean (0..255 scale) that also adds PCA lighting noise.

    (x + 255 * rgb - 255 * mean) / (255 * std) is the official ``normalize(lighting(x / 255))``,
    so folding ``rgb`` into the mean costs no extra pass over the pixels.
    """
    if alphas is None:
        return [255.0 * m for m in constants.IMAGENET_MEAN]
    rgb = lighting_offsets(alphas)
    return fn.stack(*[255.0 * (constants.IMAGENET_MEAN[c] - rgb[c]) for c in range(3)])


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
    mean = [(255.0 * (constants.IMAGENET_MEAN[c] - lighting[c]) - shift) / scale for c in range(3)]
    std = [255.0 * constants.IMAGENET_STD[c] / scale for c in range(3)]
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
    grey_mean = sum(channel_means[c] * constants.GREY_WEIGHTS[c] for c in range(3))
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


def jitter_and_normalize(images, *, jitter, lighting, mirror, dtype):
    """The photometric half of the training graph on DALI's own operators (the GPU graph's):
    uint8 HWC in, normalized CHW ``dtype`` out. ``jitter``: (brightness, contrast, saturation)
    nodes or None; ``lighting``: a node of three PCA coefficients or None."""
    if jitter is None:
        return fn.crop_mirror_normalize(images, mean=lighting_mean(lighting),
                                        std=[255.0 * s for s in constants.IMAGENET_STD], mirror=mirror,
                                        dtype=dtype, output_layout="CHW")
    return colour_transform(images, *jitter, lighting_offsets(lighting), mirror=mirror, dtype=dtype)


LIGHTING_BASIS = [value for row in constants.PCA_BASIS for value in row]  # row-major, as the operator takes it


def resize_jitter_normalize(images, *, size, jitter, lighting, mirror, dtype, pass_order: str = "horizontal_first"):
    """Resize, colour jitter, PCA lighting, normalization, mirror and CHW of decoded uint8 HWC
    crops in one CPU operator (the project's ``fn.resize_jitter_normalize``): the resize is PIL's
    bilinear resize bit for bit, as the official torchvision recipe runs it, and the colour steps
    are the same affine composition as ``colour_transform``'s."""
    arguments = {}
    if jitter is not None:
        arguments = dict(zip(("brightness", "contrast", "saturation"), jitter))
    if lighting is not None:
        arguments["lighting"] = lighting
    return fn.resize_jitter_normalize(images, size=list(size), mirror=mirror, dtype=dtype,
                                      lighting_basis=LIGHTING_BASIS,
                                      mean=[255.0 * m for m in constants.IMAGENET_MEAN],
                                      std=[255.0 * s for s in constants.IMAGENET_STD],
                                      pass_order=pass_order, **arguments)


def training_pipeline(source, augment: TrainAugment, runtime: Runtime, *, num_classes: int,
                      pool_mode: str = "softmax", fused: bool | None = None, token_size: int = 0,
                      token_compact: bool = False):
    """The training pipeline (unbuilt). ``source``: a ``relabel_dali.data.source.SampleSource`` built
    with this ``augment``; targets are pooled from its label shards (``pool_mode``) when it has
    them, else one-hot. ``token_size`` S > 0 (label shards only) adds the token targets: the same
    label record pooled over the same box to S x S, mirrored with the sample's flip; ``token_compact``
    gives them in compact form, pooled by the CPU operator in either graph (the GPU kernel writes
    dense targets only; the compact outputs are a tenth of the dense bytes or less). ``fused``
    (default: on the CPU) resizes and jitters with the one ``resize_jitter_normalize`` operator
    instead of DALI's resize, saturation and normalize; it is a CPU operator, so a GPU graph
    cannot use it."""
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode {pool_mode!r}: expected one of {POOL_MODES}")
    if source.augment != augment:
        raise ValueError("the source draws its crops with other augmentation settings than the graph's")
    gpu = runtime.device_id is not None
    fused = not gpu if fused is None else fused
    if fused and gpu:
        raise ValueError("fused=True needs a CPU runtime: resize_jitter_normalize is a CPU operator")
    use_relabel = source.with_labels
    if token_size and not use_relabel:
        raise ValueError(f"token_size {token_size}: token targets need a source with label shards")
    if token_compact and not token_size:
        raise ValueError("token_compact needs token targets: token_size 0 has none")
    if use_relabel or fused:
        from relabel_dali.ops.build import load_operators

        load_operators()
    dtype = OUTPUT_DTYPES[runtime.dtype]
    size = (augment.image_size, augment.image_size)

    @source_pipeline(source, runtime)
    def graph():
        fields = read_source(source, runtime.py_workers)
        jpegs, labels, indices = fields["jpegs"], fields["labels"], fields["indices"]
        images = fn.decoders.image_slice(jpegs, fields["anchor"], fields["crop_shape"], axis_names="HW",
                                         output_type=types.RGB, adjust_orientation=augment.exif,
                                         device="mixed" if gpu else "cpu")
        mirror = fields["mirror"] if augment.flip else 0
        jitter = (fields["brightness"], fields["contrast"], fields["saturation"]) if augment.color_jitter > 0 else None
        lighting = fields["lighting"] if augment.lighting_std > 0 else None
        if fused:
            images = resize_jitter_normalize(images, size=size, jitter=jitter, lighting=lighting, mirror=mirror,
                                             dtype=dtype)
        else:
            images = fn.resize(images, size=list(size), interp_type=types.INTERP_LINEAR, antialias=True)
            images = jitter_and_normalize(images, jitter=jitter, lighting=lighting, mirror=mirror, dtype=dtype)
        boxes = fields["box"]
        if use_relabel:
            host_scores, host_ids = scores, class_ids = fields["scores"], fields["class_ids"]
            scale, offset = fields.get("scale", 1.0), fields.get("offset", 0.0)
            if gpu:
                scores, class_ids = scores.gpu(), class_ids.gpu()
            # Boxes stay a CPU input on both backends: the operator checks them on the host and
            # hands them to its kernel without a device-to-host copy.
            targets = fn.label_pool(scores, class_ids, boxes, scale=scale, offset=offset,
                                    num_classes=num_classes, mode=pool_mode,
                                    device="gpu" if gpu else "cpu")
            if token_size and token_compact:
                compact = fn.label_pool(host_scores, host_ids, boxes, scale=scale, offset=offset,
                                        num_classes=num_classes, mode=pool_mode, output_size=token_size,
                                        mirror=mirror, compact=True, device="cpu")
                return (images, boxes, targets, labels, indices, *compact, fields["mirror"])
            if token_size:
                tokens = fn.label_pool(scores, class_ids, boxes, scale=scale, offset=offset,
                                       num_classes=num_classes, mode=pool_mode, output_size=token_size,
                                       mirror=mirror, device="gpu" if gpu else "cpu")
                return images, boxes, targets, labels, indices, tokens, fields["mirror"]
        else:
            targets = fn.one_hot(labels, num_classes=num_classes, dtype=types.FLOAT)
            if gpu:
                targets = targets.gpu()
        return images, boxes, targets, labels, indices

    return graph()
