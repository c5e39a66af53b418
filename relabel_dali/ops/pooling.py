"""pool_labels: LabelPool on torch tensors outside a pipeline (tools, tests, CutMix re-pooling).

The same native math as the DALI operator, reached through the DALI-free C ABI library that
:mod:`relabel_dali.ops.build` builds. CPU tensors are pooled on ``torch.get_num_threads()`` threads; CUDA
tensors on the current torch stream.
"""
from __future__ import annotations

import ctypes

import torch

from relabel_dali.ops.compact import CompactTargets
from relabel_dali.store.format import MAX_CLASSES

MODES = {"softmax": 0, "argmax": 1, "global_softmax": 2, "global_argmax": 3}
SCORE_TYPES = {torch.float32: 0, torch.float16: 1, torch.uint8: 2}
# Class id dtypes the CPU entry reads directly, range-checking as it goes (RELABEL_ID_* codes).
ID_TYPES = {torch.uint16: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3, torch.uint8: 4}


def _per_sample(name: str, value, n: int, default: float, device) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if tensor.numel() == 1:
        tensor = tensor.expand(n)
    if tensor.numel() != n:
        raise ValueError(f"{name}: {tensor.numel()} values for {n} samples, expected one per sample or one in all")
    return tensor.contiguous()


def _check_class_ids(class_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Range-checked class ids as int16 holding the uint16 bit pattern the CUDA entry reads."""
    wide = class_ids.to(torch.int32) if class_ids.dtype != torch.int64 else class_ids
    if wide.numel():
        low, high = torch.aminmax(wide)
        if int(low) < 0 or int(high) >= num_classes:
            bad = int(low) if int(low) < 0 else int(high)
            n, j, y, x = (int(i) for i in torch.nonzero(wide == bad)[0])
            raise ValueError(f"class_ids: sample {n}: class id {bad} at [k, y, x] = [{j}, {y}, {x}] is outside "
                             f"[0, num_classes - 1 = {num_classes - 1}]")
    return wide.to(torch.int16).contiguous()


def _check_boxes_on_device(boxes: torch.Tensor) -> None:
    """The native CUDA entry does not validate boxes (that would need a sync there); one sync here."""
    finite = torch.isfinite(boxes).all(1)
    inside = ((boxes >= 0) & (boxes <= 1)).all(1)
    ordered = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    bad = torch.nonzero(~(finite & inside & ordered))
    if bad.numel():
        i = int(bad[0, 0])
        x0, y0, x1, y1 = boxes[i].tolist()
        raise ValueError(f"boxes: sample {i}: box (x0, y0, x1, y1) = ({x0}, {y0}, {x1}, {y1}) is not inside [0, 1] "
                         f"with x0 < x1 and y0 < y1")


def _check_inputs(scores, class_ids, boxes, num_classes: int, mode: str, output_size: int | None = None) -> torch.Size:
    """The checks every backend shares; returns the batch shape [N, k, H, W]."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {sorted(MODES)}")
    if output_size is not None:
        if isinstance(output_size, bool) or not isinstance(output_size, int) or not 1 <= output_size <= 4096:
            raise ValueError(f"output_size {output_size!r}: expected None or an int in 1..4096 (tokens per side)")
        if output_size > 1 and mode.startswith("global"):
            raise ValueError(f"output_size {output_size} needs a box mode (softmax or argmax): {mode!r} pools the "
                             f"whole map into one target")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes = {num_classes}, expected 1..{MAX_CLASSES}")
    for name, tensor in (("scores", scores), ("class_ids", class_ids), ("boxes", boxes)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if scores.dim() != 4:
        raise ValueError(f"scores: shape {tuple(scores.shape)}, expected [N, k, H, W]")
    if scores.dtype not in SCORE_TYPES:
        raise TypeError(f"scores: dtype {scores.dtype}, expected float32, float16 or uint8")
    if class_ids.shape != scores.shape:
        raise ValueError(f"class_ids: shape {tuple(class_ids.shape)}, expected the scores' {tuple(scores.shape)}")
    n, k, h, w = scores.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes: shape {tuple(boxes.shape)}, expected [{n}, 4]")
    if min(k, h, w) < 1:
        raise ValueError(f"scores: shape {tuple(scores.shape)} has an empty label map")
    device = scores.device
    if class_ids.device != device or boxes.device != device:
        raise ValueError(f"scores, class_ids and boxes must be on one device, got {device}, {class_ids.device}, "
                         f"{boxes.device}")
    if class_ids.dtype.is_floating_point or class_ids.dtype.is_complex or class_ids.dtype == torch.bool:
        raise TypeError(f"class_ids: dtype {class_ids.dtype}, expected an integer dtype")
    return scores.shape


def _mirror_flags(mirror, n: int, device) -> torch.Tensor | None:
    """Per-sample flips as uint8 0/1 on ``device``, or None (no flips)."""
    if mirror is None:
        return None
    flags = torch.as_tensor(mirror, device=device).reshape(-1)
    if flags.dtype.is_floating_point or flags.dtype.is_complex:
        raise TypeError(f"mirror: dtype {flags.dtype}, expected bool or an integer dtype")
    if flags.numel() == 1:
        flags = flags.expand(n)
    if flags.numel() != n:
        raise ValueError(f"mirror: {flags.numel()} values for {n} samples, expected one per sample or one in all")
    return (flags != 0).to(torch.uint8).contiguous()


def _per_sample_arguments(scores, boxes, num_classes, mode, scale, offset, output_size,
                          mirror) -> tuple[list, list]:
    """(arguments from boxes to mirror, as every native entry takes them; the tensors they point into)."""
    n, k, h, w = scores.shape
    boxes = boxes.to(torch.float32).contiguous()
    is_uint8 = scores.dtype == torch.uint8
    scale_t = _per_sample("scale", scale, n, 1.0, scores.device) if is_uint8 else None
    offset_t = _per_sample("offset", offset, n, 0.0, scores.device) if is_uint8 else None
    mirror_t = _mirror_flags(mirror, n, scores.device)
    args = [boxes.data_ptr(), scale_t.data_ptr() if scale_t is not None else None,
            offset_t.data_ptr() if offset_t is not None else None, n, k, h, w, num_classes, MODES[mode],
            output_size or 1, mirror_t.data_ptr() if mirror_t is not None else None]
    return args, [boxes, scale_t, offset_t, mirror_t]


def output_shape(n: int, num_classes: int, output_size: int | None) -> tuple[int, ...]:
    """[N, C] for one target per crop (``output_size=None``), [N, S*S, C] for token targets."""
    return (n, num_classes) if output_size is None else (n, output_size * output_size, num_classes)


def kernel_arguments(scores, class_ids, boxes, num_classes: int, mode: str, scale, offset, validate: bool,
                     output_size: int | None = None, mirror=None) -> tuple[list, list]:
    """(arguments of the kernel's entries, relabel_pool_cuda and its host emulation, up to the flips;
    the tensors they point into, to keep alive until the kernel has run). ``validate`` checks class ids
    and boxes with torch first (on CUDA tensors, each check synchronises the GPU)."""
    scores = scores.contiguous()
    ids = _check_class_ids(class_ids, num_classes) if validate else class_ids.to(torch.int16).contiguous()
    per_sample, keep = _per_sample_arguments(scores, boxes, num_classes, mode, scale, offset, output_size, mirror)
    if validate and MODES[mode] < 2:
        _check_boxes_on_device(keep[0])
    return [scores.data_ptr(), SCORE_TYPES[scores.dtype], ids.data_ptr(), *per_sample], [scores, ids, *keep]


def _check_compact(compact, compact_slots, output_size) -> None:
    if not isinstance(compact, bool):
        raise TypeError(f"compact: expected a bool, got {compact!r}")
    if compact_slots is not None and not compact:
        raise ValueError(f"compact_slots {compact_slots!r} needs compact=True")
    if compact and output_size is None:
        raise ValueError("compact=True needs token targets: pass output_size S (1 for one token per crop)")
    if compact_slots is not None and (isinstance(compact_slots, bool) or not isinstance(compact_slots, int)
                                      or compact_slots < 1):
        raise ValueError(f"compact_slots {compact_slots!r}: expected None (as many as the batch needs) or an "
                         f"int >= 1")


def raise_for_code(code: int, err) -> None:
    """The native entries' failure codes as Python errors (RELABEL_CUDA_ERROR = 4 is a RuntimeError)."""
    if code != 0:
        raise (RuntimeError if code == 4 else ValueError)(err.value.decode(errors="replace"))


def pool_labels(scores: torch.Tensor, class_ids: torch.Tensor, boxes: torch.Tensor, num_classes: int = 1000,
                mode: str = "softmax", scale=None, offset=None, validate: bool = True, output_size: int | None = None,
                mirror=None, compact: bool = False, compact_slots: int | None = None) -> torch.Tensor | CompactTargets:
    """Pools top-k label maps over crop boxes: returns float32 ``[N, num_classes]`` targets, or with
    ``output_size`` S the token targets ``[N, S*S, num_classes]``, or with ``compact=True`` (CPU tensors
    only) those token targets as :class:`CompactTargets`.

    ``scores`` [N, k, H, W] float32/float16/uint8 (uint8 reads as ``offset + scale * q`` with per-sample
    ``scale``/``offset``, default 1 and 0; float scores ignore them), ``class_ids`` [N, k, H, W] of any
    integer dtype, ``boxes`` [N, 4] ``(x0, y0, x1, y1)`` normalized to the whole image. ``mode`` is
    ``softmax`` (official LabelPooling), ``argmax``, ``global_softmax`` or ``global_argmax``.
    ``validate=False`` skips the range checks of class ids and boxes on CUDA tensors, each of which
    synchronises the GPU (kernel benchmarks; the kernel still ignores out-of-range ids).

    Token targets (``softmax`` and ``argmax``; docs/OPERATOR.md): the box RoIAligned to S x S, token
    ``r * S + c`` at row r, column c of the crop as the student sees it after the flip; ``mirror`` [N]
    (bool or integers, or one for all) says which crops were flipped. S = 1 gives the per-crop targets,
    bit for bit, as ``[N, 1, C]``.

    Compact token targets (``compact=True``, docs/OPERATOR.md "Compact token targets"): ``ids [N, S*S, M]``
    int32 ascending with -1 as padding, ``values [N, S*S, M]`` float32 equal bit for bit to the dense
    targets at those ids (0 at the padding), ``rest [N, S*S]`` the dense value of every other class (0
    where no class is left). Softmax modes keep the classes each token's window touches, argmax modes
    the one class. ``M`` is ``compact_slots``, or by default the most any token of the batch needs (at
    least 1); a token needing more than ``compact_slots`` raises naming the sample and the token.
    """
    from relabel_dali.ops.build import load_capi

    n, k, h, w = _check_inputs(scores, class_ids, boxes, num_classes, mode, output_size)
    _check_compact(compact, compact_slots, output_size)
    device = scores.device
    if compact:
        if device.type != "cpu":
            raise ValueError(f"compact=True pools on the CPU only (the CUDA kernel writes dense token targets), "
                             f"got tensors on {device}")
        return _pool_compact_cpu(scores, class_ids, boxes, num_classes, mode, scale, offset, output_size, mirror,
                                 compact_slots)
    out = torch.empty(output_shape(n, num_classes, output_size), dtype=torch.float32, device=device)
    if n == 0:
        return out
    library = load_capi()
    err = ctypes.create_string_buffer(1024)
    if device.type == "cuda":
        if not library.relabel_pool_has_cuda():
            raise RuntimeError("pool_labels on CUDA tensors needs the pooling library built with nvcc "
                               "(unset RELABEL_DALI_NO_CUDA and make nvcc available)")
        args, _keep = kernel_arguments(scores, class_ids, boxes, num_classes, mode, scale, offset, validate,
                                       output_size, mirror)
        stream = torch.cuda.current_stream(device).cuda_stream
        # A launch goes to the calling thread's current device, which must own the stream.
        with torch.cuda.device(device):
            code = library.relabel_pool_cuda(*args, stream, out.data_ptr(), err, len(err))
    elif device.type == "cpu":
        # No torch ops here: their OpenMP workers would keep spinning on the cores the native
        # threads need. The native entry validates and converts the ids itself.
        scores = scores.contiguous()
        if class_ids.dtype not in ID_TYPES:
            class_ids = class_ids.to(torch.int64)
        class_ids = class_ids.contiguous()
        per_sample, _keep = _per_sample_arguments(scores, boxes, num_classes, mode, scale, offset, output_size,
                                                  mirror)
        code = library.relabel_pool_cpu(scores.data_ptr(), SCORE_TYPES[scores.dtype], class_ids.data_ptr(),
                                        ID_TYPES[class_ids.dtype], *per_sample, torch.get_num_threads(),
                                        out.data_ptr(), err, len(err))
    else:
        raise ValueError(f"pool_labels runs on cpu or cuda tensors, got {device}")
    raise_for_code(code, err)
    return out


def _pool_compact_cpu(scores, class_ids, boxes, num_classes, mode, scale, offset, output_size, mirror,
                      slots) -> CompactTargets:
    """pool_labels(compact=True) on CPU tensors: the native entry counts each sample's slots (unless
    ``slots`` is given), then pools into [N, S*S, M] outputs."""
    from relabel_dali.ops.build import load_capi

    n, tokens = scores.shape[0], output_size * output_size
    library = load_capi()
    err = ctypes.create_string_buffer(1024)
    scores = scores.contiguous()
    if class_ids.dtype not in ID_TYPES:
        class_ids = class_ids.to(torch.int64)
    class_ids = class_ids.contiguous()
    per_sample, _keep = _per_sample_arguments(scores, boxes, num_classes, mode, scale, offset, output_size, mirror)
    head = [scores.data_ptr(), SCORE_TYPES[scores.dtype], class_ids.data_ptr(), ID_TYPES[class_ids.dtype],
            *per_sample, torch.get_num_threads()]
    if slots is None:
        if n == 0:
            slots = 1
        else:
            needed = torch.zeros(n, dtype=torch.int32)
            code = library.relabel_pool_cpu_compact(*head, 0, None, None, None, needed.data_ptr(), err, len(err))
            raise_for_code(code, err)
            slots = max(int(needed.max()), 1)
    ids = torch.empty(n, tokens, slots, dtype=torch.int32)
    values = torch.empty(n, tokens, slots, dtype=torch.float32)
    rest = torch.empty(n, tokens, dtype=torch.float32)
    if n:
        code = library.relabel_pool_cpu_compact(*head, slots, ids.data_ptr(), values.data_ptr(), rest.data_ptr(),
                                                None, err, len(err))
        raise_for_code(code, err)
    return CompactTargets(ids, values, rest)
